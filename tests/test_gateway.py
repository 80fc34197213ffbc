"""End to end: a real gateway (the master `authgate run` builds) in front of a
recording backend on 127.0.0.1, driven over real sockets.

Every denial also asserts that the backend saw nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import EXAMPLE, Backend, Reply, RunningGateway, send

Token = Callable[..., str]
IMF_DATE = re.compile(r"^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$")


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def assert_gateway_made(r: Reply, status: int) -> None:
    assert r.status == status
    assert IMF_DATE.match(r.header("Date") or "")
    assert r.header("Cache-Control") == "no-store"
    assert r.header("Content-Type") == "application/problem+json"
    body = r.json()
    assert body["status"] == status


@pytest.fixture
def gw(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway(EXAMPLE)


# --- the status table ------------------------------------------------------------


def test_no_credentials_is_401_with_a_bare_challenge(gw: RunningGateway, backend: Backend) -> None:
    r = send(gw.address, "GET", "/api/profile")
    assert_gateway_made(r, 401)
    assert r.header_all("WWW-Authenticate") == ['Bearer realm="api"']
    assert backend.seen == []


def test_unsupported_scheme_is_treated_as_no_credentials(
    gw: RunningGateway, backend: Backend
) -> None:
    r = send(gw.address, "GET", "/api/profile", [("Authorization", 'Digest username="x"')])
    assert_gateway_made(r, 401)
    assert r.header_all("WWW-Authenticate") == ['Bearer realm="api"']
    assert backend.seen == []


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t(ttl=-3600), id="expired"),
        pytest.param(
            lambda t: t()[:-4] + ("AAAA" if not t().endswith("AAAA") else "BBBB"),
            id="bad-signature",
        ),
        pytest.param(lambda t: t(kid="nope"), id="unknown-kid"),
        pytest.param(lambda t: t(iss="https://evil.example"), id="wrong-issuer"),
        pytest.param(lambda t: t(aud="other"), id="wrong-audience"),
        pytest.param(lambda t: "abc.def.ghi", id="garbage"),
    ],
)
def test_invalid_token_is_401_invalid_token(
    gw: RunningGateway, backend: Backend, token: Token, make: Callable[[Token], str]
) -> None:
    r = send(gw.address, "GET", "/api/profile", bearer(make(token)))
    assert_gateway_made(r, 401)
    [challenge] = r.header_all("WWW-Authenticate")
    assert challenge.startswith('Bearer realm="api", error="invalid_token", error_description="')
    assert backend.seen == []


def test_two_authorization_fields_are_400(
    gw: RunningGateway, backend: Backend, token: Token
) -> None:
    r = send(gw.address, "GET", "/api/profile", bearer(token()) + bearer(token(sub="bob")))
    assert_gateway_made(r, 400)
    assert r.header_all("WWW-Authenticate") == ['Bearer realm="api", error="invalid_request"']
    assert backend.seen == []


def test_profile_401_then_200_with_identity_headers(
    gw: RunningGateway, backend: Backend, token: Token
) -> None:
    assert send(gw.address, "GET", "/api/profile").status == 401
    assert backend.seen == []
    t = token(sub="alice", roles=["user"], scopes=["profile:read", "email"])
    r = send(gw.address, "GET", "/api/profile", bearer(t))
    assert r.status == 200
    [seen] = backend.seen
    assert seen.target == "/api/profile"
    assert seen.header("X-Auth-Subject") == "alice"
    assert seen.header("X-Auth-Roles") == "user"
    assert seen.header("X-Auth-Scopes") == "email,profile:read"
    assert seen.header("X-Auth-Issuer") == "https://issuer.example"
    assert seen.header("Authorization") == f"Bearer {t}"  # passes through unchanged
    assert seen.header("X-Forwarded-For") == "127.0.0.1"


def test_owner_or_admin(gw: RunningGateway, backend: Backend, token: Token) -> None:
    user = token(sub="alice", roles=["user"])
    r = send(gw.address, "GET", "/api/users/other-id", bearer(user))
    assert_gateway_made(r, 403)
    assert r.header("WWW-Authenticate") is None
    assert backend.seen == []
    assert send(gw.address, "GET", "/api/users/alice", bearer(user)).status == 200
    assert (
        send(gw.address, "GET", "/api/users/other-id", bearer(token(roles=["admin"]))).status == 200
    )
    assert [s.target for s in backend.seen] == ["/api/users/alice", "/api/users/other-id"]


def test_admin_area(gw: RunningGateway, backend: Backend, token: Token) -> None:
    r = send(gw.address, "GET", "/api/admin/dashboard", bearer(token(roles=["user"])))
    assert_gateway_made(r, 403)
    assert r.header("WWW-Authenticate") is None
    assert backend.seen == []
    r = send(gw.address, "GET", "/api/admin/dashboard", bearer(token(sub="root", roles=["admin"])))
    assert r.status == 200
    assert [s.target for s in backend.seen] == ["/api/admin/dashboard"]


def test_missing_scope_is_403_insufficient_scope(
    gw: RunningGateway, backend: Backend, token: Token
) -> None:
    r = send(gw.address, "POST", "/api/reports", bearer(token(scopes=["profile:read"])), b"{}")
    assert_gateway_made(r, 403)
    assert r.header_all("WWW-Authenticate") == [
        'Bearer realm="api", error="insufficient_scope", scope="reports:write"'
    ]
    assert backend.seen == []
    ok = send(gw.address, "POST", "/api/reports", bearer(token(scopes=["reports:write"])), b"{}")
    assert ok.status == 200
    assert len(backend.seen) == 1


def _without_date(r: Reply) -> tuple[int, list[tuple[str, str]], bytes]:
    """The answer but for its Date and its request id (each request has its own)."""
    rid = r.header("X-Request-Id") or ""
    assert len(rid) == 32 or r.status == 0
    body = r.body.replace(rid.encode(), b"ID") if rid else r.body
    kept = [(k.lower(), v) for k, v in r.headers if k.lower() not in ("date", "x-request-id")]
    return r.status, kept, body


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS"])
def test_hidden_route_is_byte_for_byte_the_unknown_path_404(
    gw: RunningGateway, backend: Backend, token: Token, method: str
) -> None:
    unknown = send(gw.address, method, "/no/such/path")
    assert_gateway_made(unknown, 404) if method != "HEAD" else None
    for headers in (
        [],
        bearer(token(roles=["user"])),
        bearer("abc.def.ghi"),
        bearer(token()) + bearer(token()),
    ):
        hidden = send(gw.address, method, "/api/secrets/x", headers)
        assert _without_date(hidden) == _without_date(unknown)
    assert backend.seen == []
    assert send(gw.address, method, "/api/secrets/x", bearer(token(roles=["admin"]))).status == 200


def test_blocked_ip_is_403_whatever_was_sent(
    gw: RunningGateway, backend: Backend, token: Token
) -> None:
    admin = token(roles=["admin"])
    for path, headers in [
        ("/health", []),
        ("/api/admin/x", bearer(admin)),
        ("/health", [("X-Forwarded-For", "10.9.9.9")]),
    ]:
        r = send(gw.address, "GET", path, headers, source="127.0.0.2")
        assert_gateway_made(r, 403)
        assert r.header("WWW-Authenticate") is None
    assert backend.seen == []
    assert send(gw.address, "GET", "/health").status == 200  # 127.0.0.1 is not blocked


def test_rate_limit_429_and_retry_after_works(
    start_gateway: Callable[..., RunningGateway], backend: Backend, tmp_path: Path
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\n"
        "limits: [{name: tight, key: ip, rate: 2/second}]\n"
        "rules:\n"
        "  - {name: all, match: {path: /**}, allow: anyone}\n"
    )
    gw = start_gateway(policy)
    assert [send(gw.address, "GET", "/x").status for _ in range(2)] == [200, 200]
    r = send(gw.address, "GET", "/x")
    assert_gateway_made(r, 429)
    retry = r.header("Retry-After")
    assert retry is not None and re.fullmatch(r"\d+", retry) and int(retry) >= 1
    assert r.header("RateLimit-Policy") == '"tight";q=2;w=1'
    assert r.header("RateLimit") == f'"tight";r=0;t={retry}'
    assert len(backend.seen) == 2
    time.sleep(int(retry))
    assert send(gw.address, "GET", "/x").status == 200
    assert len(backend.seen) == 3


def test_subject_limit_from_the_example(gw: RunningGateway, backend: Backend, token: Token) -> None:
    writer = token(sub="writer", scopes=["reports:write"])
    statuses = [
        send(gw.address, "POST", "/api/reports", bearer(writer), b"x").status for _ in range(6)
    ]
    assert statuses == [200] * 5 + [429]
    assert len(backend.seen) == 5
    other = token(sub="other-writer", scopes=["reports:write"])
    assert send(gw.address, "POST", "/api/reports", bearer(other), b"x").status == 200


# --- paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/api/public/../admin/x",
        "/api/%61dmin/x",
        "//api/admin/x",
        "/api/./admin/x",
        "/api/public/%2e%2e/admin/x",
        "/api/admin/x/",
        "/api/admin//x",
    ],
)
def test_path_tricks_are_judged_as_the_backend_reads_them(
    gw: RunningGateway, backend: Backend, token: Token, target: str
) -> None:
    r = send(gw.address, "GET", target, bearer(token(roles=["user"])))
    assert_gateway_made(r, 403)
    assert backend.seen == []
    assert send(gw.address, "GET", target, bearer(token(roles=["admin"]))).status == 200
    [seen] = backend.seen
    assert seen.target.rstrip("/") == "/api/admin/x"


@pytest.mark.parametrize(
    "target",
    [
        "/api/admin%2Fx",
        "/api/admin%2fx",
        "/api%5Cadmin/x",
        "/api/public/..;/admin/x",
        "/api/%252e%252e/admin",
        "/api/x%00.png",
        "/../api/admin/x",
        "/api/admin/x;jsessionid=1",
        "/api/%zz",
    ],
)
def test_ambiguous_paths_are_400(
    gw: RunningGateway, backend: Backend, token: Token, target: str
) -> None:
    r = send(gw.address, "GET", target, bearer(token(roles=["admin"])))
    assert_gateway_made(r, 400)
    assert r.header("WWW-Authenticate") is None
    assert backend.seen == []


def test_absolute_form_is_judged_and_forwarded_as_its_path(
    gw: RunningGateway, backend: Backend, token: Token
) -> None:
    target = "http://evil.example:1234/api/admin/x"
    assert send(gw.address, "GET", target, bearer(token(roles=["user"]))).status == 403
    assert backend.seen == []
    assert send(gw.address, "GET", target, bearer(token(roles=["admin"]))).status == 200
    [seen] = backend.seen
    assert seen.target == "/api/admin/x"


def test_userinfo_in_the_target_is_400(gw: RunningGateway, backend: Backend, token: Token) -> None:
    # mitmproxy itself refuses this request line (its own 400 page); either
    # way nothing is forwarded.
    r = send(gw.address, "GET", "http://u@api.test/health", [])
    assert r.status == 400
    assert backend.seen == []


# --- what reaches the backend ------------------------------------------------------------


def test_client_sent_identity_headers_are_replaced(
    gw: RunningGateway, backend: Backend, token: Token
) -> None:
    forged = [
        ("X-Auth-Subject", "root"),
        ("x-auth-roles", "admin"),
        ("X-Auth-Scopes", "all"),
        ("X-AUTH-ISSUER", "me"),
    ]
    send(gw.address, "GET", "/health", forged)
    send(gw.address, "GET", "/api/profile", forged + bearer(token(sub="alice")))
    anonymous, alice = backend.seen
    for name in ("X-Auth-Subject", "X-Auth-Roles", "X-Auth-Scopes", "X-Auth-Issuer"):
        assert anonymous.header_all(name) == []
    assert alice.header_all("X-Auth-Subject") == ["alice"]
    assert alice.header_all("X-Auth-Roles") == [""]
    assert alice.header_all("X-Auth-Issuer") == ["https://issuer.example"]


def test_untrusted_forwarded_for_is_kept_but_the_peer_is_appended(
    gw: RunningGateway, backend: Backend
) -> None:
    send(gw.address, "GET", "/health", [("X-Forwarded-For", "203.0.113.9")])
    [seen] = backend.seen
    # 203.0.113.0/24 is blocked: the header was not believed, the peer was.
    assert seen.header_all("X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]


def test_head_gets_headers_and_no_body(gw: RunningGateway, backend: Backend) -> None:
    r = send(gw.address, "HEAD", "/api/profile")
    assert r.status == 401
    assert r.header_all("WWW-Authenticate") == ['Bearer realm="api"']
    assert r.body == b""
    assert backend.seen == []


def test_expect_continue_is_not_answered_on_a_denial(gw: RunningGateway, backend: Backend) -> None:
    r = send(gw.address, "POST", "/api/reports", [("Expect", "100-continue")], b"payload")
    assert r.status == 401  # the first status line is the denial, not "100 Continue"
    assert backend.seen == []


# --- failing closed, logging --------------------------------------------------------------


def test_an_exception_while_deciding_answers_500_and_forwards_nothing(
    gw: RunningGateway, backend: Backend
) -> None:
    class Exploding:
        """A block list whose lookup fails, as a bug in the core would."""

        def contains(self, *args: object) -> bool:
            raise RuntimeError("injected")

    assert gw.addon.policy is not None
    object.__setattr__(gw.addon.policy, "block", Exploding())
    r = send(gw.address, "GET", "/health")
    assert_gateway_made(r, 500)
    assert b"injected" not in r.body
    assert backend.seen == []


def test_decision_log_has_one_json_line_per_request_and_never_the_token(
    start_gateway: Callable[..., RunningGateway], backend: Backend, token: Token, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    gw = start_gateway(EXAMPLE, f"authgate_log={log}")
    t = token(sub="alice", roles=["user"])
    send(gw.address, "GET", "/api/profile", bearer(t))
    send(gw.address, "GET", "/api/admin/x", bearer(t))
    send(gw.address, "GET", "/api/profile")
    text = log.read_text()
    assert t not in text and t.split(".")[2] not in text
    entries = [json.loads(line) for line in text.splitlines()]
    assert [
        (e["decision"], e["status"], e["rule"], e["reason"], e["subject"]) for e in entries
    ] == [
        ("allow", None, "profile", "allowed", "alice"),
        ("deny", 403, "admin", "forbidden", "alice"),
        ("deny", 401, "profile", "no_credentials", None),
    ]
    assert all(e["client_ip"] == "127.0.0.1" and e["method"] == "GET" for e in entries)


def test_forward_credentials_false_strips_authorization(
    start_gateway: Callable[..., RunningGateway], backend: Backend, token: Token, tmp_path: Path
) -> None:
    text = EXAMPLE.read_text().replace(
        "default: not_found", "forward_credentials: false\ndefault: not_found"
    )
    text = text.replace("keys/jwks.json", str(EXAMPLE.parent / "keys" / "jwks.json"))
    text = text.replace("[blocklist.txt]", f"[{EXAMPLE.parent / 'blocklist.txt'}]")
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    gw = start_gateway(policy)
    headers = bearer(token(sub="alice")) + [
        ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-For", "198.51.100.2"),
    ]
    assert send(gw.address, "GET", "/api/profile", headers).status == 200
    [seen] = backend.seen
    assert seen.header_all("Authorization") == []
    assert seen.header_all("X-Auth-Subject") == ["alice"]
    assert seen.header_all("X-Forwarded-For") == ["198.51.100.1, 198.51.100.2, 127.0.0.1"]


@pytest.mark.parametrize(
    "upgrade, extra, forwarded",
    [
        ("h2c", [("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")], False),
        ("made-up-protocol/1", [], False),
        (
            "websocket",
            [("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")],
            True,
        ),
    ],
)
def test_only_websocket_upgrades_reach_the_backend(
    gw: RunningGateway,
    backend: Backend,
    upgrade: str,
    extra: list[tuple[str, str]],
    forwarded: bool,
) -> None:
    """After a 101 to anything but WebSocket (h2c above all), the connection
    would carry requests nobody judges."""
    headers = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", upgrade), *extra]
    assert send(gw.address, "GET", "/health", headers).status == 200
    [seen] = backend.seen
    assert seen.header("Upgrade") == (upgrade if forwarded else None)
    assert seen.header("HTTP2-Settings") is None


# --- request ids ------------------------------------------------------------------------


def test_every_answer_and_forward_carries_a_request_id(
    gw: RunningGateway, backend: Backend
) -> None:
    denied = send(gw.address, "GET", "/api/profile", [("X-Request-Id", "chosen-by-client")])
    rid = denied.header("X-Request-Id") or ""
    assert re.fullmatch(r"[0-9a-f]{32}", rid)  # an untrusted client does not choose it
    assert denied.json()["request_id"] == rid
    page = send(gw.address, "GET", "/api/profile", [("Accept", "text/html")])
    assert f"Request id: {page.header('X-Request-Id')}" in page.body.decode()
    assert backend.seen == []
    ok = send(gw.address, "GET", "/health", [("X-Request-Id", "chosen-by-client")])
    assert ok.status == 200
    [seen] = backend.seen
    assert seen.header_all("X-Request-Id") != ["chosen-by-client"]
    assert re.fullmatch(r"[0-9a-f]{32}", seen.header("X-Request-Id") or "")


@pytest.fixture
def behind_proxy(start_gateway: Callable[..., RunningGateway], tmp_path: Path) -> RunningGateway:
    """A gateway whose trusted proxy is 127.0.0.1, where the tests connect from."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nrealm: api\nclient_ip: {trusted_proxies: [127.0.0.1/32]}\n"
        "rules:\n  - {name: a, match: {path: /a}, allow: anyone}\n"
    )
    return start_gateway(policy)


def test_a_trusted_proxys_request_id_is_kept(
    behind_proxy: RunningGateway, backend: Backend
) -> None:
    g = behind_proxy
    assert send(g.address, "GET", "/a", [("X-Request-Id", "lb-1234.5")]).status == 200
    assert backend.seen[0].header_all("X-Request-Id") == ["lb-1234.5"]
    bad = send(g.address, "GET", "/b", [("X-Request-Id", "has spaces")])
    assert bad.status == 404 and bad.header("X-Request-Id") != "has spaces"


SPOOFABLE = [
    ("Forwarded", "for=10.0.0.1;host=admin.test;proto=https"),
    ("X-Forwarded-Host", "admin.test"),
    ("X-Forwarded-Proto", "https"),
    ("X-Real-IP", "10.0.0.1"),
    ("X-Original-Host", "admin.test"),
    ("X_Forwarded_Host", "admin.test"),
]


def test_an_untrusted_client_cannot_tell_the_backend_another_host_or_address(
    gw: RunningGateway, backend: Backend
) -> None:
    assert send(gw.address, "GET", "/health", SPOOFABLE).status == 200
    [seen] = backend.seen
    names = {k.lower().replace("_", "-") for k, _ in seen.headers}
    assert names.isdisjoint({k.lower().replace("_", "-") for k, _ in SPOOFABLE})


def test_a_trusted_proxy_may_say_where_the_request_came_from(
    behind_proxy: RunningGateway, backend: Backend
) -> None:
    g = behind_proxy
    assert send(g.address, "GET", "/a", SPOOFABLE[:2]).status == 200
    assert backend.seen[0].header("X-Forwarded-Host") == "admin.test"
    assert backend.seen[0].header("Forwarded") == SPOOFABLE[0][1]
