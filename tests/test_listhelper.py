"""`authgate run` with a big block list: the helper process compiles it while
the gateway starts (runtime/listhelper.py), and whatever becomes of the
helper, the gateway answers the same.

Real `authgate run` processes in front of the recording backend, real clients
sending from loopback addresses on the list and off it. To count helpers or
kill one, the gateway's environment puts a `sitecustomize` on the module
path that acts only in the helper process, before its work (blocklists.work,
in a process forked from the gateway, or `python -m authgate.policy.blocklists`):
the helper itself is the real one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import START_SECONDS, UNBUFFERED_ENV, Backend, send, wait_until
from test_blocklists import POLICY, write_feed
from test_startup import free_port

BIN = Path(sys.executable).parent
HELPER_SAYS = "compiled by the helper process while the gateway started"

SITECUSTOMIZE = """
import os, sys
mode, _, arg = os.environ.get("LISTHELPER_TEST", "").partition(":")


def act():
    if mode == "count":
        with open(arg, "a") as f:
            f.write(f"{os.getpid()}\\n")
    elif mode == "die":
        os.kill(os.getpid(), 9)


if mode and "authgate.policy.blocklists" in sys.orig_argv:
    act()  # a helper started as a new interpreter
elif mode:
    from authgate.policy import blocklists  # a helper forked from the gateway

    real = blocklists.work

    def work(*args):
        act()
        real(*args)

    blocklists.work = work
"""


class Run:
    """`authgate run` as a subprocess, its output in a file."""

    def __init__(self, folder: Path, upstream: str, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.log = folder / f"run-{self.port}.out"
        cmd = [str(BIN / "authgate"), "run", "--policy", str(folder / "p.yaml")]
        cmd += ["--upstream", upstream, "--listen", f"127.0.0.1:{self.port}", *args]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text()

    def wait_serving(self, says: str = "listening on", times: int = 1) -> str:
        def said() -> str | None:
            out = self.output()
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}: {out}")
            return out if out.count(says) >= times else None

        result: str = wait_until(said, START_SECONDS, what=f"{says!r} x{times} in {self.log}")
        return result

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(START_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_feed(tmp_path / "feed.txt")
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "tmp").mkdir()
    return tmp_path


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for r in started:
        r.stop()


def env_for(folder: Path, **extra: str) -> dict[str, str]:
    env = dict(UNBUFFERED_ENV, AUTHGATE_CACHE_DIR="off", TMPDIR=str(folder / "tmp"))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(folder / "site"), os.environ.get("PYTHONPATH")) if p
    )
    env.pop("AUTHGATE_LIST_HELPER_PIPE", None)
    env.update(extra)
    return env


def start(runs: list[Run], folder: Path, backend: Backend, env: dict[str, str], *args: str) -> Run:
    r = Run(folder, backend.url, env, *args)
    runs.append(r)
    return r


def answers_as_the_list_says(r: Run, backend: Backend) -> None:
    """Listed sources get 403 and the backend sees nothing; others pass."""
    backend.clear()
    for source in ("127.0.0.2", "127.0.1.5"):
        assert send(("127.0.0.1", r.port), "GET", "/x", source=source).status == 403
    assert backend.seen == []
    for source in ("127.0.0.1", "127.0.0.3"):
        assert send(("127.0.0.1", r.port), "GET", "/x", source=source).status == 200
    assert [s.target for s in backend.seen] == ["/x", "/x"]


def helpers_counted(folder: Path) -> int:
    counted = folder / "helpers.txt"
    return len(counted.read_text().splitlines()) if counted.exists() else 0


def test_run_serves_the_list_the_helper_compiled(
    runs: list[Run], folder: Path, backend: Backend
) -> None:
    count = f"count:{folder / 'helpers.txt'}"
    r = start(runs, folder, backend, env_for(folder, LISTHELPER_TEST=count))
    out = r.wait_serving()
    assert f"feed.txt: 90,004 entries, {HELPER_SAYS} (compiled in" in out
    assert helpers_counted(folder) == 1
    answers_as_the_list_says(r, backend)
    assert list((folder / "tmp").iterdir()) == []  # its private folder, gone after the load


def test_run_with_the_cache_has_the_helper_fill_it_once(
    runs: list[Run], folder: Path, backend: Backend
) -> None:
    cache = folder / "cache"
    count = f"count:{folder / 'helpers.txt'}"
    env = env_for(folder, AUTHGATE_CACHE_DIR=str(cache), LISTHELPER_TEST=count)
    r = start(runs, folder, backend, env)
    out = r.wait_serving()
    # Taken from the helper, or from the cache it filled if it was done first.
    assert HELPER_SAYS in out or "90,004 entries, compiled before (cache)" in out
    assert len(list(cache.glob("*.ipset"))) == 1
    r.stop()
    again = start(runs, folder, backend, env)
    assert "90,004 entries, compiled before (cache)" in again.wait_serving()
    assert helpers_counted(folder) == 2  # the second found it in the cache already
    answers_as_the_list_says(again, backend)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        pytest.param({"AUTHGATE_LIST_HELPER": "off"}, None, id="helper-off"),
        pytest.param(
            {"LISTHELPER_TEST": "die"},
            "no set from the helper process (it said nothing)",
            id="killed",
        ),
    ],
)
def test_run_without_the_helpers_set_parses_and_answers_the_same(
    runs: list[Run], folder: Path, backend: Backend, extra: dict[str, str], says: str | None
) -> None:
    r = start(runs, folder, backend, env_for(folder, **extra))
    out = r.wait_serving()
    assert HELPER_SAYS not in out
    if says is None:
        assert "helper process" not in out
    else:
        assert says in out
    answers_as_the_list_says(r, backend)


def test_run_refuses_a_bad_line_naming_file_and_line_as_without_the_helper(
    runs: list[Run], folder: Path, backend: Backend
) -> None:
    write_feed(folder / "feed.txt", "192.0.2.1\n10.0.0.1/8\n")
    said = []
    for extra in ({}, {"AUTHGATE_LIST_HELPER": "off"}):
        r = start(runs, folder, backend, env_for(folder, **extra))
        assert r.proc.wait(START_SECONDS) == 2
        out = r.output()
        said.append([line for line in out.splitlines() if "host bits" in line])
    assert said[0] == said[1]
    assert said[0] == [
        f"authgate: {folder / 'feed.txt'}:90006: '10.0.0.1/8' has host bits set "
        "(did you mean 10.0.0.0/8?)"
    ]
    assert backend.seen == []


def test_workers_take_one_helpers_work(runs: list[Run], folder: Path, backend: Backend) -> None:
    count = f"count:{folder / 'helpers.txt'}"
    r = start(runs, folder, backend, env_for(folder, LISTHELPER_TEST=count), "--workers", "2")
    out = r.wait_serving(HELPER_SAYS, times=2)
    assert helpers_counted(folder) == 1  # the supervisor's, not one each
    assert out.count("90,004 entries") == 2  # each worker took its set
    for _ in range(3):  # whichever worker the kernel hands the connection
        answers_as_the_list_says(r, backend)
    assert r.stop() == 0
    assert list((folder / "tmp").iterdir()) == []  # the supervisor removed its folder
