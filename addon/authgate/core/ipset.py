"""IP addresses and CIDR sets as sorted integer interval tables.

Built for threat-feed block lists of a million entries: parsing uses
`socket.inet_pton` (strict, fast) instead of `ipaddress` objects, the table
is a pair of sorted integer lists per family, and a lookup is one bisect.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton

V4_MAPPED_PREFIX = 0xFFFF << 32
V4_MAPPED_MASK = ((1 << 96) - 1) << 32


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


def _merge(packed: list[int], width: int) -> tuple[list[int], list[int]]:
    """Merge ranges packed as `first << width | last` (ints sort far faster
    than tuples: a million entries in well under a second)."""
    packed.sort()
    mask = (1 << width) - 1
    starts: list[int] = []
    ends: list[int] = []
    last_end = -2
    for item in packed:
        first = item >> width
        last = item & mask
        if first <= last_end + 1:
            if last > last_end:
                ends[-1] = last_end = last
        else:
            starts.append(first)
            ends.append(last)
            last_end = last
    return starts, ends


@dataclass(frozen=True, slots=True)
class IPSet:
    """An immutable set of IPv4 and IPv6 ranges."""

    v4_starts: list[int]
    v4_ends: list[int]
    v6_starts: list[int]
    v6_ends: list[int]
    entries: int  # how many entries it was built from (for status and lint)

    @classmethod
    def build(cls, ranges: Iterable[tuple[int, int, int]]) -> IPSet:
        v4: list[int] = []
        v6: list[int] = []
        for family, first, last in ranges:
            if family == 4:
                v4.append(first << 32 | last)
            else:
                v6.append(first << 128 | last)
        count = len(v4) + len(v6)
        s4, e4 = _merge(v4, 32)
        s6, e6 = _merge(v6, 128)
        return cls(s4, e4, s6, e6, count)

    @classmethod
    def from_strings(cls, items: Iterable[str]) -> IPSet:
        return cls.build(parse_cidr(s) for s in items)

    @classmethod
    def empty(cls) -> IPSet:
        return cls([], [], [], [], 0)

    def __bool__(self) -> bool:
        return bool(self.v4_starts or self.v6_starts)

    def contains(self, family: int, value: int) -> bool:
        if family == 4:
            starts, ends = self.v4_starts, self.v4_ends
        else:
            starts, ends = self.v6_starts, self.v6_ends
        i = bisect.bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]

    def __contains__(self, address: str) -> bool:
        try:
            family, value = parse_ip(address)
        except ValueError:
            return False
        return self.contains(family, value)


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
