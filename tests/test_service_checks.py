"""service/checks.py, the decision service's contract without I/O: what a
check request describes (`read_check`), what it is answered (`answer`,
`denial`), and the sealed answers nginx hands back (`seal`, `unseal`).

Tables first; then properties: `read_check` (and the judging after it) never
raises on any header list or target, and a sealed answer comes back as it
was sealed, while anything else unseals to nothing.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate.core.decision import Decision, RequestView, judge
from authgate.core.model import Policy
from authgate.core.responses import Rendered, render
from authgate.policy.load import load_policy
from authgate.runtime.stores import MemoryStore
from authgate.service import checks
from authgate.service.checks import ANSWER, DECISION, Check, Refusal, read_check, seal, unseal
from test_service import policy_text

PEER = "10.0.0.5"
Fields = list[tuple[str, str]]


def auth_fields(*more: tuple[str, str]) -> Fields:
    return [
        ("host", "authgate:9191"),
        ("x-forwarded-method", "post"),
        ("x-forwarded-uri", "/api/x?y=1"),
        ("x-forwarded-host", "app.example"),
        *more,
    ]


# --- read_check ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,fields,door,method,original,host",
    [
        ("/auth", auth_fields(), "auth", "POST", "/api/x?y=1", "app.example"),
        ("/auth?ignored=1", auth_fields(), "auth", "POST", "/api/x?y=1", "app.example"),
        ("/nginx", auth_fields(), "nginx", "POST", "/api/x?y=1", "app.example"),
        # Caddy keeps the client's Host and may send no X-Forwarded-Host.
        (
            "/auth",
            [("host", "app.example"), ("x-forwarded-method", "GET"), ("x-forwarded-uri", "/")],
            "auth",
            "GET",
            "/",
            "app.example",
        ),
        (
            "/envoy/api/x?y=1",
            [("host", "app.example")],
            "envoy",
            "PUT",
            "/api/x?y=1",
            "app.example",
        ),
        ("/envoy", [("host", "h")], "envoy", "PUT", "/", "h"),
        ("/envoy?q=1", [("host", "h")], "envoy", "PUT", "/?q=1", "h"),
        ("/envoy//x", [], "envoy", "PUT", "//x", None),
    ],
)
def test_read_check_finds_the_original_request(
    target: str, fields: Fields, door: str, method: str, original: str, host: str | None
) -> None:
    got = read_check("put", target, fields, PEER, True)
    assert isinstance(got, Check)
    assert (got.door, got.view.method, got.view.target) == (door, method, original)
    assert (got.view.host, got.view.peer) == (host, PEER)
    assert got.view.header("host") == host


def test_the_fields_describing_the_request_are_not_the_requests_own() -> None:
    got = read_check("GET", "/auth", auth_fields(("x-authgate-refused", "1")), PEER, True)
    assert isinstance(got, Check)
    names = [k for k, _ in got.view.headers]
    assert "x-forwarded-method" not in names and "x-forwarded-uri" not in names
    assert "x-authgate-refused" not in names
    assert names.count("host") == 1  # the original request's, not the check request's
    # Envoy's check request is the original request: every field is its own.
    envoy = read_check("GET", "/envoy/x", [("host", "h"), ("x-forwarded-uri", "/y")], PEER, True)
    assert isinstance(envoy, Check)
    assert envoy.view.header("x-forwarded-uri") == "/y"


@pytest.mark.parametrize(
    "target,fields,trusted,status,reason",
    [
        ("/auth", auth_fields(), False, 403, "untrusted_caller"),
        ("/envoy/x", [("host", "h")], False, 403, "untrusted_caller"),
        ("/nope", auth_fields(), False, 403, "untrusted_caller"),  # says nothing to strangers
        ("/", auth_fields(), True, 404, "unknown_endpoint"),
        ("/authx", auth_fields(), True, 404, "unknown_endpoint"),
        ("/auth/", auth_fields(), True, 404, "unknown_endpoint"),
        ("/envoyx/y", [("host", "h")], True, 404, "unknown_endpoint"),
        ("/_authgate/check", auth_fields(), True, 404, "unknown_endpoint"),
        ("http://a/auth", auth_fields(), True, 404, "unknown_endpoint"),
        ("/auth", [("x-forwarded-uri", "/x")], True, 400, "no_original_request"),
        ("/auth", [("x-forwarded-method", "GET")], True, 400, "no_original_request"),
        (
            "/nginx",
            [("x-forwarded-method", ""), ("x-forwarded-uri", "/x")],
            True,
            400,
            "no_original_request",
        ),
        ("/auth", auth_fields(("x-forwarded-uri", "/y")), True, 400, "no_original_request"),
        ("/auth", auth_fields(("x-forwarded-method", "GET")), True, 400, "no_original_request"),
        ("/auth", auth_fields(("x-forwarded-host", "b")), True, 400, "no_original_request"),
    ],
)
def test_read_check_refuses(
    target: str, fields: Fields, trusted: bool, status: int, reason: str
) -> None:
    got = read_check("GET", target, fields, PEER, trusted)
    assert isinstance(got, Refusal)
    assert (got.rendered.status, got.reason) == (status, reason)
    assert got.rendered.headers[0] == (DECISION, "deny")
    assert json.loads(got.rendered.body)["status"] == status


def test_a_refusal_speaks_the_callers_language() -> None:
    got = read_check("GET", "/nope", [("accept", "text/html")], PEER, True)
    assert isinstance(got, Refusal)
    assert dict(got.rendered.headers)["Content-Type"] == "text/html; charset=utf-8"
    head = read_check("HEAD", "/auth", [], PEER, False)
    assert isinstance(head, Refusal)
    assert head.rendered.body == b""


# --- answer and denial ----------------------------------------------------------------------------

ALICE = (
    ("X-Auth-Subject", "alice"),
    ("X-Auth-Roles", "user admin"),
    ("X-Auth-Scopes", ""),
    ("X-Auth-Issuer", "https://issuer.example"),
)


def a_check(door: str, accept: str | None = None, method: str = "GET") -> Check:
    fields = (("accept", accept),) if accept else ()
    return Check(door, RequestView(method, "/x", fields, PEER, "h"))


@pytest.mark.parametrize(
    "decision,identity,report",
    [
        (Decision(True, 0, "allowed", upstream_headers=ALICE), [v for _, v in ALICE], None),
        (Decision(True, 0, "allowed"), ["", "", "", ""], None),  # anonymous: all four, empty
        (
            Decision(False, 401, "no_credentials", report=True),
            ["", "", "", ""],
            "would deny: 401 no_credentials",
        ),
    ],
)
@pytest.mark.parametrize("door", ["auth", "nginx", "envoy"])
def test_an_allow_is_200_with_the_identity(
    door: str, decision: Decision, identity: list[str], report: str | None
) -> None:
    got = checks.answer(a_check(door), decision, "api", "rid-1")
    assert (got.status, got.body) == (200, b"")
    fields = dict(got.headers)
    assert got.headers[0] == (DECISION, "allow")
    assert fields["X-Request-Id"] == "rid-1"
    assert [fields[name] for name in checks.IDENTITY] == identity
    assert fields.get("X-Authgate-Report") == report
    assert fields["Cache-Control"] == "no-store"


CHALLENGED = Decision(
    False,
    401,
    "invalid_token",
    challenges=(("Bearer", (("error", "invalid_token"),)),),
)
LIMITED = Decision(
    False, 429, "rate_limited", headers=(("Retry-After", "7"), ("RateLimit", '"l";r=0;t=7'))
)


@pytest.mark.parametrize("decision", [CHALLENGED, LIMITED, Decision(False, 404, "no_rule")])
@pytest.mark.parametrize("door", ["auth", "envoy"])
def test_a_denial_is_the_gateways_answer(door: str, decision: Decision) -> None:
    check = a_check(door, accept="text/plain")
    got = checks.answer(check, decision, "api", "rid-2")
    gateway = render(decision, "api", "GET", accept="text/plain", request_id="rid-2")
    assert got.status == decision.status
    assert got.headers[0] == (DECISION, "deny")
    strip = [(k, v) for k, v in got.headers[1:] if k != "Date"]
    assert strip == [(k, v) for k, v in gateway.headers if k != "Date"]
    assert got.body == gateway.body
    assert b"rid-2" in got.body


@pytest.mark.parametrize("decision", [CHALLENGED, LIMITED, Decision(False, 303, "login_redirect")])
def test_nginx_gets_403_with_the_answer_sealed(decision: Decision) -> None:
    check = a_check("nginx", method="HEAD")
    got = checks.answer(check, decision, "api", "rid-3")
    assert (got.status, got.body) == (403, b"")  # auth_request passes 401 and 403 only
    fields = dict(got.headers)
    assert fields[DECISION] == "deny"
    replayed = unseal(fields[ANSWER])
    # The replay is what the other doors answer directly.
    direct = checks.answer(a_check("auth", method="HEAD"), decision, "api", "rid-3")
    assert replayed is not None
    assert replayed.status == direct.status == decision.status
    assert [h for h in replayed.headers if h[0] != "Date"] == [
        h for h in direct.headers if h[0] != "Date"
    ]
    assert replayed.body == direct.body == b""


def test_the_services_own_failure_goes_through_the_door() -> None:
    failed = Rendered(503, (("Retry-After", "5"),), b"{}")
    assert checks.denial(a_check("envoy"), failed).status == 503
    nginx = checks.denial(a_check("nginx"), failed)
    assert nginx.status == 403
    assert unseal(dict(nginx.headers)[ANSWER]) == Rendered(
        503, ((DECISION, "deny"), ("Retry-After", "5")), b"{}"
    )


# --- seal and unseal ------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64 at all!",
        "é",
        b64(b"not json"),
        b64(b'{"status": 401}'),
        b64(b"[401, [], 12]"),  # body not text
        b64(b'[200, [], ""]'),  # an allow can never be replayed
        b64(b'[204, [], ""]'),
        b64(b'[600, [], ""]'),
        b64(b'["401", [], ""]'),
        b64(b'[401.0, [], ""]'),
        b64(b'[true, [], ""]'),
        b64(b'[401, 5, ""]'),
        b64(b'[401, [["a"]], ""]'),
        b64(b'[401, [["a", "b", "c"]], ""]'),
        b64(b'[401, [["Set-Cookie", "a\\r\\nX: y"]], ""]'),  # a field in a field
        b64(b'[401, [["X\\nY", "v"]], ""]'),
        b64(b'[401, [], "", "extra"]'),
        b64(b"[" * 5000 + b"]" * 5000),  # nested past the recursion limit
        b64(b'[401, [], "' + b"x" * 20_000 + b'"]'),  # too long to be ours
    ],
)
def test_unseal_refuses_anything_it_did_not_seal(text: str) -> None:
    assert unseal(text) is None


def test_seal_fits_in_one_field_value() -> None:
    r = Rendered(401, (("WWW-Authenticate", 'Bearer realm="a b"'),), "é\n\x00".encode())
    text = seal(r)
    assert text.isascii() and "=" not in text and "\n" not in text and " " not in text
    assert unseal(text) == Rendered(401, ((DECISION, "deny"), *r.headers), r.body)


# --- properties ---------------------------------------------------------------------------------

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NAMES = st.one_of(
    st.sampled_from(
        [
            "host",
            "x-forwarded-method",
            "x-forwarded-uri",
            "x-forwarded-host",
            "x-forwarded-for",
            "x-authgate-refused",
            "authorization",
            "accept",
            "cookie",
            "x-request-id",
        ]
    ),
    st.text(min_size=1, max_size=12),
)
VALUES = st.one_of(
    st.sampled_from(["GET", "post", "/", "/health", "/api/x?y=1", "Bearer a.b.c", "", "*/*"]),
    st.text(max_size=40),
)
TARGETS = st.one_of(
    st.sampled_from(["/auth", "/nginx", "/envoy", "/envoy/", "/_answer", "/", "*"]),
    st.builds(
        lambda p, s: p + s, st.sampled_from(["/auth?", "/envoy/", "/envoy?", "/"]), st.text()
    ),
    st.text(),
)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=12)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, demo_key: Any) -> Policy:
    path: Path = tmp_path_factory.mktemp("checks") / "policy.yaml"
    # No issuer with remote keys: judging inline never waits for a fetch.
    path.write_text(policy_text(trusted="10.0.0.0/8", away=False))
    return load_policy(str(path))


@SETTINGS
@given(
    method=st.one_of(st.sampled_from(["GET", "HEAD", "post", "OPTIONS"]), st.text(max_size=8)),
    target=TARGETS,
    headers=HEADERS,
    trusted=st.booleans(),
)
def test_read_check_never_raises_and_what_it_reads_can_be_judged(
    compiled: Policy, method: str, target: str, headers: Sequence[tuple[str, str]], trusted: bool
) -> None:
    got = read_check(method, target, headers, PEER, trusted)
    if isinstance(got, Refusal):
        assert got.rendered.status in (400, 403, 404)
        assert got.rendered.headers[0] == (DECISION, "deny")
        assert trusted or got.rendered.status == 403
        return
    assert trusted
    d = judge(compiled, got.view, time.time(), MemoryStore())
    r = checks.answer(got, d, compiled.realm, "rid")
    assert dict(r.headers)[DECISION] == ("allow" if d.forwarded else "deny")
    if d.forwarded:
        assert r.status == 200
    else:
        assert r.status == (403 if got.door == "nginx" else d.status)


ANSWERS = st.builds(
    Rendered,
    status=st.integers(300, 599),
    headers=st.lists(
        st.tuples(
            st.text(min_size=1).filter(lambda s: "\r" not in s and "\n" not in s),
            st.text().filter(lambda s: "\r" not in s and "\n" not in s),
        ),
        max_size=6,
    ).map(tuple),
    body=st.binary(max_size=2000),
)


@SETTINGS
@given(r=ANSWERS)
def test_unseal_gives_back_what_was_sealed(r: Rendered) -> None:
    # As the nginx door seals a denial, and /_answer replays it (saying deny).
    assert unseal(seal(r)) == Rendered(r.status, ((DECISION, "deny"), *r.headers), r.body)


@SETTINGS
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(b64)))
def test_unseal_of_anything_else_is_nothing_or_a_denial(text: str) -> None:
    got = unseal(text)  # never raises
    if got is not None:  # only if the bytes happen to be a sealed answer
        assert 300 <= got.status <= 599
        assert got.headers[0] == (DECISION, "deny")
