"""IP addresses and CIDR sets as sorted integer interval tables.

Built for threat-feed block lists of a million entries: parsing uses
`socket.inet_pton` (strict, fast) instead of `ipaddress` objects, the table
is a pair of sorted integer lists per family, and a lookup is one bisect.
"""

from __future__ import annotations

import bisect
import operator
import struct
import sys
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import TypeVar

V4_MAPPED_PREFIX = 0xFFFF << 32
V4_MAPPED_MASK = ((1 << 96) - 1) << 32

INDEX_BITS = 16  # the bucket index splits IPv4 space by /16
INDEX_MIN = 4096  # ranges; below this, a plain bisect is as fast as the index
_INDEX_LEN = (1 << INDEX_BITS) + 1  # a bucket index's entries
_MAGIC = b"authgate-ipset-2\n"
_CHUNK = 1 << 20  # characters of a block list parsed at a time (bounds the peak)
_HOST_MASKS_BY_BITS = [(1 << b) - 1 for b in range(33)]
_Seq = TypeVar("_Seq", "array[int]", "list[int]")


def parse_ip(text: str) -> tuple[int, int]:
    """Parse an IP address -> (family 4 or 6, integer). Raises ValueError.

    A `%zone` suffix is dropped and IPv4-mapped IPv6 addresses are unwrapped.
    """
    text = text.strip()
    if ":" in text:
        text = text.split("%", 1)[0]
        try:
            value = int.from_bytes(inet_pton(AF_INET6, text), "big")
        except OSError:
            raise ValueError(f"not an IP address: {text!r}") from None
        if value & V4_MAPPED_MASK == V4_MAPPED_PREFIX:
            return 4, value & 0xFFFFFFFF
        return 6, value
    try:
        return 4, int.from_bytes(inet_pton(AF_INET, text), "big")
    except OSError:
        raise ValueError(f"not an IP address: {text!r}") from None


def format_ip(family: int, value: int) -> str:
    if family == 4:
        return inet_ntop(AF_INET, value.to_bytes(4, "big"))
    return inet_ntop(AF_INET6, value.to_bytes(16, "big"))


def normalize_ip(text: str) -> str:
    """The canonical text form of an address (mapped IPv4 unwrapped)."""
    return format_ip(*parse_ip(text))


def parse_cidr(text: str) -> tuple[int, int, int]:
    """Parse an address or CIDR -> (family, first, last). Raises ValueError.

    Host bits set below the prefix are an error, as in `ipaddress.ip_network`
    (strict): `10.0.0.1/8` is almost always a typo for something else.
    """
    addr, slash, prefix_text = text.strip().partition("/")
    family, value = parse_ip(addr)
    bits = 32 if family == 4 else 128
    if ":" in addr and family == 4:
        bits_given = 128  # an IPv4-mapped network is written with an IPv6 prefix
    else:
        bits_given = bits
    if not slash:
        return family, value, value
    if not (prefix_text.isascii() and prefix_text.isdigit()) or len(prefix_text) > 3:
        raise ValueError(f"bad prefix length in {text!r}")
    prefix = int(prefix_text)
    if prefix > bits_given:
        raise ValueError(f"prefix length /{prefix} too long in {text!r}")
    if bits_given != bits:
        if prefix < 96:
            raise ValueError(f"IPv4-mapped network {text!r} is wider than IPv4")
        prefix -= 96
    host_bits = bits - prefix
    mask = (1 << host_bits) - 1
    if value & mask:
        net = format_ip(family, value & ~mask)
        raise ValueError(f"{text!r} has host bits set (did you mean {net}/{prefix}?)")
    return family, value, value | mask


def _merge(packed: list[int], width: int, make: Callable[[], _Seq]) -> tuple[_Seq, _Seq]:
    """Merge ranges packed as `first << width | last` (ints sort far faster
    than tuples) into `make()` sequences, appended to as they are found (no
    list of a million ints on the way). Measured: this plain loop beats
    C-level passes with itertools, each of which makes a million new ints."""
    packed.sort()
    mask = (1 << width) - 1
    starts = make()
    ends = make()
    add_start = starts.append
    add_end = ends.append
    last_end = -2
    for item in packed:
        first = item >> width
        last = item & mask
        if first <= last_end + 1:
            if last > last_end:
                ends[-1] = last_end = last
        else:
            add_start(first)
            add_end(last)
            last_end = last
    del packed[:]  # the caller's list: its ints are not needed any more
    return starts, ends


def cidr_key(first: int, last: int) -> float:
    """An IPv4 network as one sortable float: `first * 64 + host bits`, 38
    bits, exact in a double. Floats sort three times faster than the 64-bit
    ints `_merge` packs (CPython compares them without a generic call) and
    take 24 bytes, not 40. Raises ValueError for a range that is no network."""
    host_bits = (last - first).bit_length()
    if first & ((1 << host_bits) - 1) or first + (1 << host_bits) - 1 != last:
        raise ValueError(f"not a network: {first}-{last}")
    return first * 64.0 + host_bits


def merge_cidr_keys(keys: array[float] | list[float]) -> tuple[array[int], array[int]]:
    """`_merge` for IPv4 networks as `cidr_key`s, in any order. Consumes `keys`."""
    listed = keys.tolist() if isinstance(keys, array) else list(keys)
    del keys[:]  # 8 bytes a key while parsing, 32 as the list that sorts
    listed.sort()
    return merge_sorted_cidr_keys(listed)


def merge_sorted_cidr_keys(keys: Iterable[float]) -> tuple[array[int], array[int]]:
    """Sorted `cidr_key`s as merged ranges: (starts, ends)."""
    masks = _HOST_MASKS_BY_BITS
    starts = _u32()
    ends = _u32()
    add_start = starts.append
    add_end = ends.append
    last_end = -2
    # (Measured: int operations on map(int, ...) beat float // and % in the loop.)
    for key in map(int, keys):
        first = key >> 6
        last = first | masks[key & 63]
        if first <= last_end + 1:
            if last > last_end:
                ends[-1] = last_end = last
        else:
            add_start(first)
            add_end(last)
            last_end = last
    return starts, ends


def join_merged(
    low: tuple[array[int], array[int]], high: tuple[array[int], array[int]]
) -> tuple[array[int], array[int]]:
    """Two tables of merged ranges as one, when no start in `high` comes
    before a start in `low` (the halves of sorted keys, merged apart): the
    ranges of `high` that overlap or touch the last of `low` are folded into
    it. Extends and returns `low`'s arrays."""
    starts, ends = low
    high_starts, high_ends = high
    skip = 0
    if starts:
        last_end = ends[-1]
        while skip < len(high_starts) and high_starts[skip] <= last_end + 1:
            last_end = max(last_end, high_ends[skip])
            skip += 1
        ends[-1] = last_end
    starts.extend(high_starts[skip:])
    ends.extend(high_ends[skip:])
    return starts, ends


def _u32(values: Iterable[int] = ()) -> array[int]:
    return array("I", values)


assert array("I").itemsize == 4, "IPSet needs a 32-bit array type"


def _bucket_index(starts: array[int]) -> array[int]:
    """For each /16, the position of its first range start: a lookup then
    bisects among a handful of starts instead of the whole table."""
    find = partial(bisect.bisect_left, starts)
    return _u32(map(find, range(0, (1 << 32) + 1, 1 << (32 - INDEX_BITS))))


# weakref_slot: a test checks that nothing keeps an old block list after a reload.
@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class IPSet:
    """An immutable set of IPv4 and IPv6 ranges.

    IPv4 ranges, the bulk of any block list, are two packed arrays of 32-bit
    starts and ends (8 bytes a range instead of about 80 as lists of ints),
    with a /16 bucket index once the table is big. IPv6 ranges stay lists of
    ints: they are few in real feeds, and arrays hold no 128-bit integers.
    """

    v4_starts: array[int] | list[int]  # a list below index_min: faster to read
    v4_ends: array[int] | list[int]
    v6_starts: list[int]
    v6_ends: list[int]
    entries: int  # how many entries it was built from (for status and lint)
    v4_index: array[int]  # empty for small tables (see _bucket_index)

    @classmethod
    def _make(
        cls,
        v4: tuple[array[int], array[int]],
        v6: tuple[list[int], list[int]],
        entries: int,
        index_min: int,
        index: array[int] | None = None,
    ) -> IPSet:
        starts, ends = v4
        if len(starts) >= index_min:
            if not index:
                index = _bucket_index(starts)
            return cls(starts, ends, v6[0], v6[1], entries, index)
        # A few ranges (trusted proxies, an allow list): lists, whose items
        # bisect reads without making an int each time (measured ~30% faster).
        return cls(starts.tolist(), ends.tolist(), v6[0], v6[1], entries, _u32())

    @classmethod
    def build(cls, ranges: Iterable[tuple[int, int, int]], *, index_min: int = INDEX_MIN) -> IPSet:
        v4: list[int] = []
        v6: list[int] = []
        for family, first, last in ranges:
            if family == 4:
                v4.append(first << 32 | last)
            else:
                v6.append(first << 128 | last)
        return cls.from_packed(v4, v6, index_min=index_min)

    @classmethod
    def from_packed(
        cls, v4: list[int], v6: list[int], entries: int | None = None, *, index_min: int = INDEX_MIN
    ) -> IPSet:
        """From ranges packed as `first << 32 | last` (IPv4) and `first << 128
        | last` (IPv6), in any order. Consumes the lists (they are emptied)."""
        count = len(v4) + len(v6) if entries is None else entries
        return cls._make(_merge(v4, 32, _u32), _merge(v6, 128, list), count, index_min)

    @classmethod
    def from_cidr_keys(
        cls,
        v4: array[float] | list[float],
        v6: list[int],
        entries: int | None = None,
        *,
        index_min: int = INDEX_MIN,
        merge: Callable[[array[float] | list[float]], tuple[array[int], array[int]]] | None = None,
    ) -> IPSet:
        """From IPv4 networks as `cidr_key`s and IPv6 ranges packed as
        `first << 128 | last` (what `read_cidr_text` gives). Consumes both.
        `merge`: what makes the keys merged ranges, if not `merge_cidr_keys`
        (the helper process shares the work with a fork:
        `blocklists.merge_in_two`)."""
        count = len(v4) + len(v6) if entries is None else entries
        merged = (merge or merge_cidr_keys)(v4)
        return cls._make(merged, _merge(v6, 128, list), count, index_min)

    @classmethod
    def from_strings(cls, items: Iterable[str]) -> IPSet:
        return cls.build(parse_cidr(s) for s in items)

    @classmethod
    def empty(cls) -> IPSet:
        return cls(_u32(), _u32(), [], [], 0, _u32())

    def __bool__(self) -> bool:
        return bool(self.v4_starts or self.v6_starts)

    def contains(self, family: int, value: int) -> bool:
        if family == 4:
            starts = self.v4_starts
            index = self.v4_index
            if index:
                bucket = value >> (32 - INDEX_BITS)
                i = bisect.bisect_right(starts, value, index[bucket], index[bucket + 1]) - 1
            else:
                i = bisect.bisect_right(starts, value) - 1
            return i >= 0 and value <= self.v4_ends[i]
        i = bisect.bisect_right(self.v6_starts, value) - 1
        return i >= 0 and value <= self.v6_ends[i]

    def __contains__(self, address: str) -> bool:
        try:
            family, value = parse_ip(address)
        except ValueError:
            return False
        return self.contains(family, value)

    # --- a compiled set as bytes (the block-list cache) ---------------------

    def to_bytes(self) -> bytes:
        """The set as bytes for `from_bytes`: a header of counts, the IPv4
        arrays and the bucket index (if any) little-endian, the IPv6 values as
        16 big-endian bytes each."""
        n4, n6, ni = len(self.v4_starts), len(self.v6_starts), len(self.v4_index)
        parts = [_MAGIC, struct.pack("<QQQQ", self.entries, n4, n6, ni)]
        for arr in (self.v4_starts, self.v4_ends, self.v4_index):
            a = _u32(arr)
            if sys.byteorder == "big":
                a.byteswap()
            parts.append(a.tobytes())
        for values in (self.v6_starts, self.v6_ends):
            parts.append(b"".join(v.to_bytes(16, "big") for v in values))
        return b"".join(parts)

    @classmethod
    def from_bytes(
        cls, data: bytes | memoryview, *, index_min: int = INDEX_MIN, checked: bool = True
    ) -> IPSet:
        """The set `to_bytes` wrote (bytes, or a view of them: not copied).
        Raises ValueError on anything else: a wrong magic or length, or
        (`checked`) ranges that are not sorted and disjoint or a bucket index
        that does not fit them."""
        view = memoryview(data)
        head = len(_MAGIC) + 32
        if len(view) < head or view[: len(_MAGIC)] != _MAGIC:
            raise ValueError("not a compiled IP set")
        entries, n4, n6, ni = struct.unpack_from("<QQQQ", view, len(_MAGIC))
        if ni not in (0, _INDEX_LEN) or len(view) != head + 8 * n4 + 4 * ni + 32 * n6:
            raise ValueError("a compiled IP set of the wrong length")
        arrays = []
        at = head
        for count in (n4, n4, ni):
            a = _u32()
            a.frombytes(view[at : at + 4 * count])
            if sys.byteorder == "big":
                a.byteswap()
            arrays.append(a)
            at += 4 * count
        v6 = []
        for _ in range(2):
            chunk = view[at : at + 16 * n6]
            v6.append([int.from_bytes(chunk[i : i + 16], "big") for i in range(0, 16 * n6, 16)])
            at += 16 * n6
        starts, ends, index = arrays
        # Sorted and disjoint, or bisect would answer wrongly: two passes in C
        # (each start at most its end, each end before the next start).
        if (
            checked
            and n4
            and not (
                all(map(operator.le, starts, ends)) and all(map(operator.lt, ends, starts[1:]))
            )
        ):
            raise ValueError("a compiled IP set out of order")
        if (
            checked
            and n6
            and not (
                all(map(operator.le, v6[0], v6[1])) and all(map(operator.lt, v6[1], v6[0][1:]))
            )
        ):
            raise ValueError("a compiled IP set out of order")
        if checked and ni and not _index_fits(index, starts):
            raise ValueError("a compiled IP set with a wrong bucket index")
        return cls._make((starts, ends), (v6[0], v6[1]), entries, index_min, index)


def _index_fits(index: array[int], starts: array[int]) -> bool:
    """Whether `index` is `_bucket_index(starts)` for sorted `starts`: each
    entry is where its /16's first start is (no start before it in that /16 or
    after, none after it before) — a pass over the index, not a bisect each."""
    n = len(starts)
    step = 1 << (32 - INDEX_BITS)
    bound = 0
    for i in index:
        if i > n or (i < n and starts[i] < bound) or (i and starts[i - 1] >= bound):
            return False
        bound += step
    return True


def read_cidr_lines(
    lines: Iterable[str],
) -> tuple[list[tuple[int, int, int]], tuple[int, str] | None]:
    """Parse a block-list file's lines: one IP or CIDR a line, `#` comments.

    Returns (ranges, None), or (ranges so far, (line number, problem)) at the
    first bad line, so the caller can name the file and line. Plain IPv4
    addresses, the bulk of threat feeds, take a fast path.
    """
    out: list[tuple[int, int, int]] = []
    append = out.append
    pton = inet_pton
    af4 = AF_INET
    from_bytes = int.from_bytes
    for number, line in enumerate(lines, 1):
        if "#" in line:
            line = line.split("#", 1)[0]
        text = line.strip()
        if not text:
            continue
        if ":" not in text:
            addr, slash, prefix = text.partition("/")
            try:
                value = from_bytes(pton(af4, addr), "big")
            except OSError:
                return out, (number, f"not an IP address: {addr!r}")
            if not slash:
                append((4, value, value))
                continue
            if prefix.isascii() and prefix.isdigit() and len(prefix) <= 2 and int(prefix) <= 32:
                host = (1 << (32 - int(prefix))) - 1
                if not value & host:
                    append((4, value, value | host))
                    continue
        try:
            append(parse_cidr(text))
        except ValueError as e:
            return out, (number, str(e))
    return out, None


def read_cidr_text(
    text: str, chunk_size: int = _CHUNK
) -> tuple[tuple[array[float], list[int]], tuple[int, str] | None]:
    """Parse a whole block-list file, as `read_cidr_lines` does line by line,
    into keys for `IPSet.from_cidr_keys`: ((IPv4, IPv6), problem).

    A million-line feed is mostly bare IPv4 addresses and networks: each
    chunk of that shape is parsed in bulk (`inet_pton` mapped over every
    entry, the masks and checks as C-level passes, no tuple per entry). A
    chunk of any other shape (IPv6, odd prefixes, a bad line) goes through
    `read_cidr_lines`, which also names the first bad line, so the result and
    the errors are exactly those of the line-by-line reader.
    """
    v4 = array("d")  # cidr_keys: 8 bytes each, not a float object each
    v6: list[int] = []
    lines_before = 0
    pos = 0
    while pos < len(text):
        # Cut after a newline, so the chunks' lines are the file's lines.
        cut = text.find("\n", pos + chunk_size)
        cut = len(text) if cut < 0 else cut + 1
        chunk = text[pos:cut]
        lines = chunk.splitlines()
        if not _bulk_v4(chunk, lines, v4):
            ranges, problem = read_cidr_lines(lines)
            for family, first, last in ranges:
                if family == 4:
                    v4.append(cidr_key(first, last))
                else:
                    v6.append(first << 128 | last)
            if problem is not None:
                return (v4, v6), (lines_before + problem[0], problem[1])
        lines_before += len(lines)
        pos = cut
    return (v4, v6), None


def _bulk_v4(chunk: str, lines: list[str], out: array[float]) -> bool:
    """Append the chunk's ranges to `out` if every entry is a plain IPv4
    address or `a.b.c.d/NN` network; False (and nothing appended) otherwise."""
    if ":" in chunk:
        return False  # IPv6: the careful path
    if "#" in chunk:
        lines = [line.split("#", 1)[0] if "#" in line else line for line in lines]
    if chunk.isascii() and " " not in chunk and "\t" not in chunk and "\x1f" not in chunk:
        # Nothing to strip: of ASCII whitespace, splitlines leaves only these.
        entries = list(filter(None, lines))
    else:
        entries = [e for e in map(str.strip, lines) if e]
    if "/" in chunk:
        nets = [e for e in entries if "/" in e]
        plain = [e for e in entries if "/" not in e]
    else:
        nets, plain = [], entries
    if nets:
        # "a/p" lines joined and split at both separators: address, prefix,
        # address, ... (exactly twice as many parts as nets: one "/" each).
        parts = "\n".join(nets).replace("/", "\n").split("\n")
        if len(parts) != 2 * len(nets):
            return False
        net_addresses, prefix_texts = parts[0::2], parts[1::2]
    try:
        addresses = _u32_be(b"".join(map(inet_pton, repeat(AF_INET), plain)))
        if nets:
            starts = _u32_be(b"".join(map(inet_pton, repeat(AF_INET), net_addresses)))
    except OSError:
        return False
    keys = list(map((64.0).__mul__, addresses))
    if nets:
        # The line-by-line reader's fast path: one or two ASCII digits, <= 32.
        # Feeds use a few prefix lengths: each distinct one is checked once.
        host_bits: dict[str, int] = {}
        for prefix in set(prefix_texts):
            if not (prefix.isascii() and prefix.isdigit() and 1 <= len(prefix) <= 2):
                return False
            if int(prefix) > 32:
                return False
            host_bits[prefix] = 32 - int(prefix)
        bits = list(map(host_bits.__getitem__, prefix_texts))
        if any(map(operator.and_, starts, map(_HOST_MASKS_BY_BITS.__getitem__, bits))):
            return False  # host bits set: the careful path names the line
        keys.extend(map(operator.add, map((64.0).__mul__, starts), bits))
    out.extend(keys)
    return True


def _u32_be(data: bytes) -> array[int]:
    """Big-endian 32-bit values (as `inet_pton` writes them) as an array."""
    a = _u32()
    a.frombytes(data)
    if sys.byteorder == "little":
        a.byteswap()
    return a


def is_loopback_host(host: str) -> bool:
    """`localhost`, or an address in 127.0.0.0/8 or ::1 (brackets allowed)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        family, value = parse_ip(host)
    except ValueError:
        return False
    return value >> 24 == 127 if family == 4 else value == 1
