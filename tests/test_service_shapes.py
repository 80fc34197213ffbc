"""Envoy's and Traefik's check requests, byte for byte as they send them, to a
real `authgate serve` over a real socket. Neither proxy is in Debian, so the
requests are built here from their documentation and source:

Envoy, ext_authz HTTP service (v3 API):
  https://www.envoyproxy.io/docs/envoy/latest/api-v3/extensions/filters/http/ext_authz/v3/ext_authz.proto
  ("path_prefix: Sets a prefix to the value of authorization request header Path";
  allowed_headers: "Host, Method, Path, Content-Length, and Authorization are
  additionally included"; "Content-Length will be set to 0"), and its raw HTTP
  client, source/extensions/filters/common/ext_authz/ext_authz_http_impl.cc:
  the original method, path_prefix + the original path, the allowed fields (a
  repeated field arrives once, its values joined with ","), `content-length: 0`;
  a 5xx answer is an error (`status_on_error`), not passed on. Envoy's
  async client (source/common/http/async_client_impl.cc, sendHeaders) adds
  `x-envoy-internal: true` and appends Envoy's own node address to
  X-Forwarded-For; the router adds `x-envoy-expected-rq-timeout-ms` (as a
  captured check request shows, envoyproxy/envoy#3865).

Traefik, forwardAuth middleware:
  https://doc.traefik.io/traefik/middlewares/http/forwardauth/
  ("If the service answers with a 2XX code, access is granted ... Otherwise,
  the response from the authentication server is returned"; the X-Forwarded-
  Method, -Proto, -Host, -Uri, -For fields), and its source,
  pkg/middlewares/auth/forward.go: GET to `address`, the original fields but
  the hop-by-hop ones, X-Forwarded-For set to the client (trustForwardHeader:
  false), authResponseHeaders copied onto the upstream request on a 2xx; Go's
  client adds User-Agent and Accept-Encoding, Traefik's entry point X-Real-Ip,
  X-Forwarded-Port and X-Forwarded-Server.

What each proxy needs back: an allow is 200 with the identity fields and
`X-Authgate-Decision: allow`; a denial is the gateway's answer (status,
WWW-Authenticate, Retry-After and RateLimit, Location, a body in the form the
client's Accept asks for, X-Request-Id), which both pass to the client as is.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from authgate.tools.proxyconfig import CHECK_FIELDS
from conftest import SETTLE_SECONDS, Reply, wait_until
from test_service import (
    Client,
    Serve,
    ask,
    auth,
    log_lines,
    policy_text,
    request,
)

CLIENT = "198.51.100.7"  # the client, as the proxy saw it
HOP_BY_HOP = {"connection", "keep-alive", "te", "trailers", "transfer-encoding", "upgrade"}
Fields = list[tuple[str, str]]


def envoy(
    method: str,
    target: str,
    fields: Fields,
    client: str = CLIENT,
    node: str = "127.0.0.1",
    request_id: str = "",
) -> bytes:
    """The check request Envoy sends (HTTP/1.1, header names lower-case) for
    `method target` from `client`, with the shipped configuration
    (`authgate config envoy`: path_prefix /envoy, allowed_headers
    CHECK_FIELDS, use_remote_address: true)."""
    allowed = {"authorization", "host", *CHECK_FIELDS}
    joined: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        if key in allowed and key != "x-forwarded-for":
            joined[key] = f"{joined[key]},{value}" if key in joined else value
    # The connection manager appends the client (use_remote_address), the
    # async client Envoy's own address.
    prior = [v for k, v in fields if k.lower() == "x-forwarded-for"]
    xff = ", ".join([*prior, client, node])
    out = [("host", joined.pop("host", "app.example")), ("content-length", "0")]
    out += list(joined.items())
    out += [
        ("x-forwarded-proto", "http"),
        ("x-request-id", request_id or str(uuid.uuid4())),
        ("x-envoy-internal", "true"),
        ("x-forwarded-for", xff),
        ("x-envoy-expected-rq-timeout-ms", "5000"),
    ]
    return request(method, "/envoy" + target, out)


def traefik(
    method: str, target: str, fields: Fields, client: str = CLIENT, address: str = "/auth"
) -> bytes:
    """The check request Traefik's forwardAuth sends (Go's HTTP client: GET,
    canonical names) for `method target` from `client` (trustForwardHeader:
    false)."""
    host = next((v for k, v in fields if k.lower() == "host"), "app.example")
    named = {
        n.strip().lower() for k, v in fields if k.lower() == "connection" for n in v.split(",")
    }
    mine = {"host", "x-forwarded-for", "x-forwarded-method", "x-forwarded-proto"}
    mine |= {"x-forwarded-host", "x-forwarded-uri", "x-real-ip"}
    out = [("Host", "authgate.internal:9191")]
    if not any(k.lower() == "user-agent" for k, _ in fields):
        out.append(("User-Agent", "Go-http-client/1.1"))
    for name, value in fields:
        key = name.lower()
        if key not in HOP_BY_HOP | named | mine:
            out.append(("-".join(p.capitalize() for p in key.split("-")), value))
    out += [
        ("X-Forwarded-For", client),
        ("X-Forwarded-Host", host),
        ("X-Forwarded-Method", method),
        ("X-Forwarded-Port", "80"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Server", "traefik-1"),
        ("X-Forwarded-Uri", target),
        ("X-Real-Ip", client),
    ]
    if not any(k.lower() == "accept-encoding" for k, _ in fields):
        out.append(("Accept-Encoding", "gzip"))
    return request("GET", address, out)


SHAPES: dict[str, Callable[..., bytes]] = {"envoy": envoy, "traefik": traefik}


@dataclass
class Case:
    """An original request, and the answer of the table it must get."""

    name: str
    method: str
    target: str
    fields: Fields
    status: int
    challenge: str | None = None  # the WWW-Authenticate the client must get
    client: str = CLIENT
    more: dict[str, str] = field(default_factory=dict)  # further fields of the answer


def table(token: Callable[..., str]) -> list[Case]:
    alice = token("alice", roles=["user"], scopes=["read"])
    bearer = [("Authorization", f"Bearer {alice}")]
    expired = token("alice", ttl=-3600)
    away = token("alice", iss="https://away.example")
    return [
        Case("anonymous allowed", "GET", "/health", [], 200),
        Case(
            "alice allowed",
            "GET",
            "/api/profile?tab=1",
            bearer,
            200,
            more={
                "X-Auth-Subject": "alice",
                "X-Auth-Roles": "user",
                "X-Auth-Scopes": "read",
                "X-Auth-Issuer": "https://issuer.example",
            },
        ),
        Case("no credentials", "GET", "/api/profile", [], 401, 'Bearer realm="api"'),
        Case(
            "expired token",
            "GET",
            "/api/profile",
            [("Authorization", f"Bearer {expired}")],
            401,
            'Bearer realm="api", error="invalid_token", '
            'error_description="The access token expired"',
        ),
        Case("path trick", "GET", "/api/admin%2Fdashboard", [], 400),
        Case("role", "GET", "/api/admin/dashboard", bearer, 403),
        Case(
            "scope",
            "POST",
            "/api/reports",
            bearer,
            403,
            'Bearer realm="api", error="insufficient_scope", scope="reports:write"',
        ),
        Case("unknown path", "GET", "/no/such/path", [], 404),
        Case("hidden", "GET", "/api/secrets/x", bearer, 404),
        Case("blocked client", "GET", "/health", [], 403, client="203.0.113.9"),
        Case(
            "browser sign-in",
            "GET",
            "/app/home",
            [("Accept", "text/html")],
            303,
            more={"Location": "https://login.example/sign-in?next=%2Fapp%2Fhome"},
        ),
        Case(
            "keys unavailable",
            "GET",
            "/api/profile",
            [("Authorization", f"Bearer {away}")],
            503,
            more={"Retry-After": ""},
        ),
        Case("HEAD", "HEAD", "/api/profile", [], 401, 'Bearer realm="api"'),
    ]


@pytest.fixture
def service(tmp_path: Path, demo_key: Any) -> Iterator[Serve]:
    """`authgate serve` with the table's policy (test_service.POLICY), its
    decisions logged to decisions.jsonl."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text())
    log = f"authgate_log={tmp_path / 'decisions.jsonl'}"
    svc = Serve(tmp_path, path, "--set", log, name="serve")
    try:
        yield svc.wait_listening()
    finally:
        svc.stop()


def send_shape(svc: Serve, proxy: str, case: Case, accept: str | None = None) -> Reply:
    fields = list(case.fields)
    if accept is not None:
        fields.append(("Accept", accept))
    data = SHAPES[proxy](case.method, case.target, fields, client=case.client)
    with Client(svc.address) as c:
        c.send(data)
        return c.answer()


def assert_answer(a: Reply, case: Case) -> None:
    """What the proxy needs to pass on, for one case of the table."""
    assert a.status == case.status, case.name
    rid = a.header("X-Request-Id")
    assert rid, case.name
    if case.status == 200:
        assert a.header_all("X-Authgate-Decision") == ["allow"], case.name
        for name in ("X-Auth-Subject", "X-Auth-Roles", "X-Auth-Scopes", "X-Auth-Issuer"):
            # Always there (empty when nobody is proven): a proxy that copies
            # them replaces whatever the client sent under those names.
            assert a.header_all(name) == [case.more.get(name, "")], (case.name, name)
        assert a.body == b""
        return
    assert a.header_all("X-Authgate-Decision") == ["deny"], case.name
    assert a.header("X-Auth-Subject") is None  # nothing to forward
    assert a.header_all("WWW-Authenticate") == ([case.challenge] if case.challenge else [])
    assert a.header("Cache-Control") == "no-store"
    assert a.header("Date")
    for name, value in case.more.items():
        assert a.header(name) is not None, (case.name, name)
        if value:
            assert a.header(name) == value, (case.name, name)
    if case.method == "HEAD":
        assert a.body == b""
    elif case.status != 303:
        assert a.header("Content-Type") == "application/problem+json"
        problem = json.loads(a.body)
        assert (problem["status"], problem["request_id"]) == (case.status, rid), case.name


@pytest.mark.parametrize("proxy", ["envoy", "traefik"])
def test_every_answer_of_the_table(
    proxy: str, service: Serve, token: Callable[..., str], tmp_path: Path
) -> None:
    cases = table(token)
    for case in cases:
        assert_answer(send_shape(service, proxy, case), case)
    # Every check judged once, and logged as the gateway logs it.
    lines = log_lines(tmp_path / "decisions.jsonl")
    assert [(e["path"], e["status"]) for e in lines] == [
        (c.target.split("?")[0], c.status if c.status != 200 else None) for c in cases
    ]
    assert {e["client_ip"] for e in lines} - {None} == {CLIENT, "203.0.113.9"}


@pytest.mark.parametrize("proxy", ["envoy", "traefik"])
def test_a_hidden_route_answers_as_an_unknown_path_does(
    proxy: str, service: Serve, token: Callable[..., str]
) -> None:
    cases = {c.name: c for c in table(token)}
    hidden = send_shape(service, proxy, cases["hidden"])
    unknown = send_shape(service, proxy, cases["unknown path"])

    def same(a: Reply) -> tuple[Any, ...]:
        rid = a.header("X-Request-Id") or ""
        kept = [(k, v) for k, v in a.headers if k not in ("Date", "X-Request-Id")]
        return a.status, kept, a.body.replace(rid.encode(), b"ID")

    assert same(hidden) == same(unknown)


@pytest.mark.parametrize("proxy", ["envoy", "traefik"])
@pytest.mark.parametrize(
    "accept,content_type,start",
    [
        (None, "application/problem+json", b'{"type": "about:blank", "title": "Unauthorized"'),
        ("application/json", "application/problem+json", b'{"type"'),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "text/html; charset=utf-8", b"<!doctype"),
        ("text/plain", "text/plain; charset=utf-8", b"401 Unauthorized\n"),
    ],
)
def test_the_body_is_the_one_the_clients_accept_asks_for(
    proxy: str, service: Serve, accept: str | None, content_type: str, start: bytes
) -> None:
    case = Case("no credentials", "GET", "/api/profile", [], 401, 'Bearer realm="api"')
    a = send_shape(service, proxy, case, accept=accept)
    assert a.status == 401
    assert a.header("Content-Type") == content_type
    assert a.body.startswith(start)
    assert (a.header("X-Request-Id") or "x").encode() in a.body


@pytest.mark.parametrize("proxy", ["envoy", "traefik"])
def test_rate_limited_gets_429_with_retry_after_and_ratelimit(
    proxy: str, service: Serve, token: Callable[..., str]
) -> None:
    writer = [("Authorization", f"Bearer {token('writer', scopes=['reports:write'])}")]
    post = Case("writes", "POST", "/api/reports", writer, 200)
    assert send_shape(service, proxy, post).status == 200
    assert send_shape(service, proxy, post).status == 200
    limited = send_shape(service, proxy, post)
    assert limited.status == 429
    assert limited.header("X-Authgate-Decision") == "deny"
    assert int(limited.header("Retry-After") or "0") >= 1
    assert limited.header("RateLimit-Policy") == '"report-writes";q=2;w=60'
    assert (limited.header("RateLimit") or "").startswith('"report-writes";r=0;t=')
    assert json.loads(limited.body)["status"] == 429


def test_envoy_sends_two_authorization_fields_as_one_and_it_is_refused(
    service: Serve, token: Callable[..., str]
) -> None:
    # Envoy joins a repeated field's values with ",": the check request has
    # one Authorization field, "Bearer a,Bearer b", which is no token. Traefik
    # passes both fields, and the answer is the gateway's 400.
    both = [("Authorization", f"Bearer {token('alice')}"), ("Authorization", "Bearer x.y.z")]
    via_envoy = ask_raw(service, envoy("GET", "/api/profile", both))
    assert via_envoy.status == 401
    assert 'error="invalid_token"' in (via_envoy.header("WWW-Authenticate") or "")
    via_traefik = ask_raw(service, traefik("GET", "/api/profile", both))
    assert via_traefik.status == 400
    assert via_traefik.header("WWW-Authenticate") == 'Bearer realm="api", error="invalid_request"'


def ask_raw(svc: Serve, data: bytes, source: str | None = None) -> Reply:
    with Client(svc.address, source) as c:
        c.send(data)
        return c.answer()


def test_envoys_request_id_is_the_answers(service: Serve) -> None:
    rid = str(uuid.uuid4())
    a = ask_raw(service, envoy("GET", "/api/profile", [], request_id=rid))
    assert a.header("X-Request-Id") == rid
    assert json.loads(a.body)["request_id"] == rid


@pytest.mark.parametrize("proxy", ["envoy", "traefik"])
def test_identity_the_client_sent_is_replaced_by_nobody(proxy: str, service: Serve) -> None:
    forged = [("X-Auth-Subject", "admin"), ("X-Auth-Roles", "admin")]
    a = ask_raw(service, SHAPES[proxy]("GET", "/health", forged))
    assert a.status == 200
    assert (a.header("X-Auth-Subject"), a.header("X-Auth-Roles")) == ("", "")


def test_a_client_forging_x_forwarded_for_through_envoy_is_not_believed(
    service: Serve, tmp_path: Path
) -> None:
    # Envoy appends the client it saw: the forged part is left of it, and the
    # walk (right to left, past trusted proxies) stops at the real client.
    forged = [("X-Forwarded-For", "198.51.100.99")]
    a = ask_raw(service, envoy("GET", "/health", forged, client="203.0.113.9"))
    assert a.status == 403  # the real client is blocked
    assert log_lines(tmp_path / "decisions.jsonl")[-1]["client_ip"] == "203.0.113.9"


def test_envoys_node_address_must_be_trusted_too(service: Serve, tmp_path: Path) -> None:
    """Envoy appends its own node address to X-Forwarded-For: when the policy
    does not trust it, that address is the client (every client shares its
    limits, and the block list sees only Envoy): docs/decision-service.md."""
    svc, path, log = service, tmp_path / "policy.yaml", tmp_path / "decisions.jsonl"
    ask_raw(svc, envoy("GET", "/health", [], client="203.0.113.9", node="10.1.2.3"))
    assert log_lines(log)[-1]["client_ip"] == "10.1.2.3"
    path.write_text(policy_text(trusted="127.0.0.1/32, 10.1.2.3/32"))
    svc.proc.send_signal(signal.SIGHUP)

    def blocked() -> bool:
        a = ask_raw(svc, envoy("GET", "/health", [], client="203.0.113.9", node="10.1.2.3"))
        return a.status == 403

    wait_until(blocked, SETTLE_SECONDS, what="the real client judged once the node is trusted")


# --- callers that are not trusted proxies --------------------------------------------------------


UNTRUSTED = "127.0.0.2"  # loopback, but not in the policy's trusted_proxies


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(envoy("GET", "/health", [], client="127.0.0.1"), id="envoy"),
        pytest.param(traefik("GET", "/health", [], client="127.0.0.1"), id="traefik"),
        pytest.param(traefik("GET", "/health", [], address="/nginx"), id="nginx"),
        pytest.param(
            request(
                "GET",
                "/auth",
                auth(
                    "/health",
                    ("X-Forwarded-For", "127.0.0.1"),
                    ("X-Real-IP", "127.0.0.1"),
                    ("Forwarded", "for=127.0.0.1"),
                    ("X-Forwarded-Proto", "https"),
                ),
            ),
            id="every-forwarded-field",
        ),
    ],
)
def test_a_caller_that_is_not_a_trusted_proxy_gets_403_and_nothing_is_judged(
    service: Serve, tmp_path: Path, data: bytes
) -> None:
    a = ask_raw(service, data, source=UNTRUSTED)
    assert a.status == 403
    assert a.header("X-Authgate-Decision") == "deny"
    assert a.header("X-Auth-Subject") is None
    log = tmp_path / "decisions.jsonl"
    assert log_lines(log) == []  # nothing judged, nothing logged
    # The same request from the trusted proxy is judged (and logged: the log works).
    assert ask_raw(service, data).status == 200
    assert len(log_lines(log)) == 1


def test_an_untrusted_caller_cannot_replay_a_sealed_answer(service: Serve) -> None:
    from authgate.core.responses import Rendered
    from authgate.service.checks import seal

    forged = seal(Rendered(418, (("Location", "https://evil.example"),), b"hi"))
    fields = [("Host", "x"), ("X-Authgate-Reply", forged)]
    a = ask(service.address, "GET", "/_answer", fields, source=UNTRUSTED)
    assert (a.status, a.header("Location")) == (503, None)
    assert a.header("X-Authgate-Decision") == "deny"


def test_unknown_endpoints_are_404_and_judge_nothing(service: Serve, tmp_path: Path) -> None:
    for target in ("/", "/authx", "/envoyx/health", "/auth/x", "//envoy/health"):
        a = ask(service.address, "GET", target, auth("/health"))
        assert (a.status, a.header("X-Authgate-Decision")) == (404, "deny"), target
    assert log_lines(tmp_path / "decisions.jsonl") == []
