"""Shared fixtures: demo keys, a recording backend, a real gateway, raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from authgate.proxy import runner
from authgate.proxy.addon import Gateway
from authgate.tools.keys import ensure_demo_keys, load_private_key, mint
from redis_server import redis_server  # noqa: F401 - the session's real Redis

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
EXAMPLE = POLICIES / "example.yaml"

# --- waiting on a busy machine ----------------------------------------------------
# The suite must pass while other work (another copy of it) keeps both cores
# busy: a test never sleeps for a fixed time and then asserts; it polls for the
# condition, up to a generous deadline that is still a deadline (a test that can
# fail). A mitmproxy gateway with `--workers 2` can take 10+ s to start there.
START_SECONDS = 60.0  # a process (gateway, worker, redis-server) to start listening
REQUEST_SECONDS = 30.0  # one request to a gateway (socket timeouts), or a stop
SETTLE_SECONDS = 60.0  # something that follows on its own: a reload, a status report
# For a subprocess whose output a test polls (in a file): written as it happens.
UNBUFFERED_ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def wait_until(
    check: Callable[[], Any],
    seconds: float = SETTLE_SECONDS,
    every: float = 0.05,
    what: str | None = None,
) -> Any:
    """Poll `check()` until it returns something true and return that; fail
    after `seconds`, saying `what` (or which check) never came."""
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"still not so after {seconds:g} s: {what or check}")
        time.sleep(every)


@pytest.fixture(scope="session")
def demo_key() -> Any:
    """The demo signing key (created on first use, like `make run` does)."""
    return load_private_key(ensure_demo_keys(POLICIES / "keys"))


@pytest.fixture(scope="session")
def token(demo_key: Any) -> Callable[..., str]:
    """token(sub="alice", roles=[...], scopes=[...], ttl=3600, **kw) -> a signed JWT."""

    def make(sub: str = "alice", **kw: Any) -> str:
        return mint(demo_key, sub=sub, **kw)

    return make


# --- the recording backend ------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str  # the request target exactly as it arrived
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


Answer = tuple[int, list[tuple[str, str]], bytes]


@dataclass
class Backend:
    server: ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)
    # A test may make the backend answer otherwise: (status, headers, body) by request.
    answer: Callable[[Seen], Answer | None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def clear(self) -> None:
        self.seen.clear()


def _handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    class Recorder(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen = Seen(self.command, self.path, list(self.headers.items()))
            backend.seen.append(seen)
            custom = backend.answer(seen) if backend.answer is not None else None
            status, headers, body = custom or (
                200,
                [("Content-Type", "application/json")],
                json.dumps({"path": self.path}).encode(),
            )
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Recorder


@contextlib.contextmanager
def recording_server() -> Iterator[Backend]:
    """A real HTTP server on a free loopback port that records every request
    reaching it, for as long as the block runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    b = Backend(server)
    server.RequestHandlerClass = _handler(b)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield b
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    """A real HTTP server on 127.0.0.1 that records every request reaching it."""
    with recording_server() as b:
        yield b


# --- the gateway ----------------------------------------------------------------


class Recording(Gateway):
    """The real addon, keeping the flows it judged (for their comments and
    marks, or to filter them)."""

    def __init__(self) -> None:
        super().__init__()
        self.flows: list[Any] = []

    def _record(self, flow: Any, view: Any, d: Any, without_store: str, events: Any = ()) -> None:
        super()._record(flow, view, d, without_store, events)
        self.flows.append(flow)


class RunningGateway:
    """The real lean mitmproxy master that `authgate run` builds, in a thread."""

    def __init__(
        self,
        policy: Path,
        upstream: str,
        sets: list[str],
        gateway: Gateway | None = None,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.addon = gateway or Gateway()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.master: Any = None

        def on_ready(port: int) -> None:
            self.port = port
            self._ready.set()

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.master = await runner.build(
                str(policy),
                upstream,
                listen,
                sets,
                ready=on_ready,
                termlog=False,
                gateway=self.addon,
            )
            await self.master.run()

        def target() -> None:
            try:
                asyncio.run(main())
            except BaseException as e:  # noqa: BLE001 - reported to the test
                self._error = e
                self._ready.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        if not self._ready.wait(START_SECONDS):
            raise RuntimeError(f"gateway did not start within {START_SECONDS:g} s")
        if self._error is not None:
            raise self._error

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def call(self, command: str, *args: str) -> Any:
        """Run a mitmproxy command on the gateway's event loop."""
        assert self.loop is not None

        async def run() -> Any:
            return self.master.commands.call(command, *args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(REQUEST_SECONDS)

    def stop(self) -> None:
        if self.loop is None or self.master is None or not self.thread.is_alive():
            return
        ps = self.master.addons.get("proxyserver")
        asyncio.run_coroutine_threadsafe(ps.servers.update([]), self.loop).result(REQUEST_SECONDS)
        self.loop.call_soon_threadsafe(self.master.shutdown)
        self.thread.join(REQUEST_SECONDS)


@pytest.fixture
def start_gateway(backend: Backend) -> Iterator[Callable[..., RunningGateway]]:
    """start_gateway(policy_path, *sets, upstream=URL, listen=HOST:PORT) -> a running
    gateway in front of `backend` (or of `upstream`), on a free port (or `listen`)."""
    running: list[RunningGateway] = []

    def start(
        policy: Path = EXAMPLE,
        *sets: str,
        upstream: str | None = None,
        listen: str = "127.0.0.1:0",
    ) -> RunningGateway:
        g = RunningGateway(policy, upstream or backend.url, list(sets), listen=listen)
        running.append(g)
        return g

    yield start
    for g in running:
        g.stop()


# --- a raw HTTP client ------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    address: tuple[str, int],
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    source: str | None = None,
) -> Reply:
    """Send one request exactly as given (no normalization) and read the reply."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {address[0]}:{address[1]}"]
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    with socket.create_connection(
        address, timeout=REQUEST_SECONDS, source_address=(source, 0) if source else None
    ) as s:
        s.sendall(raw)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ")[1])
    parsed = [tuple(h.split(": ", 1)) for h in header_lines]
    return Reply(status, [(k, v) for k, v in parsed], rest)  # type: ignore[misc]
