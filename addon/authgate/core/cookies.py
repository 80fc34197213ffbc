"""Cookies: reading the ones a request carries (RFC 6265 §5.4), writing the
gateway's own Set-Cookie values, and splitting a value too long for one
cookie across several.

Browsers keep at least 4096 bytes per cookie, name and value together
(RFC 6265 §6.1); a sealed session holding a provider's tokens can be
longer, so it travels as `NAME` and `NAME.1`, `NAME.2`..., the first value
saying how many there are (`3.xxxx`). A value of one piece has no count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CHUNK = 3800  # characters of value per cookie: name and attributes fit within 4096
_COUNT = re.compile(r"^([2-9])\.")


def read(values: Sequence[str], names: set[str]) -> dict[str, list[str]]:
    """Values of the wanted cookies, in every Cookie field (RFC 6265 §5.4).

    Lenient on purpose: one odd cookie elsewhere on the domain (a space, JSON)
    must not hide the session cookie.
    """
    found: dict[str, list[str]] = {}
    for value in values:
        for pair in value.split(";"):
            name, sep, cookie = pair.partition("=")
            name = name.strip()
            if sep and name in names:
                cookie = cookie.strip()
                if len(cookie) >= 2 and cookie[0] == cookie[-1] == '"':
                    cookie = cookie[1:-1]
                found.setdefault(name, []).append(cookie)
    return found


def chunk_names(name: str, most: int) -> tuple[str, ...]:
    """`NAME`, `NAME.1`, ... `NAME.{most-1}`."""
    return (name, *(f"{name}.{i}" for i in range(1, most)))


def split(value: str, size: int = CHUNK) -> list[str]:
    """The pieces of a value (at most 9): one when it fits, else the first
    prefixed with their number."""
    if len(value) <= size:
        return [value]
    room = size - 2  # the "N." prefix on the first piece
    pieces = [value[:room]] + [value[i : i + size] for i in range(room, len(value), size)]
    if len(pieces) > 9:
        raise ValueError(f"a value of {len(value)} characters needs more than 9 cookies")
    pieces[0] = f"{len(pieces)}.{pieces[0]}"
    return pieces


def count(length: int, size: int = CHUNK) -> int:
    """How many pieces `split` cuts a value of `length` characters into."""
    if length <= size:
        return 1
    return 1 + -(-(length - (size - 2)) // size)


def join(first: str, rest: Sequence[str | None]) -> str | None:
    """The value `split` cut up, from the first piece and the following
    cookies' values in order (None: absent); None when one is missing."""
    m = _COUNT.match(first)
    if m is None:
        return first
    count = int(m.group(1))
    pieces = [first[2:], *rest[: count - 1]]
    if len(pieces) != count or any(p is None for p in pieces):
        return None
    return "".join(p for p in pieces if p is not None)


def set_cookie(
    name: str,
    value: str,
    *,
    secure: bool,
    max_age: int | None = None,
    path: str = "/",
    same_site: str = "Lax",
) -> str:
    """A Set-Cookie value for one of the gateway's own cookies: HttpOnly, the
    path given, SameSite, Secure behind TLS; no Domain (host-only)."""
    parts = [f"{name}={value}", f"Path={path}"]
    if max_age is not None:
        parts.append(f"Max-Age={max(0, int(max_age))}")
    parts.append("HttpOnly")
    if secure:
        parts.append("Secure")
    parts.append(f"SameSite={same_site}")
    return "; ".join(parts)


def clear_cookie(name: str, *, secure: bool, path: str = "/") -> str:
    """A Set-Cookie value that removes the cookie (RFC 6265 §3.1: Max-Age=0)."""
    return set_cookie(name, "", secure=secure, max_age=0, path=path)
