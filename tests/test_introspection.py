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
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
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
from conftest import POLICIES, Backend, RunningGateway, send, wait_until
from oidc_provider import OpenIDProvider, request
from redis_server import RedisServer
from test_production import Gateway, run, status
from test_service import Serve, ask, auth
from test_startup import free_port

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


# --- for real: a gateway, a recording upstream, a real OpenID provider -----------------

GATEWAY_SECRET = "gateway-secret-0123456789-abcdefghij"
SERVICE_SECRET = "service-secret-0123456789-abcdefghij"


def _client(client_id: str, secret: str, auth: str = "client_secret_basic") -> dict[str, Any]:
    return {
        "client_id": client_id,
        "client_secret": secret,
        "grant_types": ["client_credentials"],
        "redirect_uris": [],
        "response_types": [],
        "token_endpoint_auth_method": auth,
    }


# The gateway's own client (both ways of authenticating), and two services
# that get opaque tokens for themselves (client_credentials); the provider adds
# `roles` to admin-svc's tokens, which its introspection answers then carry.
CLIENTS = [
    _client("gateway", GATEWAY_SECRET),
    _client("gateway-post", GATEWAY_SECRET, "client_secret_post"),
    _client("svc", SERVICE_SECRET),
    _client("admin-svc", SERVICE_SECRET),
]
PROVIDER: dict[str, Any] = {
    "clients": CLIENTS,
    "scopes": ["read", "write"],
    "token_claims": {"admin-svc": {"roles": ["admin"]}},
}


@pytest.fixture(scope="module")
def op() -> Iterator[OpenIDProvider]:
    """One provider for the tests that do not stop it."""
    with OpenIDProvider(**PROVIDER) as provider:
        yield provider


def _basic(client: str, secret: str = SERVICE_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{client}:{secret}".encode()).decode()


def grant(op: OpenIDProvider, client: str = "svc", scope: str = "read") -> str:
    """An opaque access token the provider issues to `client` for itself."""
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": scope}).encode()
    code, _, body = request("POST", op.metadata()["token_endpoint"], {
        "Authorization": _basic(client),
        "Content-Type": "application/x-www-form-urlencoded",
    }, form)  # fmt: skip
    assert code == 200, body
    token: str = json.loads(body)["access_token"]
    assert "." not in token  # opaque: not a JWT
    return token


def revoke(op: OpenIDProvider, token: str, client: str = "svc") -> None:
    """RFC 7009 revocation by the client the token was issued to."""
    form = urllib.parse.urlencode({"token": token}).encode()
    code, _, body = request("POST", op.metadata()["revocation_endpoint"], {
        "Authorization": _basic(client),
        "Content-Type": "application/x-www-form-urlencoded",
    }, form)  # fmt: skip
    assert code == 200, body


def write_policy(tmp: Path, op: OpenIDProvider, **settings: str) -> Path:
    """The provider's issuer introspects every token it issued (tokens: all),
    the gateway authenticating as `gateway` with a secret from a file; the demo
    issuer's JWTs are verified with its keys beside it."""
    secret = tmp / "introspection.secret"
    secret.write_text(settings.pop("secret", GATEWAY_SECRET) + "\n")
    os.chmod(secret, 0o600)
    where = settings.pop("where", "discovery: true")
    lines = "".join(f"        {k}: {v}\n" for k, v in settings.items())
    if "client_id" not in settings:
        lines += "        client_id: gateway\n"
    policy = tmp / "opaque.yaml"
    policy.write_text(
        "version: 1\nauthn:\n  jwt:\n"
        f"    - name: op\n      issuer: {op.issuer}\n      roles_claim: roles\n"
        "      introspection:\n"
        f"        {where}\n        client_secret_file: introspection.secret\n"
        f"        tokens: all\n{lines}"
        "    - name: demo\n      issuer: https://issuer.example\n      audience: api\n"
        f"      algorithms: [RS256]\n      jwks_file: {POLICIES / 'keys' / 'jwks.json'}\n"
        "rules:\n"
        "  - {name: read, match: {path: /api/read}, allow: {scope: read}}\n"
        "  - {name: write, match: {path: /api/write}, allow: {scope: write}}\n"
        "  - {name: admin, match: {path: /admin/**}, allow: {role: admin}}\n"
    )
    return policy


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def get(gw: RunningGateway, path: str, token: str) -> Any:
    return send(gw.address, "GET", path, bearer(token))


def introspection_status(gw: RunningGateway) -> dict[str, Any]:
    st: dict[str, Any] = gw.addon.house.status()["introspection"]
    return next(iter(st.values()))


def test_an_opaque_token_is_allowed_with_its_identity(
    op: OpenIDProvider, start_gateway: Callable[..., RunningGateway], backend: Backend,
    tmp_path: Path,
) -> None:  # fmt: skip
    gw = start_gateway(write_policy(tmp_path, op))
    token = grant(op, "admin-svc", "read")
    r = get(gw, "/api/read", token)
    assert r.status == 200, r.body
    [seen] = backend.seen
    assert seen.target == "/api/read"
    # client_credentials: the token is the client's own, so it has no sub: the client is the subject
    assert seen.header("X-Auth-Subject") == "admin-svc"
    assert seen.header("X-Auth-Scopes") == "read"
    assert seen.header("X-Auth-Roles") == "admin"  # from the answer's roles member
    assert seen.header("X-Auth-Issuer") == op.issuer
    assert get(gw, "/admin/users", token).status == 200
    assert get(gw, "/admin/users", grant(op, "svc", "read")).status == 403  # no admin role
    st = introspection_status(gw)
    assert st["endpoint"] == op.metadata()["introspection_endpoint"]  # found by discovery


def test_scopes_come_from_the_answer(
    op: OpenIDProvider, start_gateway: Callable[..., RunningGateway], backend: Backend,
    tmp_path: Path,
) -> None:  # fmt: skip
    gw = start_gateway(write_policy(tmp_path, op))
    reader = grant(op, "svc", "read")
    r = get(gw, "/api/write", reader)
    assert r.status == 403
    assert r.header("WWW-Authenticate") == (
        'Bearer realm="api", error="insufficient_scope", scope="write"'
    )
    assert backend.seen == []
    writer = grant(op, "svc", "read write")
    assert get(gw, "/api/write", writer).status == 200
    assert backend.seen[-1].header("X-Auth-Scopes") == "read,write"


def test_revoked_and_unknown_tokens_are_401_and_remembered_briefly(
    op: OpenIDProvider, start_gateway: Callable[..., RunningGateway], backend: Backend,
    tmp_path: Path,
) -> None:  # fmt: skip
    gw = start_gateway(write_policy(tmp_path, op, cache_max="1s", negative_cache="1m"))
    token = grant(op)
    assert get(gw, "/api/read", token).status == 200
    revoke(op, token)
    # Remembered for at most cache_max (1 s): then the provider says active: false.
    wait_until(lambda: get(gw, "/api/read", token).status == 401, 30)
    backend.clear()
    r = get(gw, "/api/read", token)
    assert r.status == 401 and 'error="invalid_token"' in (r.header("WWW-Authenticate") or "")
    assert backend.seen == []
    # Unknown to the provider: 401, and the answer is remembered (negative_cache).
    before = op.introspections()
    for _ in range(3):
        r = get(gw, "/api/read", "no-such-token-0123456789")
        assert r.status == 401 and 'error="invalid_token"' in (r.header("WWW-Authenticate") or "")
    assert op.introspections() == before + 1
    assert backend.seen == []


def test_jwts_of_another_issuer_are_verified_beside_without_asking(
    op: OpenIDProvider, start_gateway: Callable[..., RunningGateway], backend: Backend,
    tmp_path: Path, token: Callable[..., str],
) -> None:  # fmt: skip
    gw = start_gateway(write_policy(tmp_path, op))
    before = op.introspections()
    assert get(gw, "/api/read", token(sub="jo", scopes=["read"])).status == 200
    assert backend.seen[-1].header("X-Auth-Subject") == "jo"
    assert get(gw, "/api/read", token(sub="jo", scopes=["read"], ttl=-60)).status == 401
    assert op.introspections() == before  # JWTs were never sent to the provider
    assert introspection_status(gw)["calls"] == 0


def test_one_call_in_flight_for_many_requests_with_one_token(
    op: OpenIDProvider, start_gateway: Callable[..., RunningGateway], backend: Backend,
    tmp_path: Path,
) -> None:  # fmt: skip
    gw = start_gateway(write_policy(tmp_path, op))
    token = grant(op)
    before = op.introspections()
    op.slow_introspection(800)  # every request below arrives while the one call is out
    try:
        replies: list[int] = []
        threads = [
            threading.Thread(target=lambda: replies.append(get(gw, "/api/read", token).status))
            for _ in range(12)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        op.slow_introspection(0)
    assert replies == [200] * 12
    assert len(backend.seen) == 12
    assert op.introspections() == before + 1  # counted by the provider itself
    assert introspection_status(gw)["calls"] == 1


def test_the_provider_going_away(
    start_gateway: Callable[..., RunningGateway], backend: Backend, tmp_path: Path
) -> None:
    # Tokens live 6 s; answers are remembered 3 s at most (time enough for the
    # provider to stop on a busy machine).
    with OpenIDProvider(**PROVIDER, ttl={"ClientCredentials": 6}) as op:
        gw = start_gateway(write_policy(tmp_path, op, cache_max="3s"))
        known, unseen = grant(op), grant(op)
        assert get(gw, "/api/read", known).status == 200
        asked_at = time.time()
        op.stop()
        backend.clear()
        # The remembered answer still counts.
        assert get(gw, "/api/read", known).status == 200
        assert len(backend.seen) == 1
        # A token the provider has not answered for: 503 with Retry-After, never 401.
        r = get(gw, "/api/read", unseen)
        assert r.status == 503
        assert int(r.header("Retry-After") or 0) >= 1
        assert "WWW-Authenticate" not in dict(r.headers)
        assert len(backend.seen) == 1  # nothing more reached the upstream
        # Past cache_max, the known token must be asked about again: 503 as well.
        r = wait_until(lambda: (x := get(gw, "/api/read", known)).status != 200 and x, 30)
        assert r.status == 503 and time.time() - asked_at >= 3 - 0.5
        forwarded = len(backend.seen)
        # Past its exp, the provider's own answer says it is expired: 401, not 503.
        r = wait_until(lambda: (x := get(gw, "/api/read", known)).status != 503 and x, 30)
        assert r.status == 401 and 'error="invalid_token"' in (r.header("WWW-Authenticate") or "")
        assert len(backend.seen) == forwarded  # neither the 503s nor the 401 reached it
        assert introspection_status(gw)["last_error"]
        # The provider back (its tokens were in memory: a new one); after the backoff, 200.
        op.start()
        fresh = grant(op)
        wait_until(lambda: get(gw, "/api/read", fresh).status == 200, 60)
        assert introspection_status(gw)["last_error"] is None


def test_the_gateway_authenticates_with_client_secret_post_and_a_wrong_secret_is_503(
    op: OpenIDProvider, start_gateway: Callable[..., RunningGateway], backend: Backend,
    tmp_path: Path,
) -> None:  # fmt: skip
    endpoint = op.metadata()["introspection_endpoint"]
    post = tmp_path / "post"
    post.mkdir()
    settings = {"client_id": "gateway-post", "auth": "client_secret_post"}
    gw = start_gateway(write_policy(post, op, where=f"endpoint: {endpoint}", **settings))
    assert get(gw, "/api/read", grant(op)).status == 200
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    gw = start_gateway(write_policy(wrong, op, secret="not-the-secret"))
    backend.clear()
    r = get(gw, "/api/read", grant(op))
    # The provider refused the gateway, not the token: 503, never 401.
    assert r.status == 503 and int(r.header("Retry-After") or 0) >= 1
    assert backend.seen == []
    assert "refused the gateway's request" in introspection_status(gw)["last_error"]


def test_two_gateway_processes_share_answers_on_redis(
    op: OpenIDProvider, tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    policy = write_policy(tmp_path, op)
    args = ("--policy", str(policy), "--upstream", backend.url, "--store", redis_server.url)
    gateways: list[Gateway] = []
    try:
        a = run(gateways, tmp_path, *args, name="a")
        b = run(gateways, tmp_path, *args, name="b")
        a.wait_ready()
        b.wait_ready()
        token = grant(op)
        before = op.introspections()
        assert send(a.address, "GET", "/api/read", bearer(token)).status == 200
        assert send(b.address, "GET", "/api/read", bearer(token)).status == 200
        assert op.introspections() == before + 1  # b found a's answer in Redis
        assert len(backend.seen) == 2
        [st] = status(b.admin)["introspection"].values()
        assert (st["calls"], st["shared_hits"]) == (0, 1)
        # A token the provider says is not active: shared too.
        for g in (a, b):
            assert send(g.address, "GET", "/api/read", bearer("unknown-0123456789")).status == 401
        assert op.introspections() == before + 2
    finally:
        for g in gateways:
            g.stop()


def test_a_reload_keeps_the_answers_while_the_issuer_reads_them_alike(tmp_path: Path) -> None:
    from authgate.runtime.reload import carry_over

    old = load(tmp_path, GOOD)
    kept = carry_over(old, load(tmp_path, GOOD))
    assert kept.issuers[0].introspection is old.issuers[0].introspection
    for changed, extra in ((GOOD + "        cache_max: 2m\n", ""), (GOOD, "      audience: x\n")):
        fresh = carry_over(old, load(tmp_path, changed, extra))
        assert fresh.issuers[0].introspection is not old.issuers[0].introspection


def test_policy_tests_stand_in_for_the_provider(tmp_path: Path) -> None:
    from authgate.tools.policytests import run_policy

    (tmp_path / "client.secret").write_text("s")
    (tmp_path / "p.yaml").write_text(
        "version: 1\nauthn:\n  jwt:\n"
        f"    - name: login\n      issuer: {ISS}\n      algorithms: [RS256]\n"
        f"      jwks_file: {POLICIES / 'keys' / 'jwks.json'}\n"
        "      introspection:\n"
        + GOOD.replace("tokens: all", "tokens: opaque")
        + RULES
        + "tests:\n"
        "  - {name: a JWT, request: {path: /api/x}, token: {sub: a}, expect: {status: 200}}\n"
        "  - name: an opaque token\n    request: {path: /api/x}\n"
        "    token: {opaque: true, sub: b}\n"
        "    expect: {status: 200, headers: {X-Auth-Subject: b}}\n"
        "  - name: an inactive one\n    request: {path: /api/x}\n"
        "    token: {opaque: true, active: false}\n"
        "    expect: {status: 401, reason: invalid_token}\n"
        "  - name: an unknown opaque token is never asked about\n"
        "    request: {path: /api/x, headers: {Authorization: Bearer Zm9vYmFyYmF6}}\n"
        "    expect: {status: 503, reason: introspection_unavailable}\n"
    )
    from authgate.policy.load import load_policy

    report = run_policy(load_policy(tmp_path / "p.yaml"))
    assert [o.problems for o in report.outcomes] == [()] * 4
    details = [o.explanation.lines for o in report.outcomes]
    assert any("opaque bearer token" in line for line in details[1])
    assert not any("opaque" in line for line in details[0])  # the JWT was verified


def test_the_store_caches_values_with_an_expiry(redis_server: RedisServer) -> None:
    import asyncio

    from authgate.runtime.redis_store import RedisStore
    from authgate.runtime.stores import StoreUnavailable

    async def body() -> None:
        store = RedisStore.from_url(redis_server.url, timeout=1.0)
        nowhere = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
        try:
            key = f"introspection|t|{os.urandom(8).hex()}"
            assert await store.cache_get(key) is None
            await store.cache_put(key, b"answer", 0.3)
            assert await store.cache_get(key) == b"answer"
            await asyncio.sleep(0.6)
            assert await store.cache_get(key) is None  # expired in Redis itself
            with pytest.raises(StoreUnavailable):
                await nowhere.cache_get(key)
            with pytest.raises(StoreUnavailable):
                await nowhere.cache_put(key, b"x", 1)
        finally:
            await store.close()
            await nowhere.close()

    asyncio.run(body())


def test_explain_asks_the_provider(op: OpenIDProvider, tmp_path: Path) -> None:
    import subprocess
    import sys

    policy = write_policy(tmp_path, op)
    authgate = Path(sys.executable).parent / "authgate"
    token = grant(op, "admin-svc", "read")
    before = op.introspections()
    command = [str(authgate), "explain", str(policy), "GET", "/api/read"]
    # --token=VALUE: an opaque token may start with "-" (base64url), which
    # argparse would take for an option after a bare --token.
    out = subprocess.run([*command, f"--token={token}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"opaque bearer token {token[:6]}… ({len(token)} characters)" in out.stdout
    assert "=> 200" in out.stdout or "allowed" in out.stdout
    assert token not in out.stdout  # never the whole token
    assert op.introspections() == before + 1
    unknown = subprocess.run([*command, "--token=unknown-token-xyz"], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert "=> 401" in unknown.stdout and "not active" in unknown.stdout


def test_the_decision_service_door_asks_too(op: OpenIDProvider, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, op)
    policy.write_text("client_ip: {trusted_proxies: [127.0.0.1/32]}\n" + policy.read_text())
    svc = Serve(tmp_path, policy, name="serve")
    try:
        svc.wait_listening()
        token = grant(op, "admin-svc", "read")
        before = op.introspections()
        check = auth("/api/read", ("Authorization", f"Bearer {token}"))
        for _ in range(2):  # the second from the remembered answer, without waiting
            r = ask(svc.address, "GET", "/auth", check)
            assert r.status == 200
            assert r.header("X-Authgate-Decision") == "allow"
            assert r.header("X-Auth-Subject") == "admin-svc"
        assert op.introspections() == before + 1
        r = ask(svc.address, "GET", "/auth", auth("/api/read", ("Authorization", "Bearer nope")))
        assert r.status == 401
    finally:
        svc.stop()


def test_mitmweb_shows_an_opaque_token_as_one_never_its_value(tmp_path: Path) -> None:
    from authgate.core.decision import RequestView
    from authgate.proxy.views import credential

    policy = load(tmp_path, GOOD)
    token = "Aw54NCb5Fcy_awc7StuNFJfLl0bqCA6zoQRyIUryxhT"
    view = RequestView.build("GET", "/api/x", [("Authorization", f"Bearer {token}")], "127.0.0.1")
    lines = credential(view, policy, NOW)
    assert lines[0] == "credential: opaque bearer token from the authorization"
    assert ISS in lines[1] and not any(token[:8] in line for line in lines)


def test_at_most_max_calls_at_once_and_no_backlog(tmp_path: Path) -> None:
    import asyncio
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from authgate.core.introspection import introspection_work
    from authgate.runtime.introspection import MAX_CALLS, Introspector

    release = threading.Event()
    received: list[bytes] = []

    class Hanging(BaseHTTPRequestHandler):
        """An introspection endpoint that answers only when released."""

        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            release.wait(30)
            body = b'{"active": false}'
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the gateway gave up at its timeout and closed the connection

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 64  # every call the gateway makes is accepted at once
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Hanging)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/introspect"
    policy = load(tmp_path, GOOD.replace("https://login.example/introspect", endpoint)
                  + "        timeout: 2s\n")  # fmt: skip
    [iss] = policy.issuers
    source = iss.introspection
    assert source is not None
    introspector = Introspector()

    async def body() -> None:
        works = [introspection_work(iss, f"token-{i}", time.time()) for i in range(MAX_CALLS + 4)]
        started = time.monotonic()
        await asyncio.gather(*(introspector.join(w) for w in works if w is not None))
        assert time.monotonic() - started < 10  # each request waited about its timeout
        release.set()
        await asyncio.sleep(0.5)  # a queued call would go out now: none does

    try:
        asyncio.run(body())
    finally:
        release.set()
        introspector.close()
        server.shutdown()
        server.server_close()
    # the gateway started exactly MAX_CALLS calls; a loaded machine may not have read
    # every one of them before its timeout, but none beyond MAX_CALLS ever arrived
    assert source.calls == MAX_CALLS
    assert 0 < len(received) <= MAX_CALLS


def test_a_client_over_its_ip_limit_makes_no_call(
    op: OpenIDProvider, start_gateway: Callable[..., RunningGateway], backend: Backend,
    tmp_path: Path,
) -> None:  # fmt: skip
    policy = write_policy(tmp_path, op)
    policy.write_text(policy.read_text().replace(
        "allow: {scope: read}}",
        "allow: {scope: read}, limits: [{name: per-ip, key: ip, rate: 2/hour}]}",
    ))  # fmt: skip
    gw = start_gateway(policy)
    before = op.introspections()
    statuses = [get(gw, "/api/read", f"random-token-{i}").status for i in range(4)]
    assert statuses == [401, 401, 429, 429]
    assert op.introspections() == before + 2  # the 429s cost the provider nothing
    assert backend.seen == []
