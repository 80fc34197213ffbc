"""One login end to end in a real browser: Debian's chromium, headless,
driven by Playwright (PyPI `playwright`, launched on /usr/bin/chromium: no
browser download), through a real gateway to a real OpenID provider.

Playwright because it is the well-kept way to drive a Chromium from Python
(waiting for navigations, filling forms, reading cookies with their
attributes), where Chrome's DevTools protocol by hand would be our own code.
What a real browser adds to tests/test_login.py: its own redirects, cookie
jar (one per host, whatever the port), SameSite and Sec-Fetch-* headers,
and the provider's real forms."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Backend, RunningGateway
from oidc_provider import OpenIDProvider
from redis_server import free_port
from test_login import ACCOUNTS, client, write_policy

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def op(port: int) -> Iterator[OpenIDProvider]:
    with OpenIDProvider(clients=[client(port)], accounts=ACCOUNTS) as provider:
        yield provider


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail("the test needs Debian's chromium (`make test` installs it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def test_a_login_in_chromium(
    browser: Any,
    op: OpenIDProvider,
    port: int,
    tmp_path: Path,
    backend: Backend,
    start_gateway: Callable[..., RunningGateway],
) -> None:
    start_gateway(write_policy(tmp_path, op, port), listen=f"127.0.0.1:{port}")
    home = f"http://127.0.0.1:{port}"
    context = browser.new_context()
    page = context.new_page()
    # A page load: to the gateway's START, then the provider's sign-in form.
    page.goto(f"{home}/app/orders?page=2")
    assert page.url.startswith(f"{op.issuer}/interaction/")
    page.fill("input[name=login]", "alice")
    page.fill("input[name=password]", "irrelevant")
    page.click("button[type=submit]")
    page.wait_for_url(f"{op.issuer}/interaction/**")  # the consent form
    page.click("button[type=submit]")
    # Back where it was going, signed in; the backend knows who.
    page.wait_for_url(f"{home}/app/orders?page=2")
    assert '"path": "/app/orders?page=2"' in page.content()
    seen = backend.seen[-1]
    assert seen.header("X-Auth-Subject") == "alice"
    assert seen.header("X-Auth-Roles") == "admin,staff"
    assert seen.header("Sec-Fetch-Mode") == "navigate"
    assert [s.target for s in backend.seen] == ["/app/orders?page=2"]  # only that one
    (session,) = [c for c in context.cookies(home) if c["name"].startswith("authgate_session")]
    assert (session["name"], session["httpOnly"], session["sameSite"], session["path"]) == (
        "authgate_session", True, "Lax", "/")  # fmt: skip
    # The page's own script: a same-origin fetch carries the session...
    status = page.evaluate("fetch('/api/orders').then(r => r.status)")
    assert status == 200 and backend.seen[-1].header("X-Auth-Subject") == "alice"
    # ...and no script can read the session cookie.
    assert "authgate_session" not in page.evaluate("document.cookie")
    # Another browser's fetch without a session: 401, never a redirect.
    stranger = browser.new_context().new_page()
    stranger.goto(f"{home}/oauth2/logout")  # a page of the site (405: GET)
    answer = stranger.evaluate(
        "fetch('/api/orders', {redirect: 'manual'})"
        ".then(r => [r.status, r.headers.get('www-authenticate')])"
    )
    assert answer[0] == 401 and "Bearer" in answer[1]
    # Signing out: a form on the site posts to the logout; the provider asks
    # whether to end its session too, then sends the browser home.
    page.goto(f"{home}/app/settings")
    page.evaluate(
        "() => { const f = document.createElement('form'); f.method = 'post';"
        " f.action = '/oauth2/logout'; document.body.appendChild(f); f.submit(); }"
    )
    page.wait_for_url(f"{op.issuer}/session/end**")
    page.click("button[value=yes]")
    page.wait_for_url(f"{home}/")
    assert not [c for c in context.cookies(home) if c["name"].startswith("authgate_session")]
    page.goto(f"{home}/app/orders")
    assert page.url.startswith(f"{op.issuer}/interaction/")  # signed out there too
    context.close()
