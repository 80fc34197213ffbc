"""JWT bearer tokens: issuer configuration, key sets, verification (PyJWT).

The policy decides everything: which issuers exist, which algorithms each
accepts, which keys belong to it. The token only says which issuer and key
it claims; both are looked up in the policy's tables and then verified.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from authgate.core.conditions import claim_at
from authgate.core.identity import Identity
from authgate.core.keyset import RemoteKeys, VerifyKey, find_key

if TYPE_CHECKING:
    from authgate.core.introspection import Introspected

RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGS_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
EC_CURVE_NAMES = {
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
    "secp256k1": "secp256k1",
}
HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
SUPPORTED_ALGS = RSA_ALGS | HMAC_ALGS | frozenset(EC_ALGS_BY_CURVE.values()) | {"EdDSA"}
B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*\Z")
# What is parsed of a token before its signature is checked is bounded: a
# header or payload nested thousands deep would exhaust the parser's stack.
MAX_TOKEN_LENGTH = 16 * 1024
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


class CredentialError(Exception):
    """A credential that cannot prove an identity. `code` is machine-readable
    (logs, metrics, replay); `reason` is safe to show the client; `detail` is
    internal (logged, never sent)."""

    REASONS: dict[str, str] = {}

    def __init__(self, code: str, detail: str = "") -> None:
        reason = self.REASONS.get(code, "The credentials are not valid")
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.detail = detail


class TokenRejected(CredentialError):
    """The bearer token is not acceptable (RFC 6750 invalid_token)."""

    REASONS = {
        "malformed": "The access token is malformed",
        "malformed_claim": "The access token has a malformed claim",
        "expired": "The access token expired",
        "not_yet_valid": "The access token is not valid yet",
        "too_old": "The access token is too old",
        "invalid": "The access token is invalid",
        "wrong_issuer": "The access token has the wrong issuer",
        "wrong_algorithm": "The access token algorithm is not accepted",
        "wrong_type": "The access token has the wrong type",
        "unknown_key": "The access token signing key is unknown",
        "wrong_audience": "The access token is not meant for this service",
        "missing_claim": "The access token lacks a required claim",
        "bad_signature": "The access token signature is invalid",
        "inactive": "The access token is not active",
    }


class Unavailable(CredentialError):
    """What the credential's check needs is not at hand (keys not fetched, the
    issuer's introspection endpoint not answering): answer 503, never 401."""

    def __init__(self, code: str, detail: str, issuer: str, retry_after: int) -> None:
        super().__init__(code, detail)
        self.args = (self.detail,)
        self.issuer = issuer
        self.retry_after = retry_after


class KeysUnavailable(Unavailable):
    """The issuer's keys could not be fetched yet: answer 503, never 401."""

    REASONS = {"keys_unavailable": "keys unavailable"}

    def __init__(self, issuer: str, retry_after: int, error: str | None) -> None:
        super().__init__("keys_unavailable", f"no keys for {issuer}: {error}", issuer, retry_after)


@dataclass(frozen=True, slots=True)
class Issuer:
    name: str
    issuer: str
    audience: tuple[str, ...]  # empty: not checked
    algorithms: frozenset[str]
    keys: tuple[VerifyKey, ...]
    leeway: float
    roles_claim: tuple[str, ...]
    scope_claim: tuple[str, ...]
    require_exp: bool
    remote: RemoteKeys | None = None  # jwks_url / discovery: keys fetched at run time
    cookie: str | None = None  # also accept the token from this cookie
    query_param: str | None = None  # also accept it from this query parameter
    required_claims: tuple[str, ...] = ()
    typ: str | None = None  # required `typ` header, e.g. "at+jwt" (RFC 9068)
    max_token_age: float | None = None  # seconds since `iat`
    line: int = 0  # where the policy defines it
    # RFC 7662: tokens checked by asking the issuer (core.introspection).
    introspection: Introspected | None = field(default=None, compare=False)

    @property
    def verifies_signatures(self) -> bool:
        """Keys of its own (an issuer whose every token is introspected has none)."""
        return bool(self.keys) or self.remote is not None

    def key_for(self, kid: Any) -> VerifyKey | None:
        if self.remote is None:
            return find_key(self.keys, kid)
        if not self.remote.loaded:
            raise KeysUnavailable(self.issuer, self.remote.retry_after(), self.remote.last_error)
        return self.remote.lookup(kid)


def algorithms_for_key(key: Any, declared: str | None, pinned: frozenset[str]) -> frozenset[str]:
    """Which of the pinned algorithms this key may verify (one key, one family)."""
    if isinstance(key, rsa.RSAPublicKey):
        family = RSA_ALGS
    elif isinstance(key, ec.EllipticCurvePublicKey):
        curve = EC_CURVE_NAMES.get(key.curve.name)
        family = frozenset({EC_ALGS_BY_CURVE[curve]}) if curve else frozenset()
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        family = frozenset({"EdDSA"})
    elif isinstance(key, bytes):
        family = HMAC_ALGS
    else:
        family = frozenset()
    allowed = family & pinned
    if declared is not None:
        allowed &= {declared}
    return allowed


def load_jwks(text: str, pinned: frozenset[str]) -> tuple[list[VerifyKey], list[str]]:
    """Parse a JWKS document -> (usable keys, notes on keys skipped).

    Keys of unknown type, keys for encryption and keys that fit none of the
    pinned algorithms are skipped (RFC 7517 §5), not fatal.
    Raises ValueError for a document that is not a JWKS at all.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWKS: expected {"keys": [...]}')
    keys: list[VerifyKey] = []
    notes: list[str] = []
    seen: set[str | None] = set()
    for index, jwk in enumerate(doc["keys"]):
        label = f"key {index}" + (f" (kid {jwk.get('kid')!r})" if isinstance(jwk, dict) else "")
        if not isinstance(jwk, dict):
            notes.append(f"{label}: not an object")
            continue
        if jwk.get("use", "sig") != "sig":
            notes.append(f"{label}: use is {jwk.get('use')!r}, not 'sig'")
            continue
        if "d" in jwk or ("k" in jwk and jwk.get("kty") != "oct"):
            raise ValueError(f"{label} is a private key; a JWKS for verification holds public keys")
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            notes.append(f"{label}: kid is not a string")
            continue
        declared = jwk.get("alg")
        if declared is not None and declared not in SUPPORTED_ALGS:
            notes.append(f"{label}: algorithm {declared!r} is not supported")
            continue
        try:
            key = jwt.PyJWK(jwk).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, ValueError, TypeError) as e:
            notes.append(f"{label}: not usable ({e})")
            continue
        algs = algorithms_for_key(key, declared if isinstance(declared, str) else None, pinned)
        if not algs:
            notes.append(f"{label}: fits none of the algorithms {sorted(pinned)}")
            continue
        if kid in seen:
            raise ValueError(f"two keys with kid {kid!r}")
        seen.add(kid)
        keys.append(VerifyKey(kid, key, algs))
    return keys, notes


def load_public_key_pem(data: bytes, pinned: frozenset[str]) -> VerifyKey:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise ValueError(f"not a PEM public key: {e}") from e
    algs = algorithms_for_key(key, None, pinned)
    if not algs:
        raise ValueError(f"the key fits none of the algorithms {sorted(pinned)}")
    return VerifyKey(None, key, algs)


# PyJWT's exceptions -> our codes (the first that matches).
_JWT_CODES: list[tuple[type[Exception], str]] = [
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidSignatureError, "bad_signature"),
]


def _code_for(e: jwt.PyJWTError) -> str:
    return next((code for kind, code in _JWT_CODES if isinstance(e, kind)), "invalid")


def _json_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (strings skipped)."""
    depth = peak = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub(b'""', data)):
        if bracket in (b"[", b"{"):
            depth += 1
            peak = max(peak, depth)
        else:
            depth -= 1
    return peak


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON (RFC 8259 §6)")


def _unverified_part(token: str, index: int) -> dict[str, Any]:
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenRejected("malformed", "token too long")
    segment = token.split(".")[index]
    try:
        data = jwt.utils.base64url_decode(segment.encode("ascii"))
        if _json_depth(data) > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH}")
        value = json.loads(data, parse_constant=_not_json)
    except (ValueError, UnicodeError, RecursionError) as e:
        raise TokenRejected("malformed", str(e)[:200]) from None
    if not isinstance(value, dict):
        raise TokenRejected("malformed", "segment is not an object")
    return value


# Subjects, roles and scopes travel to the backend in headers: no control
# characters (header injection), and no commas inside a role or scope
# (X-Auth-Roles is a comma-separated list).
_HEADER_SAFE = re.compile(r"^[^\x00-\x1f\x7f]+\Z")
_LIST_ITEM_SAFE = re.compile(r"^[^\x00-\x20\x7f,]+\Z")


def string_set(value: Any, split: bool) -> frozenset[str]:
    """A roles or scope claim's strings (`split`: one space-separated string
    allowed). Raises TokenRejected for another type or unsafe characters."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        items = value.split() if split else [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise TokenRejected("malformed_claim", "roles/scope claim type")
    if not all(_LIST_ITEM_SAFE.match(v) for v in items):
        raise TokenRejected("malformed_claim", "roles/scope characters")
    return frozenset(items)


def _numeric(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejected("malformed_claim", f"{name} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise TokenRejected("malformed_claim", f"{name} is not finite")
    return number


def _when(t: float, now: float) -> str:
    """A claim's time for people: `2026-12-01 21:00:00 UTC (1 h 2 min ago)`."""
    try:
        stamp = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        stamp = f"{t:.0f}"
    delta = int(abs(now - t))
    if delta < 60:
        span = f"{delta} s"
    elif delta < 3600:
        span = f"{delta // 60} min"
    elif delta < 86400:
        span = f"{delta // 3600} h {delta % 3600 // 60} min"
    else:
        span = f"{delta // 86400} d {delta % 86400 // 3600} h"
    return f"{stamp} ({span} {'ago' if t <= now else 'from now'})"


def _check_times(claims: dict[str, Any], now: float, issuer: Issuer) -> None:
    """exp, nbf and iat (RFC 7519 §4.1.4-6), with the issuer's leeway."""
    leeway = issuer.leeway
    exp = _numeric(claims, "exp")
    if exp is not None and now >= exp + leeway:
        raise TokenRejected("expired", f"expired {_when(exp, now)}")
    nbf = _numeric(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise TokenRejected("not_yet_valid", f"not valid before {_when(nbf, now)}")
    # iat must be a number, but a future iat alone is no reason to refuse
    # (RFC 7519 sets no rule; exp and nbf say when a token is valid), and a
    # strict check would fail fresh tokens over a second of clock skew.
    iat = _numeric(claims, "iat")
    if issuer.max_token_age is not None and (
        iat is None or now - iat > issuer.max_token_age + leeway
    ):
        raise TokenRejected(
            "too_old", f"issued {_when(iat, now) if iat is not None else 'at no stated time'}"
        )


class Verified(NamedTuple):
    """A cache entry: who the token proved, and the issuer, `kid` header and
    key it was verified with; and its time claims as `_check_times` tests
    them, read once (see `in_time`)."""

    who: Identity
    issuer: Issuer
    kid: Any
    key: VerifyKey
    exp_limit: float = math.inf  # exp + leeway
    nbf: float = -math.inf
    iat: float = 0.0
    age_limit: float = math.inf  # max_token_age + leeway

    @classmethod
    def of(cls, who: Identity, issuer: Issuer, kid: Any, key: VerifyKey) -> Verified:
        """For claims `_check_times` has accepted (so each is a number or absent)."""
        claims, leeway = who.claims, issuer.leeway
        exp, nbf, iat = (_numeric(claims, n) for n in ("exp", "nbf", "iat"))
        age = issuer.max_token_age
        return cls(
            who,
            issuer,
            kid,
            key,
            math.inf if exp is None else exp + leeway,
            -math.inf if nbf is None else nbf,
            0.0 if iat is None else iat,
            math.inf if age is None else age + leeway,
        )

    def in_time(self, now: float) -> bool:
        """`_check_times`' own comparisons on the numbers read at insert: True
        when it would accept the token at `now` (False: let it say why not)."""
        return (
            now < self.exp_limit
            and now + self.issuer.leeway >= self.nbf
            and now - self.iat <= self.age_limit
        )


class TokenCache:
    """Tokens whose signature and claims were verified, so that a client
    reusing its token does not pay for the signature check every time.

    Time claims are checked again on every use, and so is that the issuer's
    key set still holds the very key that verified the token: a key the
    provider removed ends its tokens at the refresh that drops it. Only
    verified tokens enter, so an attacker cannot fill it with garbage; it
    lives in one Policy, so a reload (new keys) starts empty. Bounded: the
    oldest entry goes first.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._entries: dict[str, Verified] = {}

    def get(self, token: str) -> Verified | None:
        return self._entries.get(token)

    def put(self, token: str, entry: Verified) -> None:
        if len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[token] = entry

    def drop(self, token: str) -> None:
        self._entries.pop(token, None)

    def __len__(self) -> int:
        return len(self._entries)


def _typ_matches(typ: Any, wanted: str) -> bool:
    """RFC 7515 §4.1.9: media types compare case-insensitively, and the
    `application/` prefix may be left out."""
    if not isinstance(typ, str):
        return False
    typ = typ.lower()
    return typ in (wanted.lower(), "application/" + wanted.lower())


def unverified_kid(token: str) -> tuple[str | None, str | None]:
    """(iss, kid) read without verification, only to decide whether an
    unknown key is worth a JWKS refresh. (None, None) when unreadable."""
    try:
        header = _unverified_part(token, 0)
        payload = _unverified_part(token, 1) if token.count(".") == 2 else {}
    except (TokenRejected, IndexError):
        return None, None
    iss, kid = payload.get("iss"), header.get("kid")
    return (iss if isinstance(iss, str) else None), (kid if isinstance(kid, str) else None)


def verify(
    issuers: tuple[Issuer, ...], token: str, now: float, cache: TokenCache | None = None
) -> Identity:
    """Verify a compact JWS and return the identity it proves.

    Raises TokenRejected with a client-safe reason on any failure.
    """
    if cache is not None:
        known = cache.get(token)
        if known is not None and known.issuer in issuers:
            # Identity, not equality: a refresh keeps the objects of keys it
            # serves again (keyset.RemoteKeys.apply); anything else verifies anew.
            if known.issuer.key_for(known.kid) is known.key:
                if not known.in_time(now):
                    _check_times(known.who.claims, now, known.issuer)  # raises, saying why
                return known.who
            cache.drop(token)  # its key left the set (or the kid names another)
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenRejected("malformed", "token too long")
    if not B64TOKEN.match(token) or token.count(".") != 2:
        raise TokenRejected("malformed", "not a compact JWS")
    if not issuers:
        raise TokenRejected("invalid", "no JWT issuer configured")
    header = _unverified_part(token, 0)
    # Parsed (bounded) before PyJWT parses it, so that nothing PyJWT reads
    # can be nested without bound or hold NaN.
    payload = _unverified_part(token, 1)
    if len(issuers) == 1:
        issuer = issuers[0]
    else:
        # Read `iss` unverified only to choose whose keys to verify with.
        iss = payload.get("iss")
        chosen = next((i for i in issuers if i.issuer == iss), None)
        if chosen is None:
            raise TokenRejected("wrong_issuer", f"iss {iss!r}")
        issuer = chosen
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in issuer.algorithms:
        raise TokenRejected("wrong_algorithm", f"alg {alg!r}")
    if issuer.typ is not None and not _typ_matches(header.get("typ"), issuer.typ):
        raise TokenRejected("wrong_type", f"typ {header.get('typ')!r}")
    kid = header.get("kid")
    key = issuer.key_for(kid)
    if key is None:
        raise TokenRejected("unknown_key", "kid not in key set")
    if alg not in key.algorithms:
        raise TokenRejected("wrong_algorithm", f"alg {alg!r} for key")
    require = ["iss", "sub", *issuer.required_claims] + (["exp"] if issuer.require_exp else [])
    if issuer.audience:
        require.append("aud")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key.key,
            algorithms=[alg],
            audience=list(issuer.audience) if issuer.audience else None,
            issuer=issuer.issuer,
            leeway=issuer.leeway,
            # Time claims are checked below against the caller's clock, so that
            # tests, `explain --at` and the gateway all see one time.
            options={
                "require": require,
                "verify_aud": bool(issuer.audience),
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.PyJWTError as e:
        raise TokenRejected(_code_for(e), f"{type(e).__name__}: {e}") from None
    except (RecursionError, OverflowError, ValueError) as e:  # never a 5xx for a token
        raise TokenRejected("malformed", type(e).__name__) from None
    _check_times(claims, now, issuer)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not _HEADER_SAFE.match(sub):
        raise TokenRejected("malformed_claim", "sub is not a plain string")
    roles = string_set(claim_at(claims, issuer.roles_claim), split=False)
    scopes = string_set(claim_at(claims, issuer.scope_claim), split=True)
    who = Identity(sub, issuer.issuer, "jwt", roles, scopes, claims)
    if cache is not None:
        cache.put(token, Verified.of(who, issuer, kid, key))
    return who


def describe_token(token: str) -> str:
    """For traces: the token's first characters and its unverified header and
    issuer, e.g. `eyJhbGciOi… (alg RS256, kid 'demo-1', iss 'https://…')`.
    Never the whole token."""
    shown = token[:10] + ("…" if len(token) > 10 else "")
    parts = token.split(".")
    if len(parts) != 3:
        return f"{shown} (not a compact JWS)"
    try:
        header = _unverified_part(token, 0)
        iss = _unverified_part(token, 1).get("iss")
    except TokenRejected:
        return f"{shown} (unreadable header or payload)"
    alg, kid = header.get("alg"), header.get("kid")
    about = [f"alg {str(alg)[:20]}", f"kid {str(kid)[:40]!r}" if kid is not None else "no kid"]
    about.append(f"iss {str(iss)[:80]!r}" if iss is not None else "no iss")
    return f"{shown} ({', '.join(about)})"
