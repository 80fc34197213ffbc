"""Black-box adversarial suite: a real gateway (policies/example.yaml) in front
of a recording backend, driven with raw bytes over real sockets.

Every case asserts the status AND what the backend saw: for a denial
`backend.seen == []`; for a forwarded request, that no forged identity or
X-Forwarded-For header reached the backend in any spelling. Several cases are
regressions for reported attacks.

The example policy has no `/api/public/**` rule; its `allow: anyone` route is
`/legacy/**`, so PUBLIC below is the path a forwarded anonymous request uses
(a rejection that came only from "no rule" would be a 404, not the 400 the
header and path cases assert).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from conftest import (
    EXAMPLE,
    REQUEST_SECONDS,
    Backend,
    RunningGateway,
    Seen,
    _handler,
    send,
    wait_until,
)
from ports import free_port

DEMO_KID = "demo-1"
ISSUER = "https://issuer.example"
AUDIENCE = "api"
PUBLIC = "/legacy/x"  # `allow: anyone` in the example policy
PROFILE = "/api/profile"  # `allow: authenticated`
ADMIN = "/api/admin/x"  # `allow: {role: admin}`
HOST = b"Host: api.test\r\n"

Token = Callable[..., str]


# --- fixtures: one backend and one gateway for the module ------------------------------
# The example policy limits each IP to 600/minute with a burst of 600; this
# module sends far fewer, so one gateway serves every test that does not need
# its own policy or upstream.


@pytest.fixture(scope="module")
def mod_backend() -> Iterator[Backend]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    b = Backend(server)
    server.RequestHandlerClass = _handler(b)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield b
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mod_gw(mod_backend: Backend) -> Iterator[RunningGateway]:
    g = RunningGateway(EXAMPLE, mod_backend.url, [])
    yield g
    g.stop()


@pytest.fixture
def be(mod_backend: Backend) -> Iterator[Backend]:
    """The module's backend, emptied for this test."""
    mod_backend.clear()
    mod_backend.answer = None
    yield mod_backend
    mod_backend.answer = None


@pytest.fixture
def gw(mod_gw: RunningGateway, be: Backend) -> RunningGateway:
    return mod_gw


# --- a raw-bytes HTTP client ----------------------------------------------------------


@dataclass
class Raw:
    data: bytes  # everything the gateway sent before closing (or the timeout)
    status_line: str
    status: int  # 0: no answer at all
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool = False  # the gateway closed the connection (not our timeout)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def statuses(self) -> list[int]:
        """Every status line in the stream (pipelined requests)."""
        return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", self.data)]


def _complete(data: bytes) -> bool:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    return m is not None and len(rest) >= int(m.group(1))


def _parse(data: bytes) -> Raw:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", status_line)
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    return Raw(data, status_line, int(m.group(1)) if m else 0, headers, body)


def raw_send(
    address: tuple[str, int],
    data: bytes,
    timeout: float = REQUEST_SECONDS,
    until_close: bool = False,
    sent: Callable[[], object] | None = None,
) -> Raw:
    """Send bytes exactly as given; read one answer (or, with until_close,
    everything until the gateway closes). Never waits more than `timeout`
    for it, counted once the bytes are sent and `sent()` has returned."""
    chunks: list[bytes] = []
    closed = False
    with socket.create_connection(address, timeout=REQUEST_SECONDS) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the gateway may answer and close before reading everything
        if sent is not None:
            sent()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                chunks.append(chunk)
                if not until_close and _complete(b"".join(chunks)):
                    break
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    r = _parse(b"".join(chunks))
    r.closed = closed
    return r


def request(
    target: str | bytes = PUBLIC,
    lines: Sequence[str | bytes] = (),
    method: str | bytes = b"GET",
    body: bytes = b"",
    close: bool = True,
) -> bytes:
    """One HTTP/1.1 request, header lines given raw (no CRLF needed)."""

    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else x.encode("utf-8", "surrogateescape")

    out = b(method) + b" " + b(target) + b" HTTP/1.1\r\n" + HOST
    for line in lines:
        out += b(line) + b"\r\n"
    if close:
        out += b"Connection: close\r\n"
    return out + b"\r\n" + body


# --- what the backend saw -----------------------------------------------------------------


def norm(name: str) -> str:
    """How a lenient backend (CGI, WSGI, PHP, a trimming parser) may read a name."""
    return name.strip().lower().replace("_", "-")


def identity_headers_seen(seen: Seen) -> list[tuple[str, str]]:
    return [(k, v) for k, v in seen.headers if norm(k).startswith("x-auth-")]


def assert_nothing_forged(seen: Seen, subject: str | None = None) -> None:
    """No client-made identity or X-Forwarded-For header in any spelling."""
    for k, _ in seen.headers:
        n = norm(k)
        if n.startswith("x-auth-") or n == "x-forwarded-for":
            assert k.lower() == n, f"a forged spelling reached the backend: {k!r}"
    if subject is None:
        assert identity_headers_seen(seen) == [], seen.headers
    else:
        assert seen.header_all("X-Auth-Subject") == [subject]
    assert seen.header_all("X-Forwarded-For") == ["127.0.0.1"], seen.headers


def assert_denied(r: Raw, status: int, backend: Backend) -> None:
    assert r.status == status, r.status_line or r.data[:200]
    assert backend.seen == []


def assert_safe(r: Raw, backend: Backend, *, allowed: Sequence[int] = ()) -> None:
    """Never 5xx, never forwarded when denied, nothing forged when forwarded."""
    assert r.status != 0, f"no answer: {r.data[:200]!r}"
    assert r.status < 500, r.status_line
    if allowed:
        assert r.status in allowed, r.status_line
    if r.status >= 300:
        assert backend.seen == []
    else:
        assert len(backend.seen) == 1
        assert_nothing_forged(backend.seen[0])


def assert_invalid_token(r: Raw | Any, backend: Backend) -> None:
    assert r.status == 401, getattr(r, "status_line", r.status)
    challenges = r.header_all("WWW-Authenticate")
    assert any('error="invalid_token"' in c for c in challenges), challenges
    assert backend.seen == []


# --- hand-made tokens: valid signatures, hostile content --------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rs256(key: Any, header: str, payload: str) -> str:
    """Sign header and payload JSON *text* exactly as given (RS256)."""
    signing_input = f"{b64url(header.encode())}.{b64url(payload.encode())}"
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(sig)}"


HEADER = '{"alg":"RS256","kid":"demo-1","typ":"JWT"}'


def claims(**raw: str | None) -> str:
    """A valid payload as JSON text; keyword values are raw JSON text (None drops)."""
    now = int(time.time())
    fields: dict[str, str | None] = {
        "iss": json.dumps(ISSUER),
        "sub": '"alice"',
        "aud": json.dumps(AUDIENCE),
        "iat": str(now),
        "exp": str(now + 3600),
        "jti": json.dumps(uuid.uuid4().hex),
    }
    fields.update(raw)
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items() if v is not None) + "}"


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_hand_signed_control_token_is_accepted(
    gw: RunningGateway, be: Backend, demo_key: Any
) -> None:
    """The signer below is right: without hostile content the token works."""
    r = raw_send(gw.address, request(PROFILE, [bearer(rs256(demo_key, HEADER, claims()))]))
    assert r.status == 200, r.status_line
    [seen] = be.seen
    assert seen.header_all("X-Auth-Subject") == ["alice"]


# --- 1-3: a second field smuggled inside a value ----------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"X-Note: a\rX-Auth-Subject: root", id="bare-cr"),
        pytest.param(b"X-Note: a\x00b", id="nul"),
        pytest.param(b"X-Note: a\r\n X-Auth-Subject: root", id="obs-fold-space"),
        pytest.param(b"X-Note: a\r\n\tX-Auth-Subject: root", id="obs-fold-tab"),
        pytest.param(b"X-Auth\rSubject: root", id="cr-in-name"),
        pytest.param(b"X-No\x00te: a", id="nul-in-name"),
    ],
)
def test_control_characters_in_a_field_are_400(
    gw: RunningGateway, be: Backend, line: bytes
) -> None:
    r = raw_send(gw.address, request(PUBLIC, [line]))
    assert_denied(r, 400, be)


def test_bare_cr_in_a_value_is_400(gw: RunningGateway, be: Backend) -> None:
    r = raw_send(gw.address, request(PUBLIC, [b"X-Note: a\rX-Auth-Subject: root"]))
    assert_denied(r, 400, be)


def test_nul_in_a_value_is_400(gw: RunningGateway, be: Backend) -> None:
    r = raw_send(gw.address, request(PUBLIC, [b"X-Note: a\x00b"]))
    assert_denied(r, 400, be)


def test_obs_fold_is_400(gw: RunningGateway, be: Backend) -> None:
    r = raw_send(gw.address, request(PUBLIC, [b"X-Note: a\r\n X-Auth-Subject: root"]))
    assert_denied(r, 400, be)


def test_control_characters_with_a_valid_token_are_400_too(
    gw: RunningGateway, be: Backend, token: Token
) -> None:
    t = token(sub="alice", roles=["user"])
    r = raw_send(gw.address, request(ADMIN, [bearer(t), b"X-Note: a\rX-Auth-Roles: admin"]))
    assert_denied(r, 400, be)


# --- 4: underscore spellings --------------------------------------------------------------


FORGED_UNDERSCORES = [
    "X_Auth_Subject: root",
    "X-Auth_Roles: admin",
    "x_auth_issuer: me",
    "X_AUTH_SCOPES: all",
    "X_Forwarded_For: 1.2.3.4",
]


def test_underscore_spellings_never_reach_the_backend(gw: RunningGateway, be: Backend) -> None:
    r = raw_send(gw.address, request(PUBLIC, FORGED_UNDERSCORES))
    assert r.status == 200, r.status_line
    [seen] = be.seen
    for k, _ in seen.headers:
        n = norm(k)
        assert not ("_" in k and (n.startswith("x-auth-") or n == "x-forwarded-for")), k
    assert_nothing_forged(seen)
    assert all("1.2.3.4" not in v for _, v in seen.headers)


def test_underscore_spellings_next_to_a_real_identity(
    gw: RunningGateway, be: Backend, token: Token
) -> None:
    t = token(sub="alice", roles=["user"])
    r = raw_send(gw.address, request(PROFILE, [bearer(t), *FORGED_UNDERSCORES]))
    assert r.status == 200, r.status_line
    [seen] = be.seen
    assert_nothing_forged(seen, subject="alice")
    assert seen.header_all("X-Auth-Roles") == ["user"]
    assert seen.header_all("X-Auth-Issuer") == [ISSUER]


# --- header names with spaces, colons, tabs ----------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"X-Auth-Subject : root", id="space-before-colon"),
        pytest.param(b"X-Auth-Subject\t: root", id="tab-before-colon"),
        # The first field after Host: an obs-fold of Host, which reverse mode
        # replaces before the gateway sees it; it must never be a field.
        pytest.param(b" X-Auth-Subject: root", id="fold-onto-host"),
        pytest.param(b"X Auth Subject: root", id="spaces-in-name"),
        pytest.param(b":X-Auth-Subject: root", id="leading-colon"),
        pytest.param(b"X-Auth-Subject:: root", id="double-colon"),
        pytest.param(b"X-Auth-Subject", id="no-colon"),
        pytest.param(b": root", id="empty-name"),
        # RFC 9112 §2.2 lets a recipient read a bare LF as a line end: then
        # this is two fields, and the forged one must still be dropped.
        pytest.param(b"X-Note: a\nX-Auth-Subject: root", id="bare-lf"),
        pytest.param(b"X-Note: a\nX_Auth_Subject: root", id="bare-lf-underscore"),
        pytest.param("X-Äuth-Subject: root".encode(), id="non-ascii-name"),
    ],
)
def test_odd_header_names_never_forge_an_identity(
    gw: RunningGateway, be: Backend, line: bytes
) -> None:
    r = raw_send(gw.address, request(PUBLIC, [line]))
    assert_safe(r, be, allowed=(200, 400))


def test_a_line_starting_with_a_space_after_a_field_is_400(gw: RunningGateway, be: Backend) -> None:
    r = raw_send(gw.address, request(PUBLIC, [b"X-Note: a", b" X-Auth-Subject: root"]))
    assert_denied(r, 400, be)


# --- 5: invalid UTF-8 in paths -------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/api/public/..%c0%af..%c0%afapi%c0%afadmin%c0%afx",
        "/api/public/%c0%ae%c0%ae/%c0%ae%c0%ae/api/admin/x",
        "/legacy/..%c0%af..%c0%afapi%c0%afadmin%c0%afx",
        "/legacy/%c0%ae%c0%ae/%c0%ae%c0%ae/api/admin/x",
        "/legacy/%e0%80%af",  # three-byte overlong "/"
        "/legacy/%ff",
        "/legacy/%c3",  # truncated sequence
        "/legacy/%ed%a0%80",  # a UTF-16 surrogate
        "/legacy/%f4%90%80%80",  # above U+10FFFF
    ],
)
def test_invalid_utf8_in_the_path_is_400(gw: RunningGateway, be: Backend, target: str) -> None:
    r = raw_send(gw.address, request(target))
    assert_denied(r, 400, be)


# --- other path shapes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(b"/legacy/x%00", id="pct-00"),
        pytest.param(b"/legacy/x%00/../../api/admin/x", id="pct-00-climb"),
        pytest.param("/legacy/\u00e9".encode(), id="raw-utf8"),
        pytest.param(b"/legacy/\xff", id="raw-ff"),
        pytest.param(b"/legacy/\xc0\xaf", id="raw-overlong"),
        pytest.param(b"/legacy/x\x7f", id="raw-del"),
        pytest.param(b"/legacy/" + b"../" * 10 + b"api/admin/x", id="climb"),
        pytest.param(b"/legacy/x#frag", id="fragment"),
    ],
)
def test_hostile_path_bytes_are_400(gw: RunningGateway, be: Backend, target: bytes) -> None:
    r = raw_send(gw.address, request(target))
    assert_denied(r, 400, be)


def test_ten_thousand_segments(gw: RunningGateway, be: Backend) -> None:
    target = "/legacy/" + "a/" * 10_000 + "x"
    r = raw_send(gw.address, request(target))
    assert_safe(r, be, allowed=(200, 400, 414, 431))
    if r.status == 200:
        assert be.seen[0].target == target


def test_ten_thousand_dot_segments_never_climb_into_admin(gw: RunningGateway, be: Backend) -> None:
    target = "/legacy/" + "a/../" * 10_000 + "../api/admin/x"
    r = raw_send(gw.address, request(target))
    # Judged as the backend reads it: /api/admin/x, which needs a token.
    assert r.status in (400, 401, 414, 431), r.status_line
    assert be.seen == []


@pytest.mark.parametrize(
    "target, expected",
    [
        ("http://evil.example/legacy/x", 200),
        ("http://evil.example:1234/api/admin/x", 401),
        ("https://evil.example/api/profile", 401),
        ("http://127.0.0.1:1/legacy/x", 200),
    ],
)
def test_absolute_form_to_another_host_goes_to_the_backend_or_nowhere(
    gw: RunningGateway, be: Backend, target: str, expected: int
) -> None:
    r = raw_send(gw.address, request(target))
    assert r.status == expected, r.status_line
    if expected == 200:
        [seen] = be.seen
        assert seen.target == "/legacy/x"
        assert "evil" not in (seen.header("Host") or "")
        assert_nothing_forged(seen)
    else:
        assert be.seen == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", id="connect"
        ),
        pytest.param(
            b"OPTIONS * HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n", id="asterisk"
        ),
        pytest.param(
            b"get /api/admin/x HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
            id="lowercase-method",
        ),
        pytest.param(
            b"GET\t/api/admin/x HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
            id="tab-separator",
        ),
        pytest.param(
            b"GET  /api/admin/x HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
            id="double-space",
        ),
        pytest.param(
            b"GET /api/admin/x HTTP/1.1 junk\r\nHost: api.test\r\nConnection: close\r\n\r\n",
            id="trailing-junk",
        ),
        pytest.param(
            b"GET /api/admin/x\r\nHost: api.test\r\nConnection: close\r\n\r\n", id="no-version"
        ),
        pytest.param(
            b"GET /api/admin/x HTTP/9.9\r\nHost: api.test\r\nConnection: close\r\n\r\n",
            id="bad-version",
        ),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="h2-preface"),
    ],
)
def test_odd_request_lines_never_reach_the_backend_unjudged(
    gw: RunningGateway, be: Backend, data: bytes
) -> None:
    r = raw_send(gw.address, data, until_close=True)
    assert r.status < 500, r.status_line
    assert be.seen == []


# --- 9: a leading empty line -------------------------------------------------------------------


def test_leading_crlf_before_the_request_line_is_answered(gw: RunningGateway, be: Backend) -> None:
    """RFC 9112 §2.2: a server SHOULD ignore at least one empty line before
    the request line. Sent in one packet; the test fails (not hangs) after
    REQUEST_SECONDS."""
    data = b"\r\n" + request(PUBLIC)
    started = time.monotonic()
    r = raw_send(gw.address, data)
    assert r.status == 200, f"after {time.monotonic() - started:.1f}s: {r.data[:200]!r}"
    [seen] = be.seen
    assert seen.target == PUBLIC
    assert_nothing_forged(seen)


# --- framing and smuggling ------------------------------------------------------------------


SMUGGLED = b"GET /api/admin/x HTTP/1.1\r\nHost: api.test\r\nX-Auth-Subject: root\r\n\r\n"
LAST = b"GET /legacy/end HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"


def _smuggle(lines: Sequence[bytes], body: bytes) -> bytes:
    return request(b"/legacy/first", lines, b"POST", body, close=False) + LAST


def _assert_no_smuggling(r: Raw, be: Backend) -> None:
    # A framing error may be answered 400 or end the connection at once;
    # either way the gateway must not leave the client hanging.
    assert r.statuses or r.closed, f"no answer and no close: {r.data[:200]!r}"
    assert all(s < 500 for s in r.statuses), r.statuses
    targets = [s.target for s in be.seen]
    assert not any("admin" in t for t in targets), targets
    assert set(targets) <= {"/legacy/first", "/legacy/end"}, targets
    for seen in be.seen:
        assert_nothing_forged(seen)
    if not r.statuses or r.statuses[0] >= 400:
        assert "/legacy/first" not in targets


@pytest.mark.parametrize(
    "lines, body",
    [
        pytest.param([b"Content-Length: 4", b"Content-Length: 40"], b"abcd" + SMUGGLED, id="cl-cl"),
        pytest.param([b"Content-Length: 4, 40"], b"abcd" + SMUGGLED, id="cl-list"),
        pytest.param([b"Content-Length: +4"], b"abcd" + SMUGGLED, id="cl-plus"),
        pytest.param([b"Content-Length: -1"], SMUGGLED, id="cl-negative"),
        pytest.param([b"Content-Length: 0x4"], b"abcd" + SMUGGLED, id="cl-hex"),
        pytest.param(
            [b"Content-Length: 4", b"Transfer-Encoding: chunked"],
            b"0\r\n\r\n" + SMUGGLED,
            id="cl-te",
        ),
        pytest.param(
            [b"Transfer-Encoding: chunked", b"Content-Length: 40"],
            b"0\r\n\r\n" + SMUGGLED,
            id="te-cl",
        ),
        pytest.param(
            [b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"],
            b"0\r\n\r\n" + SMUGGLED,
            id="te-te",
        ),
        pytest.param(
            [b"Transfer-Encoding: xchunked", b"Content-Length: 4"], b"abcd" + SMUGGLED, id="te-x"
        ),
        pytest.param(
            [b"Transfer-Encoding : chunked", b"Content-Length: 4"],
            b"abcd" + SMUGGLED,
            id="te-space",
        ),
        pytest.param(
            [b"Transfer-Encoding: chunked, identity"], b"0\r\n\r\n" + SMUGGLED, id="te-list"
        ),
        pytest.param(
            [b"Transfer-Encoding: chunked"],
            b'4;ext="\r\n"\r\nabcd\r\n0\r\n\r\n' + SMUGGLED,
            id="chunk-ext",
        ),
        pytest.param(
            [b"Transfer-Encoding: chunked"], b"4\nabcd\n0\n\n" + SMUGGLED, id="chunk-bare-lf"
        ),
    ],
)
def test_framing_tricks_never_smuggle_a_request(
    gw: RunningGateway, be: Backend, lines: list[bytes], body: bytes
) -> None:
    r = raw_send(gw.address, _smuggle(lines, body), until_close=True)
    _assert_no_smuggling(r, be)


def test_a_chunk_of_2_to_the_68_bytes_forwards_nothing(gw: RunningGateway, be: Backend) -> None:
    """The body can never complete; nothing may reach the backend meanwhile:
    for 2 s once the gateway has judged the request (and is reading its body)."""
    data = _smuggle([b"Transfer-Encoding: chunked"], b"ffffffffffffffff1\r\nabcd\r\n0\r\n\r\n")
    before = gw.addon.decided

    def judged() -> None:
        wait_until(lambda: gw.addon.decided > before, REQUEST_SECONDS, what="the request judged")

    r = raw_send(gw.address, data, timeout=2, until_close=True, sent=judged)
    assert all(s < 500 for s in r.statuses), r.statuses
    assert be.seen == []


def test_pipelined_requests_are_each_judged(gw: RunningGateway, be: Backend) -> None:
    data = request(b"/legacy/first", close=False) + SMUGGLED + LAST
    r = raw_send(gw.address, data, until_close=True)
    assert r.statuses == [200, 401, 200], r.statuses
    assert [s.target for s in be.seen] == ["/legacy/first", "/legacy/end"]
    for seen in be.seen:
        assert_nothing_forged(seen)


# --- size ----------------------------------------------------------------------------------


@pytest.fixture
def lenient_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording backend (http.server) refuses lines over 64 KiB and more
    than 100 fields with its own 431; lift that, so that what the gateway
    forwards is what the backend records."""
    monkeypatch.setattr(http.client, "_MAXLINE", 1 << 20)
    monkeypatch.setattr(http.client, "_MAXHEADERS", 10_000)


def _gateway_made(r: Raw) -> bool:
    return r.header("Server") is None or "BaseHTTP" not in (r.header("Server") or "")


@pytest.mark.usefixtures("lenient_backend")
def test_a_64_kb_header_value(gw: RunningGateway, be: Backend) -> None:
    value = "a" * 65536
    r = raw_send(gw.address, request(PUBLIC, [f"X-Note: {value}"]))
    assert_safe(r, be, allowed=(200, 400, 431))
    if r.status == 200:
        assert be.seen[0].header("X-Note") == value
    else:
        assert _gateway_made(r)


@pytest.mark.usefixtures("lenient_backend")
def test_five_hundred_headers(gw: RunningGateway, be: Backend) -> None:
    lines = [f"X-H-{i}: v{i}" for i in range(500)] + ["X-Auth-Subject: root"] * 10
    r = raw_send(gw.address, request(PUBLIC, lines))
    assert_safe(r, be, allowed=(200, 400, 431))
    if r.status == 200:
        assert len([k for k, _ in be.seen[0].headers if k.startswith("X-H-")]) == 500
    else:
        assert _gateway_made(r)


def test_many_forwarded_for_fields_are_one_chain(gw: RunningGateway, be: Backend) -> None:
    lines = [f"X-Forwarded-For: 10.0.0.{i}" for i in range(200)]
    r = raw_send(gw.address, request(PUBLIC, lines))
    assert r.status == 200, r.status_line
    [seen] = be.seen
    [chain] = seen.header_all("X-Forwarded-For")
    assert chain.endswith(", 127.0.0.1")


# --- duplicates that must be one -------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param([b"Host: evil.example"], id="second-host"),
        pytest.param([b"X-Auth-Subject: root", b"x-auth-subject: root2"], id="two-forged"),
    ],
)
def test_duplicate_fields_never_forge(gw: RunningGateway, be: Backend, lines: list[bytes]) -> None:
    r = raw_send(gw.address, request(PUBLIC, lines))
    assert_safe(r, be, allowed=(200, 400))


# --- authorization shapes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"Authorization: Bearer", id="bearer-no-token"),
        pytest.param(b"Authorization: Bearer ", id="bearer-space"),
        pytest.param(b"Authorization: Bearer    ", id="bearer-spaces"),
        pytest.param(b"Authorization:", id="empty"),
        pytest.param(b"Authorization: Bearer \t", id="bearer-tab"),
    ],
)
def test_empty_bearer_is_refused(gw: RunningGateway, be: Backend, line: bytes) -> None:
    r = raw_send(gw.address, request(PROFILE, [line]))
    assert r.status in (400, 401), r.status_line
    assert be.seen == []


def _dots(token: Token) -> list[str]:
    t = token()
    return [t + ".", t + ".x", "a.b.c.d", "a.b.c.d.e", "....", "..", t.replace(".", "..", 1)]


def test_tokens_with_the_wrong_number_of_dots_are_invalid(
    gw: RunningGateway, be: Backend, token: Token
) -> None:
    for t in _dots(token):
        r = raw_send(gw.address, request(PROFILE, [bearer(t)]))
        assert_invalid_token(r, be)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_invalid(gw: RunningGateway, be: Backend, alg: str) -> None:
    header = json.dumps({"alg": alg, "kid": DEMO_KID, "typ": "JWT"})
    payload = claims(roles='["admin"]')
    for sig in ("", "AAAA"):
        t = f"{b64url(header.encode())}.{b64url(payload.encode())}.{sig}"
        r = raw_send(gw.address, request(ADMIN, [bearer(t)]))
        assert_invalid_token(r, be)


def _public_secrets(demo_key: Any) -> list[bytes]:
    pub = demo_key.public_key()
    spki = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pkcs1 = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwks = (Path(EXAMPLE).parent / "keys" / "jwks.json").read_bytes()
    return [spki, spki.strip(), pkcs1, der, jwks]


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_with_the_rsa_public_key_is_invalid(
    gw: RunningGateway, be: Backend, demo_key: Any, alg: str
) -> None:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    for kid in (DEMO_KID, None):
        header = json.dumps({"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})})
        payload = claims(roles='["admin"]')
        signing_input = f"{b64url(header.encode())}.{b64url(payload.encode())}"
        for secret in _public_secrets(demo_key):
            sig = hmac.new(secret, signing_input.encode(), digest).digest()
            r = raw_send(gw.address, request(ADMIN, [bearer(f"{signing_input}.{b64url(sig)}")]))
            assert_invalid_token(r, be)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param('{"alg":"RS256","kid":"demo-1","crit":["x-bank"],"x-bank":1}', id="unknown"),
        pytest.param('{"alg":"RS256","kid":"demo-1","crit":[]}', id="empty"),
        pytest.param('{"alg":"RS256","kid":"demo-1","crit":"x-bank","x-bank":1}', id="not-a-list"),
        pytest.param('{"alg":"RS256","kid":"demo-1","crit":["x-bank"]}', id="absent-param"),
        pytest.param('{"alg":"RS256","kid":"demo-1","crit":["b64"],"b64":false}', id="b64-false"),
    ],
)
def test_crit_header_is_invalid(
    gw: RunningGateway, be: Backend, demo_key: Any, header: str
) -> None:
    """RFC 7515 §4.1.11: a recipient that does not understand a critical
    extension MUST reject the token."""
    r = raw_send(gw.address, request(PROFILE, [bearer(rs256(demo_key, header, claims()))]))
    assert_invalid_token(r, be)


@pytest.mark.parametrize(
    "kid",
    [
        "../demo-1",
        "../../../../../../etc/passwd",
        "demo-1/../demo-1",
        "keys/../demo-1",
        "..\\demo-1",
        "demo-1\u0000",
        "demo-1 ",
        "DEMO-1",
        "x" * 10_000,
    ],
)
def test_kid_tricks_are_invalid(gw: RunningGateway, be: Backend, demo_key: Any, kid: str) -> None:
    header = json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"})
    r = raw_send(gw.address, request(PROFILE, [bearer(rs256(demo_key, header, claims()))]))
    assert_invalid_token(r, be)


@pytest.mark.parametrize(
    "kid",
    ['{"$ne":null}', "1", "null", '["demo-1"]', "true", '""'],
)
def test_kid_of_another_type_is_never_5xx(
    gw: RunningGateway, be: Backend, demo_key: Any, kid: str
) -> None:
    header = '{"alg":"RS256","typ":"JWT","kid":' + kid + "}"
    r = raw_send(gw.address, request(PROFILE, [bearer(rs256(demo_key, header, claims()))]))
    # A sole key serves a token without a kid (null); any other type is invalid.
    if kid == "null":
        assert r.status in (200, 401), r.status_line
    else:
        assert_invalid_token(r, be)


@pytest.mark.parametrize("name", ["jku", "x5u"])
def test_key_urls_in_the_token_are_ignored(
    gw: RunningGateway, be: Backend, demo_key: Any, attacker_key: Any, name: str
) -> None:
    """The policy's keys judge the token, never a key the token points to: the
    attacker's key set is served on the backend, which must see no fetch."""
    attacker_jwks = json.dumps(
        {
            "keys": [
                {**json.loads(_jwk(attacker_key)), "kid": DEMO_KID, "alg": "RS256", "use": "sig"}
            ]
        }
    ).encode()
    be.answer = lambda seen: (
        (200, [("Content-Type", "application/json")], attacker_jwks)
        if seen.target.startswith("/jwks")
        else None
    )
    url = be.url + "/jwks.json"
    header = json.dumps({"alg": "RS256", "kid": DEMO_KID, "typ": "JWT", name: url})
    forged = rs256(attacker_key, header, claims(roles='["admin"]'))
    r = raw_send(gw.address, request(ADMIN, [bearer(forged)]))
    assert_invalid_token(r, be)  # no fetch, no forward
    genuine = rs256(demo_key, header, claims(sub='"alice"'))
    r = raw_send(gw.address, request(PROFILE, [bearer(genuine)]))
    assert r.status == 200, r.status_line
    assert [s.target for s in be.seen] == [PROFILE]
    assert_nothing_forged(be.seen[0], subject="alice")


def _jwk(key: Any) -> str:
    return jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())


def test_embedded_jwk_is_ignored(gw: RunningGateway, be: Backend, attacker_key: Any) -> None:
    header = json.dumps(
        {"alg": "RS256", "kid": DEMO_KID, "typ": "JWT", "jwk": json.loads(_jwk(attacker_key))}
    )
    r = raw_send(
        gw.address, request(ADMIN, [bearer(rs256(attacker_key, header, claims(roles='["admin"]')))])
    )
    assert_invalid_token(r, be)


# --- 6: hostile JSON inside a validly signed token ---------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [10_000, 3_000, 40])
@pytest.mark.parametrize("where", ["header", "payload"])
def test_deeply_nested_token_json_is_invalid(
    gw: RunningGateway, be: Backend, demo_key: Any, where: str, depth: int
) -> None:
    """10,000 levels exceeds the token length bound; 3,000 fits under it and
    exceeds Python's recursion limit; 40 only the gateway's depth bound."""
    header, payload = HEADER, claims()
    if where == "header":
        header = HEADER[:-1] + ',"x":' + _nested(depth) + "}"
    else:
        payload = claims(x=_nested(depth))
    r = raw_send(gw.address, request(PROFILE, [bearer(rs256(demo_key, header, payload))]))
    assert_invalid_token(r, be)


def test_a_100_kb_token_is_refused_never_5xx(
    gw: RunningGateway, be: Backend, demo_key: Any
) -> None:
    t = rs256(demo_key, HEADER, claims(pad=json.dumps("a" * 100_000)))
    assert len(t) > 100_000
    r = raw_send(gw.address, request(PROFILE, [bearer(t)]))
    assert r.status in (400, 401, 431), r.status_line
    assert be.seen == []


# --- 7, 8: time claims that are not numbers ---------------------------------------------------


BIG = "1" + "0" * 400


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(BIG, id="10^400"),
        pytest.param("1e400", id="1e400"),
        pytest.param("1" + "0" * 5000, id="5000-digits"),
    ],
)
def test_exp_out_of_range_is_invalid(
    gw: RunningGateway, be: Backend, demo_key: Any, raw: str
) -> None:
    r = raw_send(gw.address, request(PROFILE, [bearer(rs256(demo_key, HEADER, claims(exp=raw)))]))
    assert_invalid_token(r, be)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_non_finite_time_claims_are_invalid(
    gw: RunningGateway, be: Backend, demo_key: Any, claim: str, value: str
) -> None:
    t = rs256(demo_key, HEADER, claims(**{claim: value}))
    r = raw_send(gw.address, request(PROFILE, [bearer(t)]))
    assert_invalid_token(r, be)


@pytest.mark.parametrize(
    "over",
    [
        pytest.param({"exp": '"9999999999"'}, id="exp-string"),
        pytest.param({"exp": "true"}, id="exp-true"),
        pytest.param({"exp": "[9999999999]"}, id="exp-list"),
        pytest.param({"exp": "{}"}, id="exp-object"),
        pytest.param({"nbf": '"0"'}, id="nbf-string"),
        pytest.param({"nbf": "-" + BIG}, id="nbf-minus-10^400"),
        pytest.param({"iat": BIG}, id="iat-10^400"),
        pytest.param({"sub": None}, id="no-sub"),
        pytest.param({"sub": "null"}, id="sub-null"),
        pytest.param({"sub": "{}"}, id="sub-object"),
        pytest.param({"sub": '""'}, id="sub-empty"),
        pytest.param({"sub": '"alice\\r\\nX-Auth-Roles: admin"'}, id="sub-crlf"),
        pytest.param({"sub": '"alice\\u0000"'}, id="sub-nul"),
        pytest.param({"roles": '"user,admin"'}, id="role-with-comma"),
        pytest.param({"roles": '["user,admin"]'}, id="role-list-with-comma"),
        pytest.param({"roles": '["user\\r\\nX-Auth-Subject: root"]'}, id="role-crlf"),
        pytest.param({"roles": "[1,2]"}, id="roles-numbers"),
        pytest.param({"roles": '{"admin":true}'}, id="roles-object"),
        pytest.param({"scope": '"a\\u0000b"'}, id="scope-nul"),
        pytest.param({"scope": '"reports:write,admin"'}, id="scope-comma"),
        pytest.param({"aud": "{}"}, id="aud-object"),
        pytest.param({"iss": '["https://issuer.example"]'}, id="iss-list"),
    ],
)
def test_malformed_claims_are_invalid(
    gw: RunningGateway, be: Backend, demo_key: Any, over: dict[str, str | None]
) -> None:
    t = rs256(demo_key, HEADER, claims(**over))
    r = raw_send(gw.address, request(PROFILE, [bearer(t)]))
    assert_invalid_token(r, be)


@pytest.mark.parametrize(
    "segment",
    [
        pytest.param("[]", id="array"),
        pytest.param('"x"', id="string"),
        pytest.param("1", id="number"),
        pytest.param("null", id="null"),
        pytest.param('{"alg":"RS256","kid":"demo-1"', id="truncated"),
        pytest.param('{"alg":"RS256","alg":"none","kid":"demo-1"}', id="duplicate-alg"),
        pytest.param('{"alg":["RS256"],"kid":"demo-1"}', id="alg-list"),
        pytest.param('{"alg":"RS256","kid":"demo-1","x":NaN}', id="nan-in-header"),
    ],
)
def test_malformed_headers_are_invalid(
    gw: RunningGateway, be: Backend, demo_key: Any, segment: str
) -> None:
    r = raw_send(gw.address, request(PROFILE, [bearer(rs256(demo_key, segment, claims()))]))
    assert_invalid_token(r, be)


def test_a_role_with_a_comma_never_becomes_two_roles(
    gw: RunningGateway, be: Backend, token: Token
) -> None:
    """X-Auth-Roles is a comma-separated list: a role "user,admin" must not
    reach the backend as the two roles user and admin."""
    r = raw_send(gw.address, request(PROFILE, [bearer(token(roles=["user,admin"]))]))
    if r.status == 200:
        [seen] = be.seen
        assert "admin" not in (seen.header("X-Auth-Roles") or "").split(",")
    else:
        assert_invalid_token(r, be)


# --- 10: the 429 status line ----------------------------------------------------------------


def test_429_status_line_has_its_reason_phrase(
    start_gateway: Callable[..., RunningGateway], backend: Backend, tmp_path: Path
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\n"
        "limits: [{name: tight, key: ip, rate: 1/minute}]\n"
        "rules:\n"
        "  - {name: all, match: {path: /**}, allow: anyone}\n"
    )
    g = start_gateway(policy)
    assert raw_send(g.address, request("/x")).status == 200
    r = raw_send(g.address, request("/x"))
    assert r.status_line == "HTTP/1.1 429 Too Many Requests"
    assert r.header("Retry-After") is not None
    assert len(backend.seen) == 1


# --- 11: the backend is down -------------------------------------------------------------------


def _closed_port() -> int:
    """A port nothing listens on (below the ephemeral range: no connection takes it)."""
    return free_port()


@pytest.fixture(scope="module")
def dead_gw() -> Iterator[tuple[RunningGateway, int]]:
    port = _closed_port()
    g = RunningGateway(EXAMPLE, f"http://127.0.0.1:{port}", [])
    try:
        yield g, port
    finally:
        g.stop()


@pytest.mark.parametrize("accept", [None, "application/json", "*/*"])
def test_backend_down_is_a_clean_502(
    dead_gw: tuple[RunningGateway, int], accept: str | None
) -> None:
    g, port = dead_gw
    lines = [f"Accept: {accept}"] if accept else []
    r = raw_send(g.address, request(PUBLIC, lines))
    assert r.status == 502, r.status_line
    assert r.header("Cache-Control") == "no-store"
    assert (r.header("Content-Type") or "").split(";")[0] == "application/problem+json"
    for leak in (b"127.0.0.1", str(port).encode(), b"Errno", b"errno", b"mitmproxy", b"Traceback"):
        assert leak not in r.body, r.body[:300]
    assert not any("mitmproxy" in v.lower() for k, v in r.headers if k.lower() == "server")
    assert json.loads(r.body)["status"] == 502


def test_backend_down_html_leaks_nothing(dead_gw: tuple[RunningGateway, int]) -> None:
    g, port = dead_gw
    r = raw_send(g.address, request(PUBLIC, ["Accept: text/html"]))
    assert r.status == 502, r.status_line
    assert r.header("Cache-Control") == "no-store"
    for leak in (b"127.0.0.1", str(port).encode(), b"Errno", b"mitmproxy"):
        assert leak not in r.body, r.body[:300]
    assert not any("mitmproxy" in v.lower() for k, v in r.headers if k.lower() == "server")


def test_backend_down_still_judges_first(dead_gw: tuple[RunningGateway, int]) -> None:
    g, _ = dead_gw
    r = send(g.address, "GET", ADMIN)
    assert r.status == 401


# --- rules on host (keep_host_header=true) -------------------------------------------------
# With host rules the gateway judges the Host field, so the backend must read
# the same one: RFC 9112 §3.2 requires 400 for a missing Host, more than one,
# or an invalid value.

HOST_POLICY = (
    "version: 1\n"
    "rules:\n"
    "  - {name: admin-host, match: {path: /**, host: admin.test}, allow: {role: admin}}\n"
    "  - {name: rest, match: {path: /**}, allow: anyone}\n"
)
PLAIN_POLICY = "version: 1\nrules:\n  - {name: rest, match: {path: /**}, allow: anyone}\n"


def test_a_host_policy_starts_with_keep_host_header(
    start_gateway: Callable[..., RunningGateway], backend: Backend, tmp_path: Path
) -> None:
    """docs/policy.md: host rules need `--set keep_host_header=true`. The
    runner applies the policy before the --set options, so it refuses."""
    policy = tmp_path / "host.yaml"
    policy.write_text(HOST_POLICY)
    g = start_gateway(policy, "keep_host_header=true")
    r = raw_send(g.address, b"GET /x HTTP/1.1\r\nHost: admin.test\r\nConnection: close\r\n\r\n")
    assert r.status == 403, r.status_line
    assert backend.seen == []


@pytest.fixture(scope="module")
def host_gw(
    mod_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A gateway with host rules. Started on a host-free policy and switched,
    which works around the start-up order that test above reports."""
    folder = tmp_path_factory.mktemp("host")
    (folder / "plain.yaml").write_text(PLAIN_POLICY)
    (folder / "host.yaml").write_text(HOST_POLICY)
    g = RunningGateway(folder / "plain.yaml", mod_backend.url, ["keep_host_header=true"])
    try:
        assert g.loop is not None

        async def switch() -> None:
            g.master.options.update(authgate_policy=str(folder / "host.yaml"))

        asyncio.run_coroutine_threadsafe(switch(), g.loop).result(REQUEST_SECONDS)
        assert g.addon.policy is not None and g.addon.policy.uses_host
        yield g
    finally:
        g.stop()


def _with_hosts(*hosts: bytes, target: bytes = b"/x") -> bytes:
    out = b"GET " + target + b" HTTP/1.1\r\n"
    for h in hosts:
        out += b"Host: " + h + b"\r\n"
    return out + b"Connection: close\r\n\r\n"


def test_host_rules_control(host_gw: RunningGateway, be: Backend) -> None:
    assert_denied(raw_send(host_gw.address, _with_hosts(b"admin.test")), 403, be)
    assert_denied(raw_send(host_gw.address, _with_hosts(b"ADMIN.test.:80")), 403, be)
    r = raw_send(host_gw.address, _with_hosts(b"other.test"))
    assert r.status == 200, r.status_line
    assert be.seen[0].header_all("Host") == ["other.test"]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_with_hosts(b"admin.test", b"other.test"), id="two-hosts"),
        pytest.param(_with_hosts(b"other.test", b"admin.test"), id="two-hosts-reversed"),
        pytest.param(_with_hosts(b"admin.test, other.test"), id="host-list"),
        pytest.param(_with_hosts(b"x@admin.test"), id="userinfo"),
        pytest.param(_with_hosts(b"admin.test other.test"), id="space"),
        pytest.param(_with_hosts(b"admin.test\\"), id="backslash"),
        pytest.param(_with_hosts(), id="missing"),
    ],
)
def test_ambiguous_host_is_400(host_gw: RunningGateway, be: Backend, data: bytes) -> None:
    r = raw_send(host_gw.address, data)
    assert r.status in (400, 403), f"{r.status_line}; backend saw {[s.headers for s in be.seen]}"
    assert be.seen == []


def test_absolute_form_authority_and_host_agree(host_gw: RunningGateway, be: Backend) -> None:
    """The target's authority is dropped when forwarding; the Host judged is
    the Host the backend reads."""
    r = raw_send(host_gw.address, _with_hosts(b"admin.test", target=b"http://other.test/x"))
    assert_denied(r, 403, be)
    r = raw_send(host_gw.address, _with_hosts(b"other.test", target=b"http://admin.test/x"))
    assert r.status in (200, 400, 403), r.status_line
    if r.status == 200:
        assert be.seen[0].header_all("Host") == ["other.test"]
        assert be.seen[0].target == "/x"
    else:
        assert be.seen == []
