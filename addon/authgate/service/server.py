"""`authgate serve`: the decision service. An HTTP/1.1 server made for many
small requests (asyncio protocols and the llhttp parser through httptools,
uvloop when installed), in front of the same Gatehouse that judges for the
mitmproxy door: check request in (`checks.read_check`), `Gatehouse.judge`,
answer out (`checks.answer`).

- Keep-alive and pipelining (answers in order); no request body is needed:
  one is read and dropped (at most MAX_BODY, then 413 and close).
- A request head must be complete within `header_timeout` seconds; an idle
  connection closes after `idle_timeout`.
- Fail closed: an exception while judging answers 503 (never an allow).
- SIGHUP reloads the policy; SIGTERM stops listening, lets the checks in
  flight finish (at most GRACE_SECONDS), then exits; SIGINT exits now.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools

from authgate.core.decision import Decision
from authgate.core.ipset import parse_ip
from authgate.core.model import Policy
from authgate.core.responses import Rendered, render_error
from authgate.house.gatehouse import Gatehouse, WatchEvent, request_id
from authgate.policy.marks import PolicyError
from authgate.service import checks

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from authgate.runtime.otel import Tracing

logger = logging.getLogger("authgate")
MAX_HEAD = 64 * 1024  # request line and header fields, at most
MAX_BODY = 64 * 1024  # a check request's body (dropped), at most
GRACE_SECONDS = 25.0
LINGER_SECONDS = 2.0  # after refusing a request, what the client still sends is dropped
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_S = "surrogateescape"


def encode(r: Rendered, keep_alive: bool) -> bytes:
    """The bytes of an HTTP/1.1 answer."""
    lines = [b"HTTP/1.1 %d %s" % (r.status, _REASONS.get(r.status, b""))]
    for name, value in r.headers:
        lines.append(name.encode("latin-1") + b": " + value.encode("utf-8", _S))
    lines.append(b"Content-Length: %d" % len(r.body))
    if not keep_alive:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + r.body


def unreadable(status: int) -> Rendered:
    """The answer to a request that cannot be read: 400, 413 or 431, problem+json
    (the request's Accept may not have been read). core.responses has no text
    for 413 and 431: they are the service's own."""
    base = render_error(400, "GET")
    if status == 400:
        return checks.denied(base)
    problem = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": "The request cannot be read; it was not judged.",
    }
    body = json.dumps(problem, separators=(", ", ": ")).encode() + b"\n"
    return checks.denied(Rendered(status, base.headers, body))


class Service:
    """What every connection shares: the house, the settings, the listeners."""

    def __init__(self, house: Gatehouse, header_timeout: float = 10, idle_timeout: float = 60):
        self.house = house
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[Connection] = set()
        self.stopping = False

    def begin(
        self, method: str, target: str, fields: list[tuple[str, str]], peer: str
    ) -> Rendered | Pending:
        """A check request up to judging: an answer already (refused, the
        replay of a sealed answer), or what judging needs."""
        policy = self.house.policy

        def unavailable() -> Rendered:
            accept = next((v for k, v in fields if k == "accept"), None)
            return checks.denied(render_error(503, method, retry_after=5, accept=accept))

        if policy is None:
            return unavailable()
        if any(k == checks.REFUSED for k, _ in fields):
            # The nginx configuration's fail-closed route: authgate did not say allow.
            return unavailable()
        try:
            family, value = parse_ip(peer)
            trusted = policy.trusted_proxies.contains(family, value)
        except ValueError:
            trusted = False
        if target.split("?", 1)[0] == "/_answer":
            sealed = next((v for k, v in fields if k == "x-authgate-answer"), "")
            replay = checks.unseal(sealed) if trusted else None
            return replay or unavailable()
        read = checks.read_check(method, target, fields, peer, trusted)
        if isinstance(read, checks.Refusal):
            return read.rendered
        rid = request_id(policy, read.view.header_all("x-request-id"), peer)
        return Pending(policy, read, rid)

    def finish(
        self,
        p: Pending,
        decision: Decision,
        without_store: str = "",
        events: tuple[WatchEvent, ...] = (),
    ) -> Rendered:
        view = p.check.view
        self.house.record(decision, p.request_id, view.method, view.target, without_store, events)
        rendered = checks.answer(p.check, decision, p.policy.realm, p.request_id)
        if p.span is not None and self.house.tracing is not None:
            self.house.tracing.decided(p.span, decision, p.request_id)
            self.house.tracing.end(p.span, rendered.status)
        return rendered

    def failed(self, p: Pending) -> Rendered:
        """Fail closed: an exception while judging is a 503, never an allow."""
        logger.exception("authgate: error while judging a check request; answering 503")
        view = p.check.view
        accept = view.header("accept")
        rendered = render_error(
            503, view.method, retry_after=5, accept=accept, request_id=p.request_id
        )
        if p.span is not None and self.house.tracing is not None:
            self.house.tracing.end(p.span, 503, "internal_error")
        return checks.denial(p.check, rendered)

    def check_now(
        self, method: str, target: str, fields: list[tuple[str, str]], peer: str
    ) -> Rendered | Pending:
        """The answer, if it needs no waiting; else what `check` continues."""
        p = self.begin(method, target, fields, peer)
        if isinstance(p, Rendered):
            return p
        if self.house.tracing is not None:
            return self._check_now_traced(p, self.house.tracing)
        try:
            judged = self.house.judge_now(p.policy, p.check.view, self.house.clock())
        except Exception:  # noqa: BLE001 - the one place that must catch everything
            return self.failed(p)
        return p if judged is None else self.finish(p, judged[0], "", judged[1])

    async def check(self, p: Pending) -> Rendered:
        """Judge with the store and the slow work (a shared store, a bcrypt, a key fetch)."""
        house = self.house
        house.in_flight.add(p)
        try:
            tracing = house.tracing
            if tracing is None:
                decision, without_store, events = await house.judge(
                    p.policy, p.check.view, house.clock()
                )
            else:
                if p.span is None:  # pipelined: not started by check_now
                    p.span = self._server_span(p, tracing)
                with tracing.decision(p.span) as span:
                    decision, without_store, events = await house.judge(
                        p.policy, p.check.view, house.clock()
                    )
                    tracing.decided(span, decision, p.request_id)
            return self.finish(p, decision, without_store, events)
        except Exception:  # noqa: BLE001 - the one place that must catch everything
            return self.failed(p)
        finally:
            house.in_flight.discard(p)

    # --- traces (authgate_otlp) -----------------------------------------------------

    @staticmethod
    def _server_span(p: Pending, tracing: Tracing) -> Span:
        """The check's span. Its parent is the check request's `traceparent`:
        only trusted proxies are judged (the proxy decides whether a client's
        own `traceparent` reaches the service)."""
        view = p.check.view
        attributes = {
            "http.request.method": view.method,
            "network.peer.address": view.peer,
            "authgate.check": p.check.door,
        }
        return tracing.server(
            "authgate.check",
            view.header_all("traceparent"),
            view.header_all("tracestate"),
            True,
            attributes,
        )

    def _check_now_traced(self, p: Pending, tracing: Tracing) -> Rendered | Pending:
        """check_now with traces: the check's span, and the decision's when it
        needs no waiting (else `check` judges under a decision span of its own)."""
        p.span = self._server_span(p, tracing)
        try:
            span = tracing.start_decision(p.span)
            judged = self.house.judge_now(p.policy, p.check.view, self.house.clock())
        except Exception:  # noqa: BLE001 - the one place that must catch everything
            return self.failed(p)
        if judged is None:
            return p  # the decision span is dropped unended: never exported
        decision, events = judged
        tracing.decided(span, decision, p.request_id)
        span.end()
        return self.finish(p, decision, "", events)

    async def sweep(self) -> None:
        """Close connections past their deadline (head or idle timeout), once a
        second: cheaper than a timer per request."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.deadline < now and not conn.busy:
                    conn.close_now()


@dataclass(eq=False, slots=True)
class Pending:
    """A check request waiting for its decision."""

    policy: Policy
    check: checks.Check
    request_id: str
    span: Span | None = None  # the check's server span (tracing on)


class Connection(asyncio.Protocol):
    """One client connection: parse, judge in order, answer."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.transport: Any = None  # asyncio's or uvloop's transport
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[tuple[str, str]] = []
        self.head_size = 0
        self.body_size = 0
        # A head that spans several reads, counted as its bytes arrive: httptools
        # holds a field until it ends, so `_grow` alone would let one endless
        # field grow (and be copied again at every read) until the header timeout.
        self.in_head = False
        self.completed = 0  # requests read whole on this connection
        self.raw_head = 0
        self.queue: deque[tuple[Rendered | Pending, bool]] = deque()
        self.busy = False
        self.closing = False
        self.failed = 0  # a request could not be read: its status, answered after those before it
        self.deadline = 0.0  # monotonic time after which an unbusy connection closes

    # --- asyncio --------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else "0.0.0.0"
        # IPv4-mapped IPv6 addresses and scope ids, as the proxy door normalizes them.
        host = host.split("%")[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        self.peer = host
        self.service.connections.add(self)
        self.deadline = time.monotonic() + self.service.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.connections.discard(self)
        self.closing = True

    def data_received(self, data: bytes) -> None:
        if self.closing or self.failed:
            return
        completed = self.completed
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400)
        except httptools.HttpParserError:
            self._fail(400)
        if self.in_head and self.completed == completed:
            # No request ended in this read, and a head is open: the read is the
            # head's (but CR LF between requests). Else not counted, at most one read.
            self.raw_head += len(data)
            if self.raw_head > MAX_HEAD:
                self._fail(431)

    # --- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.fields = []
        self.head_size = 1
        self.body_size = 0
        self.in_head = True
        self.raw_head = 0
        # The head must be whole within the header timeout, counted from its
        # first byte: not from every read (CR LF between requests, or a body
        # sent a byte at a time, would hold a connection open for good).
        self.deadline = time.monotonic() + self.service.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value))
        self.fields.append((name.decode("latin-1").lower(), value.decode("utf-8", _S)))

    def on_headers_complete(self) -> None:
        self.head_size = 0
        self.in_head = False
        self.deadline = time.monotonic() + self.service.idle_timeout

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > MAX_BODY:
            self._fail(413)

    def on_message_complete(self) -> None:
        self.completed += 1
        if self.closing or self.failed:
            return
        if self.parser.should_upgrade():
            self._fail(400)  # a check request never switches protocols
            return
        method = self.parser.get_method().decode("latin-1")
        keep = self.parser.should_keep_alive()
        target = self.url.decode("utf-8", _S)
        if self.busy:
            # Pipelined behind a request still being judged: answers go in order.
            self.queue.append((self.service.begin(method, target, self.fields, self.peer), keep))
            return
        now = self.service.check_now(method, target, self.fields, self.peer)
        if isinstance(now, Rendered):
            self._send(now, keep)
        else:
            self.busy = True
            self.queue.append((now, keep))
            asyncio.get_running_loop().create_task(self._run())

    # --- the work --------------------------------------------------------------------

    async def _run(self) -> None:
        service = self.service
        while self.queue and not self.closing:
            item, keep = self.queue.popleft()
            answer = item if isinstance(item, Rendered) else await service.check(item)
            if not self._send(answer, keep):
                break
        self.busy = False
        self.deadline = time.monotonic() + service.idle_timeout
        if self.failed and not self.closing:
            self._refuse()

    def _send(self, answer: Rendered, keep: bool) -> bool:
        """Write an answer; False when the connection is done."""
        keep = keep and not self.service.stopping
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(encode(answer, keep))
        if not keep:
            self.closing = True
            self.transport.close()
            return False
        return True

    def _grow(self, size: int) -> None:
        self.head_size += size
        if self.head_size > MAX_HEAD:
            self._fail(431)

    def _fail(self, status: int) -> None:
        """A request that cannot be read: answer it after the requests before it
        (answers go in order) and close; read nothing more."""
        if self.closing or self.failed or self.transport is None:
            return
        self.failed = status
        if not self.busy:
            self._refuse()

    def _refuse(self) -> None:
        self.closing = True
        self.transport.write(encode(unreadable(self.failed), keep_alive=False))
        if self.transport.can_write_eof():
            # A lingering close: closing with the client's bytes unread would
            # reset the connection, and the client could lose the answer. Read
            # and drop them for a moment (the sweep closes), or until the client closes.
            self.transport.write_eof()
            self.deadline = time.monotonic() + LINGER_SECONDS
        else:
            self.transport.close()

    def close_now(self) -> None:
        if self.transport is not None:
            self.closing = True
            self.transport.close()

    def close_when_idle(self) -> None:
        if not self.busy:
            self.close_now()


# --- the process -------------------------------------------------------------------------


def _listen_socket(listen: str, share: bool) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if share:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, int(port)))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


OPTIONS = {
    "authgate_log": str,
    "authgate_mode": str,
    "authgate_watch": bool,
    "authgate_store_timeout": float,
    "authgate_metrics": str,
    "authgate_header_timeout": float,
    "authgate_idle_timeout": float,
    "authgate_otlp": str,
}


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """`--set NAME=VALUE` for the options the decision service knows. Raises ValueError."""
    out: dict[str, Any] = {}
    for item in sets:
        name, sep, value = item.partition("=")
        kind = OPTIONS.get(name)
        if not sep or kind is None:
            known = ", ".join(sorted(OPTIONS))
            raise ValueError(f"--set {item!r}: expected NAME=VALUE, NAME one of {known}")
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(f"--set {name}: expected true or false, not {value!r}")
            out[name] = value.lower() in ("true", "1", "yes", "on")
        elif kind is float:
            try:
                out[name] = float(value)
            except ValueError:
                raise ValueError(f"--set {name}: expected a number, not {value!r}") from None
            if out[name] <= 0:
                raise ValueError(f"--set {name}: must be above 0")
        else:
            out[name] = value
    if out.get("authgate_mode", "") not in ("", "enforce", "report"):
        raise ValueError("--set authgate_mode: expected enforce or report")
    return out


async def run_service(
    policy: str,
    listen: str,
    sets: Sequence[str] = (),
    store: str = "memory",
    admin: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    on_ready: str | None = None,
    grace: float = GRACE_SECONDS,
) -> int:
    """Serve until SIGTERM/SIGINT; 2 when the policy or options are refused."""
    try:
        options = parse_sets(sets)
    except ValueError as e:
        print(f"authgate serve: {e}", file=sys.stderr)
        return 2
    house = Gatehouse()
    house.no_client_certs = (
        "the decision service sees no client certificates (the proxy in front of it "
        "ends TLS); docs/decision-service.md"
    )
    try:
        # keep_host_header: the Host judged is the client's, as the proxy tells it
        # (X-Forwarded-Host on /auth and /nginx, Host on /envoy): `host` rules work.
        house.load(policy, True, options.get("authgate_mode", ""))
        house.watch = options.get("authgate_watch", True)
        house.open_log(options.get("authgate_log", ""))
        house.configure_store(store, options.get("authgate_store_timeout", 0.05))
        if admin:
            house.serve_admin(admin)
        house.serve_metrics(options.get("authgate_metrics", ""))
        house.configure_tracing(options.get("authgate_otlp", ""), "service")
        context = _tls(tls_cert, tls_key)
        share = os.environ.get("AUTHGATE_SHARE_PORT") == "1"
        sock = _listen_socket(listen, share)
    except PolicyError as e:
        print(f"authgate: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, ssl.SSLError) as e:
        print(f"authgate serve: {e}", file=sys.stderr)
        house.close()
        return 2
    service = Service(
        house,
        options.get("authgate_header_timeout", 10.0),
        options.get("authgate_idle_timeout", 60.0),
    )
    # What start-up made (the policy above all) lives as long as the process:
    # out of the collector's way, so that its passes stay short (p99).
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(service), sock=sock, ssl=context)
    sweeper = loop.create_task(service.sweep())
    bound = sock.getsockname()
    scheme = "https" if context else "http"
    host = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
    house.start(None if context else f"{host}:{bound[1]}")
    if os.environ.get("AUTHGATE_WORKER", "0") == "0":
        logger.info(f"authgate: decision service on {scheme}://{host}:{bound[1]}")
    if on_ready:
        print(on_ready, flush=True)
    stopped = loop.create_future()

    def stop(now: bool) -> None:
        if not stopped.done():
            stopped.set_result(now)

    loop.add_signal_handler(signal.SIGTERM, stop, False)
    loop.add_signal_handler(signal.SIGINT, stop, True)
    loop.add_signal_handler(signal.SIGHUP, lambda: house.reload_later("SIGHUP"))
    now = await stopped
    server.close()  # no new connections
    service.stopping = True
    house.draining = True
    for conn in list(service.connections):
        conn.close_when_idle()
    if not now:
        deadline = time.monotonic() + grace
        while (house.in_flight or any(c.busy for c in service.connections)) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.02)
    sweeper.cancel()
    house.close()
    return 0


def serve(policy: str, listen: str, sets: Sequence[str] = (), **kwargs: Any) -> int:
    """Run the decision service in this process (uvloop when installed)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_service(policy, listen, sets, **kwargs))
    return uvloop.run(run_service(policy, listen, sets, **kwargs))
