"""A cache of compiled block lists, keyed by their content.

Parsing a million-entry feed takes a second or two; reading it compiled takes
a few tens of milliseconds. The cache holds `IPSet.to_bytes()` of a policy's
block set under the SHA-256 of everything the set was built from (the inline
`ip.block` entries and the bytes of every `ip.block_files` list, in order), so
any change to the content is a miss: an entry can never be stale, only unused.

Where: `$AUTHGATE_CACHE_DIR` (`off` turns the cache off), else
`$XDG_CACHE_HOME/authgate/ipsets`, else `~/.cache/authgate/ipsets`.

Trust: the folder is used only if it is a real directory owned by this user
and writable by nobody else (created 0700), each file only if opened without
following a symlink, owned by this user and writable by nobody else, and only
if it names the key it was asked for and its checksum matches; the set itself
is then checked (sorted, disjoint, its index right) by `IPSet.from_bytes`. Anything else is a
miss, and the list is parsed. Writing is best effort (temporary file, then
rename); a failure to write never fails a load.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from authgate.core.ipset import IPSet

MIN_BYTES = 1 << 20  # smaller lists parse in well under 0.1 s: not worth a file
KEEP = 4  # compiled sets kept; the oldest go first
STALE_TMP = 600  # seconds: a temporary file this old was left by a writer that died
_MAGIC = b"authgate-ipset-cache-1\n"
_SUFFIX = ".ipset"


def folder() -> Path | None:
    """The cache folder from the environment, or None when it is off."""
    chosen = os.environ.get("AUTHGATE_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "authgate" / "ipsets"


def key(inline: Iterable[tuple[int, int, int]], files: Iterable[bytes]) -> str:
    """The content key: inline ranges and each file's bytes, length-prefixed
    so that no two different inputs hash the same stream."""
    h = hashlib.sha256(_MAGIC)
    text = "".join(f"{family} {first} {last}\n" for family, first, last in inline).encode()
    for part in (text, *files):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _private(path: Path) -> bool:
    """A real directory (no symlink), ours, writable by nobody else."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _ready(where: Path) -> bool:
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    return _private(where)


def has(name: str, where: Path) -> bool:
    """Whether a set is stored under `name` (unchecked: `load` checks)."""
    return (where / (name + _SUFFIX)).is_file()


def load(name: str, where: Path | None = None, *, checked: bool = True) -> IPSet | None:
    """The compiled set stored under `name`, or None (missing or untrusted).
    `checked=False` skips checking the set's order (IPSet.from_bytes) for one
    this process knows was just compiled by the loader's own code; every
    other check stays."""
    where = where if where is not None else folder()
    if where is None or not _private(where):
        return None
    try:
        fd = os.open(where / (name + _SUFFIX), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        data = f.read()
        try:
            os.utime(fd)  # recently used: the last to be evicted
        except OSError:
            pass
    head = len(_MAGIC) + 64
    if not data.startswith(_MAGIC) or len(data) < head + 32:
        return None
    if data[len(_MAGIC) : head] != name.encode():
        return None  # a file renamed (or linked) under another key
    view = memoryview(data)  # slices of a view are not copies (a set is megabytes)
    if hashlib.sha256(view[:-32]).digest() != data[-32:]:
        return None
    try:
        return IPSet.from_bytes(view[head:-32], checked=checked)
    except ValueError:
        return None


def store(name: str, compiled: IPSet, where: Path | None = None) -> bool:
    """Write the set under `name`, and drop the oldest beyond KEEP. True when written."""
    where = where if where is not None else folder()
    if where is None or not _ready(where):
        return False
    data = _MAGIC + name.encode() + compiled.to_bytes()
    data += hashlib.sha256(data).digest()
    tmp = where / f".{name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, where / (name + _SUFFIX))
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    _evict(where)
    return True


def _evict(where: Path) -> None:
    """Drop the oldest sets beyond KEEP, and the temporary files of writers
    that died writing (a process killed mid-store leaves its `.tmp`)."""
    try:
        files = sorted(where.glob("*" + _SUFFIX), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[KEEP:]:
            old.unlink()
        stale = time.time() - STALE_TMP
        for tmp in where.glob(".*.tmp"):
            if tmp.stat().st_mtime < stale:
                tmp.unlink()
    except OSError:
        pass  # another gateway evicting the same folder at the same time
