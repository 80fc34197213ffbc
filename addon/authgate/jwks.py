"""JWKS over HTTP(S): keys that an identity provider rotates.

`decide()` only reads `RemoteKeys.keys`; fetching happens off the request
path (a thread, awaited by the addon) and updates that state in one step.

- Cached for the provider's `Cache-Control: max-age`, kept within
  [min_ttl, max_ttl]; the previous keys keep serving when a refresh fails
  (stale beats down).
- An unknown `kid` may trigger a refresh, at most once per cooldown, and a
  kid still unknown afterwards is remembered for a short while (the attacker
  picks the kid, so it must not pick our fetch rate).
- Plain `http://` only for loopback addresses unless explicitly allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from .tokens import VerifyKey, load_jwks

logger = logging.getLogger("authgate")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
MAX_BODY = 1 << 20  # a JWKS or discovery document larger than 1 MiB is refused


class FetchError(Exception):
    pass


def is_loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, allow_http: bool) -> None:
    """Raise ValueError for a key-set address the policy must not use."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError(f"{url!r} must not carry credentials")
    if parts.scheme == "http" and not allow_http and not is_loopback_url(url):
        raise ValueError(f"{url!r} is plain http to a non-loopback host (set allow_http: true)")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead around the https/loopback rule: follow none."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def http_get(url: str, timeout: float) -> tuple[bytes, str | None]:
    """GET -> (body, Cache-Control). Blocking: call it in a thread."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            body: bytes = response.read(MAX_BODY + 1)
            cache_control = response.headers.get("Cache-Control")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FetchError(f"GET {url}: {e}") from None
    if len(body) > MAX_BODY:
        raise FetchError(f"GET {url}: larger than {MAX_BODY} bytes")
    return body, cache_control


def max_age(cache_control: str | None) -> int | None:
    if not cache_control:
        return None
    if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
        return 0
    m = _MAX_AGE.search(cache_control)
    return int(m.group(1)) if m else None


class RemoteKeys:
    """The key set of one issuer, fetched from its JWKS address."""

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
        negative_ttl: float = 60,
        allow_http: bool = False,
        timeout: float = 5,
        clock: Callable[[], float] = time.monotonic,
        get: Callable[[str, float], tuple[bytes, str | None]] = http_get,
    ) -> None:
        self.issuer = issuer
        self.url = url
        self.discovery = discovery
        self.pinned = pinned
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.cooldown = cooldown
        self.negative_ttl = negative_ttl
        self.allow_http = allow_http
        self.timeout = timeout
        self.clock = clock
        self.get = get
        self.keys: tuple[VerifyKey, ...] = ()
        self.loaded = False  # ever had usable keys
        self.expires_at = 0.0
        self.next_attempt = 0.0  # after a failure: backoff
        self.last_attempt = float("-inf")
        self.failures = 0  # in a row, for the backoff
        self.failures_total = 0
        self.fetches = 0  # HTTP requests made (for tests and metrics)
        self.last_error: str | None = None
        self._unknown: dict[str, float] = {}  # kid -> remembered until
        self._lock = asyncio.Lock()

    # --- what decide() reads ------------------------------------------------------

    def lookup(self, kid: object) -> VerifyKey | None:
        keys = self.keys
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((k for k in keys if k.kid == kid), None)

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
        )

    def adopt_settings(self, other: RemoteKeys) -> None:
        """Take the cache and cooldown settings of a reloaded policy."""
        self.min_ttl, self.max_ttl = other.min_ttl, other.max_ttl
        self.cooldown, self.negative_ttl = other.cooldown, other.negative_ttl

    # --- refreshing (the addon's job) ------------------------------------------------

    def due(self) -> bool:
        """Time for a scheduled refresh (expired, or a failed one to retry)."""
        return self.clock() >= self.next_attempt

    def may_refresh_for(self, kid: str) -> bool:
        """Would an unknown `kid` justify a fetch now?"""
        now = self.clock()
        until = self._unknown.get(kid)
        if until is not None and now < until:
            return False
        return now - self.last_attempt >= self.cooldown

    async def refresh(self, reason: str = "scheduled", kid: str | None = None) -> None:
        async with self._lock:
            if kid is not None and (self.lookup(kid) is not None or not self.may_refresh_for(kid)):
                return  # another request refreshed meanwhile, or too soon
            self.last_attempt = self.clock()
            try:
                keys, ttl = await asyncio.to_thread(self._fetch)
            except FetchError as e:
                self._failed(str(e))
            else:
                self._apply(keys, ttl)
            if kid is not None and self.lookup(kid) is None:
                self._unknown[kid] = self.clock() + self.negative_ttl
                if len(self._unknown) > 10_000:
                    self._unknown.clear()

    def refresh_sync(self) -> None:
        """For the command line (explain, test): fetch now, blocking."""
        self.last_attempt = self.clock()
        try:
            keys, ttl = self._fetch()
        except FetchError as e:
            self._failed(str(e))
        else:
            self._apply(keys, ttl)

    def _fetch(self) -> tuple[tuple[VerifyKey, ...], float]:
        url = self.url
        if self.discovery:
            config_url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            body, _ = self._get(config_url)
            try:
                doc = json.loads(body)
                if not isinstance(doc, dict):
                    raise TypeError("not a JSON object")
                # OpenID Connect Discovery §4.3: the document must be the issuer's own.
                if doc.get("issuer") != self.issuer:
                    raise ValueError(f"it names issuer {doc.get('issuer')!r}")
                url = doc["jwks_uri"]
                if not isinstance(url, str):
                    raise TypeError
                check_url(url, self.allow_http)
            except (ValueError, KeyError, TypeError) as e:
                raise FetchError(f"{config_url}: no usable jwks_uri ({e})") from None
        assert url is not None
        body, cache_control = self._get(url)
        try:
            keys, notes = load_jwks(body.decode("utf-8", "replace"), self.pinned)
        except ValueError as e:
            raise FetchError(f"{url}: {e}") from None
        if not keys:
            raise FetchError(
                f"{url}: no key usable with {sorted(self.pinned)} ({'; '.join(notes)})"
            )
        age = max_age(cache_control)
        ttl = self.min_ttl if age is None else min(max(age, self.min_ttl), self.max_ttl)
        return tuple(keys), ttl

    def _get(self, url: str) -> tuple[bytes, str | None]:
        self.fetches += 1
        return self.get(url, self.timeout)

    def _apply(self, keys: tuple[VerifyKey, ...], ttl: float) -> None:
        self.keys = keys  # one assignment: requests see the old set or the new one
        self.loaded = True
        self.failures = 0
        self.last_error = None
        now = self.clock()
        self.expires_at = now + ttl
        self.next_attempt = self.expires_at
        self._unknown = {k: t for k, t in self._unknown.items() if self.lookup(k) is None}
        logger.info(f"authgate: {len(keys)} keys for {self.issuer} (cached {int(ttl)}s)")

    def _failed(self, error: str) -> None:
        self.failures += 1
        self.failures_total += 1
        self.last_error = error
        backoff = min(self.cooldown * 2 ** min(self.failures - 1, 6), 300.0)
        self.next_attempt = self.clock() + backoff
        if self.loaded:
            logger.warning(
                f"authgate: key refresh for {self.issuer} failed, keeping the "
                f"last good keys: {error}"
            )
        else:
            logger.error(f"authgate: no keys for {self.issuer} yet: {error}")
