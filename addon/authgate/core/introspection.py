"""Opaque access tokens, checked by asking their issuer (RFC 7662 token
introspection). Pure: the configuration, what an introspection answer means
(an identity, or why not), how long an answer may be remembered, and each
issuer's state (the answers remembered in this process, the backoff after a
failed call). The HTTP call, the shared cache in the store and the rule of
one call in flight per token are `authgate.runtime.introspection`'s.

- The token names no issuer, so one issuer per policy introspects; its
  `tokens` setting says which bearer tokens go there: `opaque` (those that
  are not JWT-shaped; JWTs are verified with the issuer's keys as ever) or
  `all` (also the JWTs whose `iss` is this issuer: revocation is seen).
- Answers are remembered by the SHA-256 of the token, never the token: an
  active one until the token's `exp` and at most `cache_max`, an inactive
  one (or one this gateway refuses) for `negative_cache`.
- An answer that is not an introspection answer (not 200, not a JSON object,
  no boolean `active`, too large) means the provider is broken: 503, as when
  it does not answer. `active: false` is 401 invalid_token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from authgate.core.conditions import claim_at
from authgate.core.identity import Identity
from authgate.core.tokens import (
    _HEADER_SAFE,
    B64TOKEN,
    MAX_JSON_DEPTH,
    MAX_TOKEN_LENGTH,
    Issuer,
    TokenRejected,
    Unavailable,
    _check_times,
    _json_depth,
    _not_json,
    string_set,
    unverified_kid,
)

OPAQUE = "opaque"  # tokens that are not JWT-shaped go to introspection
ALL = "all"  # and the JWTs that name this issuer too
TOKEN_CHOICES = (OPAQUE, ALL)
CLIENT_SECRET_BASIC = "client_secret_basic"
CLIENT_SECRET_POST = "client_secret_post"
AUTH_METHODS = (CLIENT_SECRET_BASIC, CLIENT_SECRET_POST)
MAX_ANSWER = 64 * 1024  # bytes; introspection answers are a few hundred
MAX_CACHED = 20_000  # answers remembered per issuer in one process
MAX_BACKOFF = 30.0  # seconds without calls after repeated failures, at most
# The start of a JWS in compact form (RFC 7515 §7.1): base64url characters.
_HEAD = re.compile(r"[A-Za-z0-9_-]{4}")


class IntrospectionUnavailable(Unavailable):
    """The issuer's introspection endpoint did not give a usable answer (down,
    slow, broken, or backing off after failures): 503, never 401."""

    REASONS = {"introspection_unavailable": "introspection unavailable"}

    def __init__(self, issuer: str, retry_after: int, error: str | None) -> None:
        detail = f"no introspection answer from {issuer}: {error or 'none yet'}"
        super().__init__("introspection_unavailable", detail, issuer, retry_after)


class ProviderBroken(ValueError):
    """The endpoint answered, but not with an introspection answer."""


@dataclass(frozen=True, slots=True)
class IntrospectionConfig:
    """An issuer's `introspection:` as the policy says it, compiled."""

    issuer: str
    endpoint: str | None  # None: the introspection_endpoint of the discovery document
    client_id: str
    client_secret: str = field(repr=False)
    auth: str = CLIENT_SECRET_BASIC
    tokens: str = OPAQUE
    cache_max: float = 60.0
    negative_cache: float = 10.0
    timeout: float = 2.0
    allow_http: bool = False
    secret_file: str | None = None  # where the secret was read, for `authgate check`
    secret_mode: int | None = None  # that file's permission bits at load
    line: int = 0


@dataclass(frozen=True, slots=True)
class Entry:
    """A remembered answer: who it proves (or why not), until when it may be
    used without asking again, and the token's `exp` (if the answer gave one)."""

    until: float
    who: Identity | None
    code: str = ""  # why not, when `who` is None: inactive, wrong_audience, ...
    detail: str = ""
    exp: float | None = None


@dataclass(frozen=True, slots=True)
class Introspect:
    """Slow work: ask the issuer about a token not remembered (or remembered
    too long ago)."""

    issuer: Issuer
    token: str = field(repr=False)
    digest: bytes = b""


def token_digest(token: str) -> bytes:
    """The key an answer is remembered by: SHA-256 of the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def jwt_shaped(token: str) -> bool:
    """Three base64url segments, the first a JSON object (its first bytes
    decode to `{`): a JWT. A JWE's five segments, or anything else, is opaque
    to this gateway. Cheap (on every bearer request when an issuer
    introspects): the header is parsed only if the token is verified."""
    if token.count(".") != 2 or len(token) > MAX_TOKEN_LENGTH or not _HEAD.match(token):
        return False
    start = base64.urlsafe_b64decode(token[:4])  # four base64url characters: three bytes
    return start.lstrip(b" \t\r\n").startswith(b"{")


def introspecting_issuer(issuer: Issuer, token: str, verified: bool = False) -> bool:
    """Whether this token goes to `issuer`'s introspection (the policy's one
    introspecting issuer): every token that is not JWT-shaped, and with
    `tokens: all` the JWTs whose (unverified) `iss` is this issuer.
    `verified`: the token is a JWT some issuer's keys verified already (not
    this one's, which has none: no need to read its `iss` again)."""
    source = issuer.introspection
    if source is None:
        return False
    if not jwt_shaped(token):
        return True
    return source.tokens == ALL and not verified and unverified_kid(token)[0] == issuer.issuer


def usable(token: str) -> TokenRejected | None:
    """Why a token is not even worth sending to the provider, or None: too
    long, or not a b64token (RFC 6750 §2.1)."""
    if len(token) > MAX_TOKEN_LENGTH:
        return TokenRejected("malformed", "token too long")
    if not B64TOKEN.match(token):
        return TokenRejected("malformed", "not a b64token (RFC 6750 §2.1)")
    return None


# --- the answer -------------------------------------------------------------------


def read_answer(status: int, body: bytes) -> dict[str, Any]:
    """An introspection response (RFC 7662 §2.2) -> its members. Raises
    ProviderBroken for anything else: that is the provider's failure, not
    the token's."""
    if status in (400, 401, 403):
        raise ProviderBroken(
            f"HTTP {status}: the provider refused the gateway's request "
            "(check client_id, the client secret and auth)"
        )
    if status != 200:
        raise ProviderBroken(f"HTTP {status}")
    if len(body) > MAX_ANSWER:
        raise ProviderBroken(f"the answer is larger than {MAX_ANSWER} bytes")
    try:
        if _json_depth(body) > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH}")
        doc = json.loads(body, parse_constant=_not_json)
    except (ValueError, UnicodeError, RecursionError) as e:
        raise ProviderBroken(f"not JSON: {str(e)[:120]}") from None
    if not isinstance(doc, dict):
        raise ProviderBroken("the answer is not a JSON object")
    if not isinstance(doc.get("active"), bool):
        raise ProviderBroken("the answer has no boolean 'active' (RFC 7662 §2.2)")
    return doc


def _exp(answer: dict[str, Any]) -> float | None:
    value = answer.get("exp")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def identity_of(answer: dict[str, Any], issuer: Issuer, now: float) -> Identity:
    """Who an answer proves, read as a JWT's claims are: `sub` (or, for a
    token a client holds for itself, its `client_id`), roles and scopes where
    the issuer's roles_claim and scope_claim say. Raises TokenRejected."""
    if answer.get("active") is not True:
        raise TokenRejected("inactive", "the provider says active: false")
    iss = answer.get("iss")
    if iss is not None and iss != issuer.issuer:
        raise TokenRejected("wrong_issuer", f"iss {str(iss)[:200]!r}")
    if issuer.audience:
        aud = answer.get("aud")
        if aud is None:
            raise TokenRejected("missing_claim", "no aud in the answer")
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
            raise TokenRejected("malformed_claim", "aud is not a string or a list of strings")
        if not set(auds) & set(issuer.audience):
            raise TokenRejected("wrong_audience", f"aud {str(aud)[:200]!r}")
    token_type = answer.get("token_type")
    if token_type is not None and (
        not isinstance(token_type, str) or token_type.lower() != "bearer"
    ):
        raise TokenRejected("wrong_type", f"token_type {str(token_type)[:40]!r}")
    if "cnf" in answer:
        # A sender-constrained token (RFC 8705 mTLS, RFC 9449 DPoP): accepting it
        # as a bearer token would drop the proof its issuer asks for.
        raise TokenRejected("wrong_type", "bound to a key (cnf)")
    _check_times(answer, now, issuer)
    for claim in issuer.required_claims:
        if claim not in answer:
            raise TokenRejected("missing_claim", f"no {claim}")
    sub = answer.get("sub")
    if sub is None:
        sub = answer.get("client_id")
    if not isinstance(sub, str) or not _HEADER_SAFE.match(sub):
        raise TokenRejected("missing_claim" if sub is None else "malformed_claim", "no usable sub")
    roles = string_set(claim_at(answer, issuer.roles_claim), split=False)
    scopes = string_set(claim_at(answer, issuer.scope_claim), split=True)
    return Identity(sub, issuer.issuer, "jwt", roles, scopes, answer)


def cache_until(
    answer: dict[str, Any], now: float, cache_max: float, negative: float, leeway: float = 0.0
) -> float:
    """Until when an answer may be used without asking again: an active
    token until its `exp` (and the issuer's leeway), and never more than
    `cache_max` from now; an inactive one `negative` seconds."""
    if answer.get("active") is not True:
        return now + negative
    until = now + cache_max
    exp = _exp(answer)
    return until if exp is None else min(until, exp + leeway)


def entry_for(
    answer: dict[str, Any], issuer: Issuer, now: float, config: IntrospectionConfig
) -> Entry:
    """The answer as remembered: the identity, or why not (kept for the
    shorter, negative time)."""
    try:
        who = identity_of(answer, issuer, now)
    except TokenRejected as e:
        if e.code == "expired":  # remembered to the token's end: it will not revive
            return Entry(now, None, e.code, e.detail, _exp(answer))
        return Entry(now + config.negative_cache, None, e.code, e.detail)
    until = cache_until(answer, now, config.cache_max, config.negative_cache, issuer.leeway)
    return Entry(until, who, exp=_exp(answer))


# --- one issuer's state --------------------------------------------------------------


class Introspected:
    """One issuer's introspection: its configuration, the answers this
    process remembers, the endpoint (once discovery found it) and the
    backoff after failed calls. No I/O: `authgate.runtime.introspection`
    calls the provider and hands the answers here."""

    def __init__(self, config: IntrospectionConfig) -> None:
        self.config = config
        self.endpoint: str | None = config.endpoint
        self._known: dict[bytes, Entry] = {}
        self.failures = 0  # in a row
        self.failures_total = 0
        self.calls = 0  # introspection requests made (for status and metrics)
        self.shared_hits = 0  # answers found in the shared store instead
        self.last_error: str | None = None
        self.next_attempt = 0.0  # no call before this (wall clock), after failures
        self.probing = False  # a call is trying whether the provider is back

    @property
    def tokens(self) -> str:
        return self.config.tokens

    def __len__(self) -> int:
        return len(self._known)

    # --- what the decision reads ------------------------------------------------

    def lookup(self, digest: bytes, now: float, leeway: float = 0.0) -> Entry | None:
        """The answer to use now: one still fresh, or one that proved a token
        whose `exp` has passed since (no need to ask: it is expired)."""
        entry = self._known.get(digest)
        if entry is None:
            return None
        if now < entry.until or (entry.exp is not None and now >= entry.exp + leeway):
            return entry
        return None

    def retry_after(self, now: float) -> int:
        """Whole seconds a client should wait before trying again (>= 1)."""
        return max(1, math.ceil(self.next_attempt - now)) if self.failures else 1

    def same_source(self, other: Introspected) -> bool:
        """Configured alike: a reloaded policy can keep this one's answers."""
        return self.config == other.config

    # --- calls ------------------------------------------------------------------

    def may_call(self, now: float) -> bool:
        """Whether to call the provider now. After a failure, not before the
        backoff ends, and then one call at a time until one succeeds (the
        others are answered 503 at once, not queued behind a dead provider)."""
        if not self.failures:
            return True
        if now < self.next_attempt or self.probing:
            return False
        self.probing = True
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self.probing = False
        self.last_error = None

    def failed(self, error: str, now: float) -> float:
        """Record a failed call; the backoff (seconds) before the next: 1 s,
        doubling to MAX_BACKOFF."""
        self.failures += 1
        self.failures_total += 1
        self.last_error = error
        self.probing = False
        backoff = min(2.0 ** min(self.failures - 1, 10), MAX_BACKOFF)
        self.next_attempt = now + backoff
        return backoff

    def abandon(self) -> None:
        """A call ended with no answer either way (cancelled)."""
        self.probing = False

    # --- answers ------------------------------------------------------------------

    def remember(self, digest: bytes, entry: Entry, now: float) -> None:
        known = self._known
        if len(known) >= MAX_CACHED and digest not in known:
            self._sweep(now)
        known[digest] = entry

    def _sweep(self, now: float) -> None:
        """Forget answers past use; if that is not enough, the oldest half."""
        known = self._known
        for digest in [d for d, e in known.items() if e.until <= now]:
            del known[digest]
        if len(known) >= MAX_CACHED:
            for digest in list(known)[: len(known) // 2 + 1]:
                del known[digest]


def introspection_work(issuer: Issuer, token: str, now: float) -> Introspect | None:
    """The call a token needs before `introspected` can answer, or None (a
    remembered answer, or a token not worth sending)."""
    source = issuer.introspection
    assert source is not None
    if usable(token) is not None:
        return None
    digest = token_digest(token)
    if source.lookup(digest, now, issuer.leeway) is not None:
        return None
    return Introspect(issuer, token, digest)


def introspected(issuer: Issuer, token: str, now: float) -> Identity:
    """The identity a token proves, from its remembered answer. Raises
    TokenRejected (401), or IntrospectionUnavailable (503) when there is no
    answer to go by."""
    source = issuer.introspection
    assert source is not None
    problem = usable(token)
    if problem is not None:
        raise problem
    entry = source.lookup(token_digest(token), now, issuer.leeway)
    if entry is None:
        raise IntrospectionUnavailable(issuer.issuer, source.retry_after(now), source.last_error)
    if entry.who is None:
        raise TokenRejected(entry.code, entry.detail)
    _check_times(entry.who.claims, now, issuer)
    return entry.who
