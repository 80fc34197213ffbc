"""Block lists compiled by a helper process (policy/blocklists.py): the loader
takes the helper's set only when it was compiled from exactly the content the
loader read, and otherwise, whatever went wrong, compiles the lists itself
with the same result and the same errors.

Real helper processes (`python -m authgate.policy.blocklists`), real pipes,
real files; `tests/test_listhelper.py` runs them under `authgate run`.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from authgate.core.ipset import (
    IPSet,
    cidr_key,
    merge_cidr_keys,
    merge_sorted_cidr_keys,
    parse_cidr,
    parse_ip,
)
from authgate.policy import blocklists, listcache
from authgate.policy.load import load_policy
from authgate.policy.marks import PolicyError
from authgate.runtime import listhelper
from conftest import START_SECONDS, wait_until
from test_listcache import POLICY  # the same one-list policy

BLOCKED = ["203.0.113.9", "127.0.0.2", "127.0.1.5", "10.1.2.3", "172.16.0.5", "2001:db8::1"]
ALLOWED = ["127.0.0.1", "127.0.0.3", "192.0.2.1", "10.200.0.1", "2001:db9::1"]


def write_feed(path: Path, extra: str = "") -> None:
    """Just over listcache.MIN_BYTES: /24 networks and addresses interleaved
    (both of the bulk reader's shapes), a comment, an IPv6 network, and the
    loopback addresses the end-to-end tests send from."""
    lines = ["# a feed", "127.0.0.2", "127.0.1.0/24"]
    for i in range(45_000):
        lines.append(f"10.{i >> 8 & 127}.{i & 255}.0/24")
        lines.append(f"172.{16 + (i >> 16)}.{i >> 8 & 255}.{i & 255}")
    lines.append("2001:db8::/32")
    path.write_text("\n".join(lines) + "\n" + extra)
    assert path.stat().st_size >= listcache.MIN_BYTES


@pytest.fixture
def policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("AUTHGATE_CACHE_DIR", "off")
    monkeypatch.delenv(listhelper.HANDED, raising=False)
    write_feed(tmp_path / "feed.txt")
    (tmp_path / "p.yaml").write_text(POLICY)
    yield tmp_path / "p.yaml"
    blocklists.release()  # a test that failed before its load


def answers(s: IPSet) -> dict[str, bool]:
    return {a: s.contains(*parse_ip(a)) for a in BLOCKED + ALLOWED}


def parsed_here(policy: Path) -> IPSet:
    """The set as the loader compiles it without any helper."""
    assert blocklists.expected() is None
    return load_policy(policy).block


def spawn(
    folder: Path, policy: Path, code: str | None = None, *args: str
) -> subprocess.Popen[bytes]:
    """A helper process the loader expects: the real one on `policy`, or a
    Python program `code` in its place (one that misbehaves), given FOLDER FD
    ARGS."""
    folder.mkdir(mode=0o700, exist_ok=True)
    done, write_end = os.pipe()
    if code is None:
        argv = ["-P", "-m", "authgate.policy.blocklists", str(policy), str(folder), str(write_end)]
        argv.append(str(os.getpid()))
    else:
        argv = ["-c", code, str(folder), str(write_end), *args]
    process = subprocess.Popen([sys.executable, *argv], pass_fds=(write_end,))
    os.close(write_end)

    def cleanup() -> None:
        if process.poll() is None:
            process.kill()
        process.wait()

    blocklists.expect(done, folder, cleanup)
    return process


# --- what the helper is given ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(POLICY, (["203.0.113.0/24"], ["DIR/feed.txt"]), id="inline-and-file"),
        pytest.param(
            "ip: {block_files: [/abs/list.txt, rel/list.txt]}\n",
            ([], ["/abs/list.txt", "DIR/rel/list.txt"]),
            id="absolute-and-relative",
        ),
        pytest.param("ip: {block: [192.0.2.1]}\n", None, id="no-files"),
        pytest.param("rules: []\n", None, id="no-ip"),
        pytest.param("ip: {block_files: feed.txt}\n", None, id="not-a-list"),
        pytest.param("ip: {block_files: [1, 2]}\n", None, id="not-strings"),
        pytest.param("ip: {block: [1], block_files: [a]}\n", None, id="inline-not-strings"),
        pytest.param("- a list\n", None, id="not-a-mapping"),
    ],
)
def test_lists_of_reads_what_the_loader_reads(
    tmp_path: Path, text: str, expected: tuple[list[str], list[str]] | None
) -> None:
    found = blocklists.lists_of(text, str(tmp_path / "p.yaml"))
    if expected is not None:
        expected = (expected[0], [f.replace("DIR", str(tmp_path)) for f in expected[1]])
    assert found == expected


def test_lists_of_refuses_bad_yaml_as_the_loader_does(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="YAML"):
        blocklists.lists_of("ip: {block_files: [a\n", str(tmp_path / "p.yaml"))


# --- the helper's merge, shared with a fork ------------------------------------------


@pytest.mark.parametrize("way", ["forked", "the-fork-fails", "no-fork"])
def test_the_helper_merges_in_two_as_in_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, way: str
) -> None:
    rng = random.Random(7)
    nets = [(rng.getrandbits(32) >> p << p, p) for p in rng.choices([0, 4, 8, 24], k=3000)]
    keys = [cidr_key(a, a | (1 << p) - 1) for a, p in nets]
    expected = merge_sorted_cidr_keys(sorted(keys))
    assert len(expected[0]) < len(keys)  # some overlap: there is merging to do
    monkeypatch.setattr(blocklists, "SPLIT_MIN", 100)
    parent = os.getpid()
    real = merge_sorted_cidr_keys
    calls: list[str] = []

    def merging(part: Iterable[float]) -> tuple[array[int], array[int]]:
        if os.getpid() != parent:
            if way == "the-fork-fails":
                raise MemoryError  # the fork dies: writes nothing
            (tmp_path / "the-fork-merged").touch()
        calls.append("half")
        return real(part)

    def all_here(keys: array[float] | list[float]) -> tuple[array[int], array[int]]:
        calls.append("all")
        return merge_cidr_keys(keys)

    monkeypatch.setattr(blocklists, "merge_sorted_cidr_keys", merging)
    monkeypatch.setattr(blocklists, "merge_cidr_keys", all_here)
    if way == "no-fork":
        monkeypatch.delattr(os, "fork")
    given = array("d", keys)
    assert blocklists.merge_in_two(given) == expected
    assert len(given) == 0  # consumed
    # Here: both halves when the fork failed, one when it worked, all without.
    expected_calls = {"forked": ["half"], "the-fork-fails": ["half", "half"], "no-fork": ["all"]}
    assert calls == expected_calls[way]
    assert (tmp_path / "the-fork-merged").exists() is (way == "forked")


# --- taking the helper's set -------------------------------------------------------


def test_the_loader_takes_the_set_the_helper_compiled(
    policy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = parsed_here(policy)
    caplog.set_level(logging.INFO, "authgate")
    spawn(tmp_path / "handoff", policy)
    taken = load_policy(policy).block
    assert "compiled by the helper process while the gateway started (compiled in" in caplog.text
    assert taken.to_bytes() == expected.to_bytes()
    assert answers(taken) == {a: a in BLOCKED for a in BLOCKED + ALLOWED}
    assert taken.entries == expected.entries == 90_004
    assert blocklists.expected() is None  # only the first load takes it


def test_a_set_compiled_from_other_content_is_not_taken(
    policy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The helper read a list that has changed since (here: another file that
    blocks what the policy allows): its set is stored under the key of what it
    read, which is not the key of what the loader read."""
    expected = parsed_here(policy)
    write_feed(tmp_path / "other.txt", "127.0.0.1\n127.0.0.3\n")
    (tmp_path / "other.yaml").write_text(POLICY.replace("feed.txt", "other.txt"))
    spawn(tmp_path / "handoff", tmp_path / "other.yaml")
    caplog.set_level(logging.INFO, "authgate")
    taken = load_policy(policy).block
    assert "no set from the helper process (compiled in" in caplog.text
    assert taken.to_bytes() == expected.to_bytes()
    assert not taken.contains(*parse_ip("127.0.0.1"))
    assert len(list((tmp_path / "handoff").glob("*.ipset"))) == 1  # the helper's, unused


GARBAGE = """
import os, sys
from pathlib import Path
from authgate.core.ipset import IPSet
from authgate.policy import listcache
folder, fd, key, how = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
path = folder / (key + ".ipset")
if how == "garbage":
    path.write_bytes(b"authgate-ipset-cache-1\\n" + key.encode() + os.urandom(4096))
else:  # a whole entry, cut short
    listcache.store(key, IPSet.from_strings(["127.0.0.1"]), folder)
    path.write_bytes(path.read_bytes()[:-1])
    os.chmod(path, 0o600)
os.write(fd, b"compiled, it says (" + how.encode() + b")")  # so its order goes unchecked
"""


@pytest.mark.parametrize("how", ["garbage", "cut-short"])
def test_garbage_under_the_right_key_is_not_taken(
    policy: Path, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    expected = parsed_here(policy)
    key = listcache.key([parse_cidr("203.0.113.0/24")], [(tmp_path / "feed.txt").read_bytes()])
    spawn(tmp_path / "handoff", policy, GARBAGE, key, how)
    caplog.set_level(logging.INFO, "authgate")
    taken = load_policy(policy).block
    assert f"no set from the helper process (compiled, it says ({how}))" in caplog.text
    assert (tmp_path / "handoff" / f"{key}.ipset").exists()
    assert taken.to_bytes() == expected.to_bytes()


def test_a_killed_helper_is_not_waited_for(
    policy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = parsed_here(policy)
    process = spawn(tmp_path / "handoff", policy)
    process.send_signal(signal.SIGSTOP)  # long before it could have compiled anything
    process.kill()
    caplog.set_level(logging.INFO, "authgate")
    began = time.monotonic()
    taken = load_policy(policy).block
    assert time.monotonic() - began < blocklists.WAIT_FIRST  # no waiting for a bound
    assert "no set from the helper process (it said nothing)" in caplog.text
    assert taken.to_bytes() == expected.to_bytes()
    assert process.returncode == -signal.SIGKILL


def test_a_helper_that_hangs_is_waited_for_a_bounded_time_then_ended(
    policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    expected = parsed_here(policy)
    monkeypatch.setattr(blocklists, "WAIT_FIRST", 0.5)
    monkeypatch.setattr(blocklists, "WAIT_PER_MB", 0.0)
    process = spawn(tmp_path / "handoff", policy)
    process.send_signal(signal.SIGSTOP)  # alive, and never finishing
    caplog.set_level(logging.INFO, "authgate")
    began = time.monotonic()
    taken = load_policy(policy).block
    assert 0.5 <= time.monotonic() - began < 0.5 + 30  # the bound, then a parse
    assert "the helper process has not finished after 0.5 s; compiling it here" in caplog.text
    assert process.returncode == -signal.SIGKILL  # ended, not left behind
    assert taken.to_bytes() == expected.to_bytes()


def test_a_bad_line_is_refused_naming_file_and_line_as_without_a_helper(
    policy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_feed(tmp_path / "feed.txt", "192.0.2.1\n10.0.0.1/8\n")
    with pytest.raises(PolicyError) as without:
        load_policy(policy)
    spawn(tmp_path / "handoff", policy)
    caplog.set_level(logging.INFO, "authgate")
    with pytest.raises(PolicyError) as helped:
        load_policy(policy)
    assert "no set from the helper process (gave up (PolicyError) in" in caplog.text
    assert str(helped.value) == str(without.value)
    assert (helped.value.file, helped.value.line) == (str(tmp_path / "feed.txt"), 90_006)
    assert "has host bits set" in helped.value.message
    assert blocklists.expected() is None


# --- starting it (runtime/listhelper.py), in this process ----------------------------


def test_start_runs_the_helper_and_the_loader_takes_its_set(
    policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where its private folder goes
    monkeypatch.setattr("tempfile.tempdir", None)
    expected = parsed_here(policy)
    listhelper.start(str(policy))
    pending = blocklists.expected()
    assert pending is not None
    folder = pending[1]
    assert folder.parent == tmp_path and (folder.stat().st_mode & 0o777) == 0o700
    caplog.set_level(logging.INFO, "authgate")
    taken = load_policy(policy).block
    assert "compiled by the helper process" in caplog.text
    assert taken.to_bytes() == expected.to_bytes()
    assert not folder.exists()  # removed with the helper, after the first load


def test_start_with_the_cache_compiles_into_the_cache(
    policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    expected = parsed_here(policy)
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTHGATE_CACHE_DIR", str(cache))
    listhelper.start(str(policy))
    caplog.set_level(logging.INFO, "authgate")
    assert load_policy(policy).block.to_bytes() == expected.to_bytes()
    assert "compiled by the helper process" in caplog.text
    assert len(list(cache.glob("*.ipset"))) == 1
    caplog.clear()
    listhelper.start(str(policy))  # the next start: in the cache already
    assert load_policy(policy).block.to_bytes() == expected.to_bytes()
    assert "compiled before (cache)" in caplog.text


@pytest.mark.parametrize("case", ["off", "no-block-files", "one-core"])
def test_start_needs_no_helper(
    policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    if case == "off":
        monkeypatch.setenv(listhelper.ENV, "off")
    elif case == "no-block-files":
        policy.write_text(POLICY.replace("  block_files: [feed.txt]\n", ""))
    cores = os.sched_getaffinity(0)
    if case == "one-core":
        os.sched_setaffinity(0, {min(cores)})
    try:
        listhelper.start(str(policy))
    finally:
        os.sched_setaffinity(0, cores)
    assert blocklists.expected() is None


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("small-lists", "lists too small to need it"),
        ("a-list-missing", "gave up (FileNotFoundError)"),
        ("bad-yaml", "gave up (PolicyError)"),
        ("bad-yaml-elsewhere", "compiled"),  # the ip section parses alone
        ("not-a-list", "no block lists"),
    ],
)
def test_a_helper_with_nothing_to_do_leaves_the_loader_as_it_was(
    policy: Path, tmp_path: Path, case: str, says: str
) -> None:
    """The helper reads the policy itself: what it cannot compile, the loader
    compiles or refuses as without it (and what it compiles from a policy
    the loader refuses, nobody takes)."""
    if case == "small-lists":
        (tmp_path / "feed.txt").write_text("192.0.2.1\n")
    elif case == "a-list-missing":
        (tmp_path / "feed.txt").unlink()
    elif case == "bad-yaml":
        policy.write_text(POLICY.replace("[feed.txt]", "[feed.txt"))
    elif case == "bad-yaml-elsewhere":
        policy.write_text(POLICY + "  - [\n")
    elif case == "not-a-list":
        policy.write_text(POLICY.replace("[feed.txt]", "feed.txt"))
    expected: IPSet | PolicyError
    try:
        expected = parsed_here(policy)
    except PolicyError as e:
        expected = e
    done, write_end = os.pipe()
    blocklists.work(str(policy), tmp_path, write_end, os.getppid())  # what the helper says
    os.close(write_end)
    assert os.read(done, 4096).decode().startswith(says + " in ")
    os.close(done)
    listhelper.start(str(policy))
    assert blocklists.expected() is not None
    if isinstance(expected, IPSet):
        assert load_policy(policy).block.to_bytes() == expected.to_bytes()
    else:
        with pytest.raises(PolicyError) as got:
            load_policy(policy)
        assert str(got.value) == str(expected)
    assert blocklists.expected() is None  # released after the load, either way


@pytest.mark.parametrize(
    ("cgroup", "files", "cores"),
    [
        pytest.param("0::/\n", {"cpu.max": "max 100000\n"}, None, id="v2-no-limit"),
        pytest.param("0::/\n", {"cpu.max": "100000 100000\n"}, 1.0, id="v2-container-1-cpu"),
        pytest.param(
            "0::/system.slice/a.service\n",
            {"system.slice/a.service/cpu.max": "150000 100000\n"},
            1.5,
            id="v2-service-quota",
        ),
        pytest.param(
            "1:cpu,cpuacct:/docker/x\n0::/\n",
            {
                "cpu/docker/x/cpu.cfs_quota_us": "50000\n",
                "cpu/docker/x/cpu.cfs_period_us": "100000",
            },
            0.5,
            id="v1-quota",
        ),
        pytest.param(
            "1:cpu:/\n",
            {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
            None,
            id="v1-no-limit",
        ),
        pytest.param("0::/\n", {"unified/cpu.max": "300000 100000\n"}, 3.0, id="hybrid"),
        pytest.param("0::/\n", {"cpu.max": "lots 0\n"}, None, id="garbage"),
        pytest.param("0::/\n", {}, None, id="no-files"),
    ],
)
def test_cpu_quota(tmp_path: Path, cgroup: str, files: dict[str, str], cores: float | None) -> None:
    """A container's or a service's CPU limit counts as the cores there are:
    with less than two, no helper is started."""
    (tmp_path / "cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    assert listhelper.cpu_quota(tmp_path / "cgroup", tmp_path / "fs") == cores


ORPHANING = """
import os, subprocess, sys
done, write_end = os.pipe()
helper = [sys.executable, "-P", "-m", "authgate.policy.blocklists", *sys.argv[1:]]
helper += [str(write_end), str(os.getpid())]
subprocess.Popen(helper, pass_fds=(write_end,))
"""  # and gone at once, as a gateway killed while starting: its helper is orphaned


def test_a_helper_whose_gateway_is_gone_stores_nothing(policy: Path, tmp_path: Path) -> None:
    """Killed while starting (SIGTERM before its handlers, SIGKILL), a gateway
    never takes the set, nor removes its private folder: the helper leaves
    nothing behind (not 8 MB in /tmp)."""
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    subprocess.run([sys.executable, "-c", ORPHANING, str(policy), str(folder)], check=True)
    wait_until(lambda: not folder.exists(), START_SECONDS, what="the helper's folder removed")
    assert list(tmp_path.rglob("*.ipset")) == []
