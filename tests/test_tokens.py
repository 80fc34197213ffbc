"""JWT verification: `authgate.core.tokens.verify`, `load_jwks`, `algorithms_for_key`.

Conformance checks: J-01..J-13 (JWT), B-10 (error_description characters).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import math
import re
import socket
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.core import tokens
from authgate.core.identity import Identity
from authgate.core.keyset import RemoteKeys
from authgate.core.tokens import (
    Issuer,
    TokenCache,
    TokenRejected,
    VerifyKey,
    algorithms_for_key,
    describe_token,
    load_jwks,
    load_public_key_pem,
    verify,
)
from authgate.policy.load import load_policy
from authgate.tools import keys

ISS_A = "https://as.test"
ISS_B = "https://other-as.test"
AUD = "https://api.test"
LEEWAY = 30

RSA_A = keys.new_rsa_key()  # issuer A, kid k1
RSA_B = keys.new_rsa_key()  # issuer B, kid kb
RSA_ATTACKER = keys.new_rsa_key()
EC_A = ec.generate_private_key(ec.SECP256R1())  # issuer A, kid e1

RS_ONLY = frozenset({"RS256"})
RS_ES = frozenset({"RS256", "ES256"})

EXPIRED = "The access token expired"
NOT_YET = "The access token is not valid yet"
WRONG_AUD = "The access token is not meant for this service"
WRONG_ISS = "The access token has the wrong issuer"
LACKS = "The access token lacks a required claim"
BAD_SIG = "The access token signature is invalid"
INVALID = "The access token is invalid"
MALFORMED = "The access token is malformed"
BAD_ALG = "The access token algorithm is not accepted"
UNKNOWN_KEY = "The access token signing key is unknown"
BAD_CLAIM = "The access token has a malformed claim"

# RFC 6750 §3: error_description characters.
DESCRIPTION_CHARS = re.compile(r"^[\x20\x21\x23-\x5B\x5D-\x7E]*$")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
    return jwk


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk = keys.jwks_for(key, kid)["keys"][0]
    jwk.update(extra)
    return jwk


def make_issuer(
    iss: str,
    jwks: dict[str, Any],
    algorithms: frozenset[str],
    *,
    name: str = "a",
    audience: tuple[str, ...] = (AUD,),
    roles_claim: tuple[str, ...] = ("roles",),
    scope_claim: tuple[str, ...] = ("scope",),
    require_exp: bool = True,
) -> Issuer:
    key_list, _notes = load_jwks(json.dumps(jwks), algorithms)
    return Issuer(
        name=name,
        issuer=iss,
        audience=audience,
        algorithms=algorithms,
        keys=tuple(key_list),
        leeway=float(LEEWAY),
        roles_claim=roles_claim,
        scope_claim=scope_claim,
        require_exp=require_exp,
    )


JWKS_A = {"keys": [rsa_jwk(RSA_A, "k1"), ec_jwk(EC_A, "e1")]}
JWKS_B = {"keys": [rsa_jwk(RSA_B, "kb")]}

ISSUER_A = make_issuer(ISS_A, JWKS_A, RS_ES)
ISSUER_A_RS_ONLY = make_issuer(ISS_A, JWKS_A, RS_ONLY)
ISSUER_A_RS_PS = make_issuer(ISS_A, {"keys": [rsa_jwk(RSA_A, "k1")]}, frozenset({"RS256", "PS256"}))
ISSUER_A_NO_EXP = make_issuer(ISS_A, JWKS_A, RS_ES, require_exp=False)
ISSUER_A_NO_AUD = make_issuer(ISS_A, JWKS_A, RS_ES, audience=())
ISSUER_A_REALM_ROLES = make_issuer(ISS_A, JWKS_A, RS_ES, roles_claim=("realm_access", "roles"))
ISSUER_B = make_issuer(ISS_B, JWKS_B, RS_ONLY, name="b")

SIGNERS = {"k1": RSA_A, "e1": EC_A, "kb": RSA_B}


def claims(now: float, **overrides: Any) -> dict[str, Any]:
    """Valid claims for issuer A; an override of None removes the claim."""
    out: dict[str, Any] = {
        "iss": ISS_A,
        "sub": "alice",
        "aud": AUD,
        "iat": int(now),
        "exp": int(now) + 600,
        "jti": "j-1",
    }
    for name, value in overrides.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def sign(
    payload: dict[str, Any],
    *,
    kid: Any = "k1",
    alg: str = "RS256",
    key: Any = None,
    headers: dict[str, Any] | None = None,
) -> str:
    if key is None:
        key = SIGNERS[kid] if isinstance(kid, str) and kid in SIGNERS else RSA_A
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    header.update(headers or {})
    encoded = b64(json.dumps(header).encode()), b64(json.dumps(payload).encode())
    return sign_raw(*encoded, key=key, alg=alg)


def sign_raw(header: str, payload: str, key: Any = RSA_A, alg: str = "RS256") -> str:
    """Sign already-encoded header and payload segments exactly as given."""
    signing_input = f"{header}.{payload}".encode("ascii")
    algorithm = jwt.get_algorithm_by_name(alg)
    signature = algorithm.sign(signing_input, algorithm.prepare_key(key))
    return f"{header}.{payload}.{b64(signature)}"


def raw_json_token(header_json: str, payload_json: str, key: Any = RSA_A) -> str:
    return sign_raw(b64(header_json.encode()), b64(payload_json.encode()), key)


def expect_rejected(issuers: tuple[Issuer, ...], token: str, now: float, reason: str) -> None:
    with pytest.raises(TokenRejected) as info:
        verify(issuers, token, now)
    assert info.value.reason == reason
    assert str(info.value) == reason


# --- valid tokens ------------------------------------------------------------


def test_valid_token_gives_identity() -> None:
    now = time.time()
    payload = claims(now, roles=["admin", "user"], scope="read write")
    identity = verify((ISSUER_A,), sign(payload), now)
    assert isinstance(identity, Identity)
    assert (identity.subject, identity.issuer, identity.method) == ("alice", ISS_A, "jwt")
    assert identity.roles == frozenset({"admin", "user"})
    assert identity.scopes == frozenset({"read", "write"})
    assert identity.claims == payload


def test_cached_token_is_time_checked_again() -> None:
    now = time.time()
    cache = TokenCache()
    token = sign(claims(now, exp=int(now) + 60))
    assert verify((ISSUER_A,), token, now, cache).subject == "alice"
    assert len(cache) == 1
    assert verify((ISSUER_A,), token, now + 10, cache).subject == "alice"
    expect_rejected_cached(token, now + 60 + LEEWAY, cache, EXPIRED)


def test_rejected_token_is_not_cached() -> None:
    now = time.time()
    cache = TokenCache()
    with pytest.raises(TokenRejected):
        verify((ISSUER_A,), _tampered_signature(), now, cache)
    assert len(cache) == 0


def test_token_cache_is_bounded() -> None:
    now = time.time()
    cache = TokenCache(size=2)
    tokens_ = [sign(claims(now, jti=f"j{i}")) for i in range(3)]
    for t in tokens_:
        verify((ISSUER_A,), t, now, cache)
    assert len(cache) == 2
    assert cache.get(tokens_[0]) is None
    assert cache.get(tokens_[2]) is not None


RSA_NEW = keys.new_rsa_key()


def remote_issuer_a(published: dict[str, Any]) -> tuple[Issuer, RemoteKeys]:
    """Issuer A with its keys from a JWKS address, already fetched (no I/O)."""
    source = RemoteKeys(issuer=ISS_A, url="https://as.test/jwks", discovery=False, pinned=RS_ONLY)
    source.apply(tuple(load_jwks(json.dumps(published), RS_ONLY)[0]), 300)
    issuer = Issuer("a", ISS_A, (AUD,), RS_ONLY, (), float(LEEWAY), ("roles",), ("scope",), True)
    return dataclasses.replace(issuer, remote=source), source


@pytest.mark.parametrize(
    ("published", "reason"),
    [
        pytest.param({"keys": [rsa_jwk(RSA_A, "k1")]}, None, id="same-set-again"),
        pytest.param(
            {"keys": [rsa_jwk(RSA_A, "k1"), rsa_jwk(RSA_NEW, "k3")]}, None, id="key-added"
        ),
        pytest.param(
            {"keys": [rsa_jwk(RSA_NEW, "k3"), rsa_jwk(RSA_B, "k2")]},
            UNKNOWN_KEY,
            id="signing-key-rotated-away",
        ),
        pytest.param({"keys": [rsa_jwk(RSA_B, "k1")]}, BAD_SIG, id="kid-now-names-another-key"),
    ],
)
def test_cached_token_is_refused_once_its_key_leaves_the_set(
    published: dict[str, Any], reason: str | None
) -> None:
    """Hardening 2, item 1: a cache hit does not outlive the key that verified it."""
    now = time.time()
    issuer, source = remote_issuer_a({"keys": [rsa_jwk(RSA_A, "k1")]})
    cache = TokenCache()
    token = sign(claims(now))
    assert verify((issuer,), token, now, cache).subject == "alice"
    source.apply(tuple(load_jwks(json.dumps(published), RS_ONLY)[0]), 300)  # a refresh
    if reason is None:
        assert verify((issuer,), token, now, cache).subject == "alice"
        assert cache.get(token) is not None
        return
    for _ in range(2):  # and not only once
        with pytest.raises(TokenRejected) as info:
            verify((issuer,), token, now, cache)
        assert info.value.reason == reason
    assert cache.get(token) is None


def test_cache_hit_after_a_refresh_that_republishes_the_key_skips_the_signature(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refresh serving the same keys keeps their objects: hits stay hits."""
    now = time.time()
    issuer, source = remote_issuer_a({"keys": [rsa_jwk(RSA_A, "k1")]})
    cache = TokenCache()
    token = sign(claims(now))
    verify((issuer,), token, now, cache)
    source.apply(tuple(load_jwks(json.dumps({"keys": [rsa_jwk(RSA_A, "k1")]}), RS_ONLY)[0]), 300)

    def no_decode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("verified again")

    monkeypatch.setattr(jwt, "decode", no_decode)
    assert verify((issuer,), token, now, cache).subject == "alice"


def expect_rejected_cached(token: str, now: float, cache: TokenCache, reason: str) -> None:
    with pytest.raises(TokenRejected) as info:
        verify((ISSUER_A,), token, now, cache)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("issuer", "extra", "roles", "scopes"),
    [
        pytest.param(ISSUER_A, {}, frozenset(), frozenset(), id="no-roles-no-scope"),
        pytest.param(
            ISSUER_A, {"scope": "read  write\tadmin"}, frozenset(),
            frozenset({"read", "write", "admin"}), id="scope-space-separated-string",
        ),
        pytest.param(
            ISSUER_A, {"scope": ["read", "write"]}, frozenset(), frozenset({"read", "write"}),
            id="scope-as-list",
        ),
        pytest.param(ISSUER_A, {"scope": ""}, frozenset(), frozenset(), id="scope-empty-string"),
        pytest.param(
            ISSUER_A, {"roles": ["admin"]}, frozenset({"admin"}), frozenset(), id="roles-list"
        ),
        pytest.param(
            ISSUER_A, {"roles": "admin"}, frozenset({"admin"}), frozenset(),
            id="roles-single-string",
        ),
        pytest.param(
            ISSUER_A_REALM_ROLES, {"realm_access": {"roles": ["ops", "dev"]}},
            frozenset({"ops", "dev"}), frozenset(), id="dotted-roles-claim",
        ),
        pytest.param(
            ISSUER_A_REALM_ROLES, {"roles": ["admin"]}, frozenset(), frozenset(),
            id="dotted-roles-claim-ignores-top-level-roles",
        ),
        pytest.param(
            ISSUER_A_REALM_ROLES, {"realm_access": "admin"}, frozenset(), frozenset(),
            id="dotted-roles-claim-parent-not-object",
        ),
    ],
)  # fmt: skip
def test_roles_and_scopes(
    issuer: Issuer, extra: dict[str, Any], roles: frozenset[str], scopes: frozenset[str]
) -> None:
    now = time.time()
    identity = verify((issuer,), sign(claims(now, **extra)), now)
    assert identity.roles == roles
    assert identity.scopes == scopes
    assert identity.subject == "alice"


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"scope": 5}, id="scope-number"),
        pytest.param({"scope": ["read", 1]}, id="scope-list-with-number"),
        pytest.param({"roles": {"admin": True}}, id="roles-object"),
        pytest.param({"roles": True}, id="roles-boolean"),
    ],
)
def test_malformed_roles_or_scope_claim(extra: dict[str, Any]) -> None:
    now = time.time()
    expect_rejected((ISSUER_A,), sign(claims(now, **extra)), now, BAD_CLAIM)


@pytest.mark.parametrize(
    ("issuers", "overrides", "sign_kw"),
    [
        pytest.param((ISSUER_A,), {}, {"kid": "e1", "alg": "ES256"}, id="es256-p256-key"),
        pytest.param((ISSUER_A,), {"exp": "now-25"}, {}, id="expired-within-leeway"),
        pytest.param((ISSUER_A,), {"aud": ["x", AUD]}, {}, id="aud-list-containing-ours"),
        pytest.param((ISSUER_A_NO_EXP,), {"exp": None}, {}, id="no-exp-when-not-required"),
        pytest.param((ISSUER_A_NO_AUD,), {"aud": None}, {}, id="no-aud-when-none-configured"),
        pytest.param((ISSUER_A_NO_AUD,), {"aud": "anything"}, {}, id="aud-unchecked-when-none"),
        pytest.param((ISSUER_A, ISSUER_B), {}, {}, id="two-issuers-token-of-a"),
        pytest.param((ISSUER_A, ISSUER_B), {"iss": ISS_B}, {"kid": "kb"}, id="two-issuers-b"),
        pytest.param((ISSUER_A_RS_PS,), {}, {"kid": None}, id="no-kid-single-key"),
        pytest.param((ISSUER_A,), {"nbf": "now-10"}, {}, id="nbf-in-the-past"),
        pytest.param((ISSUER_A,), {"nbf": "now+25"}, {}, id="nbf-within-leeway"),
    ],
)
def test_accepted(
    issuers: tuple[Issuer, ...], overrides: dict[str, Any], sign_kw: dict[str, Any]
) -> None:
    now = time.time()
    resolved = {k: _time_value(v, now) for k, v in overrides.items()}
    payload = claims(now, **resolved)
    identity = verify(issuers, sign(payload, **sign_kw), now)
    assert identity.subject == "alice"
    assert identity.issuer == payload["iss"]
    assert identity.claims == payload


def _time_value(value: Any, now: float) -> Any:
    """`"now-25"` -> int(now) - 25, so a table can say times relative to now."""
    if isinstance(value, str) and value.startswith("now"):
        return int(now) + int(value[3:])
    return value


# --- rejections --------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        pytest.param({"exp": f"now-{LEEWAY + 5}"}, EXPIRED, id="expired-beyond-leeway"),
        pytest.param({"exp": f"now-{LEEWAY}"}, EXPIRED, id="expired-exactly-at-leeway"),
        pytest.param({"nbf": f"now+{LEEWAY + 60}"}, NOT_YET, id="nbf-in-the-future"),
        pytest.param({"iss": ISS_A + "/"}, WRONG_ISS, id="iss-trailing-slash"),
        pytest.param({"iss": "HTTPS://as.test"}, WRONG_ISS, id="iss-case-change"),
        pytest.param({"iss": "https://evil.test"}, WRONG_ISS, id="iss-other"),
        pytest.param({"iss": 7}, WRONG_ISS, id="iss-number"),
        pytest.param({"iss": None}, LACKS, id="iss-missing"),
        pytest.param({"aud": "https://other.test"}, WRONG_AUD, id="aud-wrong"),
        pytest.param({"aud": "HTTPS://API.TEST"}, WRONG_AUD, id="aud-case-change"),
        pytest.param({"aud": ["x", "y"]}, WRONG_AUD, id="aud-list-without-ours"),
        pytest.param({"aud": None}, LACKS, id="aud-missing"),
        pytest.param({"aud": 5}, WRONG_AUD, id="aud-number"),
        pytest.param({"exp": None}, LACKS, id="exp-missing"),
        pytest.param({"exp": "tomorrow"}, BAD_CLAIM, id="exp-string"),
        pytest.param({"exp": "9999999999"}, BAD_CLAIM, id="exp-numeric-string"),
        pytest.param({"exp": True}, BAD_CLAIM, id="exp-boolean"),
        pytest.param({"exp": [9999999999]}, BAD_CLAIM, id="exp-list"),
        pytest.param({"nbf": "0"}, BAD_CLAIM, id="nbf-string"),
        pytest.param({"iat": "yesterday"}, BAD_CLAIM, id="iat-string"),
        pytest.param({"sub": None}, LACKS, id="sub-missing"),
        pytest.param({"sub": ""}, BAD_CLAIM, id="sub-empty"),
        pytest.param({"sub": "alice\r\nX-Auth-Roles: admin"}, BAD_CLAIM, id="sub-crlf"),
        pytest.param({"sub": "a\x00b"}, BAD_CLAIM, id="sub-nul"),
        pytest.param({"roles": ["user,admin"]}, BAD_CLAIM, id="role-with-comma"),
        pytest.param({"roles": ["a\nb"]}, BAD_CLAIM, id="role-with-newline"),
        pytest.param({"scope": "read wr\x7fite"}, BAD_CLAIM, id="scope-with-del"),
        pytest.param({"roles": [""]}, BAD_CLAIM, id="role-empty-string"),
        pytest.param({"sub": 42}, INVALID, id="sub-number"),
    ],
)
def test_claim_rejections(overrides: dict[str, Any], reason: str) -> None:
    now = time.time()
    payload = claims(now, **{k: _time_value(v, now) for k, v in overrides.items()})
    expect_rejected((ISSUER_A,), sign(payload), now, reason)


def _alg_none_token(alg: str) -> str:
    now = time.time()
    header = b64(json.dumps({"alg": alg, "kid": "k1", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims(now)).encode())}."


def _key_confusion_token() -> str:
    """HS256, with the RS256 public key PEM as the HMAC secret."""
    now = time.time()
    pem = RSA_A.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(now)).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


def _tampered_signature() -> str:
    token = sign(claims(time.time()))
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[10] ^= 0x01
    return f"{head}.{payload}.{b64(bytes(raw))}"


def _tampered_payload() -> str:
    now = time.time()
    head, _payload, signature = sign(claims(now)).split(".")
    return f"{head}.{b64(json.dumps(claims(now, sub='mallory')).encode())}.{signature}"


def _header_with(extra: dict[str, Any], key: Any = RSA_A) -> str:
    now = time.time()
    header = {"alg": "RS256", "typ": "JWT", **extra}
    return sign_raw(b64(json.dumps(header).encode()), b64(json.dumps(claims(now)).encode()), key)


def _standard_base64_header() -> str:
    """A header segment in the standard base64 alphabet ('+', '/'), correctly signed."""
    now = time.time()
    for n in range(1000):
        header = json.dumps({"alg": "RS256", "kid": "k1", "typ": "JWT", "x": "?" * n}).encode()
        encoded = base64.b64encode(header).rstrip(b"=").decode()
        if "+" in encoded or "/" in encoded:
            return sign_raw(encoded, b64(json.dumps(claims(now)).encode()))
    raise AssertionError("no header with '+' or '/' found")


def _standard_base64_signature() -> str:
    """A valid token whose signature is re-spelled with '+' and '/' for '-' and '_'."""
    now = time.time()
    for n in range(1000):
        head, payload, signature = sign(claims(now, jti=f"j-{n}")).split(".")
        if "-" in signature or "_" in signature:
            respelled = signature.replace("-", "+").replace("_", "/")
            return f"{head}.{payload}.{respelled}"
    raise AssertionError("no signature with '-' or '_' found")


REJECTED_TOKENS = [
    pytest.param(lambda: _alg_none_token("none"), BAD_ALG, id="alg-none"),
    pytest.param(lambda: _alg_none_token("None"), BAD_ALG, id="alg-None"),
    pytest.param(lambda: _alg_none_token("NONE"), BAD_ALG, id="alg-NONE"),
    pytest.param(_key_confusion_token, BAD_ALG, id="hs256-with-rsa-public-key-pem"),
    pytest.param(
        lambda: sign(claims(time.time()), kid="e1", alg="ES256"), BAD_ALG, id="es256-rs-only"
    ),
    pytest.param(lambda: sign(claims(time.time()), alg="PS256"), BAD_ALG, id="ps256-rs-only"),
    pytest.param(lambda: sign(claims(time.time()), alg="RS512"), BAD_ALG, id="rs512-rs-only"),
    pytest.param(_tampered_signature, BAD_SIG, id="flipped-signature-byte"),
    pytest.param(_tampered_payload, BAD_SIG, id="payload-swapped"),
    pytest.param(
        lambda: ".".join(sign(claims(time.time())).split(".")[:2]), MALFORMED, id="two-segments"
    ),  # fmt: skip
    pytest.param(lambda: sign(claims(time.time())) + ".x", MALFORMED, id="four-segments"),
    pytest.param(lambda: "a.b.", MALFORMED, id="a.b."),
    pytest.param(lambda: "", MALFORMED, id="empty"),
    pytest.param(lambda: "..", MALFORMED, id="only-dots"),
    pytest.param(
        lambda: "!!!." + sign(claims(time.time())).split(".", 1)[1],
        MALFORMED,
        id="non-base64url-header-chars",
    ),
    pytest.param(
        lambda: b64(b"\xff\xfe") + "." + sign(claims(time.time())).split(".", 1)[1],
        MALFORMED,
        id="header-not-utf8-json",
    ),
    pytest.param(
        lambda: b64(b"[1,2]") + "." + sign(claims(time.time())).split(".", 1)[1],
        MALFORMED,
        id="header-json-array",
    ),
    pytest.param(lambda: "Bearer " + sign(claims(time.time())), MALFORMED, id="with-space"),
    pytest.param(_standard_base64_header, INVALID, id="header-standard-base64-alphabet"),
    pytest.param(_standard_base64_signature, INVALID, id="signature-standard-base64-alphabet"),
    pytest.param(
        lambda: _header_with({"kid": "k1", "crit": ["x-unknown"]}),
        INVALID,
        id="crit-unknown-extension",
    ),  # fmt: skip
    pytest.param(lambda: sign(claims(time.time()), kid="k2"), UNKNOWN_KEY, id="unknown-kid"),
    pytest.param(lambda: sign(claims(time.time()), kid="K1"), UNKNOWN_KEY, id="wrong-case-kid"),
    pytest.param(lambda: _header_with({"kid": 1}), UNKNOWN_KEY, id="kid-number"),
    pytest.param(lambda: _header_with({"kid": ["k1"]}), UNKNOWN_KEY, id="kid-list"),
    pytest.param(
        lambda: sign(claims(time.time()), kid="' OR 1=1--"), UNKNOWN_KEY, id="kid-sql-injection"
    ),  # fmt: skip
    pytest.param(
        lambda: sign(claims(time.time()), kid="../../dev/null"),
        UNKNOWN_KEY,
        id="kid-path-traversal",
    ),  # fmt: skip
    pytest.param(
        lambda: _header_with({"kid": "k1", "jku": "http://attacker.test/jwks"}, RSA_ATTACKER),
        BAD_SIG,
        id="jku-attacker-key",
    ),
    pytest.param(
        lambda: sign(claims(time.time()), key=RSA_ATTACKER), BAD_SIG, id="right-kid-other-key"
    ),
]


@pytest.mark.parametrize(("make", "reason"), REJECTED_TOKENS)
def test_token_rejections(make: Any, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    expect_rejected((ISSUER_A_RS_ONLY,), make(), time.time(), reason)


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("token verification must not open a connection")


def test_jku_header_is_ignored_for_our_own_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A jku header never selects keys: our key still verifies, nothing is fetched."""
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    now = time.time()
    token = sign(claims(now), headers={"jku": "http://attacker.test/jwks"})
    assert verify((ISSUER_A_RS_ONLY,), token, now).subject == "alice"


def test_alg_differs_from_jwk_alg() -> None:
    """The JWK says RS256; a PS256 token for that key is refused though PS256 is pinned."""
    now = time.time()
    expect_rejected((ISSUER_A_RS_PS,), sign(claims(now), alg="PS256"), now, BAD_ALG)
    assert verify((ISSUER_A_RS_PS,), sign(claims(now)), now).subject == "alice"


def test_no_kid_with_two_keys() -> None:
    now = time.time()
    assert len(ISSUER_A.keys) == 2
    expect_rejected((ISSUER_A,), sign(claims(now), kid=None), now, UNKNOWN_KEY)


def test_no_issuers_configured() -> None:
    now = time.time()
    expect_rejected((), sign(claims(now)), now, INVALID)


# --- two issuers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("iss", "kid", "key", "reason"),
    [
        pytest.param(ISS_A, "kb", RSA_B, UNKNOWN_KEY, id="b-key-a-iss-b-kid"),
        pytest.param(ISS_A, "k1", RSA_B, BAD_SIG, id="b-key-a-iss-a-kid"),
        pytest.param(ISS_B, "k1", RSA_A, UNKNOWN_KEY, id="a-key-b-iss-a-kid"),
        pytest.param(ISS_B, "kb", RSA_A, BAD_SIG, id="a-key-b-iss-b-kid"),
        pytest.param("https://third.test", "k1", RSA_A, WRONG_ISS, id="unknown-iss"),
        pytest.param(ISS_A + "/", "k1", RSA_A, WRONG_ISS, id="a-iss-trailing-slash"),
    ],
)
def test_two_issuers_keys_belong_to_their_issuer(iss: str, kid: str, key: Any, reason: str) -> None:
    now = time.time()
    token = sign(claims(now, iss=iss), kid=kid, key=key)
    expect_rejected((ISSUER_A, ISSUER_B), token, now, reason)


# --- duplicate claim names (J-10) --------------------------------------------


def _dup_payload(now: float, first: tuple[str, Any], second: tuple[str, Any]) -> str:
    base = claims(now)
    base.pop(first[0], None)
    body = json.dumps(base)[:-1]
    return (
        f"{body}, {json.dumps(first[0])}: {json.dumps(first[1])}, "
        f"{json.dumps(second[0])}: {json.dumps(second[1])}}}"
    )


def test_duplicate_aud_last_wins_or_rejected() -> None:
    """`"aud": ours, "aud": "evil"`: first-wins would accept it."""
    now = time.time()
    payload = _dup_payload(now, ("aud", AUD), ("aud", "evil"))
    token = raw_json_token('{"alg":"RS256","kid":"k1"}', payload)
    expect_rejected((ISSUER_A,), token, now, WRONG_AUD)


def test_duplicate_sub_last_wins() -> None:
    now = time.time()
    payload = _dup_payload(now, ("sub", "alice"), ("sub", "mallory"))
    token = raw_json_token('{"alg":"RS256","kid":"k1"}', payload)
    identity = verify((ISSUER_A,), token, now)
    assert identity.subject == "mallory"


def test_duplicate_header_alg_last_wins() -> None:
    """`"alg":"RS256","alg":"none"` in the header must not verify as RS256."""
    now = time.time()
    token = raw_json_token('{"alg":"RS256","alg":"none","kid":"k1"}', json.dumps(claims(now)))
    expect_rejected((ISSUER_A,), token, now, BAD_ALG)


# --- the caller's clock ------------------------------------------------------


def test_exp_checked_against_given_now() -> None:
    now = time.time()
    token = sign(claims(now, exp=int(now) + 600))
    expect_rejected((ISSUER_A,), token, now + 600 + LEEWAY + 5, EXPIRED)


def test_nbf_checked_against_given_now() -> None:
    """The core reads time only through the clock it is given (docs/architecture.md)."""
    wall = time.time()
    token = sign(claims(wall, nbf=int(wall) - 60, iat=int(wall) - 3600))
    expect_rejected((ISSUER_A,), token, wall - 3600, NOT_YET)


def test_token_valid_at_given_now_accepted() -> None:
    """A token that was valid at the given time is judged at that time."""
    then = time.time() - 7200
    token = sign(claims(then, exp=int(then) + 600))
    assert verify((ISSUER_A,), token, then).subject == "alice"


# --- reason strings (B-10) -----------------------------------------------------


def test_every_reason_is_safe_for_error_description() -> None:
    reasons = {p.values[1] for p in REJECTED_TOKENS}
    reasons |= {EXPIRED, NOT_YET, WRONG_AUD, WRONG_ISS, LACKS, BAD_SIG, INVALID, MALFORMED}
    reasons |= {BAD_ALG, UNKNOWN_KEY, BAD_CLAIM}
    reasons |= set(tokens.TokenRejected.REASONS.values())
    for reason in reasons:
        assert reason
        assert DESCRIPTION_CHARS.match(reason), reason


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: '"\\\r\n\u00e9.a.b', id="quote-backslash-crlf-non-ascii"),
        pytest.param(lambda: _header_with({"kid": '"\\\r\n\u00e9'}), id="kid-with-specials"),
        pytest.param(lambda: sign(claims(time.time(), iss='"\\\n\u00e9')), id="iss-specials"),
        pytest.param(lambda: sign(claims(time.time(), aud='"\\\n\u00e9')), id="aud-specials"),
        pytest.param(
            lambda: _header_with({"kid": "k1", "crit": ['"\\\n\u00e9']}), id="crit-specials"
        ),
    ],
)
def test_rejection_reason_never_echoes_the_token(token: Any) -> None:
    with pytest.raises(TokenRejected) as info:
        verify((ISSUER_A,), token(), time.time())
    assert DESCRIPTION_CHARS.match(info.value.reason)


# --- via a loaded policy -------------------------------------------------------


def test_issuer_from_policy_verifies_minted_token(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(JWKS_A))
    (tmp_path / "policy.yaml").write_text(
        "version: 1\n"
        "authn:\n"
        "  jwt:\n"
        f"    - {{name: a, issuer: '{ISS_A}', audience: '{AUD}', algorithms: [RS256, ES256],\n"
        "       jwks_file: jwks.json, leeway: 30s, roles_claim: realm_access.roles}\n"
        "rules:\n"
        "  - {name: all, match: {path: /}, allow: anyone}\n"
    )
    policy = load_policy(tmp_path / "policy.yaml")
    now = time.time()
    token = keys.mint(
        RSA_A, sub="bob", scopes=["read", "write"], iss=ISS_A, aud=AUD, kid="k1", now=now,
        extra={"realm_access": {"roles": ["admin"]}},
    )  # fmt: skip
    identity = verify(policy.issuers, token, now)
    assert (identity.subject, identity.issuer, identity.method) == ("bob", ISS_A, "jwt")
    assert identity.roles == frozenset({"admin"})
    assert identity.scopes == frozenset({"read", "write"})
    es_token = keys.mint(EC_A, sub="carol", iss=ISS_A, aud=AUD, kid="e1", alg="ES256", now=now)
    assert verify(policy.issuers, es_token, now).subject == "carol"
    expired = keys.mint(RSA_A, sub="bob", iss=ISS_A, aud=AUD, kid="k1", now=now, ttl=-31)
    expect_rejected(policy.issuers, expired, now, EXPIRED)


def test_hmac_issuer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s" * 32
    monkeypatch.setenv("AUTHGATE_TEST_SECRET", secret)
    (tmp_path / "policy.yaml").write_text(
        "version: 1\n"
        "authn:\n"
        "  jwt:\n"
        f"    - {{name: h, issuer: '{ISS_A}', algorithms: [HS256],"
        " secret_env: AUTHGATE_TEST_SECRET}\n"
        "rules:\n"
        "  - {name: all, match: {path: /}, allow: anyone}\n"
    )
    policy = load_policy(tmp_path / "policy.yaml")
    now = time.time()
    good = jwt.encode(claims(now), secret, algorithm="HS256")
    assert verify(policy.issuers, good, now).subject == "alice"
    bad = jwt.encode(claims(now), "t" * 32, algorithm="HS256")
    expect_rejected(policy.issuers, bad, now, BAD_SIG)
    header = b64(b'{"alg":"HS512","typ":"JWT"}')
    payload = b64(json.dumps(claims(now)).encode())
    mac = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha512).digest()
    hs512 = f"{header}.{payload}.{b64(mac)}"
    expect_rejected(policy.issuers, hs512, now, BAD_ALG)


# --- load_jwks -------------------------------------------------------------------


def test_load_jwks_skips_unknown_kty_and_enc_keys() -> None:
    doc = {
        "keys": [
            {"kty": "XYZ", "kid": "weird", "x": "1"},
            rsa_jwk(RSA_B, "enc-1", use="enc"),
            rsa_jwk(RSA_A, "k1"),
            "not an object",
            rsa_jwk(RSA_B, "k-num-kid") | {"kid": 7},
        ]
    }
    found, notes = load_jwks(json.dumps(doc), RS_ONLY)
    assert [k.kid for k in found] == ["k1"]
    assert found[0].algorithms == RS_ONLY
    assert isinstance(found[0].key, rsa.RSAPublicKey)
    assert found[0].key.public_numbers() == RSA_A.public_key().public_numbers()
    assert len(notes) == 4
    assert "not usable" in notes[0]
    assert "use is 'enc'" in notes[1]
    assert "not an object" in notes[2]
    assert "kid is not a string" in notes[3]


def test_unknown_kty_does_not_stop_tokens_of_known_key() -> None:
    doc = {"keys": [{"kty": "XYZ", "kid": "weird"}, rsa_jwk(RSA_A, "k1")]}
    issuer = make_issuer(ISS_A, doc, RS_ONLY)
    now = time.time()
    assert verify((issuer,), sign(claims(now)), now).subject == "alice"


def test_token_for_enc_key_is_rejected() -> None:
    doc = {"keys": [rsa_jwk(RSA_B, "enc-1", use="enc"), rsa_jwk(RSA_A, "k1")]}
    issuer = make_issuer(ISS_A, doc, RS_ONLY)
    now = time.time()
    expect_rejected((issuer,), sign(claims(now), kid="enc-1", key=RSA_B), now, UNKNOWN_KEY)


def _private_rsa_jwk() -> dict[str, Any]:
    return json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_A)) | {"kid": "p1"}


def _private_ec_jwk() -> dict[str, Any]:
    return json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_A)) | {"kid": "p2"}


@pytest.mark.parametrize(
    ("doc", "pinned", "message"),
    [
        pytest.param({"keys": [_private_rsa_jwk()]}, RS_ONLY, "private key", id="rsa-private"),
        pytest.param({"keys": [_private_ec_jwk()]}, RS_ES, "private key", id="ec-private"),
        pytest.param(
            {"keys": [rsa_jwk(RSA_A, "k1", k="c2VjcmV0")]}, RS_ONLY, "private key",
            id="rsa-with-k-member",
        ),
        pytest.param(
            {"keys": [rsa_jwk(RSA_A, "k1"), rsa_jwk(RSA_B, "k1")]}, RS_ONLY, "two keys with kid",
            id="duplicate-kid",
        ),
        pytest.param(
            {"keys": [rsa_jwk(RSA_A, "k1") | {"kid": None}, rsa_jwk(RSA_B, "k1") | {"kid": None}]},
            RS_ONLY, "two keys with kid", id="two-keys-without-kid",
        ),
        pytest.param({"kty": "RSA"}, RS_ONLY, "not a JWKS", id="bare-jwk"),
        pytest.param({"keys": {}}, RS_ONLY, "not a JWKS", id="keys-not-list"),
        pytest.param([], RS_ONLY, "not a JWKS", id="array"),
    ],
)  # fmt: skip
def test_load_jwks_errors(doc: Any, pinned: frozenset[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_jwks(json.dumps(doc), pinned)


def test_load_jwks_not_json() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        load_jwks("{keys:", RS_ONLY)


def test_load_jwks_duplicate_kid_only_counts_usable_keys() -> None:
    """A skipped key does not take its kid: the enc key and the sig key may share one."""
    doc = {"keys": [rsa_jwk(RSA_B, "k1", use="enc"), rsa_jwk(RSA_A, "k1")]}
    found, notes = load_jwks(json.dumps(doc), RS_ONLY)
    assert [k.kid for k in found] == ["k1"]
    assert len(notes) == 1


@pytest.mark.parametrize(
    ("jwk", "pinned", "algorithms"),
    [
        pytest.param(rsa_jwk(RSA_A, "k1"), RS_ES, frozenset({"RS256"}), id="rsa-declared-rs256"),
        pytest.param(
            rsa_jwk(RSA_A, "k1") | {"alg": "PS256"}, frozenset({"RS256", "PS256"}),
            frozenset({"PS256"}), id="rsa-declared-ps256",
        ),
        pytest.param(
            {k: v for k, v in rsa_jwk(RSA_A, "k1").items() if k != "alg"},
            frozenset({"RS256", "PS256", "ES256"}), frozenset({"RS256", "PS256"}),
            id="rsa-undeclared",
        ),
        pytest.param(ec_jwk(EC_A, "e1"), RS_ES, frozenset({"ES256"}), id="ec-p256"),
        pytest.param(
            {k: v for k, v in rsa_jwk(RSA_A, "k1").items() if k != "use"}, RS_ONLY,
            frozenset({"RS256"}), id="use-absent-means-sig",
        ),
        pytest.param(
            {"kty": "oct", "k": b64(b"x" * 32), "kid": "h1"}, frozenset({"HS256", "HS384"}),
            frozenset({"HS256", "HS384"}), id="oct-key",
        ),
    ],
)  # fmt: skip
def test_load_jwks_algorithms(
    jwk: dict[str, Any], pinned: frozenset[str], algorithms: frozenset[str]
) -> None:
    found, notes = load_jwks(json.dumps({"keys": [jwk]}), pinned)
    assert notes == []
    assert len(found) == 1
    assert found[0].algorithms == algorithms
    assert found[0].kid == jwk["kid"]


FITS_NONE = "fits none of the algorithms"


@pytest.mark.parametrize(
    ("jwk", "pinned", "note"),
    [
        pytest.param(rsa_jwk(RSA_A, "k1") | {"alg": "RS384"}, RS_ONLY, FITS_NONE,
                     id="declared-not-pinned"),
        pytest.param(ec_jwk(EC_A, "e1"), RS_ONLY, FITS_NONE, id="ec-key-rsa-pinned"),
        pytest.param(rsa_jwk(RSA_A, "k1"), frozenset({"ES256"}), FITS_NONE,
                     id="rsa-key-ec-pinned"),
        pytest.param(rsa_jwk(RSA_A, "k1") | {"alg": "ES256"}, RS_ES, "not usable",
                     id="rsa-declares-es256"),
        pytest.param(rsa_jwk(RSA_A, "k1") | {"alg": "none"}, RS_ES, "'none' is not supported",
                     id="rsa-declares-none"),
    ],
)  # fmt: skip
def test_load_jwks_skips_keys_fitting_no_pinned_algorithm(
    jwk: dict[str, Any], pinned: frozenset[str], note: str
) -> None:
    found, notes = load_jwks(json.dumps({"keys": [jwk]}), pinned)
    assert found == []
    assert len(notes) == 1
    assert note in notes[0]


# --- algorithms_for_key ------------------------------------------------------------

_P384 = ec.generate_private_key(ec.SECP384R1()).public_key()
_P521 = ec.generate_private_key(ec.SECP521R1()).public_key()
_K256 = ec.generate_private_key(ec.SECP256K1()).public_key()
_P192 = ec.generate_private_key(ec.SECP192R1()).public_key()
_ED = ed25519.Ed25519PrivateKey.generate().public_key()
_ALL = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "ES256K",
     "HS256", "HS384", "HS512", "EdDSA"}
)  # fmt: skip


@pytest.mark.parametrize(
    ("key", "declared", "pinned", "expected"),
    [
        pytest.param(RSA_A.public_key(), None, _ALL,
                     frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
                     id="rsa-all"),
        pytest.param(RSA_A.public_key(), None, RS_ES, frozenset({"RS256"}), id="rsa-rs-es"),
        pytest.param(RSA_A.public_key(), "PS256", _ALL, frozenset({"PS256"}), id="rsa-declared"),
        pytest.param(RSA_A.public_key(), "ES256", _ALL, frozenset(), id="rsa-declared-es256"),
        pytest.param(RSA_A.public_key(), "RS384", RS_ONLY, frozenset(), id="rsa-declared-unpinned"),
        pytest.param(RSA_A.public_key(), "HS256", _ALL, frozenset(), id="rsa-declared-hs256"),
        pytest.param(EC_A.public_key(), None, _ALL, frozenset({"ES256"}), id="p256"),
        pytest.param(_P384, None, _ALL, frozenset({"ES384"}), id="p384"),
        pytest.param(_P384, None, RS_ES, frozenset(), id="p384-es256-pinned"),
        pytest.param(_P521, None, _ALL, frozenset({"ES512"}), id="p521"),
        pytest.param(_K256, None, _ALL, frozenset({"ES256K"}), id="secp256k1"),
        pytest.param(_P192, None, _ALL, frozenset(), id="p192-unsupported-curve"),
        pytest.param(_ED, None, _ALL, frozenset({"EdDSA"}), id="ed25519"),
        pytest.param(b"x" * 32, None, _ALL, frozenset({"HS256", "HS384", "HS512"}), id="bytes"),
        pytest.param(b"x" * 32, "HS384", _ALL, frozenset({"HS384"}), id="bytes-declared"),
        pytest.param(b"x" * 32, None, RS_ONLY, frozenset(), id="bytes-rs-pinned"),
        pytest.param("a string", None, _ALL, frozenset(), id="str-is-not-a-key"),
        pytest.param(RSA_A, None, _ALL, frozenset(), id="rsa-private-key-object"),
    ],
)  # fmt: skip
def test_algorithms_for_key(
    key: Any, declared: str | None, pinned: frozenset[str], expected: frozenset[str]
) -> None:
    assert algorithms_for_key(key, declared, pinned) == expected


def test_load_public_key_pem() -> None:
    pem = RSA_A.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = load_public_key_pem(pem, RS_ES)
    assert key == VerifyKey(None, key.key, frozenset({"RS256"}))
    assert key.key.public_numbers() == RSA_A.public_key().public_numbers()
    with pytest.raises(ValueError, match="fits none"):
        load_public_key_pem(pem, frozenset({"ES256"}))
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key_pem(b"-----BEGIN NOTHING-----\n", RS_ONLY)


def test_issuer_key_for() -> None:
    two = ISSUER_A
    assert two.key_for("k1") is two.keys[0]
    assert two.key_for("e1") is two.keys[1]
    assert two.key_for(None) is None
    assert two.key_for("K1") is None
    assert two.key_for(1) is None
    single = ISSUER_A_RS_PS
    assert single.key_for(None) is single.keys[0]
    assert single.key_for("other") is None
    anonymous = Issuer("p", ISS_A, (), RS_ONLY, (VerifyKey(None, b"k", RS_ONLY),), 0.0,
                       ("roles",), ("scope",), True)  # fmt: skip
    assert anonymous.key_for("anything") is anonymous.keys[0]
    assert anonymous.key_for(None) is anonymous.keys[0]


def test_a_future_iat_alone_is_not_a_reason_to_refuse() -> None:
    """RFC 7519 sets no rule for iat; exp and nbf say when a token is valid.
    A strict check would fail fresh tokens over a second of clock skew."""
    now = 1_800_000_000.0
    token = sign(claims(now, iat=int(now) + 3600, exp=int(now) + 7200))
    assert verify((ISSUER_A,), token, now).subject == "alice"


def _segment(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token, text",
    [(f"{_segment({'alg': 'RS256', 'kid': 'k1'})}.{_segment({'iss': ISS_A})}.sig",
      "eyJhbGciOi… (alg RS256, kid 'k1', iss 'https://as.test')"),
     (f"{_segment({'alg': 'HS256'})}.{_segment({'sub': 'x'})}.sig",
      "eyJhbGciOi… (alg HS256, no kid, no iss)"),
     ("abc.def.ghi", "abc.def.gh… (unreadable header or payload)"),
     ("short", "short (not a compact JWS)"),
     ("a" * 50, "aaaaaaaaaa… (not a compact JWS)")],
)  # fmt: skip
def test_describe_token_shows_the_start_and_the_header_only(token: str, text: str) -> None:
    assert describe_token(token) == text
    assert token[10:] not in describe_token(token) or len(token) <= 10


# A cache hit checks the time claims on numbers read once at insert
# (Verified.in_time): at every moment it must answer as a full check does.
_T0 = 1_800_000_000


@given(
    exp=st.one_of(st.none(), st.integers(-100, 100)),
    nbf=st.one_of(st.none(), st.integers(-100, 100)),
    iat=st.integers(-100, 100),
    max_age=st.one_of(st.none(), st.integers(0, 100)),
    at=st.lists(st.floats(-200, 200, allow_nan=False), min_size=1, max_size=5),
)
@settings(max_examples=60, deadline=None)
def test_a_cache_hit_answers_as_a_full_check_at_every_moment(
    exp: int | None, nbf: int | None, iat: int, max_age: int | None, at: list[float]
) -> None:
    issuer = dataclasses.replace(ISSUER_A_NO_EXP, max_token_age=max_age)
    token = sign(
        claims(
            _T0,
            exp=None if exp is None else _T0 + exp,
            nbf=None if nbf is None else _T0 + nbf,
            iat=_T0 + iat,
        )
    )

    def outcome(now: float, cache: TokenCache | None) -> str:
        try:
            verify((issuer,), token, now, cache)
        except TokenRejected as e:
            return e.reason
        return "ok"

    # Each claim's own edges, exactly and a hair either side, among the moments.
    edges = [_T0 + exp + LEEWAY] if exp is not None else []
    edges += [_T0 + nbf - LEEWAY] if nbf is not None else []
    edges += [_T0 + iat + max_age + LEEWAY] if max_age is not None else []
    moments = [_T0 + offset for offset in at]
    moments += [
        m for e in edges for m in (math.nextafter(e, -math.inf), e, math.nextafter(e, math.inf))
    ]
    cache = TokenCache()
    # Twice over: the first accepted moment caches it, so that the second pass
    # asks the cache at every moment, before that one as well as after.
    for now in moments + moments:
        assert outcome(now, cache) == outcome(now, None), (now - _T0, len(cache))
