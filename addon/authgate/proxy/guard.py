"""Guards for what mitmproxy's HTTP layers leave unbounded or answer themselves.

Two addons and five pinned patches of mitmproxy's HTTP layers:

- A denial goes out before the request body. When a response is set in
  `requestheaders` (every gateway denial) and the body has not arrived yet,
  the denial is sent at once, with `Connection: close` on HTTP/1; the
  connection is then closed in stages (RFC 9112 §9.6): our side half-closes,
  what still comes is read and thrown away until LINGER_BYTES (then reading
  stops; about 0.4-0.7 MB in all were read in tests, counting what came while
  the hooks ran), and LINGER_SECONDS after the answer the connection is closed
  for good. On HTTP/2 the stream is reset (CANCEL) after the complete answer,
  and the connection stays open. A client waiting for `100 Continue` gets the
  denial instead (RFC 9110 §10.1.1). A body that is already in full when the
  hooks finish is answered the usual way, keeping the connection.
- `ClientTimeouts`: a request head (request line and header fields) must be
  complete `authgate_header_timeout` seconds (default 10) after the
  connection opened, or after the first byte of a later request on a
  keep-alive connection; a connection with no request in flight is closed
  after `authgate_idle_timeout` seconds (default 60). Closing is what
  mitmproxy's own inactivity timeout does (cancel the connection's task): no
  bytes are sent.
- `ClientTimeouts` also caps the client connections open at once,
  `authgate_max_connections` (nginx's `worker_connections`): 0, the default,
  derives the cap at start from the soft RLIMIT_NOFILE, as
  (limit - descriptors open at start - FD_RESERVE) // 2, two descriptors a
  client connection (its own and a backend connection's). A client that
  connects at the cap makes room by closing the keep-alive connection idle
  the longest (no bytes sent, as the idle timeout does); with none idle, the
  new connection is closed at once, unanswered (mitmproxy closes a
  connection whose `client.error` the `client_connected` hook set). Without
  the cap, idle keep-alive connections held open by one client used up the
  descriptors, and then nothing was answered, `/health` included. At most one
  warning every CAP_LOG_SECONDS says what the cap did.
- Trailer fields (after a chunked body's last chunk) are discarded, never
  forwarded (RFC 9110 §6.5.1), on HTTP/1 in both directions and on HTTP/2
  requests; the request is judged and answered as any other. mitmproxy's
  HTTP/1 reader raised on them and left the connection open for good. A
  trailer section or a chunk-size line longer than MAX_TRAILER_BYTES is a
  protocol error: a request gets a 400 (unless answered already) and the
  connection closes.
- A safety net: an exception in mitmproxy's HTTP layer for a client
  connection (mitmproxy logs "mitmproxy has crashed!" and leaves the
  connection open, past every timeout above) is logged at error level,
  naming the peer, fails the connection's open flows (the `error` hook) and
  closes the connection; later events for that layer are ignored.
- Empty lines before a request line are skipped (RFC 9112 §2.2), at most
  MAX_EMPTY_LINES; more closes the connection.
- `BackendErrors`: a backend that cannot be reached, fails, or is too slow
  gets the gateway's own 502 or 504 (problem+json by default,
  `Cache-Control: no-store`, a fixed text naming nothing internal) instead of
  mitmproxy's HTML page naming the backend's address; the real error, with
  the address, is logged at warning level.

Backend timeouts
----------------
- connect, `authgate_connect_timeout`, default 5 s: from mitmproxy's
  `server_connect` hook to the end of the TCP handshake (TLS to the backend
  counts towards the response timeout). A backend sits next to the gateway and
  accepts in milliseconds; 5 s rides out a lost SYN (Linux resends after 1 s
  and 3 s) and fails long before the kernel gives up (about 130 s). 504.
- response, `authgate_response_timeout`, default 60 s: from the `request` hook
  (the request is in, and is about to be forwarded) until the backend's
  complete response is in. mitmproxy buffers responses, so before that the
  client has nothing; a streamed response (`stream_large_bodies`) stops the
  clock at its headers. 60 s is nginx's `proxy_read_timeout`. 504.

What is pinned in mitmproxy
---------------------------
Read in mitmproxy 11.0.2, 12.1.2 and 12.3.1, where everything below is the
same apart from 12's `ErrorCode` enum for protocol-error codes (see
`_STREAM_CANCEL`); tests/test_guard.py passes on 11.0.2 (Python 3.11) and on
12.1.2 and 12.3.1 (Python 3.12), and fails on all three without the guards.
The `read_body` and `HttpLayer._handle_event` patches (and the connection
cap) came later: tests/test_trailers.py and the cap's tests ran on 11.0.2
only; 12.1.2's `read_body` (the NotImplementedError on trailers, the
`CloseConnection` on an h11 ProtocolError), `HttpLayer._handle_event`,
`HttpLayer.streams` and `handle_client`'s `client.error` check read the same.
`install()` refuses other major versions and warns on an unread minor.

- `HttpStream.state_wait_for_request_headers`, wrapped: it runs the
  `requestheaders` hook, then leaves the stream in `state_consume_request_body`,
  which buffers the whole body before a set response is sent (`:293`, `:372`).
  After it, a set response is sent at once (`_answer_before_body`).
- `HttpStream.handle_protocol_error`, wrapped: for a backend failure it runs
  the `error` hook and then sends `SendHttp(ResponseProtocolError)` to the
  client, which `Http1Server.send`/`Http2Connection` turn into
  `make_error_response`/`format_error`. When `BackendErrors.error` set a
  response, that one command is replaced by the response (`_substitute`).
- `Http1Server.read_headers`, wrapped: `ReceiveBuffer.maybe_extract_lines()`
  returns `[]` for a leading empty line, `read_headers` treats that like "head
  incomplete" and waits for more bytes, though the request is in the buffer.
  The wrapper runs it again while it consumed an empty line. It also reports
  to `ClientTimeouts` when a head starts and when it is complete.
- `Http1Connection.read_body`, wrapped: its h11 `ChunkedReader` (the body
  reader `make_body_reader` gives a chunked message) is wrapped in
  `_ChunkedBody`, which turns an `EndOfMessage` with trailer fields into one
  without (`read_body` raises NotImplementedError on trailers) and raises
  h11's `RemoteProtocolError` past MAX_TRAILER_BYTES; `read_body` turns that
  into `CloseConnection` and a protocol error for the stream, and the wrapper
  sends a 400 before the close where no response went out yet.
- `HttpLayer._handle_event`, wrapped: the safety net above. On an exception
  it yields `CloseConnection(client)`, then `HttpErrorHook` for the flows of
  `HttpLayer.streams` still live.
- Also relied on: `Layer._paused_event_queue` (events that came during a hook;
  mitmproxy's `check_killed` reads it too), `Proxyserver.connections` keyed by
  client id, `ConnectionHandler.transports[conn].handler` (the task that
  mitmproxy's own inactivity timeout cancels), and `Server.timestamp_start`,
  set just before the TCP connect (after the per-address connection limit).
  `ConnectionHandler.handle_client` closes a client whose `client.error` is
  set after the `client_connected` hook. `BackendErrors.request` clears
  `flow.request.trailers` of a forwarded flow: HttpStream sends trailers
  after the `request` hook (an HTTP/1 backend's `Http1Client.send` raises on
  them), and `BackendErrors.response` those of a response to an HTTP/1
  client (sent after the `response` hook; `Http1Server.send` raises on them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
import types
from collections.abc import Generator
from http import HTTPStatus
from typing import Any

import h11
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import connection, exceptions, http
from mitmproxy import version as mitmproxy_version
from mitmproxy.connection import ConnectionState
from mitmproxy.flow import Error as FlowError
from mitmproxy.net.http import http1, status_codes
from mitmproxy.proxy import commands, events, layer, server_hooks
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import _events as http_events
from mitmproxy.proxy.layers.http import _hooks as http_hooks
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.utils import human

from authgate.core.responses import render_error
from authgate.proxy.addon import REQUEST_ID_KEY, note_client_host

logger = logging.getLogger("authgate")

GUARD_KEY = "authgate_guard"
LINGER_SECONDS = 2.0  # after an early denial, how long a closing connection is read
LINGER_BYTES = 256 * 1024  # ...and how much of the unwanted body is read, at most
MAX_EMPTY_LINES = 10  # empty lines skipped before a request line (Apache's default)
# A chunked body's trailer section, or one chunk-size line, at most (nginx reads
# a request head into at most 4 buffers of 8 KiB: large_client_header_buffers).
MAX_TRAILER_BYTES = 32 * 1024
FD_RESERVE = 32  # descriptors kept out of the automatic connection cap (logs, JWKS, Redis...)
FDS_PER_CONNECTION = 2  # a client connection and its backend connection
CAP_LOG_SECONDS = 10.0  # at most one warning about the connection cap this often
TRACEBACK_SECONDS = 60.0  # the safety net logs a full traceback at most this often
VERIFIED = ("11.0.2", "12.1.2", "12.3.1")

CONNECT_TIMEOUT_MESSAGE = "authgate: backend connect timeout"
RESPONSE_TIMEOUT_MESSAGE = "authgate: backend response timeout"

HttpStream = http_layer.HttpStream
HttpLayer = http_layer.HttpLayer
Http1Connection = _http1.Http1Connection
Http1Server = _http1.Http1Server
SendHttp = http_layer.SendHttp
DropStream = http_layer.DropStream

# The code that makes mitmproxy's HTTP/2 layer reset a stream with CANCEL: 12
# has an enum, 11 an HTTP status (CLIENT_CLOSED_REQUEST maps to CANCEL).
_error_code = getattr(http_events, "ErrorCode", None)
_STREAM_CANCEL: Any = (
    _error_code.CANCEL if _error_code is not None else status_codes.CLIENT_CLOSED_REQUEST
)

# --- per-connection bookkeeping, shared by the addons and the patched layers ------

HEAD = "head"  # waiting for a request head to complete
BUSY = "busy"  # a request is in flight
IDLE = "idle"  # keep-alive, nothing in flight
LINGER = "linger"  # answered early, closing in stages
CLOSING = "closing"  # closed to make room under the connection cap


class _Conn:
    __slots__ = ("client", "owner", "phase", "flows", "timer", "discarded", "counted")

    def __init__(self, client: connection.Client, owner: ClientTimeouts) -> None:
        self.client = client
        self.owner = owner
        self.phase = HEAD
        self.flows: set[str] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.discarded = 0
        self.counted = False  # counted against the owner's connection cap


# Client id -> its bookkeeping. The patched layers act only on connections in
# here, so a master without ClientTimeouts runs mitmproxy's code unchanged.
_TRACKED: dict[str, _Conn] = {}


class ClientTimeouts:
    """Bounds how long a client may take to send a request head, and how long
    a keep-alive connection may sit idle; closes early-answered connections;
    caps the client connections open at once."""

    def __init__(self) -> None:
        self.master: Any = None
        self.header_timeout = 10
        self.idle_timeout = 60
        self.max_connections = 0  # the cap in force; 0: none (until `running`)
        self._fds_at_start: int | None = None  # counted in `running`
        self._open = 0  # client connections counted against the cap
        self._idle: dict[str, _Conn] = {}  # IDLE connections, idle the longest first
        self._cap_closed = 0  # closed / refused at the cap, not logged yet
        self._cap_refused = 0
        self._cap_log: asyncio.TimerHandle | None = None

    def load(self, loader: Any) -> None:
        _install_or_refuse()
        self.master = loader.master
        loader.add_option(
            "authgate_header_timeout",
            int,
            10,
            "Seconds a client has to send a complete request head (request line and "
            "header fields), counted from the connection's start or from the first "
            "byte of a later request; then the connection is closed.",
        )
        loader.add_option(
            "authgate_idle_timeout",
            int,
            60,
            "Seconds a keep-alive client connection may stay open with no request in "
            "flight; then it is closed.",
        )
        loader.add_option(
            "authgate_max_connections",
            int,
            0,
            "Client connections open at once, at most; at the cap a new one closes the "
            "connection idle the longest, or is refused if none is idle. 0: derived at "
            "start from the open-files limit (RLIMIT_NOFILE), two per connection.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = self.master.options
        for name in ("authgate_header_timeout", "authgate_idle_timeout"):
            if name in updated and getattr(opts, name) < 1:
                raise exceptions.OptionsError(f"authgate: {name} must be at least 1 (seconds)")
        if "authgate_max_connections" in updated:
            if opts.authgate_max_connections < 0:
                raise exceptions.OptionsError(
                    "authgate: authgate_max_connections must be 0 (automatic) or more"
                )
            if self._fds_at_start is not None:
                self._set_cap()
        self.header_timeout = opts.authgate_header_timeout
        self.idle_timeout = opts.authgate_idle_timeout

    def running(self) -> None:
        # Here, not in configure: the listeners and the policy's files are open now,
        # and no client connection yet.
        self._fds_at_start = open_fds()
        self._set_cap()

    def done(self) -> None:
        for key, conn in list(_TRACKED.items()):
            if conn.owner is self:
                _cancel(conn)
                del _TRACKED[key]
        self._idle.clear()
        self._open = 0
        if self._cap_log is not None:
            self._cap_log.cancel()
            self._cap_log = None

    def _set_cap(self) -> None:
        wanted = self.master.options.authgate_max_connections
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fds = self._fds_at_start or 0
        automatic = automatic_max_connections(None if soft == resource.RLIM_INFINITY else soft, fds)
        self.max_connections = wanted or automatic
        if wanted and automatic and wanted > automatic:
            logger.warning(
                f"authgate: authgate_max_connections={wanted} may need more file "
                f"descriptors than the open-files limit ({soft}, {fds} open at start) allows; "
                f"automatic would be {automatic}"
            )
        logger.debug(
            f"authgate: at most {self.max_connections or 'unlimited'} client connections "
            f"(open-files limit {soft}, {fds} open at start)"
        )

    # --- hooks -----------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        if self.max_connections and self._open >= self.max_connections:
            if not self._make_room():
                # mitmproxy closes the connection, unanswered (server.py handle_client).
                client.error = "authgate: connection limit reached"
                self._cap_refused += 1
                self._note_cap()
                return
        conn = _Conn(client, self)
        _TRACKED[client.id] = conn
        conn.counted = True
        self._open += 1
        self._arm(conn, HEAD, self.header_timeout)

    def client_disconnected(self, client: connection.Client) -> None:
        conn = _TRACKED.pop(client.id, None)
        if conn is not None:
            _cancel(conn)
            self._idle.pop(client.id, None)
            if conn.counted and conn.owner is self:
                conn.counted = False
                self._open -= 1

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            # Answered here: never "100 Continue" (the Gateway pops it too).
            flow.request.headers.pop("expect", None)
        conn = _TRACKED.get(flow.client_conn.id)
        if conn is not None and conn.owner is self:
            conn.flows.add(flow.id)
            if conn.phase != LINGER:
                self._busy(conn)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:  # a WebSocket stays busy until websocket_end
            self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    # --- phases ----------------------------------------------------------------------

    def _finished(self, flow: http.HTTPFlow) -> None:
        conn = _TRACKED.get(flow.client_conn.id)
        if conn is None or conn.owner is not self:
            return
        conn.flows.discard(flow.id)
        if not conn.flows and conn.phase == BUSY:
            self._arm(conn, IDLE, self.idle_timeout)

    def _busy(self, conn: _Conn) -> None:
        _cancel(conn)
        if conn.phase == CLOSING:
            return
        conn.phase = BUSY
        self._idle.pop(conn.client.id, None)

    def head_started(self, conn: _Conn) -> None:
        """Bytes of a request head are waiting (called by the HTTP/1 reader)."""
        if conn.phase == IDLE:
            self._arm(conn, HEAD, self.header_timeout)

    def head_complete(self, conn: _Conn) -> None:
        if conn.phase in (HEAD, IDLE):
            self._busy(conn)

    def linger(self, conn: _Conn) -> None:
        """Answered before the body: close for good in LINGER_SECONDS."""
        self._arm(conn, LINGER, LINGER_SECONDS)

    def discard(self, conn: _Conn, size: int) -> None:
        """`size` bytes of an unwanted body were read; stop reading past LINGER_BYTES."""
        conn.discarded += size
        if conn.discarded > LINGER_BYTES:
            # Again on every chunk: asyncio's StreamReader resumes a transport
            # it paused itself once its buffer drains, undoing an earlier pause.
            io = self._io(conn)
            transport = getattr(getattr(io, "writer", None), "transport", None)
            if isinstance(transport, asyncio.ReadTransport) and transport.is_reading():
                transport.pause_reading()

    def _arm(self, conn: _Conn, phase: str, seconds: float) -> None:
        _cancel(conn)
        if conn.phase == CLOSING:
            return
        conn.phase = phase
        self._idle.pop(conn.client.id, None)
        if phase == IDLE:
            self._idle[conn.client.id] = conn  # last: idle the shortest
        loop = asyncio.get_running_loop()
        conn.timer = loop.call_later(seconds, self._expire, conn, phase)

    def _expire(self, conn: _Conn, phase: str) -> None:
        conn.timer = None
        if conn.phase != phase or _TRACKED.get(conn.client.id) is not conn:
            return
        io = self._io(conn)
        if io is None or io.handler is None:
            return
        if phase == IDLE:
            transport = getattr(io.writer, "transport", None)
            if isinstance(transport, asyncio.WriteTransport) and (
                transport.get_write_buffer_size() > 0
            ):
                # Still sending the last response to a slow reader: not idle.
                self._arm(conn, IDLE, self.idle_timeout)
                return
        peer = human.format_address(conn.client.peername)
        if phase == HEAD:
            why = f"request head not complete within {self.header_timeout}s"
        elif phase == IDLE:
            why = f"idle for {self.idle_timeout}s"
        else:
            why = f"closing after an early answer ({conn.discarded} body bytes read and dropped)"
        if phase == LINGER:
            logger.debug(f"authgate: {peer}: {why}")
        else:
            logger.info(f"authgate: closing the connection from {peer}: {why}")
        io.handler.cancel(f"authgate: {why}")

    def _io(self, conn: _Conn) -> Any:
        if self.master is None:
            return None
        handler = self.master.addons.get("proxyserver").connections.get(conn.client.id)
        return None if handler is None else handler.transports.get(conn.client)

    # --- the connection cap --------------------------------------------------------------

    def _make_room(self) -> bool:
        """Close connections idle the longest until one more fits; False if none is idle."""
        for conn in list(self._idle.values()):
            if self._open < self.max_connections:
                break
            io = self._io(conn)
            if io is None or io.handler is None:
                continue
            transport = getattr(io.writer, "transport", None)
            if isinstance(transport, asyncio.WriteTransport) and (
                transport.get_write_buffer_size() > 0
            ):
                continue  # still sending its last response: not idle
            _cancel(conn)
            del self._idle[conn.client.id]
            conn.phase = CLOSING
            conn.counted = False
            self._open -= 1
            self._cap_closed += 1
            io.handler.cancel("authgate: connection limit reached; closing an idle connection")
        if self._cap_closed:
            self._note_cap()
        return self._open < self.max_connections

    def _note_cap(self) -> None:
        if self._cap_log is None:
            self._log_cap()

    def _log_cap(self) -> None:
        """Says what the cap did since the last time; at most once every CAP_LOG_SECONDS."""
        self._cap_log = None
        closed, refused = self._cap_closed, self._cap_refused
        if not (closed or refused):
            return
        self._cap_closed = self._cap_refused = 0
        logger.warning(
            f"authgate: at the connection limit ({self.max_connections}, "
            f"authgate_max_connections): closed {closed} idle keep-alive connection(s), "
            f"refused {refused} new one(s)"
        )
        self._cap_log = asyncio.get_running_loop().call_later(CAP_LOG_SECONDS, self._log_cap)


def open_fds() -> int:
    """File descriptors this process has open (0 where that cannot be read)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(0, len(os.listdir(folder)) - 1)  # less the one listdir used
        except OSError:
            continue
    return 0


def automatic_max_connections(soft_limit: int | None, open_at_start: int) -> int:
    """The cap `authgate_max_connections=0` means: what the soft RLIMIT_NOFILE
    leaves after the descriptors open at start and FD_RESERVE, two a client
    connection; at least 1. 0 (no cap) when the limit is unlimited (None)."""
    if soft_limit is None:
        return 0
    return max(1, (soft_limit - open_at_start - FD_RESERVE) // FDS_PER_CONNECTION)


def _cancel(conn: _Conn) -> None:
    if conn.timer is not None:
        conn.timer.cancel()
        conn.timer = None


# --- the backend's failures -----------------------------------------------------------


class BackendErrors:
    """Connect and response timeouts for the backend, and the gateway's own
    502/504 in place of mitmproxy's error page."""

    def __init__(self) -> None:
        self.master: Any = None
        self.connect_timeout = 5
        self.response_timeout = 60
        self._waiting: dict[str, asyncio.TimerHandle] = {}  # flow id -> response clock
        self._connecting: dict[str, asyncio.TimerHandle] = {}  # server id -> connect clock

    def load(self, loader: Any) -> None:
        _install_or_refuse()
        self.master = loader.master
        loader.add_option(
            "authgate_connect_timeout",
            int,
            5,
            "Seconds the backend has to accept a TCP connection; then the client gets 504.",
        )
        loader.add_option(
            "authgate_response_timeout",
            int,
            60,
            "Seconds the backend has to deliver its complete response (a streamed one: its "
            "headers) after the request is forwarded; then the client gets 504.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = self.master.options
        for name in ("authgate_connect_timeout", "authgate_response_timeout"):
            if name in updated and getattr(opts, name) < 1:
                raise exceptions.OptionsError(f"authgate: {name} must be at least 1 (seconds)")
        self.connect_timeout = opts.authgate_connect_timeout
        self.response_timeout = opts.authgate_response_timeout

    def done(self) -> None:
        for timer in [*self._waiting.values(), *self._connecting.values()]:
            timer.cancel()
        self._waiting.clear()
        self._connecting.clear()

    # --- the response clock ------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return  # answered by the gateway: nothing goes to the backend
        flow.metadata[GUARD_KEY] = {"forwarded": True}
        # Trailer fields are never forwarded (HTTP/2 ones reach here; HTTP/1
        # ones are dropped as they are read): mitmproxy sends them after this hook.
        flow.request.trailers = None
        loop = asyncio.get_running_loop()
        self._waiting[flow.id] = loop.call_later(self.response_timeout, self._response_late, flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.stream:
            self._stop(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._stop(flow)
        if flow.response is not None and flow.request.http_version.startswith("HTTP/1"):
            # An HTTP/2 backend's trailers: mitmproxy's HTTP/1 writer cannot send them.
            flow.response.trailers = None

    def _stop(self, flow: http.HTTPFlow) -> None:
        timer = self._waiting.pop(flow.id, None)
        if timer is not None:
            timer.cancel()

    def _response_late(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)
        entry = flow.metadata.get(GUARD_KEY)
        if not flow.live or not isinstance(entry, dict):
            return
        server = flow.server_conn
        io = self._io(flow.client_conn, server)
        if io is None or io.handler is None:
            return
        if server.timestamp_start is None:
            # Not connecting yet (waiting for one of mitmproxy's per-address
            # connection slots): cancelling now would strand the stream.
            loop = asyncio.get_running_loop()
            self._waiting[flow.id] = loop.call_later(1.0, self._response_late, flow)
            return
        entry["timeout"] = self.response_timeout
        io.handler.cancel(RESPONSE_TIMEOUT_MESSAGE)

    # --- the connect clock -------------------------------------------------------------

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        loop = asyncio.get_running_loop()
        self._connecting[data.server.id] = loop.call_later(
            self.connect_timeout, self._connect_late, data
        )

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._connected(data)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._connected(data)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._connected(data)

    def _connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        timer = self._connecting.pop(data.server.id, None)
        if timer is not None:
            timer.cancel()

    def _connect_late(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._connecting.pop(data.server.id, None)
        server = data.server
        if server.timestamp_tcp_setup is not None or server.error:
            return
        io = self._io(data.client, server)
        if io is None or io.handler is None:
            return
        if server.timestamp_start is None:
            # Waiting for a per-address connection slot, not connecting: see above.
            loop = asyncio.get_running_loop()
            self._connecting[server.id] = loop.call_later(1.0, self._connect_late, data)
            return
        io.handler.cancel(CONNECT_TIMEOUT_MESSAGE)

    def _io(self, client: connection.Client, server: connection.Server) -> Any:
        if self.master is None:
            return None
        handler = self.master.addons.get("proxyserver").connections.get(client.id)
        return None if handler is None else handler.transports.get(server)

    # --- the answer ----------------------------------------------------------------------

    def error(self, flow: http.HTTPFlow) -> None:
        self._stop(flow)
        entry = flow.metadata.get(GUARD_KEY)
        if not isinstance(entry, dict) or "backend_error" not in entry:
            return
        message = str(entry["backend_error"])
        address = human.format_address(flow.server_conn.address)
        what = f"{flow.request.method} {flow.request.path.split('?')[0][:200]}"
        if "timeout" in entry:
            status = 504
            logger.warning(
                f"authgate: backend {address} did not answer {what} within "
                f"{entry['timeout']}s; answered 504"
            )
        elif CONNECT_TIMEOUT_MESSAGE in message:
            status = 504
            logger.warning(
                f"authgate: backend {address} did not accept a connection within "
                f"{self.connect_timeout}s ({what}); answered 504"
            )
        else:
            status = 502
            logger.warning(
                f"authgate: backend {address} failed for {what}: {message}; answered 502"
            )
        r = render_error(
            status,
            flow.request.method,
            accept=flow.request.headers.get("accept"),
            request_id=str(flow.metadata.get(REQUEST_ID_KEY, "")),
        )
        flow.response = http.Response.make(
            r.status, r.body, [(k.encode(), v.encode()) for k, v in r.headers]
        )
        flow.response.reason = HTTPStatus(status).phrase
        entry["replacement"] = True


def addons() -> list[Any]:
    """The guards, to load after the Gateway (its requestheaders must come first)."""
    return [ClientTimeouts(), BackendErrors()]


# --- the patches ---------------------------------------------------------------------

_ORIGINAL: dict[str, Any] = {}


def _answer_before_body(self: Any) -> layer.CommandGenerator[None]:
    """Send the response an addon set in requestheaders, without the body."""
    flow: http.HTTPFlow = self.flow
    response = flow.response
    assert response is not None
    conn = _TRACKED.get(self.context.client.id)
    h1 = flow.request.http_version.startswith("HTTP/1")
    if conn is None or not (h1 or flow.request.is_http2):
        return
    if any(isinstance(e, http_events.RequestEndOfMessage) for e in self._paused_event_queue):
        return  # the whole body is already here: answer as usual, keep the connection
    if h1:
        response.headers["Connection"] = "close"
    self.client_state = types.MethodType(_discard_request_body, self)
    response.timestamp_start = time.time()
    yield http_hooks.HttpResponseHeadersHook(flow)
    if (yield from self.check_killed(True)):
        return
    yield from self.send_response()
    if self.server_state != self.state_done:
        return  # killed in the response hook
    flow.live = False
    client = self.context.client
    yield SendHttp(http_events.ResponseEndOfMessage(self.stream_id), client)
    if h1:
        # RFC 9112 §9.6: half-close, read on a little, then close.
        yield commands.CloseTcpConnection(client, half_close=True)
        conn.owner.linger(conn)
    else:
        # RFC 9113 §8.1: after a complete response, reset the stream so the
        # client stops sending (mitmproxy can send CANCEL, not NO_ERROR).
        message = "authgate: answered before the request body"
        yield SendHttp(
            http_events.ResponseProtocolError(self.stream_id, message, _STREAM_CANCEL), client
        )
        self.client_state = self.state_errored
        yield DropStream(self.stream_id)


def _discard_request_body(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
    """The client state after an early answer: count the body, keep none of it."""
    if isinstance(event, http_events.RequestData):
        conn = _TRACKED.get(self.context.client.id)
        if conn is not None:
            conn.owner.discard(conn, len(event.data))
    elif isinstance(event, http_events.RequestEndOfMessage):
        self.client_state = self.state_done
        yield DropStream(self.stream_id)


def _wait_for_request_headers(self: Any, event: Any) -> layer.CommandGenerator[None]:
    if isinstance(event, http_events.RequestHeaders) and self.context.client.id in _TRACKED:
        note_client_host(event.request)  # before reverse mode rewrites Host
    yield from _ORIGINAL["wait_for_request_headers"](self, event)
    if (
        not event.end_stream
        and self.flow is not None
        and self.flow.response is not None
        and self.client_state == self.state_consume_request_body
    ):
        yield from _answer_before_body(self)


def _handle_protocol_error(self: Any, event: Any) -> layer.CommandGenerator[None]:
    original = _ORIGINAL["handle_protocol_error"](self, event)
    flow = self.flow
    entry = flow.metadata.get(GUARD_KEY) if flow is not None else None
    if not (
        isinstance(event, http_events.ResponseProtocolError)
        and isinstance(entry, dict)
        and self.client_state == self.state_done
        and self.server_state
        in (self.state_wait_for_response_headers, self.state_consume_response_body)
    ):
        yield from original
        return
    entry["backend_error"] = event.message  # read by BackendErrors.error
    yield from _substitute(self, original)


def _substitute(
    self: Any, original: Generator[commands.Command, Any, None]
) -> layer.CommandGenerator[None]:
    """Run `original`, sending the flow's response where it would send
    mitmproxy's error page (its SendHttp(ResponseProtocolError) to the client)."""
    reply: Any = None
    while True:
        try:
            command = original.send(reply)
        except StopIteration:
            return
        reply = None
        entry = self.flow.metadata.get(GUARD_KEY) or {}
        if (
            isinstance(command, SendHttp)
            and isinstance(command.event, http_events.ResponseProtocolError)
            and command.connection == self.context.client
            and entry.get("replacement")
            and self.flow.response is not None
        ):
            response = self.flow.response
            content = response.raw_content or b""
            client = self.context.client
            yield SendHttp(
                http_events.ResponseHeaders(self.stream_id, response, not content), client
            )
            if content:
                yield SendHttp(http_events.ResponseData(self.stream_id, content), client)
            yield SendHttp(http_events.ResponseEndOfMessage(self.stream_id), client)
        else:
            reply = yield command


def _read_headers(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
    original = _ORIGINAL["read_headers"]
    conn = _TRACKED.get(self.conn.id)
    if conn is None or not isinstance(event, events.DataReceived):
        yield from original(self, event)
        return
    for _ in range(MAX_EMPTY_LINES + 1):
        before = len(self.buf)
        yield from original(self, event)
        if self.state != self.read_headers:
            conn.owner.head_complete(conn)
            return
        if not self.buf:
            return  # nothing, or only empty lines: no head has started
        if len(self.buf) >= before:
            conn.owner.head_started(conn)  # an incomplete head is waiting
            return
        # It took an empty line off the front and stopped (RFC 9112 §2.2):
        # read the rest, as mitmproxy does after a response (`mark_done`).
        event = events.DataReceived(self.conn, b"")
    yield commands.Log(
        f"{human.format_address(self.conn.peername)}: more than {MAX_EMPTY_LINES} "
        "empty lines before a request line; closing"
    )
    yield commands.CloseConnection(self.conn)
    self.state = self.done


class _ChunkedBody:
    """h11's ChunkedReader with trailer fields dropped, and bounded: a trailer
    section or chunk-size line past MAX_TRAILER_BYTES is a protocol error."""

    __slots__ = ("reader", "too_large")

    def __init__(self, reader: ChunkedReader) -> None:
        self.reader = reader
        self.too_large = False

    def __call__(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        before = len(buf)
        event = self.reader(buf)
        if event is None:
            # Only a line the reader is waiting for (a chunk size, or the trailer
            # section up to its empty line) stays in the buffer unread.
            if len(buf) > MAX_TRAILER_BYTES:
                self._refuse()
            return None
        if isinstance(event, h11.EndOfMessage) and event.headers:
            if before - len(buf) > MAX_TRAILER_BYTES:
                self._refuse()
            return h11.EndOfMessage()  # RFC 9110 §6.5.1: discarded
        return event

    def _refuse(self) -> None:
        self.too_large = True
        raise h11.RemoteProtocolError(
            f"chunked body: trailer section or chunk-size line over {MAX_TRAILER_BYTES} bytes"
        )

    def read_eof(self) -> h11.EndOfMessage:
        return self.reader.read_eof()


def _bad_request(request: http.Request | None) -> bytes:
    """The gateway's 400, closing the connection, as bytes for an HTTP/1 client."""
    method = request.method if request is not None else "GET"
    accept = request.headers.get("accept") if request is not None else None
    r = render_error(400, method, accept=accept)
    response = http.Response.make(
        r.status, r.body, [(k.encode(), v.encode()) for k, v in r.headers]
    )
    response.reason = HTTPStatus.BAD_REQUEST.phrase
    response.headers["Connection"] = "close"
    raw: bytes = http1.assemble_response(response)
    return raw


def _read_body(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
    original = _ORIGINAL["read_body"]
    reader = self.body_reader
    if type(reader) is ChunkedReader and self.context.client.id in _TRACKED:
        reader = self.body_reader = _ChunkedBody(reader)
    if not isinstance(reader, _ChunkedBody):
        yield from original(self, event)
        return
    commands_ = original(self, event)
    reply: Any = None
    while True:
        try:
            command = commands_.send(reply)
        except StopIteration:
            return
        if (
            reader.too_large
            and isinstance(command, commands.CloseConnection)
            and isinstance(self, Http1Server)
            and self.response is None
            and self.conn.state & ConnectionState.CAN_WRITE
        ):
            # mitmproxy only closes on a body's protocol error; RFC 9112 wants a 400.
            yield commands.SendData(self.conn, _bad_request(self.request))
        reply = yield command


# When the safety net last logged a whole traceback (once per TRACEBACK_SECONDS).
_LAST_TRACEBACK = [float("-inf")]
_GUARDED = "_authgate_guarded"  # set on an HttpLayer: True, or "failed" after an exception


def _http_layer_event(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
    original = _ORIGINAL["http_layer_event"]
    guarded = getattr(self, _GUARDED, None)
    if guarded is None:
        guarded = self.context.client.id in _TRACKED
        setattr(self, _GUARDED, guarded)
    if guarded == "failed":
        return  # closed after an exception: nothing more to do here
    if not guarded:
        yield from original(self, event)
        return
    try:
        yield from original(self, event)
    except Exception as e:  # noqa: BLE001 - the safety net: whatever failed, close
        setattr(self, _GUARDED, "failed")
        client = self.context.client
        now = time.monotonic()
        with_traceback = now - _LAST_TRACEBACK[0] >= TRACEBACK_SECONDS
        if with_traceback:
            _LAST_TRACEBACK[0] = now
        logger.error(
            f"authgate: closing the connection from {human.format_address(client.peername)}: "
            f"mitmproxy's HTTP layer failed: {type(e).__name__}: {e}",
            exc_info=with_traceback,
        )
        yield commands.CloseConnection(client)
        for stream in list(getattr(self, "streams", {}).values()):
            flow = getattr(stream, "flow", None)
            if isinstance(flow, http.HTTPFlow) and flow.live and flow.error is None:
                flow.error = FlowError("authgate: connection closed after an internal error")
                flow.live = False
                yield http_hooks.HttpErrorHook(flow)


_PATCHES = (
    (
        HttpStream,
        "state_wait_for_request_headers",
        "wait_for_request_headers",
        _wait_for_request_headers,
    ),
    (HttpStream, "handle_protocol_error", "handle_protocol_error", _handle_protocol_error),
    (Http1Server, "read_headers", "read_headers", _read_headers),
    (Http1Connection, "read_body", "read_body", _read_body),
    (HttpLayer, "_handle_event", "http_layer_event", _http_layer_event),
)
# What the patches call or read besides the functions they wrap.
_RELIED_ON = (
    (
        HttpStream,
        (
            "check_killed",
            "send_response",
            "state_consume_request_body",
            "state_done",
            "state_errored",
            "state_wait_for_response_headers",
            "state_consume_response_body",
        ),
    ),
    (Http1Server, ("done",)),
    (Http1Connection, ("request", "response")),
    (ChunkedReader, ("__call__", "read_eof")),
    (layer.Layer, ("handle_event",)),
)


def unsupported() -> str | None:
    """Why the patches cannot be installed on this mitmproxy, or None."""
    found = mitmproxy_version.VERSION
    if found.split(".")[0] not in ("11", "12"):
        return (
            f"authgate: the connection guards are written for mitmproxy 11 and 12, "
            f"not {found}; re-check authgate/proxy/guard.py against its HTTP layers"
        )
    for cls, names in (*((c, (n,)) for c, n, _, _ in _PATCHES), *_RELIED_ON):
        for name in names:
            if not hasattr(cls, name):
                return f"authgate: mitmproxy {found} has no {cls.__name__}.{name}"
    return None


def install() -> None:
    """Install the patches once. Raises RuntimeError on an unsupported mitmproxy."""
    if _ORIGINAL:
        return
    problem = unsupported()
    if problem:
        raise RuntimeError(problem)
    if mitmproxy_version.VERSION not in VERIFIED:
        logger.warning(
            f"authgate: connection guards verified on mitmproxy {', '.join(VERIFIED)}, "
            f"running on {mitmproxy_version.VERSION}"
        )
    for cls, attr, key, wrapper in _PATCHES:
        _ORIGINAL[key] = getattr(cls, attr)
        setattr(cls, attr, wrapper)


def _install_or_refuse() -> None:
    try:
        install()
    except RuntimeError as e:
        # OptionsError is the one error mitmproxy's addon manager passes on:
        # `authgate run` refuses to start rather than run unguarded.
        raise exceptions.OptionsError(str(e)) from e
