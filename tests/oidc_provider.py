"""A real OpenID provider for the tests: panva's oidc-provider (OpenID
Certified, from the npm registry; `make test` runs `npm ci` in tests/oidc/),
started with Node.js on a free loopback port, configured by
tests/oidc/provider.mjs from the settings a test gives: its clients, its
accounts' claims, its token lifetimes.

Its login form is the library's development one: any login name signs in
(the password field is ignored), then a consent form. `Browser` below fills
both as a browser would: it follows redirects, keeps cookies per host, and
submits the forms it is shown.

Tests can stop the provider (as an outage) and start it again on the same port.
"""

from __future__ import annotations

import html.parser
import http.client
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest

from redis_server import free_port

HERE = Path(__file__).parent / "oidc"
MISSING = (
    "the test OpenID provider is not installed; `make test` installs it "
    "(Node.js and npm, then `npm ci --prefix tests/oidc`)"
)


class OpenIDProvider:
    """One oidc-provider process. `clients`: oidc-provider client metadata;
    `accounts`: login name -> extra claims (email, groups, ...); `ttl`:
    lifetimes in seconds by oidc-provider model name (AccessToken,
    ClientCredentials, ...); `scopes`: scope values beyond openid and
    offline_access that clients may ask for (a client_credentials grant asks
    for these); `token_claims`: account or client id -> claims added to the
    access tokens it issues (introspection answers carry them)."""

    def __init__(
        self,
        clients: list[dict[str, Any]],
        accounts: dict[str, dict[str, Any]] | None = None,
        ttl: dict[str, int] | None = None,
        id_token_claims: bool = True,
        scopes: list[str] | None = None,
        port: int | None = None,
        token_claims: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        node = shutil.which("node")
        if node is None or not (HERE / "node_modules" / "oidc-provider").is_dir():
            pytest.fail(MISSING, pytrace=False)
        self.node = node
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="authgate-oidc-"))
        self.settings = self.dir / "settings.json"
        self.settings.write_text(
            json.dumps(
                {
                    "port": self.port,
                    "clients": clients,
                    "accounts": accounts or {},
                    "ttl": ttl or {},
                    "idTokenClaims": id_token_claims,
                    "scopes": scopes or [],
                    "tokenClaims": token_claims or {},
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start (again, on the same port) and wait until discovery answers."""
        if self.running:
            return
        log = open(self.dir / "provider.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(
            [self.node, str(HERE / "provider.mjs"), str(self.settings)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=HERE,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                status, _, _ = request("GET", f"{self.issuer}/.well-known/openid-configuration")
                if status == 200:
                    return
            except OSError:
                time.sleep(0.05)
        tail = (self.dir / "provider.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"the OpenID provider did not start:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def metadata(self) -> dict[str, Any]:
        status, _, body = request("GET", f"{self.issuer}/.well-known/openid-configuration")
        assert status == 200, status
        data: dict[str, Any] = json.loads(body)
        return data

    def introspections(self) -> int:
        """How many introspection requests the provider has served (since it
        last started)."""
        status, _, body = request("GET", f"{self.issuer}/_test/counts")
        assert status == 200, status
        return int(json.loads(body)["introspection"])

    def slow_introspection(self, ms: int) -> None:
        """Answer each introspection request `ms` milliseconds late (0: at once)."""
        status, _, _ = request("GET", f"{self.issuer}/_test/delay?ms={int(ms)}")
        assert status == 200, status

    def __enter__(self) -> OpenIDProvider:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def request(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTP request, no redirects followed: (status, headers, body)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


class _Forms(html.parser.HTMLParser):
    """The forms of a page: (action, method, {name: value}) each."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), a.get("method", "get").upper(), {}))
        elif tag in ("input", "button") and self.forms and a.get("name"):
            if a.get("type") in ("submit",) and tag == "button":
                return
            self.forms[-1][2].setdefault(a["name"], a.get("value", ""))


class Browser:
    """Enough of a browser for a login: a cookie jar per host (path and
    expiry ignored, Secure cookies sent only over https), redirects followed
    (303 and 302 as GET), `Sec-Fetch-Mode: navigate` and `Accept: text/html`
    on page loads, the pages' forms submitted on request."""

    def __init__(self) -> None:
        self.cookies: dict[str, dict[str, str]] = {}
        self.history: list[tuple[str, str, int]] = []  # (method, url, status)
        # A URL prefix not to load (a redirect there ends `fetch` with status 0
        # and that URL): to keep an authorization response for later.
        self.stop_at: str | None = None

    def _cookie_header(self, url: str) -> str:
        host = urllib.parse.urlsplit(url).netloc
        jar = self.cookies.get(host, {})
        return "; ".join(f"{k}={v}" for k, v in jar.items())

    def _keep_cookies(self, url: str, headers: http.client.HTTPMessage) -> None:
        host = urllib.parse.urlsplit(url).netloc
        jar = self.cookies.setdefault(host, {})
        for value in headers.get_all("Set-Cookie") or []:
            c: SimpleCookie = SimpleCookie()
            c.load(value)
            for name, morsel in c.items():
                expired = morsel["max-age"] == "0" or (
                    morsel["expires"] and "1970" in morsel["expires"]
                )
                if expired or morsel.value == "":
                    jar.pop(name, None)
                else:
                    jar[name] = morsel.value

    def fetch(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        follow: bool = True,
        limit: int = 20,
    ) -> tuple[int, http.client.HTTPMessage, bytes, str]:
        """(status, headers, body, final url)."""
        for _ in range(limit):
            if self.stop_at is not None and url.startswith(self.stop_at):
                return 0, http.client.HTTPMessage(), b"", url
            h = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate", **(headers or {})}
            cookie = self._cookie_header(url)
            if cookie:
                h["Cookie"] = cookie
            if body is not None:
                h.setdefault("Content-Type", "application/x-www-form-urlencoded")
            status, rh, data = request(method, url, h, body)
            self.history.append((method, url, status))
            self._keep_cookies(url, rh)
            location = rh.get("Location")
            if not follow or status not in (301, 302, 303, 307, 308) or not location:
                return status, rh, data, url
            url = urllib.parse.urljoin(url, location)
            if status in (301, 302, 303):
                method, body, headers = "GET", None, None
        raise AssertionError(f"more than {limit} redirects: {self.history[-limit:]}")

    def forms(self, page: bytes) -> list[tuple[str, str, dict[str, str]]]:
        parser = _Forms()
        parser.feed(page.decode("utf-8", "replace"))
        return parser.forms

    def submit(
        self, page_url: str, page: bytes, fields: dict[str, str] | None = None, index: int = 0
    ) -> tuple[int, http.client.HTTPMessage, bytes, str]:
        """Submit the page's form number `index` with `fields` filled in."""
        action, method, values = self.forms(page)[index]
        values = {**values, **(fields or {})}
        url = urllib.parse.urljoin(page_url, action)
        data = urllib.parse.urlencode(values).encode()
        return self.fetch(method, url, body=data if method == "POST" else None)

    def log_in(
        self, url: str, login: str, password: str = "irrelevant"
    ) -> tuple[int, http.client.HTTPMessage, bytes, str]:
        """Load `url`, sign in at the provider's form, consent if asked:
        the final answer after the redirects back."""
        status, headers, page, where = self.fetch("GET", url)
        for _ in range(3):
            forms = self.forms(page) if status == 200 else []
            if not forms or "/interaction/" not in where:
                break
            fields = {"login": login, "password": password} if "login" in forms[0][2] else {}
            status, headers, page, where = self.submit(where, page, fields)
        return status, headers, page, where


def provider_iter(**kwargs: Any) -> Iterator[OpenIDProvider]:
    """For fixtures: `yield from provider_iter(clients=[...])`."""
    with OpenIDProvider(**kwargs) as op:
        yield op
