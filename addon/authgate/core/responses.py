"""The one place a gateway-made response is built.

Bodies are fixed per status and form, never echo the request or internals,
and are computed once at import: RFC 9457 problem+json by default, a small
HTML page for clients that prefer HTML, plain text when asked. Every
response carries Date and `Cache-Control: no-store`; HEAD gets the same
headers and no body.
"""

from __future__ import annotations

import html
import json
from email.utils import formatdate

from authgate.core.decision import INSUFFICIENT_SCOPE, INVALID_CREDENTIALS, INVALID_TOKEN, Decision
from authgate.core.negotiation import HTML, JSON, TEXT, body_form
from authgate.core.oidc import (
    CROSS_SITE,
    LOGGED_OUT,
    LOGIN_COMPLETE,
    LOGIN_FAILED,
    LOGIN_START,
    PROVIDER_UNAVAILABLE,
)
from authgate.core.records import record

# status -> (title, what happened, what to do)
_TEXTS: dict[int, tuple[str, str, str]] = {
    303: ("See Other", "Please sign in to continue.", "You are being sent to the sign-in page."),
    400: (
        "Bad Request",
        "The request is malformed; the gateway did not forward it.",
        "Check the address and the credentials you send, then try again.",
    ),
    401: (
        "Unauthorized",
        "This resource needs valid credentials.",
        "Sign in, or send valid credentials with the request.",
    ),
    403: (
        "Forbidden",
        "You are not allowed to access this resource.",
        "Ask whoever manages access to this service if you think you should be.",
    ),
    404: ("Not Found", "There is nothing at this address.", "Check the address."),
    405: (
        "Method Not Allowed",
        "This address does not take this method.",
        "Check the method the page or client uses.",
    ),
    429: (
        "Too Many Requests",
        "Too many requests. Retry after the time in Retry-After.",
        "Wait a moment before trying again.",
    ),
    502: (
        "Bad Gateway",
        "The service behind the gateway could not be reached or did not answer properly.",
        "Try again in a little while.",
    ),
    504: (
        "Gateway Timeout",
        "The service behind the gateway did not answer in time.",
        "Try again in a little while.",
    ),
    500: (
        "Internal Server Error",
        "The gateway could not judge this request and did not forward it.",
        "Try again later; if it persists, tell the people who run this service.",
    ),
    503: (
        "Service Unavailable",
        "The gateway cannot judge requests right now. Retry later.",
        "Try again in a little while.",
    ),
}
# A few reasons get their own sentence; the status alone decides everything else,
# so two denials with the same status are byte-for-byte the same.
_DETAILS: dict[str, str] = {
    INVALID_TOKEN: "The credentials sent are not valid.",
    INVALID_CREDENTIALS: "The credentials sent are not valid.",
    INSUFFICIENT_SCOPE: "The access token lacks the scope this resource needs.",
    LOGIN_START: "You are being sent to the sign-in service.",
    LOGIN_COMPLETE: "You are signed in; on to the page you asked for.",
    LOGIN_FAILED: "The sign-in could not be completed. Open the page again to sign in anew.",
    PROVIDER_UNAVAILABLE: "The sign-in service cannot be reached right now. Retry later.",
    LOGGED_OUT: "You are signed out.",
    CROSS_SITE: "Signing out takes a request from this site itself.",
}
# ...and a few their own advice.
_ADVICE: dict[str, str] = {
    LOGIN_COMPLETE: "Your browser goes on to it by itself.",
    LOGGED_OUT: "Your browser goes on by itself.",
}
PROBLEM_JSON = "application/problem+json"
_CONTENT_TYPES = {
    JSON: PROBLEM_JSON,
    HTML: "text/html; charset=utf-8",
    TEXT: "text/plain; charset=utf-8",
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{status} {title}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; color: #222; background: #f6f6f4; margin: 0; }}
main {{ max-width: 32rem; margin: 12vh auto; padding: 2rem; background: #fff;
        border-radius: 8px; box-shadow: 0 1px 4px rgba(0, 0, 0, .08); }}
h1 {{ font-size: 1.4rem; margin: 0 0 .75rem; }}
p {{ margin: .5rem 0; }}
.code {{ color: #888; font-weight: normal; }}
</style>
</head>
<body>
<main>
<h1><span class="code">{status}</span> {title}</h1>
<p>{detail}</p>
<p>{advice}</p>
</main>
</body>
</html>
"""


def _body(status: int, form: str, detail: str | None, advice: str | None = None) -> bytes:
    title, default, usual = _TEXTS[status]
    text = detail or default
    advice = advice or usual
    if form == HTML:
        page = _PAGE.format(
            status=status,
            title=html.escape(title),
            detail=html.escape(text),
            advice=html.escape(advice),
        )
        return page.encode()
    if form == TEXT:
        return f"{status} {title}\n{text}\n".encode()
    problem = {"type": "about:blank", "title": title, "status": status, "detail": text}
    return json.dumps(problem, separators=(", ", ": ")).encode() + b"\n"


_BODIES = {
    (status, form, reason): _body(
        status, form, _DETAILS.get(reason or ""), _ADVICE.get(reason or "")
    )
    for status in _TEXTS
    for form in (JSON, HTML, TEXT)
    for reason in (None, *_DETAILS)
}


@record
class Rendered:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge(realm: str, scheme: str, params: tuple[tuple[str, str], ...]) -> str:
    """One challenge (RFC 9110 §11.3): realm first, each parameter once."""
    parts = [f"realm={quote(realm)}"] + [f"{k}={quote(v)}" for k, v in params]
    return f"{scheme} " + ", ".join(parts)


def _headers(status: int, form: str, now: float | None) -> list[tuple[str, str]]:
    return [
        ("Date", formatdate(now, usegmt=True)),
        ("Content-Type", _CONTENT_TYPES[form]),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ]


def with_request_id(body: bytes, form: str, request_id: str) -> bytes:
    """The fixed body with the request's id in it, for a person to quote.
    (The id is [A-Za-z0-9._:-] only: nothing to escape.)"""
    if not body or not request_id:
        return body
    if form == HTML:
        return body.replace(
            b"</main>", f'<p class="code">Request id: {request_id}</p>\n</main>'.encode()
        )
    if form == TEXT:
        return body + f"Request id: {request_id}\n".encode()
    end = body.rindex(b"}")
    return body[:end] + f', "request_id": "{request_id}"'.encode() + body[end:]


def render(
    decision: Decision,
    realm: str,
    method: str,
    now: float | None = None,
    *,
    accept: str | None = None,
    request_id: str = "",
) -> Rendered:
    """The response for a denial, in the form the client prefers, carrying the
    request's id (header and body) when given. `now` only for the Date header."""
    status = decision.status if decision.status in _TEXTS else 500
    form = body_form(accept)
    reason = decision.reason if (status, form, decision.reason) in _BODIES else None
    headers = _headers(status, form, now)
    for scheme, params in decision.challenges:
        headers.append(("WWW-Authenticate", challenge(realm, scheme, params)))
    headers.extend(decision.headers)
    headers.extend(("Set-Cookie", cookie) for cookie in decision.cookies)
    if request_id:
        headers.append(("X-Request-Id", request_id))
    body = b"" if method == "HEAD" else _BODIES[(status, form, reason)]
    return Rendered(status, tuple(headers), with_request_id(body, form, request_id))


def render_error(
    status: int,
    method: str,
    now: float | None = None,
    retry_after: int | None = None,
    *,
    accept: str | None = None,
    request_id: str = "",
) -> Rendered:
    """The response when the gateway itself failed (500, or 503 with Retry-After),
    or the backend did (502, 504)."""
    form = body_form(accept)
    headers = _headers(status, form, now)
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    if request_id:
        headers.append(("X-Request-Id", request_id))
    body = b"" if method == "HEAD" else _BODIES[(status, form, None)]
    return Rendered(status, tuple(headers), with_request_id(body, form, request_id))
