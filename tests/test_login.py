"""The OpenID Connect login through a real gateway (`authgate run`'s lean
mitmproxy master) in front of a recording backend, against a real OpenID
provider (panva's oidc-provider, tests/oidc_provider.py), with a client that
follows redirects and fills in the provider's forms as a browser does.

One provider serves the module; each test starts its own gateway on the
port the provider knows (the redirect URI is registered there)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from authgate.core.sealing import Sealer
from conftest import POLICIES, Backend, Recording, RunningGateway, recording_server, send
from oidc_provider import Browser, OpenIDProvider
from redis_server import free_port

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret"
SESSION_KEY = bytes(range(32))
API_KEY = "k-0123456789abcdef"
PAGE = [("Accept", "text/html"), ("Sec-Fetch-Mode", "navigate")]


@pytest.fixture(scope="module")
def port() -> int:
    """The gateway's port: the provider knows its redirect URI in advance."""
    return free_port()


def client(port: int, client_id: str = "app", **more: Any) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "client_secret": SECRET,
        "redirect_uris": [f"http://127.0.0.1:{port}/oauth2/callback"],
        "post_logout_redirect_uris": [f"http://127.0.0.1:{port}/"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
        **more,
    }


ACCOUNTS = {
    "alice": {"email": "alice@example.com", "groups": ["admin", "staff"]},
    "bob": {"email": "bob@example.com", "groups": ["staff"]},
}


@pytest.fixture(scope="module")
def op(port: int) -> Iterator[OpenIDProvider]:
    with OpenIDProvider(
        clients=[
            client(port),
            client(port, "post-client", token_endpoint_auth_method="client_secret_post"),
        ],
        accounts=ACCOUNTS,
    ) as provider:
        yield provider


def write_policy(
    tmp_path: Path, op: OpenIDProvider, port: int, oidc: str = "", session: str = ""
) -> Path:
    """The login policy; `oidc` and `session`: more lines for those sections."""
    (tmp_path / "client-secret").write_text(SECRET + "\n")
    (tmp_path / "session-keys").write_text(base64.b64encode(SESSION_KEY).decode() + "\n")
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    text = f"""\
version: 1
authn:
  jwt:
    - name: demo
      issuer: https://issuer.example
      audience: api
      algorithms: [RS256]
      jwks_file: {POLICIES / "keys" / "jwks.json"}
  api_keys:
    keys:
      - {{name: robot, sha256: {digest}}}
  oidc:
    issuer: {op.issuer}
    client_id: app
    client_secret_file: client-secret
    redirect_uri: http://127.0.0.1:{port}/oauth2/callback
    scopes: [openid, email, groups]
    roles_claim: groups
{oidc}    session:
      keys_file: session-keys
{session}rules:
  - name: app
    match: {{path: "/app/**"}}
    allow: authenticated
  - name: admin
    match: {{path: "/admin/**"}}
    allow: {{role: admin}}
  - name: api
    match: {{path: "/api/**"}}
    allow: authenticated
"""
    path = tmp_path / "login.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One recording backend for the module's one gateway."""
    with recording_server() as backend:
        yield backend


@pytest.fixture
def backend(shared: Backend) -> Backend:
    """The module's backend, with nothing seen yet."""
    shared.clear()
    return shared


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, op: OpenIDProvider, port: int, shared: Backend
) -> Iterator[RunningGateway]:
    policy = write_policy(tmp_path_factory.mktemp("login"), op, port)
    gw = RunningGateway(policy, shared.url, [], Recording(), listen=f"127.0.0.1:{port}")
    yield gw
    gw.stop()


@pytest.fixture
def gateway(running: RunningGateway, backend: Backend) -> Callable[[], RunningGateway]:
    """gateway() -> the module's gateway (one policy serves every test here)."""
    return lambda: running


def url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def test_a_page_load_signs_in_and_the_backend_sees_who(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, op: OpenIDProvider
) -> None:
    gateway()
    b = Browser()
    status, _, _, where = b.log_in(url(port, "/app/orders?page=2"), "alice")
    assert (status, where) == (200, url(port, "/app/orders?page=2"))
    # The way there: the gateway's START, the provider, its forms, the callback.
    steps = [(m, urllib.parse.urlsplit(u).path, s) for m, u, s in b.history]
    assert steps[:3] == [("GET", "/app/orders", 303), ("GET", "/oauth2/start", 303),
                         ("GET", "/auth", 303)]  # fmt: skip
    assert steps[-2:] == [("GET", "/oauth2/callback", 303), ("GET", "/app/orders", 200)]
    # Only the last request reached the backend, with the identity headers and
    # without the gateway's own cookies.
    (seen,) = backend.seen
    assert seen.target == "/app/orders?page=2"
    assert seen.header("X-Auth-Subject") == "alice"
    assert seen.header("X-Auth-Roles") == "admin,staff"
    assert seen.header("X-Auth-Issuer") == op.issuer
    assert "authgate_session" not in (seen.header("Cookie") or "")
    assert seen.header("Authorization") is None
    # The session works for the next pages, and for rules that test the claims.
    status, _, _, _ = b.fetch("GET", url(port, "/admin/panel"))
    assert status == 200 and backend.seen[-1].header("X-Auth-Subject") == "alice"
    jar = b.cookies[f"127.0.0.1:{port}"]
    assert list(jar) == ["authgate_session"]  # the pre-login cookie is gone


class RecordingBrowser(Browser):
    """A Browser that keeps every Set-Cookie it was sent, by path."""

    def __init__(self) -> None:
        super().__init__()
        self.set_cookies: list[tuple[str, list[str]]] = []

    def _keep_cookies(self, url: str, headers: Any) -> None:
        path = urllib.parse.urlsplit(url).path
        self.set_cookies.append((path, headers.get_all("Set-Cookie") or []))
        super()._keep_cookies(url, headers)

    def sent(self, path: str) -> list[str]:
        return [c for p, cookies in self.set_cookies if p == path for c in cookies]


def test_the_cookies(gateway: Callable[..., RunningGateway], port: int) -> None:
    gateway()
    b = RecordingBrowser()
    assert b.log_in(url(port, "/app/"), "bob")[0] == 200
    (pre_login,) = b.sent("/oauth2/start")
    name, _, rest = pre_login.partition("=")
    assert name.startswith("authgate_session-login-")  # plain http: no __Secure- prefix
    assert rest.endswith("; Path=/oauth2/callback; Max-Age=600; HttpOnly; SameSite=Lax")
    session, removal = b.sent("/oauth2/callback")
    assert removal == f"{name}=; Path=/oauth2/callback; Max-Age=0; HttpOnly; SameSite=Lax"
    name, _, rest = session.partition("=")
    value, _, attributes = rest.partition("; ")
    assert name == "authgate_session"
    assert attributes == "Path=/; Max-Age=43200; HttpOnly; SameSite=Lax"
    # Sealed: nothing of the tokens or claims shows.
    assert "bob" not in value and len(value) < 3800
    opened = Sealer([SESSION_KEY]).open(value, b"session|authgate_session|app")
    assert opened is not None and json.loads(opened)["sub"] == "bob"


def test_api_calls_get_401_never_a_redirect(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int
) -> None:
    gw = gateway()
    for headers in ([("Accept", "application/json")], [("Accept", "text/html"),
                    ("Sec-Fetch-Mode", "cors")], [("Accept", "*/*")]):  # fmt: skip
        r = send(gw.address, "GET", "/api/orders", headers)
        assert r.status == 401, headers
        assert r.header("Location") is None
        challenges = r.header_all("WWW-Authenticate")
        assert (
            'Cookie realm="api", form-action="/oauth2/start", cookie-name="authgate_session"'
            in challenges
        )
        assert any(c.startswith("Bearer ") for c in challenges)
    r = send(gw.address, "POST", "/app/form", PAGE)  # a form post is not a page load
    assert r.status == 401
    assert backend.seen == []


def test_bearer_tokens_and_api_keys_beside_sessions(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, token: Callable[..., str]
) -> None:
    gw = gateway()
    r = send(gw.address, "GET", "/api/orders", [("Authorization", f"Bearer {token('carol')}")])
    assert r.status == 200 and backend.seen[-1].header("X-Auth-Subject") == "carol"
    r = send(gw.address, "GET", "/api/orders", [("X-API-Key", API_KEY)])
    assert r.status == 200 and backend.seen[-1].header("X-Auth-Subject") == "robot"
    # A browser with a session that also sends a bearer token: the explicit one wins.
    b = Browser()
    assert b.log_in(url(port, "/app/"), "alice")[0] == 200
    status, _, _, _ = b.fetch(
        "GET", url(port, "/api/orders"), headers={"Authorization": f"Bearer {token('carol')}"}
    )
    assert status == 200 and backend.seen[-1].header("X-Auth-Subject") == "carol"


# --- the security cases: each denial reaches nothing behind the gateway ------------------


def signed_in(port: int, login: str = "alice") -> Browser:
    b = Browser()
    status, _, _, _ = b.log_in(url(port, "/app/"), login)
    assert status == 200
    return b


def sealed_session(key: bytes = SESSION_KEY, **fields: Any) -> str:
    now = time.time()
    session = {
        "v": 1, "sub": "alice", "c": {"sub": "alice", "groups": ["admin"]}, "sc": ["openid"],
        "li": now, "ls": now, "at": "at", "ai": now, "ae": None, "rt": None, "it": None,
    }  # fmt: skip
    session.update(fields)
    data = json.dumps(session).encode()
    return Sealer([key]).seal(data, b"session|authgate_session|app")


def flipped(value: str, at: int = 30) -> str:
    return value[:at] + ("A" if value[at] != "A" else "B") + value[at + 1 :]


@pytest.mark.parametrize(
    "cookie",
    ["tampered", "truncated", "expired", "idle", "other key", "a pre-login cookie", "garbage"],
)
def test_sessions_that_do_not_hold(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, cookie: str
) -> None:
    gw = gateway()
    if cookie in ("tampered", "truncated"):
        real = signed_in(port).cookies[f"127.0.0.1:{port}"]["authgate_session"]
        value = flipped(real) if cookie == "tampered" else real[:-10]
    elif cookie == "expired":  # logged in 13 hours ago (absolute: 12h)
        value = sealed_session(li=time.time() - 13 * 3600, ls=time.time() - 60)
    elif cookie == "idle":  # unused for 2 hours (idle: 1h)
        value = sealed_session(li=time.time() - 7200, ls=time.time() - 7200)
    elif cookie == "other key":
        value = sealed_session(key=bytes(32))
    elif cookie == "a pre-login cookie":
        value = Sealer([SESSION_KEY]).seal(b'["s","n","v","/",0]', b"login|authgate_session|app")
    else:
        value = "garbage"
    backend.clear()
    jar = [("Cookie", f"authgate_session={value}")]
    page = send(gw.address, "GET", "/app/orders", PAGE + jar)
    assert page.status == 303
    assert page.header("Location") == "/oauth2/start?next=%2Fapp%2Forders"
    assert "authgate_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax" in page.header_all(
        "Set-Cookie"
    )
    api = send(gw.address, "GET", "/api/orders", [("Accept", "application/json")] + jar)
    assert api.status == 401 and api.header("Location") is None
    assert backend.seen == []


def test_a_sealed_session_for_someone_else_is_still_judged(
    gateway: Callable[..., RunningGateway], backend: Backend
) -> None:
    # A valid session whose claims lack the role: 403 by the rule, as for a token.
    gw = gateway()
    value = sealed_session(c={"sub": "bob", "groups": ["staff"]}, sub="bob")
    r = send(gw.address, "GET", "/admin/panel", [("Cookie", f"authgate_session={value}")])
    assert r.status == 403 and backend.seen == []


def start_login(b: Browser, port: int, path: str = "/app/") -> tuple[str, str, str]:
    """START for `path` in this browser: (the authorization URL, the pre-login
    cookie's name, its value)."""
    status, headers, _, _ = b.fetch(
        "GET", url(port, f"/oauth2/start?next={urllib.parse.quote(path, safe='')}"), follow=False
    )
    assert status == 303
    jar = b.cookies[f"127.0.0.1:{port}"]
    name = next(n for n in jar if n.startswith("authgate_session-login-"))
    return headers["Location"], name, jar[name]


def authorized(b: Browser, port: int, authorization_url: str, login: str = "alice") -> str:
    """Sign in at the provider; the callback URL it sends the browser to, not loaded."""
    b.stop_at = url(port, "/oauth2/callback")
    status, _, _, where = b.log_in(authorization_url, login)
    b.stop_at = None
    assert status == 0 and where.startswith(url(port, "/oauth2/callback?"))
    return where


def callback_params(callback: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback).query))


def test_a_replayed_callback(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int
) -> None:
    gw = gateway()
    b = Browser()
    location, name, value = start_login(b, port)
    callback = authorized(b, port, location)
    assert b.fetch("GET", callback)[0] == 200  # the login, then the page
    backend.clear()
    # Again in the same browser: its login in progress is over.
    status, _, _, where = b.fetch("GET", callback, follow=False)
    assert status == 400
    # Again with the pre-login cookie as it was: the code was used once already.
    target = callback.removeprefix(url(port, ""))
    r = send(gw.address, "GET", target, PAGE + [("Cookie", f"{name}={value}")])
    assert r.status == 400  # the provider refused the code (invalid_grant)
    assert (
        r.header("Set-Cookie")
        == f"{name}=; Path=/oauth2/callback; Max-Age=0; HttpOnly; SameSite=Lax"
    )
    assert backend.seen == []


@pytest.mark.parametrize("change", ["another state", "no state", "the other login's state"])
def test_a_state_that_does_not_match(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, change: str
) -> None:
    gw = gateway()
    b = Browser()
    location, _, _ = start_login(b, port)
    other_location, _, _ = start_login(Browser(), port)  # someone else's login
    params = callback_params(authorized(b, port, location))
    if change == "another state":
        params["state"] = flipped(params["state"], 20)
    elif change == "no state":
        del params["state"]
    else:
        params["state"] = callback_params(other_location)["state"]
    before = gw.addon.house.logins.requests
    status, _, body, _ = b.fetch(
        "GET", url(port, "/oauth2/callback?" + urllib.parse.urlencode(params))
    )
    assert status == 400 and b"could not be completed" in body
    assert backend.seen == [] and gw.addon.house.logins.requests == before  # no code exchanged


def test_a_nonce_used_twice(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int
) -> None:
    gateway()
    first = Browser()
    location, name, value = start_login(first, port)
    assert first.log_in(location, "alice")[0] == 200  # login one: its nonce is used
    backend.clear()
    # The same authorization request once more (same state, nonce and PKCE
    # challenge), answered by the provider with a new code, brought back with
    # the first login's pre-login cookie: everything matches but the nonce.
    second = Browser()
    second.cookies[f"127.0.0.1:{port}"] = {name: value}
    status, _, body, where = second.log_in(location, "alice")
    assert (status, urllib.parse.urlsplit(where).path) == (400, "/oauth2/callback")
    assert backend.seen == [] and "authgate_session" not in second.cookies[f"127.0.0.1:{port}"]


@pytest.mark.parametrize("how", ["its own state", "the victim's state"])
def test_a_code_injected_from_another_session(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, how: str
) -> None:
    gw = gateway()
    attacker = Browser()
    attacker_location, _, _ = start_login(attacker, port)
    stolen = callback_params(authorized(attacker, port, attacker_location, "bob"))
    victim = Browser()
    victim_location, _, _ = start_login(victim, port)
    if how == "the victim's state":
        stolen["state"] = callback_params(victim_location)["state"]
    before = gw.addon.house.logins.requests
    status, _, _, _ = victim.fetch(
        "GET", url(port, "/oauth2/callback?" + urllib.parse.urlencode(stolen))
    )
    assert status == 400
    # With the victim's state the code is exchanged, and the provider refuses
    # it: it was issued for the attacker's PKCE challenge.
    assert gw.addon.house.logins.requests - before == (1 if how == "the victim's state" else 0)
    assert "authgate_session" not in victim.cookies.get(f"127.0.0.1:{port}", {})
    assert backend.seen == []


@pytest.mark.parametrize("iss", ["http://127.0.0.1:1", "missing"])
def test_an_iss_mix_up(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, iss: str
) -> None:
    gw = gateway()
    b = Browser()
    location, _, _ = start_login(b, port)
    params = callback_params(authorized(b, port, location))
    assert "iss" in params  # the provider sends it (RFC 9207)
    if iss == "missing":
        del params["iss"]
    else:
        params["iss"] = iss
    before = gw.addon.house.logins.requests
    status, _, _, _ = b.fetch(
        "GET", url(port, "/oauth2/callback?" + urllib.parse.urlencode(params))
    )
    assert status == 400
    assert gw.addon.house.logins.requests == before  # the code went nowhere
    assert backend.seen == []


@pytest.mark.parametrize(
    "query",
    [
        "next=https%3A%2F%2Fevil.example%2F",
        "rd=https%3A%2F%2Fevil.example%2F",
        "next=%2F%2Fevil.example",
        "rd=%2F%5Cevil.example",
        "next=%5C%5Cevil.example",
        "next=http%3Aevil.example",
        "next=javascript%3Aalert(1)",
        "next=%2F%2F%2Fevil.example",
        "next=%09%2F%2Fevil.example",
        "next=%2Fapp%2F&next=https%3A%2F%2Fevil.example",
    ],
)
def test_no_open_redirect_through_the_return_parameters(
    gateway: Callable[..., RunningGateway], port: int, query: str
) -> None:
    gateway()
    b = Browser()
    status, headers, _, _ = b.fetch("GET", url(port, "/oauth2/start?" + query), follow=False)
    assert status == 303 and headers["Location"].startswith("http://127.0.0.1:")
    b.log_in(headers["Location"], "alice")
    after = [u for _, u, _ in b.history]
    back = after[after.index(next(u for u in after if "/oauth2/callback" in u)) + 1]
    assert back == url(port, "/")


def test_no_open_redirect_through_the_callback_or_the_logout(
    gateway: Callable[..., RunningGateway], port: int
) -> None:
    gateway()
    b = Browser()
    location, _, _ = start_login(b, port, "/app/x")
    callback = authorized(b, port, location) + "&next=https%3A%2F%2Fevil.example&rd=%2F%2Fevil"
    status, headers, _, _ = b.fetch("GET", callback, follow=False)
    assert (status, headers["Location"]) == (303, "/app/x")
    status, headers, _, _ = b.fetch(
        "POST", url(port, "/oauth2/logout?rd=https%3A%2F%2Fevil.example"), body=b"",
        headers={"Origin": f"http://127.0.0.1:{port}"}, follow=False,
    )  # fmt: skip
    assert status == 303 and "evil" not in headers["Location"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Referer": "http://evil.example/page"},
        {},
    ],
)
def test_a_logout_another_site_asks_for(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, headers: dict[str, str]
) -> None:
    gateway()
    b = signed_in(port)
    backend.clear()
    status, answer, _, _ = b.fetch("POST", url(port, "/oauth2/logout"), body=b"", headers=headers)
    assert status == 403 and answer.get_all("Set-Cookie") is None
    assert backend.seen == []
    assert b.fetch("GET", url(port, "/app/still-signed-in"))[0] == 200  # the session stays


def test_mitmweb_comments_tell_each_step_and_no_secret(
    gateway: Callable[..., RunningGateway], port: int
) -> None:
    gw = gateway()
    recording = gw.addon
    assert isinstance(recording, Recording)
    recording.flows.clear()
    b = RecordingBrowser()
    assert b.log_in(url(port, "/app/c"), "alice")[0] == 200
    comments = {f.request.path.split("?")[0]: f.comment for f in recording.flows}
    assert list(comments) == ["/app/c", "/oauth2/start", "/oauth2/callback"]
    assert comments["/app/c"].startswith("200 app\nauthgate: allowed by rule app ")
    start = comments["/oauth2/start"].splitlines()
    assert start[:2] == ["303 login: to the provider", "authgate: 303 (login_start)"]
    assert start[2].startswith(f"login: sent to the provider {op_issuer(b)}/auth (state ")
    assert start[2].endswith("PKCE S256, nonce " + start[2].split("nonce ")[1].split("…")[0] + "…);"
                             " back to /app/c afterwards")  # fmt: skip
    callback = comments["/oauth2/callback"].splitlines()
    assert callback[:2] == ["303 login: session issued", "authgate: 303 (login_complete)"]
    assert callback[2] == f"login: callback from {op_issuer(b)} (iss checked, RFC 9207)"
    assert (
        callback[3] == "code exchanged at the token endpoint (client_secret_basic, PKCE verifier)"
    )
    assert callback[4].startswith('ID token: JWT {"alg": "RS256"')
    assert '"email": "alice@example.com"' in callback[4] and '"sub": "alice"' in callback[4]
    assert callback[5] == "access token: opaque (43 characters), with a refresh token"
    assert callback[6].startswith("session issued for 'alice': ")
    assert callback[7] == "back to /app/c"
    # Never a secret: not the client's, not a token, not the code or the verifier.
    session = json.loads(
        Sealer([SESSION_KEY]).open(
            b.cookies[f"127.0.0.1:{port}"]["authgate_session"], b"session|authgate_session|app"
        ) or b""
    )  # fmt: skip
    (pre_login,) = b.sent("/oauth2/start")
    pending = json.loads(
        Sealer([SESSION_KEY]).open(
            pre_login.split("=", 1)[1].split(";")[0], b"login|authgate_session|app"
        ) or b""
    )  # fmt: skip
    code = next(
        dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(u).query))["code"]
        for _, u, _ in b.history if "/oauth2/callback" in u
    )  # fmt: skip
    everything = "\n".join(comments.values())
    for secret in (SECRET, session["at"], session["rt"], session["it"], code, pending[2]):
        assert secret not in everything


def op_issuer(b: Browser) -> str:
    """The provider's issuer, from where the browser signed in."""
    where = next(u for _, u, _ in b.history if "/interaction/" in u)
    parts = urllib.parse.urlsplit(where)
    return f"{parts.scheme}://{parts.netloc}"
