"""Sessions of the OpenID Connect login over time, through a real gateway
and a real provider whose access tokens live 4 seconds: refreshed before
they expire without the browser noticing, a refresh the provider refuses
ends the session, the provider down at login and at refresh (503 with
Retry-After, never a loop, nothing forwarded), idle and absolute lifetimes,
the logout (local and at the provider)."""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from authgate.core.sealing import Sealer
from conftest import Backend, RunningGateway, send, wait_until
from oidc_provider import Browser, OpenIDProvider, request
from redis_server import free_port
from test_login import ACCOUNTS, SECRET, SESSION_KEY, client, url, write_policy

ACCESS_TOKEN_SECONDS = 4


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def op(port: int) -> Iterator[OpenIDProvider]:
    with OpenIDProvider(
        clients=[client(port)], accounts=ACCOUNTS, ttl={"AccessToken": ACCESS_TOKEN_SECONDS}
    ) as provider:
        yield provider


@pytest.fixture
def provider(op: OpenIDProvider) -> Iterator[OpenIDProvider]:
    """The module's provider, running again after a test that stopped it."""
    op.start()
    yield op
    op.start()


@pytest.fixture
def gateway(
    tmp_path: Path,
    provider: OpenIDProvider,
    port: int,
    start_gateway: Callable[..., RunningGateway],
) -> Callable[..., RunningGateway]:
    def start(session: str = "", *sets: str) -> RunningGateway:
        oidc = "    forward_access_token: true\n    jwks_refresh_cooldown: 1s\n"
        policy = write_policy(tmp_path, provider, port, oidc, session)
        return start_gateway(policy, *sets, listen=f"127.0.0.1:{port}")

    return start


def session_of(b: Browser, port: int) -> dict[str, object]:
    value = b.cookies[f"127.0.0.1:{port}"]["authgate_session"]
    opened = Sealer([SESSION_KEY]).open(value, b"session|authgate_session|app")
    assert opened is not None
    session: dict[str, object] = json.loads(opened)
    return session


def issued(b: Browser, port: int) -> float:
    """When the session's access token was issued (its age is what counts)."""
    at = session_of(b, port)["ai"]
    assert isinstance(at, float)
    return at


def until(moment: float) -> None:
    """Let the clock reach `moment` (a token's age is what is tested)."""
    time.sleep(max(0.0, moment - time.time()))


def bearer(backend: Backend) -> str | None:
    return backend.seen[-1].header("Authorization") if backend.seen else None


def test_a_refresh_the_browser_does_not_notice(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int
) -> None:
    gw = gateway()
    b = Browser()
    assert b.log_in(url(port, "/app/"), "alice")[0] == 200
    signed = issued(b, port)
    first = bearer(backend)
    assert first is not None and first.startswith("Bearer ")
    old_cookie = b.cookies[f"127.0.0.1:{port}"]["authgate_session"]
    asked = gw.addon.house.logins.requests  # the code exchange
    # Half the access token's life gone: the next request refreshes it first.
    until(signed + ACCESS_TOKEN_SECONDS / 2 + 0.2)
    status, headers, _, _ = b.fetch("GET", url(port, "/app/next"))
    assert status == 200
    second = bearer(backend)
    assert second is not None and second != first
    assert any(c.startswith("authgate_session=") for c in headers.get_all("Set-Cookie") or [])
    assert gw.addon.house.logins.requests == asked + 1
    # A request the browser sent at the same moment with the old cookie gets
    # the same refreshed session: no second refresh.
    again = send(gw.address, "GET", "/app/parallel", [("Cookie", f"authgate_session={old_cookie}")])
    assert again.status == 200 and bearer(backend) == second
    assert gw.addon.house.logins.requests == asked + 1
    # Past the first access token's life, the session goes on with the new one.
    until(signed + ACCESS_TOKEN_SECONDS + 0.2)
    assert b.fetch("GET", url(port, "/app/later"))[0] == 200
    assert session_of(b, port)["sub"] == "alice"


def test_a_refresh_the_provider_refuses_ends_the_session(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, provider: OpenIDProvider
) -> None:
    gw = gateway()
    b = Browser()
    assert b.log_in(url(port, "/app/"), "alice")[0] == 200
    signed = issued(b, port)
    cookie = [("Cookie", f"authgate_session={b.cookies[f'127.0.0.1:{port}']['authgate_session']}")]
    # The provider withdraws the refresh token (an administrator, a password change).
    refresh_token = session_of(b, port)["rt"]
    assert isinstance(refresh_token, str)
    auth = base64.b64encode(f"app:{SECRET}".encode()).decode()
    status, _, _ = request(
        "POST", provider.metadata()["revocation_endpoint"],
        {"Authorization": f"Basic {auth}", "Content-Type": "application/x-www-form-urlencoded"},
        urllib.parse.urlencode({"token": refresh_token}).encode(),
    )  # fmt: skip
    assert status == 200
    backend.clear()
    until(signed + ACCESS_TOKEN_SECONDS / 2 + 0.2)
    page = send(gw.address, "GET", "/app/x", cookie + [("Accept", "text/html"),
                ("Sec-Fetch-Mode", "navigate")])  # fmt: skip
    assert (page.status, page.header("Location")) == (303, "/oauth2/start?next=%2Fapp%2Fx")
    assert "authgate_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax" in page.header_all(
        "Set-Cookie"
    )
    api = send(gw.address, "GET", "/api/x", cookie + [("Accept", "application/json")])
    assert api.status == 401 and api.header("Location") is None
    assert backend.seen == []
    # The browser, sent to the login, signs in anew.
    b.cookies[f"127.0.0.1:{port}"].pop("authgate_session")
    assert b.log_in(url(port, "/app/x"), "alice")[0] == 200


def test_the_provider_down_at_refresh(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, provider: OpenIDProvider
) -> None:
    gw = gateway()
    b = Browser()
    assert b.log_in(url(port, "/app/"), "alice")[0] == 200
    signed = issued(b, port)
    provider.stop()
    backend.clear()
    # The refresh is due and fails; the access token still holds: carry on.
    until(signed + ACCESS_TOKEN_SECONDS / 2 + 0.2)
    assert b.fetch("GET", url(port, "/app/a"))[0] == 200
    # The access token expired: 503 with Retry-After, for a page too (no
    # loop through the login), and nothing forwarded.
    until(signed + ACCESS_TOKEN_SECONDS + 0.2)
    backend.clear()
    status, headers, _, where = b.fetch("GET", url(port, "/app/b"))
    assert (status, where) == (503, url(port, "/app/b"))
    assert int(headers["Retry-After"]) >= 1
    assert backend.seen == []
    assert gw.addon.house.status()["jwks"][provider.issuer]["keys"] >= 1


def test_the_provider_down_at_login(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, provider: OpenIDProvider
) -> None:
    provider.stop()
    gw = gateway()
    # Started without the provider: the login cannot start. 503, no loop.
    b = Browser()
    status, headers, _, where = b.fetch("GET", url(port, "/app/x"))
    assert (status, urllib.parse.urlsplit(where).path) == (503, "/oauth2/start")
    assert int(headers["Retry-After"]) >= 1
    assert [s for _, _, s in b.history] == [303, 503]
    # The provider comes back: the login works.
    provider.start()
    login = gw.addon.house.policy.login
    wait_until(lambda: login.metadata is not None, what="the provider's metadata, fetched again")
    assert Browser().log_in(url(port, "/app/x"), "alice")[0] == 200
    # Down between the provider's form and the callback: the code cannot be
    # exchanged. 503 with Retry-After; the login in progress stays.
    b = Browser()
    b.stop_at = url(port, "/oauth2/callback")
    status, _, _, callback = b.log_in(url(port, "/app/y"), "alice")
    assert status == 0
    provider.stop()
    backend.clear()
    b.stop_at = None
    status, headers, _, _ = b.fetch("GET", callback)
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert any(n.startswith("authgate_session-login-") for n in b.cookies[f"127.0.0.1:{port}"])
    assert backend.seen == []


def test_idle_and_absolute_lifetimes(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int
) -> None:
    gateway(session="      idle: 2s\n      absolute: 5s\n")
    page = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
    # Used every second: the idle deadline moves, until the absolute one.
    b = Browser()
    assert b.log_in(url(port, "/app/"), "alice")[0] == 200
    signed = session_of(b, port)["li"]
    assert isinstance(signed, float)
    for second in (1, 2, 3, 4):
        until(signed + second)
        assert b.fetch("GET", url(port, "/app/busy"))[0] == 200, second
    until(signed + 5.1)
    backend.clear()
    status, headers, _, _ = b.fetch("GET", url(port, "/app/busy"), headers=page, follow=False)
    assert (status, headers["Location"]) == (303, "/oauth2/start?next=%2Fapp%2Fbusy")
    assert backend.seen == []
    # Left alone longer than idle: over.
    b = Browser()
    assert b.log_in(url(port, "/app/"), "alice")[0] == 200
    seen = session_of(b, port)["ls"]
    assert isinstance(seen, float)
    until(seen + 2.1)
    status, _, _, _ = b.fetch("GET", url(port, "/app/idle"), headers=page, follow=False)
    assert status == 303


def test_logout_here_and_at_the_provider(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, provider: OpenIDProvider
) -> None:
    gateway()
    b = Browser()
    assert b.log_in(url(port, "/app/"), "alice")[0] == 200
    id_token = session_of(b, port)["it"]
    backend.clear()
    status, headers, _, _ = b.fetch(
        "POST", url(port, "/oauth2/logout"), body=b"",
        headers={"Origin": f"http://127.0.0.1:{port}"}, follow=False,
    )  # fmt: skip
    assert status == 303
    assert "authgate_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax" in (
        headers.get_all("Set-Cookie") or []
    )
    assert "authgate_session" not in b.cookies[f"127.0.0.1:{port}"]
    # RP-initiated logout: to the provider's end_session_endpoint, with the hint.
    location = urllib.parse.urlsplit(headers["Location"])
    assert (
        f"{location.scheme}://{location.netloc}{location.path}"
        == (provider.metadata()["end_session_endpoint"])
    )
    assert dict(urllib.parse.parse_qsl(location.query)) == {
        "client_id": "app",
        "post_logout_redirect_uri": url(port, "/"),
        "id_token_hint": id_token,
    }
    status, _, page, where = b.fetch("GET", headers["Location"])
    assert status == 200  # the provider asks whether to sign out there too
    status, _, _, where = b.submit(where, page, {"logout": "yes"})
    assert where == url(port, "/")  # back here (no rule for / in this policy: 404)
    # Signed out at the provider as well: the next page load meets its login form.
    status, _, page, where = b.fetch("GET", url(port, "/app/"))
    assert status == 200 and "/interaction/" in where and "login" in b.forms(page)[0][2]
    assert backend.seen == []


def test_report_mode_logs_in_and_changes_nothing_else(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int
) -> None:
    gw = gateway("", "authgate_mode=report")
    # Would-be denials go to the backend as they are: no login, no cookie removed.
    bad = [("Cookie", "authgate_session=garbage"), ("Accept", "text/html"),
           ("Sec-Fetch-Mode", "navigate")]  # fmt: skip
    r = send(gw.address, "GET", "/app/x", bad)
    assert r.status == 200 and r.header("Set-Cookie") is None and r.header("Location") is None
    assert backend.seen[-1].header("X-Auth-Subject") is None
    # The login's own paths are still the gateway's: a login works, and the
    # backend then learns who.
    b = Browser()
    assert b.fetch("GET", url(port, "/oauth2/start?next=%2Fapp%2Fy"), follow=False)[0] == 303
    assert b.log_in(url(port, "/oauth2/start?next=%2Fapp%2Fy"), "alice")[0] == 200
    assert backend.seen[-1].target == "/app/y"
    assert backend.seen[-1].header("X-Auth-Subject") == "alice"
    assert not [s for s in backend.seen if s.target.startswith("/oauth2/")]


def test_rotating_the_session_keys(
    gateway: Callable[..., RunningGateway], backend: Backend, port: int, tmp_path: Path
) -> None:
    gw = gateway()
    house = gw.addon.house
    keys = tmp_path / "session-keys"
    old = keys.read_text()
    b = Browser()
    assert b.log_in(url(port, "/app/"), "alice")[0] == 200
    before = b.cookies[f"127.0.0.1:{port}"]["authgate_session"]
    # A new key first, the old one below: the file changes, the policy reloads.
    reloads = house.reloads
    new = base64.b64encode(bytes(range(100, 132))).decode()
    keys.write_text(f"{new}\n{old}")
    wait_until(lambda: house.reloads > reloads, what="the reload after the key file changed")
    assert b.fetch("GET", url(port, "/app/old-session"))[0] == 200  # still opens
    fresh = Browser()
    assert fresh.log_in(url(port, "/app/"), "bob")[0] == 200
    sealed = fresh.cookies[f"127.0.0.1:{port}"]["authgate_session"]
    assert Sealer([bytes(range(100, 132))]).open(sealed, b"session|authgate_session|app")
    # The old key retired: its sessions end; the new ones go on.
    reloads = house.reloads
    keys.write_text(f"{new}\n")
    wait_until(lambda: house.reloads > reloads, what="the reload after the old key left")
    cookie = [("Cookie", f"authgate_session={before}"), ("Accept", "application/json")]
    assert send(gw.address, "GET", "/app/x", cookie).status == 401
    assert fresh.fetch("GET", url(port, "/app/new-session"))[0] == 200
