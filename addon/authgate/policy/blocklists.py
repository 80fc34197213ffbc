"""Block lists: compiled one way, by the loader or by a helper process.

`compile_lists` turns `ip.block`'s entries and the bytes of every
`ip.block_files` list into one `IPSet`, for the loader and the helper alike.

A million-line feed takes about a second to compile, and `authgate run`
spends over half a second importing mitmproxy and building its master before
it reads the policy. So its command line starts a helper process first thing
(`authgate.runtime.listhelper`: a fork, or `python -m
authgate.policy.blocklists POLICY FOLDER FD PID`). The helper (`work`) reads the
policy's `ip` section as the loader does, compiles its lists on another core
meanwhile if they are big enough to be cached, stores the set as a list-cache
entry under its content key (`listcache.key`) in FOLDER (the list cache's
folder, or with the cache off a private temporary one), says what it did on
FD and exits.

The gateway `expect`s it. When the loader meets a big list that is not in the
cache, `take(key)` waits for the helper to exit (it holds the write end of the
pipe FD: end of file when it exits, however it exits), at most `WAIT_FIRST`
seconds plus `WAIT_PER_MB` per megabyte of lists, then reads the set stored
under the key the loader computed from the bytes it read itself, with the
cache's trust checks (`listcache.load`). A set compiled from other content (a
list or the policy changed in between) is never taken. Whatever goes wrong
(it crashed, was killed, took too long, met a bad line, left garbage), `take`
returns None and the loader compiles the lists itself, as it does without a
helper: the same set, the same errors naming file and line. Only the first
load takes the helper's work; then it is `release`d.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import selectors
import struct
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authgate.core.ipset import (
    IPSet,
    cidr_key,
    join_merged,
    merge_cidr_keys,
    merge_sorted_cidr_keys,
    parse_cidr,
    read_cidr_text,
)
from authgate.policy import listcache
from authgate.policy.marks import PolicyError, load

logger = logging.getLogger("authgate")

COMPILED = "compiled"  # the helper's report begins so when it compiled the set
BIG_LIST = 100_000  # lines; a list this long says it is loading
WAIT_FIRST = 2.0  # seconds the loader waits for the helper, at most, plus
WAIT_PER_MB = 0.5  # this per MB of lists (compiling takes ~0.1 s per MB here)
SPLIT_MIN = 200_000  # keys, at least, for merge_in_two to fork


def compile_lists(
    inline: list[tuple[int, int, int]],
    sources: list[tuple[str, bytes]],
    merge: Callable[[array[float] | list[float]], tuple[array[int], array[int]]] | None = None,
) -> IPSet:
    """Inline ranges and each (path, content) list as one set, parsed in bulk
    (a million-entry feed is never a million tuples). Empties `sources` as it
    goes (the text is not kept while the set is built). Raises PolicyError
    naming the list's path and line. `merge`: see IPSet.from_cidr_keys (the
    helper's is `merge_in_two`)."""
    v4 = array("d")  # see IPSet.from_cidr_keys
    v6: list[int] = []
    for family, first, last in inline:
        if family == 4:
            v4.append(cidr_key(first, last))
        else:
            v6.append(first << 128 | last)
    sources.reverse()
    while sources:
        path, data = sources.pop()
        _compile_file(path, data, v4, v6)
        del data
    return IPSet.from_cidr_keys(v4, v6, merge=merge)


def _compile_file(path: str, data: bytes, v4: array[float], v6: list[int]) -> None:
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(path, None, "not UTF-8 text") from None
    lines = data.count(b"\n")  # about: a last line without a newline is not counted
    big = lines >= BIG_LIST
    if big:
        logger.info(f"authgate: loading block list {path} ({lines:,} lines)...")
    (f4, f6), problem = read_cidr_text(content)
    if problem is not None:
        raise PolicyError(path, problem[0], problem[1])
    if big:
        logger.info(f"authgate: block list {path}: {len(f4) + len(f6):,} ranges")
    v4.extend(f4)
    v6.extend(f6)


def merge_in_two(keys: array[float] | list[float]) -> tuple[array[int], array[int]]:
    """`cidr_key`s in any order as merged ranges, the upper half (by value)
    sorted and merged by a forked process: the helper gets here about when
    the gateway, done with its own start, waits for it, and a core is free.
    Below `SPLIT_MIN` keys, without fork, or if the fork fails in any way, all
    done here. Consumes `keys`."""
    if len(keys) < SPLIT_MIN or not hasattr(os, "fork"):
        return merge_cidr_keys(keys)
    sample = sorted(keys[:: len(keys) // 1024])
    pivot = sample[len(sample) // 2]  # about the median: halves of the work
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return merge_cidr_keys(keys)
    if pid == 0:  # the fork: the keys from the pivot up, written, never returns
        try:
            os.close(read_end)
            starts, ends = merge_sorted_cidr_keys(sorted(filter(pivot.__le__, keys)))
            with open(write_end, "wb") as out:
                out.write(struct.pack("<Q", len(starts)) + starts.tobytes() + ends.tobytes())
        finally:
            os._exit(0)
    low = merge_sorted_cidr_keys(sorted(filter(pivot.__gt__, keys)))
    high = _merged_from(pid, read_end, write_end)
    if high is None:  # the fork failed: its half here
        high = merge_sorted_cidr_keys(sorted(filter(pivot.__le__, keys)))
    del keys[:]
    return join_merged(low, high)


def _merged_from(pid: int, read_end: int, write_end: int) -> tuple[array[int], array[int]] | None:
    """What the fork of `merge_in_two` wrote (starts, ends), once it exited;
    None if it wrote anything else."""
    os.close(write_end)
    with open(read_end, "rb") as got:
        data = got.read()
    os.waitpid(pid, 0)
    if len(data) < 8:
        return None
    (n,) = struct.unpack_from("<Q", data)
    if len(data) != 8 + 8 * n:
        return None
    starts, ends = array("I"), array("I")
    starts.frombytes(data[8 : 8 + 4 * n])
    ends.frombytes(data[8 + 4 * n :])
    return starts, ends


# --- taking the helper's work ----------------------------------------------


@dataclass
class _Expected:
    done: int  # a pipe's read end; the helper holds the write end: EOF once it exits
    folder: Path  # where it stores the compiled set
    cleanup: Callable[[], None]  # ends the helper, removes a temporary folder


_expected: _Expected | None = None


def expect(done: int, folder: Path, cleanup: Callable[[], None] = lambda: None) -> None:
    """A helper compiles the lists into `folder` and holds the write end of the
    pipe `done` is the read end of (runtime.listhelper starts it)."""
    global _expected
    release()
    _expected = _Expected(done, folder, cleanup)


def expected() -> tuple[int, Path] | None:
    """The pipe and the folder of the helper expected, if any."""
    return None if _expected is None else (_expected.done, _expected.folder)


def take(key: str, size: int, lists: str) -> IPSet | None:
    """The set the helper compiled from exactly the content `key` names, once
    it has exited; None without a helper, when it takes longer than the bound
    for `size` bytes of lists, or when it left no such set (each said in the
    log, naming `lists`). Releases the helper: only the first load can take
    its work."""
    helper = _expected
    if helper is None:
        return None
    began = time.monotonic()
    bound = WAIT_FIRST + WAIT_PER_MB * size / 2**20
    said = b""
    with selectors.DefaultSelector() as waiting:
        waiting.register(helper.done, selectors.EVENT_READ)
        while True:
            left = began + bound - time.monotonic()
            if left <= 0 or not waiting.select(left):
                logger.warning(
                    f"authgate: block list {lists}: the helper process has not finished "
                    f"after {bound:.1f} s; compiling it here"
                )
                release()
                return None
            chunk = os.read(helper.done, 4096)
            if not chunk:
                break
            said += chunk
    # A set the helper says it compiled was compiled by the code the loader
    # would run (compile_lists), moments ago: its bytes are checked (SHA-256,
    # under the key), its order not again (0.1 s for a million entries).
    fresh = said.startswith(COMPILED.encode())
    compiled = listcache.load(key, helper.folder, checked=not fresh)
    report = said.decode("utf-8", "replace").strip() or "it said nothing"
    if compiled is None:
        logger.info(f"authgate: block list {lists}: no set from the helper process ({report})")
    else:
        logger.info(
            f"authgate: block list {lists}: {compiled.entries:,} entries, compiled by the "
            f"helper process while the gateway started ({report}; waited "
            f"{time.monotonic() - began:.2f} s for it)"
        )
    release()
    return compiled


def release() -> None:
    """Done with the helper (after the first policy load, or at exit): the
    pipe closed, and its cleanup run."""
    global _expected
    helper, _expected = _expected, None
    if helper is not None:
        os.close(helper.done)
        helper.cleanup()


# --- the helper process --------------------------------------------------------


def lists_of(text: str, policy: str) -> tuple[list[str], list[str]] | None:
    """A policy's `ip.block` entries and its `ip.block_files` paths (relative
    ones taken from the policy's folder, as the loader does), read with the
    loader's YAML reader; None when it has no lists or they are not lists of
    strings (the loader will say). Raises PolicyError on bad YAML.

    A big policy's YAML takes a while to parse (50 ms for a thousand rules):
    when the top-level `ip:` section stands alone on its lines, only it is
    parsed. Anything that reads differently that way (an alias to an anchor
    elsewhere, say) names other lists than the loader's, whose set the loader
    does not take (it is keyed by the lists' content)."""
    top = _ip_alone(text, policy)
    if top is None:
        top = load(text, policy)
    ip = top.get("ip") if isinstance(top, dict) else None
    block = ip.get("block", []) if isinstance(ip, dict) else []
    files = ip.get("block_files", []) if isinstance(ip, dict) else []
    if not (isinstance(block, list) and isinstance(files, list)) or not files:
        return None
    if not all(isinstance(x, str) for x in [*block, *files]):
        return None
    base = Path(policy).parent
    return block, [f if Path(f).is_absolute() else str(base / f) for f in files]


# A top-level `ip:` line and the lines under it: indented, blank or comments.
_IP_SECTION = re.compile(r"^ip[ \t]*:.*\n(?:(?:[ \t].*|#.*)?\n)*", re.MULTILINE)


def _ip_alone(text: str, policy: str) -> dict[str, object] | None:
    """`{"ip": ...}` from the policy's one top-level `ip:` section parsed
    alone; None when there is not exactly one, or it does not parse alone."""
    found = _IP_SECTION.findall(text if text.endswith("\n") else text + "\n")
    if len(found) != 1:
        return None
    try:
        top = load(found[0], policy)
    except PolicyError:
        return None
    return top if isinstance(top, dict) and list(top) == ["ip"] else None


def _compile_policy_lists(policy: str, folder: Path, wanted: Callable[[], bool]) -> str:
    """Compile the block lists `policy` names into `folder`, as the loader
    would (when they are big enough to be cached) and while `wanted()`; what
    was done, in words."""
    found = lists_of(Path(policy).read_text(encoding="utf-8"), policy)
    if found is None:
        return "no block lists"
    inline = [parse_cidr(text) for text in found[0]]
    sources = [(path, Path(path).read_bytes()) for path in found[1]]
    if sum(len(data) for _, data in sources) < listcache.MIN_BYTES:
        return "lists too small to need it"
    key = listcache.key(inline, (data for _, data in sources))
    if listcache.has(key, folder):
        return "in the cache already"
    compiled = compile_lists(inline, sources, merge_in_two)
    if not wanted():
        try:
            folder.rmdir()  # a private folder made for this gateway: empty, gone
        except OSError:
            pass  # not empty (a cache), or gone already
        return "the gateway is gone"
    if not listcache.store(key, compiled, folder):
        return "could not store the set"
    return COMPILED


def work(policy: str, folder: Path, fd: int, gateway: int) -> None:
    """The helper's work: compile the block lists of `policy` into `folder`,
    say what was done (and its time and peak memory) on `fd`. Stores nothing
    once `gateway` (its parent) is gone, killed while starting: nothing would
    take the set, nor remove a private folder."""
    began = time.perf_counter()
    try:
        what = _compile_policy_lists(policy, folder, lambda: os.getppid() == gateway)
    except (OSError, ValueError) as e:  # PolicyError too (bad YAML, a bad line): the loader says
        what = f"gave up ({type(e).__name__})"
    took = time.perf_counter() - began
    try:
        os.write(fd, f"{what} in {took:.2f} s, peak {_peak_mb():.0f} MB".encode())
    except OSError:
        pass  # nobody reads it (the gateway is gone)


def main(argv: list[str]) -> int:
    """`python -m authgate.policy.blocklists POLICY FOLDER FD GATEWAY_PID`: `work`."""
    work(argv[0], Path(argv[1]), int(argv[2]), int(argv[3]))
    return 0


def _peak_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which is this
    program's alone (ru_maxrss also counts the parent it was started from)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes there, KiB here


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
