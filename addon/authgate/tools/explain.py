"""`authgate explain` from the command line: a request from the words given.

The story itself is `authgate.core.explanation`, which the gateway's
`authgate.explain` command tells too.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from authgate.core.decision import RequestView
from authgate.core.ipset import normalize_ip


def request_from_args(
    method: str,
    url: str,
    headers: Sequence[str] = (),
    *,
    ip: str | None = None,
    peer: str | None = None,
    token: str | None = None,
) -> RequestView:
    """A RequestView from command-line words.

    `url` is a path (`/api/x?y=1`) or an absolute URL (its host becomes the
    Host). `headers` are `Name: value` strings. `peer` is the socket peer
    (default: `ip`, else 127.0.0.1); `ip` with a different `peer` is sent in
    X-Forwarded-For, as a proxy at `peer` would. Raises ValueError."""
    host = None
    target = url
    if not url.startswith("/") and "://" in url:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2] or None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields: list[tuple[str, str]] = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise ValueError(f"header {h!r} must look like 'Name: value'")
        fields.append((name.lower(), value.strip()))
    if token is not None:
        fields.append(("authorization", f"Bearer {token}"))
    source = peer if peer is not None else (ip if ip is not None else "127.0.0.1")
    for address in (source, ip):
        if address is not None:
            normalize_ip(address)  # raises ValueError for a non-address
    if ip is not None and peer is not None and ip != peer:
        fields.append(("x-forwarded-for", ip))
    for name, value in fields:
        if name == "host":
            host = value
    return RequestView.build(method, target, fields, source, host)
