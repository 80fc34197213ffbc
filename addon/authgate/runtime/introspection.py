"""Asking an issuer about its opaque tokens (RFC 7662 token introspection),
off the request path. What an answer means, and how long it is remembered,
is `authgate.core.introspection`'s; this module makes the calls:

- one call in flight per token, whatever the request rate: every request
  with that token joins it, and waits at most the call's `timeout` (then
  503 with Retry-After, never 401 and never allow);
- at most MAX_CALLS calls at once per issuer, in threads of their own (a
  hanging provider holds up no bcrypt check, key fetch or reload), each
  bounded as a whole (connecting included), the answer at most 64 KiB; a call
  that cannot start within its timeout is not made (no backlog); no
  redirects (one could lead around the https/loopback rule);
- with a shared store (`--store redis://`), answers are looked up there
  first and put there after a call, keyed by the SHA-256 of the token and
  expiring when the answer would: gateways on several machines ask the
  provider once per token between them (nearly: two that miss at the same
  moment both ask). A store that cannot answer is passed over;
- after a failed call, new tokens get 503 at once for a backoff (1 s,
  doubling to 30 s), then one call at a time tries whether the provider
  is back. Tokens with a remembered answer are judged by it meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from authgate.core.introspection import (
    CLIENT_SECRET_BASIC,
    MAX_ANSWER,
    Entry,
    Introspect,
    Introspected,
    IntrospectionConfig,
    ProviderBroken,
    entry_for,
    read_answer,
    token_digest,
)
from authgate.core.keyset import check_url
from authgate.core.tokens import Issuer
from authgate.runtime.jwks import FetchError, Get, http_get, http_send
from authgate.runtime.stores import SharedStore, StoreUnavailable

logger = logging.getLogger("authgate")
MAX_CALLS = 16  # introspection calls in flight per issuer
WAIT_MARGIN = 0.25  # seconds a request waits beyond the call's own bound

T = TypeVar("T")
# POST url, form body, header fields, timeout -> (status, body)
Post = Callable[[str, bytes, dict[str, str], float], tuple[int, bytes]]


class IntrospectionFailed(Exception):
    """No usable answer: the provider did not answer, or not properly."""


class Busy(Exception):
    """MAX_CALLS calls to the issuer are out and none ended in time: no call
    was made (the provider is not to blame; the request gets its 503)."""


def http_post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    """POST -> (status, body), within `timeout` seconds in all, any status
    (a 401 is an answer too). Blocking: call it in a thread."""
    try:
        return http_send("POST", url, body, headers, timeout, MAX_ANSWER)
    except FetchError as e:
        raise IntrospectionFailed(str(e)) from None


def request_for(config: IntrospectionConfig, token: str) -> tuple[bytes, dict[str, str]]:
    """The introspection request's body and header fields (RFC 7662 §2.1),
    the gateway authenticated as its client (RFC 6749 §2.3.1: id and secret
    form-encoded, then Basic)."""
    form = [("token", token), ("token_type_hint", "access_token")]
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    }
    if config.auth == CLIENT_SECRET_BASIC:
        user = urllib.parse.quote_plus(config.client_id)
        password = urllib.parse.quote_plus(config.client_secret)
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {credentials}"
    else:
        form += [("client_id", config.client_id), ("client_secret", config.client_secret)]
    return urllib.parse.urlencode(form).encode("ascii"), headers


def discover(config: IntrospectionConfig, get: Get = http_get) -> str:
    """The introspection_endpoint of the issuer's discovery document. Blocking.
    Raises IntrospectionFailed."""
    url = config.issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        body, _ = get(url, config.timeout)
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        # OpenID Connect Discovery §4.3: the document must be the issuer's own.
        if doc.get("issuer") != config.issuer:
            raise ValueError(f"it names issuer {doc.get('issuer')!r}")
        endpoint = doc.get("introspection_endpoint")
        if not isinstance(endpoint, str):
            raise ValueError("it has no introspection_endpoint")
        check_url(endpoint, config.allow_http)
    except FetchError as e:
        raise IntrospectionFailed(str(e)) from None
    except (ValueError, TypeError, RecursionError) as e:
        raise IntrospectionFailed(f"{url}: no usable introspection_endpoint ({e})") from None
    return endpoint


def call(
    config: IntrospectionConfig,
    endpoint: str,
    token: str,
    post: Post,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One introspection request, blocking -> the answer's members, within
    `timeout` (the config's by default). Raises IntrospectionFailed."""
    body, headers = request_for(config, token)
    status, answer = post(endpoint, body, headers, timeout or config.timeout)
    try:
        return read_answer(status, answer)
    except ProviderBroken as e:
        raise IntrospectionFailed(f"POST {endpoint}: {e}") from None


# --- the shared cache --------------------------------------------------------------


def shared_key(issuer: str, digest: bytes) -> str:
    """The store's key for an answer: the issuer (hashed) and the token's
    SHA-256; never the token."""
    return f"introspection|{hashlib.sha256(issuer.encode()).hexdigest()[:16]}|{digest.hex()}"


def encode_shared(answer: dict[str, Any], until: float) -> bytes:
    return json.dumps({"until": until, "answer": answer}, separators=(",", ":")).encode()


def decode_shared(data: bytes) -> tuple[dict[str, Any], float] | None:
    """(answer, until) from the store, or None for anything else (a miss)."""
    try:
        doc = json.loads(data)
        answer, until = doc["answer"], doc["until"]
        read_answer(200, json.dumps(answer).encode())  # the same checks as from the provider
    except (ValueError, KeyError, TypeError, RecursionError, ProviderBroken):
        return None
    if isinstance(until, bool) or not isinstance(until, int | float):
        return None
    return answer, float(until)


def _answered(
    issuer: Issuer, source: Introspected, digest: bytes, answer: dict[str, Any], now: float
) -> Entry:
    entry = entry_for(answer, issuer, now, source.config)
    source.remember(digest, entry, now)
    return entry


# --- the calls ---------------------------------------------------------------------


class Introspector:
    """Runs a gateway's introspection calls: one in flight per token."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        post: Post = http_post,
        get: Get = http_get,
        shared: Callable[[], SharedStore | None] = lambda: None,
    ) -> None:
        self.clock = clock
        self.post = post
        self.get = get
        self.shared = shared
        self._inflight: dict[tuple[int, bytes], asyncio.Task[None]] = {}
        self._slots: weakref.WeakKeyDictionary[Introspected, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._discovery: weakref.WeakKeyDictionary[Introspected, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        # Threads of their own: a provider that hangs must not hold up the
        # threads bcrypt checks, key fetches and reloads run in.
        self._threads: ThreadPoolExecutor | None = None

    def in_flight(self) -> int:
        return len(self._inflight)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(MAX_CALLS, thread_name_prefix="authgate-introspect")
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def join(self, work: Introspect) -> None:
        """Start the call this token needs unless one is running, and wait for
        it at most its timeout (a little more: the thread's scheduling)."""
        source = work.issuer.introspection
        assert source is not None
        key = (id(source), work.digest)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._run(work))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        await asyncio.wait({task}, timeout=source.config.timeout + WAIT_MARGIN)

    async def _run(self, work: Introspect) -> None:
        issuer, source = work.issuer, work.issuer.introspection
        assert source is not None
        shared = self.shared()
        key = shared_key(issuer.issuer, work.digest)
        if shared is not None:
            try:
                found = await shared.cache_get(key)
            except StoreUnavailable:
                found = None  # the provider it is
            got = decode_shared(found) if found is not None else None
            if got is not None:
                answer, until = got
                now = self.clock()
                # Used no longer than the gateway that asked may use it.
                entry = entry_for(answer, issuer, now, source.config)
                entry = dataclasses.replace(entry, until=min(entry.until, until))
                source.remember(work.digest, entry, now)
                source.shared_hits += 1
                return
        if not source.may_call(self.clock()):
            return  # backing off: the request gets its 503 at once
        try:
            answer = await self.introspect(issuer, work.token)
        except IntrospectionFailed as e:
            backoff = source.failed(str(e), self.clock())
            logger.warning(
                f"authgate: introspection at {issuer.issuer} failed (new tokens get 503 "
                f"for {backoff:g}s, remembered answers still count): {e}"
            )
            return
        except Busy:
            source.abandon()
            return  # too many calls out: this request gets its 503, nobody is to blame
        except asyncio.CancelledError:
            source.abandon()
            raise
        if source.failures:
            logger.warning(f"authgate: introspection at {issuer.issuer} answers again")
        source.succeeded()
        now = self.clock()
        entry = _answered(issuer, source, work.digest, answer, now)
        if shared is not None and entry.until > now:
            try:
                await shared.cache_put(key, encode_shared(answer, entry.until), entry.until - now)
            except StoreUnavailable:
                pass  # remembered here; the other gateways ask for themselves

    async def introspect(self, issuer: Issuer, token: str) -> dict[str, Any]:
        """Ask the issuer about one token: the endpoint (from discovery the
        first time), then the POST in a worker thread, at most MAX_CALLS at
        once per issuer. The answer's members; IntrospectionFailed when there
        is no usable answer."""
        source = issuer.introspection
        assert source is not None
        endpoint = source.endpoint or await self._discover(source)
        slots = self._slots.setdefault(source, asyncio.Semaphore(MAX_CALLS))
        # Waiting no longer than the request does: a call nobody waits for any
        # more is not made later (no backlog behind a slow provider). The wait
        # for a slot and the call share the timeout: a slot found with less
        # than a tenth of it left makes no call either.
        timeout = source.config.timeout
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            await asyncio.wait_for(slots.acquire(), timeout)
        except TimeoutError:
            raise Busy from None
        try:
            left = timeout - (loop.time() - began)
            if left < timeout / 10:
                raise Busy
            source.calls += 1
            return await self._in_thread(call, source.config, endpoint, token, self.post, left)
        finally:
            slots.release()

    async def _discover(self, source: Introspected) -> str:
        """The endpoint from the discovery document: one fetch at a time."""
        lock = self._discovery.setdefault(source, asyncio.Lock())
        async with lock:
            if source.endpoint is None:
                source.endpoint = await self._in_thread(discover, source.config, self.get)
                logger.info(
                    f"authgate: introspection endpoint for {source.config.issuer}: "
                    f"{source.endpoint}"
                )
            return source.endpoint


def introspect_sync(
    issuer: Issuer, token: str, now: float, post: Post = http_post, get: Get = http_get
) -> str | None:
    """For the command line (explain): ask now, blocking, and remember the
    answer as the gateway would. None, or why there is no answer."""
    source = issuer.introspection
    assert source is not None
    try:
        if source.endpoint is None:
            source.endpoint = discover(source.config, get)
        source.calls += 1
        answer = call(source.config, source.endpoint, token, post)
    except IntrospectionFailed as e:
        source.failed(str(e), now)
        return str(e)
    source.succeeded()
    _answered(issuer, source, token_digest(token), answer, now)
    return None
