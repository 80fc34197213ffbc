"""The whole story of one decision, for people (`authgate explain`, and the
gateway's `authgate.explain` command in mitmproxy).

Built from `Decision.trace` (what `prepare` and `decide` did, step by step)
and the response `responses.render()` builds, so what it says is what the
gateway does, report mode included. Rate limits are read, never counted
(`consume=False`). A bearer token is never shown beyond its first 10
characters; a password, an API key or a cookie not at all.
"""

from __future__ import annotations

import base64
import http
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from authgate.core.decision import NO_BANS, Bans, Decision, RequestView, judge
from authgate.core.ipset import normalize_ip
from authgate.core.model import Policy
from authgate.core.ratelimit import Store
from authgate.core.responses import Rendered, render

# Header fields whose values are credentials: shown only in part.
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"}
)


def shorten(secret: str) -> str:
    """The first 10 characters and `…`: enough to recognise, not to use."""
    return secret[:10] + ("…" if len(secret) > 10 else "")


def redact(name: str, value: str) -> str:
    """A header value fit for printing: a bearer token's first characters (its
    header, public anyway), a Basic credential's user, nothing of a password,
    an API key or a cookie (their first characters are guessing help)."""
    if name.lower() not in SECRET_HEADERS:
        return value
    scheme, sep, rest = value.strip().partition(" ")
    if sep and scheme.isalpha() and name.lower() in ("authorization", "proxy-authorization"):
        if scheme.lower() == "bearer":
            return f"{scheme} {shorten(rest.strip())}"
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return f"{scheme} (not user:password)"
            user, colon, _ = decoded.partition(":")
            return (
                f"{scheme} (user {user!r}, password hidden)" if colon else f"{scheme} (no password)"
            )
        return f"{scheme} … (hidden)"
    return f"… ({len(value)} characters, hidden)"


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

    def as_dict(self) -> dict[str, Any]:
        """The decision as one JSON-ready object, for scripts."""
        d = self.decision
        who = d.identity
        return {
            "status": self.status,
            "outcome": d.outcome,
            "reason": d.reason,
            "detail": d.detail or None,
            "rule": d.rule,
            "client_ip": d.client_ip,
            "forwarded_target": d.target if d.forwarded else None,
            "upstream_headers": dict(d.upstream_headers) if d.forwarded else {},
            "response_headers": dict(self.response.headers) if self.response else {},
            "identity": None
            if who is None
            else {
                "subject": who.subject,
                "issuer": who.issuer,
                "method": who.method,
                "roles": sorted(who.roles),
                "scopes": sorted(who.scopes),
            },
            "trace": list(d.trace),
        }


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


def _about(d: Decision) -> str:
    about = f"reason {d.reason}" + (f", rule {d.rule}" if d.rule else ", no rule")
    if d.detail and d.detail != d.reason:
        about += f"; detail: {d.detail}"
    return about


def explain(
    policy: Policy, request: RequestView, now: float, limiter: Store, bans: Bans = NO_BANS
) -> Explanation:
    """Judge `request` as the gateway would at `now` and tell the story.

    `limiter`: the counters to read (the gateway's own inside mitmproxy; a
    fresh store from the command line), `bans` the watch's bans in force
    (the gateway's own). Nothing is counted."""
    d = judge(policy, request, now, limiter, consume=False, trace=True, bans=bans)
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
    if d.report:
        response = render(d, policy.realm, request.method, now)
        lines.append(
            f"=> would deny: {_status_line(response.status)}   ({_about(d)}); report mode: "
            f"forwarded to the backend instead: {request.method} {d.target}"
        )
        lines += [f"  {name}: {value or '(empty)'}" for name, value in d.upstream_headers]
        lines.append(f"  X-Forwarded-For: {normalize_ip(request.peer)} appended")
    elif d.allowed:
        assert d.path is not None
        lines.append(f"=> forwarded to the backend (rule {d.rule}): {request.method} {d.target}")
        lines += [f"  {name}: {value or '(empty)'}" for name, value in d.upstream_headers]
        if d.identity is None:
            lines.append("  (anonymous: no X-Auth-* headers; any the client sent are removed)")
        carriers = ["authorization"]
        if policy.api_keys is not None:
            carriers.append(policy.api_keys.header)
        for name in carriers:
            if request.header(name) is not None:
                sent = "Authorization" if name == "authorization" else name
                lines.append(
                    f"  {sent}: passed through"
                    if policy.forward_credentials
                    else f"  {sent}: removed (forward_credentials: false)"
                )
        if not policy.forward_credentials and policy.cookie_issuers and request.header("cookie"):
            cookies = ", ".join(sorted(policy.cookie_issuers))
            lines.append(f"  Cookie: without {cookies} (forward_credentials: false)")
        stripped = sorted(
            {k for k, _ in request.headers if k.replace("_", "-") in policy.strip_headers}
        )
        if stripped:
            lines.append(f"  removed (backends might trust them): {', '.join(stripped)}")
        lines.append(f"  X-Forwarded-For: {normalize_ip(request.peer)} appended")
    else:
        response = render(d, policy.realm, request.method, now)
        lines.append(f"=> {_status_line(response.status)}   ({_about(d)})")
        lines += [f"  {name}: {value}" for name, value in response.headers]
        lines.append("")
        body = response.body.decode("utf-8", "replace").rstrip("\n")
        lines.append(f"  {body}" if body else "  (no body)")
    return Explanation(request, d, response, tuple(lines))
