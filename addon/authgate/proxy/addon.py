"""The mitmproxy adapter: options in, flows to `decide()`, decisions back out.

Everything interesting happens in the pure core; this module converts a flow
to a `RequestView` and a `Decision` to a response or a rewritten request,
runs what needs I/O off the request path (policy reloads, key fetches,
bcrypt), and keeps the gateway failing closed: an exception while judging
answers 500 and the request never reaches the backend.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from mitmproxy import command, exceptions, flow, http

from authgate.core.clientip import peer_ip
from authgate.core.decision import Decision, RequestView
from authgate.core.explanation import explain as explain_request
from authgate.core.headline import failed, headline
from authgate.core.model import CERT_HEADERS, IDENTITY_HEADERS, Policy, Rule
from authgate.core.oidc import (
    CROSS_SITE,
    LOGGED_OUT,
    LOGIN_COMPLETE,
    LOGIN_FAILED,
    LOGIN_START,
    METHOD_NOT_ALLOWED,
    OIDC,
    PROVIDER_UNAVAILABLE,
)
from authgate.core.responses import Rendered, challenge, render, render_error
from authgate.house.admin import Readiness
from authgate.house.gatehouse import Gatehouse, WatchEvent, request_id
from authgate.policy.marks import PolicyError
from authgate.proxy import backend_lint as upstream_lint
from authgate.proxy import views
from authgate.proxy.tls import CLIENT_CERT
from authgate.runtime.jwks import Fetcher
from authgate.runtime.metrics import Metrics
from authgate.runtime.stores import MemoryStore

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from authgate.runtime.otel import Tracing

logger = logging.getLogger("authgate")
METADATA_KEY = "authgate"
REQUEST_ID_KEY = "authgate_request_id"
COOKIES_KEY = "authgate_cookies"  # Set-Cookie values for the backend's answer
EXPLAINED = "\n\n-- authgate.explain --\n"  # what follows a flow's decision line
# Flow markers, by the names mitmproxy's views know: symbols that stock fonts
# (DejaVu) draw (✖, ⚠, ‼), not pictographs that a machine without an emoji
# font shows as empty boxes.
DENIED_MARKER = ":heavy_multiplication_x:"
WOULD_DENY_MARKER = ":warning:"
LINT_MARKER = ":bangbang:"
WATCH_MARKER = ":crossed_swords:"  # ⚔: the flow that took a key to a watch's threshold


# The Host the client sent, noted by the guard (proxy/guard.py) on the request
# before mitmproxy's reverse mode rewrites it to the backend's address: (HTTP/2's
# :authority or b"", the Host field values). Judged in every mode.
CLIENT_HOST = "_authgate_client_host"
_SURROGATE = "surrogateescape"
# A traced request's spans, on the flow (not in flow.metadata, which is saved
# with the flow): see `Traced`.
TRACED = "_authgate_traced"
_TRACE_FIELDS = frozenset({b"traceparent", b"tracestate"})

# The answers of the OpenID Connect login's endpoints, commented step by step.
LOGIN_STEPS = frozenset(
    {LOGIN_START, LOGIN_COMPLETE, LOGIN_FAILED, LOGGED_OUT, CROSS_SITE, METHOD_NOT_ALLOWED}
)


def request_view(flow: http.HTTPFlow) -> RequestView:
    req = flow.request
    data = req.data  # the raw request: mitmproxy's properties decode on every read
    origin_form = not data.authority or not data.http_version.startswith(b"HTTP/1")
    authority = "" if origin_form else req.authority
    sent: tuple[bytes, tuple[bytes, ...]] | None = getattr(req, CLIENT_HOST, None)
    # The fields decoded as mitmproxy's Headers decode them (UTF-8 with
    # surrogateescape), the names lower-cased, in one pass over the raw fields.
    if sent is None:
        host = req.host_header
        fields = tuple(
            [
                (k.decode("utf-8", _SURROGATE).lower(), v.decode("utf-8", _SURROGATE))
                for k, v in req.headers.fields
            ]
        )
    else:
        # The client's own Host fields in place of mitmproxy's rewrite.
        h2_authority, hosts = sent
        first = h2_authority or (hosts[0] if hosts else None)
        host = first.decode("utf-8", _SURROGATE) if first is not None else None
        # (A loop: a generator into tuple() costs a frame switch a field, a
        # comprehension its own call.)
        decoded: list[tuple[str, str]] = []
        for k, v in data.headers.fields:
            name = k.decode("utf-8", _SURROGATE).lower()
            if name != "host":
                decoded.append((name, v.decode("utf-8", _SURROGATE)))
        for v in hosts:
            decoded.append(("host", v.decode("utf-8", _SURROGATE)))
        fields = tuple(decoded)
    return RequestView(
        data.method.decode("utf-8", _SURROGATE).upper(),  # as Request.method reads it
        data.path.decode("utf-8", _SURROGATE),  # as Request.path reads it
        fields,
        flow.client_conn.peername[0],
        host,
        authority if "@" in authority else "",
        # The certificate this connection's handshake verified (proxy/tls.py).
        getattr(flow.client_conn, CLIENT_CERT, None),
    )


def note_client_host(request: http.Request) -> None:
    """Remember the Host the client sent (called before mitmproxy rewrites it)."""
    data = request.data
    hosts = tuple(v for k, v in data.headers.fields if k.lower() == b"host")
    h2_authority = data.authority if not data.http_version.startswith(b"HTTP/1") else b""
    setattr(request, CLIENT_HOST, (h2_authority, hosts))


_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}


def _respond(flow: http.HTTPFlow, r: Rendered) -> None:
    # The constructor, not Response.make: the body and its Content-Length in
    # one step (make sets the body afterwards, looking up headers to do it).
    fields = [(k.encode(), v.encode()) for k, v in r.headers]
    fields.append((b"Content-Length", str(len(r.body)).encode()))
    now = time.time()
    flow.response = http.Response(
        b"HTTP/1.1",
        r.status,
        # mitmproxy 11's table lacks some phrases (429): never a bare "HTTP/1.1 429 ".
        _PHRASES[r.status],
        tuple(fields),
        r.body,
        None,
        now,
        now,
    )
    # mitmproxy would still send "100 Continue" and read the body we refuse.
    flow.request.headers.pop("expect", None)
    # Setting a response on a streamed request crashes mitmproxy (see
    # mitmproxy 11 and 12); this request is answered here, so never stream it.
    flow.request.stream = False


# Never forwarded from a client: the gateway's own headers (replaced, the
# client certificate's too), and the hop-by-hop fields of RFC 9110 §7.6.1 that
# name no other field.
_DROP = frozenset(name.encode() for name in IDENTITY_HEADERS + CERT_HEADERS) | {
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
# The fields `_forward` looks into; every other one is kept or dropped by name.
_SPECIAL = _OWN_ALIASES | {b"cookie"}
_WIRE_KEEP = 4096  # encoded identity headers kept (one per identity in use)


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
        if policy.login is not None:
            # The gateway's own session cookies: the backend has nothing to do with them.
            cookies = frozenset(name.encode() for name in policy.login.session_cookies)
        if not policy.forward_credentials:
            # Whatever can carry a credential the policy checks.
            drop |= {b"authorization"}
            if policy.api_keys is not None:
                drop |= {policy.api_keys.header.encode()}
            cookies |= frozenset(name.encode() for name in policy.cookie_issuers)
        return cls({True: drop, False: drop | _PROXY_SAYS}, cookies)


@dataclasses.dataclass(slots=True)
class Traced:
    """A request's spans while it is in flight (tracing on): the server span,
    and the forward span once the request goes to the backend."""

    tracing: Tracing
    server: Span
    forward: Span | None = None
    forwarding: bool = False  # forwarded, the forward span not started yet


def _without_cookies(value: bytes, names: frozenset[bytes]) -> bytes:
    """A Cookie field's value without the named cookies (RFC 6265 §5.4)."""
    kept = [p for p in value.split(b";") if p.split(b"=", 1)[0].strip() not in names]
    return b";".join(kept).strip()


class Gateway:
    """The authgate addon: mitmproxy's door to the Gatehouse. One instance per
    mitmproxy master."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.house = Gatehouse(clock)
        self.house.more_status = lambda: {"upstream_lint": self.lint.summary()}
        self.clock = clock
        self.lint = upstream_lint.Ledger()
        self._forwarding: tuple[Policy, Forwarding] | None = None  # for the policy in force
        self.master: Any = None  # set in load()
        self._lint_mode = "warn"  # authgate_lint_upstream, kept by configure
        self._encoded: dict[int, tuple[tuple[tuple[str, str], ...], list[tuple[bytes, bytes]]]] = {}

    # What the house keeps, by the names tests and tools read.
    @property
    def policy(self) -> Policy | None:
        return self.house.policy

    @policy.setter
    def policy(self, policy: Policy | None) -> None:
        self.house.policy = policy

    @property
    def limiter(self) -> MemoryStore:
        return self.house.limiter

    @property
    def metrics(self) -> Metrics:
        return self.house.metrics

    @property
    def fetcher(self) -> Fetcher:
        return self.house.fetcher

    @property
    def reloads(self) -> int:
        return self.house.reloads

    @property
    def reload_error(self) -> str | None:
        return self.house.reload_error

    @property
    def decided(self) -> int:
        return self.house.decided

    @property
    def draining(self) -> bool:
        return self.house.draining

    @draining.setter
    def draining(self, draining: bool) -> None:
        self.house.draining = draining

    # --- options -----------------------------------------------------------

    def load(self, loader: Any) -> None:
        # This master's own options and addons (not mitmproxy's global ctx,
        # which names the last master made in the process).
        self.master = loader.master
        # The "authgate" content view in mitmweb and the console (proxy/views.py).
        views.attach(
            self, lambda: self.policy, lambda: self.limiter, request_view, lambda: self.house.bans
        )
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
        loader.add_option(
            "authgate_otlp",
            str,
            "",
            "Send OpenTelemetry traces to this OTLP/HTTP collector, e.g. "
            "http://127.0.0.1:4318 (off when empty; needs authgate[otel]).",
        )

    def configure(self, updated: set[str]) -> None:
        opts = self.master.options
        house = self.house
        if "authgate_policy" in updated or "keep_host_header" in updated:
            path = opts.authgate_policy
            if not path:
                # Not an error yet: options arrive one by one. `running` refuses
                # to serve without a policy, and until then nothing is forwarded.
                house.policy = None
                return
            try:
                house.load(path, self._keep_host_header(), opts.authgate_mode)
            except PolicyError as e:
                raise exceptions.OptionsError(f"authgate: {e}") from e
        if "authgate_mode" in updated and "authgate_policy" not in updated:
            house.set_mode(opts.authgate_mode)
        if "authgate_watch" in updated:
            house.watch = bool(opts.authgate_watch)
        if "authgate_lint_upstream" in updated:
            self._lint_mode = opts.authgate_lint_upstream
        if "authgate_log" in updated:
            try:
                house.open_log(opts.authgate_log)
            except OSError as e:
                raise exceptions.OptionsError(
                    f"authgate: cannot open authgate_log {opts.authgate_log}: {e.strerror}"
                ) from e
        if "authgate_store" in updated or "authgate_store_timeout" in updated:
            try:
                house.configure_store(opts.authgate_store, opts.authgate_store_timeout)
            except ValueError as e:
                raise exceptions.OptionsError(f"authgate: authgate_store: {e}") from e
        if "authgate_admin" in updated:
            try:
                house.serve_admin(opts.authgate_admin)
            except (OSError, ValueError) as e:
                raise exceptions.OptionsError(f"authgate: admin: {e}") from e
        if "authgate_metrics" in updated:
            try:
                house.serve_metrics(opts.authgate_metrics)
            except (OSError, ValueError) as e:
                raise exceptions.OptionsError(f"authgate: metrics: {e}") from e
        if "authgate_otlp" in updated:
            try:
                house.configure_tracing(opts.authgate_otlp, "gateway")
            except ValueError as e:
                raise exceptions.OptionsError(f"authgate: authgate_otlp: {e}") from e

    def running(self) -> None:
        if not self.house.start(self._in_clear_where()):
            logger.error(
                "authgate: no policy; pass --set authgate_policy=FILE "
                "(for example policies/example.yaml). Every request is answered 503."
            )

    def _in_clear_where(self) -> str | None:
        """Where the proxy listens in clear text (None: TLS only)."""
        if self.master.addons.get("tlslistener") is not None:
            return None  # `authgate run --tls-cert`: the port refuses plain HTTP
        options = self.master.options
        for mode in options.mode:
            if "@" in mode:
                return str(mode.rpartition("@")[2])
        return f"*:{options.listen_port or 8080}"

    def _keep_host_header(self) -> bool:
        options = self.master.options
        return "keep_host_header" in options and bool(options.keep_host_header)

    def ready(self) -> Readiness:
        return self.house.ready()

    async def drain(self, grace: float) -> int:
        return await self.house.drain(grace)

    async def reload(self, why: str) -> bool:
        return await self.house.reload(why)

    def status(self) -> dict[str, Any]:
        return self.house.status()

    def done(self) -> None:
        views.detach(self)
        self.house.close()

    # --- commands ----------------------------------------------------------------

    @command.command("authgate.reload")
    def reload_command(self) -> str:
        """Reload the policy now (the result shows in authgate.status and the log)."""
        if not self.house.reload_later("requested"):
            return "authgate: not running yet"
        return "authgate: reload started; see authgate.status"

    @command.command("authgate.status")
    def status_command(self) -> str:
        """The policy in force, the last reload error, report-mode and lint counts."""
        return json.dumps(self.status(), indent=2)

    @command.command("authgate.lint")
    def lint_command(self) -> str:
        """Backend auth mistakes seen so far, per rule and kind."""
        return json.dumps(self.lint.summary(), indent=2)

    # --- hooks -------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        # Not `async def`: most requests are judged in place (limits in this
        # process's memory, no slow work), with no coroutine made for them;
        # the rest return one, which mitmproxy awaits.
        if flow.response is not None or flow.error is not None:
            return None
        house = self.house
        try:
            policy = house.policy  # this request's policy, even if a reload swaps it
            view = request_view(flow)
            flow.metadata[REQUEST_ID_KEY] = request_id(
                policy, view.header_all("x-request-id"), view.peer
            )
            house.in_flight.add(flow.id)
            if policy is None:
                self._fail(flow, 503, "no_policy")
                return None
            setattr(flow, views.JUDGED, view)  # for the content view: as judged
            if house.tracing is not None:
                return self._judge_traced(flow, house.tracing, policy, view)
            now = self.clock()
            judged = house.judge_now(policy, view, now)
            if judged is not None:
                decision, events = judged
                self._apply(flow, policy, view, decision, "", events)
                return None
        except Exception:  # noqa: BLE001 - the one place that must catch everything
            self._crashed(flow)
            return None
        return self._judge_waiting(flow, policy, view, now)

    async def _judge_waiting(
        self, flow: http.HTTPFlow, policy: Policy, view: RequestView, now: float
    ) -> None:
        """requestheaders for a request that waits: for the shared store, or for
        slow work (bcrypt, a key set, introspection, the login's provider)."""
        try:
            decision, without_store, events = await self.house.judge(policy, view, now)
            self._apply(flow, policy, view, decision, without_store, events)
        except Exception:  # noqa: BLE001 - the one place that must catch everything
            self._crashed(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        # Fail closed: a request that reaches here unjudged is never forwarded.
        if flow.response is not None or METADATA_KEY in flow.metadata:
            if self.house.tracing is not None and flow.response is None:
                self._forward_traced(flow)  # the body is in: now to the backend
            return
        logger.error("authgate: a request reached the request hook unjudged; answering 500")
        self._fail(flow, 500, "unjudged")

    def error(self, flow: http.HTTPFlow) -> None:
        self.house.in_flight.discard(flow.id)
        if self.house.tracing is not None:
            self._end_traced(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self.house.in_flight.discard(flow.id)
        if self.house.tracing is not None:
            self._end_traced(flow)
        entry = flow.metadata.get(METADATA_KEY)
        if flow.response is None or not isinstance(entry, dict) or not entry.get("forwarded"):
            return
        for cookie in flow.metadata.get(COOKIES_KEY, ()):
            # A session refreshed or touched on the way in goes back with the answer.
            flow.response.headers.add("Set-Cookie", cookie)
        # RFC 6750 §2.3: a response to a request authenticated by a query
        # token must not be stored by shared caches.
        if entry.get("via") == "query" and "cache-control" not in flow.response.headers:
            flow.response.headers["Cache-Control"] = "private"
        mode = self._lint_mode  # (an option read deep-copies its value: read in configure)
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
        `authgate.explain @all`, `@marked`, or a filter quoted whole:
        `authgate.explain '~comment "authgate: [45]"'`."""
        policy = self.policy
        if policy is None:
            raise exceptions.CommandError("authgate: no policy loaded")
        for f in flows:
            if isinstance(f, http.HTTPFlow):
                view = request_view(f)
                told = explain_request(policy, view, self.clock(), self.limiter, self.house.bans)
                text = told.text().rstrip("\n")
                decided = f.comment.split(EXPLAINED, 1)[0].rstrip("\n")
                f.comment = f"{decided}{EXPLAINED}{text}"
                logger.info("authgate.explain:\n" + text)

    # --- traces (authgate_otlp) -----------------------------------------------

    async def _judge_traced(
        self, flow: http.HTTPFlow, tracing: Tracing, policy: Policy, view: RequestView
    ) -> None:
        try:
            await self._traced(flow, tracing, policy, view)
        except Exception:  # noqa: BLE001 - the one place that must catch everything
            self._crashed(flow)

    async def _traced(
        self, flow: http.HTTPFlow, tracing: Tracing, policy: Policy, view: RequestView
    ) -> None:
        """requestheaders with traces: the request's server span, the decision's
        span around the judging (the store, bcrypt and key-set spans go
        under it), and for a forwarded request the forward span (see
        `_forward_traced`)."""
        req = flow.request
        peer = view.peer
        try:
            client = peer_ip(peer)
            trusted = policy.trusted_proxies.contains(client.family, client.value)
        except ValueError:
            trusted = False
        server = tracing.server(
            "authgate.request",
            req.headers.get_all("traceparent"),
            req.headers.get_all("tracestate"),
            trusted,
            {"http.request.method": view.method, "network.peer.address": peer},
        )
        traced = Traced(tracing, server)
        setattr(flow, TRACED, traced)
        rid = flow.metadata[REQUEST_ID_KEY]
        with tracing.decision(server) as span:
            decision, without_store, events = await self.house.judge(policy, view, self.clock())
            tracing.decided(span, decision, rid)
        tracing.decided(server, decision, rid)
        self._apply(flow, policy, view, decision, without_store, events)
        if decision.forwarded:
            traced.forwarding = True
            # A streamed body goes to the backend right after this hook, the
            # headers first; any other request after its body (the request hook).
            options = self.master.options
            if req.stream or ("stream_large_bodies" in options and options.stream_large_bodies):
                self._forward_traced(flow)

    def _forward_traced(self, flow: http.HTTPFlow) -> None:
        """The forward span starts: the backend gets a `traceparent` naming it
        (the client's `traceparent` and `tracestate` are replaced)."""
        traced: Traced | None = getattr(flow, TRACED, None)
        if traced is None or not traced.forwarding or traced.forward is not None:
            return
        req = flow.request
        server = flow.server_conn.address
        attributes: dict[str, str | int] = {"http.request.method": req.method}
        if server:
            attributes["server.address"] = str(server[0])
            attributes["server.port"] = int(server[1])
        span, fields = traced.tracing.forward(traced.server, attributes)
        traced.forward = span
        req.headers.fields = tuple(
            f for f in req.headers.fields if f[0].lower() not in _TRACE_FIELDS
        ) + tuple((k.encode(), v.encode()) for k, v in fields)

    def _end_traced(self, flow: http.HTTPFlow) -> None:
        """The response (or the error) ends the spans: the forward span when the
        backend's response headers came (mitmproxy's timestamp_start)."""
        traced: Traced | None = getattr(flow, TRACED, None)
        if traced is None:
            return
        delattr(flow, TRACED)
        tracing, response = traced.tracing, flow.response
        error = flow.error.msg if flow.error is not None else None
        status = response.status_code if response is not None else None
        if traced.forward is not None:
            at = response.timestamp_start if response is not None and error is None else None
            tracing.end(traced.forward, status, error, at, client=True)
        tracing.end(traced.server, status, error)

    # --- the work ------------------------------------------------------------

    def _crashed(self, flow: http.HTTPFlow) -> None:
        """Called from an `except` around judging: log it, answer 500, never forward."""
        logger.exception("authgate: error while judging a request; answering 500")
        self._fail(flow, 500, "internal_error")

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
        flow.comment = f"{failed(status, reason)}\nauthgate: {status} {reason}"
        flow.marked = DENIED_MARKER

    def _apply(
        self,
        flow: http.HTTPFlow,
        policy: Policy,
        view: RequestView,
        decision: Decision,
        without_store: str = "",
        events: tuple[WatchEvent, ...] = (),
    ) -> None:
        if decision.forwarded:
            # Report mode too: forwarded as if allowed, and nothing of the
            # would-be denial reaches the client.
            self._forward(flow, policy, view.peer, decision)
            if decision.cookies and decision.allowed:
                # (Report mode's would-be denials change nothing for the client.)
                flow.metadata[COOKIES_KEY] = decision.cookies
        else:
            accept = flow.request.headers.get("accept")
            rid = flow.metadata[REQUEST_ID_KEY]
            rendered = render(
                decision, policy.realm, flow.request.method, accept=accept, request_id=rid
            )
            _respond(flow, rendered)
        self._record(flow, view, decision, without_store, events)

    def _forward(self, flow: http.HTTPFlow, policy: Policy, peer: str, d: Decision) -> None:
        req = flow.request
        data = req.data  # (mitmproxy's properties decode on every read)
        if req.path != d.target:
            req.path = d.target
        if data.authority and data.http_version.startswith(b"HTTP/1"):
            req.authority = ""  # absolute-form: forward as origin-form, judged path only
        # The headers are rebuilt in one assignment (mitmproxy's per-header
        # operations are comparatively slow): client-sent identity headers,
        # fields backends trust and X-Forwarded-For out, ours in,
        # X-Forwarded-For with the peer appended.
        forwarding = self._forwarding
        if forwarding is None or forwarding[0] is not policy:
            forwarding = self._forwarding = (policy, Forwarding.of(policy))
        how = forwarding[1]
        client = peer_ip(peer)
        drop = how.drop[policy.trusted_proxies.contains(client.family, client.value)]
        login = policy.login
        who = d.identity
        if login is not None and login.forward_access_token and who and who.method == OIDC:
            drop = drop | {b"authorization"}  # the session's access token stands in for it
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
            if lower not in _SPECIAL:
                if lower not in drop:
                    fields.append((name, value))
            elif lower == b"x-forwarded-for":
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
        if options:
            kept = [o for o in dict.fromkeys(options) if o != b"upgrade" or upgrade]
            if kept:
                fields.append((b"Connection", b", ".join(kept)))
        fields.extend(self._wire(d.upstream_headers))
        fields.append((b"X-Request-Id", flow.metadata[REQUEST_ID_KEY].encode()))
        chain.append(client.address)
        fields.append((b"X-Forwarded-For", ", ".join(chain).encode("latin-1")))
        req.headers.fields = tuple(fields)

    def _wire(self, headers: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
        """The identity's fields as bytes. An identity's tuple is made once
        (a cached token's is the same object request after request), so its
        encoding is kept by the tuple's id, the tuple itself kept beside it so
        that the id cannot be reused while the entry lives."""
        seen = self._encoded.get(id(headers))
        if seen is not None and seen[0] is headers:
            return seen[1]
        wire = [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in headers]
        if len(self._encoded) >= _WIRE_KEEP:
            self._encoded.clear()
        self._encoded[id(headers)] = (headers, wire)
        return wire

    def _record(
        self,
        flow: http.HTTPFlow,
        view: RequestView,
        d: Decision,
        without_store: str,
        events: tuple[WatchEvent, ...] = (),
    ) -> None:
        rid = flow.metadata.get(REQUEST_ID_KEY)
        # The request as judged (the view), not as forwarded.
        entry = self.house.record(d, rid, view.method, view.target, without_store, events)
        flow.metadata[METADATA_KEY] = entry
        rule = f" by rule {d.rule}" if d.rule else ""
        outcome = d.outcome
        # The first line in a few words, for mitmweb's narrow Comment column
        # ("403 user-record: sub≠{id}"); the second for filters.
        head = headline(d, self.policy) if outcome != "allow" else headline(d)
        if d.reason in LOGIN_STEPS or (d.reason == PROVIDER_UNAVAILABLE and d.rule is None):
            # A step of an OpenID Connect login: what happened, the tokens
            # decoded (never a token, a code or a secret).
            flow.comment = f"{head}\nauthgate: {d.status} ({d.reason})\n{d.detail}"
            flow.marked = "" if d.status in (303, 405) else DENIED_MARKER
            return
        if outcome == "allow":
            # "allowed by rule R (allowed)", "allowed by rule R (preflight)": every
            # comment names its rule followed by a space, so one filter finds them.
            flow.comment = f"{head}\nauthgate: allowed{rule} ({d.reason})"
            if d.detail:
                flow.comment += f"\n{d.detail}"  # a session refreshed on the way
        elif outcome == "would_deny":
            flow.comment = f"{head}\nauthgate: would deny: {d.status}{rule} ({d.reason})"
            flow.marked = WOULD_DENY_MARKER
        else:
            flow.comment = f"{head}\nauthgate: {d.status}{rule} ({d.reason})"
            flow.marked = DENIED_MARKER
        if events:
            # A security event: this request took a key to a watch's threshold.
            flow.comment += "".join(f"\nauthgate {e.text()}" for e in events)
            flow.marked = WATCH_MARKER
            entry["watch"] = [e.spec.name for e in events]

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
