"""Fetching JWKS and OpenID Connect discovery documents over HTTP(S).

The key sets themselves (`authgate.core.keyset.RemoteKeys`) say when a fetch
is due; this module does the fetching, off the request path:

- at most one fetch in flight per key set, whatever the request rate; every
  request that needs it joins that one fetch;
- each fetch is bounded as a whole (`timeout`, connecting included), in a
  worker thread, so the event loop never waits on the network;
- a request waits for a fetch at most `wait` seconds (1 s by default), then
  goes on without it (and gets its 503 + Retry-After if there are no keys);
- no redirects: one could lead around the https/loopback rule.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from authgate.core.keyset import RemoteKeys, VerifyKey, check_url
from authgate.core.tokens import load_jwks
from authgate.runtime.tracing import traced

if TYPE_CHECKING:
    from authgate.runtime.otel import Tracing

logger = logging.getLogger("authgate")
MAX_BODY = 1 << 20  # a JWKS or discovery document larger than 1 MiB is refused
REQUEST_WAIT = 1.0  # how long a request waits for a fetch it needs

Get = Callable[[str, float], tuple[bytes, str | None]]


class FetchError(Exception):
    pass


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead around the https/loopback rule: follow none."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


OPENER = urllib.request.build_opener(_NoRedirects())


def read_bounded(response: Any, what: str, limit: int, deadline: float, timeout: float) -> bytes:
    """A response's body, read until `deadline` (a server that trickles its
    answer gets no longer) and up to `limit` bytes; FetchError past either."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        if time.monotonic() > deadline:
            raise FetchError(f"{what}: no complete answer within {timeout:g}s")
        chunk = response.read1(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise FetchError(f"{what}: larger than {limit} bytes")
    return b"".join(chunks)


def http_get(url: str, timeout: float) -> tuple[bytes, str | None]:
    """GET -> (body, Cache-Control), within `timeout` seconds in all; a status
    other than 2xx is a FetchError. Blocking: call it in a thread."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with OPENER.open(request, timeout=timeout) as response:
            body = read_bounded(response, f"GET {url}", MAX_BODY, deadline, timeout)
            return body, response.headers.get("Cache-Control")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FetchError(f"GET {url}: {e}") from None


def http_send(
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
    limit: int = MAX_BODY,
) -> tuple[int, bytes]:
    """One request -> (status, body), within `timeout` seconds in all and
    `limit` bytes: any status is an answer (a 4xx or 5xx is read too, a
    redirect is not followed). FetchError when there is none. Blocking: call
    it in a thread (the login's calls, introspection)."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    what = f"{method} {url}"
    try:
        try:
            response = OPENER.open(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            with e:
                if e.fp is None:
                    return e.code, b""
                return e.code, read_bounded(e, what, limit, deadline, timeout)
        with response:
            return int(response.status), read_bounded(response, what, limit, deadline, timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FetchError(f"{what}: {e}") from None


Fetched = tuple[tuple[VerifyKey, ...], float, Any]


def fetch(source: RemoteKeys, get: Get = http_get) -> Fetched:
    """One fetch of the key set (discovery first, if configured) -> (keys, ttl,
    the provider's metadata as `source.parse_metadata` makes it, or None).
    Blocking. Raises FetchError."""

    def fetched(url: str) -> tuple[bytes, str | None]:
        source.fetches += 1
        return get(url, source.timeout)

    url = source.url
    metadata: Any = None
    if source.discovery:
        config_url = source.issuer.rstrip("/") + "/.well-known/openid-configuration"
        body, _ = fetched(config_url)
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            # OpenID Connect Discovery §4.3: the document must be the issuer's own.
            if doc.get("issuer") != source.issuer:
                raise ValueError(f"it names issuer {doc.get('issuer')!r}")
            url = doc["jwks_uri"]
            if not isinstance(url, str):
                raise TypeError
            check_url(url, source.allow_http)
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise FetchError(f"{config_url}: no usable jwks_uri ({e})") from None
        if source.parse_metadata is not None:
            try:
                metadata = source.parse_metadata(doc)
            except ValueError as e:
                raise FetchError(f"{config_url}: {e}") from None
    assert url is not None
    body, cache_control = fetched(url)
    try:
        keys, notes = load_jwks(body.decode("utf-8", "replace"), source.pinned)
    except (ValueError, RecursionError) as e:
        raise FetchError(f"{url}: {e}") from None
    if not keys:
        raise FetchError(f"{url}: no key usable with {sorted(source.pinned)} ({'; '.join(notes)})")
    return tuple(keys), source.ttl_for(cache_control), metadata


def _record(source: RemoteKeys, result: Fetched | str) -> None:
    if isinstance(result, str):
        backoff = source.failed(result)
        if source.loaded:
            logger.warning(
                f"authgate: key refresh for {source.issuer} failed, keeping the last good "
                f"keys (next try in {backoff:g}s): {result}"
            )
        else:
            logger.error(
                f"authgate: no keys for {source.issuer} yet (next try in {backoff:g}s): {result}"
            )
        return
    keys, ttl, metadata = result
    source.apply(keys, ttl, metadata)
    logger.info(f"authgate: {len(keys)} keys for {source.issuer} (cached {int(ttl)}s)")


def refresh_sync(source: RemoteKeys, get: Get = http_get) -> None:
    """For the command line (explain, test, replay): fetch now, blocking."""
    try:
        result: Fetched | str = fetch(source, get)
    except FetchError as e:
        result = str(e)
    _record(source, result)


class Fetcher:
    """Runs the fetches of a gateway's key sets: one in flight per key set."""

    def __init__(self, get: Get = http_get, wait: float = REQUEST_WAIT) -> None:
        self.get = get
        self.wait = wait
        self.tracing: Tracing | None = None  # set by the house
        self._inflight: dict[int, asyncio.Task[None]] = {}

    def in_flight(self, source: RemoteKeys) -> bool:
        return id(source) in self._inflight

    async def refresh(
        self, source: RemoteKeys, reason: str = "scheduled", kid: str | None = None
    ) -> None:
        """Start a fetch unless one is running (or, for an unknown kid, unless the
        cooldown or backoff says no), and wait for it to finish."""
        await asyncio.shield(self._start(source, reason, kid))

    async def join(self, source: RemoteKeys, reason: str, kid: str | None = None) -> bool:
        """The same for a request: it waits at most `wait` seconds. False when
        it stopped waiting (the fetch goes on)."""
        task = self._start(source, reason, kid)
        done, _ = await asyncio.wait({task}, timeout=self.wait)
        return bool(done)

    def _start(self, source: RemoteKeys, reason: str, kid: str | None) -> asyncio.Task[None]:
        running = self._inflight.get(id(source))
        if running is not None:
            return running
        if kid is not None:
            if source.lookup(kid) is not None or not source.may_refresh_for(kid):
                return _done()
            source.last_kid_refresh = source.clock()
        elif not source.due():
            return _done()
        # The task takes the current span along: a fetch a request starts is
        # traced under that request's decision.
        task = asyncio.get_running_loop().create_task(self._run(source, kid, reason))
        self._inflight[id(source)] = task
        task.add_done_callback(lambda _: self._inflight.pop(id(source), None))
        return task

    async def _run(self, source: RemoteKeys, kid: str | None, reason: str) -> None:
        attributes = {"authgate.issuer": source.issuer, "authgate.fetch.reason": reason}
        if source.url:
            attributes["url.full"] = source.url
        tracing = self.tracing
        with traced(tracing, "authgate.key_set.fetch", attributes) as span:
            try:
                result: Fetched | str = await asyncio.to_thread(fetch, source, self.get)
            except FetchError as e:
                result = str(e)
                if tracing is not None:
                    tracing.failed(span, result)
            else:
                if span is not None:
                    span.set_attribute("authgate.keys", len(result[0]))
        _record(source, result)
        if kid is not None:
            source.still_unknown(kid)


def _done() -> asyncio.Task[None]:
    async def nothing() -> None:
        return None

    return asyncio.get_running_loop().create_task(nothing())
