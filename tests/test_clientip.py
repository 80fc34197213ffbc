"""resolve(): the client IP from the peer and X-Forwarded-For (I-01, I-02, I-04)."""

from __future__ import annotations

import ipaddress

import pytest

from authgate.core.clientip import ClientIP, resolve
from authgate.core.ipset import IPSet

P = pytest.param

TRUSTED = IPSet.from_strings(["10.0.0.2", "10.0.0.5", "2001:db8:1::/48"])

PEER = "peer"
XFF = "x-forwarded-for"


def client(address: str, via: str) -> ClientIP:
    a = ipaddress.ip_address(address)
    return ClientIP(address, a.version, int(a), via)


# (peer, X-Forwarded-For field lines, expected address, expected via)
CASES = [
    # I-01: an untrusted peer's X-Forwarded-For is ignored
    P("203.0.113.9", ["10.0.0.1"], "203.0.113.9", PEER, id="I-01-untrusted-peer"),
    P("203.0.113.9", ["1.1.1.1", "2.2.2.2, 10.0.0.5"], "203.0.113.9", PEER, id="untrusted-lines"),
    P("203.0.113.9", ["10.0.0.2"], "203.0.113.9", PEER, id="untrusted-claims-trusted"),
    P("203.0.113.9", [], "203.0.113.9", PEER, id="untrusted-no-xff"),
    P("10.0.0.3", ["1.1.1.1"], "10.0.0.3", PEER, id="neighbour-of-trusted-is-untrusted"),
    # trusted peer
    P("10.0.0.2", [], "10.0.0.2", PEER, id="trusted-no-xff"),
    P("10.0.0.2", ["198.51.100.7"], "198.51.100.7", XFF, id="trusted-one-hop"),
    # I-02: several lines are one list, walked right to left, trusted hops skipped
    P("10.0.0.2", ["1.1.1.1", "2.2.2.2, 10.0.0.5"], "2.2.2.2", XFF, id="I-02-two-lines"),
    P("10.0.0.2", ["1.1.1.1, 2.2.2.2, 10.0.0.5"], "2.2.2.2", XFF, id="I-02-one-line"),
    P("10.0.0.2", ["1.1.1.1, 2.2.2.2"], "2.2.2.2", XFF, id="rightmost-untrusted-wins"),
    P("10.0.0.2", ["1.1.1.1", "10.0.0.5", "10.0.0.2"], "1.1.1.1", XFF, id="trusted-lines-skipped"),
    P("10.0.0.2", ["  2.2.2.2 ,10.0.0.5  "], "2.2.2.2", XFF, id="whitespace"),
    # every hop trusted: the leftmost one
    P("10.0.0.2", ["10.0.0.5, 10.0.0.2"], "10.0.0.5", XFF, id="all-trusted-one-line"),
    P("10.0.0.2", ["10.0.0.2", "10.0.0.5"], "10.0.0.2", XFF, id="all-trusted-two-lines"),
    # garbage stops the walk at the last hop we trust
    P("10.0.0.2", ["1.1.1.1, garbage"], "10.0.0.2", PEER, id="garbage-rightmost"),
    P("10.0.0.2", ["1.1.1.1, garbage, 10.0.0.5"], "10.0.0.5", XFF, id="garbage-after-trusted"),
    P("10.0.0.2", ["1.1.1.1", "garbage"], "10.0.0.2", PEER, id="garbage-line"),
    P("10.0.0.2", ["garbage, 2.2.2.2"], "2.2.2.2", XFF, id="garbage-left-of-client"),
    P("10.0.0.2", ["1.1.1.1, unknown"], "10.0.0.2", PEER, id="unknown-token"),
    P("10.0.0.2", ['1.1.1.1, "2.2.2.2"'], "10.0.0.2", PEER, id="quoted-address"),
    P("10.0.0.2", ["1.1.1.1, 1.2.3"], "10.0.0.2", PEER, id="short-address"),
    P("10.0.0.2", ["1.1.1.1, 10.0.0.0/8"], "10.0.0.2", PEER, id="cidr-is-garbage"),
    P("10.0.0.2", ["1.1.1.1, [2001:db8::1"], "10.0.0.2", PEER, id="unclosed-bracket"),
    # I-04: mapped addresses are unwrapped, for the peer and in the header
    P("::ffff:10.0.0.2", ["2.2.2.2"], "2.2.2.2", XFF, id="I-04-mapped-trusted-peer"),
    P("::ffff:203.0.113.9", ["2.2.2.2"], "203.0.113.9", PEER, id="mapped-untrusted-peer"),
    P("10.0.0.2", ["::ffff:2.2.2.2"], "2.2.2.2", XFF, id="mapped-client-in-xff"),
    P("10.0.0.2", ["2.2.2.2, ::ffff:10.0.0.5"], "2.2.2.2", XFF, id="mapped-trusted-hop"),
    # IPv6
    P("2001:db8:1::10", ["2001:db8:2::1"], "2001:db8:2::1", XFF, id="v6-trusted-peer"),
    P("2001:db8:1::10", ["198.51.100.7, 2001:db8:1::20"], "198.51.100.7", XFF, id="v6-hop"),
    P("2001:0DB8:0002:0000::1", ["1.1.1.1"], "2001:db8:2::1", PEER, id="v6-untrusted-peer"),
    P("10.0.0.2", ["2001:DB8:0:0::7"], "2001:db8::7", XFF, id="v6-client-normalized"),
    P("10.0.0.2", ["fe80::1%eth0"], "fe80::1", XFF, id="v6-zone-dropped"),
    # ports
    P("10.0.0.2", ["203.0.113.7:8080"], "203.0.113.7", XFF, id="v4-port"),
    P("10.0.0.2", ["[2001:db8::1]:443"], "2001:db8::1", XFF, id="v6-bracket-port"),
    P("10.0.0.2", ["[2001:db8::1]"], "2001:db8::1", XFF, id="v6-bracket-no-port"),
    P("10.0.0.2", ["2.2.2.2, 10.0.0.5:1234"], "2.2.2.2", XFF, id="trusted-hop-with-port"),
    P("10.0.0.2", ["2.2.2.2, [::ffff:10.0.0.5]:80"], "2.2.2.2", XFF, id="mapped-hop-with-port"),
]


@pytest.mark.parametrize(("peer", "lines", "address", "via"), CASES)
def test_resolve(peer: str, lines: list[str], address: str, via: str) -> None:
    assert resolve(TRUSTED, peer, lines) == client(address, via)


@pytest.mark.parametrize(
    "lines",
    [
        P(["1.1.1.1"], id="one"),
        P(["2.2.2.2", "3.3.3.3"], id="two-lines"),
        P(["10.0.0.5"], id="trusted-address"),
        P(["garbage"], id="garbage"),
    ],
)
def test_rotating_xff_from_untrusted_peer_changes_nothing(lines: list[str]) -> None:
    """R-07 / I-01: a rate-limit key taken from this cannot be reset by the client."""
    assert resolve(TRUSTED, "203.0.113.9", lines) == client("203.0.113.9", PEER)


@pytest.mark.parametrize(
    ("peer", "lines"),
    [
        P("10.0.0.2", ["1.1.1.1"], id="v4"),
        P("2001:db8:1::10", ["1.1.1.1"], id="v6"),
    ],
)
def test_no_trusted_proxies_means_peer(peer: str, lines: list[str]) -> None:
    assert resolve(IPSet.empty(), peer, lines) == client(peer, PEER)


def test_garbage_never_chooses_the_client() -> None:
    """Whatever sits left of garbage, the result is a hop we trusted to report it."""
    for left in ("1.1.1.1", "10.0.0.5", "::1"):
        got = resolve(TRUSTED, "10.0.0.2", [f"{left}, not-an-ip, 10.0.0.5"])
        assert got == client("10.0.0.5", XFF)


@pytest.mark.parametrize("peer", ["garbage", "", "10.0.0.2:80"])
def test_peer_must_be_an_address(peer: str) -> None:
    with pytest.raises(ValueError):
        resolve(TRUSTED, peer, ["1.1.1.1"])


# --- RFC 7239 Forwarded (client_ip.header: Forwarded) ---------------------------------

PROXIES = IPSet.from_strings(["10.0.0.0/8"])


@pytest.mark.parametrize(
    "lines, expected",
    [
        pytest.param(
            ['for="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17", id="quoted-ipv6-port"
        ),
        pytest.param(["for=192.0.2.60;proto=http;by=203.0.113.43"], "192.0.2.60", id="params"),
        pytest.param(['For="192.0.2.43:47011"'], "192.0.2.43", id="name-case-and-port"),
        pytest.param(["for=192.0.2.43, for=10.0.0.5"], "192.0.2.43", id="trusted-hop-skipped"),
        pytest.param(["for=192.0.2.43", "for=10.0.0.5"], "192.0.2.43", id="two-lines"),
        pytest.param(["for=unknown"], "10.0.0.1", id="unknown-stops-at-the-peer"),
        pytest.param(["for=198.51.100.7, for=_hidden"], "10.0.0.1", id="obfuscated-stops"),
        pytest.param(
            ["for=198.51.100.7, for=10.0.0.9, for=unknown"], "10.0.0.1", id="unknown-last-hop"
        ),
        pytest.param(["for=192.0.2.1;for=192.0.2.2"], "10.0.0.1", id="duplicate-for-is-malformed"),
        pytest.param(["for=2001:db8::1"], "10.0.0.1", id="unquoted-ipv6-is-malformed"),
        pytest.param(['for="192.0.2.1'], "10.0.0.1", id="open-quote-is-malformed"),
        pytest.param(["proto=https"], "10.0.0.1", id="no-for-is-malformed"),
        pytest.param(
            ['for="192.0.2.9", for="[::ffff:10.0.0.3]"'], "192.0.2.9", id="mapped-trusted-hop"
        ),
    ],
)
def test_forwarded(lines: list[str], expected: str) -> None:
    assert resolve(PROXIES, "10.0.0.1", lines, "forwarded").address == expected


def test_forwarded_from_an_untrusted_peer_is_ignored() -> None:
    got = resolve(PROXIES, "198.51.100.1", ["for=192.0.2.60"], "forwarded")
    assert (got.address, got.via) == ("198.51.100.1", "peer")


def test_forwarded_is_read_only_when_configured() -> None:
    # The default header is X-Forwarded-For: a Forwarded header's value would
    # not parse as an X-Forwarded-For list, so it stops the walk at the peer.
    assert resolve(PROXIES, "10.0.0.1", ["for=192.0.2.60"]).address == "10.0.0.1"
