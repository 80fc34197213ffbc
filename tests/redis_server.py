"""A real `redis-server` for the tests: its own process on a free loopback
port and its own temporary directory, no persistence. The session fixture
`redis_server` (registered in conftest.py) starts one per test session; tests
can stop, kill (SIGKILL, as a crash), pause (SIGSTOP, as a hang) and start it
again on the same port.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ports import free_port

MISSING = (
    "redis-server is not installed; `make test` installs it "
    "(Debian package redis-server: apt-get install -y redis-server)"
)


def answers_ping(port: int, timeout: float = 1.0, password: str | None = None) -> bool:
    """Whether a Redis on 127.0.0.1:port answers PING (raw RESP, no client)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            if password is not None:
                s.sendall(f"AUTH {password}\r\n".encode())
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process. `extra` adds arguments (e.g. --requirepass)."""

    def __init__(self, extra: list[str] | None = None, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(MISSING, pytrace=False)
        self.binary = binary
        self.extra = extra or []
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="authgate-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start (again) on the same port and wait until it answers PING."""
        if self.running:
            return
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        args += ["--logfile", str(self.dir / "redis.log"), *self.extra]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if answers_ping(self.port, password=self.password):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: Redis dies as in a crash, its connections reset."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: Redis still accepts connections (the kernel does) but
        answers nothing, as a hung or overloaded server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the session (.url, .port, .stop(), .start(), .kill(),
    .pause(), .resume())."""
    server = RedisServer()
    try:
        server.start()
    except RuntimeError:
        # The port was taken between choosing and binding: one more try.
        server.port = free_port()
        server.start()
    yield server
    server.close()
