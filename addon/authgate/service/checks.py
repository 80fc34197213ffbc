"""The decision service's contract, without I/O: a check request in (as nginx,
Caddy, Traefik or Envoy send it), the request it describes out as a
`RequestView`; a `Decision` in, the answer for that proxy out.

Endpoints (the path of the check request):

    /auth         Traefik forwardAuth, Caddy forward_auth, any proxy that sends
                  X-Forwarded-Method and X-Forwarded-Uri (and -Host, -Proto,
                  -For). Allow: 200; deny: the gateway's very answer.
    /nginx        nginx auth_request, which passes only 2xx, 401 and 403: allow
                  200; deny 403 with the real answer sealed in X-Authgate-Answer,
                  which the shipped configuration's error_page hands back to
                  /_answer.
    /_answer      replays the answer in X-Authgate-Answer (nginx's error_page).
    /envoy/PATH   Envoy ext_authz (HTTP service, path_prefix /envoy): the check
                  request's method, PATH and Host are the original request's.

Every answer carries `X-Authgate-Decision: allow` or `deny`: the shipped
configurations forward only on an affirmative `allow` from authgate. The
fields describing the original request are believed only from a trusted
proxy (`client_ip.trusted_proxies`); from anyone else the service answers
403 and judges nothing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

from authgate.core.decision import Decision, RequestView
from authgate.core.responses import Rendered, render, render_error

DECISION = "X-Authgate-Decision"
ANSWER = "X-Authgate-Answer"
REFUSED = "x-authgate-refused"  # set by the nginx configuration on its fail-closed route
IDENTITY = ("X-Auth-Subject", "X-Auth-Roles", "X-Auth-Scopes", "X-Auth-Issuer")
ENVOY_PREFIX = "/envoy"
# What describes the original request on /auth and /nginx: not the request's own fields.
_META = frozenset({"x-forwarded-method", "x-forwarded-uri", "x-authgate-refused"})
_MAX_ANSWER = 16 * 1024  # an answer's sealed form, at most


@dataclass(frozen=True, slots=True)
class Check:
    """What a check request asks: the original request, and how to answer."""

    door: str  # "auth", "nginx" or "envoy"
    view: RequestView


@dataclass(frozen=True, slots=True)
class Refusal:
    """The check request itself cannot be judged: answer `rendered` as is."""

    rendered: Rendered
    reason: str


def _one(headers: Sequence[tuple[str, str]], name: str) -> tuple[str | None, bool]:
    """(the first value of a field or None, whether it is repeated)."""
    found = [v for k, v in headers if k == name]
    return (found[0] if found else None), len(found) > 1


def denied(r: Rendered) -> Rendered:
    """An answer as a denial: `X-Authgate-Decision: deny` first."""
    return Rendered(r.status, ((DECISION, "deny"), *r.headers), r.body)


def _refuse(status: int, reason: str, method: str, accept: str | None) -> Refusal:
    return Refusal(denied(render_error(status, method, accept=accept)), reason)


def read_check(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    peer: str,
    trusted: bool,
) -> Check | Refusal:
    """The original request a check request describes. `headers`: (lower-case
    name, value) in order; `trusted`: the peer is a trusted proxy."""
    accept = next((v for k, v in headers if k == "accept"), None)
    if not trusted:
        # Never judge a request described by someone who may have made it up.
        return _refuse(403, "untrusted_caller", method, accept)
    path = target.split("?", 1)[0]
    if path.startswith(ENVOY_PREFIX + "/") or path == ENVOY_PREFIX:
        original = target[len(ENVOY_PREFIX) :] or "/"
        if not original.startswith("/"):
            original = "/" + original
        host, _ = _one(headers, "host")
        return Check("envoy", RequestView(method.upper(), original, tuple(headers), peer, host))
    if path not in ("/auth", "/nginx"):
        return _refuse(404, "unknown_endpoint", method, accept)
    original_method, repeated_method = _one(headers, "x-forwarded-method")
    uri, repeated_uri = _one(headers, "x-forwarded-uri")
    forwarded_host, repeated_host = _one(headers, "x-forwarded-host")
    if not original_method or not uri or repeated_method or repeated_uri or repeated_host:
        # Absent or repeated: the proxy is not configured as the docs say.
        return _refuse(400, "no_original_request", method, accept)
    own_host, _ = _one(headers, "host")
    host = forwarded_host or own_host
    fields = [(k, v) for k, v in headers if k not in _META and k != "host"]
    if host is not None:
        fields.append(("host", host))
    view = RequestView(original_method.upper(), uri, tuple(fields), peer, host)
    return Check("nginx" if path == "/nginx" else "auth", view)


def answer(check: Check, d: Decision, realm: str, request_id: str) -> Rendered:
    """The check request's answer for a decision."""
    if d.forwarded:
        # Allowed (or a denial in report mode): the identity to forward, always
        # all four fields (empty when anonymous), so that a proxy that copies
        # them replaces whatever the client sent.
        given = dict(d.upstream_headers)
        headers = [(DECISION, "allow"), ("X-Request-Id", request_id)]
        headers += [(name, given.get(name, "")) for name in IDENTITY]
        if "Authorization" in given:
            # A login's access token for the backend (forward_access_token).
            headers.append(("Authorization", given["Authorization"]))
        # A session refreshed or resealed: for the proxy to hand the browser
        # (never a would-be denial's removal in report mode).
        if d.allowed:
            headers += [("Set-Cookie", cookie) for cookie in d.cookies]
        if d.report:
            headers.append(("X-Authgate-Report", f"would deny: {d.status} {d.reason}"))
        headers.append(("Cache-Control", "no-store"))
        return Rendered(200, tuple(headers), b"")
    accept = check.view.header("accept")
    rendered = render(d, realm, check.view.method, accept=accept, request_id=request_id)
    return denial(check, rendered)


def denial(check: Check, rendered: Rendered) -> Rendered:
    """A denial (or the service's own 5xx) as this door delivers it."""
    if check.door != "nginx":
        return denied(rendered)
    return Rendered(403, ((DECISION, "deny"), (ANSWER, seal(rendered))), b"")


def seal(r: Rendered) -> str:
    """An answer in one header value (base64url of JSON), for nginx's error_page."""
    doc = [r.status, [list(h) for h in r.headers], r.body.decode("utf-8", "surrogateescape")]
    data = json.dumps(doc, separators=(",", ":")).encode("utf-8", "surrogateescape")
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def unseal(text: str) -> Rendered | None:
    """The answer `seal` made, or None for anything else."""
    if len(text) > _MAX_ANSWER:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        status, headers, body = json.loads(data)
        # 3xx too: a browser sent to the sign-in page (303, Location) is a denial.
        if not (isinstance(status, int) and 300 <= status <= 599 and isinstance(body, str)):
            return None
        pairs = tuple((str(k), str(v)) for k, v in headers)
    except (ValueError, TypeError, RecursionError):  # RecursionError: JSON nested too deep
        return None
    if any("\r" in k + v or "\n" in k + v for k, v in pairs):
        return None
    return denied(Rendered(status, pairs, body.encode("utf-8", "surrogateescape")))
