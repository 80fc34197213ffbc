"""The judging layer both doors share: the mitmproxy addon (`proxy/`) and the
decision service (`service/`). Nothing here knows mitmproxy or HTTP servers:
a door turns what arrives into a `RequestView`, asks `judge`, and turns the
`Decision` back into an answer; the house keeps everything else.

- the policy keeper: load, reload in a thread, the last good policy on a
  failed reload, file watching, fetched key sets carried over;
- judging with the rate-limit store (memory or shared) and the slow work a
  credential needs (bcrypt in a thread, a key fetch joined);
- the decision log, the metrics, report-mode counts, request ids;
- the watch (`watch:`): denials counted in the store, its events, and the
  bans in force (a table in memory, kept in step with Redis when shared);
- traces (`authgate_otlp`): the spans of the store round trip and the slow
  work (the doors start the request's and the decision's);
- the requests in flight, draining, readiness, the admin listener, status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import heapq
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from authgate.core.credentials import BASIC, KeyFetch, PasswordCheck
from authgate.core.decision import (
    FORBIDDEN,
    RATE_LIMITED,
    Decision,
    Prepared,
    RequestView,
    decide,
    prepare,
)
from authgate.core.introspection import Introspect
from authgate.core.ipset import normalize_ip, parse_ip
from authgate.core.model import (
    Ban,
    Policy,
    WatchSpec,
    credentials_in_clear,
    secrets_readable_by_others,
)
from authgate.core.oidc import CodeExchange, SessionRefresh
from authgate.core.ratelimit import ALLOWED, Hit, Recorder, Verdict
from authgate.core.watch import Observation, observations, stronger
from authgate.house.admin import AdminServer, Readiness
from authgate.house.workers import write_status
from authgate.policy.load import load_policy
from authgate.policy.marks import PolicyError
from authgate.runtime.introspection import Introspector
from authgate.runtime.jwks import Fetcher
from authgate.runtime.metrics import Metrics
from authgate.runtime.oidc import LoginClient
from authgate.runtime.reload import Fingerprint, carry_over, fingerprint
from authgate.runtime.stores import Counted, MemoryStore, MemoryWatch, SharedStore, StoreUnavailable
from authgate.runtime.tracing import Attributes, open_tracing, traced, traces_url

if TYPE_CHECKING:
    from authgate.runtime.otel import Tracing

logger = logging.getLogger("authgate")
# The decision log's encoder: one line, keys in the entry's order.
_LINE = json.JSONEncoder(separators=(",", ":"))
# A limit with `on_store_error: deny` while the shared store is away.
STORE_DENIED = Verdict(False, 0, 1, 1)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
# How often a gateway reads the bans from a shared store (one small script;
# the whole table only when it changed): a ban set by another gateway is
# enforced here within about this long.
BAN_SYNC_SECONDS = 0.5
_FULL_SYNC_EVERY = 20  # polls; then the table is read whatever its version says
MAX_STATUS_BANS = 1000  # bans in /status (and a worker's status file); /bans has all
# How much of a denial's detail and of a Basic user name the log keeps.
_DETAIL_CHARS = 200
_USER_CHARS = 64


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A key reached a watch's threshold: what the decision log and the
    metrics say, and the flow's mark. `ban`: the ban in force on the key
    after it (None: the watch acts not, or report mode)."""

    spec: WatchSpec
    key: str
    count: int
    ban: Ban | None
    report: bool  # report mode: counted and told, never acted on

    @property
    def action(self) -> str:
        """`ban 600s`, `throttle 300s` or `none`: what was done."""
        return "none" if self.report else self.spec.acts

    def text(self) -> str:
        """One line for a flow's comment and the log."""
        what = self.spec.counts.replace("_", " ")
        done = (
            f"would {self.spec.acts}" if self.report and self.spec.action != "none" else self.action
        )
        return (
            f"watch {self.spec.name}: {self.key} reached {self.count} {what} "
            f"in {self.spec.window}s: {done}"
        )


def ban_key(text: str) -> str:
    """A key as the admin gives it: `ip:ADDRESS` in the canonical form of
    the address (`ip:::ffff:10.0.0.1` is `ip:10.0.0.1`), else as it is."""
    kind, sep, rest = text.partition(":")
    if kind == "ip" and sep:
        try:
            return f"ip:{normalize_ip(rest)}"
        except ValueError:
            return text
    return text


# Why a door that does not ask for client certificates refuses authn.mtls.
NO_CLIENT_CERTS = (
    "this gateway does not ask clients for certificates: run it with --tls-cert, "
    "--tls-key and --tls-client-ca"
)


def load_checked(
    path: str, keep_host_header: bool, mode: str = "", no_client_certs: str = ""
) -> Policy:
    """Load a policy and check it against how the door runs, with the
    deployment's mode override. `no_client_certs`: why the door sees no
    client certificates ("" when it does). Raises PolicyError."""
    policy = load_policy(path)
    if mode:
        policy = dataclasses.replace(policy, mode_override=mode)
    if policy.uses_host and not keep_host_header:
        raise PolicyError(
            path,
            None,
            "rules match on host, but in reverse mode mitmproxy replaces the "
            "client's Host unless keep_host_header=true is set",
        )
    if policy.mtls is not None and no_client_certs:
        # Rules that accept only certificates would answer 401 to everyone.
        raise PolicyError(policy.file, policy.mtls.line or None, f"authn.mtls: {no_client_certs}")
    return policy


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _ids(batch: int = 256) -> Callable[[], str]:
    """Request ids: 128 random bits as 32 hex digits, unguessable (a counter
    would tell every client how many requests the gateway serves). The
    randomness is read `batch` ids at a time: one os.urandom per request cost
    the event loop about 3%."""
    pending: list[str] = []
    # A forked child must not hand out its parent's ids.
    os.register_at_fork(after_in_child=pending.clear)

    def new_id() -> str:
        if not pending:
            data = os.urandom(16 * batch).hex()
            pending.extend(data[i : i + 32] for i in range(0, len(data), 32))
        return pending.pop()

    return new_id


new_request_id = _ids()


def request_id(policy: Policy | None, incoming: list[str], peer: str) -> str:
    """The request's id: a well-formed X-Request-Id from a trusted proxy, or a
    new one (a client could otherwise pick ids to confuse the logs)."""
    if policy is not None and len(incoming) == 1 and _REQUEST_ID.match(incoming[0]):
        try:
            family, value = parse_ip(peer)
        except ValueError:
            family, value = 0, 0
        if family and policy.trusted_proxies.contains(family, value):
            return incoming[0]
    return new_request_id()


class Gatehouse:
    """One per process and door: the policy, the store, the log, the metrics."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.policy: Policy | None = None
        self.limiter = MemoryStore()
        self.shared: SharedStore | None = None  # None: counts in this process's memory
        self.store_url = "memory"
        self._store_down = False
        self.admin: AdminServer | None = None
        self.draining = False
        self.in_flight: set[object] = set()  # requests judged and not yet answered
        self.decided = 0  # decisions made by this process
        self.clock = clock
        self.fetcher = Fetcher()
        # The watch: bans in force by key (what the core reads), the windows
        # when they are counted here, and while the table is being read from a
        # shared store, the changes made meanwhile (replayed on the new table).
        self.bans: dict[str, Ban] = {}
        self.watching = MemoryWatch()
        self._ban_version = ""
        self._ban_polls = 0
        self._meanwhile: list[tuple[str, Ban | None]] | None = None
        self._watch_alone = False  # the shared store cannot answer: counting here
        self._loop: asyncio.AbstractEventLoop | None = None
        self.logins = LoginClient(self.fetcher)  # the OpenID Connect login's calls
        self.introspector = Introspector(clock, shared=lambda: self.shared)
        self.tracing: Tracing | None = None  # None: no traces, nothing of OpenTelemetry imported
        self.metrics = Metrics(lambda: self.policy, lambda: self.bans)
        self.would_deny: dict[str, int] = {}
        self.loaded_at = 0.0
        self.reload_error: str | None = None
        self.reloads = 0
        self.watch = True  # reload when a file of the policy changes
        # Where the policy comes from: (file, keep_host_header, mode override).
        self.source: tuple[str, bool, str] = ("", False, "")
        # Why the door sees no client certificates ("": it does; authn.mtls).
        self.no_client_certs = NO_CLIENT_CERTS
        # What a door adds to `status()` (the proxy: its backend lint).
        self.more_status: Callable[[], dict[str, Any]] = dict
        self._log_file: IO[str] | None = None
        self._log_terminal = False  # authgate_log=-: decisions to the log
        self._fingerprint: Fingerprint = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._reloading: asyncio.Lock | None = None
        self._bcrypt_slots = asyncio.Semaphore(2)  # bcrypt is CPU-bound: two at a time
        # The key of the log's credential fingerprints: random, this process's
        # alone and never written anywhere, so a fingerprint tells two
        # attempts apart and cannot be turned back into the credential.
        self._credential_key = os.urandom(32)

    # --- configuration (plain values; each raises what is wrong) --------------------

    def load(self, path: str, keep_host_header: bool, mode: str) -> None:
        """Load the policy now. Raises PolicyError (the old one stays)."""
        policy = load_checked(path, keep_host_header, mode, self.no_client_certs)
        self.source = (path, keep_host_header, mode)
        self._install(policy, "loaded")

    def set_mode(self, mode: str) -> None:
        path, keep_host, _ = self.source
        self.source = (path, keep_host, mode)
        if self.policy is not None:
            self.policy = dataclasses.replace(self.policy, mode_override=mode)

    def open_log(self, spec: str) -> None:
        """'' (none), '-' (the log) or a file to append one line per decision
        to. Raises OSError."""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._log_terminal = spec == "-"
        if spec and not self._log_terminal:
            self._log_file = open(spec, "a", buffering=1)  # noqa: SIM115

    def configure_store(self, url: str, timeout: float) -> None:
        """memory, or redis://... Raises ValueError."""
        old = self.shared
        if url in ("", "memory"):
            self.shared = None
        else:
            from authgate.runtime.redis_store import RedisStore

            self.shared = RedisStore.from_url(url, timeout=timeout)
        self.store_url = url or "memory"
        self._ban_version = ""  # read the new store's bans whole
        if old is not None:
            self._close_later(old)

    def configure_tracing(self, url: str, door: str) -> None:
        """Traces to the OTLP/HTTP collector at `url` ('' stops them). Raises
        ValueError (a bad address, or OpenTelemetry not installed)."""
        old = self.tracing
        if old is not None and url and old.endpoint == traces_url(url):
            return
        self.tracing = open_tracing(url, door) if url else None
        self.fetcher.tracing = self.tracing
        if old is not None:
            # Its last spans are exported in the background: never on the event loop.
            threading.Thread(target=old.shutdown, daemon=True).start()

    def serve_admin(self, address: str) -> None:
        """The admin listener on HOST:PORT ('' stops it). Raises OSError, ValueError."""
        if self.admin is not None:
            self.admin.stop()
            self.admin = None
        if address:
            self.admin = AdminServer(
                address, self.status, self.ready, self._metrics_text, self.list_bans, self.lift_ban
            )
            logger.info(
                f"authgate: admin on http://{address} (/live /ready /metrics /status /bans)"
            )

    def serve_metrics(self, address: str) -> None:
        """Prometheus metrics alone on HOST:PORT ('' stops). Raises OSError, ValueError."""
        self.metrics.stop()
        if address:
            self.metrics.serve(address)
            logger.info(f"authgate: metrics on http://{address}/metrics")

    # --- life ---------------------------------------------------------------------

    def start(self, listening: str | None = None) -> bool:
        """Start the background work (key fetching, file watching); call in the
        running event loop. `listening`: where the door listens in clear text,
        for the warning about credentials in clear. False without a policy."""
        if self.policy is None:
            return False
        if listening is not None:
            self.warn_in_clear(self.policy, listening)
        for file, mode, _ in secrets_readable_by_others(self.policy):
            logger.warning(
                f"authgate: the client secret file {file} can be read by other users "
                f"(mode {mode:03o}); chmod 600 {file}"
            )
        if self.policy.basic is not None:
            for user, cost in self.policy.basic.weak():
                logger.warning(
                    f"authgate: user {user!r} in {self.policy.basic.file} has bcrypt cost "
                    f"{cost:02d}; set the password again with `htpasswd -B -C 10 FILE {user}`"
                )
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._reloading = asyncio.Lock()
        self._tasks = [
            loop.create_task(self._keep_keys_fresh()),
            loop.create_task(self._watch()),
            loop.create_task(self._keep_bans()),
        ]
        if self.shared is not None:
            self._tasks.append(loop.create_task(self._say_store(self.shared)))
        return True

    @property
    def started(self) -> bool:
        return self._reloading is not None

    @staticmethod
    def warn_in_clear(policy: Policy, where: str) -> None:
        for kind, line in credentials_in_clear(policy, where):
            at = f" ({policy.file}:{line})" if line else ""
            shown = "all interfaces" if where.startswith("*:") else where
            logger.warning(
                f"authgate: {kind}{at} are accepted on {shown}; "
                "unless clients connect with TLS, they cross the network in clear text"
            )

    async def _say_store(self, store: SharedStore) -> None:
        """At start, whether the shared store answers: a Redis that is away is
        not fatal (limits fall back), but it should not go unnoticed."""
        where = store.health().get("url", self.store_url)
        if await store.ping():
            logger.info(f"authgate: rate limits are counted in {where}")
        else:
            logger.warning(
                f"authgate: the rate-limit store {where} does not answer; limits use their "
                "on_store_error (local, deny or allow) until it does"
            )

    def _close_later(self, store: SharedStore) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._tasks.append(loop.create_task(store.close()))

    def _metrics_text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.metrics.registry)

    def ready(self) -> Readiness:
        """Ready to take traffic: a policy, keys for every issuer that fetches
        them, and not draining. A shared store that is away does not make the
        gateway unready: its limits fall back (on_store_error)."""
        policy = self.policy
        if policy is None:
            return Readiness(False, ("no policy loaded",))
        reasons = [
            f"no keys yet for issuer {issuer}"
            + (f" ({remote.last_error})" if remote.last_error else "")
            for issuer, remote in policy.remote_keys
            if not remote.keys
        ]
        if self.draining:
            reasons.append("draining: shutting down")
        return Readiness(not reasons, tuple(reasons))

    async def drain(self, grace: float) -> int:
        """Wait until no request is in flight, at most `grace` seconds; the
        number still in flight then."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self.in_flight)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.introspector.close()
        self.metrics.stop()
        if self.admin is not None:
            self.admin.stop()
            self.admin = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.tracing is not None:
            self.tracing.shutdown()  # the spans still queued, exported (bounded)
            self.tracing = None
            self.fetcher.tracing = None

    # --- the policy ------------------------------------------------------------------

    def _install(self, policy: Policy, how: str) -> None:
        old = self.policy
        if old is not None:
            policy = carry_over(old, policy)
        self._fingerprint = fingerprint(policy.files)
        self.policy = policy  # one assignment: requests in flight keep the one they took
        self.loaded_at = time.time()
        self.reload_error = None
        logger.info(
            f"authgate: policy {policy.file} {how} ({len(policy.rules)} rules, "
            f"{policy.block.entries} blocked ranges, {len(policy.issuers)} issuers"
            f"{', mode ' + policy.mode if policy.mode != 'enforce' else ''})"
        )

    async def reload(self, why: str) -> bool:
        """Build the new policy in a thread and swap it in; keep the last good
        one if it does not load. True when the new policy took effect."""
        assert self._reloading is not None
        async with self._reloading:
            path, keep_host, mode = self.source
            try:
                policy = await asyncio.to_thread(
                    load_checked, path, keep_host, mode, self.no_client_certs
                )
            except PolicyError as e:
                self.reload_error = str(e)
                self.metrics.reload_failures.inc()
                # Watch what we have plus the file the error names, so fixing
                # either one triggers the next attempt.
                files = list(self.policy.files if self.policy else ()) + [e.file]
                self._fingerprint = fingerprint(files)
                logger.error(
                    f"authgate: reload ({why}) refused, the last good policy keeps serving: {e}"
                )
                return False
            self.reloads += 1
            self.metrics.reloads.inc()
            self._install(policy, f"reloaded ({why})")
            return True

    def reload_later(self, why: str) -> bool:
        """Start a reload (a command, a signal); False when not running yet."""
        if self._reloading is None:
            return False
        self._tasks.append(asyncio.get_running_loop().create_task(self._reload_task(why)))
        return True

    async def _reload_task(self, why: str) -> None:
        await self.reload(why)

    async def _watch(self) -> None:
        status_file = os.environ.get("AUTHGATE_STATUS_FILE")  # a worker of `--workers`
        lifts = os.environ.get("AUTHGATE_LIFTS_FILE")  # the supervisor's DELETE /bans/KEY
        read = _size(lifts) if lifts else 0  # lifts before this worker started are done
        while True:
            if lifts:
                read = await self._lift_from(lifts, read)
            if status_file:
                try:
                    write_status(status_file, self.status())
                except OSError as e:
                    logger.warning(f"authgate: cannot write the worker status: {e}")
            await asyncio.sleep(1.0)
            self._sweep_bans()
            if not self.watch or not self._fingerprint:
                continue
            now = await asyncio.to_thread(fingerprint, list(self._fingerprint))
            if now != self._fingerprint:
                await self.reload("a file changed")

    async def _keep_keys_fresh(self) -> None:
        """Fetch remote key sets at start and whenever they expire (or, after
        a failure, when the backoff says). Off the request path."""
        while True:
            policy = self.policy
            sources = [remote for _, remote in policy.remote_keys] if policy else []
            # Not held across the sleep below: after a reload it would keep the
            # old policy, block list and all, alive for up to a minute.
            del policy
            for source in sources:
                if source.due():
                    await self.fetcher.refresh(source)
            wait = min((s.next_attempt - s.clock() for s in sources), default=60.0)
            await asyncio.sleep(min(max(wait, 0.5), 60.0))

    def status(self) -> dict[str, Any]:
        policy = self.policy
        keys = {
            issuer: {
                "keys": len(remote.keys),
                "last_error": remote.last_error,
                "fetches": remote.fetches,
            }
            for issuer, remote in (policy.remote_keys if policy else ())
        }
        introspection = {
            i.issuer: {
                "endpoint": i.introspection.endpoint,
                "tokens": i.introspection.tokens,
                "calls": i.introspection.calls,
                "remembered": len(i.introspection),
                "shared_hits": i.introspection.shared_hits,
                "failures": i.introspection.failures_total,
                "last_error": i.introspection.last_error,
            }
            for i in (policy.issuers if policy else ())
            if i.introspection is not None
        }
        shared = self.shared
        store: dict[str, Any] = {"kind": "memory" if shared is None else "redis"}
        if shared is not None:
            store.update(shared.health())
        readiness = self.ready()
        return {
            "pid": os.getpid(),
            "worker": int(os.environ.get("AUTHGATE_WORKER", "0")),
            "ready": readiness.ready,
            "not_ready": list(readiness.reasons),
            "in_flight": len(self.in_flight),
            "decisions": self.decided,
            "store": store,
            "policy": policy.file if policy else None,
            "rules": len(policy.rules) if policy else 0,
            "mode": (policy.mode_override or policy.mode) if policy else None,
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
            "reload_error": self.reload_error,
            "would_deny": dict(sorted(self.would_deny.items())),
            "bans": self.list_bans(MAX_STATUS_BANS),
            **self.more_status(),
            "jwks": keys,
            "introspection": introspection,
        }

    # --- judging ---------------------------------------------------------------------

    def judge_now(
        self, policy: Policy, view: RequestView, now: float
    ) -> tuple[Decision, tuple[WatchEvent, ...]] | None:
        """`judge` without waiting, for the common case: limits counted in this
        process's memory and no slow work (a cached token, an API key, no
        credentials). None: the request needs `judge`. The store is touched
        only when the decision is returned. With the watch's events."""
        if self.shared is not None:
            return None
        start = time.perf_counter()
        seen = Recorder()
        bans = self.bans
        first = prepare(policy, view, now, seen, bans=bans)
        if isinstance(first, Decision):
            decision = first
        elif first.work is not None:
            return None
        else:
            decision = decide(first, self.clock(), seen)
        if seen.hits:
            told = self._told(seen.hits, self.limiter.hit_all(seen.hits, now, True))
            if told is not None:
                again = prepare(policy, view, now, told, bans=bans)
                # No slow work the first pass did not find done.
                decision = again if isinstance(again, Decision) else decide(again, now, told)
        events: tuple[WatchEvent, ...] = ()
        if not decision.allowed and policy.watch:
            found = observations(policy, decision, view.target, new_request_id)
            if found:
                counted = self.watching.count(found, time.monotonic())
                events = self._events(policy, found, counted, now)
        return self._judged(decision, start), events

    async def judge(
        self, policy: Policy, view: RequestView, now: float
    ) -> tuple[Decision, str, tuple[WatchEvent, ...]]:
        """Judge a request; its rate limits are counted in one step at the end,
        all or nothing, by the store (one round trip to a shared one). The core
        first judges as if every limit allowed, noting the limits it asks
        about; only when the store denies one does it judge again with the
        store's verdicts, so the 429 is the core's. Returns the decision,
        when a shared store could not answer what stood in for it, and the
        events of the watch (a denial counted to a threshold)."""
        start = time.perf_counter()
        seen = Recorder()
        first = prepare(policy, view, now, seen, bans=self.bans)
        note = ""
        if isinstance(first, Decision):
            decision = first
        else:
            if first.work is not None:
                if seen.hits and isinstance(first.work, PasswordCheck | Introspect | CodeExchange):
                    # Read the IP limits before spending a bcrypt or a call to
                    # a provider on the request: a client over its limit costs
                    # no hash, no introspection call and no code exchange.
                    told, note = await self._count(policy, seen.hits, now, consume=False)
                    if told is not None:
                        again = await self._again(policy, view, now, told)
                        events = await self._watch_denial(policy, again, view.target, now)
                        return self._judged(again, start), note, events
                await self._slow_work(first)
            decision = decide(first, self.clock(), seen)
        if seen.hits:
            told, note = await self._count(policy, seen.hits, now)
            if told is not None:
                decision = await self._again(policy, view, now, told)
        events = ()
        if not decision.allowed and policy.watch:  # allowed requests: not even a call
            events = await self._watch_denial(policy, decision, view.target, now)
        return self._judged(decision, start), note, events

    def _judged(self, decision: Decision, start: float) -> Decision:
        self.metrics.decision_seconds(time.perf_counter() - start)
        if decision.report:
            # Report mode: judged and logged, forwarded as if allowed.
            key = decision.rule or "-"
            self.would_deny[key] = self.would_deny.get(key, 0) + 1
            self.metrics.would_deny.labels(key, str(decision.status), decision.reason).inc()
        return decision

    async def _again(
        self,
        policy: Policy,
        view: RequestView,
        now: float,
        told: Recorder,
    ) -> Decision:
        """The decision with the store's verdicts (one of them a denial)."""
        again = prepare(policy, view, now, told, bans=self.bans)
        if isinstance(again, Decision):
            return again
        if again.work is not None:
            await self._slow_work(again)  # cached by the first pass, as a rule
        return decide(again, self.clock(), told)

    async def _count(
        self, policy: Policy, hits: list[Hit], now: float, consume: bool = True
    ) -> tuple[Recorder | None, str]:
        """Count the hits in the store: (None when all are allowed, else a
        Recorder answering with every hit's verdict; what answered instead of
        an unavailable shared store)."""
        note = ""
        shared = self.shared
        if shared is None:
            verdicts = self.limiter.hit_all(hits, now, consume)
        else:
            start = time.perf_counter()
            try:
                if self.tracing is None:
                    verdicts = await shared.hit_all(hits, consume)
                else:
                    verdicts = await self._hit_traced(shared, hits, consume)
            except StoreUnavailable as e:
                verdicts, note = self._without_store(policy, hits, now, consume, e)
            else:
                self.metrics.store_seconds.observe(time.perf_counter() - start)
                if self._store_down:
                    self._store_down = False
                    logger.warning("authgate: the rate-limit store answers again")
        return self._told(hits, verdicts), note

    async def _hit_traced(
        self, shared: SharedStore, hits: list[Hit], consume: bool
    ) -> list[Verdict]:
        """The store's round trip as the span `authgate.store`."""
        attributes: Attributes = {
            "db.system.name": "redis",
            "authgate.store.limits": len(hits),
            "authgate.store.consume": consume,
        }
        with traced(self.tracing, "authgate.store", attributes) as span:
            verdicts = await shared.hit_all(hits, consume)
            span.set_attribute("authgate.store.refused", sum(not v.allowed for v in verdicts))
            return verdicts

    def _told(self, hits: list[Hit], verdicts: list[Verdict]) -> Recorder | None:
        """None when the store allowed every hit, else a Recorder answering
        with each hit's verdict; limits close to their end counted."""
        denied = False
        for hit, verdict in zip(hits, verdicts, strict=True):
            if not verdict.allowed:
                denied = True
            elif verdict.remaining * 10 < hit.rate.count:
                self.metrics.near_limit(hit.limit_id)
        return Recorder.told(hits, verdicts) if denied else None

    def _without_store(
        self, policy: Policy, hits: list[Hit], now: float, consume: bool, e: StoreUnavailable
    ) -> tuple[list[Verdict], str]:
        """Each limit's `on_store_error` while the shared store cannot answer:
        local (this process counts, at the same rate), deny (429) or allow."""
        self.metrics.store_errors.inc()
        if not self._store_down:
            self._store_down = True
            logger.warning(
                f"authgate: the rate-limit store cannot answer ({e}); limits use their "
                "on_store_error (local, deny or allow) until it does"
            )
        modes = [
            spec.on_store_error if (spec := policy.limit_specs.get(h.limit_id)) else "local"
            for h in hits
        ]
        local = [h for h, m in zip(hits, modes, strict=True) if m == "local"]
        # A request that a `deny` limit refuses counts nowhere.
        counted = self.limiter.hit_all(local, now, consume and "deny" not in modes)
        verdicts: list[Verdict] = []
        it = iter(counted)
        for mode in modes:
            if mode == "local":
                verdicts.append(next(it))
            elif mode == "deny":
                verdicts.append(STORE_DENIED)
            else:
                verdicts.append(ALLOWED)
        used = sorted(set(modes))
        for mode in used:
            self.metrics.store_fallbacks.labels(mode).inc()
        return verdicts, ",".join(used)

    # --- the watch -------------------------------------------------------------------

    async def _watch_denial(
        self, policy: Policy, d: Decision, raw_path: str, now: float
    ) -> tuple[WatchEvent, ...]:
        """Count a denial for the policy's watches (in the shared store, or
        here when there is none or it cannot answer); the events it causes."""
        if d.allowed or not policy.watch:
            return ()
        found = observations(policy, d, raw_path, new_request_id)
        if not found:
            return ()
        counted: list[Counted] | None = None
        shared = self.shared
        if shared is not None:
            try:
                counted = await shared.watch(found, not policy.report)
            except StoreUnavailable as e:
                if not self._watch_alone:
                    self._watch_alone = True
                    logger.warning(
                        f"authgate: the watch counts and bans in this process while the store "
                        f"cannot answer ({e})"
                    )
            else:
                if self._watch_alone:
                    self._watch_alone = False
                    logger.warning("authgate: the watch counts in the store again")
        if counted is None:
            counted = self.watching.count(found, time.monotonic())
        return self._events(policy, found, counted, now)

    def _events(
        self, policy: Policy, found: tuple[Observation, ...], counted: list[Counted], now: float
    ) -> tuple[WatchEvent, ...]:
        """The events of the observations that reached their threshold, and
        the bans they set (in this process's table; a shared store has set
        them already, and says which is in force)."""
        events: list[WatchEvent] = []
        report = policy.report
        for o, c in zip(found, counted, strict=True):
            if not c.reached:
                continue
            spec = o.spec
            ban: Ban | None = None
            if not report and spec.action != "none":
                ban = c.ban or stronger(
                    self.bans.get(o.key), Ban(spec.action, spec.name, now + spec.duration)
                )
                self.bans[o.key] = ban
                if self._meanwhile is not None:
                    self._meanwhile.append((o.key, ban))
            events.append(WatchEvent(spec, o.key, c.count, ban, report))
        return tuple(events)

    async def _lift_from(self, path: str, offset: int) -> int:
        """Lift the bans the supervisor's file names past `offset` (one JSON
        string a line); the offset read up to."""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError as e:
            logger.warning(f"authgate: cannot read the bans to lift: {e}")
            return offset
        end = data.rfind(b"\n") + 1  # whole lines only
        for line in data[:end].splitlines():
            try:
                key = json.loads(line)
                if isinstance(key, str):
                    await self.lift(key)
            except (ValueError, StoreUnavailable) as e:
                logger.warning(f"authgate: cannot lift a ban ({line[:100]!r}): {e}")
        return offset + end

    def _sweep_bans(self) -> None:
        """Forget the bans that have ended."""
        now = self.clock()
        ended = [k for k, b in self.bans.items() if b.until <= now]
        for k in ended:
            del self.bans[k]

    async def _keep_bans(self) -> None:
        """With a shared store and a policy that watches, read its bans every
        BAN_SYNC_SECONDS (the whole table only when its version changed, and
        every _FULL_SYNC_EVERY polls), so that a ban another gateway sets
        (or an admin lifts) holds here too."""
        while True:
            await asyncio.sleep(BAN_SYNC_SECONDS)
            shared = self.shared
            # (No policy held across the sleep: it would keep an old one alive.)
            if shared is None or self.policy is None or not self.policy.watch:
                continue
            self._ban_polls += 1
            version = "" if self._ban_polls % _FULL_SYNC_EVERY == 0 else self._ban_version
            self._meanwhile = []
            try:
                table = await shared.bans(version)
            except StoreUnavailable:
                continue  # the bans known here stay; the next poll tries again
            finally:
                meanwhile, self._meanwhile = self._meanwhile, None
            if table is None:
                continue
            bans = table.bans
            for key, ban in meanwhile:  # set or lifted here while the table was read
                if ban is None:
                    bans.pop(key, None)
                else:
                    bans[key] = stronger(bans.get(key), ban)
            self.bans = bans
            self._ban_version = table.version

    def list_bans(self, most: int | None = None) -> list[dict[str, Any]]:
        """The bans in force by key (the first `most`), for the admin listener
        (any thread): not ended, and set by a watch the policy has (others are
        not enforced)."""
        now = self.clock()
        policy = self.policy
        names = policy.watch_names if policy is not None else frozenset()
        live = ((k, b) for k, b in dict(self.bans).items() if b.until > now and b.watch in names)
        chosen = sorted(live) if most is None else heapq.nsmallest(most, live)
        return [
            {
                "key": key,
                "action": ban.action,
                "watch": ban.watch,
                "until": round(ban.until, 3),
                "seconds_left": max(1, math.ceil(ban.until - now)),
            }
            for key, ban in chosen
        ]

    def lift_ban(self, key: str) -> str | None:
        """Lift the ban on `key` here and in the shared store: from the admin
        listener's thread. The key as lifted (`ban_key`), None when no ban
        was in force on it. Raises StoreUnavailable, TimeoutError."""
        loop = self._loop
        if loop is None or loop.is_closed():
            key = ban_key(key)
            return key if self.bans.pop(key, None) is not None else None
        future = asyncio.run_coroutine_threadsafe(self.lift(ban_key(key)), loop)
        return ban_key(key) if future.result(timeout=10) else None

    async def lift(self, key: str) -> bool:
        """Lift the ban on `key` (as `ban_key` gives it); whether one was in force."""
        old = self.bans.pop(key, None)
        lifted = old is not None and old.until > self.clock()
        if self._meanwhile is not None:
            self._meanwhile.append((key, None))
        if self.shared is not None:
            lifted = await self.shared.lift(key) or lifted
        if lifted:
            logger.warning(f"authgate: the ban on {key} was lifted (admin)")
            self._log_line({"time": round(time.time(), 3), "event": "lift", "key": key})
        return lifted

    async def _slow_work(self, prepared: Prepared) -> None:
        """What the credential needs before `decide`: a bcrypt check (in a
        thread, two at a time), a key fetch (joined, waited on at most about
        a second), an introspection call (joined, waited on at most its
        timeout), or a call to the OpenID provider (a login's code exchange,
        a session's refresh: bounded by the login's timeout)."""
        work = prepared.work
        tracing = self.tracing
        if isinstance(work, PasswordCheck) and prepared.policy.basic is not None:
            async with self._bcrypt_slots:
                with traced(tracing, "authgate.password_check"):
                    await asyncio.to_thread(
                        prepared.policy.basic.check, work.user, work.password, self.clock()
                    )
        elif isinstance(work, KeyFetch):
            if tracing is None:
                await self.fetcher.join(work.source, work.reason, work.kid)
                return
            what = {"authgate.issuer": work.source.issuer, "authgate.fetch.reason": work.reason}
            with traced(tracing, "authgate.key_set.wait", what) as span:
                # The fetch's own span (authgate.key_set.fetch) is a child of
                # this one when this request started it.
                done = await self.fetcher.join(work.source, work.reason, work.kid)
                span.set_attribute("authgate.fetch.waited_out", not done)
        elif isinstance(work, Introspect):
            # The call itself runs in a thread the span's context follows.
            with traced(tracing, "authgate.introspection", {"authgate.issuer": work.issuer.issuer}):
                await self.introspector.join(work)
        elif isinstance(work, CodeExchange):
            with traced(tracing, "authgate.login.code_exchange"):
                await self.logins.exchange(work)
        elif isinstance(work, SessionRefresh):
            with traced(tracing, "authgate.login.refresh"):
                await self.logins.refresh(work, self.clock)

    # --- the record ------------------------------------------------------------------

    def _log_line(self, entry: dict[str, Any]) -> None:
        """A line for the decision log (file, or the terminal log)."""
        if self._log_file is not None:
            self._log_file.write(_LINE.encode(entry) + "\n")

    def record(
        self,
        d: Decision,
        request_id: str | None,
        method: str,
        raw_path: str,
        without_store: str = "",
        events: tuple[WatchEvent, ...] = (),
    ) -> dict[str, Any]:
        """Count the decision and log its line, then the line of each event
        of the watch it caused; the entry (for the door to keep)."""
        subject = d.identity.subject if d.identity is not None else None
        outcome = d.outcome
        entry: dict[str, Any] = {
            "time": round(time.time(), 3),
            "request_id": request_id,
            "client_ip": d.client_ip,
            "method": method,
            "path": d.path.path if d.path is not None else raw_path.split("?")[0][:200],
            "rule": d.rule,
            "decision": outcome,
            "status": d.status or None,
            "reason": d.reason,
            "subject": subject,
            "via": d.via,
        }
        if d.status:
            # A denial or a would-deny: the evidence `authgate denials` reads.
            # Allowed requests never come here.
            self._evidence(d, entry)
        if without_store:
            entry["without_store"] = without_store  # limits judged without the shared store
        self.decided += 1
        self.metrics.decided(outcome, d.status, d.rule or "-", d.reason)
        if d.reason == RATE_LIMITED:
            self.metrics.rate_limited.labels(d.detail or "-").inc()
        if self._log_file is not None or self._log_terminal or d.reason == FORBIDDEN:
            line = _LINE.encode(entry)
            if self._log_file is not None:
                self._log_file.write(line + "\n")
            if d.reason == FORBIDDEN:
                logger.warning(line)  # an authenticated caller was refused: worth a look
            elif self._log_terminal:
                logger.info(line)
        for event in events:
            self._record_event(event, request_id, d)
        entry["forwarded"] = outcome != "deny"
        return entry

    def _record_event(self, event: WatchEvent, request_id: str | None, d: Decision) -> None:
        """A security event: always in the terminal log (a warning), in the
        decision log when there is one, and counted."""
        spec = event.spec
        line: dict[str, Any] = {
            "time": round(time.time(), 3),
            "event": "watch",
            "kind": spec.name,
            "counts": spec.counts,
            "key": event.key,
            "count": event.count,
            "window": spec.window,
            "action": event.action,
        }
        if event.report and spec.action != "none":
            line["would"] = spec.acts  # report mode: counted and told, never acted on
        if event.ban is not None:
            line["until"] = round(event.ban.until, 3)
            if event.ban.watch != spec.name or event.ban.action != spec.action:
                line["kept"] = f"{event.ban.action} by {event.ban.watch}"  # a stronger ban stays
        line["request_id"] = request_id
        line["client_ip"] = d.client_ip
        text = _LINE.encode(line)
        logger.warning(text)
        if self._log_file is not None:
            self._log_file.write(text + "\n")
        self.metrics.watch_event(spec.name, "report" if event.report else spec.action)

    def _evidence(self, d: Decision, entry: dict[str, Any]) -> None:
        """A denial's fields beyond the common ones: its detail, the failed
        condition (a refused identity), and a failed credential's fingerprint
        (an HMAC with this process's key, 12 hex digits) and Basic user name."""
        if d.detail:
            entry["detail"] = d.detail[:_DETAIL_CHARS]
        if d.condition:
            entry["condition"] = d.condition
        if d.rejected is not None:
            value = d.rejected.value.encode("utf-8", "surrogatepass")  # any str encodes
            mac = hmac.new(self._credential_key, value, hashlib.sha256)
            entry["cred_fp"] = mac.hexdigest()[:12]
            if d.rejected.kind == BASIC:
                entry["user"] = d.rejected.value.partition(":")[0][:_USER_CHARS]
