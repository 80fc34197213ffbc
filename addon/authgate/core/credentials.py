"""Finding and verifying credentials: bearer JWTs (header, cookie, query),
API keys, Basic, TLS client certificates (mTLS), and the sessions of an OpenID
Connect login.

`find()` locates the credential a request presents; one `Verifier` per kind
describes, challenges and checks it, and names the slow work (a bcrypt check,
a key fetch) the gateway does off the event loop before `decide()`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qsl

import bcrypt

from authgate.core import cookies as cookie_fields
from authgate.core import oidc
from authgate.core.clientcert import ClientCert
from authgate.core.identity import Identity
from authgate.core.introspection import (
    Introspect,
    introspected,
    introspecting_issuer,
    introspection_work,
)
from authgate.core.keyset import RemoteKeys
from authgate.core.oidc import OIDC as OIDC
from authgate.core.oidc import CodeExchange, SessionRefresh
from authgate.core.records import record
from authgate.core.tokens import (
    Issuer,
    TokenCache,
    TokenRejected,
    Unavailable,
    describe_token,
    unverified_kid,
    verify,
)

JWT = "jwt"
API_KEY = "api_key"
BASIC = "basic"
MTLS = "mtls"
KINDS = (JWT, API_KEY, BASIC, MTLS, OIDC)

MIN_BCRYPT_COST = 4  # bcrypt's own minimum; htpasswd -B writes 5 by default
WEAK_BCRYPT_COST = 10  # below this, `check` and the start-up log warn
_BCRYPT = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --- API keys -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the key
    roles: frozenset[str]
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class ApiKeys:
    header: str  # lower-case header name
    by_digest: dict[bytes, ApiKey]

    def verify(self, presented: str) -> Identity | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        # The lookup is on a digest of what the client sent, so its timing says
        # nothing about stored keys; the final comparison is constant-time.
        key = self.by_digest.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            return None
        return Identity(key.name, "api-key", API_KEY, key.roles, key.scopes, {"sub": key.name})


def hash_key(key: str) -> str:
    """The hex SHA-256 digest to put in a policy for this API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# --- Basic ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BasicUser:
    name: str
    hash: bytes  # bcrypt
    roles: frozenset[str]
    scopes: frozenset[str]


@dataclass(slots=True)
class BasicUsers:
    """htpasswd users (bcrypt only). Checking a password costs tens of
    milliseconds by design, so results are remembered briefly, keyed by a
    salted digest of the exact credentials (never the password itself)."""

    users: dict[str, BasicUser]
    remember: float = 300.0  # seconds a verified password is trusted without bcrypt
    line: int = 0  # where the policy configures it
    file: str = ""  # the htpasswd file

    def weak(self) -> list[tuple[str, int]]:
        """(user, cost) of hashes below WEAK_BCRYPT_COST: cheap to guess offline."""
        costs = [(name, int(u.hash[4:6])) for name, u in self.users.items()]
        return [(name, cost) for name, cost in costs if cost < WEAK_BCRYPT_COST]

    _salt: bytes = field(default_factory=lambda: bcrypt.gensalt())
    _known: dict[bytes, tuple[bool, float]] = field(default_factory=dict)

    def _key(self, user: str, password: str) -> bytes:
        data = f"{user}\x00{password}".encode("utf-8", "surrogateescape")
        return hmac.new(self._salt, data, hashlib.sha256).digest()

    def cached(self, user: str, password: str, now: float) -> bool | None:
        entry = self._known.get(self._key(user, password))
        if entry is None or entry[1] < now:
            return None
        return entry[0]

    def check(self, user: str, password: str, now: float) -> bool:
        """bcrypt (slow: call from a thread on the request path), remembered."""
        known = self.cached(user, password, now)
        if known is not None:
            return known
        entry = self.users.get(user)
        # An unknown user costs a bcrypt check too, so timing does not tell
        # which user names exist.
        hashed = entry.hash if entry is not None else _dummy_hash()
        # bcrypt reads 72 bytes at most; htpasswd and Apache hash the first 72 of
        # a longer password, so compare those (bcrypt 5 refuses longer input).
        secret = password.encode("utf-8", "surrogateescape")[:72]
        ok = bcrypt.checkpw(secret, hashed)
        ok = ok and entry is not None
        if len(self._known) > 10_000:
            self._known.clear()
        # Failures are remembered for less time: enough to make guessing with
        # one password in a loop cheap for us, short enough to fix a typo.
        self._known[self._key(user, password)] = (ok, now + (self.remember if ok else 10.0))
        return ok

    def identity(self, user: str) -> Identity:
        entry = self.users[user]
        return Identity(user, "basic", BASIC, entry.roles, entry.scopes, {"sub": user})


@functools.cache
def _dummy_hash() -> bytes:
    return bcrypt.hashpw(b"no such user", bcrypt.gensalt(10))


def parse_htpasswd(text: str) -> tuple[dict[str, bytes], tuple[int, str] | None]:
    """user -> bcrypt hash, or the first problem as (line, message)."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, hashed = line.strip().partition(":")
        if not sep or not user:
            return users, (number, "expected user:hash")
        if user in users:
            return users, (number, f"user {user!r} appears twice")
        m = _BCRYPT.match(hashed)
        if not m:
            kind = (
                "an apr1/MD5"
                if hashed.startswith("$apr1$")
                else ("a SHA-1" if hashed.startswith("{SHA}") else "a crypt/plain-text")
            )
            return users, (
                number,
                f"user {user!r} has {kind} hash; only bcrypt is accepted (htpasswd -B): "
                f"set the password again with `htpasswd -B -C 10 FILE {user}`",
            )
        cost = int(m.group(1))
        if cost < MIN_BCRYPT_COST:
            return users, (
                number,
                f"user {user!r}: bcrypt cost {m.group(1)} is not valid (>= {MIN_BCRYPT_COST})",
            )
        if cost > 31:
            return users, (number, f"user {user!r}: bcrypt cost {cost} is not valid (<= 31)")
        users[user] = hashed.encode()
    return users, None


# --- client certificates (mTLS) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertClient:
    """A client the policy lists: by its name, or by its certificate's fingerprint."""

    name: str
    roles: frozenset[str]
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class ClientCerts:
    """`authn.mtls`: how a certificate the handshake verified names its holder.

    A fingerprint listed in `by_sha256` names the holder whatever the
    certificate says; otherwise the holder is the certificate's `name_from`
    field, with the roles and scopes `by_name` gives that name (none when the
    name is not listed, or a refusal with `listed_only`)."""

    required: bool  # every request needs a valid certificate: a 401 before any rule
    name_from: str  # one of clientcert.NAME_FIELDS
    by_sha256: dict[str, CertClient]
    by_name: dict[str, CertClient]
    listed_only: bool = False
    forward: bool = False  # send the backend RFC 9440 Client-Cert and Client-Cert-Chain
    line: int = 0  # where the policy configures it

    def identify(self, cert: ClientCert) -> Identity | tuple[str, str]:
        """The holder's identity, or (code, detail) of why the certificate names nobody."""
        listed = self.by_sha256.get(cert.sha256)
        if listed is not None:
            name = listed.name
        else:
            found = cert.name(self.name_from)
            if found is None:
                return "no_name", f"no {self.name_from} in the certificate"
            # Names go to the backend in header fields: never a control character.
            if _CONTROL.search(found):
                return "bad_name", f"a control character in the certificate's {self.name_from}"
            name = found
            listed = self.by_name.get(name)
            if listed is None and self.listed_only:
                return "unlisted_certificate", f"{self.name_from} {name[:80]!r} is not listed"
        roles = listed.roles if listed is not None else frozenset()
        scopes = listed.scopes if listed is not None else frozenset()
        forward: tuple[tuple[str, str], ...] = ()
        if self.forward:
            forward = (("Client-Cert", cert.client_cert),)
            if cert.client_cert_chain:
                forward += (("Client-Cert-Chain", cert.client_cert_chain),)
        claims = {"sub": name, "cert": cert.claims}
        return Identity(name, MTLS, MTLS, roles, scopes, claims, forward)


# --- what the request carries ------------------------------------------------------------


@record
class Presented:
    kind: str  # JWT | API_KEY | BASIC | MTLS | OIDC
    via: str  # "authorization", "cookie", "query", the API key header, or "tls"
    # the token, the key, "user:password", a certificate's fingerprint, or the sealed session
    value: str
    issuers: tuple[Issuer, ...] = ()  # for JWTs: the issuers that may have signed it
    cert: ClientCert | None = None  # for MTLS: what the handshake verified


class Ambiguous(Exception):
    """Credentials sent two ways at once, or repeated: 400 invalid_request."""


def issuers_by(issuers: tuple[Issuer, ...], attr: str) -> dict[str, tuple[Issuer, ...]]:
    """Cookie or query-parameter name -> the issuers that read it (a policy
    computes these once, at load)."""
    out: dict[str, tuple[Issuer, ...]] = {}
    for issuer in issuers:
        name = getattr(issuer, attr)
        if name:
            out[name] = (*out.get(name, ()), issuer)
    return out


def find(
    issuers: tuple[Issuer, ...],
    api_keys: ApiKeys | None,
    basic: BasicUsers | None,
    headers: Sequence[tuple[str, str]],
    query: str,
    *,
    cookies: dict[str, tuple[Issuer, ...]] | None = None,
    params: dict[str, tuple[Issuer, ...]] | None = None,
    client_cert: ClientCert | None = None,
    login: oidc.Login | None = None,
) -> tuple[Presented | None, Presented | None]:
    """-> (the credential to use, a malformed one). Raises Ambiguous.

    Unsupported schemes count as no credentials. A cookie is used only when
    nothing else is sent (a browser's session cookie beside an explicit
    token is normal, and the explicit one wins). `cookies` and `params`: the
    issuers by cookie and query-parameter name (worked out here when not given).
    `client_cert`: the connection's verified certificate (when the rule
    accepts one), used only when the request itself carries no credential:
    the TLS stack presents it for every request on the connection, the
    request's own credential is the more specific statement.
    `login`: the OpenID Connect login whose session cookie counts.
    """
    if cookies is None:
        cookies = issuers_by(issuers, "cookie")
    if params is None:
        params = issuers_by(issuers, "query_param")
    # The fields looked at, in one loop (not a comprehension each: on a handful
    # of fields their own calls cost more than the loop).
    key_field = api_keys.header if api_keys is not None else None
    auth: list[str] = []
    keys: list[str] = []
    cookie_lines: list[str] = []
    for k, v in headers:
        if k == "authorization":
            auth.append(v)
        elif k == "cookie":
            cookie_lines.append(v)
        if k == key_field:  # (the loader refuses authorization and cookie for it)
            keys.append(v)
    if len(auth) > 1:
        raise Ambiguous("more than one Authorization field")
    explicit: list[Presented] = []
    malformed: Presented | None = None
    if auth:
        scheme, _, rest = auth[0].strip(" \t").partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and issuers:
            explicit.append(Presented(JWT, "authorization", rest.strip(" "), issuers))
        elif scheme == "basic" and basic is not None:
            try:
                decoded = base64.b64decode(rest.strip(" "), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                decoded = ""
            if ":" not in decoded or _CONTROL.search(decoded):
                malformed = Presented(BASIC, "authorization", "")
            else:
                explicit.append(Presented(BASIC, "authorization", decoded))
    if api_keys is not None:
        if len(keys) > 1:
            raise Ambiguous(f"more than one {api_keys.header} field")
        if keys:
            explicit.append(Presented(API_KEY, api_keys.header, keys[0].strip()))
    if params and query:
        items = parse_qsl(query, keep_blank_values=True)
        for name, chosen in params.items():
            values = [v for k, v in items if k == name]
            if len(values) > 1:
                raise Ambiguous(f"more than one {name} query parameter")
            if values:
                explicit.append(Presented(JWT, "query", values[0], chosen))
    if len(explicit) + (malformed is not None) > 1:
        raise Ambiguous("credentials sent in more than one way")
    if explicit or malformed:
        return (explicit[0] if explicit else None), malformed
    fields = cookie_lines if cookies or login else []
    if fields:
        found = cookie_fields.read(fields, set(cookies))
        for name, values in found.items():
            if len(values) > 1:
                raise Ambiguous(f"more than one {name} cookie")
        session = _session(login, fields) if login is not None else None
        if len(found) + (session is not None) > 1:
            names = sorted(found) + ([login.session_cookie] if session and login else [])
            raise Ambiguous(f"more than one token cookie: {', '.join(names)}")
        if session is not None:
            return session, None
        for name, (token,) in found.items():
            return Presented(JWT, "cookie", token, cookies[name]), None
    if client_cert is not None:
        return Presented(MTLS, "tls", client_cert.sha256, cert=client_cert), None
    return None, None


def _session(login: oidc.Login, fields: Sequence[str]) -> Presented | None:
    """The session cookie (its pieces joined), if the request carries one."""
    name = login.session_cookie
    if not any(name in f for f in fields):
        return None  # the common case without a session: no parsing
    try:
        value = oidc.find_session(login, fields)
    except ValueError as e:
        raise Ambiguous(str(e)) from None
    return Presented(OIDC, "cookie", value) if value is not None else None


@record
class Outcome:
    identity: Identity | None = None
    failed: str | None = None  # kind of the credential that failed
    reason: str = ""  # client-safe
    code: str = ""  # machine-readable: expired, bad_signature, unknown_api_key, ...
    detail: str = ""  # internal
    unavailable: Unavailable | None = None  # keys, introspection or the provider: 503
    cookies: tuple[str, ...] = ()  # Set-Cookie values for the answer (sessions)
    forward: tuple[tuple[str, str], ...] = ()  # fields for the backend (an access token)


# --- verifiers: one per credential kind -------------------------------------------------

Challenge = tuple[str, tuple[tuple[str, str], ...]]  # (scheme, parameters after realm)


@dataclass(frozen=True, slots=True)
class PasswordCheck:
    """Slow work: a bcrypt check of Basic credentials not seen recently."""

    user: str
    password: str


@dataclass(frozen=True, slots=True)
class KeyFetch:
    """Slow work: fetch an issuer's keys (never fetched yet, or an unknown kid)."""

    source: RemoteKeys
    kid: str | None
    reason: str  # "cold start" or "unknown kid"


Work = PasswordCheck | KeyFetch | Introspect | CodeExchange | SessionRefresh


class Verifier(Protocol):
    """What the decision needs of a credential kind. `find` (above) locates
    every kind at once, because sending two is itself an answer (400)."""

    @property
    def kind(self) -> str: ...

    @property
    def label(self) -> str:
        """For people: "bearer token"."""
        ...

    def challenge(self) -> Challenge:
        """The WWW-Authenticate challenge a 401 names this kind with."""
        ...

    def describe(self, presented: Presented) -> str:
        """What was sent, for traces: never a whole token, key or password."""
        ...

    def slow_work(self, presented: Presented, now: float) -> Work | None:
        """What must happen before `check` can answer without blocking."""
        ...

    def check(self, presented: Presented, now: float) -> Outcome:
        """Verify: an identity, or why not."""
        ...


@dataclass(frozen=True, slots=True)
class JwtVerifier:
    """Bearer tokens: JWTs verified with their issuer's keys, and (when an
    issuer introspects) opaque tokens checked by asking that issuer."""

    cache: TokenCache  # tokens already verified against this policy's keys
    introspecting: Issuer | None = None  # the policy's one issuer with `introspection`
    kind: str = JWT
    label: str = "bearer token"

    def challenge(self) -> Challenge:
        return ("Bearer", ())

    def introspected_by(self, presented: Presented) -> Issuer | None:
        """The issuer to ask about this token, or None: verify it as a JWT."""
        issuer = self.introspecting
        if issuer is None or not any(i is issuer for i in presented.issuers):
            return None
        token = presented.value
        known = self.cache.get(token) is not None  # a JWT another issuer verified
        return issuer if introspecting_issuer(issuer, token, known) else None

    def describe(self, presented: Presented) -> str:
        where = "" if presented.via == "authorization" else f" from the {presented.via}"
        if self.introspected_by(presented) is not None:
            token = presented.value
            shown = token[:6] + ("…" if len(token) > 6 else "")
            return f"opaque bearer token {shown} ({len(token)} characters){where}"
        return f"bearer token {describe_token(presented.value)}{where}"

    def _signers(self, presented: Presented) -> tuple[Issuer, ...]:
        """The issuers that may have signed a JWT: not one that only introspects."""
        issuer = self.introspecting
        if issuer is None or issuer.verifies_signatures:
            return presented.issuers
        return tuple(i for i in presented.issuers if i is not issuer)

    def slow_work(self, presented: Presented, now: float) -> Work | None:
        asked = self.introspected_by(presented)
        if asked is not None:
            return introspection_work(asked, presented.value, now)
        remote = [i for i in presented.issuers if i.remote is not None]
        if not remote:
            return None
        iss, kid = unverified_kid(presented.value)
        for issuer in remote:
            source = issuer.remote
            assert source is not None
            if len(presented.issuers) > 1 and issuer.issuer != iss:
                continue
            if not source.loaded:
                return KeyFetch(source, None, "cold start") if source.due() else None
            if kid is not None and source.lookup(kid) is None and source.may_refresh_for(kid):
                return KeyFetch(source, kid, "unknown kid")
        return None

    def check(self, presented: Presented, now: float) -> Outcome:
        try:
            asked = self.introspected_by(presented)
            if asked is not None:
                return Outcome(introspected(asked, presented.value, now))
            signers = self._signers(presented)
            if not signers:
                raise TokenRejected("wrong_issuer", "no issuer verifies JWT signatures here")
            return Outcome(verify(signers, presented.value, now, self.cache))
        except TokenRejected as e:
            return Outcome(failed=JWT, reason=e.reason, code=e.code, detail=e.detail)
        except Unavailable as e:
            return Outcome(failed=JWT, reason=e.reason, code=e.code, detail=e.detail, unavailable=e)


@dataclass(frozen=True, slots=True)
class ApiKeyVerifier:
    keys: ApiKeys
    kind: str = API_KEY
    label: str = "API key"

    def challenge(self) -> Challenge:
        return ("ApiKey", (("header", self.keys.header),))

    def describe(self, presented: Presented) -> str:
        return f"API key {presented.value[:4]}… in {presented.via}"

    def slow_work(self, presented: Presented, now: float) -> Work | None:
        return None

    def check(self, presented: Presented, now: float) -> Outcome:
        who = self.keys.verify(presented.value)
        if who is None:
            return Outcome(
                failed=API_KEY,
                reason="The API key is not valid",
                code="unknown_api_key",
                detail="unknown key",
            )
        return Outcome(who)


@dataclass(frozen=True, slots=True)
class BasicVerifier:
    users: BasicUsers
    kind: str = BASIC
    label: str = "Basic credentials"

    def challenge(self) -> Challenge:
        return ("Basic", (("charset", "UTF-8"),))

    def describe(self, presented: Presented) -> str:
        return f"Basic credentials for user {presented.value.partition(':')[0][:40]!r}"

    def slow_work(self, presented: Presented, now: float) -> Work | None:
        user, _, password = presented.value.partition(":")
        if self.users.cached(user, password, now) is None:
            return PasswordCheck(user, password)
        return None

    def check(self, presented: Presented, now: float) -> Outcome:
        user, _, password = presented.value.partition(":")
        if not self.users.check(user, password, now):
            return Outcome(
                failed=BASIC,
                reason="The user name or password is wrong",
                code="wrong_password",
                detail=f"user {user[:40]!r}",
            )
        return Outcome(self.users.identity(user))


@dataclass(frozen=True, slots=True)
class MtlsVerifier:
    """The TLS handshake verified the certificate (chain through the client
    CA, validity, purpose) and noted any problem; what is left is that
    verdict, the validity now (a connection can outlive its certificate), and
    naming the holder."""

    certs: ClientCerts
    kind: str = MTLS
    label: str = "client certificate"

    def challenge(self) -> Challenge:
        # No HTTP authentication scheme exists for TLS client certificates;
        # like ApiKey, a name that says what to present (on a new connection).
        return ("ClientCert", ())

    def describe(self, presented: Presented) -> str:
        cert = presented.cert
        assert cert is not None
        return f"client certificate {cert.subject[:80]!r} (sha256 {cert.sha256[:16]}…)"

    def slow_work(self, presented: Presented, now: float) -> Work | None:
        return None

    def check(self, presented: Presented, now: float) -> Outcome:
        cert = presented.cert
        assert cert is not None
        if not cert.valid_at(now):
            code = cert.problem or ("expired" if now >= cert.not_after else "not_yet_valid")
            return Outcome(
                failed=MTLS,
                reason="The client certificate is not valid",
                code=code,
                detail=f"certificate {cert.sha256[:16]}… from {cert.issuer[:80]!r}: {code}",
            )
        who = self.certs.identify(cert)
        if isinstance(who, tuple):
            code, detail = who
            return Outcome(
                failed=MTLS,
                reason="The client certificate does not name a known client",
                code=code,
                detail=detail,
            )
        return Outcome(who)


@dataclass(frozen=True, slots=True)
class SessionVerifier:
    """The sessions of the policy's OpenID Connect login (`authn.oidc`)."""

    login: oidc.Login
    kind: str = OIDC
    label: str = "session"

    def challenge(self) -> Challenge:
        # The Cookie scheme of draft-broyer-http-cookie-auth: where a person
        # signs in, and the cookie that carries the session.
        login = self.login
        return (
            "Cookie",
            (("form-action", login.start_path), ("cookie-name", login.session_cookie)),
        )

    def describe(self, presented: Presented) -> str:
        return f"session cookie ({len(presented.value)} characters)"

    def slow_work(self, presented: Presented, now: float) -> Work | None:
        return oidc.refresh_work(self.login, presented.value, now)

    def check(self, presented: Presented, now: float) -> Outcome:
        checked = oidc.check_session(self.login, presented.value, now)
        if checked.identity is not None:
            return Outcome(
                checked.identity,
                detail=checked.detail,
                cookies=checked.cookies,
                forward=checked.forward,
            )
        if checked.retry_after is not None:
            unavailable = oidc.ProviderUnavailable(
                self.login.issuer.issuer, checked.retry_after, checked.detail
            )
            return Outcome(
                failed=OIDC,
                reason="The sign-in service cannot be reached",
                code=checked.code,
                detail=checked.detail,
                unavailable=unavailable,
            )
        return Outcome(
            failed=OIDC,
            reason="The session is not valid",
            code=checked.code,
            detail=checked.detail,
            cookies=checked.cookies,
        )


# The order challenges are listed in a 401 (RFC 9110 §11.6.1: Basic first, as
# some clients read only the first).
CHALLENGE_ORDER = (BASIC, JWT, API_KEY, MTLS, OIDC)
