"""The decision service behind the real proxies: Debian's nginx (1.22, with
auth_request) and Caddy (2.6), each running the configuration `authgate
config` prints, in front of a recording backend, with `authgate serve` as a
process. (`make test` installs nginx and caddy when missing.)

Through each proxy: an allowed request reaches the backend with authgate's
identity fields and none of the client's forged ones; every denial of the
table (303, 400, 401, 403, 404, 429, 503) is authgate's very answer (status,
fields, body) and the backend sees nothing; a check location answered by
something that is not authgate, authgate paused and authgate stopped are 503
and nothing is forwarded. The machine may be busy: every wait polls for its
condition up to a generous deadline.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authgate import cli
from authgate.core.responses import Rendered
from authgate.policy.load import load_policy
from authgate.service import checks
from authgate.tools import proxyconfig
from conftest import (
    REQUEST_SECONDS,
    START_SECONDS,
    Backend,
    Reply,
    recording_server,
    send,
    wait_until,
)
from ports import free_port

POLICY = Path(__file__).resolve().parent / "data" / "proxies.yaml"
KINDS = ("nginx", "caddy")
RID = re.compile(rb"[0-9a-f]{32}")  # a request id, in a body
# Fields a proxy writes itself, or that differ from one answer to the next.
OWN = {"date", "server", "connection", "content-length", "x-request-id"}
Token = Callable[..., str]


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found is None:
        pytest.fail(
            f"{name} is not installed; `make test` installs it (Debian: apt-get install {name})",
            pytrace=False,
        )
    return found


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Running:
    """A process of ours (authgate, nginx or Caddy), its log, its port."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(REQUEST_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(REQUEST_SECONDS)


def start(name: str, argv: list[str], folder: Path, port: int, **kw: Any) -> Running:
    """Start `argv` and wait until it listens on `port` (fail if it exits)."""
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **kw)
    running = Running(name, proc, log, port)
    try:
        wait_until(
            lambda: proc.poll() is not None or listening(port),
            START_SECONDS,
            what=f"{name} listening on {port}",
        )
    except AssertionError:
        running.stop()
        raise
    if proc.poll() is not None:
        pytest.fail(f"{name} exited {proc.returncode}: {log.read_text(errors='replace')}")
    return running


def start_authgate(folder: Path) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "authgate.cli", "serve", "--policy", str(POLICY)]
    argv += ["--listen", f"127.0.0.1:{port}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return start("authgate", argv, folder, port, env=env)


def printed(kind: str, authgate: int, upstream: str, listen: int) -> str:
    """What `authgate config KIND ...` prints (run in this process)."""
    out = io.StringIO()
    argv = ["config", kind, "--authgate", f"127.0.0.1:{authgate}", "--upstream", upstream]
    argv += ["--listen", f"127.0.0.1:{listen}", "--policy", str(POLICY)]
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


def start_proxy(
    kind: str, folder: Path, authgate: int, upstream: str, edit: Callable[[str], str] = str
) -> Running:
    """nginx or Caddy on a free loopback port with the printed configuration
    (`edit` may change it: a misrouted check)."""
    port = free_port()
    text = edit(printed(kind, authgate, upstream, port))
    home = folder / f"{kind}-{port}"
    home.mkdir()
    if kind == "nginx":
        conf = home / "nginx.conf"
        conf.write_text(proxyconfig.nginx_main(text, home, workers=1, access_log=True))
        argv = [_binary("nginx"), "-c", str(conf), "-p", str(home), "-g", "daemon off;"]
        return start(kind, argv, home, port)
    conf = home / "Caddyfile"
    conf.write_text("{\n\tadmin off\n}\n\n" + text)
    argv = [_binary("caddy"), "run", "--config", str(conf), "--adapter", "caddyfile"]
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home), XDG_DATA_HOME=str(home))
    return start(kind, argv, home, port, env=env, cwd=home)


# --- the module's processes ---------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proxies")


@pytest.fixture(scope="module")
def recorder() -> Iterator[Backend]:
    """The backend behind every proxy of this module."""
    with recording_server() as b:
        yield b


@pytest.fixture(autouse=True)
def _fresh(recorder: Backend) -> None:
    recorder.clear()


@pytest.fixture(scope="module")
def service(folder: Path, demo_key: Any) -> Iterator[Running]:
    """`authgate serve` with tests/data/proxies.yaml (the demo keys exist)."""
    running = start_authgate(folder)
    yield running
    running.stop()


@pytest.fixture(scope="module", params=KINDS)
def front(
    request: pytest.FixtureRequest, folder: Path, service: Running, recorder: Backend
) -> Iterator[Running]:
    """The proxy (nginx, then Caddy) in front of the recorder, asking `service`."""
    running = start_proxy(request.param, folder, service.port, recorder.url)
    yield running
    running.stop()


def bearer(value: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {value}")]


def direct(service: Running, front: Running, method: str, path: str, headers: Any) -> Reply:
    """authgate's own answer on /auth for the request a client sent the proxy."""
    described = [
        ("X-Forwarded-Method", method),
        ("X-Forwarded-Uri", path),
        ("X-Forwarded-Host", f"127.0.0.1:{front.port}"),
        ("X-Forwarded-Proto", "http"),
    ]
    return send(service.address, "GET", "/auth", [*headers, *described])


def fields(r: Reply) -> list[tuple[str, str]]:
    return sorted((k.lower(), v) for k, v in r.headers if k.lower() not in OWN)


def same_answer(got: Reply, expected: Reply) -> None:
    """The proxy gave authgate's answer: status, fields and body (less the
    request id and the fields the proxy writes itself)."""
    assert got.status == expected.status
    assert fields(got) == fields(expected)
    assert RID.sub(b"RID", got.body) == RID.sub(b"RID", expected.body)


# --- allowed -------------------------------------------------------------------------

FORGED = [
    ("X-Auth-Subject", "root"),
    ("X-Auth-Roles", "admin"),
    ("X-Auth-Scopes", "reports:write"),
    ("X-Auth-Issuer", "https://evil.example"),
    ("X-Request-Id", "chosen-by-the-client"),
    ("Remote-User", "root"),
    ("remote_user", "root"),
    ("X-Forwarded-User", "root"),
    ("x_forwarded-user", "root"),
    ("X-Employee-Id", "1"),  # the policy's strip_headers.add
]
STRIPPED = {"remote-user", "x-forwarded-user", "x-employee-id"}


def no_forged_field(seen: Any) -> None:
    names = {k.lower().replace("_", "-") for k, _ in seen.headers}
    assert not names & STRIPPED
    assert all(v != "root" and v != "chosen-by-the-client" for _, v in seen.headers)


def test_an_allowed_request_reaches_the_backend_with_authgates_identity(
    front: Running, recorder: Backend, token: Token
) -> None:
    admin = token(sub="alice", roles=["admin"])
    r = send(front.address, "GET", "/api/admin/x?q=1", bearer(admin) + FORGED)
    assert r.status == 200, r.body
    assert r.json() == {"path": "/api/admin/x?q=1"}
    [seen] = recorder.seen
    assert seen.method == "GET" and seen.target == "/api/admin/x?q=1"
    assert seen.header("X-Auth-Subject") == "alice"
    assert seen.header("X-Auth-Roles") == "admin"
    assert seen.header("X-Auth-Issuer") == "https://issuer.example"
    assert seen.header("X-Auth-Scopes") in (None, "")
    assert seen.header("Authorization") == f"Bearer {admin}"  # forward_credentials
    assert re.fullmatch(r"[0-9a-f]{32}", seen.header("X-Request-Id") or "")
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    no_forged_field(seen)


def test_an_anonymous_allowed_request_carries_no_identity(
    front: Running, recorder: Backend
) -> None:
    r = send(front.address, "GET", "/health", FORGED)
    assert r.status == 200
    [seen] = recorder.seen
    for name in checks.IDENTITY:
        assert seen.header(name) in (None, ""), name
    no_forged_field(seen)


# --- every denial: authgate's very answer, nothing forwarded --------------------------


@dataclass(frozen=True)
class Denial:
    name: str
    method: str
    path: str
    headers: Callable[[Token], list[tuple[str, str]]]
    status: int
    # field -> a part of its value, or None: absent
    expect: tuple[tuple[str, str | None], ...] = ()


BROWSER = [("Accept", "text/html"), ("Sec-Fetch-Mode", "navigate")]
DENIALS = [
    Denial("sign-in", "GET", "/app/home", lambda t: BROWSER, 303,
           (("Location", "/login?next=%2Fapp%2Fhome"),)),
    Denial("malformed path", "GET", "/api/profile;v=1", lambda t: [], 400),
    Denial("no credentials", "GET", "/api/profile", lambda t: [], 401,
           (("WWW-Authenticate", 'Bearer realm="api"'),)),
    Denial("bad token", "GET", "/api/profile", lambda t: bearer("abc.def.ghi"), 401,
           (("WWW-Authenticate", 'error="invalid_token"'),)),
    Denial("expired token", "GET", "/api/profile", lambda t: bearer(t(ttl=-3600)), 401,
           (("WWW-Authenticate", 'error="invalid_token"'),)),
    Denial("wrong role", "GET", "/api/admin/x", lambda t: bearer(t(roles=["user"])), 403,
           (("WWW-Authenticate", None),)),
    Denial("missing scope", "POST", "/api/reports", lambda t: bearer(t(scopes=["x"])), 403,
           (("WWW-Authenticate", 'error="insufficient_scope"'),)),
    Denial("hidden route", "GET", "/api/secrets/x", lambda t: bearer(t(roles=["user"])), 404,
           (("WWW-Authenticate", None),)),
    Denial("unknown path", "GET", "/no/such/path", lambda t: [], 404),
    Denial("keys unavailable", "GET", "/api/profile",
           lambda t: bearer(t(iss="https://away.example")), 503, (("Retry-After", ""),)),
]  # fmt: skip


@pytest.mark.parametrize("case", DENIALS, ids=[d.name for d in DENIALS])
def test_every_denial_is_authgates_answer_and_nothing_is_forwarded(
    front: Running, service: Running, recorder: Backend, token: Token, case: Denial
) -> None:
    headers = case.headers(token)
    got = send(front.address, case.method, case.path, headers)
    assert got.status == case.status, got.body
    assert got.header(checks.DECISION) == "deny"
    for name, part in case.expect:
        value = got.header(name)
        assert (value is None) if part is None else (value is not None and part in value), name
    assert recorder.seen == []
    expected = direct(service, front, case.method, case.path, headers)
    if case.status == 503:
        # Retry-After counts down to the next key fetch: the same field, maybe not the value.
        got = Reply(got.status, [h for h in got.headers if h[0] != "Retry-After"], got.body)
        expected.headers[:] = [h for h in expected.headers if h[0] != "Retry-After"]
    same_answer(got, expected)
    assert recorder.seen == []


def test_a_hidden_route_is_the_unknown_paths_404(
    front: Running, recorder: Backend, token: Token
) -> None:
    unknown = send(front.address, "GET", "/no/such/path")
    for headers in ([], bearer(token(roles=["user"])), bearer("abc.def.ghi")):
        hidden = send(front.address, "GET", "/api/secrets/x", headers)
        assert hidden.status == unknown.status == 404
        assert fields(hidden) == fields(unknown)
        assert RID.sub(b"RID", hidden.body) == RID.sub(b"RID", unknown.body)
    assert recorder.seen == []


def test_a_blocked_client_gets_403_whatever_it_sends(
    front: Running, recorder: Backend, token: Token
) -> None:
    for headers in ([], bearer(token(roles=["admin"]))):
        r = send(front.address, "GET", "/health", headers, source="127.0.0.2")
        assert r.status == 403
        assert r.header("WWW-Authenticate") is None
        assert r.json()["status"] == 403
    assert recorder.seen == []


def test_the_rate_limit_is_429_with_retry_after_and_ratelimit_fields(
    front: Running, recorder: Backend, token: Token
) -> None:
    auth = bearer(token(sub=f"limited-{front.name}-{front.port}"))
    assert send(front.address, "GET", "/api/limited", auth).status == 200
    assert len(recorder.seen) == 1
    r = send(front.address, "GET", "/api/limited", auth)
    assert r.status == 429
    assert (r.header("Retry-After") or "").isdigit()
    assert r.header("RateLimit-Policy") == '"one-a-minute";q=1;w=60'
    assert (r.header("RateLimit") or "").startswith('"one-a-minute";r=0;t=')
    assert r.json()["status"] == 429
    assert len(recorder.seen) == 1


# --- when authgate does not answer ----------------------------------------------------


def _unavailable(r: Reply) -> None:
    assert r.status == 503, (r.status, r.body)
    assert r.header("Retry-After") == str(proxyconfig.RETRY_AFTER)
    assert json.loads(r.body)["status"] == 503


@pytest.mark.parametrize("kind", KINDS)
def test_a_check_answered_by_something_else_is_503_and_nothing_is_forwarded(
    kind: str, folder: Path, service: Running, recorder: Backend, token: Token
) -> None:
    """A misrouted check location (a default backend answering 200 without
    the decision field): fail closed, never forward."""
    with recording_server() as stray:
        if kind == "nginx":
            old = "proxy_pass http://authgate_decisions/nginx;"
            new = f"proxy_pass {stray.url}/nginx;"
        else:
            old = f"reverse_proxy 127.0.0.1:{service.port} {{"
            new = f"reverse_proxy 127.0.0.1:{stray.server.server_address[1]} {{"

        def misroute(text: str) -> str:
            assert text.count(old) == 1
            return text.replace(old, new)

        proxy = start_proxy(kind, folder, service.port, recorder.url, misroute)
        try:
            for headers in ([], bearer(token(roles=["admin"]))):
                _unavailable(send(proxy.address, "GET", "/api/admin/x", headers))
                _unavailable(send(proxy.address, "POST", "/health", headers, body=b"x"))
        finally:
            proxy.stop()
        assert len(stray.seen) == 4  # the checks went there
    assert recorder.seen == []


def test_authgate_paused_or_stopped_is_503_and_nothing_is_forwarded(
    folder: Path, recorder: Backend, token: Token, demo_key: Any
) -> None:
    own = folder / "stopped"
    own.mkdir()
    authgate = start_authgate(own)
    proxies = [start_proxy(kind, own, authgate.port, recorder.url) for kind in KINDS]
    admin = bearer(token(roles=["admin"]))
    try:
        for proxy in proxies:
            assert send(proxy.address, "GET", "/api/admin/x", admin).status == 200
        recorder.clear()
        # Paused (SIGSTOP, as a hang): each proxy's read timeout, then 503.
        authgate.proc.send_signal(signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(len(proxies)) as pool:
                replies = list(
                    pool.map(lambda p: send(p.address, "GET", "/api/admin/x", admin), proxies)
                )
        finally:
            authgate.proc.send_signal(signal.SIGCONT)
        for r in replies:
            _unavailable(r)
        # Stopped.
        authgate.stop()
        for proxy in proxies:
            for headers in ([], admin):
                _unavailable(send(proxy.address, "GET", "/api/admin/x", headers))
                _unavailable(send(proxy.address, "GET", "/health", headers))
        assert recorder.seen == []
    finally:
        for proxy in proxies:
            proxy.stop()
        authgate.stop()


# --- the decision endpoint itself -------------------------------------------------------


def test_an_untrusted_caller_of_the_decision_service_gets_403(service: Running) -> None:
    """Only the proxies (127.0.0.1) may describe a request; 127.0.0.2 may not."""
    described = [("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/health")]
    for path in ("/auth", "/nginx", "/envoy/health"):
        r = send(service.address, "GET", path, described, source="127.0.0.2")
        assert r.status == 403, path
        assert r.header(checks.ANSWER) is None
    # Nor have an answer of its choosing replayed.
    sealed = checks.seal(Rendered(401, (("WWW-Authenticate", "Bearer x"),), b"{}"))
    r = send(service.address, "GET", "/_answer", [(checks.ANSWER, sealed)], source="127.0.0.2")
    assert r.status == 503
    # From the trusted proxy's address, the same checks are judged.
    assert send(service.address, "GET", "/auth", described).status == 200


# --- the printed configurations, as the proxies read them --------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "[::1]:8080", "0.0.0.0:8080"])
def test_nginx_and_caddy_accept_the_configuration(
    tmp_path: Path, listen: str, demo_key: Any
) -> None:
    """`nginx -t` and `caddy validate` on what `authgate config` prints (nothing
    listens): every listen address form, the test policy's strip list."""
    args = ("127.0.0.1:9191", "http://127.0.0.1:9000", listen)
    policy = load_policy(str(POLICY))
    conf = tmp_path / "nginx.conf"
    conf.write_text(proxyconfig.nginx_main(proxyconfig.nginx(*args, policy=policy), tmp_path))
    argv = [_binary("nginx"), "-t", "-q", "-c", str(conf), "-p", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, timeout=START_SECONDS)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text("{\n\tadmin off\n}\n\n" + proxyconfig.caddy(*args, policy=policy))
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    argv = [_binary("caddy"), "validate", "--config", str(caddyfile), "--adapter", "caddyfile"]
    done = subprocess.run(argv, capture_output=True, timeout=START_SECONDS, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
