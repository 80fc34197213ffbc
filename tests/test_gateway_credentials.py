"""End to end, per credential type and per kind of client: the real gateway in
front of the recording backend, the example policies from policies/, and a
local JWKS server that rotates keys, goes down and gets hammered.

Every denial also asserts that the backend saw nothing.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from authgate.proxy.addon import Gateway
from authgate.runtime.jwks import REQUEST_WAIT, http_get
from authgate.tools.keys import jwks_for, mint, new_rsa_key
from conftest import (
    POLICIES,
    REQUEST_SECONDS,
    SETTLE_SECONDS,
    Backend,
    Reply,
    RunningGateway,
    send,
    wait_until,
)

Start = Callable[..., RunningGateway]
CI_BOT = "demo-ci-bot-key-not-secret"
DASHBOARD = "demo-dashboard-key-not-secret"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def basic(user: str, password: str) -> list[tuple[str, str]]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return [("Authorization", f"Basic {raw}")]


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


# --- API keys ----------------------------------------------------------------------------


@pytest.fixture
def api_gw(start_gateway: Start, demo_key: Any) -> RunningGateway:
    return start_gateway(POLICIES / "api-keys.yaml")


def test_api_key_identifies_the_client(api_gw: RunningGateway, backend: Backend) -> None:
    r = send(api_gw.address, "POST", "/deploy", [("X-API-Key", CI_BOT)], b"{}")
    assert r.status == 200
    [seen] = backend.seen
    assert seen.header("X-Auth-Subject") == "ci-bot"
    assert seen.header("X-Auth-Roles") == "deployer"
    assert seen.header("X-Auth-Scopes") == "deploy"
    assert seen.header("X-Auth-Issuer") == "api-key"


@pytest.mark.parametrize(
    "headers, status, challenges",
    [
        pytest.param([], 401, ['ApiKey realm="api", header="x-api-key"'], id="none"),
        pytest.param(
            [("X-API-Key", "wrong")],
            401,
            ['ApiKey realm="api", header="x-api-key"'],
            id="unknown-key",
        ),
        pytest.param([("X-API-Key", DASHBOARD)], 403, [], id="key-without-the-role"),
        pytest.param([("X-API-Key", CI_BOT), ("X-API-Key", CI_BOT)], 400, [], id="key-twice"),
    ],
)
def test_api_key_denials(
    api_gw: RunningGateway,
    backend: Backend,
    headers: list[tuple[str, str]],
    status: int,
    challenges: list[str],
) -> None:
    r = send(api_gw.address, "POST", "/deploy", headers, b"{}")
    assert r.status == status
    assert r.header_all("WWW-Authenticate") == challenges
    assert backend.seen == []


def test_a_rule_can_refuse_kinds_of_credentials(
    api_gw: RunningGateway, backend: Backend, token: Callable[..., str]
) -> None:
    """/deploy accepts API keys only: a valid token there is like no credentials."""
    r = send(api_gw.address, "POST", "/deploy", bearer(token(roles=["deployer"])), b"{}")
    assert r.status == 401
    assert r.header_all("WWW-Authenticate") == ['ApiKey realm="api", header="x-api-key"']
    assert backend.seen == []


def test_token_or_key_where_both_are_accepted(
    api_gw: RunningGateway, backend: Backend, token: Callable[..., str]
) -> None:
    r = send(api_gw.address, "GET", "/metrics/cpu")
    assert r.header_all("WWW-Authenticate") == [
        'Bearer realm="api"',
        'ApiKey realm="api", header="x-api-key"',
    ]
    assert send(api_gw.address, "GET", "/metrics/cpu", [("X-API-Key", DASHBOARD)]).status == 200
    t = token(scopes=["metrics:read"])
    assert send(api_gw.address, "GET", "/metrics/cpu", bearer(t)).status == 200
    both = send(api_gw.address, "GET", "/metrics/cpu", bearer(t) + [("X-API-Key", DASHBOARD)])
    assert both.status == 400
    assert both.header_all("WWW-Authenticate") == ['Bearer realm="api", error="invalid_request"']
    assert len(backend.seen) == 2


# --- Basic -----------------------------------------------------------------------------------


@pytest.fixture
def basic_gw(start_gateway: Start) -> RunningGateway:
    return start_gateway(POLICIES / "basic-auth.yaml")


BASIC_CHALLENGE = 'Basic realm="reports", charset="UTF-8"'


def test_basic_with_a_colon_in_the_password(basic_gw: RunningGateway, backend: Backend) -> None:
    r = send(basic_gw.address, "GET", "/reports/q3", basic("alice", "pa:ss-word"))
    assert r.status == 200
    [seen] = backend.seen
    assert seen.header("X-Auth-Subject") == "alice"
    assert seen.header("X-Auth-Roles") == "analyst"
    assert seen.header("X-Auth-Issuer") == "basic"
    # The second request is answered from the remembered bcrypt result.
    assert send(basic_gw.address, "GET", "/reports/q3", basic("alice", "pa:ss-word")).status == 200


@pytest.mark.parametrize(
    "headers, status",
    [
        pytest.param([], 401, id="none"),
        pytest.param(basic("alice", "wrong"), 401, id="wrong-password"),
        pytest.param(basic("mallory", "pa:ss-word"), 401, id="unknown-user"),
        pytest.param([("Authorization", "Basic Zm9v")], 401, id="no-colon"),
        pytest.param([("Authorization", "Basic !!!")], 401, id="not-base64"),
        pytest.param(basic("ali\x00ce", "pa:ss-word"), 401, id="control-character"),
        pytest.param(basic("builder", "builder-demo"), 403, id="valid-user-wrong-role"),
    ],
)
def test_basic_denials(
    basic_gw: RunningGateway, backend: Backend, headers: list[tuple[str, str]], status: int
) -> None:
    r = send(basic_gw.address, "GET", "/reports/q3", headers)
    assert r.status == status
    assert r.header_all("WWW-Authenticate") == ([BASIC_CHALLENGE] if status == 401 else [])
    assert backend.seen == []


# --- browsers: cookies, login redirects, negotiated bodies, preflights ------------------------


@pytest.fixture
def app_gw(start_gateway: Start, demo_key: Any) -> RunningGateway:
    return start_gateway(POLICIES / "browser-app.yaml")


def test_session_cookie(
    app_gw: RunningGateway, backend: Backend, token: Callable[..., str]
) -> None:
    cookie = [("Cookie", f"theme=dark; session={token(sub='carol')}")]
    assert send(app_gw.address, "GET", "/app/dashboard", cookie).status == 200
    assert backend.seen[0].header("X-Auth-Subject") == "carol"


def test_a_browser_without_a_session_is_sent_to_the_login_page(
    app_gw: RunningGateway, backend: Backend
) -> None:
    r = send(app_gw.address, "GET", "/app/reports/2026?tab=q3", [("Accept", BROWSER_ACCEPT)])
    assert r.status == 303
    assert r.header("Location") == (
        "https://login.example/sign-in?next=%2Fapp%2Freports%2F2026%3Ftab%3Dq3"
    )
    assert r.header("Cache-Control") == "no-store"
    assert backend.seen == []


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param(lambda t: t(ttl=-3600), id="expired"),
        pytest.param(lambda t: "abc.def.ghi", id="garbage"),
        pytest.param(lambda t: t(aud="other"), id="wrong-audience"),
    ],
)
def test_a_browser_with_a_failed_session_cookie_is_sent_to_the_login_page(
    app_gw: RunningGateway, backend: Backend, token: Callable[..., str], cookie: Any
) -> None:
    headers = [("Accept", BROWSER_ACCEPT), ("Cookie", f"session={cookie(token)}")]
    r = send(app_gw.address, "GET", "/app/home", headers)
    assert r.status == 303
    assert r.header("Location") == "https://login.example/sign-in?next=%2Fapp%2Fhome"
    # An API call with the same cookie still gets its 401 invalid_token.
    api = send(app_gw.address, "GET", "/api/orders", [("Cookie", f"session={cookie(token)}")])
    assert api.status == 401 and "invalid_token" in (api.header("WWW-Authenticate") or "")
    assert backend.seen == []


def test_the_return_address_cannot_leave_the_gateway(
    app_gw: RunningGateway, backend: Backend
) -> None:
    # The canonical path collapses "//", so "next" is always a path on this gateway.
    r = send(app_gw.address, "GET", "//app//evil.example/x", [("Accept", BROWSER_ACCEPT)])
    assert r.header("Location") == "https://login.example/sign-in?next=%2Fapp%2Fevil.example%2Fx"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([("Accept", BROWSER_ACCEPT), ("Sec-Fetch-Mode", "cors")], id="fetch"),
        pytest.param(
            [("Accept", BROWSER_ACCEPT), ("X-Requested-With", "XMLHttpRequest")], id="xhr"
        ),
        pytest.param([("Accept", "application/json")], id="api-client"),
        pytest.param([], id="curl"),
    ],
)
def test_scripts_and_api_clients_get_the_401(
    app_gw: RunningGateway, backend: Backend, headers: list[tuple[str, str]]
) -> None:
    r = send(app_gw.address, "GET", "/app/dashboard", headers)
    assert r.status == 401
    assert r.header_all("WWW-Authenticate") == ['Bearer realm="api"']
    assert backend.seen == []


def test_a_failed_authorization_header_gets_the_401_not_a_redirect(
    app_gw: RunningGateway, backend: Backend, token: Callable[..., str]
) -> None:
    # Explicit credentials are a program's: it gets the answer it can act on.
    expired = [("Authorization", f"Bearer {token(ttl=-60)}"), ("Accept", BROWSER_ACCEPT)]
    r = send(app_gw.address, "GET", "/app/dashboard", expired)
    assert r.status == 401
    assert 'error="invalid_token"' in (r.header("WWW-Authenticate") or "")
    assert r.header("Content-Type") == "text/html; charset=utf-8"
    assert b"<title>401 Unauthorized</title>" in r.body
    assert backend.seen == []


@pytest.mark.parametrize(
    "accept, content_type, body_check",
    [
        pytest.param(
            None,
            "application/problem+json",
            lambda b: json.loads(b)["title"] == "Unauthorized",
            id="default",
        ),
        pytest.param(
            "application/json",
            "application/problem+json",
            lambda b: json.loads(b)["status"] == 401,
            id="json",
        ),
        pytest.param(
            BROWSER_ACCEPT,
            "text/html; charset=utf-8",
            lambda b: b'<h1><span class="code">401</span> Unauthorized</h1>' in b,
            id="html",
        ),
        pytest.param(
            "text/plain",
            "text/plain; charset=utf-8",
            lambda b: b.startswith(b"401 Unauthorized\nThis resource needs valid credentials.\n"),
            id="text",
        ),
    ],
)
def test_negotiated_bodies(
    app_gw: RunningGateway,
    backend: Backend,
    accept: str | None,
    content_type: str,
    body_check: Callable[[bytes], bool],
) -> None:
    headers = [("Accept", accept), ("Sec-Fetch-Mode", "cors")] if accept else []
    r = send(app_gw.address, "GET", "/api/me", headers)
    assert r.status == 401
    assert r.header("Content-Type") == content_type
    assert body_check(r.body)
    assert b"api/me" not in r.body  # nothing of the request is echoed
    assert backend.seen == []


def test_hidden_404s_stay_identical_in_every_form(
    start_gateway: Start, backend: Backend, demo_key: Any
) -> None:
    gw = start_gateway(POLICIES / "hidden-routes.yaml")
    for accept in ("text/html", "text/plain", "application/json"):
        hidden = send(gw.address, "GET", "/internal/x", [("Accept", accept)])
        unknown = send(gw.address, "GET", "/nowhere", [("Accept", accept)])
        drop = {"date", "x-request-id"}  # each request has its own id
        assert hidden.status == unknown.status == 404
        assert [h for h in hidden.headers if h[0].lower() not in drop] == [
            h for h in unknown.headers if h[0].lower() not in drop
        ]
        ids = [(r.header("X-Request-Id") or "").encode() for r in (hidden, unknown)]
        assert hidden.body.replace(ids[0], b"ID") == unknown.body.replace(ids[1], b"ID")
    assert backend.seen == []


PREFLIGHT = [("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST")]


def test_preflight_pass_lets_the_backend_answer(app_gw: RunningGateway, backend: Backend) -> None:
    r = send(app_gw.address, "OPTIONS", "/api/orders", PREFLIGHT)
    assert r.status == 200
    [seen] = backend.seen
    assert seen.method == "OPTIONS" and seen.header("X-Auth-Subject") is None
    # An OPTIONS that is not a preflight is judged like any request.
    r = send(app_gw.address, "OPTIONS", "/api/orders", [("Origin", "https://app.example")])
    assert r.status == 401
    assert len(backend.seen) == 1


def test_preflight_by_default_is_judged_like_any_request(
    start_gateway: Start, backend: Backend, demo_key: Any
) -> None:
    gw = start_gateway(POLICIES / "example.yaml")
    r = send(gw.address, "OPTIONS", "/api/profile", PREFLIGHT)
    assert r.status == 401
    assert backend.seen == []


# --- query-string tokens ------------------------------------------------------------------------


@pytest.fixture
def links_gw(start_gateway: Start, demo_key: Any, tmp_path: Path) -> RunningGateway:
    return start_gateway(POLICIES / "query-tokens.yaml", f"authgate_log={tmp_path / 'log.jsonl'}")


def test_query_token_is_removed_before_forwarding_and_logging(
    links_gw: RunningGateway, backend: Backend, token: Callable[..., str], tmp_path: Path
) -> None:
    t = token(scopes=["downloads:read"])
    r = send(links_gw.address, "GET", f"/downloads/report.pdf?x=1&access_token={t}&y=2")
    assert r.status == 200
    assert r.header("Cache-Control") == "private"  # RFC 6750 §2.3
    [seen] = backend.seen
    assert seen.target == "/downloads/report.pdf?x=1&y=2"
    assert t not in (tmp_path / "log.jsonl").read_text()


@pytest.mark.parametrize(
    "target, headers",
    [
        pytest.param("/downloads/a?access_token={t}", "bearer", id="header-and-query"),
        pytest.param("/downloads/a?access_token={t}&access_token={t}", None, id="twice"),
    ],
)
def test_query_token_ambiguity_is_400(
    links_gw: RunningGateway,
    backend: Backend,
    token: Callable[..., str],
    target: str,
    headers: str | None,
) -> None:
    t = token(scopes=["downloads:read"])
    r = send(links_gw.address, "GET", target.format(t=t), bearer(t) if headers else [])
    assert r.status == 400
    assert r.header_all("WWW-Authenticate") == ['Bearer realm="api", error="invalid_request"']
    assert backend.seen == []


# --- an identity provider's JWKS over HTTP ---------------------------------------------


class JWKSServer:
    """A JWKS endpoint on 127.0.0.1 that counts fetches and can rotate or go down."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {"k1": new_rsa_key()}
        self.fetches = 0
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self.up()

    def jwks(self) -> bytes:
        docs = [jwks_for(key, kid)["keys"][0] for kid, key in self.keys.items()]
        return json.dumps({"keys": docs}).encode()

    def up(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.fetches += 1
                body = outer.jwks()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "max-age=1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}/realms/demo"

    def token(self, kid: str = "k1", typ: str = "at+jwt", **kw: Any) -> str:
        kw.setdefault("extra", {"client_id": "web"})
        return mint(
            self.keys[kid],
            iss=self.issuer,
            kid=kid,
            headers={"typ": typ},
            sub=kw.pop("sub", "dave"),
            **kw,
        )


@pytest.fixture
def idp() -> Iterator[JWKSServer]:
    server = JWKSServer()
    yield server
    if server._server is not None:
        server.down()


def idp_policy(tmp_path: Path, idp: JWKSServer, extra: str = "") -> Path:
    """policies/identity-provider.yaml, pointed at the test's JWKS server, with
    short cooldowns so that the test need not wait."""
    text = (POLICIES / "identity-provider.yaml").read_text()
    text = text.replace("127.0.0.1:8999", f"127.0.0.1:{idp.port}")
    text = text.replace("jwks_min_ttl: 5m", "jwks_min_ttl: 1s")
    text = text.replace("jwks_refresh_cooldown: 30s", "jwks_refresh_cooldown: 1s")
    path = tmp_path / "identity-provider.yaml"
    path.write_text(text + extra)
    return path


def test_keys_are_fetched_rotated_and_kept_when_the_provider_is_down(
    start_gateway: Start, backend: Backend, idp: JWKSServer, tmp_path: Path
) -> None:
    gw = start_gateway(idp_policy(tmp_path, idp))
    wait_until(lambda: idp.fetches >= 1, what="the first fetch")  # in the background at start
    assert send(gw.address, "GET", "/api/x", bearer(idp.token())).status == 200

    # The provider rotates: a token with the new kid triggers one refresh.
    idp.keys["k2"] = new_rsa_key()
    time.sleep(1.1)  # past the cooldown
    assert send(gw.address, "GET", "/api/x", bearer(idp.token("k2"))).status == 200

    # The provider goes down; its keys expire (max-age 1s) but keep serving.
    idp.down()
    time.sleep(1.5)
    assert send(gw.address, "GET", "/api/x", bearer(idp.token("k1"))).status == 200
    assert send(gw.address, "GET", "/api/x", bearer(idp.token("k2"))).status == 200
    assert len(backend.seen) == 4


def test_cold_start_with_the_provider_down_is_503_then_recovers(
    start_gateway: Start, backend: Backend, idp: JWKSServer, tmp_path: Path
) -> None:
    policy = idp_policy(tmp_path, idp)
    idp.down()
    gw = start_gateway(policy)
    t = idp.token()
    r = send(gw.address, "GET", "/api/x", bearer(t))
    assert r.status == 503
    retry = r.header("Retry-After")
    assert retry is not None and re.fullmatch(r"\d+", retry) and int(retry) >= 1
    assert r.header("WWW-Authenticate") is None  # not a credentials problem
    assert backend.seen == []
    idp.up()

    # The next try comes after a backoff that doubles with each failure (1 s,
    # 2 s, 4 s, ...): on a busy machine, several may have failed by now.
    def answered() -> Reply | None:
        r = send(gw.address, "GET", "/api/x", bearer(t))
        return r if r.status != 503 else None

    r = wait_until(answered, SETTLE_SECONDS, every=0.5, what="keys once the provider is back")
    assert r.status == 200


def test_random_kids_cause_at_most_one_fetch_per_cooldown(
    start_gateway: Start, backend: Backend, idp: JWKSServer, tmp_path: Path
) -> None:
    gw = start_gateway(idp_policy(tmp_path, idp).parent / "identity-provider.yaml")
    wait_until(lambda: idp.fetches >= 1, what="the first fetch")
    before = idp.fetches
    start = time.monotonic()
    statuses = []
    for _ in range(40):
        kid = uuid.uuid4().hex
        idp.keys[kid] = idp.keys["k1"]  # signed with a real key, but the kid is unknown...
        token = idp.token(kid)
        del idp.keys[kid]  # ...and not published
        statuses.append(send(gw.address, "GET", "/api/x", bearer(token)).status)
    elapsed = time.monotonic() - start
    assert set(statuses) == {401}
    # One fetch per 1s cooldown at most (kid-triggered), plus the background
    # refresh of the 1s max-age cache: two per second, and one to start.
    assert idp.fetches - before <= 2 * (int(elapsed) + 1) + 1, (idp.fetches - before, elapsed)
    assert backend.seen == []


@pytest.mark.parametrize(
    "make, status",
    [
        pytest.param(lambda i: i.token(typ="AT+JWT"), 200, id="typ-case-insensitive"),
        pytest.param(lambda i: i.token(typ="application/at+jwt"), 200, id="typ-media-type"),
        pytest.param(lambda i: i.token(typ="JWT"), 401, id="typ-jwt"),
        pytest.param(lambda i: i.token(extra={}), 401, id="no-client-id"),
        pytest.param(
            lambda i: i.token(now=time.time() - 7200, ttl=3 * 3600), 401, id="older-than-max-age"
        ),
    ],
)
def test_access_token_profile(
    start_gateway: Start,
    backend: Backend,
    idp: JWKSServer,
    tmp_path: Path,
    make: Callable[[JWKSServer], str],
    status: int,
) -> None:
    gw = start_gateway(idp_policy(tmp_path, idp))
    wait_until(lambda: idp.fetches >= 1, what="the first fetch")
    r = send(gw.address, "GET", "/api/x", bearer(make(idp)))
    assert r.status == status
    assert len(backend.seen) == (1 if status == 200 else 0)


def test_a_token_signed_by_one_issuer_cannot_claim_another(
    start_gateway: Start, backend: Backend, idp: JWKSServer, tmp_path: Path, demo_key: Any
) -> None:
    extra = (
        "    - name: demo\n"
        "      issuer: https://issuer.example\n"
        "      audience: api\n"
        "      algorithms: [RS256]\n"
        f"      jwks_file: {POLICIES / 'keys' / 'jwks.json'}\n"
    )
    text = idp_policy(tmp_path, idp).read_text().replace("rules:", extra + "rules:", 1)
    (tmp_path / "two.yaml").write_text(text)
    gw = start_gateway(tmp_path / "two.yaml")
    wait_until(lambda: idp.fetches >= 1, what="the first fetch")
    assert send(gw.address, "GET", "/api/x", bearer(mint(demo_key, sub="d"))).status == 200
    assert send(gw.address, "GET", "/api/x", bearer(idp.token())).status == 200
    forged = mint(idp.keys["k1"], sub="d", kid="demo-1")  # the provider's key, demo's iss
    r: Reply = send(gw.address, "GET", "/api/x", bearer(forged))
    assert r.status == 401
    assert len(backend.seen) == 2


class HungProvider:
    """Accepts connections and never answers: the identity provider that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self.sock.settimeout(0.1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)  # held open, never read or answered

    def close(self) -> None:
        self._stop.set()
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def test_a_hung_provider_never_queues_requests(backend: Backend, tmp_path: Path) -> None:
    # `bound` is generous for one REQUEST_WAIT, yet below what queueing takes:
    # the fetch waits on the hung provider longer than a request's socket
    # timeout, and n requests one after another would take n * REQUEST_WAIT.
    n, bound = 20, 10.0
    assert n * REQUEST_WAIT > bound
    addon = Gateway()
    addon.fetcher.get = lambda url, _timeout: http_get(url, 2 * REQUEST_SECONDS)
    hung = HungProvider()
    gw: RunningGateway | None = None
    try:
        fake = JWKSServer()
        fake.down()
        fake.port = hung.port  # the policy and the tokens name the hung provider
        gw = RunningGateway(idp_policy(tmp_path, fake), backend.url, [], gateway=addon)
        address = gw.address
        token = fake.token()
        times: list[float] = []
        statuses: list[int] = []

        def one() -> None:
            start = time.monotonic()
            statuses.append(send(address, "GET", "/api/x", bearer(token)).status)
            times.append(time.monotonic() - start)

        threads = [threading.Thread(target=one) for _ in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(2 * REQUEST_SECONDS)
        assert statuses == [503] * n
        # Each waits at most about REQUEST_WAIT for the one fetch in flight.
        assert max(times) < bound, times
        # One fetch at a time: the start-up fetch, which the requests joined.
        wait_until(lambda: hung.accepted, what="the start-up fetch connecting")
        assert len(hung.accepted) == 1
        assert backend.seen == []
    finally:
        hung.close()  # ends the fetch, so that the gateway can stop
        if gw is not None:
            gw.stop()
