"""The key set of an issuer whose keys come from a JWKS address: what the
decision reads (the keys) and the bookkeeping that says when to fetch them
again. No I/O: `authgate.runtime.jwks` fetches and hands the result here.

- Cached for the provider's `Cache-Control: max-age`, kept within
  [min_ttl, max_ttl]; the previous keys keep serving when a refresh fails
  (stale beats down).
- An unknown `kid` may trigger a refresh, at most once per cooldown after the
  last refresh it triggered, and a kid still unknown afterwards is remembered
  for one cooldown (the attacker picks the kid, so it must not pick our fetch
  rate; a key the provider publishes late is found one cooldown later).
  Scheduled and start-up fetches do not count against it.
- A refresh keeps the objects of the keys it serves again, so that tokens
  cached as verified by them stay cached (`tokens.TokenCache` compares by
  identity), and tokens of a key that left the set are refused.
- Plain `http://` only for loopback addresses unless explicitly allowed.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from authgate.core.ipset import is_loopback_host

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class VerifyKey:
    kid: str | None
    key: Any  # a cryptography public key, or bytes for HMAC
    algorithms: frozenset[str]  # the algorithms this key may be used with


def find_key(keys: Sequence[VerifyKey], kid: object) -> VerifyKey | None:
    """The key a token's `kid` names: a sole key serves a token without a kid,
    and a sole key without a kid serves any token."""
    if kid is None:
        return keys[0] if len(keys) == 1 else None
    if not isinstance(kid, str):
        return None
    for k in keys:
        if k.kid == kid or (k.kid is None and len(keys) == 1):
            return k
    return None


def check_url(url: str, allow_http: bool) -> None:
    """Raise ValueError for a key-set address the policy must not use."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError(f"{url!r} must not carry credentials")
    if parts.scheme == "http" and not allow_http and not is_loopback_host(parts.hostname):
        raise ValueError(f"{url!r} is plain http to a non-loopback host (set allow_http: true)")


def max_age(cache_control: str | None) -> int | None:
    if not cache_control:
        return None
    if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
        return 0
    m = _MAX_AGE.search(cache_control)
    return int(m.group(1)) if m else None


class RemoteKeys:
    """The key set of one issuer, fetched from its JWKS address (or found by
    OpenID Connect discovery). Fetching is `authgate.runtime.jwks`'s job."""

    def __init__(
        self,
        *,
        issuer: str,
        url: str | None,
        discovery: bool,
        pinned: frozenset[str],
        min_ttl: float = 300,
        max_ttl: float = 86400,
        cooldown: float = 30,
        allow_http: bool = False,
        timeout: float = 5,
        clock: Callable[[], float] = time.monotonic,
        parse_metadata: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.issuer = issuer
        self.url = url
        self.discovery = discovery
        self.pinned = pinned
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.cooldown = cooldown  # also how long a kid looked for in vain is remembered
        self.allow_http = allow_http
        self.timeout = timeout  # seconds for one fetch, connecting included
        self.clock = clock
        self.keys: tuple[VerifyKey, ...] = ()
        self.loaded = False  # ever had usable keys
        self.expires_at = 0.0
        self.next_attempt = 0.0  # when a scheduled fetch is due (expiry, or backoff)
        self.last_kid_refresh = float("-inf")  # the last fetch an unknown kid caused
        self.failures = 0  # in a row, for the backoff
        self.failures_total = 0
        self.fetches = 0  # HTTP requests made (for tests and metrics)
        self.last_error: str | None = None
        self._unknown: dict[str, float] = {}  # kid -> remembered until
        # For an OpenID provider (discovery): what to make of its metadata
        # document (raises ValueError), and what it made of the last one.
        self.parse_metadata = parse_metadata
        self.metadata: Any = None

    # --- what the decision reads ----------------------------------------------------

    def lookup(self, kid: object) -> VerifyKey | None:
        return find_key(self.keys, kid)

    def retry_after(self) -> int:
        return max(1, int(self.next_attempt - self.clock() + 0.999))

    def same_source(self, other: RemoteKeys) -> bool:
        """Configured alike: a reloaded policy can keep this one's keys."""
        return (self.issuer, self.url, self.discovery, self.pinned, self.allow_http) == (
            other.issuer,
            other.url,
            other.discovery,
            other.pinned,
            other.allow_http,
        ) and (self.parse_metadata is None) == (other.parse_metadata is None)

    def adopt_settings(self, other: RemoteKeys) -> None:
        """Take the cache, cooldown and timeout settings of a reloaded policy."""
        self.min_ttl, self.max_ttl = other.min_ttl, other.max_ttl
        self.cooldown = other.cooldown
        self.timeout = other.timeout

    # --- when to fetch ----------------------------------------------------------------

    def due(self) -> bool:
        """Time for a scheduled fetch (never fetched, expired, or a failed one to
        retry after its backoff)."""
        return self.clock() >= self.next_attempt

    def may_refresh_for(self, kid: str) -> bool:
        """Would an unknown `kid` justify a fetch now? Not while a failure's
        backoff runs, not within the cooldown of the last kid-triggered fetch,
        and not for a kid that was just looked for in vain."""
        now = self.clock()
        if self.failures and now < self.next_attempt:
            return False
        until = self._unknown.get(kid)
        if until is not None and now < until:
            return False
        return now - self.last_kid_refresh >= self.cooldown

    # --- a fetch's result -----------------------------------------------------------

    def ttl_for(self, cache_control: str | None) -> float:
        age = max_age(cache_control)
        return self.min_ttl if age is None else min(max(age, self.min_ttl), self.max_ttl)

    def apply(self, keys: tuple[VerifyKey, ...], ttl: float, metadata: Any = None) -> None:
        if metadata is not None:
            self.metadata = metadata  # before the keys: a reader sees both or the old
        # A key served again (same kid, material and algorithms) keeps its object.
        before = {k.kid: k for k in self.keys}  # kids are unique within a set
        keys = tuple(k if (old := before.get(k.kid)) is None or old != k else old for k in keys)
        self.keys = keys  # one assignment: requests see the old set or the new one
        self.loaded = True
        self.failures = 0
        self.last_error = None
        self.expires_at = self.clock() + ttl
        self.next_attempt = self.expires_at
        self._unknown = {k: t for k, t in self._unknown.items() if self.lookup(k) is None}

    def failed(self, error: str) -> float:
        """Record a failed fetch; the backoff (seconds) before the next one."""
        self.failures += 1
        self.failures_total += 1
        self.last_error = error
        backoff: float = min(self.cooldown * 2.0 ** min(self.failures - 1, 6), 300.0)
        self.next_attempt = self.clock() + backoff
        return backoff

    def still_unknown(self, kid: str) -> None:
        """A kid-triggered fetch ended and the kid is still not there."""
        if self.lookup(kid) is None:
            self._unknown[kid] = self.clock() + self.cooldown
            if len(self._unknown) > 10_000:
                self._unknown.clear()
