"""What the backend receives, field by field, through a real gateway: hop-by-hop
fields a client's `Connection` names, control characters, Host, the fields
legacy backends trust, credentials under `forward_credentials: false`, and
request ids. Each case sends raw bytes and asserts what the recording backend
saw (nothing, for a denial).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import test_hardening
from authgate.core.model import TRUSTED_BY_BACKENDS
from authgate.policy.load import load_policy
from authgate.policy.marks import PolicyError
from conftest import EXAMPLE, POLICIES, Backend, RunningGateway, Seen
from test_hardening import (
    ADMIN,
    PROFILE,
    PUBLIC,
    assert_denied,
    assert_nothing_forged,
    bearer,
    raw_send,
    request,
)

# The hardening suite's gateway (the example policy) and backend, one per module.
mod_backend = test_hardening.mod_backend
mod_gw = test_hardening.mod_gw
be = test_hardening.be
gw = test_hardening.gw

Token = Callable[..., str]
JWKS = POLICIES / "keys" / "jwks.json"


def _one(be: Backend) -> Seen:
    assert len(be.seen) == 1, [s.target for s in be.seen]
    return be.seen[0]


def _policy(tmp_path: Path, source: Path, extra: str = "", name: str = "p.yaml") -> Path:
    """A copy of an example policy with `extra` top-level keys and absolute key paths."""
    text = source.read_text().replace("jwks_file: keys/jwks.json", f"jwks_file: {JWKS}")
    text = text.replace("block_files: [blocklist.txt]", f"block_files: [{POLICIES}/blocklist.txt]")
    path = tmp_path / name
    path.write_text(text + "\n" + extra)
    return path


# mitmproxy routes every new connection through the addons of the master made
# last in the process (its global ctx), so the gateways of this module are
# used one after another: the example-policy gateway's tests first, then each
# gateway of its own with the tests that follow it.


# --- Connection: the fields it names end at the gateway (RFC 9110 §7.6.1) -----------------


def test_connection_cannot_name_the_gateways_identity_away(
    gw: RunningGateway, be: Backend, token: Token
) -> None:
    """A proxy between the gateway and the backend that follows the RFC deletes
    the fields a Connection names: the gateway's own must never be named."""
    data = request(
        PROFILE,
        [bearer(token(sub="alice")), "Connection: keep-alive, X-Auth-Subject, X-Forwarded-For"],
        close=False,
    )
    r = raw_send(gw.address, data)
    assert r.status == 200, r.status_line
    seen = _one(be)
    assert_nothing_forged(seen, "alice")
    for value in seen.header_all("Connection"):
        named = {o.strip().lower() for o in value.split(",")}
        assert named <= {"keep-alive", "close", "upgrade"}, value


@pytest.mark.parametrize(
    "connection",
    ["Connection: X-Note", "Connection: close, x-note", "Connection: X_Note", "Connection: x-note"],
)
def test_fields_a_connection_names_are_not_forwarded(
    gw: RunningGateway, be: Backend, connection: str
) -> None:
    r = raw_send(gw.address, request(PUBLIC, [connection, "X-Note: hop", "X-Kept: yes"]))
    assert r.status == 200, r.status_line
    seen = _one(be)
    assert seen.header_all("X-Note") == [], seen.headers
    assert seen.header_all("X-Kept") == ["yes"]


def test_hop_by_hop_fields_and_a_named_forwarded_for(gw: RunningGateway, be: Backend) -> None:
    lines = [
        "Connection: X-Forwarded-For",
        "X-Forwarded-For: 10.9.9.9",
        "Keep-Alive: timeout=5",
        "Proxy-Connection: keep-alive",
    ]
    r = raw_send(gw.address, request(PUBLIC, lines))
    assert r.status == 200, r.status_line
    seen = _one(be)
    assert seen.header_all("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header_all("Keep-Alive") == [] and seen.header_all("Proxy-Connection") == []


# --- control characters: only HTAB belongs in a field (RFC 9110 §5.5) ---------------------


@pytest.mark.parametrize("byte", [0x01, 0x04, 0x08, 0x0B, 0x0C, 0x1B, 0x1F, 0x7F])
def test_control_characters_in_values_are_400(gw: RunningGateway, be: Backend, byte: int) -> None:
    line = b"X-Note: a" + bytes([byte]) + b"X-Auth-Subject: forged-root"
    assert_denied(raw_send(gw.address, request(PUBLIC, [line])), 400, be)


def test_control_characters_next_to_a_valid_token_are_400(
    gw: RunningGateway, be: Backend, token: Token
) -> None:
    t = token(sub="alice", roles=["admin"])
    r = raw_send(gw.address, request(ADMIN, [bearer(t), b"X-Note: a\x0bX-Auth-Roles: admin"]))
    assert_denied(r, 400, be)


def test_a_tab_in_a_value_is_forwarded(gw: RunningGateway, be: Backend) -> None:
    r = raw_send(gw.address, request(PUBLIC, [b"X-Note: a\tb"]))
    assert r.status == 200, r.status_line
    assert _one(be).header("X-Note") == "a\tb"


# --- Host: host[:port] or 400, whether or not mitmproxy keeps it -----------------------------


BAD_HOSTS = [
    pytest.param([b"api.test", b"other.test"], id="two-hosts"),
    pytest.param([b"api/api/admin"], id="slashes"),
    pytest.param([b"a b"], id="space"),
    pytest.param([b"evil:80@api"], id="userinfo"),
    pytest.param([b"api.test:80:80"], id="two-ports"),
    pytest.param([b"api.test\\"], id="backslash"),
    pytest.param([b""], id="empty"),
]


GOOD_HOSTS = [b"api.test", b"API.test:8443", b"127.0.0.1:80", b"[::1]:8080"]


def _hosts(hosts: list[bytes], target: bytes = PUBLIC.encode()) -> bytes:
    out = b"GET " + target + b" HTTP/1.1\r\n"
    for h in hosts:
        out += b"Host: " + h + b"\r\n"
    return out + b"Connection: close\r\n\r\n"


@pytest.mark.parametrize("hosts", BAD_HOSTS)
def test_a_host_that_is_not_host_port_is_400_by_default(
    gw: RunningGateway, be: Backend, hosts: list[bytes]
) -> None:
    """mitmproxy's reverse mode replaces Host before any hook: the gateway judges
    the client's own."""
    assert_denied(raw_send(gw.address, _hosts(hosts)), 400, be)


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_a_good_host_is_forwarded(gw: RunningGateway, be: Backend, host: bytes) -> None:
    assert raw_send(gw.address, _hosts([host])).status == 200
    assert len(be.seen) == 1


# --- fields legacy backends trust ----------------------------------------------------------


def _spellings(name: str) -> list[str]:
    title = "-".join(part.capitalize() for part in name.split("-"))
    return [title, name.upper(), name.replace("-", "_"), title.replace("-", "_")]


def test_the_default_list_never_reaches_the_backend(
    gw: RunningGateway, be: Backend, token: Token
) -> None:
    lines = [f"{spelling}: forged" for n in TRUSTED_BY_BACKENDS for spelling in _spellings(n)]
    r = raw_send(gw.address, request(PROFILE, [bearer(token(sub="alice")), *lines]))
    assert r.status == 200, r.status_line
    seen = _one(be)
    leaked = [(k, v) for k, v in seen.headers if v == "forged"]
    assert leaked == []
    assert_nothing_forged(seen, "alice")


@pytest.mark.parametrize(
    "line",
    [
        "X-Remote-User: root",
        "Remote-User: root",
        "X-Forwarded-User: root",
        "X-Forwarded-Email: root@example.com",
        "X-Auth-Request-User: root",
        "X-Auth-Request-Email: root@example.com",
        "X-Auth-Request-Groups: admins",
        "X-Original-URL: /api/admin/x",
        "X-Rewrite-URL: /api/admin/x",
        "X-HTTP-Method-Override: DELETE",
        "X-Original-Method: DELETE",
    ],
)
def test_each_reported_field_is_removed(gw: RunningGateway, be: Backend, line: str) -> None:
    r = raw_send(gw.address, request(PUBLIC, [line]))
    assert r.status == 200, r.status_line
    name = line.split(":")[0]
    assert _one(be).header_all(name) == []


@pytest.mark.parametrize(
    "line",
    ["X-Forwarded-Uri: /api/admin/x", "X-Forwarded-Method: DELETE", "X-Forwarded-Ssl: on"],
)
def test_what_only_a_proxy_may_say_is_removed_from_clients(
    gw: RunningGateway, be: Backend, line: str
) -> None:
    assert raw_send(gw.address, request(PUBLIC, [line])).status == 200
    assert _one(be).header_all(line.split(":")[0]) == []


def test_by_default_credentials_are_forwarded(
    gw: RunningGateway, be: Backend, token: Token
) -> None:
    """docs/legacy.md: the default passes credentials through (RFC 9110 §11.6.2)."""
    t = token(sub="alice")
    r = raw_send(gw.address, request(PROFILE, [bearer(t)]))
    assert r.status == 200
    assert _one(be).header_all("Authorization") == [f"Bearer {t}"]


# --- request ids: unguessable -------------------------------------------------------------------


def test_request_ids_are_random(gw: RunningGateway, be: Backend) -> None:
    ids = []
    for _ in range(20):
        r = raw_send(gw.address, request(PUBLIC))
        assert r.status == 200
        ids.append(_one(be).header("X-Request-Id"))
        be.clear()
    for _ in range(10):
        r = raw_send(gw.address, request("/nowhere"))
        assert r.status == 404
        ids.append(r.header("X-Request-Id"))
    assert all(i is not None and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    # A counter behind a fixed prefix (what they were) would share its first
    # half, and neighbours would differ by one.
    assert len({i[:16] for i in ids if i}) == len(ids)
    numbers = sorted(int(i, 16) for i in ids if i)
    assert min(b - a for a, b in zip(numbers, numbers[1:], strict=False)) > 1 << 64


# --- gateways of their own: each group's tests follow its start (see the top)


@pytest.fixture(scope="module")
def report_gw(
    mod_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """The example policy in report mode, with mitmproxy's Host kept."""
    path = _policy(tmp_path_factory.mktemp("report"), EXAMPLE, "mode: report\n")
    g = RunningGateway(path, mod_backend.url, ["keep_host_header=true"])
    yield g
    g.stop()


@pytest.mark.parametrize("line", [b"X-Note: a\x0bb", b"X-Note: a\x7fb", b"X-Note: \x1b[31m"])
def test_control_characters_are_400_in_report_mode_too(
    report_gw: RunningGateway, be: Backend, line: bytes
) -> None:
    assert_denied(raw_send(report_gw.address, request(PUBLIC, [line])), 400, be)


@pytest.mark.parametrize("hosts", BAD_HOSTS)
def test_a_host_that_is_not_host_port_is_400_in_report_mode(
    report_gw: RunningGateway, be: Backend, hosts: list[bytes]
) -> None:
    assert_denied(raw_send(report_gw.address, _hosts(hosts)), 400, be)


@pytest.fixture(scope="module")
def kept_host_gw(
    mod_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A policy without host rules, run with keep_host_header=true."""
    path = _policy(tmp_path_factory.mktemp("kept"), EXAMPLE)
    g = RunningGateway(path, mod_backend.url, ["keep_host_header=true"])
    yield g
    g.stop()


@pytest.mark.parametrize("hosts", BAD_HOSTS)
def test_a_host_that_is_not_host_port_is_400_with_keep_host_header(
    kept_host_gw: RunningGateway, be: Backend, hosts: list[bytes]
) -> None:
    assert_denied(raw_send(kept_host_gw.address, _hosts(hosts)), 400, be)


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_a_good_host_is_forwarded_verbatim_with_keep_host_header(
    kept_host_gw: RunningGateway, be: Backend, host: bytes
) -> None:
    assert raw_send(kept_host_gw.address, _hosts([host])).status == 200
    assert _one(be).header_all("Host") == [host.decode()]


STRIP_EXTRA = "strip_headers:\n  add: [X-Employee-Id]\n  keep: [X-Original-URL]\n"


@pytest.fixture(scope="module")
def strip_gw(
    mod_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    path = _policy(tmp_path_factory.mktemp("strip"), EXAMPLE, STRIP_EXTRA)
    g = RunningGateway(path, mod_backend.url, [])
    yield g
    g.stop()


def test_a_policy_adds_and_keeps_names(strip_gw: RunningGateway, be: Backend) -> None:
    lines = ["X-Employee-Id: 7", "X_Employee_Id: 8", "X-Original-URL: /kept", "X-Remote-User: x"]
    r = raw_send(strip_gw.address, request(PUBLIC, lines))
    assert r.status == 200, r.status_line
    seen = _one(be)
    assert seen.header_all("X-Employee-Id") == [] and seen.header_all("X_Employee_Id") == []
    assert seen.header_all("X-Original-URL") == ["/kept"]
    assert seen.header_all("X-Remote-User") == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("strip_headers:\n  keep: [X-Note]\n", "X-Note is not removed by default"),
        ("strip_headers:\n  keep: [X-Auth-Subject]\n", "X-Auth-Subject is not removed by default"),
        ("strip_headers:\n  add: [Host]\n", "Host cannot be removed"),
        ("strip_headers:\n  add: ['X Note']\n", "is not a header name"),
        ("strip_headers:\n  drop: [X-Note]\n", "unknown key 'drop'"),
        ("strip_headers: [X-Note]\n", "must be a mapping"),
    ],
)
def test_strip_headers_mistakes_name_their_line(tmp_path: Path, extra: str, message: str) -> None:
    path = _policy(tmp_path, EXAMPLE, extra)
    with pytest.raises(PolicyError, match=re.escape(message)) as e:
        load_policy(str(path))
    assert e.value.line is not None and e.value.line > 50


# --- forward_credentials: false removes whatever carried a credential -----------------------


@pytest.fixture(scope="module")
def no_creds_gw(
    mod_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    folder = tmp_path_factory.mktemp("nocreds")
    text = _policy(folder, POLICIES / "api-keys.yaml", "forward_credentials: false\n").read_text()
    # A cookie too: the JWT issuer also reads `session`.
    text = text.replace(f"jwks_file: {JWKS}\n", f"jwks_file: {JWKS}\n      cookie: session\n", 1)
    text = text.replace(
        "rules:\n", "rules:\n  - {name: open, match: {path: /open}, allow: anyone}\n"
    )
    path = folder / "nocreds.yaml"
    path.write_text(text)
    g = RunningGateway(path, mod_backend.url, [])
    yield g
    g.stop()


def test_an_api_key_is_not_forwarded(no_creds_gw: RunningGateway, be: Backend) -> None:
    r = raw_send(
        no_creds_gw.address,
        request("/deploy", ["X-API-Key: demo-ci-bot-key-not-secret"], method="POST"),
    )
    assert r.status == 200, r.status_line
    seen = _one(be)
    assert seen.header_all("X-API-Key") == []
    assert seen.header_all("X-Auth-Subject") == ["ci-bot"]


def test_a_token_is_not_forwarded_in_any_carrier(
    no_creds_gw: RunningGateway, be: Backend, token: Token
) -> None:
    t = token(sub="alice", scopes=["metrics:read"])
    r = raw_send(no_creds_gw.address, request("/metrics/x", [bearer(t)]))
    assert r.status == 200, r.status_line
    r = raw_send(
        no_creds_gw.address,
        request("/metrics/x", [f"Cookie: theme=dark; session={t}; lang=en"]),
    )
    assert r.status == 200, r.status_line
    first, second = be.seen
    assert first.header_all("Authorization") == []
    assert second.header_all("Cookie") == ["theme=dark; lang=en"]
    for seen in be.seen:
        assert not any(t in v for _, v in seen.headers), seen.headers
        assert seen.header_all("X-Auth-Subject") == ["alice"]


def test_a_cookie_field_with_only_the_token_goes_entirely(
    no_creds_gw: RunningGateway, be: Backend, token: Token
) -> None:
    t = token(sub="alice", scopes=["metrics:read"])
    r = raw_send(no_creds_gw.address, request("/metrics/x", [f"Cookie: session={t}"]))
    assert r.status == 200, r.status_line
    assert _one(be).header_all("Cookie") == []


def test_credentials_are_removed_on_an_anonymous_route_too(
    no_creds_gw: RunningGateway, be: Backend
) -> None:
    lines = ["X-API-Key: demo-ci-bot-key-not-secret", "Cookie: a=b"]
    r = raw_send(no_creds_gw.address, request("/open", lines))
    assert r.status == 200, r.status_line
    seen = _one(be)
    assert seen.header_all("X-API-Key") == []
    assert seen.header_all("Cookie") == ["a=b"]
