"""The OpenID Connect login through the decision service (`authgate serve`,
door 2), asked as a forward-auth proxy (Traefik, Caddy) asks it: the test
plays the proxy's part on the check requests (what it forwards, what it hands
back) and the browser's at a real OpenID provider. Every step of the login is
the service's answer to a check: the page load's 303, START's 303 with the
pre-login cookie, the callback's 303 with the session, the allow with the
identity, the logout."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from oidc_provider import Browser, OpenIDProvider
from redis_server import free_port
from test_login import ACCOUNTS, client, write_policy
from test_service import Serve, ask, auth

PAGE = (("Accept", "text/html"), ("Sec-Fetch-Mode", "navigate"))


@pytest.fixture(scope="module")
def port() -> int:
    """The application's port behind the proxy (the redirect URI's)."""
    return free_port()


@pytest.fixture(scope="module")
def op(port: int) -> Iterator[OpenIDProvider]:
    with OpenIDProvider(clients=[client(port)], accounts=ACCOUNTS) as provider:
        yield provider


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Path], Serve]]:
    """serve(policy) -> a listening `authgate serve` (stopped after the test)."""
    running: list[Serve] = []

    def start(policy: Path) -> Serve:
        running.append(Serve(tmp_path, policy, name="serve"))
        return running[-1].wait_listening()

    yield start
    for s in running:
        s.stop()


def cookie_pairs(set_cookies: list[str]) -> dict[str, str]:
    """What a browser keeps of Set-Cookie values (removals drop the cookie)."""
    kept: dict[str, str] = {}
    for value in set_cookies:
        name, _, rest = value.partition("=")
        kept[name] = rest.split(";", 1)[0]
    return kept


def test_a_login_through_the_decision_service(
    serve: Callable[..., Serve], op: OpenIDProvider, port: int, tmp_path: Path, demo_key: Any
) -> None:
    policy = write_policy(tmp_path, op, port, oidc="    forward_access_token: true\n").read_text()
    (tmp_path / "login.yaml").write_text(
        policy.replace("version: 1\n", "version: 1\nclient_ip: {trusted_proxies: [127.0.0.1/32]}\n")
    )
    service = serve(tmp_path / "login.yaml")
    jar: dict[str, str] = {}

    def check(uri: str, *more: tuple[str, str], method: str = "GET") -> Any:
        cookie = "; ".join(f"{k}={v}" for k, v in jar.items() if v)
        fields = auth(uri, *PAGE, *more, method=method)
        fields = [(k, v) for k, v in fields if k != "X-Forwarded-Host"]
        fields.append(("X-Forwarded-Host", f"127.0.0.1:{port}"))
        if cookie:
            fields.append(("Cookie", cookie))
        reply = ask(service.address, "GET", "/auth", fields)
        for name, value in cookie_pairs(reply.header_all("Set-Cookie")).items():
            if value:
                jar[name] = value
            else:
                jar.pop(name, None)
        return reply

    # The page load: to START, then to the provider with the pre-login cookie.
    r = check("/app/orders")
    assert (r.status, r.header("Location")) == (303, "/oauth2/start?next=%2Fapp%2Forders")
    r = check(r.header("Location"))
    assert r.status == 303 and r.header("X-Authgate-Decision") == "deny"
    assert r.header("Location").startswith(f"{op.issuer}/auth?")
    assert any(name.startswith("authgate_session-login-") for name in jar)
    # The person signs in at the provider, which sends the browser back.
    browser = Browser()
    browser.stop_at = f"http://127.0.0.1:{port}/oauth2/callback"
    status, _, _, callback = browser.log_in(r.header("Location"), "alice")
    assert status == 0
    r = check(urllib.parse.urlsplit(callback)._replace(scheme="", netloc="").geturl())
    assert (r.status, r.header("Location")) == (303, "/app/orders")
    assert "authgate_session" in jar and not any("-login-" in name for name in jar)
    # Signed in: the service allows, with the identity and the access token.
    r = check("/app/orders")
    assert (r.status, r.header("X-Authgate-Decision")) == (200, "allow")
    assert r.header("X-Auth-Subject") == "alice" and r.header("X-Auth-Roles") == "admin,staff"
    assert (r.header("Authorization") or "").startswith("Bearer ")
    # An API call without the session: 401, never a redirect.
    api = ask(service.address, "GET", "/auth", auth("/api/x", ("Accept", "application/json")))
    assert api.status == 401 and api.header("Location") is None
    # The logout: cross-site refused; from the site, the session goes.
    r = check("/oauth2/logout", ("Origin", "http://evil.example"), method="POST")
    assert r.status == 403 and "authgate_session" in jar
    r = check("/oauth2/logout", ("Origin", f"http://127.0.0.1:{port}"), method="POST")
    assert r.status == 303 and r.header("Location").startswith(f"{op.issuer}/session/end?")
    assert "authgate_session" not in jar
    r = check("/app/orders")
    assert r.status == 303
