"""The compiled block-list cache: content-keyed, private, verified."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from authgate.core.ipset import IPSet, parse_ip
from authgate.policy import listcache
from authgate.policy.load import load_policy
from authgate.policy.marks import PolicyError

SET = IPSet.from_strings(["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"])
KEY = listcache.key([], [b"10.0.0.0/8\n"])


def same(a: IPSet, b: IPSet) -> bool:
    return a.to_bytes() == b.to_bytes()


def test_store_then_load(tmp_path: Path) -> None:
    where = tmp_path / "c"
    assert listcache.store(KEY, SET, where)
    got = listcache.load(KEY, where)
    assert got is not None and same(got, SET)
    assert (where.stat().st_mode & 0o777) == 0o700
    (file,) = where.iterdir()
    assert (file.stat().st_mode & 0o777) == 0o600


def test_the_key_is_the_content() -> None:
    assert listcache.key([], [b"a", b"b"]) != listcache.key([], [b"ab"])
    assert listcache.key([], [b"a"]) != listcache.key([(4, 1, 1)], [b"a"])
    assert listcache.key([(4, 1, 1)], [b"a"]) == listcache.key([(4, 1, 1)], [b"a"])


def corrupt(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("at", [0, 30, -40, -1], ids=["magic", "key", "body", "checksum"])
def test_a_changed_byte_is_a_miss(tmp_path: Path, at: int) -> None:
    listcache.store(KEY, SET, tmp_path)
    corrupt(tmp_path / f"{KEY}.ipset", at)
    assert listcache.load(KEY, tmp_path) is None


def test_a_file_under_another_name_is_a_miss(tmp_path: Path) -> None:
    listcache.store(KEY, SET, tmp_path)
    other = listcache.key([], [b"something else\n"])
    os.rename(tmp_path / f"{KEY}.ipset", tmp_path / f"{other}.ipset")
    assert listcache.load(other, tmp_path) is None


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_folder_others_may_write_is_not_trusted(tmp_path: Path, mode: int) -> None:
    listcache.store(KEY, SET, tmp_path / "c")
    (tmp_path / "c").chmod(mode)
    assert listcache.load(KEY, tmp_path / "c") is None
    assert listcache.store(KEY, SET, tmp_path / "c") is False


def test_a_file_others_may_write_is_not_trusted(tmp_path: Path) -> None:
    listcache.store(KEY, SET, tmp_path)
    (tmp_path / f"{KEY}.ipset").chmod(0o666)
    assert listcache.load(KEY, tmp_path) is None


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    listcache.store(KEY, SET, real)
    (tmp_path / "linked").symlink_to(real)
    assert listcache.load(KEY, tmp_path / "linked") is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / f"{KEY}.ipset").symlink_to(real / f"{KEY}.ipset")
    assert listcache.load(KEY, elsewhere) is None


def test_only_the_newest_are_kept(tmp_path: Path) -> None:
    names = [listcache.key([], [str(i).encode()]) for i in range(listcache.KEEP + 2)]
    for i, name in enumerate(names):
        listcache.store(name, SET, tmp_path)
        os.utime(tmp_path / f"{name}.ipset", (1000 + i, 1000 + i))
    listcache.store(names[-1], SET, tmp_path)  # evicts after writing
    kept = sorted(p.name for p in tmp_path.glob("*.ipset"))
    assert kept == sorted(f"{n}.ipset" for n in names[-listcache.KEEP :])


def test_a_writer_that_died_leaves_no_temporary_file_for_long(tmp_path: Path) -> None:
    died = tmp_path / f".{KEY}.4242.tmp"  # what a helper killed mid-store leaves
    died.write_bytes(b"half a set")
    old = time.time() - listcache.STALE_TMP - 1
    os.utime(died, (old, old))
    writing = tmp_path / f".{KEY}.4343.tmp"  # another process writing right now
    writing.write_bytes(b"a set on its way")
    assert listcache.store(KEY, SET, tmp_path)
    assert not died.exists()
    assert writing.exists()
    assert listcache.load(KEY, tmp_path) is not None


def test_where_it_lives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AUTHGATE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert listcache.folder() == tmp_path / "authgate" / "ipsets"
    monkeypatch.setenv("AUTHGATE_CACHE_DIR", str(tmp_path / "x"))
    assert listcache.folder() == tmp_path / "x"
    monkeypatch.setenv("AUTHGATE_CACHE_DIR", "off")
    assert listcache.folder() is None
    assert listcache.store(KEY, SET) is False and listcache.load(KEY) is None


# --- through the policy loader -----------------------------------------------


def big_feed(path: Path, extra: str = "") -> None:
    """Just over MIN_BYTES of addresses (the cache's threshold)."""
    lines = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(90_000)]
    path.write_text("# feed\n" + "\n".join(lines) + "\n" + extra)
    assert path.stat().st_size >= listcache.MIN_BYTES


POLICY = """version: 1
ip:
  block: [203.0.113.0/24]
  block_files: [feed.txt]
rules:
  - {name: all, match: {path: /**}, allow: anyone}
"""


def blocked(policy_path: Path, address: str) -> bool:
    return load_policy(policy_path).block.contains(*parse_ip(address))


def test_the_policy_reads_a_big_list_compiled_the_second_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTHGATE_CACHE_DIR", str(cache))
    big_feed(tmp_path / "feed.txt")
    (tmp_path / "p.yaml").write_text(POLICY)
    caplog.set_level(logging.INFO, "authgate")
    first = load_policy(tmp_path / "p.yaml")
    assert "compiled before" not in caplog.text and len(list(cache.iterdir())) == 1
    caplog.clear()
    second = load_policy(tmp_path / "p.yaml")
    assert "compiled before (cache)" in caplog.text
    assert same(first.block, second.block) and second.block.entries == 90_001
    assert first.files == second.files  # the watcher still sees the list
    assert blocked(tmp_path / "p.yaml", "203.0.113.9") and blocked(tmp_path / "p.yaml", "10.1.2.3")
    # Changed content is a miss, and the change takes effect.
    assert not blocked(tmp_path / "p.yaml", "198.51.100.7")
    big_feed(tmp_path / "feed.txt", "198.51.100.7\n")
    assert blocked(tmp_path / "p.yaml", "198.51.100.7")
    # So does a changed inline entry.
    (tmp_path / "p.yaml").write_text(POLICY.replace("203.0.113.0/24", "198.18.0.0/15"))
    assert blocked(tmp_path / "p.yaml", "198.19.0.1")
    assert not blocked(tmp_path / "p.yaml", "203.0.113.9")


def test_a_bad_line_in_a_big_list_names_file_and_line_and_is_not_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTHGATE_CACHE_DIR", str(cache))
    big_feed(tmp_path / "feed.txt", "10.0.0.1/8\n")
    (tmp_path / "p.yaml").write_text(POLICY)
    for _ in range(2):
        with pytest.raises(PolicyError) as info:
            load_policy(tmp_path / "p.yaml")
        assert (info.value.file, info.value.line) == (str(tmp_path / "feed.txt"), 90_002)
        assert "has host bits set" in info.value.message
    assert not cache.exists() or not list(cache.iterdir())


def test_small_lists_never_touch_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTHGATE_CACHE_DIR", str(cache))
    (tmp_path / "feed.txt").write_text("192.0.2.1\n")
    (tmp_path / "p.yaml").write_text(POLICY)
    assert blocked(tmp_path / "p.yaml", "192.0.2.1")
    assert not cache.exists()
