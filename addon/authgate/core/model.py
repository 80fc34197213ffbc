"""The compiled policy: frozen values the decision reads, built once at load.

`authgate.policy` builds these from YAML; nothing here reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from authgate.core import conditions as c
from authgate.core.credentials import (
    API_KEY,
    BASIC,
    CHALLENGE_ORDER,
    JWT,
    MTLS,
    OIDC,
    ApiKeys,
    ApiKeyVerifier,
    BasicUsers,
    BasicVerifier,
    Challenge,
    ClientCerts,
    JwtVerifier,
    MtlsVerifier,
    SessionVerifier,
    Verifier,
    issuers_by,
)
from authgate.core.ipset import IPSet, is_loopback_host
from authgate.core.keyset import RemoteKeys
from authgate.core.oidc import Login
from authgate.core.paths import PathPattern
from authgate.core.ratelimit import Rate
from authgate.core.routing import Router
from authgate.core.tokens import Issuer, TokenCache

IDENTITY_HEADERS = ("x-auth-subject", "x-auth-roles", "x-auth-scopes", "x-auth-issuer")
# RFC 9440: the client certificate a TLS-terminating proxy vouches for. Only
# the gateway writes them (authn.mtls.forward_certificate); a client's never
# reaches the backend, whatever the policy keeps.
CERT_HEADERS = ("client-cert", "client-cert-chain")
# Header fields that services behind other gateways and web servers take as
# proven (a user, an email, groups, a token) or as the real method or URL:
# removed from every forwarded request, with their underscore spellings,
# unless a policy keeps one (`strip_headers.keep`). The gateway's own identity
# headers, X-Forwarded-For and the fields only trusted proxies may send are
# handled apart and cannot be kept.
TRUSTED_BY_BACKENDS = (
    # Apache, IIS and CGI (REMOTE_USER), Authelia
    "remote-user",
    "remote-email",
    "remote-groups",
    "remote-name",
    "x-remote-user",
    "x-remote-email",
    "x-remote-groups",
    "x-user",
    "x-email",
    "x-authenticated-user",
    "x-webauth-user",  # Grafana's auth proxy
    # oauth2-proxy and nginx auth_request setups
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-preferred-username",
    "x-auth-request-access-token",
    "x-auth-request-redirect",
    # Kong
    "x-consumer-id",
    "x-consumer-username",
    "x-consumer-custom-id",
    "x-authenticated-userid",
    "x-authenticated-scope",
    "x-credential-identifier",
    # a client certificate as other TLS-terminating proxies pass it on
    # (Envoy's XFCC, nginx and HAProxy setups, Azure)
    "x-forwarded-client-cert",
    "x-ssl-client-cert",
    "x-ssl-client-dn",
    "x-ssl-client-verify",
    "x-client-cert",
    "x-client-verify",
    "x-arr-clientcert",
    # the real method or URL, as rewriting front ends pass them on
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-original-method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
)


@dataclass(frozen=True, slots=True)
class LimitSpec:
    name: str
    key: str  # "ip", "subject" or "header"
    header: str | None  # lower-case header name for key "header"
    rate: Rate
    line: int
    # What a shared store's outage means for this limit: "local" (count in
    # this process at the same rate), "deny" (429) or "allow" (no limit).
    on_store_error: str = "local"
    # Counters survive a reload while name, key and rate are unchanged.
    limiter_id: str = ""

    def __post_init__(self) -> None:
        ident = f"{self.name}|{self.key}:{self.header or ''}|{self.rate}"
        object.__setattr__(self, "limiter_id", ident)


# What a watch counts (see core/watch.py), the keys it counts by, and what it does.
WATCH_COUNTS = ("denials", "denied_paths", "failed_credentials")
WATCH_KEYS = ("ip", "subject")
WATCH_ACTIONS = ("ban", "throttle", "none")


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """One `watch:` entry: when `key` (a client address or a subject) reaches
    `threshold` of what it `counts` within `window` seconds, an event, and
    `action` for `duration` seconds (ban: the IP-blocklist 403 on everything;
    throttle: 429 with Retry-After; none: the event alone)."""

    name: str
    key: str  # WATCH_KEYS
    counts: str  # WATCH_COUNTS
    threshold: int
    window: int  # seconds
    action: str  # WATCH_ACTIONS
    duration: int  # seconds; 0 for action "none"
    line: int
    # Counts survive a reload while these are unchanged (as limiter_id).
    watch_id: str = ""

    def __post_init__(self) -> None:
        ident = f"{self.name}|{self.key}|{self.counts}|{self.threshold}|{self.window}"
        object.__setattr__(self, "watch_id", ident)

    @property
    def acts(self) -> str:
        """The action as the event says it: `ban 600s`, `throttle 300s` or `none`."""
        return "none" if self.action == "none" else f"{self.action} {self.duration}s"


@dataclass(frozen=True, slots=True)
class Ban:
    """A watch's action on one key (`ip:ADDRESS` or `sub:ISSUER:SUBJECT`),
    in force until `until` (the gateway's clock, seconds)."""

    action: str  # "ban" or "throttle"
    watch: str  # the name of the watch that set it
    until: float


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    line: int
    pattern: PathPattern
    methods: frozenset[str] | None
    host: str | None
    allow: c.Condition
    hide: bool
    limits: tuple[LimitSpec, ...]
    accept: frozenset[str] = frozenset()  # credential kinds this rule accepts
    login_url: str | None = None  # where a browser without credentials is sent
    preflight_pass: bool = False  # CORS preflights go to the backend unjudged
    mode: str | None = None  # "enforce" | "report"; None: the policy's mode
    # Derived by the Policy at load: the rule's limits checked before the
    # credential (IP-keyed, not on hidden rules) and after it (with the
    # policy's own late limits first), and its 401 challenges.
    early_limits: tuple[LimitSpec, ...] = field(default=(), compare=False)
    late_limits: tuple[LimitSpec, ...] = field(default=(), compare=False)
    challenges: tuple[Challenge, ...] = field(default=(), compare=False)
    report: bool = field(default=False, compare=False)  # its effective mode is report


@dataclass(frozen=True, slots=True)
class Policy:
    file: str
    realm: str
    trusted_proxies: IPSet
    block: IPSet
    allow: IPSet | None  # None: no allow list
    issuers: tuple[Issuer, ...]
    limits: tuple[LimitSpec, ...]  # global limits
    rules: tuple[Rule, ...]
    default: str  # "not_found" | "forbidden"
    forward_credentials: bool
    files: tuple[str, ...] = field(default=())  # every file read to build it
    uses_host: bool = False
    api_keys: ApiKeys | None = None
    basic: BasicUsers | None = field(default=None, compare=False)
    mtls: ClientCerts | None = None  # client certificates (authn.mtls)
    login: Login | None = field(default=None, compare=False)  # authn.oidc
    mode: str = "enforce"  # "report": decide and log, but forward everything
    client_ip_header: str = "x-forwarded-for"  # or "forwarded" (RFC 7239)
    # Lower-case names of the client's fields the backend never receives
    # (TRUSTED_BY_BACKENDS, plus the policy's `strip_headers.add`, less `keep`).
    strip_headers: frozenset[str] = frozenset(TRUSTED_BY_BACKENDS)
    strip_headers_line: int = 0  # where the policy changes that list (0: it does not)
    # The deployment's override of every mode (`--set authgate_mode`): "" none.
    mode_override: str = ""
    # Thresholds over sliding windows, with their actions (`watch:`).
    watch: tuple[WatchSpec, ...] = ()
    # The policy's own `tests:` as read (value, line), for the tools; never the gateway's.
    tests_raw: tuple[Any, int] | None = field(default=None, compare=False, repr=False)
    # Derived at construction: global limits checked before / after credentials.
    ip_limits: tuple[LimitSpec, ...] = field(default=(), init=False)
    late_limits: tuple[LimitSpec, ...] = field(default=(), init=False)
    # Tokens already verified against this policy's keys (see tokens.verify).
    token_cache: TokenCache = field(
        default_factory=TokenCache, init=False, compare=False, repr=False
    )

    # Credentials that need work off the request path first (bcrypt, JWKS fetches).
    slow_credentials: bool = field(default=False, init=False, compare=False)
    rule_index: dict[str, Rule] = field(default_factory=dict, init=False, compare=False, repr=False)
    # The rules that can match a method and path, for first-match (see routing.py).
    router: Router = field(init=False, compare=False, repr=False)
    # Issuers by the cookie and the query parameter they read their tokens from.
    cookie_issuers: dict[str, tuple[Issuer, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    query_issuers: dict[str, tuple[Issuer, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    # Whether a denial with no rule (404, IP lists, 400s) is only reported.
    report: bool = field(default=False, init=False, compare=False)
    # One verifier per credential kind the policy configures.
    verifiers: dict[str, Verifier] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    # authn.mtls.required: the 401 challenges of a request without a valid
    # client certificate, answered before any rule; () when not required.
    cert_required: tuple[Challenge, ...] = field(default=(), init=False, compare=False, repr=False)
    # The names of the watches: a ban set by a watch that is gone is not enforced.
    watch_names: frozenset[str] = field(default=frozenset(), init=False, compare=False)
    # Every limit by its limiter_id (what a store's outage policy is read from).
    limit_specs: dict[str, LimitSpec] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule_index", {r.name: r for r in self.rules})
        object.__setattr__(self, "router", Router(self.rules))
        verifiers: dict[str, Verifier] = {}
        if self.issuers:
            introspecting = next((i for i in self.issuers if i.introspection is not None), None)
            verifiers[JWT] = JwtVerifier(self.token_cache, introspecting)
        if self.api_keys is not None:
            verifiers[API_KEY] = ApiKeyVerifier(self.api_keys)
        if self.basic is not None:
            verifiers[BASIC] = BasicVerifier(self.basic)
        if self.mtls is not None:
            verifiers[MTLS] = MtlsVerifier(self.mtls)
            if self.mtls.required:
                object.__setattr__(self, "cert_required", (verifiers[MTLS].challenge(),))
        if self.login is not None:
            verifiers[OIDC] = SessionVerifier(self.login)
        object.__setattr__(self, "verifiers", verifiers)
        object.__setattr__(self, "cookie_issuers", issuers_by(self.issuers, "cookie"))
        object.__setattr__(self, "query_issuers", issuers_by(self.issuers, "query_param"))
        slow = (
            self.basic is not None
            or self.login is not None
            or any(i.remote is not None or i.introspection is not None for i in self.issuers)
        )
        object.__setattr__(self, "slow_credentials", slow)
        object.__setattr__(self, "ip_limits", tuple(x for x in self.limits if x.key == "ip"))
        object.__setattr__(self, "late_limits", tuple(x for x in self.limits if x.key != "ip"))
        for rule in self.rules:
            early = tuple(x for x in rule.limits if x.key == "ip" and not rule.hide)
            late = self.late_limits + tuple(x for x in rule.limits if x not in early)
            object.__setattr__(rule, "early_limits", early)
            object.__setattr__(rule, "late_limits", late)
            object.__setattr__(rule, "challenges", challenges_for(self, rule))
            mode = self.mode_override or rule.mode or self.mode
            object.__setattr__(rule, "report", mode == "report")
        object.__setattr__(self, "report", (self.mode_override or self.mode) == "report")
        object.__setattr__(self, "watch_names", frozenset(w.name for w in self.watch))
        specs = {x.limiter_id: x for x in self.limits}
        specs.update((x.limiter_id, x) for r in self.rules for x in r.limits)
        object.__setattr__(self, "limit_specs", specs)

    @property
    def remote_keys(self) -> tuple[tuple[str, RemoteKeys], ...]:
        """(issuer, key set) of every issuer whose keys are fetched: the JWT
        issuers with jwks_url or discovery, and the OpenID provider of the login."""
        out = [(i.issuer, i.remote) for i in self.issuers if i.remote is not None]
        if self.login is not None and self.login.issuer.remote is not None:
            out.append((self.login.issuer.issuer, self.login.issuer.remote))
        return tuple(out)


def challenges_for(
    policy: Policy, rule: Rule, bearer: tuple[tuple[str, str], ...] = ()
) -> tuple[Challenge, ...]:
    """One challenge per kind the rule accepts, in CHALLENGE_ORDER; `bearer`:
    parameters for the Bearer one (error="invalid_token", ...)."""
    out: list[Challenge] = []
    for kind in CHALLENGE_ORDER:
        verifier = policy.verifiers.get(kind)
        if kind in rule.accept and verifier is not None:
            scheme, params = verifier.challenge()
            out.append((scheme, bearer if kind == JWT and bearer else params))
    return tuple(out)


def plain_http(listen: str) -> bool:
    """Whether a listener address takes plain HTTP: `http://…` or a bare
    `HOST:PORT` (what `authgate run --listen` takes) yes, `https://…` no."""
    return not listen.strip().lower().startswith("https://")


def listen_host(listen: str) -> str:
    """The host of `HOST:PORT`, `[V6]:PORT` or `scheme://HOST:PORT`."""
    hostport = listen.split("://", 1)[-1]
    return hostport.rsplit(":", 1)[0] if ":" in hostport else hostport


def credentials_in_clear(policy: Policy, listen: str) -> list[tuple[str, int | None]]:
    """(credential kind, policy line) of what an eavesdropper could replay as
    it is, if this listener took it: HTTP Basic passwords and query-string
    tokens (which also end up in proxy and server logs) on a plain-HTTP
    listener beyond loopback. [] when the listener is safe."""
    if not plain_http(listen) or is_loopback_host(listen_host(listen)):
        return []
    out: list[tuple[str, int | None]] = []
    if policy.basic is not None:
        out.append(("Basic credentials", policy.basic.line or None))
    for issuer in policy.issuers:
        if issuer.query_param:
            out.append((f"query-string tokens ({issuer.query_param})", issuer.line or None))
    if policy.login is not None and not policy.login.secure:
        out.append(("session cookies (an http:// redirect_uri)", policy.login.line or None))
    return out


def secrets_readable_by_others(policy: Policy) -> list[tuple[str, int, int]]:
    """(file, permission bits, policy line) of the client secret files that
    users other than the owner could read, as they were at load."""
    out = []
    for issuer in policy.issuers:
        config = issuer.introspection.config if issuer.introspection is not None else None
        if config is not None and config.secret_file and (config.secret_mode or 0) & 0o077:
            out.append((config.secret_file, config.secret_mode or 0, config.line))
    return out


def normalize_host(host: str) -> str:
    """Lower-case, default ports dropped, no trailing dot (RFC 9110 §4.2.3)."""
    host = host.strip().lower()
    for port in (":80", ":443"):
        if host.endswith(port):
            host = host[: -len(port)]
            break
    return host.rstrip(".")
