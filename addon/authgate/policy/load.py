"""The policy: loaded from YAML, validated, compiled once into frozen values.

Everything that can be computed from the policy alone happens here, at load
time: path patterns, CIDR interval tables, key objects, parsed rates. Every
problem is a `PolicyError` naming the file, the line and what is wrong.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, TypeVar

from authgate.core import conditions as c
from authgate.core.clientcert import NAME_FIELDS, normalize_fingerprint
from authgate.core.credentials import (
    API_KEY,
    BASIC,
    JWT,
    KINDS,
    MTLS,
    OIDC,
    ApiKey,
    ApiKeys,
    BasicUser,
    BasicUsers,
    CertClient,
    ClientCerts,
    parse_htpasswd,
)
from authgate.core.introspection import (
    ALL,
    AUTH_METHODS,
    CLIENT_SECRET_BASIC,
    OPAQUE,
    TOKEN_CHOICES,
    Introspected,
    IntrospectionConfig,
)
from authgate.core.ipset import IPSet, parse_cidr
from authgate.core.keyset import RemoteKeys, VerifyKey, check_url
from authgate.core.model import (
    TRUSTED_BY_BACKENDS,
    WATCH_ACTIONS,
    WATCH_COUNTS,
    WATCH_KEYS,
    LimitSpec,
    Policy,
    Rule,
    WatchSpec,
    normalize_host,
)
from authgate.core.oidc import Login, ProviderMetadata, origin_of, safe_return
from authgate.core.paths import PathPattern
from authgate.core.ratelimit import Rate
from authgate.core.sealing import Sealer, parse_keys
from authgate.core.tokens import (
    HMAC_ALGS,
    SUPPORTED_ALGS,
    Issuer,
    load_jwks,
    load_public_key_pem,
)
from authgate.policy import blocklists, listcache
from authgate.policy.marks import MarkedDict, MarkedList, PolicyError, load
from authgate.policy.marks import describe_value as _kind
from authgate.policy.values import HEADER_NAME, METHOD, parse_duration

# Characters allowed inside a quoted-string realm that we generate ourselves.
_SAFE_REALM = re.compile(r"^[\x20\x21\x23-\x5B\x5D-\x7E]+\Z")
# Names that appear in response headers must need no quoting or escaping:
# limit names in RateLimit-Policy (RFC 9651 sf-string), scopes in the
# insufficient_scope challenge (RFC 6749 scope-token).
_LIMIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")
_CONTROL_OR_COMMA = re.compile(r"[\x00-\x1f\x7f,]")
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]+\Z")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Issuer keys about verifying JWT signatures: meaningless for an issuer whose
# every token is introspected.
_JWT_ONLY = (
    "algorithms",
    "jwks_file",
    "public_key_file",
    "secret_env",
    "jwks_url",
    "discovery",
    "jwks_min_ttl",
    "jwks_max_ttl",
    "jwks_refresh_cooldown",
    "typ",
    "require_exp",
)

# What a limit does while a shared store (Redis) cannot answer.
STORE_ERROR_CHOICES = ("local", "deny", "allow")
# A watch's bounds: a window remembers fewer than `threshold` members per key.
MAX_THRESHOLD = 10_000
MAX_WATCH_SECONDS = 7 * 86400  # a window or an action, at most a week


logger = logging.getLogger("authgate")

T = TypeVar("T")


def _give_back_memory() -> None:
    """Return the freed pages of a big list's parse to the system (glibc keeps
    them otherwise: measured 35 MB of a 1M-entry feed still resident after).
    Best effort: only where the C library has malloc_trim."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (musl has no malloc_trim)


class _Builder:
    def __init__(self, file: str, base: Path) -> None:
        self.file = file
        self.base = base
        self.files: list[str] = [file]
        self.limit_names: set[str] = set()
        self.configured: frozenset[str] = frozenset()
        self.default_login_url: str | None = None
        self.start_path: str | None = None  # the OpenID Connect login's START

    def error(self, line: int | None, message: str) -> PolicyError:
        return PolicyError(self.file, line, message)

    # --- typed access ------------------------------------------------------

    def mapping(self, value: Any, where: str, line: int) -> MarkedDict:
        if not isinstance(value, MarkedDict):
            raise self.error(line, f"{where} must be a mapping, not {_kind(value)}")
        return value

    def keys(
        self,
        d: MarkedDict,
        allowed: AbstractSet[str],
        where: str,
        required: AbstractSet[str] = frozenset(),
    ) -> None:
        for key in d:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(
                    d.key_lines[key], f"unknown key {key!r} in {where} (known: {known})"
                )
        for key in sorted(required - set(d)):
            raise self.error(d.line, f"{where} needs {key!r}")

    def get(self, d: MarkedDict, key: str, kind: type[T], where: str, default: Any = None) -> Any:
        if key not in d:
            return default
        value = d[key]
        line = d.key_lines[key]
        if kind is list:
            if not isinstance(value, MarkedList):
                raise self.error(line, f"{where}.{key} must be a list, not {_kind(value)}")
        elif kind is str:
            if not isinstance(value, str):
                raise self.error(line, f"{where}.{key} must be a string, not {_kind(value)}")
        elif kind is bool:
            if not isinstance(value, bool):
                raise self.error(line, f"{where}.{key} must be true or false, not {_kind(value)}")
        elif kind is dict:
            return self.mapping(value, f"{where}.{key}", line)
        return value

    def line_of(self, d: MarkedDict, key: str) -> int:
        return d.key_lines.get(key, d.line)

    def strings(self, d: MarkedDict, key: str, where: str) -> list[tuple[int, str]]:
        items = self.get(d, key, list, where, MarkedList())
        out = []
        for value, line in zip(items, getattr(items, "item_lines", []), strict=False):
            if not isinstance(value, str):
                raise self.error(line, f"{where}.{key} items must be strings, not {_kind(value)}")
            out.append((line, value))
        return out

    def path(self, text: str, line: int) -> Path:
        p = Path(text)
        return p if p.is_absolute() else self.base / p

    def read(self, text: str, line: int, what: str) -> bytes:
        p = self.path(text, line)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise self.error(line, f"cannot read {what} {str(p)!r}: {e.strerror}") from None
        self.files.append(str(p))
        return data

    # --- sections ----------------------------------------------------------

    def cidrs(self, entries: list[tuple[int, str]], where: str) -> list[tuple[int, int, int]]:
        out = []
        for line, text in entries:
            try:
                out.append(parse_cidr(text))
            except ValueError as e:
                raise self.error(line, f"{where}: {e}") from None
        return out

    def block_set(
        self, inline: list[tuple[int, int, int]], files: list[tuple[int, str]]
    ) -> Callable[[], IPSet]:
        """`ip.block` and every `ip.block_files` list as one set. The lists are
        read now; the function returned makes the set: read compiled from the
        cache when exactly this content was compiled before, taken from the
        helper process when it compiled exactly this content while the gateway
        started (see blocklists.py), else compiled here. The loader calls it
        last, so that the rest of the policy is built while the helper works."""
        sources = [(str(self.path(f, line)), self.read(f, line, "block file")) for line, f in files]

        def make() -> IPSet:
            size = sum(len(data) for _, data in sources)
            if size < listcache.MIN_BYTES:
                return blocklists.compile_lists(inline, sources)
            key = listcache.key(inline, (data for _, data in sources))
            lists = ", ".join(p for p, _ in sources)
            cached = listcache.load(key)
            if cached is not None:
                logger.info(f"authgate: block list {lists}: {cached.entries:,} entries, "
                            "compiled before (cache)")  # fmt: skip
                return cached
            taken = blocklists.take(key, size, lists)
            if taken is not None:
                return taken
            compiled = blocklists.compile_lists(inline, sources)
            listcache.store(key, compiled)
            _give_back_memory()
            return compiled

        return make

    def duration(self, value: Any, line: int, where: str) -> float:
        try:
            return parse_duration(value)
        except ValueError as e:
            raise self.error(line, f"{where}: {e}") from None

    def limit(self, value: Any, line: int, where: str) -> LimitSpec:
        d = self.mapping(value, where, line)
        self.keys(d, {"name", "key", "rate", "on_store_error"}, where, {"name", "key", "rate"})
        name = self.get(d, "name", str, where)
        if not _LIMIT_NAME.match(name):
            raise self.error(
                self.line_of(d, "name"),
                f"limit name {name!r} may hold only letters, digits and _ . : -",
            )
        if name in self.limit_names:
            raise self.error(self.line_of(d, "name"), f"duplicate limit name {name!r}")
        self.limit_names.add(name)
        key_text = self.get(d, "key", str, where)
        header = None
        if key_text in ("ip", "subject"):
            key = key_text
        elif key_text.startswith("header:") and HEADER_NAME.match(key_text[7:].strip()):
            key, header = "header", key_text[7:].strip().lower()
        else:
            raise self.error(
                self.line_of(d, "key"),
                f"limit key must be ip, subject or header:NAME, not {key_text!r}",
            )
        rate_text = self.get(d, "rate", str, where)
        try:
            rate = Rate.parse(rate_text)
        except ValueError as e:
            raise self.error(self.line_of(d, "rate"), str(e)) from None
        on_error = self.get(d, "on_store_error", str, where, "local")
        if on_error not in STORE_ERROR_CHOICES:
            raise self.error(
                self.line_of(d, "on_store_error"),
                f"on_store_error must be local, deny or allow, not {on_error!r}",
            )
        return LimitSpec(name, key, header, rate, d.line, on_error)

    def watch(self, top: MarkedDict) -> tuple[WatchSpec, ...]:
        """`watch:`: a list of thresholds, each with its action."""
        items = self.get(top, "watch", list, "the policy", MarkedList())
        names: set[str] = set()
        return tuple(
            self.watch_entry(v, line, f"watch[{i}]", names)
            for i, (v, line) in enumerate(
                zip(items, getattr(items, "item_lines", []), strict=False)
            )
        )

    def watch_entry(self, value: Any, line: int, where: str, names: set[str]) -> WatchSpec:
        d = self.mapping(value, where, line)
        self.keys(
            d,
            {"name", "key", "counts", "threshold", "window", "action", "for"},
            where,
            {"name", "key", "counts", "threshold", "window", "action"},
        )
        name = self.get(d, "name", str, where)
        if not _LIMIT_NAME.match(name):
            raise self.error(
                self.line_of(d, "name"),
                f"watch name {name!r} may hold only letters, digits and _ . : -",
            )
        if name in names:
            raise self.error(self.line_of(d, "name"), f"duplicate watch name {name!r}")
        names.add(name)
        where = f"watch {name!r}"

        def choice(key: str, choices: tuple[str, ...]) -> str:
            value = self.get(d, key, str, where)
            if value not in choices:
                known = (
                    " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"
                )
                raise self.error(
                    self.line_of(d, key), f"{where}: {key} must be {known}, not {value!r}"
                )
            return str(value)

        key = choice("key", WATCH_KEYS)
        counts = choice("counts", WATCH_COUNTS)
        threshold = d["threshold"]
        if type(threshold) is not int or not 1 <= threshold <= MAX_THRESHOLD:
            raise self.error(
                self.line_of(d, "threshold"),
                f"{where}: threshold must be a whole number from 1 to {MAX_THRESHOLD}, "
                f"not {threshold!r}",
            )

        def seconds(key: str) -> int:
            value = self.duration(d[key], self.line_of(d, key), f"{where}.{key}")
            if not 1 <= value <= MAX_WATCH_SECONDS:
                raise self.error(
                    self.line_of(d, key), f"{where}: {key} must be from 1s to 7d, not {d[key]!r}"
                )
            return int(value)

        window = seconds("window")
        action = choice("action", WATCH_ACTIONS)
        if action == "none":
            if "for" in d:
                raise self.error(
                    self.line_of(d, "for"), f"{where}: action none lasts no time; drop `for`"
                )
            duration = 0
        elif "for" not in d:
            raise self.error(
                self.line_of(d, "action"), f"{where}: action {action} needs `for` (say, for: 10m)"
            )
        else:
            duration = seconds("for")
        return WatchSpec(name, key, counts, threshold, window, action, duration, d.line)

    def limits(self, d: MarkedDict, key: str, where: str) -> tuple[LimitSpec, ...]:
        items = self.get(d, key, list, where, MarkedList())
        return tuple(
            self.limit(v, line, f"{where}.{key}[{i}]")
            for i, (v, line) in enumerate(
                zip(items, getattr(items, "item_lines", []), strict=False)
            )
        )

    def issuer(self, value: Any, line: int, where: str) -> Issuer:
        d = self.mapping(value, where, line)
        allowed = {
            "name",
            "issuer",
            "audience",
            "algorithms",
            "jwks_file",
            "public_key_file",
            "secret_env",
            "leeway",
            "roles_claim",
            "scope_claim",
            "require_exp",
            "jwks_url",
            "discovery",
            "allow_http",
            "jwks_min_ttl",
            "jwks_max_ttl",
            "jwks_refresh_cooldown",
            "cookie",
            "query_param",
            "required_claims",
            "typ",
            "max_token_age",
            "introspection",
        }
        introspection: Introspected | None = None
        if "introspection" in d:
            introspection = self.introspection(d, where)
        every = introspection is not None and introspection.tokens == ALL
        self.keys(
            d, allowed, where, {"name", "issuer"} if every else {"name", "issuer", "algorithms"}
        )
        if every:
            for key in _JWT_ONLY:
                if key in d:
                    raise self.error(
                        self.line_of(d, key),
                        f"{where}.{key}: every token of this issuer is introspected "
                        "(introspection.tokens: all), so it verifies no signature; leave "
                        f"{key} out (or use tokens: opaque to verify its JWTs with keys)",
                    )
        name = self.get(d, "name", str, where)
        iss = self.get(d, "issuer", str, where)
        aud_value = d.get("audience")
        if aud_value is None:
            audience: tuple[str, ...] = ()
        elif isinstance(aud_value, str):
            audience = (aud_value,)
        elif (
            isinstance(aud_value, list) and aud_value and all(isinstance(a, str) for a in aud_value)
        ):
            audience = tuple(aud_value)
        else:
            raise self.error(
                self.line_of(d, "audience"), "audience must be a string or a list of strings"
            )
        if every:
            return self.issuer_fields(d, where, name, iss, audience, frozenset(), [], None,
                                      introspection)  # fmt: skip
        alg_items = self.strings(d, "algorithms", where)
        if not alg_items:
            raise self.error(
                self.line_of(d, "algorithms"), "algorithms must name at least one algorithm"
            )
        algorithms = frozenset(a for _, a in alg_items)
        for a_line, a in alg_items:
            if a not in SUPPORTED_ALGS:
                raise self.error(
                    a_line,
                    f"algorithm {a!r} is not supported (supported: "
                    f"{', '.join(sorted(SUPPORTED_ALGS))})",
                )
        if algorithms & HMAC_ALGS and algorithms - HMAC_ALGS:
            raise self.error(
                self.line_of(d, "algorithms"),
                "do not mix HMAC (HS*) and public-key algorithms in one issuer",
            )
        kinds = ("jwks_file", "public_key_file", "secret_env", "jwks_url", "discovery")
        sources = [k for k in kinds if k in d]
        if len(sources) != 1:
            raise self.error(d.line, f"{where} needs exactly one of {', '.join(kinds)}")
        source = sources[0]
        source_line = self.line_of(d, source)
        keys: list[VerifyKey] = []
        remote: RemoteKeys | None = None
        allow_http = self.get(d, "allow_http", bool, where, False)
        text = "" if source == "discovery" else self.get(d, source, str, where)
        if source in ("jwks_url", "discovery"):
            if source == "discovery" and self.get(d, "discovery", bool, where) is not True:
                raise self.error(source_line, "discovery must be true (or left out)")
            try:
                check_url(text if source == "jwks_url" else iss, allow_http)
            except ValueError as e:
                raise self.error(source_line, str(e)) from None
            if algorithms & HMAC_ALGS:
                raise self.error(
                    source_line, "a JWKS address serves public keys: no HS* algorithms"
                )
            remote = RemoteKeys(
                issuer=iss,
                url=text or None,
                discovery=source == "discovery",
                pinned=algorithms,
                min_ttl=self.duration(
                    d.get("jwks_min_ttl", "5m"),
                    self.line_of(d, "jwks_min_ttl"),
                    f"{where}.jwks_min_ttl",
                ),
                max_ttl=self.duration(
                    d.get("jwks_max_ttl", "24h"),
                    self.line_of(d, "jwks_max_ttl"),
                    f"{where}.jwks_max_ttl",
                ),
                cooldown=self.duration(
                    d.get("jwks_refresh_cooldown", "30s"),
                    self.line_of(d, "jwks_refresh_cooldown"),
                    f"{where}.jwks_refresh_cooldown",
                ),
                allow_http=allow_http,
            )
        elif source == "jwks_file":
            data = self.read(text, source_line, "JWKS file")
            try:
                keys, _notes = load_jwks(data.decode("utf-8", "replace"), algorithms)
            except ValueError as e:
                raise self.error(source_line, f"JWKS file {text!r}: {e}") from None
            if not keys:
                raise self.error(
                    source_line, f"JWKS file {text!r} has no key usable with {sorted(algorithms)}"
                )
        elif source == "public_key_file":
            data = self.read(text, source_line, "public key file")
            try:
                keys = [load_public_key_pem(data, algorithms)]
            except ValueError as e:
                raise self.error(source_line, f"public key file {text!r}: {e}") from None
        else:
            if algorithms - HMAC_ALGS:
                raise self.error(source_line, "secret_env is for HS256/HS384/HS512 only")
            secret = os.environ.get(text)
            if secret is None:
                raise self.error(source_line, f"environment variable {text} is not set")
            if len(secret.encode()) < 32:
                raise self.error(source_line, f"the secret in {text} is shorter than 32 bytes")
            keys = [VerifyKey(None, secret.encode(), algorithms)]
        return self.issuer_fields(
            d, where, name, iss, audience, algorithms, keys, remote, introspection
        )

    def issuer_fields(
        self,
        d: MarkedDict,
        where: str,
        name: str,
        iss: str,
        audience: tuple[str, ...],
        algorithms: frozenset[str],
        keys: list[VerifyKey],
        remote: RemoteKeys | None,
        introspection: Introspected | None,
    ) -> Issuer:
        """The settings every issuer has, however its tokens are checked."""
        leeway = self.duration(d.get("leeway", 0), self.line_of(d, "leeway"), f"{where}.leeway")
        roles_claim = self.get(d, "roles_claim", str, where, "roles")
        scope_claim = self.get(d, "scope_claim", str, where, "scope")
        require_exp = self.get(d, "require_exp", bool, where, True)
        cookie = self.get(d, "cookie", str, where)
        if cookie is not None and not HEADER_NAME.match(cookie):
            raise self.error(self.line_of(d, "cookie"), f"{cookie!r} is not a cookie name")
        query_param = self.get(d, "query_param", str, where)
        if query_param is not None and not query_param:
            raise self.error(self.line_of(d, "query_param"), "query_param must not be empty")
        required = tuple(c for _, c in self.strings(d, "required_claims", where))
        typ = self.get(d, "typ", str, where)
        max_age = None
        if "max_token_age" in d:
            max_age = self.duration(
                d["max_token_age"], self.line_of(d, "max_token_age"), f"{where}.max_token_age"
            )
        return Issuer(
            name,
            iss,
            audience,
            algorithms,
            tuple(keys),
            leeway,
            tuple(roles_claim.split(".")),
            tuple(scope_claim.split(".")),
            require_exp,
            remote=remote,
            cookie=cookie,
            query_param=query_param,
            required_claims=required,
            typ=typ,
            max_token_age=max_age,
            line=d.line,
            introspection=introspection,
        )

    def introspection(self, issuer: MarkedDict, where: str) -> Introspected:
        """An issuer's `introspection:` (RFC 7662): where to ask, as whom,
        which tokens, and how long answers are remembered."""
        line = self.line_of(issuer, "introspection")
        here = f"{where}.introspection"
        d = self.get(issuer, "introspection", dict, where)
        allowed = {
            "endpoint",
            "discovery",
            "client_id",
            "client_secret_file",
            "client_secret_env",
            "auth",
            "tokens",
            "cache_max",
            "negative_cache",
            "timeout",
        }
        self.keys(d, allowed, here, {"client_id"})
        iss = issuer.get("issuer")
        if not isinstance(iss, str):
            raise self.error(self.line_of(issuer, "issuer"), f"{where} needs 'issuer' (a string)")
        allow_http = self.get(issuer, "allow_http", bool, where, False)
        sources = [k for k in ("endpoint", "discovery") if k in d]
        if len(sources) != 1:
            raise self.error(d.line or line, f"{here} needs exactly one of endpoint, discovery")
        endpoint: str | None = None
        if sources[0] == "endpoint":
            endpoint = self.get(d, "endpoint", str, here)
            checked = endpoint
        else:
            if self.get(d, "discovery", bool, here) is not True:
                raise self.error(
                    self.line_of(d, "discovery"), "discovery must be true (or left out)"
                )
            checked = iss
        try:
            check_url(checked, allow_http)
        except ValueError as e:
            raise self.error(self.line_of(d, sources[0]), f"{here}.{sources[0]}: {e}") from None
        client_id = self.get(d, "client_id", str, here)
        if not client_id or _CONTROL.search(client_id):
            raise self.error(
                self.line_of(d, "client_id"), "client_id must be a non-empty plain string"
            )
        secret_sources = [k for k in ("client_secret_file", "client_secret_env") if k in d]
        if len(secret_sources) != 1:
            raise self.error(
                d.line or line, f"{here} needs exactly one of client_secret_file, client_secret_env"
            )
        secret_key = secret_sources[0]
        secret_line = self.line_of(d, secret_key)
        where_from = self.get(d, secret_key, str, here)
        secret_file: str | None = None
        secret_mode: int | None = None
        if secret_key == "client_secret_file":
            data = self.read(where_from, secret_line, "client secret file")
            secret_file = str(self.path(where_from, secret_line))
            try:
                secret_mode = os.stat(secret_file).st_mode & 0o777
                secret = data.decode("utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError):
                raise self.error(
                    secret_line, f"client secret file {where_from!r} is not UTF-8 text"
                ) from None
            what = f"client secret file {where_from!r}"
        else:
            value = os.environ.get(where_from)
            if value is None:
                raise self.error(secret_line, f"environment variable {where_from} is not set")
            secret = value
            what = f"environment variable {where_from}"
        if not secret:
            raise self.error(secret_line, f"the {what} is empty")
        if _CONTROL.search(secret):
            raise self.error(secret_line, f"the {what} holds a control character or a newline")
        auth = self.get(d, "auth", str, here, CLIENT_SECRET_BASIC)
        if auth not in AUTH_METHODS:
            raise self.error(
                self.line_of(d, "auth"), f"auth must be {' or '.join(AUTH_METHODS)}, not {auth!r}"
            )
        tokens = self.get(d, "tokens", str, here, OPAQUE)
        if tokens not in TOKEN_CHOICES:
            raise self.error(
                self.line_of(d, "tokens"),
                f"tokens must be opaque (tokens that are not JWTs) or all, not {tokens!r}",
            )

        def positive(key: str, default: str, most: float) -> float:
            seconds = self.duration(d.get(key, default), self.line_of(d, key), f"{here}.{key}")
            if not 0 < seconds <= most:
                raise self.error(
                    self.line_of(d, key), f"{here}.{key} must be more than 0 and at most {most:g}s"
                )
            return seconds

        config = IntrospectionConfig(
            issuer=iss,
            endpoint=endpoint,
            client_id=client_id,
            client_secret=secret,
            auth=auth,
            tokens=tokens,
            cache_max=positive("cache_max", "1m", 86400),
            negative_cache=positive("negative_cache", "10s", 3600),
            timeout=positive("timeout", "2s", 30),
            allow_http=allow_http,
            secret_file=secret_file,
            secret_mode=secret_mode,
            line=line,
        )
        return Introspected(config)

    def secret(self, d: MarkedDict, where: str, file_key: str, env_key: str, what: str) -> str:
        """A secret from a file (read at load, watched) or an environment
        variable: never from the policy itself."""
        present = [k for k in (file_key, env_key) if k in d]
        if len(present) != 1:
            raise self.error(d.line, f"{where} needs exactly one of {file_key}, {env_key}")
        key = present[0]
        name = self.get(d, key, str, where)
        line = self.line_of(d, key)
        if key == env_key:
            text = os.environ.get(name)
            if text is None:
                raise self.error(line, f"environment variable {name} ({what}) is not set")
        else:
            data = self.read(name, line, what)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise self.error(line, f"{what} {name!r} is not UTF-8 text") from None
        if not text.strip():
            raise self.error(line, f"the {what} in {name} is empty")
        return text

    def oidc(self, value: Any, line: int) -> Login:
        """`authn.oidc`: the OpenID Connect login (docs/login.md)."""
        where = "authn.oidc"
        d = self.mapping(value, where, line)
        allowed = {
            "issuer", "client_id", "client_secret_file", "client_secret_env", "client_auth",
            "redirect_uri", "scopes", "algorithms", "roles_claim", "userinfo",
            "forward_access_token", "allow_http", "leeway", "timeout", "refresh_before",
            "start_path", "logout_path", "post_logout_redirect", "session",
            "jwks_refresh_cooldown",
        }  # fmt: skip
        self.keys(d, allowed, where, {"issuer", "client_id", "redirect_uri", "session"})
        iss = self.get(d, "issuer", str, where)
        allow_http = self.get(d, "allow_http", bool, where, False)
        try:
            check_url(iss, allow_http)
        except ValueError as e:
            raise self.error(self.line_of(d, "issuer"), str(e)) from None
        client_id = self.get(d, "client_id", str, where)
        if not client_id or _CONTROL_OR_COMMA.sub("", client_id) != client_id:
            raise self.error(self.line_of(d, "client_id"), "client_id must be plain text")
        secret = self.secret(d, where, "client_secret_file", "client_secret_env", "client secret")
        secret = secret.strip()
        auth = self.get(d, "client_auth", str, where, "client_secret_basic")
        if auth not in ("client_secret_basic", "client_secret_post"):
            raise self.error(
                self.line_of(d, "client_auth"),
                f"client_auth must be client_secret_basic or client_secret_post, not {auth!r}",
            )
        redirect = self.get(d, "redirect_uri", str, where)
        redirect_line = self.line_of(d, "redirect_uri")
        parts = urllib.parse.urlsplit(redirect)
        try:
            check_url(redirect, allow_http)
        except ValueError as e:
            raise self.error(redirect_line, f"redirect_uri: {e}") from None
        if parts.query or parts.fragment or not parts.path.startswith("/"):
            raise self.error(
                redirect_line, "redirect_uri is the callback's full URL, without query or fragment"
            )
        callback = parts.path
        if safe_return(callback) != callback:
            raise self.error(redirect_line, f"redirect_uri: {callback!r} is not a plain path")
        paths = {}
        for key, default in (("start_path", "/oauth2/start"), ("logout_path", "/oauth2/logout")):
            text = self.get(d, key, str, where, default)
            if safe_return(text) != text or "?" in text:
                raise self.error(self.line_of(d, key), f"{key} must be a plain path, not {text!r}")
            paths[key] = text
        if len({callback, *paths.values()}) != 3:
            raise self.error(
                d.line, "the callback (redirect_uri), start_path and logout_path must differ"
            )
        origin = origin_of(redirect)
        after = self.get(d, "post_logout_redirect", str, where, "/")
        after_path = after[len(origin) :] if after.lower().startswith(origin + "/") else after
        if safe_return(after_path) is None:
            raise self.error(
                self.line_of(d, "post_logout_redirect"),
                f"post_logout_redirect must be a path on {origin}, not {after!r}",
            )
        scopes = tuple(v for _, v in self.strings(d, "scopes", where)) or ("openid",)
        for s_line, scope in self.strings(d, "scopes", where):
            if not _SCOPE_TOKEN.match(scope):
                raise self.error(s_line, f"scope {scope!r} is not a valid scope token")
        if "openid" not in scopes:
            raise self.error(self.line_of(d, "scopes"), "scopes must include openid")
        alg_items = self.strings(d, "algorithms", where) or [(d.line, "RS256")]
        algorithms = frozenset(a for _, a in alg_items)
        for a_line, a in alg_items:
            if a not in SUPPORTED_ALGS or a in HMAC_ALGS:
                raise self.error(
                    a_line,
                    f"algorithm {a!r} is not a public-key algorithm authgate supports "
                    f"({', '.join(sorted(SUPPORTED_ALGS - HMAC_ALGS))})",
                )
        leeway = self.duration(d.get("leeway", "30s"), self.line_of(d, "leeway"), f"{where}.leeway")
        timeout = self.duration(
            d.get("timeout", "5s"), self.line_of(d, "timeout"), f"{where}.timeout"
        )
        if not 0 < timeout <= 60:
            raise self.error(self.line_of(d, "timeout"), "timeout must be from 1s to 60s")
        before = self.duration(
            d.get("refresh_before", "60s"),
            self.line_of(d, "refresh_before"),
            f"{where}.refresh_before",
        )
        roles_claim = self.get(d, "roles_claim", str, where, "roles")
        session = self.get(d, "session", dict, where)
        self.keys(
            session, {"cookie", "keys_file", "keys_env", "idle", "absolute"}, f"{where}.session"
        )
        cookie = self.get(session, "cookie", str, f"{where}.session", "authgate_session")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cookie) or cookie.startswith("__"):
            raise self.error(
                self.line_of(session, "cookie"),
                f"session.cookie {cookie!r}: letters, digits, _ and - (the __Host- prefix "
                "is added behind TLS)",
            )
        key_text = self.secret(session, f"{where}.session", "keys_file", "keys_env", "session keys")
        key_line = self.line_of(session, "keys_file" if "keys_file" in session else "keys_env")
        try:
            sealer = Sealer(parse_keys(key_text))
        except ValueError as e:
            raise self.error(key_line, f"session keys: {e}") from None
        idle = self.duration(
            session.get("idle", "1h"), self.line_of(session, "idle"), f"{where}.session.idle"
        )
        absolute = self.duration(
            session.get("absolute", "12h"),
            self.line_of(session, "absolute"),
            f"{where}.session.absolute",
        )
        if not 0 < idle <= absolute:
            raise self.error(
                self.line_of(session, "idle"), "session.idle must be above 0 and at most absolute"
            )
        remote = RemoteKeys(
            issuer=iss,
            url=None,
            discovery=True,
            pinned=algorithms,
            allow_http=allow_http,
            timeout=timeout,
            cooldown=self.duration(
                d.get("jwks_refresh_cooldown", "30s"),
                self.line_of(d, "jwks_refresh_cooldown"),
                f"{where}.jwks_refresh_cooldown",
            ),
            parse_metadata=lambda doc: ProviderMetadata.parse(doc, allow_http),
        )
        issuer = Issuer(
            "oidc",
            iss,
            (client_id,),
            algorithms,
            (),
            leeway,
            tuple(roles_claim.split(".")),
            ("scope",),
            True,
            remote=remote,
            required_claims=("iat",),
            line=d.line,
        )
        self.start_path = paths["start_path"]
        return Login(
            issuer,
            client_id,
            secret,
            client_auth=auth,
            redirect_uri=redirect,
            origin=origin,
            callback_path=callback,
            start_path=paths["start_path"],
            logout_path=paths["logout_path"],
            post_logout=origin + after_path,
            scopes=scopes,
            secure=parts.scheme == "https",
            cookie=cookie,
            sealer=sealer,
            idle=idle,
            absolute=absolute,
            userinfo=self.get(d, "userinfo", bool, where, False),
            forward_access_token=self.get(d, "forward_access_token", bool, where, False),
            timeout=timeout,
            refresh_before=before,
            line=d.line,
        )

    def string_set(self, d: MarkedDict, key: str, where: str) -> frozenset[str]:
        return frozenset(v for _, v in self.strings(d, key, where))

    def api_keys(self, value: Any, line: int) -> ApiKeys:
        d = self.mapping(value, "authn.api_keys", line)
        self.keys(d, {"header", "keys"}, "authn.api_keys", {"keys"})
        header = self.get(d, "header", str, "authn.api_keys", "X-API-Key")
        if not HEADER_NAME.match(header) or header.lower() in ("authorization", "cookie"):
            raise self.error(self.line_of(d, "header"), f"{header!r} cannot carry API keys")
        items = self.get(d, "keys", list, "authn.api_keys")
        by_digest: dict[bytes, ApiKey] = {}
        names: set[str] = set()
        for i, (item, item_line) in enumerate(zip(items, items.item_lines, strict=False)):
            where = f"authn.api_keys.keys[{i}]"
            k = self.mapping(item, where, item_line)
            self.keys(k, {"name", "sha256", "roles", "scopes"}, where, {"name", "sha256"})
            name = self.get(k, "name", str, where)
            if name in names or _CONTROL_OR_COMMA.search(name):
                raise self.error(
                    self.line_of(k, "name"),
                    f"API key name {name!r} is a duplicate or holds a comma or control character",
                )
            names.add(name)
            hexdigest = self.get(k, "sha256", str, where)
            if not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
                raise self.error(
                    self.line_of(k, "sha256"),
                    "sha256 must be 64 hex digits "
                    "(authgate hash-key prints it); never put the key itself here",
                )
            digest = bytes.fromhex(hexdigest)
            if digest in by_digest:
                raise self.error(self.line_of(k, "sha256"), "two API keys with the same digest")
            by_digest[digest] = ApiKey(
                name,
                digest,
                self.string_set(k, "roles", where),
                self.string_set(k, "scopes", where),
            )
        return ApiKeys(header.lower(), by_digest)

    def basic(self, value: Any, line: int) -> BasicUsers:
        d = self.mapping(value, "authn.basic", line)
        self.keys(d, {"htpasswd", "users"}, "authn.basic", {"htpasswd"})
        name = self.get(d, "htpasswd", str, "authn.basic")
        data = self.read(name, self.line_of(d, "htpasswd"), "htpasswd file")
        path = str(self.path(name, self.line_of(d, "htpasswd")))
        hashes, problem = parse_htpasswd(data.decode("utf-8", "replace"))
        if problem is not None:
            raise PolicyError(path, problem[0], problem[1])
        extra = self.get(d, "users", dict, "authn.basic", MarkedDict())
        users: dict[str, BasicUser] = {}
        for user, hashed in hashes.items():
            roles: frozenset[str] = frozenset()
            scopes: frozenset[str] = frozenset()
            if user in extra:
                u = self.mapping(extra[user], f"authn.basic.users.{user}", extra.key_lines[user])
                self.keys(u, {"roles", "scopes"}, f"authn.basic.users.{user}")
                roles = self.string_set(u, "roles", f"authn.basic.users.{user}")
                scopes = self.string_set(u, "scopes", f"authn.basic.users.{user}")
            users[user] = BasicUser(user, hashed, roles, scopes)
        for user in extra:
            if user not in hashes:
                raise self.error(extra.key_lines[user], f"user {user!r} is not in {name}")
        return BasicUsers(users, line=d.line, file=path)

    def mtls(self, value: Any, line: int) -> ClientCerts:
        where = "authn.mtls"
        d = self.mapping(value, where, line)
        self.keys(
            d, {"required", "name_from", "clients", "listed_only", "forward_certificate"}, where
        )
        name_from = self.get(d, "name_from", str, where, "subject")
        if name_from not in NAME_FIELDS:
            raise self.error(
                self.line_of(d, "name_from"),
                f"name_from must be one of {', '.join(NAME_FIELDS)}, not {name_from!r}",
            )
        by_sha256: dict[str, CertClient] = {}
        by_name: dict[str, CertClient] = {}
        items = self.get(d, "clients", list, where, MarkedList())
        for i, (item, item_line) in enumerate(
            zip(items, getattr(items, "item_lines", []), strict=False)
        ):
            at = f"{where}.clients[{i}]"
            k = self.mapping(item, at, item_line)
            self.keys(k, {"name", "sha256", "roles", "scopes"}, at, {"name"})
            name = self.get(k, "name", str, at)
            if not name or _CONTROL_OR_COMMA.search(name):
                raise self.error(
                    self.line_of(k, "name"),
                    f"client name {name!r} must be non-empty, without a comma or control character",
                )
            client = CertClient(
                name, self.string_set(k, "roles", at), self.string_set(k, "scopes", at)
            )
            if "sha256" in k:
                try:
                    digest = normalize_fingerprint(self.get(k, "sha256", str, at))
                except ValueError as e:
                    raise self.error(self.line_of(k, "sha256"), str(e)) from None
                if digest in by_sha256:
                    raise self.error(self.line_of(k, "sha256"), "this fingerprint is listed twice")
                by_sha256[digest] = client
            else:
                if name in by_name:
                    raise self.error(
                        self.line_of(k, "name"),
                        f"client {name!r} is listed twice (by {name_from}; a fingerprint "
                        "entry may share a name)",
                    )
                by_name[name] = client
        return ClientCerts(
            required=self.get(d, "required", bool, where, False),
            name_from=name_from,
            by_sha256=by_sha256,
            by_name=by_name,
            listed_only=self.get(d, "listed_only", bool, where, False),
            forward=self.get(d, "forward_certificate", bool, where, False),
            line=line,
        )

    def condition(self, value: Any, line: int, where: str) -> c.Condition:
        if isinstance(value, str):
            simple: dict[str, type[c.Condition]] = {
                "anyone": c.Anyone,
                "authenticated": c.Authenticated,
                "nobody": c.Nobody,
            }
            if value in simple:
                return simple[value](line=line)
            raise self.error(
                line,
                f"unknown condition {value!r} (anyone, authenticated, nobody, "
                "or a mapping: role, scope, claim, any, all, not)",
            )
        d = self.mapping(value, where, line)
        kinds = [k for k in ("role", "scope", "claim", "any", "all", "not") if k in d]
        if len(kinds) != 1:
            raise self.error(
                d.line, f"{where} needs exactly one of role, scope, claim, any, all, not"
            )
        kind = kinds[0]
        if kind in ("role", "scope"):
            self.keys(d, {kind}, where)
            text = self.get(d, kind, str, where)
            if kind == "scope" and not _SCOPE_TOKEN.match(text):
                raise self.error(
                    self.line_of(d, kind),
                    f"scope {text!r} is not a valid scope token (no spaces, quotes or backslashes)",
                )
            at = self.line_of(d, kind)
            return c.HasRole(text, line=at) if kind == "role" else c.HasScope(text, line=at)
        if kind == "claim":
            self.keys(d, {"claim", "equals", "in", "contains"}, where)
            ops = [k for k in ("equals", "in", "contains") if k in d]
            if len(ops) != 1:
                raise self.error(d.line, f"{where} needs exactly one of equals, in, contains")
            op = ops[0]
            path = self.get(d, "claim", str, where)
            raw = d[op]
            for item in raw if op == "in" and isinstance(raw, list) else [raw]:
                if isinstance(item, dict):
                    raise self.error(self.line_of(d, op), _unquoted(op, item))
            try:
                if op == "in":
                    if not isinstance(raw, list) or not raw:
                        raise ValueError("'in' needs a non-empty list")
                    value_t: c.Template | tuple[c.Template, ...] = tuple(
                        c.Template.parse(v) for v in raw
                    )
                else:
                    value_t = c.Template.parse(raw)
            except ValueError as e:
                raise self.error(self.line_of(d, op), str(e)) from None
            return c.Claim(tuple(path.split(".")), op, value_t, line=self.line_of(d, "claim"))
        if kind == "not":
            self.keys(d, {"not"}, where)
            at = self.line_of(d, "not")
            return c.Not(self.condition(d["not"], at, f"{where}.not"), line=at)
        self.keys(d, {kind}, where)
        items = self.get(d, kind, list, where)
        if not items:
            raise self.error(self.line_of(d, kind), f"{where}.{kind} needs at least one condition")
        children = tuple(
            self.condition(v, ln, f"{where}.{kind}[{i}]")
            for i, (v, ln) in enumerate(zip(items, items.item_lines, strict=False))
        )
        at = self.line_of(d, kind)
        return c.AnyOf(children, line=at) if kind == "any" else c.AllOf(children, line=at)

    def rule(self, value: Any, line: int, where: str, names: set[str]) -> Rule:
        d = self.mapping(value, where, line)
        self.keys(
            d,
            {"name", "match", "allow", "hide", "limits", "accept", "login_url", "cors", "mode"},
            where,
            {"name", "match", "allow"},
        )
        name = self.get(d, "name", str, where)
        if name in names:
            raise self.error(self.line_of(d, "name"), f"duplicate rule name {name!r}")
        names.add(name)
        where = f"rule {name!r}"
        match = self.get(d, "match", dict, where)
        self.keys(match, {"path", "methods", "host"}, f"{where} match", {"path"})
        path_text = self.get(match, "path", str, f"{where} match")
        try:
            pattern = PathPattern.parse(path_text)
        except ValueError as e:
            raise self.error(self.line_of(match, "path"), str(e)) from None
        methods = None
        if "methods" in match:
            items = self.strings(match, "methods", f"{where} match")
            if not items:
                raise self.error(self.line_of(match, "methods"), "methods must not be empty")
            for m_line, m in items:
                if not METHOD.match(m):
                    raise self.error(m_line, f"method {m!r} must be an upper-case HTTP method")
            methods = frozenset(m for _, m in items)
        host = self.get(match, "host", str, f"{where} match")
        if host is not None:
            host = normalize_host(host)
        allow = self.condition(d["allow"], self.line_of(d, "allow"), f"{where} allow")
        unknown = c.params_named(allow) - pattern.param_names
        if unknown:
            raise self.error(
                self.line_of(d, "allow"),
                f"{where} uses path parameter(s) "
                f"{', '.join(sorted(unknown))} that {path_text!r} does not define",
            )
        hide = self.get(d, "hide", bool, where, False)
        limits = self.limits(d, "limits", where)
        accept = self.configured
        if "accept" in d:
            items = self.strings(d, "accept", where)
            for a_line, kind in items:
                if kind not in KINDS:
                    raise self.error(a_line, f"accept: {kind!r} is not one of {', '.join(KINDS)}")
                if kind not in self.configured:
                    raise self.error(a_line, f"accept: {kind!r} is not configured under authn")
            accept = frozenset(k for _, k in items)
        # A page load without credentials goes to the rule's login_url, else to
        # the OpenID Connect login when the rule accepts its sessions.
        login_url = (
            self.login_url(d, where)
            or (self.start_path if OIDC in accept else None)
            or self.default_login_url
        )
        cors = self.get(d, "cors", dict, where, MarkedDict())
        self.keys(cors, {"preflight"}, f"{where} cors")
        preflight = self.get(cors, "preflight", str, f"{where} cors", "authorize")
        if preflight not in ("authorize", "pass"):
            raise self.error(self.line_of(cors, "preflight"), "cors.preflight is authorize or pass")
        return Rule(
            name,
            d.line,
            pattern,
            methods,
            host,
            allow,
            hide,
            limits,
            accept=accept,
            login_url=login_url,
            preflight_pass=preflight == "pass",
            mode=self.mode(d, where),
        )

    def mode(self, d: MarkedDict, where: str) -> str | None:
        mode: str | None = self.get(d, "mode", str, where)
        if mode is not None and mode not in ("enforce", "report"):
            raise self.error(
                self.line_of(d, "mode"), f"mode must be enforce or report, not {mode!r}"
            )
        return mode

    def login_url(self, d: MarkedDict, where: str) -> str | None:
        url: str | None = self.get(d, "login_url", str, where)
        if url is None:
            return None
        parts = urllib.parse.urlsplit(url)
        ok = (parts.scheme in ("https", "http") and parts.netloc) or (
            not parts.scheme and not parts.netloc and url.startswith("/") and "//" not in url
        )
        if not ok or any(ord(ch) <= 0x20 or ord(ch) >= 0x7F for ch in url) or parts.fragment:
            raise self.error(
                self.line_of(d, "login_url"),
                f"login_url {url!r} must be an http(s) URL or a path starting with /",
            )
        return url

    def strip_headers(self, top: MarkedDict) -> frozenset[str]:
        """The client's fields the backend never receives: the default list
        (TRUSTED_BY_BACKENDS), plus `add`, less `keep`."""
        names = set(TRUSTED_BY_BACKENDS)
        if "strip_headers" not in top:
            return frozenset(names)
        d = self.get(top, "strip_headers", dict, "the policy")
        self.keys(d, {"add", "keep"}, "strip_headers")
        for key in ("add", "keep"):
            for line, name in self.strings(d, key, "strip_headers"):
                lower = name.lower().replace("_", "-")  # one name for every spelling
                if not HEADER_NAME.match(name):
                    raise self.error(line, f"strip_headers.{key}: {name!r} is not a header name")
                if key == "add" and lower in ("host", "content-length", "transfer-encoding"):
                    raise self.error(line, f"strip_headers.add: {name} cannot be removed")
                if key == "keep" and lower not in TRUSTED_BY_BACKENDS:
                    raise self.error(
                        line,
                        f"strip_headers.keep: {name} is not removed by default, so there is "
                        "nothing to keep (the default list: docs/security.md)",
                    )
                if key == "add":
                    names.add(lower)
                else:
                    names.discard(lower)
        return frozenset(names)

    def policy(self, doc: Any) -> Policy:
        if doc is None:
            raise self.error(1, "the policy is empty")
        top = self.mapping(doc, "the policy", 1)
        allowed = {
            "version",
            "realm",
            "client_ip",
            "ip",
            "authn",
            "limits",
            "rules",
            "default",
            "forward_credentials",
            "strip_headers",
            "login_url",
            "mode",
            "tests",
            "watch",
        }
        self.keys(top, allowed, "the policy", {"version", "rules"})
        if type(top["version"]) is not int or top["version"] != 1:
            raise self.error(
                self.line_of(top, "version"), f"version must be 1, not {top['version']!r}"
            )
        realm = self.get(top, "realm", str, "the policy", "api")
        if not _SAFE_REALM.match(realm):
            raise self.error(
                self.line_of(top, "realm"), "realm must be printable ASCII without '\"' or '\\'"
            )
        # Every section is read even when an earlier one is wrong, so that
        # the author sees all the problems of the file at once; a section
        # that fails stands in with an empty value meanwhile.
        problems: list[PolicyError] = []

        def attempt(read: Callable[[], T], instead: T) -> T:
            try:
                return read()
            except PolicyError as e:
                problems.append(e)
                return instead

        def read_client_ip() -> tuple[str, IPSet]:
            client_ip = self.get(top, "client_ip", dict, "the policy", MarkedDict())
            self.keys(client_ip, {"trusted_proxies", "header"}, "client_ip")
            header = self.get(client_ip, "header", str, "client_ip", "X-Forwarded-For").lower()
            if header not in ("x-forwarded-for", "forwarded"):
                raise self.error(
                    self.line_of(client_ip, "header"),
                    "client_ip.header must be X-Forwarded-For or Forwarded",
                )
            proxies = self.strings(client_ip, "trusted_proxies", "client_ip")
            return header, IPSet.build(self.cidrs(proxies, "client_ip.trusted_proxies"))

        ip_header, trusted = attempt(read_client_ip, ("x-forwarded-for", IPSet.build([])))

        def read_ip() -> tuple[Callable[[], IPSet], IPSet | None]:
            ip = self.get(top, "ip", dict, "the policy", MarkedDict())
            self.keys(ip, {"block", "block_files", "allow"}, "ip")
            make_block = self.block_set(
                self.cidrs(self.strings(ip, "block", "ip"), "ip.block"),
                self.strings(ip, "block_files", "ip"),
            )
            allow_entries = self.strings(ip, "allow", "ip")
            allow = IPSet.build(self.cidrs(allow_entries, "ip.allow")) if allow_entries else None
            return make_block, allow

        no_ip: tuple[Callable[[], IPSet], IPSet | None] = (IPSet.empty, None)
        make_block, allow_set = attempt(read_ip, no_ip)
        authn = attempt(
            lambda: self.get(top, "authn", dict, "the policy", MarkedDict()), MarkedDict()
        )
        attempt(
            lambda: self.keys(authn, {"jwt", "api_keys", "basic", "mtls", "oidc"}, "authn"), None
        )
        jwt_items = attempt(lambda: self.get(authn, "jwt", list, "authn", MarkedList()), None)
        jwt_items = jwt_items if jwt_items is not None else MarkedList()
        read: list[Issuer | None] = []
        for i, (v, ln) in enumerate(
            zip(jwt_items, getattr(jwt_items, "item_lines", []), strict=False)
        ):
            try:
                read.append(self.issuer(v, ln, f"authn.jwt[{i}]"))
            except PolicyError as e:
                problems.append(e)
                read.append(None)
        issuers = tuple(i for i in read if i is not None)
        attempt(lambda: _one_introspecting(issuers, self), None)
        if len(issuers) == len(read):
            attempt(
                lambda: _unique(issuers, lambda i: i.name, "issuer name", self, jwt_items), None
            )
            attempt(
                lambda: _unique(issuers, lambda i: i.issuer, "issuer URL", self, jwt_items), None
            )
        api_keys = (
            attempt(lambda: self.api_keys(authn["api_keys"], authn.key_lines["api_keys"]), None)
            if "api_keys" in authn
            else None
        )
        basic = (
            attempt(lambda: self.basic(authn["basic"], authn.key_lines["basic"]), None)
            if "basic" in authn
            else None
        )
        mtls = (
            attempt(lambda: self.mtls(authn["mtls"], authn.key_lines["mtls"]), None)
            if "mtls" in authn
            else None
        )
        login = (
            attempt(lambda: self.oidc(authn["oidc"], authn.key_lines["oidc"]), None)
            if "oidc" in authn
            else None
        )
        if login is not None and any(i.cookie == login.session_cookie for i in issuers):
            problems.append(
                self.error(
                    authn.key_lines["oidc"], "an issuer's cookie has the session cookie's name"
                )
            )
        # What the rules may accept: the kinds the file configures, even one
        # whose section is wrong (its problem is reported once, not per rule).
        self.configured = frozenset(
            kind
            for kind, present in (
                (JWT, jwt_items),
                (API_KEY, "api_keys" in authn),
                (BASIC, "basic" in authn),
                (MTLS, "mtls" in authn),
                (OIDC, "oidc" in authn),
            )
            if present
        )
        self.default_login_url = attempt(lambda: self.login_url(top, "the policy"), None)
        no_limits: tuple[LimitSpec, ...] = ()
        limits = attempt(lambda: self.limits(top, "limits", "the policy"), no_limits)
        rule_items = self.get(top, "rules", list, "the policy")
        names: set[str] = set()
        built: list[Rule] = []
        for i, (v, ln) in enumerate(zip(rule_items, rule_items.item_lines, strict=False)):
            try:
                built.append(self.rule(v, ln, f"rules[{i}]", names))
            except PolicyError as e:
                problems.append(e)  # and go on: the author sees every rule's problem

        def read_default() -> str:
            default: str = self.get(top, "default", str, "the policy", "not_found")
            if default not in ("not_found", "forbidden"):
                raise self.error(
                    self.line_of(top, "default"), "default must be not_found or forbidden"
                )
            return default

        default = attempt(read_default, "not_found")
        forward = attempt(
            lambda: self.get(top, "forward_credentials", bool, "the policy", True), True
        )
        mode = attempt(lambda: self.mode(top, "the policy"), None)
        strip = attempt(lambda: self.strip_headers(top), frozenset(TRUSTED_BY_BACKENDS))
        no_watch: tuple[WatchSpec, ...] = ()
        watch = attempt(lambda: self.watch(top), no_watch)
        # The block set last: a big list may still be compiling in the helper
        # process (blocklists.py), and the rest was built meanwhile.
        blocked = attempt(make_block, IPSet.empty())
        if problems:
            problems.sort(key=lambda e: (e.file != self.file, e.line or 0))
            problems[0].more = tuple(problems[1:])
            raise problems[0]
        rules = tuple(built)
        # `tests:` is for the tools (`authgate test`, `check`): kept as read.
        tests = (top["tests"], self.line_of(top, "tests")) if "tests" in top else None
        return Policy(
            mode=mode or "enforce",
            client_ip_header=ip_header,
            api_keys=api_keys,
            basic=basic,
            mtls=mtls,
            login=login,
            file=self.file,
            realm=realm,
            trusted_proxies=trusted,
            block=blocked,
            allow=allow_set,
            issuers=issuers,
            limits=limits,
            rules=rules,
            default=default,
            forward_credentials=forward,
            strip_headers=strip,
            strip_headers_line=self.line_of(top, "strip_headers") if "strip_headers" in top else 0,
            files=tuple(dict.fromkeys(self.files)),
            uses_host=any(r.host is not None for r in rules),
            watch=watch,
            tests_raw=tests,
        )


def _unquoted(op: str, value: dict[str, Any]) -> str:
    """The error for a claim value YAML read as a mapping: most often a path
    parameter without quotes (`equals: {user}` is the mapping {'user': None})."""
    if len(value) == 1 and next(iter(value.values())) is None:
        quoted = f'"{{{next(iter(value))}}}"'
        fix = f"in: [{quoted}]" if op == "in" else f"{op}: {quoted}"
        return (
            f"{op}: {{{next(iter(value))}}} without quotes is a YAML mapping, not a value; "
            f"quote the path parameter: {fix}"
        )
    return f"{op}: a mapping where a value belongs (quote it to mean a string)"


def _unique(
    items: tuple[Issuer, ...],
    key: Callable[[Issuer], str],
    what: str,
    b: _Builder,
    source: MarkedList,
) -> None:
    seen: set[str] = set()
    for item, line in zip(items, getattr(source, "item_lines", []), strict=False):
        k = key(item)
        if k in seen:
            raise b.error(line, f"duplicate {what} {k!r}")
        seen.add(k)


def _one_introspecting(issuers: tuple[Issuer, ...], b: _Builder) -> None:
    """An opaque token does not say who issued it: with two introspecting
    issuers the gateway would have to hand every token to both."""
    asking = [i for i in issuers if i.introspection is not None]
    if len(asking) > 1:
        first, second = asking[0], asking[1]
        assert second.introspection is not None
        raise b.error(
            second.introspection.config.line,
            f"issuers {first.name!r} and {second.name!r} both introspect; an opaque token "
            "does not say which issuer it is from, so it would be sent to both: keep one",
        )


def parse_policy(text: str, file: str = "<policy>", base: Path | None = None) -> Policy:
    """Build a Policy from YAML text. Raises PolicyError."""
    b = _Builder(file, base if base is not None else Path(file).parent)
    return b.policy(load(text, file))


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and build a policy file. Raises PolicyError naming file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(str(p), None, f"cannot read the policy: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(str(p), None, "the policy is not UTF-8 text") from None
    try:
        return parse_policy(text, str(p), p.parent)
    finally:
        blocklists.release()  # the helper's work was for the first load only
