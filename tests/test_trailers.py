"""Trailer fields, the guard's safety net and its connection cap (proxy/guard.py).

A chunked body may end in trailer fields. mitmproxy's HTTP/1 reader raised on
them ("HTTP trailers are not implemented yet"), logged "mitmproxy has
crashed!" and left the connection open for good, past every timeout; with a
low open-files limit a few dozen such connections made the gateway unable to
answer anything. Now trailers are discarded, never forwarded, and the request
is judged and answered as any other. Real gateways, raw sockets, an HTTP/2
client, and a backend that records the bytes it receives.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h11
import pytest
from mitmproxy.proxy.layers.http import _http1

from authgate.proxy import guard
from conftest import EXAMPLE, REQUEST_SECONDS, START_SECONDS, Backend, RunningGateway, wait_until
from test_guard import Raw, closed_after, head, read_reply
from test_startup import free_port

BIN = Path(sys.executable).parent
TRAILERS_REQUEST = (
    b"POST /api/admin/dashboard HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\nX-Foo: bar\r\n\r\n"
)


# --- a backend that keeps the bytes it got -----------------------------------------------


@dataclass
class Got:
    method: str
    target: str
    body: bytes
    trailers: list[tuple[bytes, bytes]]
    raw: bytes  # everything the connection had carried when the request was complete


@dataclass
class RawBackend:
    """An HTTP/1.1 server built on h11 (which reads trailers): records each
    request with the raw bytes; answers 200, chunked with a trailer field if
    `trailers`."""

    trailers: bool = False
    got: list[Got] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        raw = bytearray()
        request: h11.Request | None = None
        body = bytearray()
        with s:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = s.recv(65536)
                    raw += data
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    request, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    got = Got(
                        request.method.decode(),
                        request.target.decode(),
                        bytes(body),
                        [(k, v) for k, v in event.headers],
                        bytes(raw),
                    )
                    self.got.append(got)
                    s.sendall(self._answer(conn, got))
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                else:  # ConnectionClosed, PAUSED
                    return

    def _answer(self, conn: h11.Connection, got: Got) -> bytes:
        body = json.dumps({"path": got.target, "body": got.body.decode()}).encode()
        if self.trailers:
            headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
            end = h11.EndOfMessage(headers=[("X-Checksum", "sha256=abc")])
        else:
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            end = h11.EndOfMessage()
        out = conn.send(h11.Response(status_code=200, headers=headers)) or b""
        out += conn.send(h11.Data(data=body)) or b""
        return out + (conn.send(end) or b"")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_backend() -> Iterator[RawBackend]:
    b = RawBackend()
    yield b
    b.close()


@pytest.fixture
def gw(start_gateway: Callable[..., RunningGateway], raw_backend: RawBackend) -> RunningGateway:
    return start_gateway(EXAMPLE, upstream=raw_backend.url)


def read_all(s: socket.socket, timeout: float = REQUEST_SECONDS) -> bytes:
    s.settimeout(timeout)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


# --- trailers over HTTP/1 ------------------------------------------------------------------


def test_a_request_with_trailers_to_a_denied_path_gets_its_401(
    gw: RunningGateway, raw_backend: RawBackend
) -> None:
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(TRAILERS_REQUEST)
        r = read_reply(s)  # without the fix: nothing, ever
        assert r.status == 401
        assert r.header("WWW-Authenticate") == 'Bearer realm="api"'
        # The body and its trailer section were consumed: the connection carries on.
        s.sendall(head("GET", "/health"))
        assert read_reply(s).status == 200
    assert [g.target for g in raw_backend.got] == ["/health"]


@pytest.mark.parametrize("pieces", [1, 3, 40], ids=["one-packet", "three", "dribbled"])
def test_a_request_with_trailers_on_an_allowed_route_is_forwarded_without_them(
    gw: RunningGateway, raw_backend: RawBackend, pieces: int
) -> None:
    request = head("POST", "/legacy/upload", "Transfer-Encoding: chunked") + (
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Foo: bar\r\nX-Checksum: sha256=1\r\n\r\n"
    )
    step = -(-len(request) // pieces)
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        for i in range(0, len(request), step):
            s.sendall(request[i : i + step])
            if pieces > 1:
                time.sleep(0.02)
        r = read_reply(s)
    assert r.status == 200
    [got] = raw_backend.got
    assert (got.method, got.target, got.body) == ("POST", "/legacy/upload", b"hello world")
    assert got.trailers == []
    assert b"X-Foo" not in got.raw and b"sha256" not in got.raw
    assert json.loads(r.body)["body"] == "hello world"


def test_a_backends_trailers_do_not_reach_the_client(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    backend = RawBackend(trailers=True)
    try:
        gw = start_gateway(EXAMPLE, upstream=backend.url)
        with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
            s.sendall(head("GET", "/health", "Connection: close"))
            answer = read_all(s)  # without the fix: nothing, ever
    finally:
        backend.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b'"/health"' in answer
    assert b"X-Checksum" not in answer and b"sha256" not in answer
    assert answer.endswith(b"\r\n0\r\n\r\n")  # the last chunk, no trailer section


BIG_TRAILERS = b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 100) for i in range(400))  # ~44 KiB


@pytest.mark.parametrize(
    "body",
    [
        b"0\r\n" + BIG_TRAILERS + b"\r\n",  # complete, too large
        b"0\r\n" + BIG_TRAILERS,  # and still coming
        b"5;" + b"x" * (guard.MAX_TRAILER_BYTES + 10),  # a chunk-size line that never ends
    ],
    ids=["trailers", "unterminated", "chunk-size-line"],
)
def test_a_trailer_section_too_large_gets_400_and_a_close(
    gw: RunningGateway, raw_backend: RawBackend, body: bytes
) -> None:
    assert len(BIG_TRAILERS) > guard.MAX_TRAILER_BYTES
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("POST", "/legacy/upload", "Transfer-Encoding: chunked") + body)
        r = read_reply(s)
        assert r.status == 400
        assert r.header("Connection") == "close"
        assert r.header("Content-Type") == "application/problem+json"
        assert json.loads(r.body)["status"] == 400
        closed = closed_after(s, REQUEST_SECONDS)
    assert closed is not None and closed < 10  # at once: not at the idle timeout (60 s)
    assert raw_backend.got == []


def test_a_trailer_section_within_the_bound_is_fine(
    gw: RunningGateway, raw_backend: RawBackend
) -> None:
    trailers = b"X-Big: " + b"a" * (guard.MAX_TRAILER_BYTES - 100) + b"\r\n\r\n"
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("POST", "/legacy/upload", "Transfer-Encoding: chunked") + b"0\r\n")
        s.sendall(trailers)
        assert read_reply(s).status == 200
    [got] = raw_backend.got
    assert got.trailers == [] and b"X-Big" not in got.raw


# --- trailers over HTTP/2 --------------------------------------------------------------------


def h2_post_with_trailers(
    address: tuple[str, int], path: str, body: bytes, trailers: list[tuple[str, str]]
) -> tuple[int, bytes]:
    """(status, body) of one HTTP/2 request whose body ends in trailer fields."""
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    tls.set_alpn_protocols(["h2"])
    with tls.wrap_socket(socket.create_connection(address, timeout=REQUEST_SECONDS)) as s:
        assert s.selected_alpn_protocol() == "h2"
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        request = [(":method", "POST"), (":path", path), (":scheme", "https")]
        c.send_headers(1, [*request, (":authority", "gw"), ("content-length", str(len(body)))])
        c.send_data(1, body)
        c.send_headers(1, trailers, end_stream=True)
        s.sendall(c.data_to_send())
        status, data, ended = 0, b"", False
        s.settimeout(REQUEST_SECONDS)
        while not ended:
            chunk = s.recv(65536)  # without the fix: the gateway closes (or hangs)
            if not chunk:
                raise ConnectionError("closed before the answer")
            for e in c.receive_data(chunk):
                if isinstance(e, h2.events.ResponseReceived):
                    status = int(dict(e.headers)[b":status"])
                elif isinstance(e, h2.events.DataReceived):
                    data += e.data
                    c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, h2.events.StreamEnded | h2.events.StreamReset):
                    ended = True
            s.sendall(c.data_to_send())
    return status, data


def test_http2_request_trailers_are_never_forwarded(
    gw: RunningGateway, raw_backend: RawBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    trailers = [("x-foo", "bar"), ("x-checksum", "sha256=1")]
    status, body = h2_post_with_trailers(gw.address, "/legacy/upload", b"hello", trailers)
    assert status == 200
    assert json.loads(body)["body"] == "hello"
    [got] = raw_backend.got
    assert (got.target, got.body, got.trailers) == ("/legacy/upload", b"hello", [])
    assert b"x-foo" not in got.raw.lower() and b"sha256" not in got.raw
    # A denied one is answered as any other.
    assert h2_post_with_trailers(gw.address, "/api/admin/x", b"hi", trailers)[0] == 401
    assert len(raw_backend.got) == 1
    # Without the fix an HTTP/1 backend got no trailers either: mitmproxy's
    # HTTP/1 client raised on them ("mitmproxy has crashed!") after sending
    # the body, and the rest of that event was lost.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- the safety net ---------------------------------------------------------------------------


def test_an_exception_in_mitmproxys_http_layer_closes_the_connection_at_once(
    gw: RunningGateway,
    raw_backend: RawBackend,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # mitmproxy's own read_body again: it raises NotImplementedError on trailers.
    monkeypatch.setattr(_http1.Http1Connection, "read_body", guard._ORIGINAL["read_body"])
    caplog.set_level(logging.ERROR, logger="authgate")
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        host, port = s.getsockname()
        peer = f"{host}:{port}"
        s.sendall(TRAILERS_REQUEST)
        closed = closed_after(s, REQUEST_SECONDS)  # without the safety net: open for 600 s
    assert closed is not None and closed < 10
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    mine = [m for m in errors if peer in m]
    assert len(mine) == 1, errors
    assert "HTTP layer failed" in mine[0] and "NotImplementedError" in mine[0]
    # The flow that failed has left the in-flight count; the gateway carries on.
    wait_until(lambda: json.loads(gw.call("authgate.status"))["in_flight"] == 0)
    with socket.create_connection(gw.address, timeout=REQUEST_SECONDS) as s:
        s.sendall(head("GET", "/health"))
        assert read_reply(s).status == 200
    assert [g.target for g in raw_backend.got] == ["/health"]


# --- 300 such connections against a gateway with 64 open files --------------------------------

NOFILE = 64  # the report's limit; `authgate run` has about 8 open once started


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def low_nofile_gateway(tmp_path: Path, backend: Backend) -> Iterator[Process]:
    """`authgate run` with RLIMIT_NOFILE set to NOFILE (through an exec, which,
    unlike preexec_fn, is safe with the test process's threads)."""
    port = free_port()
    log = tmp_path / "gateway.out"
    argv = [str(BIN / "authgate"), "run", "--policy", str(EXAMPLE)]
    argv += ["--upstream", backend.url, "--listen", f"127.0.0.1:{port}"]
    limit = (
        "import os, resource, sys; "
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, hard)); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", limit, *argv], stdout=out, stderr=subprocess.STDOUT
        )
    gw = Process(proc, port, log)
    try:
        wait_until(lambda: proc.poll() is not None or "listening on" in gw.output(), START_SECONDS)
        assert proc.poll() is None, gw.output()
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def connect(address: tuple[str, int], timeout: float) -> socket.socket | None:
    try:
        return socket.create_connection(address, timeout=timeout)
    except OSError:  # not accepted (the gateway out of descriptors: its backlog fills up)
        return None


def answer_or_close(s: socket.socket, timeout: float) -> Raw | str:
    """The answer, or "closed", or "nothing" within `timeout`."""
    try:
        return read_reply(s, timeout=timeout)
    except TimeoutError:
        return "nothing"
    except OSError:  # closed (at the cap) or reset
        return "closed"


def test_300_connections_with_trailers_under_64_open_files_leave_health_answering(
    low_nofile_gateway: Process, backend: Backend
) -> None:
    gw = low_nofile_gateway
    address = ("127.0.0.1", gw.port)
    health: list[int | str] = []

    def check_health() -> None:
        s = connect(address, REQUEST_SECONDS)
        if s is None:
            health.append("unaccepted")
            return
        with s:
            s.sendall(head("GET", "/health", "Connection: close"))
            got = answer_or_close(s, REQUEST_SECONDS)
            health.append(got.status if isinstance(got, Raw) else got)

    start = time.monotonic()
    answers: list[int | str] = []
    wait = (
        REQUEST_SECONDS  # generous for a busy machine; once one goes unanswered, stop waiting long
    )
    with ExitStack() as held:
        for i in range(300):
            s = connect(address, wait)
            if s is None:
                answers.append("unaccepted")
                wait = 0.2
                if answers[-5:] == ["unaccepted"] * 5:
                    break  # the gateway accepts nothing more
                continue
            held.enter_context(s)
            s.sendall(TRAILERS_REQUEST)
            got = answer_or_close(s, wait)
            answers.append(got.status if isinstance(got, Raw) else got)
            if got == "nothing":
                wait = 0.2
            if i % 60 == 59:
                check_health()  # while all of them are held open
        for _ in range(3):
            check_health()
        assert health == [200] * 8, health  # without the fix: "unaccepted"
    # Each new connection made room by closing the one idle the longest: all answered.
    assert answers == [401] * 300, {x: answers.count(x) for x in set(answers)}
    assert [x.target for x in backend.seen] == ["/health"] * 8
    out = gw.output()
    assert "has crashed" not in out
    assert out.count("Too many open files") == 0, out[-3000:]
    capped = [line for line in out.splitlines() if "at the connection limit" in line]
    most = (time.monotonic() - start) / guard.CAP_LOG_SECONDS + 1
    assert 1 <= len(capped) <= most, capped  # it acted, and said so at most once every 10 s
