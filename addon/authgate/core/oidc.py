"""OpenID Connect login at the gateway: the relying party's pure parts.

The gateway signs browsers in at an OpenID provider itself (authorization
code flow with PKCE S256) and keeps a session for them in a sealed cookie.
Everything here is computation: building the authorization request and the
token requests, reading the provider's answers, validating the ID token,
sealing and opening the session, deciding when to refresh it. The HTTP
calls to the provider are `authgate.runtime.oidc`'s; the house drives them
as slow work (`CodeExchange`, `SessionRefresh`) between `prepare` and
`decide`.

The gateway's own endpoints (paths on the redirect URI's origin):

    START     GET  /oauth2/start?next=PATH   -> 303 to the provider, a pre-login cookie
    CALLBACK  GET  /oauth2/callback?code&state[&iss]
                                             -> code exchanged, ID token checked,
                                                303 back to PATH with the session
    LOGOUT    POST /oauth2/logout            -> session cleared, 303 to the provider's
                                                end_session_endpoint (or back home)

A page load that needs a session and has none goes to START (303); anything
else gets the 401 with its challenges. `state` and `nonce` live in a
pre-login cookie sealed for that purpose and named after the state, so two
logins in two tabs do not trip over each other; it is sent only to the
callback path and lives ten minutes.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit

import jwt

from authgate.core import cookies
from authgate.core.conditions import claim_at
from authgate.core.identity import Identity
from authgate.core.keyset import check_url
from authgate.core.paths import AmbiguousPath, canonicalize
from authgate.core.sealing import Sealer
from authgate.core.tokens import (
    CredentialError,
    Issuer,
    KeysUnavailable,
    TokenRejected,
    string_set,
    verify,
)

OIDC = "oidc"  # the credential kind: a session from an OpenID Connect login

# Reasons (machine-readable) of the answers the login endpoints give.
LOGIN_START = "login_start"  # 303 to the provider
LOGIN_COMPLETE = "login_complete"  # 303 back to the page, with the session
LOGIN_FAILED = "login_failed"  # 400: the callback cannot complete a login
PROVIDER_UNAVAILABLE = "provider_unavailable"  # 503 + Retry-After
LOGGED_OUT = "logged_out"  # 303 after the logout
CROSS_SITE = "cross_site"  # 403: a logout another site asked for
METHOD_NOT_ALLOWED = "method_not_allowed"  # 405 on a login endpoint

LOGIN_WINDOW = 600  # seconds a login may take, provider's form included
MAX_PIECES = 3  # cookies a session may take (about 11 KB)
REFRESHED_FOR = 60.0  # seconds an old cookie still finds its refreshed session
RETRY_AFTER = 5  # seconds, when the provider cannot be reached
MAX_RETURN = 2048  # characters of a path to return to
_STATE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")
# Claims that describe the ID token rather than the person: not kept.
_TOKEN_CLAIMS = frozenset(
    {"nonce", "at_hash", "c_hash", "s_hash", "aud", "azp", "exp", "iat", "nbf", "jti"}
)
_HASHES = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}


class ProviderUnavailable(KeysUnavailable):
    """The provider cannot be reached for a session's refresh: 503, never 401."""

    def __init__(self, issuer: str, retry_after: int, error: str | None) -> None:
        super().__init__(issuer, retry_after, error)
        self.code = PROVIDER_UNAVAILABLE


class LoginRejected(CredentialError):
    """What the provider sent back does not make a login (or a refresh)."""

    REASONS = {
        "bad_callback": "The sign-in could not be completed",
        "no_login": "The sign-in could not be completed",
        "provider_error": "The sign-in could not be completed",
        "issuer_mix_up": "The sign-in could not be completed",
        "refused": "The sign-in could not be completed",
        "bad_id_token": "The sign-in could not be completed",
        "nonce": "The sign-in could not be completed",
        "too_large": "The sign-in could not be completed",
    }


# --- the provider -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What the gateway uses of the provider's discovery document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    userinfo_endpoint: str | None
    end_session_endpoint: str | None
    # RFC 9207: the provider sends `iss` with every authorization response.
    iss_parameter: bool

    @classmethod
    def parse(cls, doc: dict[str, Any], allow_http: bool) -> ProviderMetadata:
        """Raises ValueError for a document the login cannot work with."""

        def url(name: str, required: bool) -> str | None:
            value = doc.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str):
                raise ValueError(f"{name} is missing or not a string")
            check_url(value, allow_http)
            return value

        methods = doc.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise ValueError("the provider does not offer PKCE with S256")
        authorize = url("authorization_endpoint", True)
        token = url("token_endpoint", True)
        assert authorize is not None and token is not None
        return cls(
            issuer=str(doc.get("issuer")),
            authorization_endpoint=authorize,
            token_endpoint=token,
            userinfo_endpoint=url("userinfo_endpoint", False),
            end_session_endpoint=url("end_session_endpoint", False),
            iss_parameter=doc.get("authorization_response_iss_parameter_supported") is True,
        )


# --- the configuration --------------------------------------------------------------


class LoginState:
    """What a login's configuration learns while it runs, kept across a reload
    of an unchanged provider: nonces already used (a nonce counts once), and
    sessions just refreshed, by the digest of the cookie they replace (the
    browser's parallel requests still carry the old one, and a refresh token
    may be used only once)."""

    def __init__(self) -> None:
        self.used_nonces: dict[str, float] = {}  # nonce -> remembered until
        self.refreshed: dict[str, Refreshed] = {}

    def nonce_used(self, nonce: str, now: float) -> bool:
        """Whether `nonce` was used before; from now on it has been."""
        if len(self.used_nonces) > 10_000:
            self.used_nonces = {n: t for n, t in self.used_nonces.items() if t > now}
        until = self.used_nonces.get(nonce)
        self.used_nonces[nonce] = now + LOGIN_WINDOW
        return until is not None and until > now

    def refreshed_for(self, key: str, now: float) -> Refreshed | None:
        entry = self.refreshed.get(key)
        if entry is None or entry.until <= now:
            return None
        return entry

    def remember(self, key: str, entry: Refreshed, now: float) -> None:
        if len(self.refreshed) > 10_000:
            self.refreshed = {k: e for k, e in self.refreshed.items() if e.until > now}
        self.refreshed[key] = entry


@dataclass(frozen=True, slots=True)
class Opened:
    session: Session
    identity: Identity


class OpenedCache:
    """Session cookies already opened under this policy's keys, by value (a
    string caches its hash: the request's second look costs nothing).
    Bounded, the oldest first out; a reload, which may bring other keys,
    starts empty."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: dict[str, Opened] = {}

    def get(self, key: str) -> Opened | None:
        return self._entries.get(key)

    def put(self, key: str, opened: Opened) -> None:
        if len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = opened


@dataclass(frozen=True, slots=True, eq=False)
class Login:
    """`authn.oidc`, compiled."""

    # The provider as the issuer of ID tokens: audience the client id, keys and
    # metadata by discovery (issuer.remote), algorithms pinned by the policy.
    issuer: Issuer
    client_id: str
    client_secret: str = field(repr=False)
    client_auth: str = "client_secret_basic"  # or client_secret_post
    redirect_uri: str = ""
    origin: str = ""  # scheme://host[:port] of the redirect URI
    callback_path: str = "/oauth2/callback"
    start_path: str = "/oauth2/start"
    logout_path: str = "/oauth2/logout"
    post_logout: str = "/"  # absolute URL on the origin
    scopes: tuple[str, ...] = ("openid",)
    secure: bool = True  # behind TLS: Secure cookies with the __Host- prefix
    cookie: str = "authgate_session"  # as configured, without a prefix
    sealer: Sealer | None = field(default=None, repr=False)
    idle: float = 3600.0
    absolute: float = 43200.0
    userinfo: bool = False
    forward_access_token: bool = False
    timeout: float = 5.0
    refresh_before: float = 60.0
    line: int = 0
    state: LoginState = field(default_factory=LoginState, compare=False)
    cache: OpenedCache = field(default_factory=OpenedCache, compare=False)

    @property
    def session_cookie(self) -> str:
        return ("__Host-" if self.secure else "") + self.cookie

    @property
    def session_cookies(self) -> tuple[str, ...]:
        """The session cookie and the names of its further pieces."""
        return cookies.chunk_names(self.session_cookie, MAX_PIECES)

    @property
    def pending_prefix(self) -> str:
        return ("__Secure-" if self.secure else "") + self.cookie + "-login-"

    def step_for(self, path: str) -> str | None:
        """Which login endpoint a canonical path is, if any."""
        if path == self.callback_path:
            return "callback"
        if path == self.start_path:
            return "start"
        if path == self.logout_path:
            return "logout"
        return None

    @property
    def metadata(self) -> ProviderMetadata | None:
        remote = self.issuer.remote
        meta = remote.metadata if remote is not None else None
        return meta if isinstance(meta, ProviderMetadata) else None

    def retry_after(self) -> int:
        remote = self.issuer.remote
        return remote.retry_after() if remote is not None else RETRY_AFTER

    def _sealer(self) -> Sealer:
        assert self.sealer is not None
        return self.sealer


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


# --- where to send the browser back ---------------------------------------------------


def safe_return(value: str | None, login: Login | None = None) -> str | None:
    """A path (and query) on this origin to send the browser to after the
    login, or None: never another site, whatever the parameter says. Only a
    path that starts with one `/` and that the gateway would judge as it is
    (no backslash, no control character, no fragment, nothing ambiguous) is
    kept, in its canonical form; the login endpoints themselves are not."""
    if not value or len(value) > MAX_RETURN or value[0] != "/" or value[1:2] in ("/", "\\"):
        return None
    if any(ch == "\\" or ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in value):
        return None
    try:
        target = canonicalize(value)
    except AmbiguousPath:
        return None
    if target.path.startswith("//"):
        return None
    if login is not None and login.step_for(target.path) is not None:
        return None
    return target.target


# --- the answers the endpoints give ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """A login endpoint's answer, for `decide` to turn into a Decision."""

    status: int
    reason: str
    location: str | None = None
    cookies: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    detail: str = ""  # internal (logs, the flow's comment): never a secret
    identity: Identity | None = None


def _unavailable(login: Login, detail: str, retry: int | None = None) -> Answer:
    retry = retry if retry is not None else login.retry_after()
    return Answer(503, PROVIDER_UNAVAILABLE, headers=(("Retry-After", str(retry)),), detail=detail)


def _failed(detail: str, clears: tuple[str, ...] = ()) -> Answer:
    return Answer(400, LOGIN_FAILED, cookies=clears, detail=detail)


def not_allowed(allow: str) -> Answer:
    return Answer(405, METHOD_NOT_ALLOWED, headers=(("Allow", allow),), detail="method")


# --- a login in progress -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pending:
    """What the pre-login cookie holds."""

    state: str
    nonce: str
    verifier: str  # PKCE code_verifier
    next: str  # the path to return to
    started: float

    def dumps(self) -> bytes:
        return json.dumps(
            [self.state, self.nonce, self.verifier, self.next, self.started],
            separators=(",", ":"),
        ).encode()

    @classmethod
    def loads(cls, data: bytes) -> Pending:
        try:
            state, nonce, verifier, nxt, started = json.loads(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a login in progress: {e}") from None
        if not all(isinstance(x, str) for x in (state, nonce, verifier, nxt)) or not isinstance(
            started, int | float
        ):
            raise ValueError("not a login in progress")
        return cls(state, nonce, verifier, nxt, float(started))


def _purpose(kind: str, login: Login) -> bytes:
    return f"{kind}|{login.cookie}|{login.client_id}".encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def start(login: Login, query: str, now: float) -> Answer:
    """START: the authorization request (code, PKCE S256, state, nonce), and
    the pre-login cookie that binds them to this browser."""
    meta = login.metadata
    if meta is None:
        return _unavailable(login, "the provider's metadata is not loaded")
    params = dict(parse_qsl(query, keep_blank_values=True))
    asked = params.get("next", params.get("rd"))
    back = safe_return(asked, login) or "/"
    state = secrets.token_urlsafe(32)
    pending = Pending(state, secrets.token_urlsafe(32), secrets.token_urlsafe(48), back, now)
    challenge = _b64(hashlib.sha256(pending.verifier.encode("ascii")).digest())
    request = {
        "response_type": "code",
        "client_id": login.client_id,
        "redirect_uri": login.redirect_uri,
        "scope": " ".join(login.scopes),
        "state": state,
        "nonce": pending.nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    endpoint = meta.authorization_endpoint
    location = f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(request)}"
    sealed = login._sealer().seal(pending.dumps(), _purpose("login", login))
    cookie = cookies.set_cookie(
        login.pending_prefix + state[:16],
        sealed,
        secure=login.secure,
        max_age=LOGIN_WINDOW,
        path=login.callback_path,
    )
    refused = "" if back == asked or asked is None else f" ({asked[:80]!r} refused)"
    detail = (
        f"login: sent to the provider {endpoint} (state {state[:8]}…, PKCE S256, nonce "
        f"{pending.nonce[:8]}…); back to {back}{refused} afterwards"
    )
    return Answer(303, LOGIN_START, location=location, cookies=(cookie,), detail=detail)


# --- the callback ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request to the provider, made by `authgate.runtime.oidc`."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A successful answer of the token endpoint (RFC 6749 §5.1)."""

    access_token: str
    expires_in: float | None
    refresh_token: str | None
    id_token: str | None
    scope: str | None


@dataclass(slots=True, eq=False)
class CodeExchange:
    """Slow work: trade the callback's code for tokens (and ask the userinfo
    endpoint, when configured). The house fills in the result."""

    login: Login
    code: str
    pending: Pending
    clears: tuple[str, ...]  # the pre-login cookie, removed when the login ends
    iss_sent: bool  # the authorization response carried `iss`
    tokens: TokenResponse | None = None
    userinfo: dict[str, Any] | None = None
    problem: str = ""  # why there are no tokens (internal)
    unavailable: bool = False  # the provider could not be reached: 503, try again


def callback(
    login: Login, query: str, cookie_fields: Sequence[str], now: float
) -> CodeExchange | Answer:
    """CALLBACK, before anything is sent to the provider: the state, its
    pre-login cookie (this browser started this login, within the window),
    the provider's error if it sent one, `iss` (RFC 9207) if it sent one."""
    items = parse_qsl(query, keep_blank_values=True)
    params = dict(items)
    if len(params) != len(items):
        return _failed("login: a callback parameter appears twice")
    state = params.get("state", "")
    if not _STATE.match(state):
        return _failed("login: the callback has no state this gateway made")
    name = login.pending_prefix + state[:16]
    clears = (cookies.clear_cookie(name, secure=login.secure, path=login.callback_path),)
    found = cookies.read(cookie_fields, {name}).get(name, [])
    if len(found) != 1:
        why = "no" if not found else "more than one"
        return _failed(
            f"login: {why} login in progress for state {state[:8]}… in this browser "
            "(finished, expired, or started elsewhere)",
            clears if found else (),
        )
    data = login._sealer().open(found[0], _purpose("login", login))
    try:
        pending = Pending.loads(data) if data is not None else None
    except ValueError:
        pending = None
    if pending is None:
        return _failed("login: the pre-login cookie does not open with our keys", clears)
    if not hmac.compare_digest(pending.state, state):
        return _failed("login: the state does not match the login in progress", clears)
    if not pending.started - 60 <= now <= pending.started + LOGIN_WINDOW:
        return _failed("login: the login in progress expired", clears)
    if "error" in params:
        said = params["error"][:60]
        description = params.get("error_description", "")[:200]
        return _failed(f"login: the provider answered {said!r}: {description!r}", clears)
    iss = params.get("iss")
    if iss is not None and iss != login.issuer.issuer:
        # RFC 9207 §2.4: the response comes from another provider (a mix-up).
        return _failed(f"login: iss {iss[:100]!r} is not {login.issuer.issuer!r}", clears)
    code = params.get("code", "")
    if not code:
        return _failed("login: the callback has no code", clears)
    return CodeExchange(login, code, pending, clears, iss is not None)


def _client_auth(login: Login, form: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Headers for the client's authentication; `form` gets the post fields."""
    headers = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Accept", "application/json"),
    ]
    if login.client_auth == "client_secret_post":
        form["client_id"] = login.client_id
        form["client_secret"] = login.client_secret
    else:
        # RFC 6749 §2.3.1: both form-encoded before they are joined.
        pair = f"{quote_plus(login.client_id)}:{quote_plus(login.client_secret)}"
        headers.append(("Authorization", "Basic " + base64.b64encode(pair.encode()).decode()))
    return tuple(headers)


def code_request(work: CodeExchange, meta: ProviderMetadata) -> HttpRequest | str:
    """The token request for the code, or why it must not be sent."""
    if meta.iss_parameter and not work.iss_sent:
        # RFC 9207 §2.4: a provider that says it sends iss always does.
        return "login: the provider sends iss, and this callback has none"
    form = {
        "grant_type": "authorization_code",
        "code": work.code,
        "redirect_uri": work.login.redirect_uri,
        "code_verifier": work.pending.verifier,
    }
    headers = _client_auth(work.login, form)
    return HttpRequest("POST", meta.token_endpoint, headers, urlencode(form).encode())


def refresh_request(login: Login, meta: ProviderMetadata, refresh_token: str) -> HttpRequest:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    headers = _client_auth(login, form)
    return HttpRequest("POST", meta.token_endpoint, headers, urlencode(form).encode())


def userinfo_request(meta: ProviderMetadata, access_token: str) -> HttpRequest | None:
    if meta.userinfo_endpoint is None:
        return None
    headers = (("Authorization", f"Bearer {access_token}"), ("Accept", "application/json"))
    return HttpRequest("GET", meta.userinfo_endpoint, headers)


def token_response(status: int, body: bytes) -> TokenResponse | tuple[bool, str]:
    """The token endpoint's answer: the tokens, or (the provider refused,
    why). Not refused (False) means it could not answer: try again later."""
    if status >= 500 or status == 429 or 300 <= status < 400:
        return False, f"the token endpoint answered {status}"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return True, f"the token endpoint answered {status} without a JSON object"
    if status != 200:
        error = str(doc.get("error", ""))[:60]
        return True, f"the token endpoint refused ({status} {error!r})"
    access = doc.get("access_token")
    kind = doc.get("token_type")
    if not isinstance(access, str) or not access:
        return True, "the token endpoint sent no access_token"
    if not isinstance(kind, str) or kind.lower() != "bearer":
        return True, f"token_type {str(kind)[:20]!r} is not Bearer"
    expires = doc.get("expires_in")
    if isinstance(expires, str) and expires.isdigit():
        expires = int(expires)  # some providers send a string
    if isinstance(expires, bool) or not isinstance(expires, int | float) or expires <= 0:
        expires = None
    refresh, id_token, scope = doc.get("refresh_token"), doc.get("id_token"), doc.get("scope")
    return TokenResponse(
        access,
        float(expires) if expires is not None else None,
        refresh if isinstance(refresh, str) and refresh else None,
        id_token if isinstance(id_token, str) and id_token else None,
        scope if isinstance(scope, str) else None,
    )


def userinfo_response(status: int, body: bytes) -> dict[str, Any] | str:
    """The userinfo endpoint's claims, or why not."""
    if status != 200:
        return f"the userinfo endpoint answered {status}"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return "the userinfo endpoint answered no JSON (a signed answer is not supported)"
    if not isinstance(doc, dict) or not isinstance(doc.get("sub"), str):
        return "the userinfo endpoint answered no object with a sub"
    return doc


# --- the ID token ---------------------------------------------------------------------------


def _at_hash(alg: str, access_token: str) -> str:
    digest = _HASHES.get(alg[-3:], hashlib.sha512)(access_token.encode("ascii")).digest()
    return _b64(digest[: len(digest) // 2])


def validate_id_token(
    login: Login,
    id_token: str,
    now: float,
    *,
    nonce: str | None,
    started: float | None,
    access_token: str | None,
    sub: str | None = None,
) -> dict[str, Any]:
    """The ID token's claims once every check passed (OpenID Connect Core
    §3.1.3.7): the signature with the provider's key and a pinned algorithm,
    iss, aud (the client id), azp, exp, iat (not before this login began),
    nonce (this login's), at_hash when present; for a refresh, the same sub.
    Raises LoginRejected, or KeysUnavailable (no keys yet)."""
    try:
        who = verify((login.issuer,), id_token, now)
    except TokenRejected as e:
        raise LoginRejected("bad_id_token", f"ID token: {e.code} ({e.detail})") from None
    claims = who.claims
    aud = claims.get("aud")
    azp = claims.get("azp")
    if isinstance(aud, list) and len(aud) > 1 and azp is None:
        raise LoginRejected("bad_id_token", "ID token: several audiences and no azp")
    if azp is not None and azp != login.client_id:
        raise LoginRejected("bad_id_token", f"ID token: azp {str(azp)[:80]!r} is not our client")
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        raise LoginRejected("bad_id_token", "ID token: no iat")
    leeway = login.issuer.leeway
    if iat > now + leeway + 60:
        raise LoginRejected("bad_id_token", "ID token: issued in the future")
    if started is not None and iat < started - leeway - 60:
        raise LoginRejected("bad_id_token", "ID token: issued before this login began")
    if nonce is not None:
        got = claims.get("nonce")
        if not isinstance(got, str) or not hmac.compare_digest(got, nonce):
            raise LoginRejected("nonce", "ID token: the nonce is not this login's")
    at_hash = claims.get("at_hash")
    if at_hash is not None and access_token is not None:
        alg = str(jwt.get_unverified_header(id_token).get("alg"))
        if not isinstance(at_hash, str) or not hmac.compare_digest(
            at_hash, _at_hash(alg, access_token)
        ):
            raise LoginRejected("bad_id_token", "ID token: at_hash does not match the access token")
    if sub is not None and claims.get("sub") != sub:
        raise LoginRejected("bad_id_token", "ID token: a refresh changed sub")
    return claims


def token_words(token: str) -> str:
    """A token for the flow's comment: a JWT's header and claims decoded, or
    the length of an opaque one; never the token itself."""
    parts = token.split(".")
    if len(parts) == 3:
        try:
            header = json.loads(base64.urlsafe_b64decode(parts[0] + "=="))
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=="))
        except (ValueError, TypeError):
            return f"({len(token)} characters)"
        if isinstance(header, dict) and isinstance(claims, dict):
            head = {k: header[k] for k in ("alg", "kid", "typ") if k in header}
            shown = json.dumps(claims, ensure_ascii=False, sort_keys=True)
            if len(shown) > 1500:
                shown = shown[:1499] + "…"
            return f"JWT {json.dumps(head)} {shown}"
    return f"opaque ({len(token)} characters)"


# --- the session ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """What the session cookie holds, sealed."""

    sub: str
    claims: dict[str, Any]
    scopes: tuple[str, ...]  # granted to the gateway's client
    login_at: float
    seen_at: float
    access_token: str
    access_issued: float
    access_expires: float | None
    refresh_token: str | None
    id_token: str | None  # the last one, for the logout's id_token_hint

    def dumps(self) -> bytes:
        doc = {
            "v": 1,
            "sub": self.sub,
            "c": self.claims,
            "sc": list(self.scopes),
            "li": round(self.login_at, 3),
            "ls": round(self.seen_at, 3),
            "at": self.access_token,
            "ai": round(self.access_issued, 3),
            "ae": self.access_expires,
            "rt": self.refresh_token,
            "it": self.id_token,
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def loads(cls, data: bytes) -> Session:
        """Raises ValueError."""
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("v") != 1:
                raise ValueError("not a session")
            session = cls(
                d["sub"], d["c"], tuple(d["sc"]), float(d["li"]), float(d["ls"]), d["at"],
                float(d["ai"]), None if d["ae"] is None else float(d["ae"]), d["rt"], d["it"],
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"not a session: {e}") from None
        if not isinstance(session.sub, str) or not isinstance(session.claims, dict):
            raise ValueError("not a session")
        return session

    def refresh_due(self, login: Login, now: float) -> bool:
        """The access token expires within refresh_before (at most half its life)."""
        if self.access_expires is None:
            return False
        margin = min(login.refresh_before, (self.access_expires - self.access_issued) / 2)
        return now >= self.access_expires - margin


def session_identity(login: Login, session: Session) -> Identity:
    """Raises TokenRejected for a roles claim that cannot be roles."""
    roles = string_set(claim_at(session.claims, login.issuer.roles_claim), split=False)
    return Identity(
        session.sub,
        login.issuer.issuer,
        OIDC,
        roles,
        frozenset(session.scopes),
        session.claims,
    )


def seal_session(login: Login, session: Session, had: int = 0) -> tuple[str, ...]:
    """The Set-Cookie values that give the browser this session: its pieces,
    and removals for pieces the browser had beyond them. Raises
    LoginRejected when the session does not fit in MAX_PIECES cookies."""
    sealed = login._sealer().seal(session.dumps(), _purpose("session", login))
    pieces = cookies.split(sealed)
    if len(pieces) > MAX_PIECES and session.id_token is not None:
        # The ID token is kept only as the logout's id_token_hint: without it
        # the provider asks the person to confirm the logout. Worth the room.
        return seal_session(login, dataclasses.replace(session, id_token=None), had)
    if len(pieces) > MAX_PIECES:
        raise LoginRejected(
            "too_large",
            f"the session takes {len(sealed)} characters, more than {MAX_PIECES} cookies; "
            "keep fewer claims (scopes, userinfo) or leave out forward_access_token",
        )
    max_age = int(session.login_at + login.absolute - session.seen_at)
    names = login.session_cookies
    out = [
        cookies.set_cookie(names[i], piece, secure=login.secure, max_age=max_age)
        for i, piece in enumerate(pieces)
    ]
    out += [cookies.clear_cookie(names[i], secure=login.secure) for i in range(len(pieces), had)]
    return tuple(out)


def cookie_for(login: Login, session: Session) -> str:
    """A Cookie field value carrying the session (for tests and tools)."""
    return "; ".join(c.split(";", 1)[0] for c in seal_session(login, session))


def clear_session(login: Login, had: int = 1) -> tuple[str, ...]:
    names = login.session_cookies
    return tuple(cookies.clear_cookie(names[i], secure=login.secure) for i in range(max(had, 1)))


def pieces_of(value: str) -> int:
    """How many cookies a joined session value came in (as `cookies.split`
    cuts it)."""
    return cookies.count(len(value))


def _kept_claims(claims: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if k not in _TOKEN_CLAIMS}


def _new_session(
    login: Login,
    tokens: TokenResponse,
    claims: dict[str, Any],
    now: float,
    *,
    previous: Session | None,
) -> Session:
    scopes = tuple(tokens.scope.split()) if tokens.scope else None
    return Session(
        sub=str(claims["sub"]),
        claims=claims,
        scopes=scopes if scopes is not None else (previous.scopes if previous else login.scopes),
        login_at=previous.login_at if previous else now,
        seen_at=now,
        access_token=tokens.access_token,
        access_issued=now,
        access_expires=now + tokens.expires_in if tokens.expires_in is not None else None,
        refresh_token=tokens.refresh_token or (previous.refresh_token if previous else None),
        id_token=tokens.id_token or (previous.id_token if previous else None),
    )


def _merged(
    login: Login, claims: dict[str, Any], userinfo: dict[str, Any] | None
) -> dict[str, Any]:
    """The ID token's claims about the person, with the userinfo endpoint's
    (configured) over them; iss and sub always the ID token's."""
    kept = _kept_claims(claims)
    if userinfo is None:
        return kept
    return {**kept, **_kept_claims(userinfo), "iss": claims["iss"], "sub": claims["sub"]}


def finish(work: CodeExchange, now: float) -> Answer:
    """CALLBACK, after the code exchange: check the ID token, issue the
    session, send the browser back where it was going."""
    login = work.login
    if work.unavailable:
        # Keep the pre-login cookie: the same callback works once the provider is back.
        return _unavailable(login, f"login: {work.problem}", RETRY_AFTER)
    tokens = work.tokens
    if tokens is None:
        return _failed(f"login: {work.problem}", work.clears)
    if tokens.id_token is None:
        return _failed(
            "login: the token endpoint sent no ID token (is openid a scope?)", work.clears
        )
    pending = work.pending
    try:
        claims = validate_id_token(
            login,
            tokens.id_token,
            now,
            nonce=pending.nonce,
            started=pending.started,
            access_token=tokens.access_token,
        )
    except KeysUnavailable as e:
        return _unavailable(login, f"login: {e.detail}", e.retry_after)
    except LoginRejected as e:
        return _failed(f"login: {e.detail}", work.clears)
    if login.state.nonce_used(pending.nonce, now):
        return _failed("login: this nonce was used by an earlier login", work.clears)
    if login.userinfo:
        if work.userinfo is None:
            return _failed(f"login: {work.problem or 'no userinfo'}", work.clears)
        if work.userinfo.get("sub") != claims["sub"]:
            return _failed("login: the userinfo endpoint names another sub", work.clears)
    merged = _merged(login, claims, work.userinfo)
    session = _new_session(login, tokens, merged, now, previous=None)
    try:
        identity = session_identity(login, session)
        issued = seal_session(login, session)
    except (TokenRejected, LoginRejected) as e:
        return _failed(f"login: {e.detail}", work.clears)
    size = sum(len(c.split(";", 1)[0].split("=", 1)[1]) for c in issued)
    refresh = "with" if tokens.refresh_token else "without"
    detail = "\n".join(
        (
            f"login: callback from {login.issuer.issuer}"
            + (" (iss checked, RFC 9207)" if work.iss_sent else ""),
            f"code exchanged at the token endpoint ({login.client_auth}, PKCE verifier)",
            f"ID token: {token_words(tokens.id_token)}",
            f"access token: {token_words(tokens.access_token)}, {refresh} a refresh token",
            *(
                (f"userinfo: {json.dumps(work.userinfo, sort_keys=True)[:800]}",)
                if work.userinfo is not None
                else ()
            ),
            f"session issued for {session.sub!r}: {size} characters in {len(issued)} cookie(s)",
            f"back to {pending.next}",
        )
    )
    return Answer(
        303,
        LOGIN_COMPLETE,
        location=pending.next,
        cookies=issued + work.clears,
        detail=detail,
        identity=identity,
    )


# --- sessions on every request ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What became of a session's refresh, for the cookie it replaces."""

    until: float
    opened: Opened | None = None  # the refreshed session (None: ended or unavailable)
    cookies: tuple[str, ...] = ()  # its Set-Cookie values (or removals when ended)
    ended: str = ""  # why the session ended (the provider refused the refresh)
    unavailable: bool = False  # the provider could not be reached
    detail: str = ""  # what the refresh brought (tokens decoded), for the flow's comment


@dataclass(slots=True, eq=False)
class SessionRefresh:
    """Slow work: refresh a session's tokens at the provider before its
    access token expires. The house makes the request and hands the answer
    to `refreshed`."""

    login: Login
    session: Session
    key: str  # the cookie it replaces
    pieces: int  # how many cookies that one came in


@dataclass(frozen=True, slots=True)
class Checked:
    """A session cookie, judged: an identity, or why not."""

    identity: Identity | None = None
    code: str = ""  # bad_session, expired, idle, refresh_refused, ...
    detail: str = ""  # why not; or, for a session that goes on, what became of it
    cookies: tuple[str, ...] = ()  # Set-Cookie values for whatever answer goes back
    forward: tuple[tuple[str, str], ...] = ()  # extra fields for the backend
    retry_after: int | None = None  # the provider cannot be reached: 503


def _open(login: Login, value: str, key: str) -> Opened | Checked:
    opened = login.cache.get(key)
    if opened is not None:
        return opened
    data = login._sealer().open(value, _purpose("session", login))
    if data is None:
        return Checked(code="bad_session", detail="the session cookie does not open with our keys")
    try:
        session = Session.loads(data)
        opened = Opened(session, session_identity(login, session))
    except (ValueError, TokenRejected) as e:
        return Checked(code="bad_session", detail=str(e)[:200])
    login.cache.put(key, opened)
    return opened


def _lifetime(login: Login, session: Session, now: float) -> Checked | None:
    if now >= session.login_at + login.absolute:
        return Checked(code="session_expired", detail="the session reached its absolute lifetime")
    if now >= session.seen_at + login.idle:
        return Checked(code="session_idle", detail="the session was idle too long")
    return None


def refresh_work(login: Login, value: str, now: float) -> SessionRefresh | None:
    """The refresh this session needs before `check_session` can answer."""
    key = value
    opened = _open(login, value, key)
    if isinstance(opened, Checked) or _lifetime(login, opened.session, now) is not None:
        return None
    session = opened.session
    if session.refresh_token is None or not session.refresh_due(login, now):
        return None
    if login.state.refreshed_for(key, now) is not None:
        return None
    return SessionRefresh(login, session, key, pieces_of(value))


def refreshed(
    work: SessionRefresh,
    answer: TokenResponse | tuple[bool, str],
    userinfo: dict[str, Any] | str | None,
    now: float,
) -> Refreshed:
    """Record what the provider said to a refresh (the house calls this with
    the token endpoint's answer and, when configured, the userinfo one)."""
    login, old = work.login, work.session
    if isinstance(answer, tuple):
        refused, why = answer
        if refused:
            entry = Refreshed(
                now + REFRESHED_FOR, cookies=clear_session(login, work.pieces), ended=why
            )
        else:
            entry = Refreshed(now + RETRY_AFTER, unavailable=True, ended=why)
        login.state.remember(work.key, entry, now)
        return entry
    claims = old.claims
    try:
        if answer.id_token is not None:
            fresh = validate_id_token(
                login, answer.id_token, now, nonce=None, started=None,
                access_token=answer.access_token, sub=old.sub,
            )  # fmt: skip
            claims = {**claims, **_kept_claims(fresh)}
        if isinstance(userinfo, dict) and userinfo.get("sub") == old.sub:
            claims = {
                **claims,
                **_kept_claims(userinfo),
                "iss": old.claims.get("iss"),
                "sub": old.sub,
            }
        session = _new_session(login, answer, claims, now, previous=old)
        opened = Opened(session, session_identity(login, session))
        issued = seal_session(login, session, work.pieces)
    except KeysUnavailable as e:
        entry = Refreshed(now + e.retry_after, unavailable=True, ended=e.detail)
    except (LoginRejected, TokenRejected) as e:
        entry = Refreshed(
            now + REFRESHED_FOR, cookies=clear_session(login, work.pieces), ended=e.detail
        )
    else:
        brought = [f"access token: {token_words(answer.access_token)}"]
        if answer.id_token is not None:
            brought.append(f"ID token: {token_words(answer.id_token)}")
        rotated = "a new refresh token" if answer.refresh_token else "the same refresh token"
        detail = f"session refreshed at the provider ({rotated}); " + "; ".join(brought)
        entry = Refreshed(now + REFRESHED_FOR, opened, issued, detail=detail)
    login.state.remember(work.key, entry, now)
    return entry


def check_session(login: Login, value: str, now: float) -> Checked:
    """A session cookie on a request: who it proves, and the cookies the answer
    carries (a refreshed or touched session, or removals when it ended)."""
    key = value
    had = pieces_of(value)
    opened = _open(login, value, key)
    if isinstance(opened, Checked):
        return dataclasses.replace(opened, cookies=clear_session(login, had))
    session = opened.session
    ended = _lifetime(login, session, now)
    if ended is not None:
        return dataclasses.replace(ended, cookies=clear_session(login, had))
    issued: tuple[str, ...] = ()
    note = ""
    entry = login.state.refreshed_for(key, now)
    if entry is not None and entry.opened is not None:
        opened, session, issued = entry.opened, entry.opened.session, entry.cookies
        note = entry.detail
    elif entry is not None and not entry.unavailable:
        return Checked(code="refresh_refused", detail=entry.ended, cookies=entry.cookies)
    expired = session.access_expires is not None and now >= session.access_expires
    if expired and session.refresh_token is not None and not issued:
        # The refresh was due and did not happen: the provider could not be reached.
        retry = int(entry.until - now) + 1 if entry is not None else RETRY_AFTER
        why = entry.ended if entry is not None else "the session needs a refresh"
        return Checked(code="provider_unavailable", detail=why, retry_after=retry)
    if expired and login.forward_access_token and session.refresh_token is None:
        return Checked(
            code="access_token_expired",
            detail="the access token expired and there is no refresh token",
            cookies=clear_session(login, had),
        )
    if not issued and now - session.seen_at >= min(login.idle / 10, 300.0):
        # Still in use: move the idle deadline (a new cookie now and then).
        touched = dataclasses.replace(session, seen_at=now)
        try:
            issued = seal_session(login, touched, had)
            note = "session resealed (still in use: its idle deadline moves)"
        except LoginRejected:
            issued = ()
    forward = (
        (("Authorization", f"Bearer {session.access_token}"),) if login.forward_access_token else ()
    )
    return Checked(opened.identity, detail=note, cookies=issued, forward=forward)


def open_session(login: Login, value: str) -> Session | None:
    """The session in a cookie, whatever its age (for the logout)."""
    opened = _open(login, value, value)
    return None if isinstance(opened, Checked) else opened.session


def find_session(login: Login, cookie_fields: Sequence[str]) -> str | None:
    """The session cookie's value (its pieces joined; a piece missing leaves
    a value that does not open), or None without one. Raises ValueError for
    a session cookie sent twice."""
    names = login.session_cookies
    found = cookies.read(cookie_fields, set(names))
    first = found.get(names[0])
    if not first:
        return None
    if len(first) != 1:
        raise ValueError(f"more than one {names[0]} cookie")
    rest = [values[0] if (values := found.get(n)) and len(values) == 1 else None for n in names[1:]]
    joined = cookies.join(first[0], rest)
    return joined if joined is not None else first[0]


# --- the logout -------------------------------------------------------------------------------


def same_origin(login: Login, headers: Sequence[tuple[str, str]]) -> bool:
    """Whether a request comes from a page of this origin (a logout another
    site asks for is refused): Sec-Fetch-Site, else Origin, else Referer."""
    fields = {
        name: value for name, value in headers if name in ("sec-fetch-site", "origin", "referer")
    }
    site = fields.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() == "same-origin"
    origin = fields.get("origin")
    if origin is not None:
        return origin.strip().lower() == login.origin
    referer = fields.get("referer")
    if referer is not None:
        return origin_of(referer.strip()) == login.origin
    return False


def logout(login: Login, method: str, headers: Sequence[tuple[str, str]], now: float) -> Answer:
    """LOGOUT: the session's cookies removed, then the provider's
    end_session_endpoint (RP-initiated logout) or back to post_logout."""
    if method != "POST":
        return not_allowed("POST")
    if not same_origin(login, headers):
        return Answer(403, CROSS_SITE, detail="logout: the request does not come from this site")
    fields = [v for k, v in headers if k == "cookie"]
    try:
        value = find_session(login, fields)
    except ValueError:
        value = None
    session = open_session(login, value) if value is not None else None
    clears = clear_session(login, pieces_of(value) if value is not None else 1)
    meta = login.metadata
    if meta is not None and meta.end_session_endpoint is not None:
        params = {"client_id": login.client_id, "post_logout_redirect_uri": login.post_logout}
        if session is not None and session.id_token is not None:
            params["id_token_hint"] = session.id_token
        endpoint = meta.end_session_endpoint
        location = f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(params)}"
        where = f"the provider's end_session_endpoint {endpoint}"
    else:
        location, where = login.post_logout, login.post_logout
    who = f" for {session.sub!r}" if session is not None else " (no session)"
    return Answer(
        303,
        LOGGED_OUT,
        location=location,
        cookies=clears,
        detail=f"logout{who}: session cleared; to {where}",
    )
