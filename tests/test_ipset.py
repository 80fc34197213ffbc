"""IP parsing, CIDR sets and block-list lines."""

from __future__ import annotations

import io
import ipaddress
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.core.ipset import (
    IPSet,
    cidr_key,
    join_merged,
    merge_sorted_cidr_keys,
    normalize_ip,
    parse_cidr,
    parse_ip,
    read_cidr_lines,
    read_cidr_text,
)

P = pytest.param


def v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def v6(text: str) -> int:
    return int(ipaddress.IPv6Address(text))


# --- parse_ip ---------------------------------------------------------------

GOOD_IPS = [
    P("1.2.3.4", (4, 0x01020304), id="v4"),
    P("0.0.0.0", (4, 0), id="v4-zero"),
    P("255.255.255.255", (4, 0xFFFFFFFF), id="v4-max"),
    P(" 10.0.0.1 ", (4, 0x0A000001), id="v4-surrounding-space"),
    P("::", (6, 0), id="v6-zero"),
    P("::1", (6, 1), id="v6-loopback"),
    P("2001:db8::1", (6, 0x20010DB8 << 96 | 1), id="v6"),
    P("2001:DB8::1", (6, 0x20010DB8 << 96 | 1), id="v6-upper-case"),
    P("2001:0db8:0000:0000:0000:0000:0000:0001", (6, 0x20010DB8 << 96 | 1), id="v6-full"),
    P("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", (6, (1 << 128) - 1), id="v6-max"),
    P("fe80::1%eth0", (6, 0xFE80 << 112 | 1), id="v6-zone-dropped"),
    P("fe80::1%25", (6, 0xFE80 << 112 | 1), id="v6-odd-zone-dropped"),
    P("::ffff:10.0.0.2", (4, 0x0A000002), id="mapped-unwrapped"),
    P("::FFFF:0a00:0002", (4, 0x0A000002), id="mapped-hex-unwrapped"),
    P("0:0:0:0:0:ffff:1.2.3.4", (4, 0x01020304), id="mapped-long-form"),
    P("::ffff:10.0.0.2%eth0", (4, 0x0A000002), id="mapped-with-zone"),
    P("::ffff:0.0.0.0", (4, 0), id="mapped-zero"),
    P("::10.0.0.2", (6, 0x0A000002), id="v4-compatible-stays-v6"),
    P("::fffe:10.0.0.2", (6, 0xFFFE0A000002), id="not-mapped-fffe"),
    P("::1:ffff:10.0.0.2", (6, 0x1FFFF0A000002), id="not-mapped-higher-bits"),
    P("64:ff9b::1.2.3.4", (6, 0x64FF9B << 96 | 0x01020304), id="nat64-stays-v6"),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_IPS)
def test_parse_ip(text: str, expected: tuple[int, int]) -> None:
    assert parse_ip(text) == expected


BAD_IPS = [
    P("", id="empty"),
    P("   ", id="blank"),
    P("1.2.3", id="three-octets"),
    P("1.2.3.4.5", id="five-octets"),
    P("256.0.0.1", id="octet-too-big"),
    P("1.2.3.04", id="leading-zero"),
    P("127.1", id="short-form"),
    P("0x7f.0.0.1", id="hex-octet"),
    P("1.2.3.-4", id="negative-octet"),
    P("1.2.3.4%eth0", id="v4-with-zone"),
    P("1.2.3.4:80", id="v4-with-port"),
    P("1.2.3.4/32", id="cidr"),
    P("::1::", id="two-double-colons"),
    P(":::", id="triple-colon"),
    P("2001:db8::g", id="bad-hex"),
    P("1:2:3:4:5:6:7:8:9", id="nine-groups"),
    P("12345::", id="group-too-long"),
    P("[::1]", id="bracketed"),
    P("::ffff:1.2.3.4.5", id="mapped-bad-v4"),
    P("localhost", id="name"),
    P("garbage", id="garbage"),
]


@pytest.mark.parametrize("text", BAD_IPS)
def test_parse_ip_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="^not an IP address: "):
        parse_ip(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        P("1.2.3.4", "1.2.3.4", id="v4"),
        P(" 1.2.3.4 ", "1.2.3.4", id="v4-stripped"),
        P("2001:0DB8:0000::0001", "2001:db8::1", id="v6-compressed-lower"),
        P("0:0:0:0:0:0:0:1", "::1", id="v6-loopback"),
        P("fe80::1%eth0", "fe80::1", id="zone-dropped"),
        P("::ffff:10.0.0.2", "10.0.0.2", id="mapped-unwrapped"),
        P("::ffff:0a00:0002", "10.0.0.2", id="mapped-hex-unwrapped"),
        P("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1", id="longest-zero-run"),
    ],
)
def test_normalize_ip(text: str, expected: str) -> None:
    assert normalize_ip(text) == expected


# --- parse_cidr -------------------------------------------------------------

GOOD_CIDRS = [
    P("10.0.0.0/8", (4, v4("10.0.0.0"), v4("10.255.255.255")), id="v4-net"),
    P("1.2.3.4", (4, 0x01020304, 0x01020304), id="v4-host"),
    P("1.2.3.4/32", (4, 0x01020304, 0x01020304), id="v4-host-32"),
    P("0.0.0.0/0", (4, 0, 0xFFFFFFFF), id="v4-all"),
    P(" 192.168.0.0/16 ", (4, v4("192.168.0.0"), v4("192.168.255.255")), id="v4-stripped"),
    P("192.168.1.128/25", (4, v4("192.168.1.128"), v4("192.168.1.255")), id="v4-25"),
    P("2001:db8::/32", (6, 0x20010DB8 << 96, (0x20010DB8 << 96) | ((1 << 96) - 1)), id="v6-net"),
    P("::/0", (6, 0, (1 << 128) - 1), id="v6-all"),
    P("::1/128", (6, 1, 1), id="v6-host-128"),
    P("::1", (6, 1, 1), id="v6-host"),
    P("fe80::%eth0/64", (6, 0xFE80 << 112, (0xFE80 << 112) | ((1 << 64) - 1)), id="v6-zone"),
    P("::ffff:10.0.0.0/104", (4, v4("10.0.0.0"), v4("10.255.255.255")), id="mapped-net"),
    P("::ffff:0:0/96", (4, 0, 0xFFFFFFFF), id="mapped-all"),
    P("::ffff:10.0.0.1/128", (4, 0x0A000001, 0x0A000001), id="mapped-host-128"),
    P("::ffff:10.0.0.1", (4, 0x0A000001, 0x0A000001), id="mapped-host"),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_CIDRS)
def test_parse_cidr(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_cidr(text) == expected


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        P("10.0.0.1/8", "10.0.0.0/8", id="v4"),
        P("192.168.1.1/24", "192.168.1.0/24", id="v4-24"),
        P("1.2.3.4/0", "0.0.0.0/0", id="v4-prefix-0"),
        P("10.0.0.1/31", "10.0.0.0/31", id="v4-31"),
        P("2001:db8::1/32", "2001:db8::/32", id="v6"),
        P("::1/0", "::/0", id="v6-prefix-0"),
        P("::ffff:10.0.0.1/120", "10.0.0.0/24", id="mapped-hint-in-v4-terms"),
    ],
)
def test_parse_cidr_host_bits(text: str, hint: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_cidr(text)
    assert str(info.value) == f"{text!r} has host bits set (did you mean {hint}?)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        P("10.0.0.0/33", "prefix length /33 too long in '10.0.0.0/33'", id="v4-33"),
        P("10.0.0.0/999", "prefix length /999 too long in '10.0.0.0/999'", id="v4-999"),
        P("::/129", "prefix length /129 too long in '::/129'", id="v6-129"),
        P("::ffff:0:0/129", "prefix length /129 too long in '::ffff:0:0/129'", id="mapped-129"),
        P("10.0.0.0/", "bad prefix length in '10.0.0.0/'", id="empty-prefix"),
        P("10.0.0.0/-1", "bad prefix length in '10.0.0.0/-1'", id="negative-prefix"),
        P("10.0.0.0/+8", "bad prefix length in '10.0.0.0/+8'", id="plus-prefix"),
        P("10.0.0.0/8.0", "bad prefix length in '10.0.0.0/8.0'", id="decimal-prefix"),
        P("10.0.0.0/0x8", "bad prefix length in '10.0.0.0/0x8'", id="hex-prefix"),
        P("10.0.0.0/ 8", "bad prefix length in '10.0.0.0/ 8'", id="space-in-prefix"),
        P("10.0.0.0/1000", "bad prefix length in '10.0.0.0/1000'", id="four-digit-prefix"),
        P("10.0.0.0/8/8", "bad prefix length in '10.0.0.0/8/8'", id="two-slashes"),
        P("10.0.0.0/255.0.0.0", "bad prefix length in '10.0.0.0/255.0.0.0'", id="netmask"),
        P(
            "::ffff:10.0.0.0/64",
            "IPv4-mapped network '::ffff:10.0.0.0/64' is wider than IPv4",
            id="mapped-too-wide",
        ),
        P("", "not an IP address: ''", id="empty"),
        P("/8", "not an IP address: ''", id="prefix-only"),
        P("garbage", "not an IP address: 'garbage'", id="garbage"),
        P("garbage/8", "not an IP address: 'garbage'", id="garbage-net"),
        P("10.0.0/8", "not an IP address: '10.0.0'", id="short-net"),
        P("1.2.3.4-1.2.3.9", "not an IP address: '1.2.3.4-1.2.3.9'", id="range"),
    ],
)
def test_parse_cidr_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_cidr(text)
    assert str(info.value) == message


# --- IPSet ------------------------------------------------------------------

SET = IPSet.from_strings(
    [
        "10.1.0.0/16",  # inside 10.0.0.0/8, listed first
        "10.0.0.0/8",
        "192.168.1.0/25",  # adjacent halves merge
        "192.168.1.128/25",
        "203.0.113.7",
        "2001:db8::/32",
        "::1",
    ]
)


def test_ipset_merges_ranges() -> None:
    assert list(SET.v4_starts) == [v4("10.0.0.0"), v4("192.168.1.0"), v4("203.0.113.7")]
    assert list(SET.v4_ends) == [v4("10.255.255.255"), v4("192.168.1.255"), v4("203.0.113.7")]
    assert SET.v6_starts == [1, v6("2001:db8::")]
    assert SET.v6_ends == [1, v6("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")]
    assert SET.entries == 7
    assert bool(SET) is True


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        P("10.0.0.0", True, id="first-of-8"),
        P("10.255.255.255", True, id="last-of-8"),
        P("10.1.2.3", True, id="inside-nested-16"),
        P("9.255.255.255", False, id="below-8"),
        P("11.0.0.0", False, id="above-8"),
        P("192.168.1.0", True, id="first-of-merged"),
        P("192.168.1.127", True, id="end-of-first-half"),
        P("192.168.1.128", True, id="start-of-second-half"),
        P("192.168.1.255", True, id="last-of-merged"),
        P("192.168.0.255", False, id="below-merged"),
        P("192.168.2.0", False, id="above-merged"),
        P("203.0.113.7", True, id="single-host"),
        P("203.0.113.6", False, id="before-host"),
        P("203.0.113.8", False, id="after-host"),
        P("0.0.0.0", False, id="v4-zero"),
        P("255.255.255.255", False, id="v4-max"),
        P("::ffff:10.1.2.3", True, id="mapped-in-v4-range"),
        P("::ffff:11.0.0.0", False, id="mapped-outside"),
        P("2001:db8::", True, id="first-of-v6-net"),
        P("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", True, id="last-of-v6-net"),
        P("2001:db8:1234::5%eth0", True, id="v6-with-zone"),
        P("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", False, id="below-v6-net"),
        P("2001:db9::", False, id="above-v6-net"),
        P("::1", True, id="v6-host"),
        P("::2", False, id="after-v6-host"),
        P("::", False, id="v6-zero"),
        P("0.0.0.1", False, id="v4-value-1-is-not-v6-host"),
        P("::a00:1", False, id="v4-compatible-is-not-v4"),
        P("garbage", False, id="garbage"),
        P("", False, id="empty"),
        P("10.0.0.0/8", False, id="cidr-is-not-an-address"),
    ],
)
def test_ipset_contains(address: str, expected: bool) -> None:
    assert (address in SET) is expected


@pytest.mark.parametrize(
    ("entries", "starts", "ends"),
    [
        P(["10.1.0.0/16", "10.0.0.0/8"], ["10.0.0.0"], ["10.255.255.255"], id="nested"),
        P(
            ["10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24"],
            ["10.0.0.0"],
            ["10.0.1.255"],
            id="overlap-and-adjacent",
        ),
        P(
            ["10.0.0.3", "10.0.0.0/31"],
            ["10.0.0.0", "10.0.0.3"],
            ["10.0.0.1", "10.0.0.3"],
            id="gap",
        ),
        P(["10.0.0.2", "10.0.0.0/31", "10.0.0.3"], ["10.0.0.0"], ["10.0.0.3"], id="gap-filled"),
        P(["1.2.3.4", "1.2.3.4"], ["1.2.3.4"], ["1.2.3.4"], id="duplicate"),
        P(
            ["0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8"],
            ["0.0.0.0"],
            ["255.255.255.255"],
            id="everything",
        ),
        P(["::ffff:10.0.0.0/104", "10.0.0.0/8"], ["10.0.0.0"], ["10.255.255.255"], id="mapped"),
    ],
)
def test_ipset_merge_v4(entries: list[str], starts: list[str], ends: list[str]) -> None:
    s = IPSet.from_strings(entries)
    assert (list(s.v4_starts), list(s.v4_ends)) == ([v4(x) for x in starts], [v4(x) for x in ends])
    assert (s.v6_starts, s.v6_ends) == ([], [])
    assert s.entries == len(entries)


def test_ipset_gap_is_not_a_member() -> None:
    s = IPSet.from_strings(["10.0.0.0/31", "10.0.0.3"])
    assert [f"10.0.0.{i}" in s for i in range(5)] == [True, True, False, True, False]


def test_ipset_contains_by_number() -> None:
    assert SET.contains(4, v4("10.9.9.9")) is True
    assert SET.contains(4, v4("11.0.0.0")) is False
    assert SET.contains(6, 1) is True
    assert SET.contains(4, 1) is False
    assert SET.contains(6, v4("10.9.9.9")) is False


def test_ipset_empty() -> None:
    for s in (IPSet.empty(), IPSet.from_strings([])):
        assert bool(s) is False
        assert s.entries == 0
        assert ("1.2.3.4" in s, "::1" in s) == (False, False)


def test_ipset_v6_only_is_truthy() -> None:
    s = IPSet.from_strings(["::1"])
    assert bool(s) is True
    assert ("::1" in s, "0.0.0.1" in s) == (True, False)


def test_ipset_from_strings_rejects_bad_entry() -> None:
    with pytest.raises(ValueError, match="host bits set"):
        IPSet.from_strings(["10.0.0.0/8", "10.0.0.1/8"])


# --- read_cidr_lines --------------------------------------------------------

BLOCKLIST = """\
# block list
\t
10.0.0.0/8
  192.0.2.1  # a single host
2001:db8::/32\r
   # indented comment
198.51.100.0/24
"""


def test_read_cidr_lines() -> None:
    assert read_cidr_lines(io.StringIO(BLOCKLIST)) == (
        [
            (4, v4("10.0.0.0"), v4("10.255.255.255")),
            (4, v4("192.0.2.1"), v4("192.0.2.1")),
            (6, v6("2001:db8::"), v6("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")),
            (4, v4("198.51.100.0"), v4("198.51.100.255")),
        ],
        None,
    )


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        P("bogus", "not an IP address: 'bogus'", id="garbage"),
        P(
            "10.0.0.1/8",
            "'10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
            id="host-bits",
        ),
        P("10.0.0.0/33", "prefix length /33 too long in '10.0.0.0/33'", id="prefix-too-long"),
        P("10.0.0.0/٨", "bad prefix length in '10.0.0.0/٨'", id="non-ascii-digit"),
        P("2001:db8::1/32", "has host bits set", id="v6-host-bits"),
        P("1.2.3", "not an IP address: '1.2.3'", id="short-v4"),
    ],
)
def test_read_cidr_lines_stops_at_the_first_bad_line(bad_line: str, problem: str) -> None:
    ranges, error = read_cidr_lines(["# feed", "192.0.2.1", bad_line, "192.0.2.2"])
    assert ranges == [(4, v4("192.0.2.1"), v4("192.0.2.1"))]
    assert error is not None and error[0] == 3 and problem in error[1]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        P([], ([], None), id="empty-file"),
        P(["", "# only comments", "   "], ([], None), id="nothing-but-comments"),
        P(["1.2.3.4#no space"], ([(4, 0x01020304, 0x01020304)], None), id="comment-without-space"),
        P(["x", "y"], ([], (1, "not an IP address: 'x'")), id="first-error-wins"),
    ],
)
def test_read_cidr_lines_table(lines: list[str], expected: object) -> None:
    assert read_cidr_lines(iter(lines)) == expected


# --- property: IPSet agrees with ipaddress ----------------------------------

MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    family = draw(st.sampled_from([4, 6, 6]))
    if family == 4:
        value = draw(st.integers(0, (1 << 32) - 1))
        return ipaddress.IPv4Network((value, draw(st.integers(0, 32))), strict=False)
    if draw(st.booleans()):  # sometimes inside the IPv4-mapped block
        value = int(MAPPED.network_address) | draw(st.integers(0, (1 << 32) - 1))
        prefix = draw(st.integers(96, 128))
    else:
        value = draw(st.integers(0, (1 << 128) - 1))
        prefix = draw(st.integers(0, 128))
    return ipaddress.IPv6Network((value, prefix), strict=False)


def as_reference(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """IPv4-mapped networks are IPv4 networks (addresses are unwrapped too)."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(MAPPED):
        low = int(net.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((low, net.prefixlen - 96))
    return net


def reference_contains(
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network], address: str
) -> bool:
    a = ipaddress.ip_address(address)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return any(a in as_reference(n) for n in nets)


def candidate_addresses(nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[str]:
    """Addresses at and just beyond every network's edges, plus their mapped forms."""
    out: list[str] = []
    for n in nets:
        top = (1 << n.max_prefixlen) - 1
        for value in (
            int(n.network_address) - 1,
            int(n.network_address),
            int(n.broadcast_address),
            int(n.broadcast_address) + 1,
        ):
            if 0 <= value <= top:
                a = ipaddress.ip_address(value) if n.version == 4 else ipaddress.IPv6Address(value)
                out.append(str(a))
                if n.version == 4:
                    out.append(f"::ffff:{a}")
    return out


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(nets=st.lists(networks(), max_size=6), data=st.data())
def test_ipset_agrees_with_ipaddress(
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network], data: st.DataObject
) -> None:
    s = IPSet.from_strings(str(n) for n in nets)
    assert s.entries == len(nets)
    random_addresses = data.draw(
        st.lists(
            st.one_of(
                st.ip_addresses(v=4).map(str),
                st.ip_addresses(v=6).map(str),
                st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
            ),
            max_size=5,
        )
    )
    for address in candidate_addresses(nets) + random_addresses:
        assert (address in s) is reference_contains(nets, address), address


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(net=networks())
def test_parse_cidr_agrees_with_ipaddress(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> None:
    ref = as_reference(net)
    assert parse_cidr(str(net)) == (
        ref.version,
        int(ref.network_address),
        int(ref.broadcast_address),
    )


# --- the compact table against a plain list of ranges -----------------------

Range = tuple[int, int, int]


@st.composite
def ranges(draw: st.DrawFn) -> Range:
    """Any range (not only CIDR-shaped), often tiny, sometimes at the edges."""
    family = draw(st.sampled_from([4, 6]))
    top = (1 << (32 if family == 4 else 128)) - 1
    first = draw(st.one_of(st.integers(0, top), st.sampled_from([0, 1, top - 1, top])))
    width = draw(st.one_of(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, top)))
    return family, first, min(top, first + width)


def probes(rs: list[Range]) -> list[tuple[int, int]]:
    out = []
    for family, first, last in rs:
        top = (1 << (32 if family == 4 else 128)) - 1
        for value in (first - 1, first, (first + last) // 2, last, last + 1):
            if 0 <= value <= top:
                out.append((family, value))
    return out


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(rs=st.lists(ranges(), max_size=40), data=st.data())
def test_compact_set_agrees_with_a_list_of_ranges(rs: list[Range], data: st.DataObject) -> None:
    # index_min=0 forces the /16 bucket index even on a few ranges.
    indexed = IPSet.build(rs, index_min=0)
    plain = IPSet.build(rs, index_min=10**9)
    assert indexed.v4_index and not plain.v4_index or not indexed.v4_starts
    extra = data.draw(
        st.lists(
            st.one_of(
                st.tuples(st.just(4), st.integers(0, (1 << 32) - 1)),
                st.tuples(st.just(6), st.integers(0, (1 << 128) - 1)),
            ),
            max_size=10,
        )
    )
    for family, value in probes(rs) + extra:
        expected = any(f == family and a <= value <= b for f, a, b in rs)
        assert indexed.contains(family, value) is expected, (family, value)
        assert plain.contains(family, value) is expected, (family, value)
    # Sorted, disjoint and not even adjacent: what bisect relies on.
    for starts, ends in ((indexed.v4_starts, indexed.v4_ends), (plain.v6_starts, plain.v6_ends)):
        assert all(a <= b for a, b in zip(starts, ends, strict=True))
        assert all(b + 1 < a for b, a in zip(ends, starts[1:], strict=False))


def test_index_edges() -> None:
    """Ranges across /16 bucket boundaries and at both ends of the space."""
    rs = [
        (4, 0, 0),
        (4, 0x0001FFFF, 0x00020000),  # across one bucket boundary
        (4, 0x0A000000, 0x0AFFFFFF),  # a /8: many buckets, one range
        (4, 0xFFFFFFFF, 0xFFFFFFFF),
    ]
    s = IPSet.build(rs, index_min=0)
    cases = {
        0: True,
        1: False,
        0x0001FFFE: False,
        0x0001FFFF: True,
        0x00020000: True,
        0x00020001: False,
        0x0A123456: True,
        0x0B000000: False,
        0xFFFFFFFE: False,
        0xFFFFFFFF: True,
    }
    assert {v: s.contains(4, v) for v in cases} == cases


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(rs=st.lists(ranges(), max_size=30))
def test_compiled_bytes_round_trip(rs: list[Range]) -> None:
    s = IPSet.build(rs)
    back = IPSet.from_bytes(s.to_bytes())
    assert (list(back.v4_starts), list(back.v4_ends)) == (list(s.v4_starts), list(s.v4_ends))
    assert (back.v6_starts, back.v6_ends, back.entries) == (s.v6_starts, s.v6_ends, s.entries)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(rs=st.lists(ranges(), max_size=30))
def test_compiled_bytes_keep_the_bucket_index(rs: list[Range]) -> None:
    s = IPSet.build(rs, index_min=0)
    for checked in (True, False):
        back = IPSet.from_bytes(s.to_bytes(), index_min=0, checked=checked)
        assert back.v4_index == s.v4_index


def test_a_wrong_bucket_index_is_refused_when_checked() -> None:
    s = IPSet.build([(4, 0x0A000000, 0x0A0000FF), (4, 0x0B000000, 0x0B000000)], index_min=0)
    data = bytearray(s.to_bytes())
    # The index follows the two 2-entry arrays; its /16 for 10.0.0.0 is entry 0x0A00.
    at = len(data) - 4 * ((1 << 16) + 1) + 4 * 0x0A01
    assert int.from_bytes(data[at : at + 4], "little") == 1
    data[at : at + 4] = (0).to_bytes(4, "little")
    with pytest.raises(ValueError, match="wrong bucket index"):
        IPSet.from_bytes(bytes(data), index_min=0)
    # Unchecked (a set this process just compiled) it is taken as written.
    assert IPSet.from_bytes(bytes(data), index_min=0, checked=False).v4_index[0x0A01] == 0


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(nets=st.lists(networks(), max_size=30), data=st.data())
def test_merged_halves_joined_are_the_whole_merged(
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network], data: st.DataObject
) -> None:
    """What the helper process does in two (keys below a pivot here, the rest
    in a fork) is what one merge of them all does."""
    keys = sorted(
        cidr_key(int(n.network_address), int(n.broadcast_address)) for n in nets if n.version == 4
    )
    pivot = data.draw(st.sampled_from([*keys, 0.0, 2.0**40]))
    low = merge_sorted_cidr_keys([k for k in keys if k < pivot])
    high = merge_sorted_cidr_keys([k for k in keys if k >= pivot])
    assert join_merged(low, high) == merge_sorted_cidr_keys(keys)


@pytest.mark.parametrize(
    ("low", "high", "starts", "ends"),
    [
        P(
            ["10.0.0.0/8"],
            ["10.1.0.0/16", "10.2.0.1", "11.0.0.0/8"],
            ["10.0.0.0"],
            ["11.255.255.255"],
            id="the-last-low-swallows-and-touches",
        ),
        P(
            ["10.0.0.0/8"],
            ["12.0.0.0/8"],
            ["10.0.0.0", "12.0.0.0"],
            ["10.255.255.255", "12.255.255.255"],
            id="apart",
        ),
        P([], ["10.0.0.0/8"], ["10.0.0.0"], ["10.255.255.255"], id="no-low"),
        P(["10.0.0.0/8"], [], ["10.0.0.0"], ["10.255.255.255"], id="no-high"),
    ],
)
def test_join_merged(low: list[str], high: list[str], starts: list[str], ends: list[str]) -> None:
    def merged(nets: list[str]) -> tuple[array[int], array[int]]:
        return merge_sorted_cidr_keys(sorted(cidr_key(*parse_cidr(n)[1:]) for n in nets))

    got_starts, got_ends = join_merged(merged(low), merged(high))
    assert list(got_starts) == [v4(a) for a in starts]
    assert list(got_ends) == [v4(a) for a in ends]


def test_compiled_bytes_refuse_anything_else() -> None:
    good = IPSet.from_strings(["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]).to_bytes()
    swapped = IPSet.from_strings(["192.0.2.1"]).to_bytes()
    # Two ranges written in the wrong order: the right length, a wrong table.
    unsorted = bytearray(IPSet.from_strings(["10.0.0.1", "10.0.0.9"]).to_bytes())
    head = len(unsorted) - 16
    unsorted[head : head + 8] = unsorted[head + 4 : head + 8] + unsorted[head : head + 4]
    for bad, problem in [
        (b"", "not a compiled IP set"),
        (b"x" + good[1:], "not a compiled IP set"),
        (good[:-1], "wrong length"),
        (good + b"\0", "wrong length"),
        (swapped[:-4] + (0x0A000000).to_bytes(4, "little"), "out of order"),
        (bytes(unsorted), "out of order"),
    ]:
        with pytest.raises(ValueError, match=problem):
            IPSet.from_bytes(bad)
        if problem != "out of order":  # unchecked: only the order goes unchecked
            with pytest.raises(ValueError, match=problem):
                IPSet.from_bytes(memoryview(bad), checked=False)
    assert IPSet.from_bytes(bytes(unsorted), checked=False).entries == 2


# --- read_cidr_text: the bulk reader against the line-by-line one -------------

LINES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.builds(
        lambda a, p: f"{ipaddress.IPv4Network((int(a), p), strict=False)}",
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(lambda a, p: f"{a}/{p}", st.ip_addresses(v=4), st.integers(0, 40)),  # host bits
    st.builds(lambda a, p: f"{a}/0{p}", st.ip_addresses(v=4), st.integers(0, 40)),  # /032
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(
        [
            "",
            "   ",
            "# comment",
            "1.2.3.4 # host",
            "\t10.0.0.0/8\t",
            "1.2.3.4/",
            "1.2.3.4/8/9",
            "1.2.3",
            "01.2.3.4",
            "1.2.3.4 5.6.7.8",
            "bogus",
            "10.0.0.0/٨",
            "1.2.3.4\xa0",
            "/24",
        ]
    ),
)


def sorted_ranges(packed: tuple[list[float], list[int]]) -> list[Range]:
    v4, v6 = packed
    out = [(4, int(k) >> 6, int(k) >> 6 | (1 << (int(k) & 63)) - 1) for k in v4]
    out += [(6, k >> 128, k & ((1 << 128) - 1)) for k in v6]
    return sorted(out)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(
    lines=st.lists(LINES, max_size=30),
    ending=st.sampled_from(["\n", "\r\n", "\r"]),
    chunk=st.integers(0, 80),
)
def test_bulk_reader_agrees_with_the_line_reader(lines: list[str], ending: str, chunk: int) -> None:
    text = ending.join(lines) + ending
    expected_ranges, expected_problem = read_cidr_lines(text.splitlines())
    packed, problem = read_cidr_text(text, chunk_size=chunk)
    assert problem == expected_problem
    if problem is None:
        assert sorted_ranges(packed) == sorted(expected_ranges)


@pytest.mark.parametrize("chunk", [0, 7, 1 << 20])
def test_bulk_reader_names_the_line_in_a_later_chunk(chunk: int) -> None:
    text = "".join(f"10.0.{i // 256}.{i % 256}\n" for i in range(500)) + "10.0.0.1/8\n"
    packed, problem = read_cidr_text(text, chunk_size=chunk)
    assert problem == (501, "'10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)")
    assert len(packed[0]) == 500


def test_bulk_reader_on_a_feed() -> None:
    packed, problem = read_cidr_text(BLOCKLIST)
    assert problem is None
    assert sorted_ranges(packed) == sorted(read_cidr_lines(BLOCKLIST.splitlines())[0])


@pytest.mark.parametrize(
    ("first", "last", "key"),
    [
        P(0, 0, 0.0, id="zero"),
        P(v4("10.0.0.0"), v4("10.255.255.255"), v4("10.0.0.0") * 64 + 24, id="a-slash-8"),
        P(0, 0xFFFFFFFF, 32.0, id="everything"),
        P(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF * 64.0, id="the-last-address"),
    ],
)
def test_cidr_key(first: int, last: int, key: float) -> None:
    assert cidr_key(first, last) == key


@pytest.mark.parametrize(("first", "last"), [(5, 6), (4, 6), (1, 2), (2, 1)])
def test_cidr_key_refuses_a_range_that_is_no_network(first: int, last: int) -> None:
    with pytest.raises(ValueError, match="not a network"):
        cidr_key(first, last)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(nets=st.lists(networks(), max_size=20))
def test_cidr_keys_build_the_same_set(
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> None:
    rs = [parse_cidr(str(n)) for n in nets]
    keys = [cidr_key(a, b) for f, a, b in rs if f == 4]
    v6 = [a << 128 | b for f, a, b in rs if f == 6]
    by_keys = IPSet.from_cidr_keys(keys, v6)
    by_ranges = IPSet.build(rs)
    assert by_keys.to_bytes() == by_ranges.to_bytes()
