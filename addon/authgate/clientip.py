"""The client IP: the socket peer, or X-Forwarded-For read from trusted proxies.

The walk goes right to left over every X-Forwarded-For line (RFC 9110 §5.3:
several lines are one list), skipping addresses of trusted proxies; the first
untrusted address is the client. Anything unparsable stops the walk and the
last address we could trust to have told the truth is used (fail closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .ipset import IPSet, format_ip, parse_ip


@dataclass(frozen=True, slots=True)
class ClientIP:
    address: str  # canonical text form
    family: int
    value: int
    via: str  # "peer", or "x-forwarded-for" when taken from the header


def _parse_xff_item(item: str) -> tuple[int, int]:
    item = item.strip()
    if item.startswith("["):  # "[2001:db8::1]:443"
        item = item[1 : item.find("]")] if "]" in item else item
    elif item.count(":") == 1:  # "203.0.113.7:8080"
        item = item.split(":", 1)[0]
    return parse_ip(item)


def resolve(trusted: IPSet, peer: str, forwarded_for: Sequence[str]) -> ClientIP:
    """Derive the client IP. `peer` must be an IP address (mitmproxy's peername)."""
    family, value = parse_ip(peer)
    if not trusted or not trusted.contains(family, value) or not forwarded_for:
        return ClientIP(format_ip(family, value), family, value, "peer")
    # Empty list elements ("a,,b", a trailing comma) are ignored (RFC 9110 §5.6.1).
    items = [i for line in forwarded_for for i in line.split(",") if i.strip()]
    current = (family, value)
    via = "peer"
    for item in reversed(items):
        if not trusted.contains(*current):
            break
        try:
            current = _parse_xff_item(item)
        except ValueError:
            break  # garbage from here on: keep the last trusted hop's word
        via = "x-forwarded-for"
    return ClientIP(format_ip(*current), current[0], current[1], via)
