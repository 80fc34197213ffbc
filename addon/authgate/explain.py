"""`authgate explain`: the whole story of one decision, for people.

Built from `Decision.trace` (what `decide()` did, step by step) and the
response `responses.render()` builds, so what it says is what the gateway
does. Rate limits are read, never counted (`consume=False`). A token is
never shown beyond its first 10 characters.
"""

from __future__ import annotations

import http
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from .decision import Decision, RequestView, decide
from .ipset import normalize_ip
from .policy import Policy
from .ratelimit import Limiter
from .responses import Rendered, render

__all__ = ["Explanation", "explain", "redact", "request_from_args", "shorten"]

# Header fields whose values are credentials: shown only in part.
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"}
)


def shorten(secret: str) -> str:
    """The first 10 characters and `…`: enough to recognise, not to use."""
    return secret[:10] + ("…" if len(secret) > 10 else "")


def redact(name: str, value: str) -> str:
    """A header value fit for printing: credentials shortened, scheme kept."""
    if name.lower() not in SECRET_HEADERS:
        return value
    scheme, sep, rest = value.strip().partition(" ")
    if sep and scheme.isalpha() and name.lower() in ("authorization", "proxy-authorization"):
        return f"{scheme} {shorten(rest.strip())}"
    return shorten(value)


@dataclass(frozen=True, slots=True)
class Explanation:
    request: RequestView
    decision: Decision
    response: Rendered | None  # None: forwarded to the backend
    lines: tuple[str, ...]

    @property
    def status(self) -> int:
        """The status the client sees; 200 stands for "forwarded"."""
        return self.decision.status or 200

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _status_line(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _steps(trace: Sequence[str]) -> list[str]:
    """The trace, with the one-line condition summary shortened when the
    condition tree follows it (the tree says the same, leaf by leaf)."""
    out: list[str] = []
    for i, line in enumerate(trace):
        tree_follows = i + 1 < len(trace) and trace[i + 1].startswith("  ")
        if line.startswith("condition: ") and tree_follows:
            line = "condition: " + ("true" if line.endswith(" is true") else "false")
        out.append(line)
    return out


def explain(
    policy: Policy, request: RequestView, now: float, limiter: Limiter | None = None
) -> Explanation:
    """Judge `request` as the gateway would at `now` and tell the story.

    `limiter`: the counters to read (the gateway's own inside mitmproxy; a
    fresh one from the command line). Nothing is counted."""
    d = decide(policy, request, now, Limiter() if limiter is None else limiter,
               consume=False, trace=True)  # fmt: skip
    lines = [f"{request.method} {request.target}"]
    lines += [f"  {name}: {redact(name, value)}" for name, value in request.headers]
    if request.host is not None:
        lines.append(f"  (host {request.host})")
    when = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines.append(f"  (judged as of {when}; rate limits are read, not counted)")
    lines.append("")
    lines += ["  " + step for step in _steps(d.trace)]
    lines.append("")
    response = None
    if d.allowed:
        assert d.path is not None
        lines.append(
            f"=> forwarded to the backend (rule {d.rule}): {request.method} {d.path.target}"
        )
        lines += [f"  {name}: {value or '(empty)'}" for name, value in d.upstream_headers]
        if d.identity is None:
            lines.append("  (anonymous: no X-Auth-* headers; any the client sent are removed)")
        if request.header("authorization") is not None:
            lines.append(
                "  Authorization: passed through"
                if policy.forward_credentials
                else "  Authorization: removed (forward_credentials: false)"
            )
        lines.append(f"  X-Forwarded-For: {normalize_ip(request.peer)} appended")
    else:
        response = render(d, policy.realm, request.method, now)
        about = f"reason {d.reason}" + (f", rule {d.rule}" if d.rule else ", no rule")
        if d.detail and d.detail != d.reason:
            about += f"; detail: {d.detail}"
        lines.append(f"=> {_status_line(response.status)}   ({about})")
        lines += [f"  {name}: {value}" for name, value in response.headers]
        lines.append("")
        body = response.body.decode("utf-8", "replace").rstrip("\n")
        lines.append(f"  {body}" if body else "  (no body)")
    return Explanation(request, d, response, tuple(lines))


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
    return RequestView(method.upper(), target, tuple(fields), source, host)
