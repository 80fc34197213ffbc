"""The decision service (`authgate serve`) as a process: real sockets, real
signals, real workers. What a proxy's check request gets is in
test_service_shapes.py; the contract without I/O is in test_service_checks.py.

Here: keep-alive and pipelining, malformed requests, oversized heads and
bodies, the header timeout, SIGHUP and SIGTERM, `--workers`, `--admin`, report
mode, the decision log (the same lines as the gateway's), and the same
decision as `authgate explain` and the core's `judge` for the same request.

The machine may be busy (two cores shared with other work): every wait polls
for its condition up to a generous deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from authgate.core.decision import judge
from authgate.policy.load import load_policy
from authgate.runtime.stores import MemoryStore
from authgate.service import checks
from conftest import (
    POLICIES,
    REQUEST_SECONDS,
    SETTLE_SECONDS,
    START_SECONDS,
    UNBUFFERED_ENV,
    Backend,
    Reply,
    send,
    wait_until,
)
from ports import free_port

BIN = Path(sys.executable).parent
JWKS = POLICIES / "keys" / "jwks.json"
LISTENING = re.compile(r"decision service on https?://127\.0\.0\.1:(\d+)")


# --- a policy, and the service as a process -------------------------------------------

# Every answer of the table (docs/answers.md) has a request that gets it.
POLICY = """\
version: 1
realm: api
client_ip:
  trusted_proxies: [TRUSTED]
ip:
  block: [203.0.113.0/24]
authn:
  jwt:
    - name: demo
      issuer: https://issuer.example
      audience: api
      algorithms: [RS256]
      jwks_file: JWKS
      leeway: 30s
    - name: away                    # its keys cannot be had: 503
      issuer: https://away.example
      audience: api
      algorithms: [RS256]
      jwks_url: http://127.0.0.1:9/jwks.json
limits:
  - {name: per-ip, key: ip, rate: 6000/minute}
rules:
  - name: health
    match: {path: /health, methods: [GET, HEAD]}
    allow: anyone
  - name: profile
    match: {path: /api/profile}
    allow: authenticated
  - name: secrets
    match: {path: "/api/secrets/**"}
    allow: {role: admin}
    hide: true
  - name: admin
    match: {path: "/api/admin/**"}
    allow: {role: admin}
  - name: reports
    match: {path: /api/reports, methods: [POST]}
    allow: {scope: "reports:write"}
    limits: [{name: report-writes, key: subject, rate: 2/minute}]
  - name: app
    match: {path: "/app/**", methods: [GET, HEAD]}
    allow: authenticated
    login_url: https://login.example/sign-in
MORE
default: not_found
"""


def policy_text(trusted: str = "127.0.0.1/32", more: str = "", away: bool = True) -> str:
    """The table's policy; `more`: rules after the others; without `away`, the
    service is ready (it has every key it needs)."""
    text = POLICY.replace("TRUSTED", trusted).replace("JWKS", str(JWKS))
    if not away:
        text = text[: text.index("    - name: away")] + text[text.index("limits:") :]
    return text.replace("MORE\n", more)


@pytest.fixture
def policy(tmp_path: Path, demo_key: Any) -> Path:
    """The table's policy (the demo keys exist), 127.0.0.1 a trusted proxy."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text())
    return path


SLOW = ("Authorization", "Basic c2xvdzpwdw==")  # slow:pw


def slow_policy(tmp: Path, cost: int = 11) -> Path:
    """The table's policy and a rule (/basic) for Basic credentials, whose bcrypt
    check (in a thread) makes a check that waits: user `slow`, password `pw`."""
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(cost)).decode()
    (tmp / "users.htpasswd").write_text(f"slow:{hashed}\n")
    rule = "  - name: basic\n    match: {path: /basic}\n    allow: authenticated\n"
    text = policy_text(more=rule + "    accept: [basic]\n")
    path = tmp / "slow.yaml"
    path.write_text(text.replace("authn:\n", "authn:\n  basic: {htpasswd: users.htpasswd}\n"))
    return path


@pytest.fixture
def ready_policy(tmp_path: Path, demo_key: Any) -> Path:
    """The table's policy without the issuer whose keys never come: ready."""
    path = tmp_path / "ready.yaml"
    path.write_text(policy_text(away=False))
    return path


class Serve:
    """`authgate serve ...` as a subprocess, its output kept in a file."""

    def __init__(self, tmp: Path, policy: Path, *args: str, port: int = 0, name: str) -> None:
        self.log = tmp / f"{name}.out"
        self._out = self.log.open("w")
        cmd = [str(BIN / "authgate"), "serve", "--policy", str(policy)]
        cmd += ["--listen", f"127.0.0.1:{port}", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, env=UNBUFFERED_ENV
        )
        self.port = port

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def output(self) -> str:
        return self.log.read_text()

    def wait_listening(self) -> Serve:
        def listening() -> int:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}: {self.output()}")
            if self.port:
                try:
                    socket.create_connection(self.address, timeout=1).close()
                except OSError:
                    return 0
                return self.port
            found = LISTENING.search(self.output())
            return int(found.group(1)) if found else 0

        self.port = wait_until(listening, START_SECONDS, what="authgate serve listening")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(REQUEST_SECONDS * 2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """serve(policy, *args, port=0, name=...) -> a listening `authgate serve`."""
    running: list[Serve] = []

    def start(policy: Path, *args: str, port: int = 0, name: str = "serve") -> Serve:
        s = Serve(tmp_path, policy, *args, port=port, name=name)
        running.append(s)
        return s.wait_listening()

    yield start
    for s in running:
        s.stop()


# --- a raw HTTP/1.1 client ------------------------------------------------------------------


def request(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    """A request with exactly these header lines (nothing added)."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


class Client:
    """One connection, kept open: send bytes, read answers one by one."""

    def __init__(
        self,
        address: tuple[str, int],
        source: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        sock = socket.create_connection(
            address, timeout=REQUEST_SECONDS, source_address=(source, 0) if source else None
        )
        self.sock = tls.wrap_socket(sock, server_hostname=address[0]) if tls else sock
        self.buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def answer(self) -> Reply:
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                raise AssertionError(f"closed before a whole answer: {self.buffer!r}")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), status_line
        headers = [(k, v) for k, _, v in (line.partition(": ") for line in lines)]
        size = int(next(v for k, v in headers if k.lower() == "content-length"))
        while len(self.buffer) < size:
            if not self._more():
                raise AssertionError("closed in the middle of a body")
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return Reply(int(status_line.split(" ")[1]), headers, body)

    def closed(self) -> bool:
        """True when the service closes the connection (within the socket
        timeout) without sending anything more."""
        try:
            while self._more():
                pass
        except ConnectionResetError:
            pass
        assert self.buffer == b"", self.buffer
        return True


def ask(
    address: tuple[str, int],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    source: str | None = None,
) -> Reply:
    """One check request on its own connection."""
    with Client(address, source) as c:
        c.send(request(method, target, headers))
        return c.answer()


def auth(uri: str, *more: tuple[str, str], method: str = "GET") -> list[tuple[str, str]]:
    """The fields of a minimal /auth check request for `method uri`."""
    return [
        ("Host", "authgate.internal"),
        ("X-Forwarded-Method", method),
        ("X-Forwarded-Uri", uri),
        ("X-Forwarded-Host", "app.example"),
        *more,
    ]


def log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def admin_get(port: int, path: str) -> tuple[int, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=REQUEST_SECONDS) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --- keep-alive and pipelining ----------------------------------------------------------------


def test_keep_alive_answers_every_check_on_one_connection(
    serve: Callable[..., Serve], policy: Path
) -> None:
    svc = serve(policy)
    with Client(svc.address) as c:
        for uri, status in [("/health", 200), ("/api/profile", 401), ("/nope", 404)] * 3:
            c.send(request("GET", "/auth", auth(uri)))
            a = c.answer()
            assert a.status == status
            assert a.header("Connection") is None  # kept open
        c.send(request("GET", "/auth", auth("/health", ("Connection", "close"))))
        assert c.answer().header("Connection") == "close"
        assert c.closed()


def test_pipelined_checks_are_answered_in_order(
    serve: Callable[..., Serve], tmp_path: Path, token: Callable[..., str]
) -> None:
    svc = serve(slow_policy(tmp_path))
    # The first waits (a password hashed in a thread): the ones behind it,
    # answerable at once, must still come after it.
    asked = [("/basic", SLOW, 200)]
    asked += [
        ("/health", ("Accept", "*/*"), 200),
        ("/api/profile", ("Accept", "*/*"), 401),
        ("/api/profile", ("Authorization", f"Bearer {token()}"), 200),
        ("/nope", ("Accept", "*/*"), 404),
    ] * 10
    data = b"".join(
        request("GET", "/auth", auth(uri, field, ("X-Request-Id", f"check-{i}")))
        for i, (uri, field, _) in enumerate(asked)
    )
    with Client(svc.address) as c:
        c.send(data)
        for i, (_, _, status) in enumerate(asked):
            a = c.answer()
            assert (a.status, a.header("X-Request-Id")) == (status, f"check-{i}")


def test_a_malformed_request_behind_pipelined_ones_is_answered_last(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    svc = serve(slow_policy(tmp_path))
    data = request("GET", "/auth", auth("/basic", SLOW))  # waits: the 400 must wait for it
    data += request("GET", "/auth", auth("/api/profile"))
    data += b"NOT HTTP AT ALL\r\n\r\n"
    data += request("GET", "/auth", auth("/health"))  # never read
    with Client(svc.address) as c:
        c.send(data)
        assert [c.answer().status for _ in range(3)] == [200, 401, 400]
        assert c.closed()


# --- what cannot be read --------------------------------------------------------------------

MALFORMED = [
    pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="not-http"),
    pytest.param(b"GET /auth HTTP/1.1\r\nHo st: x\r\n\r\n", id="space-in-name"),
    pytest.param(b"GET /auth HTTP/1.1\r\nHost: x\x00y\r\n\r\n", id="nul-in-value"),
    pytest.param(b"GET /auth HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", id="obs-fold"),
    pytest.param(
        b"GET /auth HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        id="two-lengths",
    ),
    pytest.param(
        b"POST /auth HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        id="length-and-chunked",
    ),
    pytest.param(
        b"POST /auth HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
        id="bad-chunk-size",
    ),
    pytest.param(b"GET /auth HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", id="negative"),
    pytest.param(b"GET /auth HTTP/7.1\r\nHost: x\r\n\r\n", id="http-7"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
    pytest.param(
        b"GET /auth HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        id="upgrade",
    ),
    pytest.param(b"GET /auth HTTP/1.1\r\nHost: x\r\n\x01\x02\x03\r\n\r\n", id="binary"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_requests_get_400_and_close(
    serve: Callable[..., Serve], policy: Path, data: bytes
) -> None:
    svc = serve(policy)
    with Client(svc.address) as c:
        c.send(data)
        a = c.answer()
        assert a.status == 400
        assert a.header("Connection") == "close"
        assert a.header("X-Authgate-Decision") == "deny"
        assert a.header("Content-Type") == "application/problem+json"
        assert c.closed()
    # ...and the service goes on serving.
    assert ask(svc.address, "GET", "/auth", auth("/health")).status == 200


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(request("GET", "/auth", [("X-Big", "a" * 70_000)]), id="one-field"),
        pytest.param(
            request("GET", "/auth", [(f"X-F{i}", "b" * 1000) for i in range(70)]),
            id="many-fields",
        ),
        pytest.param(request("GET", "/auth?" + "q" * 70_000, []), id="target"),
        # An endless field: refused once the head passes 64 KiB, not when it ends.
        pytest.param(b"GET /auth HTTP/1.1\r\nX-Endless: " + b"e" * 300_000, id="endless"),
    ],
)
def test_an_oversized_head_gets_431(serve: Callable[..., Serve], policy: Path, data: bytes) -> None:
    svc = serve(policy)
    with Client(svc.address) as c:
        c.send(data)
        a = c.answer()
        assert a.status == 431
        assert a.header("X-Authgate-Decision") == "deny"
        assert json.loads(a.body)["status"] == 431
        assert c.closed()


def test_a_body_is_read_and_dropped(serve: Callable[..., Serve], policy: Path) -> None:
    svc = serve(policy)
    chunked = [("Transfer-Encoding", "chunked")]
    data = request("POST", "/auth", auth("/health", ("Content-Length", "11")), b"hello world")
    data += request("POST", "/auth", auth("/health", *chunked), b"5\r\nhello\r\n0\r\n\r\n")
    data += request("GET", "/auth", auth("/api/profile"))
    with Client(svc.address) as c:
        c.send(data)
        # The bodies neither break the framing nor reach the judging.
        assert [c.answer().status for _ in range(3)] == [200, 200, 401]


def test_a_body_over_64_kib_gets_413_and_close(serve: Callable[..., Serve], policy: Path) -> None:
    svc = serve(policy)
    size = 64 * 1024 + 1
    data = request("POST", "/auth", auth("/health", ("Content-Length", str(size))), b"x" * size)
    with Client(svc.address) as c:
        c.send(data)
        a = c.answer()
        assert (a.status, a.header("Connection")) == (413, "close")
        assert c.closed()


def test_half_a_head_is_closed_within_the_header_timeout(
    serve: Callable[..., Serve], policy: Path
) -> None:
    svc = serve(policy, "--set", "authgate_header_timeout=2")
    with Client(svc.address) as c:
        start = time.monotonic()
        c.send(b"GET /auth HTTP/1.1\r\nHost: x\r\nX-Forwarded-Uri: /hea")
        assert c.closed()  # nothing answered: there is no request to answer
        waited = time.monotonic() - start
    # Not at once, and well before the socket timeout (REQUEST_SECONDS).
    assert 1.5 <= waited < REQUEST_SECONDS - 5


def test_rules_on_host_judge_the_host_the_proxy_names(
    serve: Callable[..., Serve], tmp_path: Path, demo_key: Any
) -> None:
    # Regression: `authgate serve` refused every policy with `host` rules (the
    # mitmproxy door's keep_host_header check, an option the service does not have).
    rule = '  - name: site\n    match: {path: "/site/**", host: app.example}\n    allow: anyone\n'
    path = tmp_path / "hosts.yaml"
    path.write_text(policy_text(more=rule))
    svc = serve(path)
    assert ask(svc.address, "GET", "/auth", auth("/site/x")).status == 200  # app.example
    other = [(k, "other.example" if k == "X-Forwarded-Host" else v) for k, v in auth("/site/x")]
    assert ask(svc.address, "GET", "/auth", other).status == 404
    # Envoy: the check request's Host is the original request's.
    assert ask(svc.address, "GET", "/envoy/site/x", [("Host", "app.example:80")]).status == 200
    assert ask(svc.address, "GET", "/envoy/site/x", [("Host", "other.example")]).status == 404


@pytest.mark.parametrize(
    "start,drip",
    [
        pytest.param(b"", b"\r\n", id="empty-lines"),
        pytest.param(
            b"POST /auth HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", b"x", id="body"
        ),
    ],
)
def test_a_connection_kept_busy_a_byte_at_a_time_is_closed(
    serve: Callable[..., Serve], policy: Path, start: bytes, drip: bytes
) -> None:
    # Regression: every read restarted the header timeout, so CR LF between
    # requests (which HTTP allows) or a body sent a byte at a time held a
    # connection open for good.
    svc = serve(policy, "--set", "authgate_header_timeout=1", "--set", "authgate_idle_timeout=2")
    with Client(svc.address) as c:
        c.sock.settimeout(0.2)
        c.send(start)

        def closed() -> bool:
            try:
                c.send(drip)
                return c.sock.recv(1024) == b""
            except TimeoutError:
                return False
            except OSError:  # reset, broken pipe: closed too
                return True

        wait_until(closed, REQUEST_SECONDS, what="the service closing the connection")


# --- signals ------------------------------------------------------------------------------------


def test_sighup_reloads_and_a_broken_policy_keeps_the_last_good_one(
    serve: Callable[..., Serve], policy: Path
) -> None:
    # No file watching: the reload below is the signal's.
    svc = serve(policy, "--set", "authgate_watch=false")
    assert ask(svc.address, "GET", "/auth", auth("/health")).status == 200

    policy.write_text(policy_text().replace("allow: anyone", "allow: authenticated"))
    svc.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: ask(svc.address, "GET", "/auth", auth("/health")).status == 401,
        SETTLE_SECONDS,
        what="the changed rule in effect after SIGHUP",
    )

    policy.write_text("version: 1\nrules: [\n")  # broken
    svc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload (SIGHUP) refused" in svc.output(), what="the refusal")
    assert "the last good policy keeps serving" in svc.output()
    assert ask(svc.address, "GET", "/auth", auth("/health")).status == 401  # still the last good
    assert svc.proc.poll() is None


def test_sigterm_finishes_the_check_in_flight_and_exits_0(
    serve: Callable[..., Serve], tmp_path: Path, demo_key: Any
) -> None:
    # A slower hash (about a second) keeps the check in flight for a while.
    path = slow_policy(tmp_path, cost=14)
    admin = free_port()
    svc = serve(path, "--admin", f"127.0.0.1:{admin}")
    idle = Client(svc.address)  # an idle keep-alive connection: closed on SIGTERM
    idle.send(request("GET", "/auth", auth("/health")))
    assert idle.answer().status == 200
    with Client(svc.address) as busy:
        busy.send(request("GET", "/auth", auth("/basic", SLOW)))
        wait_until(
            lambda: admin_get(admin, "/status")[1]["in_flight"] == 1,
            SETTLE_SECONDS,
            what="the Basic check in flight",
        )
        svc.proc.send_signal(signal.SIGTERM)
        a = busy.answer()  # finished, not cut off
        assert (a.status, a.header("X-Auth-Subject")) == (200, "slow")
        assert a.header("Connection") == "close"
        assert busy.closed()
    assert idle.closed()
    idle.sock.close()
    assert svc.proc.wait(REQUEST_SECONDS) == 0


# --- workers, admin, report mode ---------------------------------------------------------------


def test_two_workers_both_answer(serve: Callable[..., Serve], ready_policy: Path) -> None:
    admin = free_port()
    args = ("--workers", "2", "--admin", f"127.0.0.1:{admin}")
    svc = serve(ready_policy, *args, port=free_port())
    wait_until(
        lambda: admin_get(admin, "/ready")[0] == 200, START_SECONDS, what="both workers ready"
    )

    def both_decided() -> bool:
        # New connections: the kernel spreads them over the two listeners.
        for _ in range(20):
            assert ask(svc.address, "GET", "/auth", auth("/health")).status == 200
        workers = admin_get(admin, "/status")[1]["workers"]
        return all((w["status"] or {}).get("decisions", 0) > 0 for w in workers)

    wait_until(both_decided, SETTLE_SECONDS, what="each worker made decisions")
    workers = admin_get(admin, "/status")[1]["workers"]
    assert len(workers) == 2
    assert len({w["status"]["pid"] for w in workers} - {svc.proc.pid}) == 2
    assert svc.stop() == 0


def test_admin_ready_and_status(serve: Callable[..., Serve], ready_policy: Path) -> None:
    admin = free_port()
    svc = serve(ready_policy, "--admin", f"127.0.0.1:{admin}")
    assert admin_get(admin, "/ready") == (200, {"ready": True, "reasons": []})
    assert ask(svc.address, "GET", "/auth", auth("/health")).status == 200
    code, status = admin_get(admin, "/status")
    assert code == 200
    assert (status["pid"], status["decisions"]) == (svc.proc.pid, 1)
    assert status["policy"].endswith("ready.yaml")


def test_admin_ready_says_which_keys_are_missing(serve: Callable[..., Serve], policy: Path) -> None:
    admin = free_port()
    serve(policy, "--admin", f"127.0.0.1:{admin}")
    code, body = admin_get(admin, "/ready")
    assert code == 503
    assert body["reasons"][0].startswith("no keys yet for issuer https://away.example")


def test_report_mode_answers_allow_and_says_what_it_would_deny(
    serve: Callable[..., Serve], policy: Path, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    svc = serve(policy, "--set", "authgate_mode=report", "--set", f"authgate_log={log}")
    a = ask(svc.address, "GET", "/auth", auth("/api/profile"))
    assert a.status == 200
    assert a.header("X-Authgate-Decision") == "allow"
    assert a.header("X-Authgate-Report") == "would deny: 401 no_credentials"
    assert a.header("X-Auth-Subject") == ""  # nobody proven
    # Never reported: a Host that is not one is refused in every mode.
    fields = auth("/health")
    fields[3] = ("X-Forwarded-Host", "app.example, evil.example")
    bad = ask(svc.address, "GET", "/auth", fields)
    assert (bad.status, bad.header("X-Authgate-Decision")) == (400, "deny")
    assert [e["decision"] for e in log_lines(log)] == ["would_deny", "deny"]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authgate test")])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_tls_answers_checks_over_https_only(
    serve: Callable[..., Serve], policy: Path, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    svc = serve(policy, "--tls-cert", str(cert), "--tls-key", str(key))
    assert "decision service on https://" in svc.output()
    context = ssl.create_default_context(cafile=str(cert))
    data = request("GET", "/auth", auth("/health")) + request("GET", "/auth", auth("/api/profile"))
    with Client(svc.address, tls=context) as c:
        c.send(data)
        assert [c.answer().status for _ in range(2)] == [200, 401]
    # Clear text on the HTTPS port is never answered as a check.
    with Client(svc.address) as c:
        c.send(request("GET", "/auth", auth("/health")))
        try:
            got = c.sock.recv(65536)
        except ConnectionResetError:
            got = b""
        assert not got.startswith(b"HTTP/1.1 200")


# --- the decision log, explain and judge -------------------------------------------------------


def test_the_decision_log_line_is_the_gateways(
    serve: Callable[..., Serve],
    policy: Path,
    tmp_path: Path,
    token: Callable[..., str],
    start_gateway: Callable[..., Any],
    backend: Backend,
) -> None:
    gw_log, svc_log = tmp_path / "gateway.jsonl", tmp_path / "service.jsonl"
    gw = start_gateway(policy, f"authgate_log={gw_log}")
    svc = serve(policy, "--set", f"authgate_log={svc_log}")
    alice = token("alice", roles=["user"])
    cases: list[tuple[str, str, list[tuple[str, str]]]] = [
        ("GET", "/health", []),
        ("GET", "/api/profile?x=1", []),
        ("GET", "/api/profile", [("Authorization", f"Bearer {alice}")]),
        ("GET", "/api/admin/x", [("Authorization", f"Bearer {alice}")]),
        ("DELETE", "/api/secrets/x", []),
        ("GET", "/api/./profile", []),
    ]
    for method, target, fields in cases:
        client = [("X-Forwarded-For", "198.51.100.7"), *fields]  # the same client for both
        send(gw.address, method, target, client)
        ask(svc.address, "GET", "/auth", auth(target, *client, method=method))
    wait_until(lambda: len(log_lines(gw_log)) == len(cases), what="the gateway's lines")
    gateway, service = log_lines(gw_log), log_lines(svc_log)
    assert len(service) == len(cases)
    for g, s in zip(gateway, service, strict=True):
        assert list(g) == list(s)  # the same keys, in the same order
        for entry in (g, s):
            del entry["time"], entry["request_id"]
        assert g == s
    assert service[2]["subject"] == "alice"
    assert service[0]["client_ip"] == "198.51.100.7"


def test_explain_and_judge_say_what_the_service_says(
    serve: Callable[..., Serve], policy: Path, token: Callable[..., str]
) -> None:
    """For the same request (the view `read_check` makes of the check request),
    the core's `judge` and `authgate explain` decide as the service does."""
    svc = serve(policy)
    compiled = load_policy(str(policy))
    alice = token("alice", roles=["user"], scopes=["read"])
    cases = [
        ("GET", "/health", []),
        ("HEAD", "/api/profile", []),
        ("GET", "/api/profile", [("Authorization", f"Bearer {alice}")]),
        ("GET", "/api/admin/x", [("Authorization", f"Bearer {alice}")]),
        ("POST", "/api/reports", [("Authorization", f"Bearer {alice}")]),
        ("GET", "/api/secrets/x", []),
        ("GET", "/api/admin%2Fx", []),
        ("GET", "/app/x", [("Accept", "text/html")]),
        ("GET", "/nope", []),
    ]
    for method, target, fields in cases:
        client = [("X-Forwarded-For", "198.51.100.7"), *fields]
        check = auth(target, *client, method=method)
        answer = ask(svc.address, "GET", "/auth", check)
        lowered = [(k.lower(), v) for k, v in check]
        read = checks.read_check("GET", "/auth", lowered, "127.0.0.1", True)
        assert isinstance(read, checks.Check)
        d = judge(compiled, read.view, time.time(), MemoryStore())
        assert (answer.status, answer.header("X-Authgate-Decision")) == (
            (200, "allow") if d.allowed else (d.status, "deny")
        ), (method, target)
        words = [str(BIN / "authgate"), "explain", "--json", str(policy), method]
        words += [target, "--peer", "127.0.0.1", "--ip", "198.51.100.7"]
        words += [x for k, v in fields for x in ("-H", f"{k}: {v}")]
        told = json.loads(subprocess.run(words, capture_output=True, text=True).stdout)
        assert (told["status"] or 200, told["reason"], told["rule"], told["client_ip"]) == (
            d.status or 200,
            d.reason,
            d.rule,
            d.client_ip,
        ), (method, target)


def test_two_services_share_one_limit_on_redis(
    serve: Callable[..., Serve], tmp_path: Path, redis_server: Any
) -> None:
    """--store redis://: two `authgate serve` processes count one limit exactly,
    as two gateways do (docs/decision-service.md: the same options)."""
    name = f"l{uuid.uuid4().hex[:10]}"  # the session's Redis keeps counts between tests
    path = tmp_path / "limited.yaml"
    path.write_text(
        "version: 1\nclient_ip: {trusted_proxies: [127.0.0.1/32]}\nrules:\n"
        "  - name: api\n    match: {path: '/api/**'}\n    allow: anyone\n"
        f"    limits: [{{name: {name}, key: ip, rate: 6/hour}}]\n"
    )
    a = serve(path, "--store", redis_server.url, name="a")
    b = serve(path, "--store", redis_server.url, name="b")
    got = [ask((a if i % 2 else b).address, "GET", "/auth", auth("/api/x")) for i in range(10)]
    assert [r.status for r in got] == [200] * 6 + [429] * 4
    assert all(r.header("X-Authgate-Decision") == "deny" for r in got[6:])
    assert int(got[-1].header("Retry-After") or 0) >= 1
