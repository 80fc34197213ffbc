"""The Redis rate-limit store: the GCRA state of `authgate.core.ratelimit`
shared by every gateway process and machine that points at one Redis.

A request is at most one round trip: `RedisStore.hit_all` has one Lua
script (EVALSHA, loaded again by redis-py on NOSCRIPT) judge all of the
request's limits, together with those of every other request that asked in
the same turn of the event loop (up to MAX_BATCH): a busy gateway pays one
round trip, one connection and one reply for many requests, not one each.
The script judges the requests one after another, as separate calls would
be; it reads Redis's own clock (`TIME`), so gateways with skewed clocks still
agree, applies GCRA exactly as `core.ratelimit.gcra` does, and is all or
nothing for each request: when any of its limits denies, nothing of it is
written (a refused request uses no quota). Each counted key is stored with a TTL equal to the
time until its quota is fully back, so idle keys vanish by themselves.

Times in the script are integer microseconds: Lua numbers are doubles, and a
nanosecond epoch (~1.7e18) is beyond their 2**53 exact range; a microsecond
epoch (~1.7e15) is not. The emission interval is rounded down to a whole
microsecond, so a burst of N is exactly N. A rate above one request a
microsecond (more than 1000000/second, 60000000/minute, ...; the core takes
up to one a nanosecond) would round to zero, which the script cannot divide
by: it is judged as one a microsecond, a pace no single key reaches through
one Redis, and its `remaining` scaled back to its own count. Retry-After and
reset are whole seconds rounded up, as in the core.

Key format: `{PREFIX}:LIMIT_ID:KEY`. The hash tag `{PREFIX}` comes first, so
a Redis Cluster computes the slot from the prefix alone and nothing a client
sends can change it. All keys of one request must be in one slot for one
script, and requests share keys in ever-changing combinations (an IP limit
with a per-subject limit, ...), so every key of a prefix is in one slot: a
Cluster serves one prefix from one shard. Different prefixes (one per tenant
or gateway fleet) spread over shards. LIMIT_ID and KEY are escaped (`%`, `:`,
`{`, `}` as `%XX`; text longer than 200 bytes as `%h` + its SHA-256), so any
text (colons, braces, unicode, stray surrogates) maps to one key and no two
texts to the same key.

Failure: every problem (timeout, refused connection, authentication, a reply
of the wrong shape) raises `stores.StoreUnavailable` with the reason as its
text, within `timeout` seconds (socket timeouts, and `asyncio.timeout` as
the hard bound; a batch fails as one). A `Breaker` stops calling a Redis that keeps failing:
after `threshold` consecutive failures it opens for a cool-down (1 s,
doubling to 30 s), during which `hit_all` raises at once; then one probe is
let through, and its success closes the breaker. What to answer without the store is the
gateway's policy (`on_store_error`), not this module's.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from authgate.core.model import Ban
from authgate.core.ratelimit import Hit, Rate, Verdict
from authgate.core.watch import Observation
from authgate.runtime.stores import BanTable, Counted, StoreUnavailable

# A request waiting for a script run: its keys, its part of ARGV, its number
# of hits, and where its verdicts go.
_Waiting = tuple[list[bytes], list[str], int, "asyncio.Future[list[Verdict]]"]

__all__ = ["Breaker", "RedisStore", "StoreURL", "StoreUnavailable", "parse_store_url", "store_key"]

PASSWORD_ENV = "AUTHGATE_REDIS_PASSWORD"
DEFAULT_PORT = 6379
US = 1_000_000
MAX_BATCH = 64  # requests judged in one script run, at most

# One run judges a batch of requests, one after another (see `_run`). KEYS:
# every request's keys, one per hit, in order. ARGV, per request: the time in
# microseconds, or "" for Redis's clock (the override is for tests and
# replays); "1" to count, "0" to only read; its number of hits; then per hit
# its emission interval and its period, in µs. Reply: per hit of every
# request, allowed (0/1), remaining, retry_after, reset.
_SCRIPT = """
local function idiv(a, b)
  -- floor(a / b) for integers, corrected where the double quotient rounds
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function ceil_s(us) return idiv(us + 999999, 1000000) end

local clock
local out = {}
local k, a = 0, 1
while a <= #ARGV do
  local now
  if ARGV[a] ~= '' then
    now = tonumber(ARGV[a])
  else
    if not clock then
      local t = redis.call('TIME')
      clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
    end
    now = clock
  end
  local consume = ARGV[a + 1] == '1'
  local n = tonumber(ARGV[a + 2])
  local new, ok = {}, true
  for i = 1, n do
    local interval = tonumber(ARGV[a + 1 + 2 * i])
    local period = tonumber(ARGV[a + 2 + 2 * i])
    local tat = tonumber(redis.call('GET', KEYS[k + i]) or '') or now
    if tat < now then tat = now end
    local new_tat = tat + interval
    local allow_at = new_tat - period
    local m = #out
    if allow_at > now then
      ok = false
      out[m + 1] = 0
      out[m + 2] = 0
      out[m + 3] = math.max(1, ceil_s(allow_at - now))
      out[m + 4] = math.max(1, ceil_s(tat - now))
    else
      out[m + 1] = 1
      out[m + 2] = idiv(now - allow_at, interval)
      out[m + 3] = 0
      out[m + 4] = ceil_s(new_tat - now)
    end
    new[i] = new_tat
  end
  if ok and consume then
    for i = 1, n do
      local ttl = math.max(1, idiv(new[i] - now + 999, 1000))
      redis.call('SET', KEYS[k + i], string.format('%d', new[i]), 'PX', ttl)
    end
  end
  k = k + n
  a = a + 3 + 2 * n
end
return out
"""


# The watch (`watch:`, core/watch.py): one script per denial counts all its
# observations and sets what they call for, so that of several gateways
# exactly one sees a key reach its threshold (one event, one ban).
# KEYS: the bans (a sorted set: key -> end in µs), their details (a hash:
# key -> "ACTION WATCH"), their version (a counter, incremented with every
# change), then one window per observation (a sorted set: member -> last
# seen in µs). ARGV[1]: the time in µs, or "" for Redis's clock; ARGV[2]:
# "1" to act, "0" to count only (report mode); then per observation: member,
# threshold, window (µs), action (ban, throttle or none), its length (µs),
# the key it acts on, the watch's name.
# Reply, per observation: count, reached (1/0), the ban in force on its key
# ("ACTION WATCH", or "" when none was set), its µs left.
_WATCH_SCRIPT = """
local function int(x) return string.format('%d', x) end
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local act = ARGV[2] == '1'
local out, changed = {}, false
for i = 4, #KEYS do
  local j = 3 + (i - 4) * 7
  local key = KEYS[i]
  local member, threshold, window = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local action, length, target, name = ARGV[j + 3], tonumber(ARGV[j + 4]), ARGV[j + 5], ARGV[j + 6]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now - window))
  redis.call('ZADD', key, int(now), member)
  local count = redis.call('ZCARD', key)
  local ban, left = '', 0
  if count >= threshold then
    redis.call('DEL', key)
    if act and action ~= 'none' then
      local old_end = tonumber(redis.call('ZSCORE', KEYS[1], target) or '0')
      local old = redis.call('HGET', KEYS[2], target) or ''
      local old_action = string.match(old, '^(%S+)') or ''
      if old_end > now and old_end >= now + length and (old_action == 'ban' or action ~= 'ban') then
        ban, left = old, old_end - now
      else
        ban, left = action .. ' ' .. name, length
        redis.call('ZADD', KEYS[1], int(now + length), target)
        redis.call('HSET', KEYS[2], target, ban)
        changed = true
      end
    end
  else
    redis.call('PEXPIRE', key, int(math.floor(window / 1000) + 1))
  end
  out[#out + 1] = int(count)
  out[#out + 1] = count >= threshold and '1' or '0'
  out[#out + 1] = ban
  out[#out + 1] = int(left)
end
if changed then
  for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now))) do
    redis.call('HDEL', KEYS[2], k)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now))
  redis.call('INCR', KEYS[3])
end
return out
"""

# The bans in force, for a gateway's table. KEYS: bans, details, version.
# ARGV[1]: the version the gateway has ("" for any); ARGV[2]: the time in µs
# or "". Reply: version, now (µs), then per ban: key, end (µs), "ACTION WATCH";
# only version and now when the version is the one the gateway has.
_BANS_SCRIPT = """
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local at = string.format('%d', now)
local version = redis.call('GET', KEYS[3]) or '0'
local out = {version, at}
if version == ARGV[1] then return out end
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. at, '+inf', 'WITHSCORES')
for i = 1, #items, 2 do
  out[#out + 1] = items[i]
  out[#out + 1] = items[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], items[i]) or ''
end
return out
"""

# Lift a ban. KEYS: bans, details, version; ARGV[1]: the key. Reply: 1 when a
# ban in force was lifted, else 0.
_LIFT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local old_end = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if removed > 0 then redis.call('INCR', KEYS[3]) end
if old_end > now then return 1 end
return 0
"""


# --- the URL ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A parsed `redis://` or `rediss://` URL. `str()` hides the password."""

    tls: bool
    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        user = self.username or ""
        auth = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{self.port}/{self.db}"


def parse_store_url(text: str) -> StoreURL:
    """`redis://[USER[:PASSWORD]@]HOST[:PORT][/DB]` (or `rediss://` for TLS)
    -> a StoreURL; ValueError with the problem otherwise."""
    shown = _redact(text)
    expected = "expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB"
    if not text or text != text.strip() or any(c.isspace() for c in text):
        raise ValueError(f"bad store URL {shown!r}: {expected} (no spaces)")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"bad store URL {shown!r}: unknown scheme {parts.scheme!r}; {expected}")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"bad store URL {shown!r}: query strings and fragments are not supported")
    host = parts.hostname
    if not host:
        raise ValueError(f"bad store URL {shown!r}: no host; {expected}")
    try:
        port = DEFAULT_PORT if parts.port is None else parts.port
    except ValueError:
        raise ValueError(f"bad store URL {shown!r}: the port must be 1-65535") from None
    if port == 0:
        raise ValueError(f"bad store URL {shown!r}: the port must be 1-65535")
    path = parts.path.strip("/") if parts.path != "/" else ""
    if path and not (path.isdigit() and path.isascii() and len(path) <= 9):
        raise ValueError(f"bad store URL {shown!r}: the path must be a database number (/0)")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return StoreURL(scheme == "rediss", host, port, int(path or 0), username, password)


def _redact(text: str) -> str:
    """The URL for messages, without its password."""
    head, sep, rest = text.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return text
    auth, _, tail = rest.partition("@")
    user = auth.split(":", 1)[0]
    return f"{head}://{user}:***@{tail}" if ":" in auth else text


# --- keys -------------------------------------------------------------------------

_MAX_PART = 200


def _escape(text: str) -> bytes:
    """Injective and free of `:`, `{` and `}`: those and `%` become `%XX`;
    long text becomes `%h` + SHA-256 (no escaped text starts a `%h`).
    `surrogatepass` keeps undecodable header bytes distinct from real text."""
    raw = text.encode("utf-8", "surrogatepass")
    out = (
        raw.replace(b"%", b"%25").replace(b":", b"%3A").replace(b"{", b"%7B").replace(b"}", b"%7D")
    )
    if len(out) > _MAX_PART:
        return b"%h" + hashlib.sha256(raw).hexdigest().encode()
    return out


def store_key(prefix: str, limit_id: str, key: str) -> bytes:
    """The Redis key of one limit and subject: `{PREFIX}:LIMIT_ID:KEY`."""
    return b"{" + prefix.encode() + b"}:" + _escape(limit_id) + b":" + _escape(key)


def watch_key(prefix: str, watch_id: str, key: str) -> bytes:
    """The Redis key of one watch's window for one key: `{PREFIX}:watch:ID:KEY`
    (one part more than any limit's key, so the two never meet)."""
    return b"{" + prefix.encode() + b"}:watch:" + _escape(watch_id) + b":" + _escape(key)


def _member(text: str) -> bytes:
    """A window's member: a path, or a fresh id (long text as its digest)."""
    raw = text.encode("utf-8", "surrogatepass")
    return raw if len(raw) <= _MAX_PART else b"%h" + hashlib.sha256(raw).hexdigest().encode()


def _check_prefix(prefix: str) -> str:
    if not prefix or not prefix.isascii() or any(c in prefix for c in "{}: \t\r\n"):
        raise ValueError(f"bad store prefix {prefix!r}: use letters, digits, '-', '_' or '.'")
    return prefix


# --- the circuit breaker --------------------------------------------------------

State = Literal["closed", "open", "half_open"]


class Breaker:
    """Stops calling a store that keeps failing. Pure: the caller asks
    `allow()` before a call and reports `success()` or `failure(text)` after
    it (or `abandon()` when the call was cancelled with no answer either way).

    closed: every call goes through; `threshold` consecutive failures open it.
    open: no call for `cooldown` seconds (doubling on each failed probe, up to
    `max_cooldown`); then half_open: one probe call goes through; its success
    closes the breaker, its failure opens it again.
    """

    def __init__(
        self,
        threshold: int = 3,
        cooldown: float = 1.0,
        max_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = max(1, threshold)
        self.base_cooldown = cooldown
        self.max_cooldown = max(cooldown, max_cooldown)
        self.clock = clock
        self.cooldown = cooldown
        self.consecutive = 0
        self.errors = 0  # failures, all time
        self.rejected = 0  # calls refused while open
        self.opened = 0  # times it opened
        self.last_error = ""
        self._state: State = "closed"
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> State:
        if self._state == "open" and self.clock() - self._opened_at >= self.cooldown:
            return "half_open"
        return self._state

    def retry_in(self) -> float:
        """Seconds until a probe may go (0 unless open)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self.clock())

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._state = "half_open"
            self._probing = True
            return True
        self.rejected += 1
        return False

    def success(self) -> None:
        self._state = "closed"
        self._probing = False
        self.consecutive = 0
        self.cooldown = self.base_cooldown

    def failure(self, text: str) -> None:
        self.errors += 1
        self.consecutive += 1
        self.last_error = text
        if self._state == "half_open":
            # The probe failed: wait longer before the next one.
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open()
        elif self._state == "closed" and self.consecutive >= self.threshold:
            self._open()

    def abandon(self) -> None:
        """A call ended with no answer (cancelled): let another probe go."""
        self._probing = False

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self.clock()
        self._probing = False
        self.opened += 1

    def snapshot(self) -> dict[str, Any]:
        """For /status and metrics."""
        return {
            "state": self.state,
            "errors": self.errors,
            "consecutive_errors": self.consecutive,
            "rejected": self.rejected,
            "opened": self.opened,
            "cooldown_s": self.cooldown,
            "last_error": self.last_error,
        }


# --- the store --------------------------------------------------------------------


class RedisStore:
    """GCRA state in Redis, shared by every gateway using the same Redis and
    prefix. Create with `from_url`; use from one event loop (redis-py's
    asyncio connections belong to the loop that opened them)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        timeout: float,
        prefix: str = "authgate",
        breaker: Breaker | None = None,
        where: str = "redis",
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.prefix = _check_prefix(prefix)
        self.breaker = breaker or Breaker()
        self.where = where  # the URL without its password, for messages
        self._script = client.register_script(_SCRIPT)
        self._batch: list[_Waiting] | None = None  # requests for the next script run
        self._sending: set[asyncio.Task[None]] = set()
        self._watch_script = client.register_script(_WATCH_SCRIPT)
        self._bans_script = client.register_script(_BANS_SCRIPT)
        self._lift_script = client.register_script(_LIFT_SCRIPT)
        brace = b"{" + self.prefix.encode() + b"}:watch:"
        self._ban_keys = [brace + b"bans", brace + b"ban-info", brace + b"version"]

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 0.05,
        prefix: str = "authgate",
        max_connections: int = 64,
        breaker: Breaker | None = None,
    ) -> RedisStore:
        """A store for `url` (see `parse_store_url`); the password comes from
        the URL, else from $AUTHGATE_REDIS_PASSWORD. Connects lazily."""
        u = parse_store_url(url)
        password = u.password if u.password is not None else (os.environ.get(PASSWORD_ENV) or None)
        kwargs: dict[str, Any] = {}
        if u.tls:
            kwargs.update(
                connection_class=aioredis.SSLConnection,
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
            )
        pool = aioredis.BlockingConnectionPool(
            host=u.host,
            port=u.port,
            db=u.db,
            username=u.username,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry on a broken connection only: a pooled
            # connection is stale after a Redis restart or failover. None on
            # timeouts: that would double the wait, and the breaker and the
            # gateway's fallback decide what a failure means.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            max_connections=max_connections,
            timeout=timeout,  # waiting for a free connection
            **kwargs,
        )
        client = aioredis.Redis.from_pool(pool)  # the client owns the pool: close() closes both
        shown = str(StoreURL(u.tls, u.host, u.port, u.db, u.username, password))
        return cls(client, timeout=timeout, prefix=prefix, breaker=breaker, where=shown)

    async def hit_all(self, hits: Sequence[Hit], consume: bool = True) -> list[Verdict]:
        """All of a request's limits in one script run, by Redis's clock;
        nothing counted when one denies. StoreUnavailable on any failure."""
        return await self._run(hits, consume, "")

    async def hit_all_at(
        self, hits: Sequence[Hit], now_us: int, consume: bool = True
    ) -> list[Verdict]:
        """`hit_all` at a given time (integer microseconds) instead of Redis's
        clock: for tests that compare with the core on a fixed timeline."""
        return await self._run(hits, consume, str(int(now_us)))

    async def _run(self, hits: Sequence[Hit], consume: bool, now: str) -> list[Verdict]:
        if not hits:
            return []
        if not self.breaker.allow():
            raise StoreUnavailable(
                f"circuit open after {self.breaker.consecutive} errors "
                f"(next try in {self.breaker.retry_in():.1f} s; last: {self.breaker.last_error})"
            )
        args: list[str] = [now, "1" if consume else "0", str(len(hits))]
        for h in hits:
            interval = max(1, h.rate.period * US // h.rate.count)  # see the module's doc
            args += [str(interval), str(h.rate.period * US)]
        loop = asyncio.get_running_loop()
        judged = loop.create_future()
        batch = self._batch
        if batch is None or len(batch) >= MAX_BATCH:
            batch = self._batch = []
            # A Task made directly starts at the loop's next turn, with the
            # requests of this one in its batch. loop.create_task would not
            # wait under an eager task factory (mitmproxy 12 sets one): the
            # batch would run, empty, before this request joined it.
            # And a watchdog: the run answers within the timeout; this is for a
            # fault here (a run that ends, or never starts, without answering),
            # so that no request ever hangs on it. It fires whatever happened
            # (answered requests are skipped): cheaper than tracking it.
            loop.call_at(loop.time() + 2 * self.timeout, _expire, batch, self.where)
            sending = asyncio.Task(self._send(batch), loop=loop)
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)
        batch.append(
            (
                [store_key(self.prefix, h.limit_id, h.key) for h in hits],
                args,
                len(hits),
                judged,
            )
        )
        verdicts: list[Verdict] = await judged
        return [_own_count(v, h.rate) for v, h in zip(verdicts, hits, strict=True)]

    async def _send(self, batch: list[_Waiting]) -> None:
        try:
            await self._run_batch(batch)
        finally:
            _expire(batch, self.where)  # what the run left unanswered: a fault

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        """Judge the requests of `batch` in one script run: those that asked
        while this task waited to start (one turn of the event loop), up to
        MAX_BATCH. Each gets its verdicts, or StoreUnavailable."""
        if self._batch is batch:
            self._batch = None  # closed: the next request starts another
        batch = [waiting for waiting in batch if not waiting[3].done()]  # gone: not counted
        if not batch:
            return
        keys: list[bytes] = []
        args: list[str] = []
        for request_keys, request_args, _, _ in batch:
            keys += request_keys
            args += request_args
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._script(keys=keys, args=args)
            verdicts = _verdicts(reply, len(keys))
        except asyncio.CancelledError:
            self.breaker.abandon()
            for _, _, _, judged in batch:
                judged.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the contract: any failure is StoreUnavailable
            reason = self._reason(e)
            self.breaker.failure(reason)
            for _, _, _, judged in batch:
                if not judged.done():  # not cancelled (its client went away)
                    failed = StoreUnavailable(reason)
                    failed.__cause__ = e
                    judged.set_exception(failed)
            return
        self.breaker.success()
        at = 0
        for _, _, n, judged in batch:
            if not judged.done():
                judged.set_result(verdicts[at : at + n])
            at += n

    # --- the watch ----------------------------------------------------------------

    async def watch(self, observations: Sequence[Observation], act: bool) -> list[Counted]:
        """Count a denial's observations in one script run, by Redis's clock
        (see `_WATCH_SCRIPT`). StoreUnavailable on any failure."""
        return await self._watch(observations, act, "")

    async def watch_at(
        self, observations: Sequence[Observation], act: bool, now_us: int
    ) -> list[Counted]:
        """`watch` at a given time (integer microseconds), for tests."""
        return await self._watch(observations, act, str(int(now_us)))

    async def _watch(
        self, observations: Sequence[Observation], act: bool, now: str
    ) -> list[Counted]:
        if not observations:
            return []
        keys = list(self._ban_keys)
        args: list[str | bytes] = [now, "1" if act else "0"]
        for o in observations:
            spec = o.spec
            keys.append(watch_key(self.prefix, spec.watch_id, o.key))
            args += [
                _member(o.member),
                str(spec.threshold),
                str(spec.window * US),
                spec.action,
                str(spec.duration * US),
                o.key.encode("utf-8", "surrogatepass"),
                spec.name,
            ]
        reply = await self._call(self._watch_script(keys=keys, args=args))
        clock = time.time()
        try:
            if not isinstance(reply, list) or len(reply) != 4 * len(observations):
                raise ValueError(f"expected {4 * len(observations)} items, got {reply!r:.100}")
            out = []
            for i in range(0, len(reply), 4):
                count, reached, ban, left = (_text(x) for x in reply[i : i + 4])
                action, _, name = ban.partition(" ")
                out.append(
                    Counted(
                        int(count),
                        reached == "1",
                        Ban(action, name, clock + int(left) / US) if ban else None,
                    )
                )
        except ValueError as e:
            self.breaker.failure(str(e))
            raise StoreUnavailable(f"{self.where}: bad reply ({e})") from e
        return out

    async def bans(self, version: str) -> BanTable | None:
        """The bans in force (their ends in this process's clock), or None
        when Redis's version of them is still `version`."""
        return await self._bans(version, "")

    async def bans_at(self, version: str, now_us: int) -> BanTable | None:
        return await self._bans(version, str(int(now_us)))

    async def _bans(self, version: str, now: str) -> BanTable | None:
        reply = await self._call(self._bans_script(keys=self._ban_keys, args=[version, now]))
        clock = time.time()
        try:
            if not isinstance(reply, list) or len(reply) < 2 or (len(reply) - 2) % 3:
                raise ValueError(f"expected a version, a time and bans, got {reply!r:.100}")
            items = [_text(x) for x in reply]
            if items[0] == version:
                return None
            at = int(items[1])
            bans: dict[str, Ban] = {}
            for i in range(2, len(items), 3):
                key, end, detail = items[i : i + 3]
                action, _, name = detail.partition(" ")
                bans[key] = Ban(action, name, clock + (int(float(end)) - at) / US)
        except ValueError as e:
            self.breaker.failure(str(e))
            raise StoreUnavailable(f"{self.where}: bad reply ({e})") from e
        return BanTable(items[0], bans)

    async def lift(self, key: str) -> bool:
        """End the ban on `key` in Redis (every gateway drops it at its next
        look); whether one was in force."""
        reply = await self._call(
            self._lift_script(keys=self._ban_keys, args=[key.encode("utf-8", "surrogatepass")])
        )
        return bool(reply == 1)

    async def cache_get(self, key: str) -> bytes | None:
        """A cached value (`{PREFIX}:cache:KEY`), or None. StoreUnavailable on
        any failure, as for `hit_all` (the same breaker and timeout)."""
        reply = await self._call(self.client.get(store_key(self.prefix, "cache", key)))
        if reply is not None and not isinstance(reply, bytes):
            raise StoreUnavailable(f"{self.where}: bad reply to GET ({type(reply).__name__})")
        return reply

    async def cache_put(self, key: str, value: bytes, ttl: float) -> None:
        """Cache a value for `ttl` seconds (at least a millisecond)."""
        ms = max(1, int(ttl * 1000))
        await self._call(self.client.set(store_key(self.prefix, "cache", key), value, px=ms))

    async def _call(self, command: Awaitable[Any]) -> Any:
        """One command or script run within the timeout, through the breaker."""
        if not self.breaker.allow():
            if inspect.iscoroutine(command):
                command.close()
            raise StoreUnavailable(
                f"circuit open after {self.breaker.consecutive} errors "
                f"(next try in {self.breaker.retry_in():.1f} s; last: {self.breaker.last_error})"
            )
        try:
            async with asyncio.timeout(self.timeout):
                reply = await command
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except Exception as e:  # noqa: BLE001 - the contract: any failure is StoreUnavailable
            reason = self._reason(e)
            self.breaker.failure(reason)
            raise StoreUnavailable(reason) from e
        self.breaker.success()
        return reply

    def _reason(self, e: BaseException) -> str:
        ms = round(self.timeout * 1000)
        if isinstance(e, asyncio.TimeoutError | RedisTimeoutError):
            return f"{self.where}: no answer within {ms} ms"
        if isinstance(e, AuthenticationError):
            if not self.client.connection_pool.connection_kwargs.get("password"):
                return (
                    f"{self.where}: authentication failed: Redis wants a password and none "
                    f"was given (put it in the URL or in ${PASSWORD_ENV})"
                )
            return f"{self.where}: authentication failed ({e})"
        if isinstance(e, RedisConnectionError | OSError):
            return f"{self.where}: cannot connect ({e})"
        if isinstance(e, RedisError):
            return f"{self.where}: {type(e).__name__}: {e}"
        return f"{self.where}: bad reply ({e})"

    async def ping(self) -> bool:
        """Whether Redis answers within the timeout (the breaker is not
        consulted nor changed: this is for /ready and /status)."""
        try:
            return bool(await asyncio.wait_for(self.client.ping(), self.timeout))
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False

    async def close(self) -> None:
        if self._sending:  # script runs under way: each ends within the timeout
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self.client.aclose()

    def health(self) -> dict[str, object]:
        """For /status: the address (no password), the prefix and the breaker."""
        return {"url": self.where, "prefix": self.prefix, **self.breaker.snapshot()}


def _expire(batch: list[_Waiting], where: str) -> None:
    """The watchdog of a script run that has not answered in twice the
    timeout: its requests get StoreUnavailable."""
    for _, _, _, judged in batch:
        if not judged.done():
            judged.set_exception(StoreUnavailable(f"{where}: no answer from the script run"))


def _text(value: object) -> str:
    """A script's reply item as text (redis-py gives bytes, or int for numbers)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogatepass")
    if isinstance(value, int | str):
        return str(value)
    raise ValueError(f"unexpected item {value!r:.60}")


def _own_count(verdict: Verdict, rate: Rate) -> Verdict:
    """A rate above one request a µs was judged as one a µs (see the module's
    doc): its remaining, scaled back to its own count (the same share left)."""
    us = rate.period * US
    if rate.count <= us:
        return verdict
    return replace(verdict, remaining=verdict.remaining * rate.count // us)


def _verdicts(reply: object, n: int) -> list[Verdict]:
    """The script's flat reply -> one Verdict per hit; ValueError on any other shape."""
    if not isinstance(reply, list) or len(reply) != 4 * n:
        raise ValueError(f"expected {4 * n} integers, got {reply!r:.100}")
    if not all(type(v) is int and v >= 0 for v in reply):
        raise ValueError(f"expected non-negative integers, got {reply!r:.100}")
    out = []
    for i in range(0, 4 * n, 4):
        allowed, remaining, retry, reset = reply[i : i + 4]
        if allowed not in (0, 1):
            raise ValueError(f"expected 0 or 1 for allowed, got {allowed!r}")
        out.append(Verdict(allowed == 1, remaining, retry, reset))
    return out
