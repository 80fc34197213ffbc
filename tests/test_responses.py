"""Gateway-made responses: `render()` and `render_error()`.

Conformance checks: H-05, H-10, H-11, C-01..C-03, B-02, B-03, B-06, B-09, B-10,
R-02..R-05, P-01..P-05, X-01.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import jwt
import pytest

from authgate.core.decision import (
    BAD_PATH,
    FORBIDDEN,
    HIDDEN,
    INSUFFICIENT_SCOPE,
    INVALID_REQUEST,
    INVALID_TOKEN,
    IP_BLOCKED,
    NO_CREDENTIALS,
    NO_RULE,
    RATE_LIMITED,
    Decision,
    RequestView,
    judge,
)
from authgate.core.model import Policy
from authgate.core.responses import render, render_error
from authgate.policy.load import parse_policy
from authgate.policy.marks import PolicyError
from authgate.runtime.stores import MemoryStore

NOW = 1_700_000_000.0
NOW_DATE = "Tue, 14 Nov 2023 22:13:20 GMT"
IMF_FIXDATE = re.compile(r"^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$")
PROBLEM_JSON = "application/problem+json"
BASE_HEADERS = [
    ("Date", NOW_DATE),
    ("Content-Type", PROBLEM_JSON),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
]

# RFC 9110 §5.6.2 token, §5.6.4 quoted-string; RFC 9651 §3.3.3 sf-string.
TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
QUOTED = r'"(?:[\t \x21\x23-\x5B\x5D-\x7E]|\\[\t \x21-\x7E])*"'
SF_STRING = r'"(?:[\x20\x21\x23-\x5B\x5D-\x7E]|\\["\\])*"'
DESCRIPTION_CHARS = re.compile(r"^[\x20\x21\x23-\x5B\x5D-\x7E]*$")
SCOPE_CHARS = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]+( [\x21\x23-\x5B\x5D-\x7E]+)*$")


def unquote(value: str) -> str:
    if value.startswith('"'):
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_challenge(value: str) -> tuple[str, list[tuple[str, str, str]]]:
    """-> (scheme, [(name, raw value, unquoted value)]); AssertionError if malformed.

    Strict: one SP after the scheme, `, ` between parameters, no BWS around `=`.
    """
    m = re.match(rf"({TOKEN})( |$)", value)
    assert m, f"no auth-scheme in {value!r}"
    scheme, pos = m.group(1), m.end()
    params: list[tuple[str, str, str]] = []
    param = re.compile(rf"({TOKEN})=({TOKEN}|{QUOTED})")
    while pos < len(value):
        if params:
            assert value.startswith(", ", pos), f"expected ', ' at {pos} in {value!r}"
            pos += 2
        m = param.match(value, pos)
        assert m, f"no auth-param at {pos} in {value!r}"
        params.append((m.group(1), m.group(2), unquote(m.group(2))))
        pos = m.end()
    return scheme, params


def header_values(rendered: Any, name: str) -> list[str]:
    return [v for k, v in rendered.headers if k.lower() == name.lower()]


def one_header(rendered: Any, name: str) -> str | None:
    values = header_values(rendered, name)
    assert len(values) <= 1, f"{name} appears {len(values)} times"
    return values[0] if values else None


def check_common(rendered: Any, status: int) -> dict[str, Any]:
    """Every gateway-made response: Date, no-store, problem+json with the same status."""
    assert rendered.status == status
    names = [k.lower() for k, _ in rendered.headers]
    assert len(names) == len(set(names)), f"a header appears twice: {names}"
    date = one_header(rendered, "Date")
    assert date is not None and IMF_FIXDATE.match(date), date
    assert one_header(rendered, "Cache-Control") == "no-store"
    assert one_header(rendered, "Expires") is None
    assert one_header(rendered, "Content-Type") == PROBLEM_JSON
    body = json.loads(rendered.body)
    assert isinstance(body, dict)
    assert body["status"] == status and type(body["status"]) is int
    assert body["type"] == "about:blank"
    assert body["title"] == HTTPStatus(status).phrase
    assert isinstance(body["detail"], str) and body["detail"]
    assert set(body) == {"type", "title", "status", "detail"}
    return body


def bearer_challenge(
    *params: tuple[str, str],
) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    return (("Bearer", tuple(params)),)


# --- render() for each status ------------------------------------------------------

CASES = [
    pytest.param(Decision(False, 400, BAD_PATH, detail="encoded %2F in path"), 400, None,
                 "The request is malformed; the gateway did not forward it.", id="400-bad-path"),
    pytest.param(Decision(False, 400, INVALID_REQUEST,
                          challenges=bearer_challenge(("error", "invalid_request")),
                          detail="duplicate Authorization fields"),
                 400, 'Bearer realm="api", error="invalid_request"',
                 "The request is malformed; the gateway did not forward it.",
                 id="400-invalid-request"),
    pytest.param(Decision(False, 401, NO_CREDENTIALS, rule="rule-members",
                          challenges=bearer_challenge()), 401,
                 'Bearer realm="api"', "This resource needs valid credentials.",
                 id="401-no-credentials"),
    pytest.param(Decision(False, 401, INVALID_TOKEN, rule="rule-members",
                          detail="The access token expired",
                          challenges=bearer_challenge(("error", "invalid_token"),
                                            ("error_description", "The access token expired"))),
                 401, 'Bearer realm="api", error="invalid_token", '
                      'error_description="The access token expired"',
                 "The credentials sent are not valid.", id="401-invalid-token"),
    pytest.param(Decision(False, 403, FORBIDDEN, rule="rule-members"), 403, None,
                 "You are not allowed to access this resource.", id="403-forbidden"),
    pytest.param(Decision(False, 403, IP_BLOCKED, client_ip="192.0.2.1"), 403, None,
                 "You are not allowed to access this resource.", id="403-ip-blocked"),
    pytest.param(Decision(False, 403, INSUFFICIENT_SCOPE, rule="rule-members", detail="read write",
                          challenges=bearer_challenge(("error", "insufficient_scope"),
                                            ("scope", "read write"))),
                 403, 'Bearer realm="api", error="insufficient_scope", scope="read write"',
                 "The access token lacks the scope this resource needs.",
                 id="403-insufficient-scope"),
    pytest.param(Decision(False, 404, NO_RULE), 404, None, "There is nothing at this address.",
                 id="404-no-rule"),
    pytest.param(Decision(False, 404, HIDDEN, rule="secret", detail="forbidden"), 404, None,
                 "There is nothing at this address.", id="404-hidden"),
    pytest.param(Decision(False, 429, RATE_LIMITED, detail="per-ip",
                          headers=(("Retry-After", "7"),
                                   ("RateLimit-Policy", '"per-ip";q=5;w=60'),
                                   ("RateLimit", '"per-ip";r=0;t=7'))),
                 429, None, "Too many requests. Retry after the time in Retry-After.",
                 id="429"),
    pytest.param(Decision(False, 500, "internal_error"), 500, None,
                 "The gateway could not judge this request and did not forward it.", id="500"),
    pytest.param(Decision(False, 503, "unavailable"), 503, None,
                 "The gateway cannot judge requests right now. Retry later.", id="503"),
]  # fmt: skip


@pytest.mark.parametrize(("decision", "status", "challenge", "detail"), CASES)
def test_render(decision: Decision, status: int, challenge: str | None, detail: str) -> None:
    rendered = render(decision, "api", "GET", now=NOW)
    body = check_common(rendered, status)
    assert body["detail"] == detail
    assert one_header(rendered, "WWW-Authenticate") == challenge
    expected = list(BASE_HEADERS)
    if challenge is not None:
        expected.append(("WWW-Authenticate", challenge))
    expected.extend(decision.headers)
    assert list(rendered.headers) == expected
    # P-05: nothing internal in the body
    for internal in (decision.detail, decision.rule, decision.client_ip):
        if internal:
            assert internal.encode() not in rendered.body


@pytest.mark.parametrize(("decision", "status", "challenge", "detail"), CASES)
def test_head_has_same_headers_and_no_body(
    decision: Decision, status: int, challenge: str | None, detail: str
) -> None:
    get = render(decision, "api", "GET", now=NOW)
    head = render(decision, "api", "HEAD", now=NOW)
    assert get.body != b""
    assert head.body == b""
    assert head.status == get.status == status
    assert head.headers == get.headers


@pytest.mark.parametrize(("decision", "status", "challenge", "detail"), CASES)
def test_challenge_syntax(
    decision: Decision, status: int, challenge: str | None, detail: str
) -> None:
    rendered = render(decision, "my realm!", "GET", now=NOW)
    value = one_header(rendered, "WWW-Authenticate")
    if not decision.challenges:
        assert value is None
        return
    assert value is not None
    scheme, params = parse_challenge(value)
    assert scheme == "Bearer"
    assert params, "B-02: a Bearer challenge needs at least one auth-param"
    names = [name.lower() for name, _, _ in params]
    assert len(names) == len(set(names)), f"H-05/B-09: parameter twice in {value!r}"
    assert params[0][0] == "realm" and params[0][1] == '"my realm!"'
    assert [(n, v) for n, _, v in params[1:]] == list(decision.challenges[0][1])
    for name, raw, text in params:
        assert raw.startswith('"'), f"{name} is not a quoted-string"
        if name in ("error", "error_description"):
            assert DESCRIPTION_CHARS.match(text), (name, text)
        if name == "error":
            assert text in ("invalid_request", "invalid_token", "insufficient_scope")
        if name == "scope":
            assert SCOPE_CHARS.match(text), text


def test_no_credentials_challenge_has_no_error() -> None:
    """B-03: no error, error_description or error_uri without credentials."""
    rendered = render(
        Decision(False, 401, NO_CREDENTIALS, challenges=bearer_challenge()), "api", "GET", NOW
    )
    assert header_values(rendered, "WWW-Authenticate") == ['Bearer realm="api"']


@pytest.mark.parametrize(
    ("realm", "header"),
    [
        pytest.param("api", 'Bearer realm="api"', id="plain"),
        pytest.param("my api", 'Bearer realm="my api"', id="space"),
        pytest.param('a"b', 'Bearer realm="a\\"b"', id="quote-escaped"),
        pytest.param("a\\b", 'Bearer realm="a\\\\b"', id="backslash-escaped"),
    ],
)
def test_realm_is_always_quoted(realm: str, header: str) -> None:
    rendered = render(
        Decision(False, 401, NO_CREDENTIALS, challenges=bearer_challenge()), realm, "GET", NOW
    )
    assert one_header(rendered, "WWW-Authenticate") == header
    _, params = parse_challenge(header)
    assert params == [("realm", header[len("Bearer realm=") :], realm)]


def test_date_header_now_and_default_clock() -> None:
    assert one_header(render(Decision(False, 404, NO_RULE), "api", "GET", NOW), "Date") == NOW_DATE
    for rendered in (
        render(Decision(False, 404, NO_RULE), "api", "GET"),
        render_error(500, "GET"),
    ):
        date = one_header(rendered, "Date")
        assert date is not None and IMF_FIXDATE.match(date), date
        parsed = calendar.timegm(time.strptime(date, "%a, %d %b %Y %H:%M:%S GMT"))
        assert abs(parsed - time.time()) < 5


@pytest.mark.parametrize(
    "now",
    [
        pytest.param(0.0, id="epoch"),
        pytest.param(1_000_000_000.5, id="fraction"),
        pytest.param(1_709_251_199.0, id="day-before-leap-day"),
        pytest.param(4_102_444_800.0, id="year-2100"),
    ],
)
def test_date_is_imf_fixdate(now: float) -> None:
    date = one_header(render(Decision(False, 404, NO_RULE), "api", "GET", now), "Date")
    assert date is not None and IMF_FIXDATE.match(date), date
    expected = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
    assert date == expected


def test_same_status_same_bytes() -> None:
    """Two denials with the same status and reason class are byte-for-byte the same."""
    a = render(Decision(False, 403, FORBIDDEN, rule="admin", detail="x"), "api", "GET", NOW)
    b = render(Decision(False, 403, IP_BLOCKED, client_ip="192.0.2.9"), "other", "GET", NOW)
    assert a == b


# --- render_error ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after", "detail"),
    [
        pytest.param(500, None, "The gateway could not judge this request and did not forward it.",
                     id="500"),
        pytest.param(503, 30, "The gateway cannot judge requests right now. Retry later.",
                     id="503-retry-after"),
        pytest.param(503, None, "The gateway cannot judge requests right now. Retry later.",
                     id="503-no-retry-after"),
    ],
)  # fmt: skip
def test_render_error(status: int, retry_after: int | None, detail: str) -> None:
    rendered = render_error(status, "GET", now=NOW, retry_after=retry_after)
    body = check_common(rendered, status)
    assert body["detail"] == detail
    expected = list(BASE_HEADERS)
    if retry_after is not None:
        expected.append(("Retry-After", str(retry_after)))
    assert list(rendered.headers) == expected
    assert one_header(rendered, "WWW-Authenticate") is None
    head = render_error(status, "HEAD", now=NOW, retry_after=retry_after)
    assert head.body == b""
    assert head.headers == rendered.headers


def test_render_error_matches_render_for_same_status() -> None:
    assert render_error(500, "GET", NOW) == render(Decision(False, 500, "x"), "api", "GET", NOW)


# --- through decide(): 401/403/429 and hidden 404 -----------------------------------

SECRET = "0123456789abcdef0123456789abcdef"
ISS = "https://as.test"
POLICY = """
version: 1
realm: shop
authn:
  jwt:
    - {name: h, issuer: "https://as.test", algorithms: [HS256], secret_env: AUTHGATE_RESP_SECRET}
rules:
  - name: members
    match: {path: /members}
    allow: authenticated
  - name: writers
    match: {path: /w}
    allow: {all: [{scope: write}, {scope: admin}]}
  - name: admins
    match: {path: /admin}
    allow: {role: admin}
  - name: secret-stuff
    match: {path: "/priv/**"}
    allow: {role: admin}
    hide: true
  - name: limited
    match: {path: /limited}
    allow: anyone
    limits: [{name: burst, key: ip, rate: 3/minute}]
"""


@pytest.fixture
def policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Policy:
    monkeypatch.setenv("AUTHGATE_RESP_SECRET", SECRET)
    return parse_policy(POLICY, str(tmp_path / "policy.yaml"))


def bearer(**claims: Any) -> str:
    payload = {"iss": ISS, "sub": "alice", "exp": int(NOW) + 600, **claims}
    return "Bearer " + jwt.encode(payload, SECRET, algorithm="HS256")


def request(target: str, *authorization: str, method: str = "GET") -> RequestView:
    headers = tuple(("authorization", a) for a in authorization)
    return RequestView(method, target, headers, "192.0.2.10")


@pytest.mark.parametrize(
    ("req", "status", "challenge"),
    [
        pytest.param(request("/members"), 401, 'Bearer realm="shop"', id="no-credentials"),
        pytest.param(request("/members", "Digest username=x"), 401, 'Bearer realm="shop"',
                     id="unsupported-scheme"),
        pytest.param(request("/members", "Bearer abc.def.ghi"), 401,
                     'Bearer realm="shop", error="invalid_token", '
                     'error_description="The access token is malformed"', id="garbage-token"),
        pytest.param(request("/members", bearer(exp=int(NOW) - 100)), 401,
                     'Bearer realm="shop", error="invalid_token", '
                     'error_description="The access token expired"', id="expired-token"),
        pytest.param(request("/members", bearer(), bearer()), 400,
                     'Bearer realm="shop", error="invalid_request"', id="two-authorization"),
        pytest.param(request("/w", bearer(scope="read write")), 403,
                     'Bearer realm="shop", error="insufficient_scope", scope="admin"',
                     id="insufficient-scope"),
        pytest.param(request("/w", bearer(scope="read")), 403,
                     'Bearer realm="shop", error="insufficient_scope", scope="admin write"',
                     id="insufficient-scope-two"),
        pytest.param(request("/admin", bearer(roles=["user"])), 403, None, id="role-forbidden"),
    ],
)  # fmt: skip
def test_decided_denials_render(
    policy: Policy, req: RequestView, status: int, challenge: str | None
) -> None:
    decision = judge(policy, req, NOW, MemoryStore())
    rendered = render(decision, policy.realm, req.method, NOW)
    check_common(rendered, status)
    assert one_header(rendered, "WWW-Authenticate") == challenge
    if challenge is not None:
        scheme, params = parse_challenge(challenge)
        assert scheme == "Bearer"
    for secret in ("members", "admin", "alice", SECRET, "abc.def.ghi"):
        assert secret.encode() not in rendered.body


def test_429_headers(policy: Policy) -> None:
    limiter = MemoryStore()
    for _ in range(3):
        assert judge(policy, request("/limited"), NOW, limiter).allowed
    decision = judge(policy, request("/limited"), NOW, limiter)
    rendered = render(decision, policy.realm, "GET", NOW)
    check_common(rendered, 429)
    assert one_header(rendered, "WWW-Authenticate") is None
    retry_after = one_header(rendered, "Retry-After")
    policy_field = one_header(rendered, "RateLimit-Policy")
    limit_field = one_header(rendered, "RateLimit")
    assert retry_after is not None and policy_field is not None and limit_field is not None
    # delay-seconds, at least 1
    assert re.fullmatch(r"\d+", retry_after) and int(retry_after) >= 1
    # "name";q=N;w=N
    m = re.fullmatch(rf"({SF_STRING});q=(\d{{1,15}});w=(\d{{1,15}})", policy_field)
    assert m, policy_field
    assert (unquote(m.group(1)), int(m.group(2)), int(m.group(3))) == ("burst", 3, 60)
    # "name";r=0;t=N with the same name
    m2 = re.fullmatch(rf"({SF_STRING});r=(\d{{1,15}});t=(\d{{1,15}})", limit_field)
    assert m2, limit_field
    assert unquote(m2.group(1)) == "burst"
    assert int(m2.group(2)) == 0
    # Retry-After >= t
    assert int(retry_after) >= int(m2.group(3)) >= 1
    assert int(retry_after) == 20  # one of 3/minute comes back after 20 s
    # HEAD: same headers, no body (H-10)
    head = render(decision, policy.realm, "HEAD", NOW)
    assert head.body == b"" and head.headers == rendered.headers


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("per-ip", id="plain"),
        pytest.param("Per IP 2", id="upper-case-and-spaces"),
        pytest.param('say "hi"', id="quote"),
        pytest.param("back\\slash", id="backslash"),
        pytest.param("caf\u00e9", id="non-ascii"),
    ],
)
def test_limit_name_always_gives_a_valid_sf_string(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """R-03/R-04: the limit name travels as an sf-string, whatever the policy says."""
    text = (
        "version: 1\nlimits:\n  - name: " + json.dumps(name) + "\n    key: ip\n"
        "    rate: 1/minute\nrules:\n  - {name: r, match: {path: /}, allow: anyone}\n"
    )
    try:
        p = parse_policy(text, str(tmp_path / "p.yaml"))
    except PolicyError:
        return  # refusing such a name at load time is fine too
    limiter = MemoryStore()
    assert judge(p, request("/"), NOW, limiter).allowed
    rendered = render(judge(p, request("/"), NOW, limiter), p.realm, "GET", NOW)
    assert rendered.status == 429
    policy_field = one_header(rendered, "RateLimit-Policy") or ""
    limit_field = one_header(rendered, "RateLimit") or ""
    m = re.fullmatch(rf"({SF_STRING});q=1;w=60", policy_field)
    assert m, policy_field
    assert unquote(m.group(1)) == name
    assert re.fullmatch(rf"({SF_STRING});r=0;t=60", limit_field), limit_field


@pytest.mark.parametrize(
    "scope",
    [
        pytest.param("reports:write", id="plain"),
        pytest.param('say"hi', id="quote"),
        pytest.param("back\\slash", id="backslash"),
    ],
)
def test_scope_in_challenge_uses_allowed_characters(
    scope: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """B-10: scope values are %x21 / %x23-5B / %x5D-7E, whatever the policy says."""
    monkeypatch.setenv("AUTHGATE_RESP_SECRET", SECRET)
    text = (
        "version: 1\nauthn:\n  jwt:\n    - {name: h, issuer: 'https://as.test',"
        " algorithms: [HS256], secret_env: AUTHGATE_RESP_SECRET}\n"
        "rules:\n  - name: r\n    match: {path: /}\n    allow: {scope: " + json.dumps(scope) + "}\n"
    )
    try:
        p = parse_policy(text, str(tmp_path / "p.yaml"))
    except PolicyError:
        return  # refusing such a scope at load time is fine too
    decision = judge(p, request("/", bearer(scope="read")), NOW, MemoryStore())
    value = one_header(render(decision, p.realm, "GET", NOW), "WWW-Authenticate") or ""
    _, params = parse_challenge(value)
    scopes = [text for name, _, text in params if name == "scope"]
    assert scopes == [scope]
    assert SCOPE_CHARS.match(scopes[0]), scopes[0]


@pytest.mark.parametrize(
    "req",
    [
        pytest.param(request("/priv/x"), id="anonymous"),
        pytest.param(request("/priv/x", bearer(roles=["user"])), id="wrong-role"),
        pytest.param(request("/priv/x", bearer(exp=int(NOW) - 100)), id="expired-token"),
        pytest.param(request("/priv/x", "Bearer abc.def.ghi"), id="garbage-token"),
        pytest.param(request("/priv/x", bearer(), bearer()), id="two-authorization"),
        pytest.param(request("/priv/x", "Digest x=y"), id="other-scheme"),
        pytest.param(request("/priv/x", method="DELETE"), id="delete"),
    ],
)
def test_hidden_404_equals_unknown_path_404(policy: Policy, req: RequestView) -> None:
    """X-01, C-02: same status, headers (except Date) and body as a path with no rule."""
    hidden = judge(policy, req, NOW, MemoryStore())
    assert (hidden.status, hidden.reason) == (404, HIDDEN)
    unknown_req = RequestView(req.method, "/does-not-exist", req.headers, req.peer)
    unknown = judge(policy, unknown_req, NOW, MemoryStore())
    assert (unknown.status, unknown.reason) == (404, NO_RULE)
    for method in ("GET", "HEAD"):
        a = render(hidden, policy.realm, method, NOW)
        b = render(unknown, policy.realm, method, NOW + 3600)
        assert a.status == b.status == 404
        assert a.body == b.body
        assert [h for h in a.headers if h[0] != "Date"] == [h for h in b.headers if h[0] != "Date"]
        assert one_header(a, "Cache-Control") == "no-store"
    check_common(render(hidden, policy.realm, "GET", NOW), 404)
