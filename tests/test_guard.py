"""The connection guards (proxy/guard.py), through a real gateway and raw sockets:
denials before the body, header and idle timeouts, empty lines before the
request line, and the gateway's own answers when the backend fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from mitmproxy.http import Headers
from mitmproxy.test import tflow

from authgate.proxy import guard
from conftest import EXAMPLE, REQUEST_SECONDS, Backend, RunningGateway, Seen, send, wait_until
from ports import free_port

BIG = 50 * 1024 * 1024


@pytest.fixture
def gw(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway(EXAMPLE)


@pytest.fixture
def gateway_to(start_gateway: Callable[..., RunningGateway]) -> Callable[..., RunningGateway]:
    """gateway_to(upstream_url, *sets): a gateway in front of some other backend."""

    def start(upstream: str, *sets: str) -> RunningGateway:
        return start_gateway(EXAMPLE, *sets, upstream=upstream)

    return start


# --- raw HTTP/1 -----------------------------------------------------------------------


@dataclass
class Raw:
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ")[1])

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


# bytes read past the last response, per socket
_LEFT: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_reply(s: socket.socket, timeout: float = REQUEST_SECONDS) -> Raw:
    """The next response off the socket (Content-Length framed); what follows it
    is kept for the next call (pipelined answers may come in one read)."""
    s.settimeout(timeout)
    data = _LEFT.pop(s, b"")
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(k, v) for k, _, v in (line.partition(": ") for line in lines)]
    length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    if rest[length:]:
        _LEFT[s] = rest[length:]
    return Raw(status_line, headers, rest[:length])


def closed_after(s: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closes (EOF or reset), or None if still open after `limit`.
    Whatever else arrives is read and dropped."""
    start = time.monotonic()
    while True:
        left = limit - (time.monotonic() - start)
        if left <= 0:
            return None
        s.settimeout(left)
        try:
            if not s.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            return None
        except OSError:  # reset
            return time.monotonic() - start


def head(method: str, target: str, *headers: str) -> bytes:
    return (
        "\r\n".join([f"{method} {target} HTTP/1.1", "Host: gw", *headers]) + "\r\n\r\n"
    ).encode()


def assert_the_gateways_401(r: Raw) -> None:
    assert r.status == 401
    assert r.header("WWW-Authenticate") == 'Bearer realm="api"'
    assert r.header("Content-Type") == "application/problem+json"
    assert r.header("Cache-Control") == "no-store"
    assert json.loads(r.body)["status"] == 401


# --- 1. a denial goes out before the body ------------------------------------------------


class Upload:
    """Sends a head and then BIG bytes of body from a thread, as fast as the socket takes them."""

    def __init__(self, s: socket.socket, request_head: bytes) -> None:
        self.s = s.dup()  # its own timeout: the reader's settimeout() must not cut a send
        self.s.settimeout(REQUEST_SECONDS)
        self.sent = 0
        self.error: OSError | None = None
        self.head = request_head
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        chunk = b"x" * 65536
        try:
            self.s.sendall(self.head)
            while self.sent < BIG:
                self.sent += self.s.send(chunk[: BIG - self.sent])
        except OSError as e:
            self.error = e
        finally:
            self.s.close()


def linger_for(monkeypatch: pytest.MonkeyPatch, seconds: float) -> float:
    """A longer LINGER_SECONDS (read when a denial is answered), so that "the FIN
    right after the answer" and "the close for good" are far apart even on a busy
    machine."""
    monkeypatch.setattr(guard, "LINGER_SECONDS", seconds)
    return seconds


def test_a_denial_goes_out_before_a_large_body_and_the_upload_is_cut(
    gw: RunningGateway, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    linger = linger_for(monkeypatch, 6.0)
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        start = time.monotonic()
        upload = Upload(s, head("POST", "/api/profile", f"Content-Length: {BIG}"))
        r = read_reply(s)
        answered = time.monotonic() - start
        sent_when_answered = upload.sent
        assert sent_when_answered < BIG  # answered while the body was still coming
        assert answered < 10  # a hang, not a speed test: the line above is the test
        assert_the_gateways_401(r)
        assert r.header("Connection") == "close"
        # The gateway half-closes, reads at most about LINGER_BYTES more, and
        # LINGER_SECONDS after the answer closes for good.
        assert closed_after(s, linger / 2) is not None  # our side's FIN, well before that
        upload.thread.join(linger + 10)
        took = time.monotonic() - start
    assert not upload.thread.is_alive() and upload.error is not None  # the rest was refused
    assert upload.sent < BIG / 4
    # Cut when the linger ends: not before, and long before the sender's own timeout.
    assert linger - 0.1 <= took < linger + 10 < REQUEST_SECONDS
    assert backend.seen == []


def test_a_client_waiting_for_100_continue_gets_the_denial(
    gw: RunningGateway, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    linger_for(monkeypatch, REQUEST_SECONDS)  # the close for good: long after the bound below
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        start = time.monotonic()
        s.sendall(head("POST", "/api/profile", f"Content-Length: {BIG}", "Expect: 100-continue"))
        r = read_reply(s)  # without the guard: nothing until the body came (never)
        assert time.monotonic() - start < 10
        assert_the_gateways_401(r)  # the denial, never "100 Continue"
        assert r.header("Connection") == "close"
        closed = closed_after(s, REQUEST_SECONDS)
        assert closed is not None and closed < 10  # our side's FIN right after the answer
    assert backend.seen == []


def test_a_denial_with_its_whole_body_in_hand_keeps_the_connection(
    gw: RunningGateway, backend: Backend
) -> None:
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("POST", "/api/profile", "Content-Length: 5") + b"hello")
        r = read_reply(s)
        assert_the_gateways_401(r)
        assert r.header("Connection") is None
        s.sendall(head("GET", "/health"))
        assert read_reply(s).status == 200
    assert [x.target for x in backend.seen] == ["/health"]


def test_an_allowed_request_still_gets_its_body_forwarded(
    gw: RunningGateway, backend: Backend
) -> None:
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("POST", "/legacy/upload", "Content-Length: 5", "Connection: close"))
        time.sleep(0.3)  # the body comes later than the head
        s.sendall(b"hello")
        assert read_reply(s).status == 200
    [seen] = backend.seen
    assert (seen.method, seen.target, seen.header("Content-Length")) == (
        "POST",
        "/legacy/upload",
        "5",
    )


def test_on_http2_the_denial_comes_first_and_the_stream_is_reset(
    gw: RunningGateway, backend: Backend
) -> None:
    size = 8 * 1024 * 1024
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    tls.set_alpn_protocols(["h2"])
    with tls.wrap_socket(socket.create_connection(gw.address, timeout=REQUEST_SECONDS)) as s:
        assert s.selected_alpn_protocol() == "h2"
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        request = [(":method", "POST"), (":path", "/api/profile"), (":scheme", "https")]
        c.send_headers(1, [*request, (":authority", "gw"), ("content-length", str(size))])
        s.sendall(c.data_to_send())
        sent, status, reset = 0, None, None
        sent_when_answered = size
        s.settimeout(0.05)
        deadline = time.monotonic() + REQUEST_SECONDS
        while reset is None and time.monotonic() < deadline:
            window = c.local_flow_control_window(1) if reset is None else 0
            if window and sent < size:
                n = min(window, c.max_outbound_frame_size, size - sent)
                c.send_data(1, b"x" * n)
                sent += n
            s.sendall(c.data_to_send())
            try:
                data = s.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            for e in c.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived):
                    status = dict(e.headers)[b":status"]
                    sent_when_answered = sent
                elif isinstance(e, h2.events.StreamReset):
                    reset = e.error_code
        assert status == b"401" and sent_when_answered < size
        assert reset == h2.errors.ErrorCodes.CANCEL  # after the complete answer
        # The connection carries on.
        c.send_headers(
            3,
            [(":method", "GET"), (":path", "/health"), (":scheme", "https"), (":authority", "gw")],
            end_stream=True,
        )
        s.sendall(c.data_to_send())
        s.settimeout(REQUEST_SECONDS)
        status = None
        while status is None:
            for e in c.receive_data(s.recv(65536)):
                if isinstance(e, h2.events.ResponseReceived):
                    status = dict(e.headers)[b":status"]
    assert status == b"200"
    assert [x.target for x in backend.seen] == ["/health"]


# --- 2. header and idle timeouts ---------------------------------------------------------


def dribble(s: socket.socket, data: bytes, every: float) -> threading.Thread:
    def run() -> None:
        for i in range(len(data)):
            try:
                s.send(data[i : i + 1])
            except OSError:
                return
            time.sleep(every)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_head_sent_a_byte_every_half_second_is_cut_at_the_header_timeout(
    start_gateway: Callable[..., RunningGateway], backend: Backend
) -> None:
    gw = start_gateway(EXAMPLE, "authgate_header_timeout=1")
    start = time.monotonic()  # before the connection opens: the timeout counts from then
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        dribble(s, head("GET", "/health"), 0.5)  # 18 s for the whole head
        assert closed_after(s, REQUEST_SECONDS) is not None
        closed = time.monotonic() - start
    assert 0.9 <= closed < 10
    assert backend.seen == []


def test_a_head_completed_within_the_bound_is_answered(
    start_gateway: Callable[..., RunningGateway], backend: Backend
) -> None:
    gw = start_gateway(EXAMPLE, "authgate_header_timeout=5")  # against 0.8 s of sleeps
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        for part in (b"GET /health HTTP/1.1\r\n", b"Host: gw\r\n", b"\r\n"):
            s.sendall(part)
            time.sleep(0.4)
        assert read_reply(s).status == 200
    assert len(backend.seen) == 1


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(
    start_gateway: Callable[..., RunningGateway], backend: Backend
) -> None:
    gw = start_gateway(EXAMPLE, "authgate_idle_timeout=1")
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        start = time.monotonic()  # before the request: the timeout counts from its answer
        s.sendall(head("GET", "/health"))
        assert read_reply(s).status == 200
        assert closed_after(s, REQUEST_SECONDS) is not None
        closed = time.monotonic() - start
    assert 0.9 <= closed < 10
    assert len(backend.seen) == 1


def test_on_keep_alive_the_header_timeout_counts_from_the_first_byte(
    start_gateway: Callable[..., RunningGateway], backend: Backend
) -> None:
    # The idle timeout far above the bound below: only the header timeout can close in time.
    gw = start_gateway(EXAMPLE, "authgate_header_timeout=1", "authgate_idle_timeout=30")
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("GET", "/health"))
        assert read_reply(s).status == 200
        assert closed_after(s, 1.5) is None  # idle past the header timeout: still open
        start = time.monotonic()  # before the first byte: the timeout counts from it
        s.sendall(b"GET /he")
        assert closed_after(s, REQUEST_SECONDS) is not None
        closed = time.monotonic() - start
    assert 0.9 <= closed < 10
    assert len(backend.seen) == 1


def test_a_slow_backend_is_not_cut_by_the_client_timeouts(
    start_gateway: Callable[..., RunningGateway], backend: Backend
) -> None:
    def slow(seen: Seen) -> None:
        time.sleep(2)
        return None

    backend.answer = slow
    gw = start_gateway(EXAMPLE, "authgate_header_timeout=1", "authgate_idle_timeout=1")
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("GET", "/health"))
        assert read_reply(s).status == 200
    assert len(backend.seen) == 1


@pytest.mark.parametrize("option", ["authgate_header_timeout=0", "authgate_idle_timeout=-1"])
def test_timeouts_below_one_second_are_refused(
    start_gateway: Callable[..., RunningGateway], option: str
) -> None:
    with pytest.raises(Exception, match="at least 1"):
        start_gateway(EXAMPLE, option)


# --- 3. empty lines before the request line ---------------------------------------------------


@pytest.mark.parametrize("before", [b"\r\n", b"\r\n\r\n", b"\n"], ids=["crlf", "two", "lf"])
def test_empty_lines_before_the_request_line_are_skipped(
    gw: RunningGateway, backend: Backend, before: bytes
) -> None:
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(before + head("GET", "/legacy/x", "Connection: close"))  # one packet
        r = read_reply(s)
    assert r.status == 200
    assert [x.target for x in backend.seen] == ["/legacy/x"]


def test_empty_lines_after_a_keep_alive_response_are_skipped(
    gw: RunningGateway, backend: Backend
) -> None:
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("GET", "/health") + b"\r\n" + head("GET", "/legacy/y"))  # pipelined
        assert read_reply(s).status == 200
        assert read_reply(s).status == 200
    assert [x.target for x in backend.seen] == ["/health", "/legacy/y"]


def test_a_flood_of_empty_lines_closes_the_connection(
    start_gateway: Callable[..., RunningGateway], backend: Backend
) -> None:
    # The header timeout far above the bound below: only the flood can close in time.
    gw = start_gateway(EXAMPLE, "authgate_header_timeout=60")
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(b"\r\n" * (guard.MAX_EMPTY_LINES + 5) + head("GET", "/legacy/x"))
        closed = closed_after(s, REQUEST_SECONDS)
    assert closed is not None and closed < 10
    assert backend.seen == []


# --- 4. the backend fails -------------------------------------------------------------


def dead_port() -> int:
    """A port nothing listens on (below the ephemeral range: no connection takes it)."""
    return free_port()


def assert_the_gateways_own(r: Raw, status: int, phrase: str, port: int) -> None:
    assert r.status_line == f"HTTP/1.1 {status} {phrase}"
    assert r.header("Content-Type") == "application/problem+json"
    assert r.header("Cache-Control") == "no-store"
    assert r.header("Server") is None  # not mitmproxy's page
    body = json.loads(r.body)
    assert body["status"] == status and body["title"] == phrase
    for internal in (str(port), "127.0.0.1", "Errno", "mitmproxy"):
        assert internal not in r.body.decode()


def test_a_backend_that_is_down_gets_the_gateways_502(
    gateway_to: Callable[..., RunningGateway], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="authgate")
    port = dead_port()
    gw = gateway_to(f"http://127.0.0.1:{port}")
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("GET", "/health", "Connection: close"))
        r = read_reply(s)
    assert_the_gateways_own(r, 502, "Bad Gateway", port)
    warned = [x.getMessage() for x in caplog.records if x.levelno == logging.WARNING]
    assert any(f"127.0.0.1:{port}" in m and "502" in m for m in warned), warned


@pytest.mark.parametrize(
    "accept, content_type",
    [("text/html", "text/html; charset=utf-8"), ("text/plain", "text/plain; charset=utf-8")],
)
def test_the_502_comes_in_the_form_the_client_asks_for(
    gateway_to: Callable[..., RunningGateway], accept: str, content_type: str
) -> None:
    port = dead_port()
    gw = gateway_to(f"http://127.0.0.1:{port}")
    r = send(gw.address, "GET", "/health", [("Accept", accept)])
    assert r.status == 502
    assert r.header("Content-Type") == content_type
    assert r.header("Cache-Control") == "no-store"
    assert b"502" in r.body and str(port).encode() not in r.body


def test_a_keep_alive_connection_survives_a_502(
    gateway_to: Callable[..., RunningGateway],
) -> None:
    gw = gateway_to(f"http://127.0.0.1:{dead_port()}")
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("GET", "/health"))
        assert read_reply(s).status == 502
        s.sendall(head("GET", "/api/profile"))
        assert read_reply(s).status == 401


@pytest.fixture
def released(backend: Backend) -> Iterator[threading.Event]:
    """The backend holds every request (answering 200 only) until the event is
    set, at the latest after REQUEST_SECONDS; set at the test's end whatever happens."""
    event = threading.Event()

    def hold(seen: Seen) -> None:
        event.wait(REQUEST_SECONDS)
        return None

    backend.answer = hold
    yield event
    event.set()


def test_a_backend_that_does_not_answer_gets_the_gateways_504(
    start_gateway: Callable[..., RunningGateway],
    backend: Backend,
    released: threading.Event,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="authgate")
    gw = start_gateway(EXAMPLE, "authgate_response_timeout=1")
    port = backend.server.server_address[1]
    try:
        with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
            start = time.monotonic()
            s.sendall(head("GET", "/health", "Connection: close"))
            r = read_reply(s)
            took = time.monotonic() - start
    finally:
        released.set()
    assert_the_gateways_own(r, 504, "Gateway Timeout", port)
    assert 0.9 <= took < 10
    assert [x.target for x in backend.seen] == ["/health"]  # it got the request, no answer
    warned = [x.getMessage() for x in caplog.records if x.levelno == logging.WARNING]
    assert any(f"127.0.0.1:{port}" in m and "504" in m for m in warned), warned


def test_a_backend_that_does_not_accept_gets_the_gateways_504(
    gateway_to: Callable[..., RunningGateway], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="authgate")
    # A listener whose accept queue is full: Linux drops further SYNs, so a
    # connect hangs as it would to a backend behind a black hole.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        gw = gateway_to(f"http://127.0.0.1:{port}", "authgate_connect_timeout=1")
        with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
            start = time.monotonic()
            s.sendall(head("GET", "/health", "Connection: close"))
            r = read_reply(s)
            took = time.monotonic() - start
    assert_the_gateways_own(r, 504, "Gateway Timeout", port)
    assert 0.9 <= took < 10  # the connect hangs (SYNs dropped) far longer
    warned = [x.getMessage() for x in caplog.records if x.levelno == logging.WARNING]
    assert any(f"127.0.0.1:{port}" in m and "504" in m for m in warned), warned


# --- 5. the connection cap -----------------------------------------------------------------


@pytest.mark.parametrize(
    "soft, open_at_start, cap",
    [
        (64, 8, 12),  # (64 - 8 - 32) // 2
        (1024, 10, 491),
        (1_048_576, 20, 524_262),
        (40, 8, 1),  # nothing left over: still one connection
        (None, 8, 0),  # unlimited: no cap
    ],
)
def test_the_automatic_connection_cap(soft: int | None, open_at_start: int, cap: int) -> None:
    assert guard.automatic_max_connections(soft, open_at_start) == cap


def test_a_negative_connection_cap_is_refused(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    with pytest.raises(Exception, match="authgate_max_connections must be 0"):
        start_gateway(EXAMPLE, "authgate_max_connections=-1")


def closed_unanswered(s: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closes having sent nothing, or None if still open."""
    start = time.monotonic()
    s.settimeout(limit)
    try:
        data = s.recv(65536)
    except TimeoutError:
        return None
    except OSError:  # reset
        return time.monotonic() - start
    assert data == b"", data
    return time.monotonic() - start


def test_at_the_cap_a_new_connection_closes_the_longest_idle_or_is_refused(
    start_gateway: Callable[..., RunningGateway],
    backend: Backend,
    released: threading.Event,  # requests stay in flight until the refusal is seen
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="authgate")
    # Header and idle timeouts far above the bounds below: only the cap closes in time.
    options = ("authgate_header_timeout=60", "authgate_idle_timeout=120")
    gw = start_gateway(EXAMPLE, "authgate_max_connections=2", *options)
    with ExitStack() as held:
        held.callback(released.set)
        c1, c2 = (held.enter_context(socket.create_connection(gw.address)) for _ in range(2))
        c1.sendall(head("GET", "/health"))
        c2.sendall(head("GET", "/health"))
        # Both in flight: neither is idle.
        wait_until(lambda: len(backend.seen) >= 2, REQUEST_SECONDS, what="both requests in flight")
        with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as c3:
            refused = closed_unanswered(c3, REQUEST_SECONDS)
        assert refused is not None and refused < 10  # at once, with no bytes
        released.set()
        assert read_reply(c1).status == 200
        assert read_reply(c2).status == 200
        backend.answer = None
        for c in (c2, c1):  # c2 is now idle the longest
            c.sendall(head("GET", "/health"))
            assert read_reply(c).status == 200
        # A new client makes room by closing c2.
        c4 = held.enter_context(socket.create_connection(gw.address, timeout=REQUEST_SECONDS))
        c4.sendall(head("GET", "/health"))
        assert read_reply(c4).status == 200
        closed = closed_unanswered(c2, REQUEST_SECONDS)
        assert closed is not None and closed < 10
        assert closed_unanswered(c1, 0.5) is None  # still open
        c1.sendall(head("GET", "/health"))
        assert read_reply(c1).status == 200
    assert len(backend.seen) == 6  # the refused client sent nothing anywhere
    warned = [r.getMessage() for r in caplog.records if "connection limit" in r.getMessage()]
    # One line for both events: at most one every CAP_LOG_SECONDS.
    assert len(warned) == 1 and "(2, authgate_max_connections)" in warned[0], warned
    assert "refused 1 new one(s)" in warned[0]


# --- 6. trailer fields (end to end in tests/test_trailers.py) ------------------------------


@pytest.mark.parametrize("client, kept", [("HTTP/1.1", False), ("HTTP/2.0", True)])
def test_a_backends_response_trailers_reach_only_an_http2_client(client: str, kept: bool) -> None:
    # An HTTP/2 backend's trailers: mitmproxy's HTTP/1 writer raises on them.
    f = tflow.tflow(resp=True)
    f.request.http_version = client
    assert f.response is not None
    f.response.trailers = Headers(x_checksum="sha256=1")
    guard.BackendErrors().response(f)
    assert (f.response.trailers is not None) is kept


def test_a_forwarded_requests_trailers_are_dropped() -> None:
    f = tflow.tflow()
    f.request.http_version = "HTTP/2.0"
    f.request.trailers = Headers(x_checksum="sha256=1")

    async def run() -> None:
        errors = guard.BackendErrors()
        errors.request(f)
        errors.done()

    asyncio.run(run())
    assert f.request.trailers is None
