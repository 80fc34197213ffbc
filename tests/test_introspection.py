"""Opaque access tokens, checked by RFC 7662 token introspection.

The pure parts as tables and properties: what an answer means, how long it is
remembered, the backoff, which tokens are asked about, the request the
gateway sends, the policy's `introspection:`. Then for real: a real
`authgate run` gateway (the lean mitmproxy master) in front of a recording
upstream, asking a real OpenID provider (panva's oidc-provider, which issues
opaque access tokens) that is slowed, stopped and started again mid-run; and
two gateway processes sharing answers on a real redis-server.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate.core.introspection import (
    ALL,
    MAX_ANSWER,
    OPAQUE,
    Entry,
    Introspected,
    IntrospectionConfig,
    ProviderBroken,
    cache_until,
    entry_for,
    identity_of,
    introspecting_issuer,
    jwt_shaped,
    read_answer,
    token_digest,
)
from authgate.core.tokens import Issuer, TokenRejected
from authgate.policy.load import parse_policy
from authgate.policy.marks import PolicyError
from authgate.runtime.introspection import decode_shared, encode_shared, request_for

NOW = 1_800_000_000.0
ISS = "https://login.example"


def issuer(**kw: Any) -> Issuer:
    """An issuer that introspects (tokens: all unless said otherwise)."""
    tokens = kw.pop("tokens", ALL)
    config = IntrospectionConfig(ISS, "https://login.example/introspect", "gw", "s", tokens=tokens)
    fields: dict[str, Any] = {
        "name": "login",
        "issuer": ISS,
        "audience": (),
        "algorithms": frozenset(),
        "keys": (),
        "leeway": 0.0,
        "roles_claim": ("roles",),
        "scope_claim": ("scope",),
        "require_exp": True,
        "introspection": Introspected(config),
    }
    fields.update(kw)
    return Issuer(**fields)


ACTIVE = {"active": True, "sub": "dana", "scope": "read write", "exp": NOW + 600, "iss": ISS}


# --- an answer -> an identity, or why not ----------------------------------------------

IDENTITIES = [
    # (answer, issuer settings, (subject, scopes, roles) or the code it is refused with)
    (ACTIVE, {}, ("dana", {"read", "write"}, set())),
    ({**ACTIVE, "roles": ["admin"]}, {}, ("dana", {"read", "write"}, {"admin"})),
    ({"active": True, "client_id": "reports"}, {}, ("reports", set(), set())),  # no sub, no exp
    (
        {**ACTIVE, "realm": {"roles": ["ops"]}},
        {"roles_claim": ("realm", "roles")},
        ("dana", {"read", "write"}, {"ops"}),
    ),
    ({**ACTIVE, "aud": ["x", "api"]}, {"audience": ("api",)}, ("dana", {"read", "write"}, set())),
    ({**ACTIVE, "aud": "api"}, {"audience": ("api",)}, ("dana", {"read", "write"}, set())),
    ({**ACTIVE, "token_type": "bearer"}, {}, ("dana", {"read", "write"}, set())),
    ({"active": False}, {}, "inactive"),
    ({"active": False, "sub": "dana"}, {}, "inactive"),
    ({**ACTIVE, "iss": ISS + "/"}, {}, "wrong_issuer"),
    (ACTIVE, {"audience": ("api",)}, "missing_claim"),
    ({**ACTIVE, "aud": "API"}, {"audience": ("api",)}, "wrong_audience"),
    ({**ACTIVE, "aud": 5}, {"audience": ("api",)}, "malformed_claim"),
    ({**ACTIVE, "token_type": "DPoP"}, {}, "wrong_type"),
    ({**ACTIVE, "token_type": "refresh_token"}, {}, "wrong_type"),
    ({**ACTIVE, "cnf": {"jkt": "abc"}}, {}, "wrong_type"),
    ({**ACTIVE, "exp": NOW - 1}, {}, "expired"),
    ({**ACTIVE, "exp": NOW - 1}, {"leeway": 30.0}, ("dana", {"read", "write"}, set())),
    ({**ACTIVE, "exp": "tomorrow"}, {}, "malformed_claim"),
    ({**ACTIVE, "nbf": NOW + 60}, {}, "not_yet_valid"),
    ({**ACTIVE, "iat": NOW - 7200}, {"max_token_age": 3600.0}, "too_old"),
    (ACTIVE, {"required_claims": ("client_id",)}, "missing_claim"),
    ({"active": True, "exp": NOW + 60}, {}, "missing_claim"),  # neither sub nor client_id
    ({**ACTIVE, "sub": "da\nna"}, {}, "malformed_claim"),  # would forge a header line
    ({**ACTIVE, "sub": 7}, {}, "malformed_claim"),
    ({**ACTIVE, "scope": ["read"]}, {}, ("dana", {"read"}, set())),
    ({**ACTIVE, "scope": 3}, {}, "malformed_claim"),
    ({**ACTIVE, "roles": ["a,b"]}, {}, "malformed_claim"),  # X-Auth-Roles is comma-separated
]


@pytest.mark.parametrize("answer,settings,expected", IDENTITIES)
def test_what_an_answer_proves(answer: dict[str, Any], settings: dict[str, Any],
                               expected: Any) -> None:  # fmt: skip
    who_from = issuer(**settings)
    if isinstance(expected, str):
        with pytest.raises(TokenRejected) as e:
            identity_of(answer, who_from, NOW)
        assert e.value.code == expected
        return
    who = identity_of(answer, who_from, NOW)
    subject, scopes, roles = expected
    assert (who.subject, set(who.scopes), set(who.roles)) == (subject, scopes, roles)
    assert who.issuer == ISS and who.method == "jwt"  # a bearer token: insufficient_scope applies
    assert who.claims == answer  # conditions read the answer's members


ANSWERS = [
    # (status, body, what is wrong or None)
    (200, b'{"active": true, "sub": "a"}', None),
    (200, b'{"active": false}', None),
    (200, b'{"active": "true"}', "no boolean 'active'"),
    (200, b'{"sub": "a"}', "no boolean 'active'"),
    (200, b"[]", "not a JSON object"),
    (200, b"<html>sorry</html>", "not JSON"),
    (200, b'{"active": true, "exp": NaN}', "not JSON"),
    (200, b"", "not JSON"),
    (200, b'{"active": true, "x": ' + b"[" * 40 + b"]" * 40 + b"}", "not JSON"),
    (200, b'{"active": false, "x": "' + b"a" * MAX_ANSWER + b'"}', "larger than"),
    (401, b'{"error": "invalid_client"}', "refused the gateway's request"),
    (400, b'{"active": false}', "refused the gateway's request"),
    (500, b'{"active": false}', "HTTP 500"),
    (302, b"", "HTTP 302"),
]


@pytest.mark.parametrize("status,body,problem", ANSWERS)
def test_an_answer_that_is_not_an_introspection_answer_is_the_providers_failure(
    status: int, body: bytes, problem: str | None
) -> None:
    if problem is None:
        assert isinstance(read_answer(status, body)["active"], bool)
    else:
        with pytest.raises(ProviderBroken, match=problem):
            read_answer(status, body)


@given(st.integers(100, 599), st.binary(max_size=300))
def test_any_bytes_are_an_answer_or_the_providers_failure(status: int, body: bytes) -> None:
    # Fail closed: nothing the provider sends raises anything but ProviderBroken.
    try:
        doc = read_answer(status, body)
    except ProviderBroken:
        return
    assert status == 200 and isinstance(doc, dict) and isinstance(doc["active"], bool)


MEMBERS = ["active", "sub", "scope", "exp", "aud", "iss", "roles", "client_id", "token_type", "nbf"]
# Members as providers send them, and as they should not: each a plausible value or junk.
member_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from([ISS, "api", "read write", "Bearer", "DPoP", NOW + 60, NOW - 60]),
    st.lists(st.sampled_from(["api", "a,b", "x y", "", "ok"]), max_size=3),
    st.fixed_dictionaries({"roles": st.lists(st.text(max_size=4), max_size=2)}),
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from(MEMBERS), member_values))
def test_any_answer_proves_an_identity_or_is_refused(answer: dict[str, Any]) -> None:
    try:
        who = identity_of(answer, issuer(audience=("api",)), NOW)
    except TokenRejected:
        return
    assert answer["active"] is True
    assert isinstance(who.subject, str) and who.subject


# --- how long an answer is remembered --------------------------------------------------

LIFETIMES = [
    # (answer, cache_max, negative, leeway, seconds from now)
    ({"active": True, "exp": NOW + 600}, 60.0, 10.0, 0.0, 60.0),  # cache_max first
    ({"active": True, "exp": NOW + 20}, 60.0, 10.0, 0.0, 20.0),  # exp first
    ({"active": True, "exp": NOW + 20}, 60.0, 10.0, 5.0, 25.0),  # the leeway counts
    ({"active": True}, 60.0, 10.0, 0.0, 60.0),  # no exp: cache_max
    ({"active": True, "exp": "soon"}, 60.0, 10.0, 0.0, 60.0),  # refused anyway; cache_max
    ({"active": True, "exp": NOW - 5}, 60.0, 10.0, 0.0, -5.0),  # expired: never fresh
    ({"active": False}, 60.0, 10.0, 0.0, 10.0),
    ({"active": False, "exp": NOW + 600}, 60.0, 3.0, 0.0, 3.0),
]


@pytest.mark.parametrize("answer,cache_max,negative,leeway,seconds", LIFETIMES)
def test_cache_lifetime(answer: dict[str, Any], cache_max: float, negative: float,
                        leeway: float, seconds: float) -> None:  # fmt: skip
    assert cache_until(answer, NOW, cache_max, negative, leeway) == NOW + seconds


@given(
    st.booleans(),
    st.one_of(st.none(), st.floats(-1e6, 1e6)),
    st.floats(1, 86400),
    st.floats(1, 3600),
    st.floats(0, 600),
)
def test_an_answer_is_never_used_past_exp_nor_cache_max(
    active: bool, exp_in: float | None, cache_max: float, negative: float, leeway: float
) -> None:
    answer: dict[str, Any] = {"active": active}
    if exp_in is not None:
        answer["exp"] = NOW + exp_in
    until = cache_until(answer, NOW, cache_max, negative, leeway)
    if not active:
        assert until == NOW + negative
        return
    assert until <= NOW + cache_max
    if exp_in is not None:
        assert until <= NOW + exp_in + leeway
        assert until == min(NOW + cache_max, NOW + exp_in + leeway)


def test_a_remembered_answer_is_used_while_fresh_and_tells_expiry_after() -> None:
    who_from = issuer()
    source = who_from.introspection
    assert source is not None
    digest = token_digest("t")
    source.remember(digest, entry_for({**ACTIVE, "exp": NOW + 100}, who_from, NOW,
                                      source.config), NOW)  # fmt: skip
    assert source.lookup(digest, NOW + 59) is not None  # fresh: cache_max is 60 s
    assert source.lookup(digest, NOW + 61) is None  # stale: ask again
    stale = source.lookup(digest, NOW + 100)  # its exp passed: no need to ask, it is expired
    assert stale is not None and stale.exp == NOW + 100
    source.remember(token_digest("u"), entry_for({"active": False}, who_from, NOW,
                                                 source.config), NOW)  # fmt: skip
    assert source.lookup(token_digest("u"), NOW + 9) is not None  # negative_cache 10 s
    assert source.lookup(token_digest("u"), NOW + 11) is None


def test_answers_are_remembered_by_digest_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from authgate.core import introspection

    monkeypatch.setattr(introspection, "MAX_CACHED", 4)
    source = issuer().introspection
    assert source is not None
    for i in range(10):
        source.remember(token_digest(f"t{i}"), Entry(NOW + 60, None, "inactive"), NOW)
        assert len(source) <= 4
    assert source.lookup(token_digest("t9"), NOW) is not None
    assert all(len(k) == 32 for k in source._known)  # SHA-256 digests, never the token


def test_backoff_after_failures_lets_one_call_probe() -> None:
    source = issuer().introspection
    assert source is not None
    assert source.may_call(NOW) and source.may_call(NOW)  # no failure: calls go
    assert source.failed("refused", NOW) == 1.0
    assert source.retry_after(NOW) == 1
    assert not source.may_call(NOW + 0.5)  # backing off: 503 at once
    assert source.may_call(NOW + 1.0)  # the probe
    assert not source.may_call(NOW + 1.0)  # one at a time
    assert source.failed("refused", NOW + 1.0) == 2.0
    assert source.retry_after(NOW + 1.5) == 2
    for _ in range(10):
        backoff = source.failed("refused", NOW)
    assert backoff == 30.0  # capped
    source.succeeded()
    assert source.may_call(NOW) and source.last_error is None and source.retry_after(NOW) == 1


# --- which tokens are asked about ------------------------------------------------------


def _jwt(iss: str) -> str:
    head = base64.urlsafe_b64encode(b'{"alg":"RS256","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps({"iss": iss}).encode()).rstrip(b"=").decode()
    return f"{head}.{body}.c2ln"


ROUTES = [
    # (token, tokens setting, asked about)
    ("Aw54NCb5Fcy_awc7StuNFJfLl0bqCA6zoQRyIUryxhT", OPAQUE, True),
    ("Aw54NCb5Fcy_awc7StuNFJfLl0bqCA6zoQRyIUryxhT", ALL, True),
    ("a.b.c", OPAQUE, True),  # three segments, but not a JWT's header
    ("abc.def", OPAQUE, True),
    (_jwt(ISS), OPAQUE, False),  # a JWT: verified with the issuer's keys
    (_jwt(ISS), ALL, True),  # a JWT of this issuer: asked about too
    (_jwt("https://other.example"), ALL, False),  # another issuer's JWT: verified by it
    (_jwt(ISS) + ".x.y", OPAQUE, True),  # five segments (a JWE) is opaque here
]


@pytest.mark.parametrize("token,tokens,asked", ROUTES)
def test_which_tokens_are_introspected(token: str, tokens: str, asked: bool) -> None:
    assert introspecting_issuer(issuer(tokens=tokens), token) is asked
    assert jwt_shaped(token) is (token.count(".") == 2 and token.startswith("eyJ"))


# --- the request the gateway sends -------------------------------------------------------


def test_the_request_authenticates_the_gateway_as_rfc_6749_says() -> None:
    config = IntrospectionConfig(ISS, None, "gate way:1", "p@ss:w/rd+", "client_secret_basic")
    body, headers = request_for(config, "tok+en/=")
    form = urllib.parse.parse_qs(body.decode())
    assert form == {"token": ["tok+en/="], "token_type_hint": ["access_token"]}
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    # RFC 6749 §2.3.1: the id and the secret are form-encoded before Basic.
    decoded = base64.b64decode(headers["Authorization"].removeprefix("Basic ")).decode()
    user, _, password = decoded.partition(":")
    assert (urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)) == (
        "gate way:1",
        "p@ss:w/rd+",
    )
    post = IntrospectionConfig(ISS, None, "gw", "hunter2", "client_secret_post")
    body, headers = request_for(post, "t")
    assert "Authorization" not in headers
    assert urllib.parse.parse_qs(body.decode())["client_secret"] == ["hunter2"]
    assert "hunter2" not in repr(post)  # the secret never shows in a repr or a log line


def test_the_shared_cache_keeps_the_answer_and_its_end() -> None:
    data = encode_shared(ACTIVE, NOW + 30)
    assert decode_shared(data) == (ACTIVE, NOW + 30)
    for junk in (b"", b"{}", b"[1]", b'{"until": 1, "answer": {"sub": "x"}}',
                 b'{"until": "x", "answer": {"active": true}}'):  # fmt: skip
        assert decode_shared(junk) is None


# --- the policy -------------------------------------------------------------------------

RULES = "rules:\n  - {name: api, match: {path: /api/**}, allow: authenticated}\n"


def load(tmp: Path, introspection: str, extra: str = "", mode: int = 0o600) -> Any:
    (tmp / "client.secret").write_text("s3cret\n")
    os.chmod(tmp / "client.secret", mode)
    text = (
        "version: 1\nauthn:\n  jwt:\n"
        f"    - name: login\n      issuer: {ISS}\n{extra}"
        f"      introspection:\n{introspection}" + RULES
    )
    return parse_policy(text, str(tmp / "p.yaml"), tmp)


GOOD = (
    "        endpoint: https://login.example/introspect\n        client_id: gw\n"
    "        client_secret_file: client.secret\n        tokens: all\n"
)
PROBLEMS = [
    # (introspection lines, issuer lines, message)
    (
        GOOD.replace("        endpoint: https://login.example/introspect\n", ""),
        "",
        "needs exactly one of endpoint, discovery",
    ),
    (GOOD + "        discovery: true\n", "", "needs exactly one of endpoint, discovery"),
    (
        GOOD.replace("https://login.example", "http://login.example"),
        "",
        "plain http to a non-loopback host",
    ),
    (GOOD.replace("        client_id: gw\n", ""), "", "needs 'client_id'"),
    (
        GOOD.replace("client_secret_file: client.secret", "client_secret_env: NO_SUCH_VAR_X"),
        "",
        "environment variable NO_SUCH_VAR_X is not set",
    ),
    (
        GOOD.replace("client_secret_file: client.secret", "client_secret_file: nowhere"),
        "",
        "cannot read client secret file",
    ),
    (GOOD + "        client_secret_env: X\n", "", "exactly one of client_secret_file"),
    (GOOD + "        auth: private_key_jwt\n", "", "auth must be client_secret_basic or"),
    (GOOD.replace("tokens: all", "tokens: jwt"), "", "tokens must be opaque"),
    (GOOD + "        cache_max: 0s\n", "", "cache_max must be more than 0"),
    (GOOD + "        timeout: 1m\n", "", "timeout must be more than 0 and at most 30s"),
    (GOOD + "        ttl: 5m\n", "", "unknown key 'ttl'"),
    (GOOD, "      algorithms: [RS256]\n", "every token of this issuer is introspected"),
    (GOOD, "      typ: at+jwt\n", "every token of this issuer is introspected"),
    (GOOD.replace("tokens: all", "tokens: opaque"), "", "needs 'algorithms'"),
]


@pytest.mark.parametrize("introspection,extra,message", PROBLEMS)
def test_policy_problems_name_the_line(tmp_path: Path, introspection: str, extra: str,
                                       message: str) -> None:  # fmt: skip
    with pytest.raises(PolicyError, match=message) as e:
        load(tmp_path, introspection, extra)
    assert e.value.line is not None and e.value.file.endswith("p.yaml")


def test_the_secret_is_read_once_at_load_and_its_file_watched(tmp_path: Path) -> None:
    policy = load(tmp_path, GOOD)
    [iss] = policy.issuers
    assert iss.introspection is not None
    config = iss.introspection.config
    assert config.client_secret == "s3cret"  # the file's final newline is not the secret's
    assert (config.cache_max, config.negative_cache, config.timeout) == (60, 10, 2)
    assert str(tmp_path / "client.secret") in policy.files  # a new secret reloads the policy
    assert config.secret_mode == 0o600


def test_two_introspecting_issuers_are_refused(tmp_path: Path) -> None:
    (tmp_path / "client.secret").write_text("s")
    text = (
        "version: 1\nauthn:\n  jwt:\n"
        + "".join(
            f"    - name: i{n}\n      issuer: https://i{n}.example\n      introspection:\n"
            + GOOD.replace("login.example", f"i{n}.example")
            for n in (1, 2)
        )
        + RULES
    )
    with pytest.raises(PolicyError, match="issuers 'i1' and 'i2' both introspect"):
        parse_policy(text, str(tmp_path / "p.yaml"), tmp_path)


def test_check_warns_about_a_secret_file_others_can_read(tmp_path: Path) -> None:
    from authgate.tools.lint import lint

    policy = load(tmp_path, GOOD)
    assert [f.code for f in lint(policy)] == []
    [finding] = lint(load(tmp_path, GOOD, mode=0o640))
    assert finding.code == "secret-readable"
    assert "chmod 600" in finding.message and finding.line is not None
