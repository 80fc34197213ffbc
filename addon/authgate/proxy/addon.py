"""The mitmproxy adapter: options in, flows to `decide()`, decisions back out.

Everything interesting happens in the pure core; this module converts a flow
to a `RequestView` and a `Decision` to a response or a rewritten request,
runs what needs I/O off the request path (policy reloads, key fetches,
bcrypt), and keeps the gateway failing closed: an exception while judging
answers 500 and the request never reaches the backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import IO, Any

from mitmproxy import command, exceptions, flow, http

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
from authgate.core.explanation import explain as explain_request
from authgate.core.ipset import normalize_ip, parse_ip
from authgate.core.model import IDENTITY_HEADERS, Policy, Rule, credentials_in_clear
from authgate.core.ratelimit import ALLOWED, Hit, Recorder, Verdict
from authgate.core.responses import Rendered, challenge, render, render_error
from authgate.policy.load import load_policy
from authgate.policy.marks import PolicyError
from authgate.proxy import backend_lint as upstream_lint
from authgate.proxy.admin import AdminServer, Readiness
from authgate.proxy.workers import write_status
from authgate.runtime.jwks import Fetcher
from authgate.runtime.metrics import Metrics
from authgate.runtime.reload import Fingerprint, carry_over, fingerprint
from authgate.runtime.stores import MemoryStore, SharedStore, StoreUnavailable

logger = logging.getLogger("authgate")
METADATA_KEY = "authgate"
# The decision log's encoder: one line, keys in the entry's order.
_LINE = json.JSONEncoder(separators=(",", ":"))
# A limit with `on_store_error: deny` while the shared store is away.
STORE_DENIED = Verdict(False, 0, 1, 1)
REQUEST_ID_KEY = "authgate_request_id"
EXPLAINED = "\n\n-- authgate.explain --\n"  # what follows a flow's decision line
# Flow markers, by the names mitmproxy's views know: symbols that stock fonts
# (DejaVu) draw (✖, ⚠, ‼), not pictographs that a machine without an emoji
# font shows as empty boxes.
DENIED_MARKER = ":heavy_multiplication_x:"
WOULD_DENY_MARKER = ":warning:"
LINT_MARKER = ":bangbang:"


# The Host the client sent, noted by the guard (proxy/guard.py) on the request
# before mitmproxy's reverse mode rewrites it to the backend's address: (HTTP/2's
# :authority or b"", the Host field values). Judged in every mode.
CLIENT_HOST = "_authgate_client_host"
_SURROGATE = "surrogateescape"


def request_view(flow: http.HTTPFlow) -> RequestView:
    req = flow.request
    authority = req.authority if req.authority and req.http_version.startswith("HTTP/1") else ""
    sent: tuple[bytes, tuple[bytes, ...]] | None = getattr(req, CLIENT_HOST, None)
    # The fields decoded as mitmproxy's Headers decode them (UTF-8 with
    # surrogateescape), the names lower-cased, in one pass over the raw fields.
    if sent is None:
        host = req.host_header
        fields = tuple(
            (k.decode("utf-8", _SURROGATE).lower(), v.decode("utf-8", _SURROGATE))
            for k, v in req.headers.fields
        )
    else:
        # The client's own Host fields in place of mitmproxy's rewrite.
        h2_authority, hosts = sent
        first = h2_authority or (hosts[0] if hosts else None)
        host = first.decode("utf-8", _SURROGATE) if first is not None else None
        fields = tuple(
            (name, v.decode("utf-8", _SURROGATE))
            for k, v in req.headers.fields
            if (name := k.decode("utf-8", _SURROGATE).lower()) != "host"
        ) + tuple(("host", v.decode("utf-8", _SURROGATE)) for v in hosts)
    return RequestView(
        req.method.upper(),
        req.path,
        fields,
        flow.client_conn.peername[0],
        host,
        authority if "@" in authority else "",
    )


def note_client_host(request: http.Request) -> None:
    """Remember the Host the client sent (called before mitmproxy rewrites it)."""
    data = request.data
    hosts = tuple(v for k, v in data.headers.fields if k.lower() == b"host")
    h2_authority = data.authority if not data.http_version.startswith(b"HTTP/1") else b""
    setattr(request, CLIENT_HOST, (h2_authority, hosts))


def _respond(flow: http.HTTPFlow, r: Rendered) -> None:
    flow.response = http.Response.make(
        r.status, r.body, [(k.encode(), v.encode()) for k, v in r.headers]
    )
    # mitmproxy 11's table lacks some phrases (429): never a bare "HTTP/1.1 429 ".
    flow.response.reason = HTTPStatus(r.status).phrase
    # mitmproxy would still send "100 Continue" and read the body we refuse.
    flow.request.headers.pop("expect", None)
    # Setting a response on a streamed request crashes mitmproxy (see
    # mitmproxy 11 and 12); this request is answered here, so never stream it.
    flow.request.stream = False


def load_checked(path: str, keep_host_header: bool, mode: str = "") -> Policy:
    """Load a policy and check it against how mitmproxy runs, with the
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


# Never forwarded from a client: the gateway's own headers (replaced), and the
# hop-by-hop fields of RFC 9110 §7.6.1 that name no other field.
_DROP = frozenset(name.encode() for name in IDENTITY_HEADERS) | {
    b"http2-settings",
    b"x-request-id",  # replaced by the gateway's own
    b"keep-alive",
    b"proxy-connection",
}
# What a client could use to tell the backend another host, scheme, path,
# method or client address than the one judged: kept only from trusted proxies.
_PROXY_SAYS = frozenset(
    {
        b"forwarded",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-uri",
        b"x-forwarded-method",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-url-scheme",
        b"front-end-https",
        b"x-original-host",
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
    }
)
# Connection options that are not field names, and `upgrade` (kept for a
# WebSocket upgrade, whose Upgrade field is forwarded).
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
# Fields the gateway writes itself, whose underscore spellings go too.
_OWN_ALIASES = frozenset({b"x-forwarded-for", b"connection", b"upgrade"})


@dataclasses.dataclass(frozen=True, slots=True)
class Forwarding:
    """What a forwarded request loses, worked out once per policy: the fields
    dropped when the peer is / is not a trusted proxy, and the token cookies
    taken out of Cookie (forward_credentials: false)."""

    drop: dict[bool, frozenset[bytes]]
    cookies: frozenset[bytes]

    @classmethod
    def of(cls, policy: Policy) -> Forwarding:
        drop = _DROP | {name.encode() for name in policy.strip_headers}
        cookies: frozenset[bytes] = frozenset()
        if not policy.forward_credentials:
            # Whatever can carry a credential the policy checks.
            drop |= {b"authorization"}
            if policy.api_keys is not None:
                drop |= {policy.api_keys.header.encode()}
            cookies = frozenset(name.encode() for name in policy.cookie_issuers)
        return cls({True: drop, False: drop | _PROXY_SAYS}, cookies)


def _without_cookies(value: bytes, names: frozenset[bytes]) -> bytes:
    """A Cookie field's value without the named cookies (RFC 6265 §5.4)."""
    kept = [p for p in value.split(b";") if p.split(b"=", 1)[0].strip() not in names]
    return b";".join(kept).strip()


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(policy: Policy | None, flow: http.HTTPFlow) -> str:
    """The request's id: a well-formed X-Request-Id from a trusted proxy, or a
    new one (a client could otherwise pick ids to confuse the logs)."""
    incoming = flow.request.headers.get_all("x-request-id")
    if policy is not None and len(incoming) == 1 and _REQUEST_ID.match(incoming[0]):
        try:
            family, value = parse_ip(flow.client_conn.peername[0])
        except ValueError:
            family, value = 0, 0
        if family and policy.trusted_proxies.contains(family, value):
            return incoming[0]
    return _new_request_id()


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


_new_request_id = _ids()


class Gateway:
    """The authgate addon. One instance per mitmproxy master."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.policy: Policy | None = None
        self.limiter = MemoryStore()
        self.shared: SharedStore | None = None  # `authgate_store`: None for memory
        self._store_url = "memory"
        self._store_down = False
        self.admin: AdminServer | None = None
        self.draining = False
        self._in_flight: set[str] = set()  # ids of flows judged and not yet answered
        self.decided = 0  # decisions made by this process
        self.clock = clock
        self.fetcher = Fetcher()
        self.metrics = Metrics(lambda: self.policy)
        self.lint = upstream_lint.Ledger()
        self.would_deny: dict[str, int] = {}
        self.loaded_at = 0.0
        self.reload_error: str | None = None
        self.reloads = 0
        self._log_file: IO[str] | None = None
        self._log_terminal = False  # authgate_log=-: decisions to mitmproxy's log
        self._fingerprint: Fingerprint = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._reloading: asyncio.Lock | None = None
        self._bcrypt_slots = asyncio.Semaphore(2)  # bcrypt is CPU-bound: two at a time
        self._forwarding: tuple[Policy, Forwarding] | None = None  # for the policy in force
        self.master: Any = None  # set in load()

    # --- options -----------------------------------------------------------

    def load(self, loader: Any) -> None:
        # This master's own options and addons (not mitmproxy's global ctx,
        # which names the last master made in the process).
        self.master = loader.master
        loader.add_option("authgate_policy", str, "", "The authgate policy file (YAML). Required.")
        loader.add_option(
            "authgate_log",
            str,
            "",
            "Append one JSON line per decision to this file; - for mitmproxy's log "
            "(default: none, but 403s to authenticated callers, logged as warnings).",
        )
        loader.add_option(
            "authgate_mode",
            str,
            "",
            "Override the policy's mode for the whole gateway: enforce or report.",
            choices=["", "enforce", "report"],
        )
        loader.add_option(
            "authgate_lint_upstream",
            str,
            "warn",
            "Inspect the backend's answers for 401/403/429 mistakes: warn, repair or off.",
            choices=["warn", "repair", "off"],
        )
        loader.add_option(
            "authgate_metrics",
            str,
            "",
            "Serve Prometheus metrics on HOST:PORT (off when empty).",
        )
        loader.add_option(
            "authgate_admin",
            str,
            "",
            "Serve /live, /ready, /metrics and /status on HOST:PORT (off when empty).",
        )
        loader.add_option(
            "authgate_store",
            str,
            "memory",
            "Where rate-limit counts live: memory (this process) or "
            "redis://[:PASSWORD@]HOST:PORT/DB (also rediss://), shared by every gateway.",
        )
        loader.add_option(
            "authgate_store_timeout",
            float,
            0.05,
            "Seconds a request waits for the shared store before its limits use on_store_error.",
        )
        loader.add_option(
            "authgate_watch",
            bool,
            True,
            "Reload the policy when it or a file it reads changes.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = self.master.options
        if "authgate_policy" in updated or "keep_host_header" in updated:
            path = opts.authgate_policy
            if not path:
                # Not an error yet: options arrive one by one. `running` refuses
                # to serve without a policy, and until then nothing is forwarded.
                self.policy = None
                return
            try:
                policy = load_checked(path, self._keep_host_header(), opts.authgate_mode)
            except PolicyError as e:
                raise exceptions.OptionsError(f"authgate: {e}") from e
            self._install(policy, "loaded")
        if "authgate_mode" in updated and "authgate_policy" not in updated and self.policy:
            self.policy = dataclasses.replace(self.policy, mode_override=opts.authgate_mode)
        if "authgate_log" in updated:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            self._log_terminal = opts.authgate_log == "-"
            if opts.authgate_log and not self._log_terminal:
                try:
                    self._log_file = open(opts.authgate_log, "a", buffering=1)  # noqa: SIM115
                except OSError as e:
                    raise exceptions.OptionsError(
                        f"authgate: cannot open authgate_log {opts.authgate_log}: {e.strerror}"
                    ) from e
        if "authgate_store" in updated or "authgate_store_timeout" in updated:
            self._configure_store(opts.authgate_store, opts.authgate_store_timeout)
        if "authgate_admin" in updated:
            if self.admin is not None:
                self.admin.stop()
                self.admin = None
            if opts.authgate_admin:
                try:
                    self.admin = AdminServer(
                        opts.authgate_admin, self.status, self.ready, self._metrics_text
                    )
                except (OSError, ValueError) as e:
                    raise exceptions.OptionsError(f"authgate: admin: {e}") from e
                logger.info(
                    f"authgate: admin on http://{opts.authgate_admin} "
                    "(/live /ready /metrics /status)"
                )
        if "authgate_metrics" in updated:
            self.metrics.stop()
            if opts.authgate_metrics:
                try:
                    self.metrics.serve(opts.authgate_metrics)
                except (OSError, ValueError) as e:
                    raise exceptions.OptionsError(f"authgate: metrics: {e}") from e
                logger.info(f"authgate: metrics on http://{opts.authgate_metrics}/metrics")

    def running(self) -> None:
        if self.policy is None:
            logger.error(
                "authgate: no policy; pass --set authgate_policy=FILE "
                "(for example policies/example.yaml). Every request is answered 503."
            )
            return
        self._warn_in_clear(self.policy)
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

    def _configure_store(self, url: str, timeout: float) -> None:
        old = self.shared
        if url in ("", "memory"):
            self.shared = None
        else:
            from authgate.runtime.redis_store import RedisStore

            try:
                self.shared = RedisStore.from_url(url, timeout=timeout)
            except ValueError as e:
                raise exceptions.OptionsError(f"authgate: authgate_store: {e}") from e
        self._store_url = url or "memory"
        if old is not None:
            self._close_later(old)

    async def _say_store(self, store: SharedStore) -> None:
        """At start, whether the shared store answers: a Redis that is away is
        not fatal (limits fall back), but it should not go unnoticed."""
        where = store.health().get("url", self._store_url)
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
            f"no keys yet for issuer {i.issuer}"
            + (f" ({i.remote.last_error})" if i.remote.last_error else "")
            for i in policy.issuers
            if i.remote is not None and not i.remote.keys
        ]
        if self.draining:
            reasons.append("draining: shutting down")
        return Readiness(not reasons, tuple(reasons))

    async def drain(self, grace: float) -> int:
        """Wait until no request is in flight, at most `grace` seconds; the
        number still in flight then."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._in_flight)

    def done(self) -> None:
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

    # --- policy lifecycle ------------------------------------------------------

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
            path = self.master.options.authgate_policy
            keep_host = self._keep_host_header()
            mode = self.master.options.authgate_mode
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

    async def _watch(self) -> None:
        status_file = os.environ.get("AUTHGATE_STATUS_FILE")  # a worker of `--workers`
        while True:
            if status_file:
                try:
                    write_status(status_file, self.status())
                except OSError as e:
                    logger.warning(f"authgate: cannot write the worker status: {e}")
            await asyncio.sleep(1.0)
            if not self.master.options.authgate_watch or not self._fingerprint:
                continue
            now = await asyncio.to_thread(fingerprint, list(self._fingerprint))
            if now != self._fingerprint:
                await self.reload("a file changed")

    async def _keep_keys_fresh(self) -> None:
        """Fetch remote key sets at start and whenever they expire (or, after
        a failure, when the backoff says). Off the request path."""
        while True:
            policy = self.policy
            sources = [i.remote for i in policy.issuers if i.remote] if policy else []
            # Not held across the sleep below: after a reload it would keep the
            # old policy, block list and all, alive for up to a minute.
            del policy
            for source in sources:
                if source.due():
                    await self.fetcher.refresh(source)
            wait = min((s.next_attempt - s.clock() for s in sources), default=60.0)
            await asyncio.sleep(min(max(wait, 0.5), 60.0))

    def _keep_host_header(self) -> bool:
        options = self.master.options
        return "keep_host_header" in options and bool(options.keep_host_header)

    def _warn_in_clear(self, policy: Policy) -> None:
        if self.master.addons.get("tlslistener") is not None:
            return  # `authgate run --tls-cert`: the port refuses plain HTTP
        for mode in self.master.options.mode:
            listen = mode.rpartition("@")[2] if "@" in mode else ""
            where = listen or f"*:{self.master.options.listen_port or 8080}"
            for kind, line in credentials_in_clear(policy, where):
                at = f" ({policy.file}:{line})" if line else ""
                logger.warning(
                    f"authgate: {kind}{at} are accepted on {listen or 'all interfaces'}; "
                    "unless clients connect with TLS, they cross the network in clear text"
                )

    # --- commands ----------------------------------------------------------------

    @command.command("authgate.reload")
    def reload_command(self) -> str:
        """Reload the policy now (the result shows in authgate.status and the log)."""
        if self._reloading is None:
            return "authgate: not running yet"
        task = asyncio.get_running_loop().create_task(self._run_reload("requested"))
        self._tasks.append(task)
        return "authgate: reload started; see authgate.status"

    async def _run_reload(self, why: str) -> None:
        await self.reload(why)

    @command.command("authgate.status")
    def status_command(self) -> str:
        """The policy in force, the last reload error, report-mode and lint counts."""
        return json.dumps(self.status(), indent=2)

    def status(self) -> dict[str, Any]:
        policy = self.policy
        keys = {
            i.issuer: {
                "keys": len(i.remote.keys),
                "last_error": i.remote.last_error,
                "fetches": i.remote.fetches,
            }
            for i in (policy.issuers if policy else ())
            if i.remote is not None
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
            "in_flight": len(self._in_flight),
            "decisions": self.decided,
            "store": store,
            "policy": policy.file if policy else None,
            "rules": len(policy.rules) if policy else 0,
            "mode": (policy.mode_override or policy.mode) if policy else None,
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
            "reload_error": self.reload_error,
            "would_deny": dict(sorted(self.would_deny.items())),
            "upstream_lint": self.lint.summary(),
            "jwks": keys,
        }

    @command.command("authgate.lint")
    def lint_command(self) -> str:
        """Backend auth mistakes seen so far, per rule and kind."""
        return json.dumps(self.lint.summary(), indent=2)

    # --- hooks -------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        try:
            policy = self.policy  # this request's policy, even if a reload swaps it
            flow.metadata[REQUEST_ID_KEY] = request_id(policy, flow)
            self._in_flight.add(flow.id)
            if policy is None:
                self._fail(flow, 503, "no_policy")
                return
            start = time.perf_counter()
            view = request_view(flow)
            decision, without_store = await self._judge(policy, view, self.clock())
            self.metrics.decision_seconds.observe(time.perf_counter() - start)
            self._apply(flow, policy, view, decision, without_store)
        except Exception:  # noqa: BLE001 - the one place that must catch everything
            logger.exception("authgate: error while judging a request; answering 500")
            self._fail(flow, 500, "internal_error")

    def request(self, flow: http.HTTPFlow) -> None:
        # Fail closed: a request that reaches here unjudged is never forwarded.
        if flow.response is not None or METADATA_KEY in flow.metadata:
            return
        logger.error("authgate: a request reached the request hook unjudged; answering 500")
        self._fail(flow, 500, "unjudged")

    def error(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)
        entry = flow.metadata.get(METADATA_KEY)
        if flow.response is None or not isinstance(entry, dict) or not entry.get("forwarded"):
            return
        # RFC 6750 §2.3: a response to a request authenticated by a query
        # token must not be stored by shared caches.
        if entry.get("via") == "query" and "cache-control" not in flow.response.headers:
            flow.response.headers["Cache-Control"] = "private"
        mode = self.master.options.authgate_lint_upstream
        if mode != "off":
            self._lint(flow, entry, repair=mode == "repair")

    # --- commands ------------------------------------------------------------

    @command.command("authgate.explain")
    def explain(self, flows: Sequence[flow.Flow]) -> None:
        """Explain how authgate decides each flow's request, step by step (as the
        request is now: a forwarded one carries the path and headers the gateway
        gave it), and attach the story to the flow: its comment keeps the
        decision's line first, then the explanation (mitmweb's Comment tab shows
        it). Also logged. Rate limits are read, not counted. Try
        `authgate.explain @all` or `authgate.explain ~comment "authgate: [45]"`."""
        policy = self.policy
        if policy is None:
            raise exceptions.CommandError("authgate: no policy loaded")
        for f in flows:
            if isinstance(f, http.HTTPFlow):
                view = request_view(f)
                told = explain_request(policy, view, self.clock(), self.limiter)
                text = told.text().rstrip("\n")
                decided = f.comment.split(EXPLAINED, 1)[0].rstrip("\n")
                f.comment = f"{decided}{EXPLAINED}{text}"
                logger.info("authgate.explain:\n" + text)

    # --- the work ------------------------------------------------------------

    def _fail(self, flow: http.HTTPFlow, status: int, reason: str) -> None:
        """The gateway itself cannot judge: answer 500/503, never forward."""
        retry = 60 if status == 503 else None
        accept = flow.request.headers.get("accept")
        rid = str(flow.metadata.get(REQUEST_ID_KEY, ""))
        rendered = render_error(
            status, flow.request.method, retry_after=retry, accept=accept, request_id=rid
        )
        _respond(flow, rendered)
        flow.metadata[METADATA_KEY] = {"status": status, "reason": reason}
        flow.comment = f"authgate: {status} {reason}"
        flow.marked = DENIED_MARKER

    async def _judge(self, policy: Policy, view: RequestView, now: float) -> tuple[Decision, str]:
        """Judge a request; its rate limits are counted in one step at the end,
        all or nothing, by the store (one round trip to a shared one). The core
        first judges as if every limit allowed, noting the limits it asks
        about; only when the store denies one does it judge again with the
        store's verdicts, so the 429 is the core's. Returns the decision and,
        when a shared store could not answer, what stood in for it."""
        seen = Recorder()
        first = prepare(policy, view, now, seen)
        if isinstance(first, Decision):
            decision = first
        else:
            if first.work is not None:
                if seen.hits and isinstance(first.work, PasswordCheck):
                    # Read the IP limits before spending a bcrypt on the
                    # request: a client over its limit costs no hash.
                    told, note = await self._count(policy, seen.hits, now, consume=False)
                    if told is not None:
                        return await self._again(policy, view, now, told), note
                await self._slow_work(first)
            decision = decide(first, self.clock(), seen)
        if not seen.hits:
            return decision, ""
        told, note = await self._count(policy, seen.hits, now)
        if told is None:
            return decision, note
        return await self._again(policy, view, now, told), note

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
        denied = False
        for hit, verdict in zip(hits, verdicts, strict=True):
            if not verdict.allowed:
                denied = True
            elif verdict.remaining * 10 < hit.rate.count:
                self.metrics.near_limit(hit.limit_id)
        if not denied:
            return None, note
        return Recorder.told(hits, verdicts), note

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
        thread, two at a time), or a key fetch (joined, waited on at most
        about a second)."""
        work = prepared.work
        if isinstance(work, PasswordCheck) and prepared.policy.basic is not None:
            async with self._bcrypt_slots:
                await asyncio.to_thread(
                    prepared.policy.basic.check, work.user, work.password, self.clock()
                )
        elif isinstance(work, KeyFetch):
            await self.fetcher.join(work.source, work.reason, work.kid)

    def _apply(
        self,
        flow: http.HTTPFlow,
        policy: Policy,
        view: RequestView,
        decision: Decision,
        without_store: str = "",
    ) -> None:
        if decision.forwarded:
            self._forward(flow, policy, view.peer, decision)
            if decision.report:
                # Report mode: judged and logged, forwarded as if allowed, and
                # nothing of the would-be denial reaches the client.
                key = decision.rule or "-"
                self.would_deny[key] = self.would_deny.get(key, 0) + 1
                self.metrics.would_deny.labels(key, str(decision.status), decision.reason).inc()
        else:
            accept = flow.request.headers.get("accept")
            rid = flow.metadata[REQUEST_ID_KEY]
            rendered = render(
                decision, policy.realm, flow.request.method, accept=accept, request_id=rid
            )
            _respond(flow, rendered)
        self._record(flow, decision, decision.outcome, without_store)

    def _forward(self, flow: http.HTTPFlow, policy: Policy, peer: str, d: Decision) -> None:
        req = flow.request
        if req.path != d.target:
            req.path = d.target
        if req.authority and req.http_version.startswith("HTTP/1"):
            req.authority = ""  # absolute-form: forward as origin-form, judged path only
        # The headers are rebuilt in one assignment (mitmproxy's per-header
        # operations are comparatively slow): client-sent identity headers,
        # fields backends trust and X-Forwarded-For out, ours in,
        # X-Forwarded-For with the peer appended.
        forwarding = self._forwarding
        if forwarding is None or forwarding[0] is not policy:
            forwarding = self._forwarding = (policy, Forwarding.of(policy))
        how = forwarding[1]
        drop = how.drop[policy.trusted_proxies.contains(*parse_ip(peer))]
        chain: list[str] = []
        fields: list[tuple[bytes, bytes]] = []
        options: list[bytes] = []  # the Connection options that go on
        named: list[bytes] = []  # fields the client's Connection names: hop-by-hop
        upgrade = False
        for name, value in req.headers.fields:
            lower = name.lower()
            if b"_" in lower:
                # CGI, WSGI and PHP read "X_Auth_Subject" as X-Auth-Subject:
                # an underscore spelling of a header we drop is that header.
                alias = lower.replace(b"_", b"-")
                if alias in drop or alias in _OWN_ALIASES:
                    continue
            if lower == b"x-forwarded-for":
                chain.append(value.decode("latin-1"))
            elif lower == b"connection":
                # RFC 9110 §7.6.1: the fields it names end at this hop; only
                # close, keep-alive and upgrade go on.
                for option in value.lower().split(b","):
                    option = option.strip()
                    if option in _CONNECTION_OPTIONS:
                        options.append(option)
                    elif option:
                        named.append(option.replace(b"_", b"-"))
            elif lower == b"upgrade":
                # Only WebSocket upgrades pass: after a 101 to anything else
                # (h2c above all) the connection carries requests nobody judges.
                if value.strip().lower() == b"websocket":
                    upgrade = True
                    fields.append((name, value))
            elif lower == b"cookie" and how.cookies:
                value = _without_cookies(value, how.cookies)
                if value:
                    fields.append((name, value))
            elif lower not in drop:
                fields.append((name, value))
        if named:
            gone = frozenset(named)
            fields = [f for f in fields if f[0].lower().replace(b"_", b"-") not in gone]
            if b"x-forwarded-for" in gone:
                chain.clear()  # the client's X-Forwarded-For ends here
            upgrade = upgrade and b"upgrade" not in gone
        if options:
            kept = [o for o in dict.fromkeys(options) if o != b"upgrade" or upgrade]
            if kept:
                fields.append((b"Connection", b", ".join(kept)))
        for name_s, value_s in d.upstream_headers:
            fields.append((name_s.encode(), value_s.encode("utf-8", "surrogateescape")))
        fields.append((b"X-Request-Id", flow.metadata[REQUEST_ID_KEY].encode()))
        chain.append(normalize_ip(peer))
        fields.append((b"X-Forwarded-For", ", ".join(chain).encode("latin-1")))
        req.headers.fields = tuple(fields)

    def _record(self, flow: http.HTTPFlow, d: Decision, outcome: str, without_store: str) -> None:
        subject = d.identity.subject if d.identity is not None else None
        entry: dict[str, Any] = {
            "time": round(time.time(), 3),
            "request_id": flow.metadata.get(REQUEST_ID_KEY),
            "client_ip": d.client_ip,
            "method": flow.request.method,
            "path": d.path.path if d.path is not None else flow.request.path.split("?")[0][:200],
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
        flow.metadata[METADATA_KEY] = entry
        rule = f" by rule {d.rule}" if d.rule else ""
        if outcome == "allow":
            # "allowed by rule R (allowed)", "allowed by rule R (preflight)": every
            # comment names its rule followed by a space, so one filter finds them.
            flow.comment = f"authgate: allowed{rule} ({d.reason})"
        elif outcome == "would_deny":
            flow.comment = f"authgate: would deny: {d.status}{rule} ({d.reason})"
            flow.marked = WOULD_DENY_MARKER
        else:
            flow.comment = f"authgate: {d.status}{rule} ({d.reason})"
            flow.marked = DENIED_MARKER

    def _lint(self, flow: http.HTTPFlow, entry: dict[str, Any], repair: bool) -> None:
        response = flow.response
        assert response is not None
        if response.status_code not in upstream_lint.STATUSES:
            return  # the common case: an answer no finding is about
        headers = [(k.lower(), v) for k, v in response.headers.items(multi=True)]
        found = upstream_lint.findings(response.status_code, headers, bool(entry.get("subject")))
        if not found:
            return
        policy = self.policy
        fixed = upstream_lint.repairable(found) if repair and policy is not None else []
        rule = entry.get("rule") or "-"
        if fixed and policy is not None:
            rule_obj = policy.rule_index.get(rule)
            lines = self._challenge_lines(policy, rule_obj)
            if lines:
                original = response.status_code
                response.status_code = 401
                response.reason = "Unauthorized"
                for line in lines:
                    response.headers.add("WWW-Authenticate", line)
                entry["lint_repaired"] = fixed
                flow.comment += f"; backend {original} repaired to 401 with a challenge"
            else:
                fixed = []
        for finding in found:
            first = self.lint.add(rule, finding, finding in fixed)
            self.metrics.lint.labels(rule, finding, str(finding in fixed).lower()).inc()
            if first:
                logger.warning(
                    f"authgate: backend mistake on rule {rule}: {finding} "
                    f"({upstream_lint.EXPLAIN[finding]})"
                )
        entry["lint"] = found
        flow.marked = flow.marked or LINT_MARKER
        if not fixed:
            flow.comment += f"; backend mistake: {', '.join(found)}"

    @staticmethod
    def _challenge_lines(policy: Policy, rule: Rule | None) -> list[str]:
        if rule is None:
            return []
        return [challenge(policy.realm, s, p) for s, p in rule.challenges]
