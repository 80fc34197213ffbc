"""The judging layer both doors share: the mitmproxy addon (`proxy/`) and the
decision service (`service/`). Nothing here knows mitmproxy or HTTP servers:
a door turns what arrives into a `RequestView`, asks `judge`, and turns the
`Decision` back into an answer; the house keeps everything else.

- the policy keeper: load, reload in a thread, the last good policy on a
  failed reload, file watching, fetched key sets carried over;
- judging with the rate-limit store (memory or shared) and the slow work a
  credential needs (bcrypt in a thread, a key fetch joined);
- the decision log, the metrics, report-mode counts, request ids;
- the requests in flight, draining, readiness, the admin listener, status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import IO, Any

from authgate.core.credentials import KeyFetch, PasswordCheck
from authgate.core.decision import (
    FORBIDDEN,
    RATE_LIMITED,
    Decision,
    Prepared,
    RequestView,
    decide,
    prepare,
)
from authgate.core.ipset import parse_ip
from authgate.core.model import Policy, credentials_in_clear
from authgate.core.oidc import CodeExchange, SessionRefresh
from authgate.core.ratelimit import ALLOWED, Hit, Recorder, Verdict
from authgate.house.admin import AdminServer, Readiness
from authgate.house.workers import write_status
from authgate.policy.load import load_policy
from authgate.policy.marks import PolicyError
from authgate.runtime.jwks import Fetcher
from authgate.runtime.metrics import Metrics
from authgate.runtime.oidc import LoginClient
from authgate.runtime.reload import Fingerprint, carry_over, fingerprint
from authgate.runtime.stores import MemoryStore, SharedStore, StoreUnavailable

logger = logging.getLogger("authgate")
# The decision log's encoder: one line, keys in the entry's order.
_LINE = json.JSONEncoder(separators=(",", ":"))
# A limit with `on_store_error: deny` while the shared store is away.
STORE_DENIED = Verdict(False, 0, 1, 1)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def load_checked(path: str, keep_host_header: bool, mode: str = "") -> Policy:
    """Load a policy and check it against how the door runs, with the
    deployment's mode override. Raises PolicyError."""
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
    return policy


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
        self.logins = LoginClient(self.fetcher)  # the OpenID Connect login's calls
        self.metrics = Metrics(lambda: self.policy)
        self.would_deny: dict[str, int] = {}
        self.loaded_at = 0.0
        self.reload_error: str | None = None
        self.reloads = 0
        self.watch = True  # reload when a file of the policy changes
        # Where the policy comes from: (file, keep_host_header, mode override).
        self.source: tuple[str, bool, str] = ("", False, "")
        # What a door adds to `status()` (the proxy: its backend lint).
        self.more_status: Callable[[], dict[str, Any]] = dict
        self._log_file: IO[str] | None = None
        self._log_terminal = False  # authgate_log=-: decisions to the log
        self._fingerprint: Fingerprint = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._reloading: asyncio.Lock | None = None
        self._bcrypt_slots = asyncio.Semaphore(2)  # bcrypt is CPU-bound: two at a time

    # --- configuration (plain values; each raises what is wrong) --------------------

    def load(self, path: str, keep_host_header: bool, mode: str) -> None:
        """Load the policy now. Raises PolicyError (the old one stays)."""
        policy = load_checked(path, keep_host_header, mode)
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
        if old is not None:
            self._close_later(old)

    def serve_admin(self, address: str) -> None:
        """The admin listener on HOST:PORT ('' stops it). Raises OSError, ValueError."""
        if self.admin is not None:
            self.admin.stop()
            self.admin = None
        if address:
            self.admin = AdminServer(address, self.status, self.ready, self._metrics_text)
            logger.info(f"authgate: admin on http://{address} (/live /ready /metrics /status)")

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
        if self.policy.basic is not None:
            for user, cost in self.policy.basic.weak():
                logger.warning(
                    f"authgate: user {user!r} in {self.policy.basic.file} has bcrypt cost "
                    f"{cost:02d}; set the password again with `htpasswd -B -C 10 FILE {user}`"
                )
        loop = asyncio.get_running_loop()
        self._reloading = asyncio.Lock()
        self._tasks = [loop.create_task(self._keep_keys_fresh()), loop.create_task(self._watch())]
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
        self.metrics.stop()
        if self.admin is not None:
            self.admin.stop()
            self.admin = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

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
                policy = await asyncio.to_thread(load_checked, path, keep_host, mode)
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
        while True:
            if status_file:
                try:
                    write_status(status_file, self.status())
                except OSError as e:
                    logger.warning(f"authgate: cannot write the worker status: {e}")
            await asyncio.sleep(1.0)
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
            **self.more_status(),
            "jwks": keys,
        }

    # --- judging ---------------------------------------------------------------------

    def judge_now(self, policy: Policy, view: RequestView, now: float) -> Decision | None:
        """`judge` without waiting, for the common case: limits counted in this
        process's memory and no slow work (a cached token, an API key, no
        credentials). None: the request needs `judge`. The store is touched
        only when the decision is returned."""
        if self.shared is not None:
            return None
        start = time.perf_counter()
        seen = Recorder()
        first = prepare(policy, view, now, seen)
        if isinstance(first, Decision):
            decision = first
        elif first.work is not None:
            return None
        else:
            decision = decide(first, self.clock(), seen)
        if seen.hits:
            told = self._told(seen.hits, self.limiter.hit_all(seen.hits, now, True))
            if told is not None:
                again = prepare(policy, view, now, told)
                # No slow work the first pass did not find done.
                decision = again if isinstance(again, Decision) else decide(again, now, told)
        return self._judged(decision, start)

    async def judge(self, policy: Policy, view: RequestView, now: float) -> tuple[Decision, str]:
        """Judge a request; its rate limits are counted in one step at the end,
        all or nothing, by the store (one round trip to a shared one). The core
        first judges as if every limit allowed, noting the limits it asks
        about; only when the store denies one does it judge again with the
        store's verdicts, so the 429 is the core's. Returns the decision and,
        when a shared store could not answer, what stood in for it."""
        start = time.perf_counter()
        seen = Recorder()
        first = prepare(policy, view, now, seen)
        if isinstance(first, Decision):
            decision = first
        else:
            if first.work is not None:
                if seen.hits and isinstance(first.work, PasswordCheck | CodeExchange):
                    # Read the IP limits before spending a bcrypt (or a call
                    # to the OpenID provider) on the request: a client over
                    # its limit costs neither.
                    told, note = await self._count(policy, seen.hits, now, consume=False)
                    if told is not None:
                        again = await self._again(policy, view, now, told)
                        return self._judged(again, start), note
                await self._slow_work(first)
            decision = decide(first, self.clock(), seen)
        note = ""
        if seen.hits:
            told, note = await self._count(policy, seen.hits, now)
            if told is not None:
                decision = await self._again(policy, view, now, told)
        return self._judged(decision, start), note

    def _judged(self, decision: Decision, start: float) -> Decision:
        self.metrics.decision_seconds.observe(time.perf_counter() - start)
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
        again = prepare(policy, view, now, told)
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
                verdicts = await shared.hit_all(hits, consume)
            except StoreUnavailable as e:
                verdicts, note = self._without_store(policy, hits, now, consume, e)
            else:
                self.metrics.store_seconds.observe(time.perf_counter() - start)
                if self._store_down:
                    self._store_down = False
                    logger.warning("authgate: the rate-limit store answers again")
        return self._told(hits, verdicts), note

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

    async def _slow_work(self, prepared: Prepared) -> None:
        """What the credential needs before `decide`: a bcrypt check (in a
        thread, two at a time), a key fetch (joined, waited on at most about
        a second), or a call to the OpenID provider (a login's code exchange,
        a session's refresh: bounded by the login's timeout)."""
        work = prepared.work
        if isinstance(work, PasswordCheck) and prepared.policy.basic is not None:
            async with self._bcrypt_slots:
                await asyncio.to_thread(
                    prepared.policy.basic.check, work.user, work.password, self.clock()
                )
        elif isinstance(work, KeyFetch):
            await self.fetcher.join(work.source, work.reason, work.kid)
        elif isinstance(work, CodeExchange):
            await self.logins.exchange(work)
        elif isinstance(work, SessionRefresh):
            await self.logins.refresh(work, self.clock)

    # --- the record ------------------------------------------------------------------

    def record(
        self,
        d: Decision,
        request_id: str | None,
        method: str,
        raw_path: str,
        without_store: str = "",
    ) -> dict[str, Any]:
        """Count the decision and log its line; the entry (for the door to keep)."""
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
        entry["forwarded"] = outcome != "deny"
        return entry
