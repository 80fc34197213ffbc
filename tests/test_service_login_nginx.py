"""The OpenID Connect login through real nginx in front of `authgate serve`,
with the configuration `authgate config nginx --policy` writes for it: every
step of the login goes through nginx's auth_request to a real OpenID provider
and back, and a session resealed on an allowed request reaches the browser
(the Set-Cookie lines the configuration has for a policy with a login)."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from authgate.policy.load import load_policy
from authgate.tools import proxyconfig
from conftest import Backend, recording_server
from oidc_provider import Browser, OpenIDProvider
from redis_server import free_port
from test_login import ACCOUNTS, client, write_policy
from test_service import Serve
from test_service_proxies import Running, _binary, start

# A session in use is resealed every tenth of `idle`: every second here.
IDLE = "      idle: 10s\n"


@pytest.fixture(scope="module")
def port() -> int:
    """nginx's port: the application's, the redirect URI's."""
    return free_port()


@pytest.fixture(scope="module")
def op(port: int) -> Iterator[OpenIDProvider]:
    with OpenIDProvider(clients=[client(port)], accounts=ACCOUNTS) as provider:
        yield provider


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with recording_server() as backend:
        yield backend


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory, op: OpenIDProvider, port: int) -> Path:
    path = write_policy(tmp_path_factory.mktemp("nginx-login"), op, port, session=IDLE)
    # The decision service judges only for its trusted proxies: nginx, here.
    text = path.read_text().replace(
        "version: 1\n", "version: 1\nclient_ip:\n  trusted_proxies: [127.0.0.1]\n", 1
    )
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, policy: Path) -> Iterator[Serve]:
    running = Serve(tmp_path_factory.mktemp("serve"), policy, port=free_port(), name="serve")
    yield running.wait_listening()
    running.stop()


def nginx_config(policy: Path, serve: Serve, backend: Backend, port: int) -> str:
    return proxyconfig.nginx(
        f"127.0.0.1:{serve.port}", backend.url, f"127.0.0.1:{port}", load_policy(policy)
    )


@pytest.fixture(scope="module")
def nginx(
    tmp_path_factory: pytest.TempPathFactory,
    policy: Path,
    serve: Serve,
    backend: Backend,
    port: int,
) -> Iterator[Running]:
    home = tmp_path_factory.mktemp("nginx")
    conf = home / "nginx.conf"
    text = nginx_config(policy, serve, backend, port)
    conf.write_text(proxyconfig.nginx_main(text, home, workers=1, access_log=True))
    argv = [_binary("nginx"), "-c", str(conf), "-p", str(home), "-g", "daemon off;"]
    running = start("nginx", argv, home, port)
    yield running
    running.stop()


def test_the_set_cookie_lines_are_written_for_a_login_policy_only(
    policy: Path, serve: Serve, backend: Backend, port: int
) -> None:
    text = nginx_config(policy, serve, backend, port)
    assert "auth_request_set $authgate_cookie $upstream_http_set_cookie;" in text
    assert "add_header Set-Cookie $authgate_cookie always;" in text
    example = proxyconfig.nginx("127.0.0.1:1", "http://127.0.0.1:2", "127.0.0.1:3", None)
    assert "authgate_cookie" not in example


def test_a_login_through_nginx_and_a_resealed_session_reaches_the_browser(
    nginx: Running, backend: Backend, port: int, op: OpenIDProvider
) -> None:
    backend.clear()
    page = f"http://127.0.0.1:{port}/app/orders?page=2"
    b = Browser()
    status, _, _, where = b.log_in(page, "alice")
    assert (status, where) == (200, page)
    steps = [(urllib.parse.urlsplit(u).path, s) for _, u, s in b.history]
    assert steps[:2] == [("/app/orders", 303), ("/oauth2/start", 303)]
    assert steps[-2:] == [("/oauth2/callback", 303), ("/app/orders", 200)]
    # Only the page reached the backend, as alice. (nginx passes the Cookie
    # field as it came, the sealed session too: no proxy here removes one
    # cookie; docs/decision-service.md says so.)
    (seen,) = backend.seen
    assert seen.target == "/app/orders?page=2"
    assert seen.header("X-Auth-Subject") == "alice"
    assert seen.header("X-Auth-Issuer") == op.issuer
    jar = b.cookies[f"127.0.0.1:{port}"]
    first = jar["authgate_session"]

    # A tenth of idle later, the session in use is resealed: the allowed
    # request's answer carries it, through nginx, to the browser.
    time.sleep(1.5)
    status, headers, _, _ = b.fetch("GET", f"http://127.0.0.1:{port}/app/next")
    assert status == 200
    sent = [v for v in headers.get_all("Set-Cookie") or [] if v.startswith("authgate_session=")]
    assert len(sent) == 1, headers
    assert "HttpOnly" in sent[0] and "SameSite=Lax" in sent[0]
    assert jar["authgate_session"] != first
    assert backend.seen[-1].header("X-Auth-Subject") == "alice"
    # The resealed session works like the first.
    status, _, _, _ = b.fetch("GET", f"http://127.0.0.1:{port}/admin/panel")
    assert status == 200 and backend.seen[-1].header("X-Auth-Subject") == "alice"


def test_without_a_session_an_api_call_through_nginx_is_401_and_reaches_nothing(
    nginx: Running, backend: Backend, port: int
) -> None:
    backend.clear()
    b = Browser()
    status, headers, _, _ = b.fetch(
        "GET", f"http://127.0.0.1:{port}/api/orders", headers={"Sec-Fetch-Mode": "cors"}
    )
    assert status == 401
    challenges = ", ".join(headers.get_all("WWW-Authenticate") or [])
    assert 'Cookie realm="api"' in challenges and "form-action" in challenges
    assert backend.seen == []
