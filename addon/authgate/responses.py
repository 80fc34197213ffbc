"""The one place a gateway-made response is built.

Bodies are fixed per status (RFC 9457 problem+json), never echo the request
or internals, and are computed once at import. Every response carries Date
and `Cache-Control: no-store`; HEAD gets the same headers and no body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.utils import formatdate

from .decision import INSUFFICIENT_SCOPE, INVALID_TOKEN, Decision

_TEXTS: dict[int, tuple[str, str]] = {
    400: ("Bad Request", "The request is malformed; the gateway did not forward it."),
    401: ("Unauthorized", "This resource needs valid credentials."),
    403: ("Forbidden", "You are not allowed to access this resource."),
    404: ("Not Found", "There is nothing at this address."),
    429: ("Too Many Requests", "Too many requests. Retry after the time in Retry-After."),
    500: (
        "Internal Server Error",
        "The gateway could not judge this request and did not forward it.",
    ),
    503: ("Service Unavailable", "The gateway cannot judge requests right now. Retry later."),
}
# A few reasons get their own sentence; the status alone decides everything else,
# so two denials with the same status are byte-for-byte the same.
_DETAILS: dict[str, str] = {
    INVALID_TOKEN: "The credentials sent are not valid.",
    INSUFFICIENT_SCOPE: "The access token lacks the scope this resource needs.",
}


def _problem(status: int, detail: str | None = None) -> bytes:
    title, default = _TEXTS[status]
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail or default}
    return json.dumps(body, separators=(", ", ": ")).encode() + b"\n"


_BODIES = {status: _problem(status) for status in _TEXTS}
_REASON_BODIES = {
    (status, reason): _problem(status, text)
    for reason, text in _DETAILS.items()
    for status in (401, 403)
}
PROBLEM_JSON = "application/problem+json"


@dataclass(frozen=True, slots=True)
class Rendered:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge(realm: str, params: tuple[tuple[str, str], ...]) -> str:
    """A Bearer challenge (RFC 6750 §3): realm first, each parameter once."""
    parts = [f"realm={quote(realm)}"] + [f"{k}={quote(v)}" for k, v in params]
    return "Bearer " + ", ".join(parts)


def render(decision: Decision, realm: str, method: str, now: float | None = None) -> Rendered:
    """The response for a denial. `now` only for the Date header (tests)."""
    status = decision.status
    body = _REASON_BODIES.get((status, decision.reason)) or _BODIES.get(status) or _BODIES[500]
    headers: list[tuple[str, str]] = [
        ("Date", formatdate(now, usegmt=True)),
        ("Content-Type", PROBLEM_JSON),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ]
    if decision.challenge is not None:
        headers.append(("WWW-Authenticate", challenge(realm, decision.challenge)))
    headers.extend(decision.headers)
    return Rendered(status, tuple(headers), b"" if method == "HEAD" else body)


def render_error(
    status: int, method: str, now: float | None = None, retry_after: int | None = None
) -> Rendered:
    """The response when the gateway itself failed (500, or 503 with Retry-After)."""
    headers: list[tuple[str, str]] = [
        ("Date", formatdate(now, usegmt=True)),
        ("Content-Type", PROBLEM_JSON),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return Rendered(status, tuple(headers), b"" if method == "HEAD" else _BODIES[status])
