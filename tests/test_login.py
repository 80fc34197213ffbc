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
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from authgate.core.sealing import Sealer
from conftest import POLICIES, Backend, RunningGateway, send
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


def write_policy(tmp_path: Path, op: OpenIDProvider, port: int, oidc: str = "") -> Path:
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
rules:
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


@pytest.fixture
def gateway(
    tmp_path: Path, op: OpenIDProvider, port: int, start_gateway: Callable[..., RunningGateway]
) -> Callable[..., RunningGateway]:
    """gateway(oidc="    extra: settings\\n") -> a gateway with the login policy."""

    def start(oidc: str = "") -> RunningGateway:
        return start_gateway(write_policy(tmp_path, op, port, oidc), listen=f"127.0.0.1:{port}")

    return start


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
