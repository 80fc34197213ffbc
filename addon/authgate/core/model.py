"""The compiled policy: frozen values the decision reads, built once at load.

`authgate.policy` builds these from YAML; nothing here reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from authgate.core import conditions as c
from authgate.core.credentials import API_KEY, BASIC, JWT, ApiKeys, BasicUsers
from authgate.core.ipset import IPSet
from authgate.core.paths import PathPattern
from authgate.core.ratelimit import Rate
from authgate.core.tokens import Issuer, TokenCache

IDENTITY_HEADERS = ("x-auth-subject", "x-auth-roles", "x-auth-scopes", "x-auth-issuer")


@dataclass(frozen=True, slots=True)
class LimitSpec:
    name: str
    key: str  # "ip", "subject" or "header"
    header: str | None  # lower-case header name for key "header"
    rate: Rate
    line: int
    # Counters survive a reload while name, key and rate are unchanged.
    limiter_id: str = ""

    def __post_init__(self) -> None:
        ident = f"{self.name}|{self.key}:{self.header or ''}|{self.rate}"
        object.__setattr__(self, "limiter_id", ident)


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
    mode: str = "enforce"  # "report": decide and log, but forward everything
    client_ip_header: str = "x-forwarded-for"  # or "forwarded" (RFC 7239)
    # The deployment's override of every mode (`--set authgate_mode`): "" none.
    mode_override: str = ""
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule_index", {r.name: r for r in self.rules})
        slow = self.basic is not None or any(i.remote is not None for i in self.issuers)
        object.__setattr__(self, "slow_credentials", slow)
        object.__setattr__(self, "ip_limits", tuple(x for x in self.limits if x.key == "ip"))
        object.__setattr__(self, "late_limits", tuple(x for x in self.limits if x.key != "ip"))
        for rule in self.rules:
            early = tuple(x for x in rule.limits if x.key == "ip" and not rule.hide)
            late = self.late_limits + tuple(x for x in rule.limits if x not in early)
            object.__setattr__(rule, "early_limits", early)
            object.__setattr__(rule, "late_limits", late)
            object.__setattr__(rule, "challenges", challenges_for(self.api_keys, rule))


Challenge = tuple[str, tuple[tuple[str, str], ...]]  # (scheme, parameters after realm)


def challenges_for(
    api_keys: ApiKeys | None, rule: Rule, bearer: tuple[tuple[str, str], ...] = ()
) -> tuple[Challenge, ...]:
    """One challenge per scheme the rule accepts, Basic first (RFC 9110 §11.6.1)."""
    out: list[Challenge] = []
    if BASIC in rule.accept:
        out.append(("Basic", (("charset", "UTF-8"),)))
    if JWT in rule.accept:
        out.append(("Bearer", bearer))
    if API_KEY in rule.accept and api_keys is not None:
        out.append(("ApiKey", (("header", api_keys.header),)))
    return tuple(out)


def normalize_host(host: str) -> str:
    """Lower-case, default ports dropped, no trailing dot (RFC 9110 §4.2.3)."""
    host = host.strip().lower()
    for port in (":80", ":443"):
        if host.endswith(port):
            host = host[: -len(port)]
            break
    return host.rstrip(".")
