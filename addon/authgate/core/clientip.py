"""The client IP: the socket peer, or X-Forwarded-For (or RFC 7239
Forwarded) read from trusted proxies.

The walk goes right to left over every line of the header (RFC 9110 §5.3:
several lines are one list), skipping addresses of trusted proxies; the first
untrusted address is the client. Anything unparsable stops the walk and the
last address we could trust to have told the truth is used (fail closed); a
Forwarded header that is malformed as a whole is not used at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from authgate.core.ipset import IPSet, format_ip, parse_ip
from authgate.core.records import record


@record
class ClientIP:
    address: str  # canonical text form
    family: int
    value: int
    via: str  # "peer", or the header it was taken from


# Peers seen lately, as the peer itself (parse and format are pure: a cache
# changes no answer). A client's connection brings the same peer text for every
# request; bounded, cleared when full (addresses rotating through an IPv6 /64).
_PEERS: dict[str, ClientIP] = {}
_PEERS_KEPT = 4096


def peer_ip(peer: str) -> ClientIP:
    """The socket peer as a client address (its canonical text, family and
    value). Raises ValueError for anything but an IP address."""
    seen = _PEERS.get(peer)
    if seen is None:
        family, value = parse_ip(peer)
        seen = ClientIP(format_ip(family, value), family, value, "peer")
        if len(_PEERS) >= _PEERS_KEPT:
            _PEERS.clear()
        _PEERS[peer] = seen
    return seen


def _parse_xff_item(item: str) -> tuple[int, int]:
    item = item.strip()
    if item.startswith("["):  # "[2001:db8::1]:443"
        item = item[1 : item.find("]")] if "]" in item else item
    elif item.count(":") == 1:  # "203.0.113.7:8080"
        item = item.split(":", 1)[0]
    return parse_ip(item)


def _quoted_split(text: str, sep: str) -> list[str] | None:
    """Split on `sep` outside quoted-strings; None if a quote is left open."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted:
        return None
    parts.append("".join(current))
    return parts


def forwarded_for(lines: Sequence[str]) -> list[str] | None:
    """The `for=` node of each RFC 7239 Forwarded element, left to right;
    None when the header is malformed (then it is not used at all)."""
    elements = _quoted_split(",".join(lines), ",")
    if elements is None:
        return None
    out: list[str] = []
    for element in elements:
        if not element.strip():
            continue
        pairs = _quoted_split(element, ";")
        if pairs is None:
            return None
        nodes = []
        for pair in pairs:
            name, sep, raw = pair.strip().partition("=")
            if not sep or not name:
                return None
            if name.strip().lower() == "for":
                nodes.append(raw.strip())
        if len(nodes) != 1:
            return None  # no for=, or two in one element
        node = nodes[0]
        if node.startswith('"'):
            if len(node) < 2 or not node.endswith('"'):
                return None
            node = node[1:-1].replace("\\", "")
        elif ":" in node:
            return None  # RFC 7239 §6: an IPv6 node (or a port) must be quoted
        out.append(node)
    return out


def resolve(
    trusted: IPSet, peer: str, header_lines: Sequence[str], header: str = "x-forwarded-for"
) -> ClientIP:
    """Derive the client IP. `peer` must be an IP address (mitmproxy's peername);
    `header_lines` are the lines of `header` (x-forwarded-for or forwarded)."""
    seen = peer_ip(peer)
    family, value = seen.family, seen.value
    if not trusted or not trusted.contains(family, value) or not header_lines:
        return seen
    if header == "forwarded":
        nodes = forwarded_for(header_lines)
        if nodes is None:
            return seen
        items = nodes
    else:
        # Empty list elements ("a,,b", a trailing comma) are ignored (RFC 9110 §5.6.1).
        items = [i for line in header_lines for i in line.split(",") if i.strip()]
    current = (family, value)
    via = "peer"
    for item in reversed(items):
        if not trusted.contains(*current):
            break
        try:
            current = _parse_xff_item(item)  # "unknown", "_hidden": not an address
        except ValueError:
            break  # garbage from here on: keep the last trusted hop's word
        via = header
    return ClientIP(format_ip(*current), current[0], current[1], via)
