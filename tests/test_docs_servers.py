"""The docs' server commands, run as written. Every `authgate run`, `authgate
demo`, `mitmdump -s addon/gateway.py` and `make run` line in a ```sh block of
the README or docs/ (`\\` continuations joined) is started as the reader would
paste it, with the venv's `authgate` and `mitmdump` first on PATH, but on free
ports: each documented port (and the implied defaults, 8080 for the gateway,
9000 for the demo's backend, 8999 for its identity provider) is rewritten to a
free one, consistently across the command, the curl lines of its block and,
where a policy names the port, a copy of that policy. An `--upstream` on
loopback is a recording backend. Each must listen, answer the probes of its
policy with that policy's statuses (a denial reaching nothing behind it), run
the curl lines of its block with the status their comment promises, and stop
cleanly on SIGTERM. Lines that need what only the reader has (their files, their
hosts) are skipped, each by name and reason, and a skip must still be in the docs.

The `$ curl` lines of ```text blocks aimed at the demo's 127.0.0.1:8080 are run
against one `authgate demo` on free ports, expecting the status the block shows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, START_SECONDS, Backend, send, wait_until
from test_startup import LISTENING, free_port, wait_for_port, wait_for_text

BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)
TEXT_BLOCK = re.compile(r"```text\n(.*?)```", re.S)
# A server command: what starts something that listens (after any VAR=value).
SERVER = re.compile(
    r"^(?:[A-Z_]+=\S+ )*(?:\.venv/bin/)?"
    r"(?:authgate (?:run|demo)\b|mitmdump -s addon/gateway\.py|make run\b)"
)
CURL = re.compile(r"^(?:[A-Z_]+=\S+ )*curl\b")
ADDRESS = re.compile(r"\b(127\.0\.0\.1|0\.0\.0\.0|localhost):(\d{2,5})\b")
UPSTREAM = re.compile(r"(?:--upstream |reverse:)http://127\.0\.0\.1:(\d+)")
STATUS_COMMENT = re.compile(r"#\s*(\d{3})\b")

# Server lines not run, each with why: they name what only the reader has.
SKIPPED = {
    "authgate run --policy /etc/authgate/policy.yaml --upstream http://127.0.0.1:9000 "
    "--listen 0.0.0.0:8443 --tls-cert /etc/authgate/tls.crt --tls-key /etc/authgate/tls.key "
    "--workers auto --store redis://10.0.0.5:6379/0 --admin 127.0.0.1:9901":
    # the reader's policy, certificate and key under /etc/authgate
    "files the reader makes (/etc/authgate/...)",
    "authgate run --policy /etc/authgate/policy.yaml --upstream http://127.0.0.1:9000 "
    "--listen 0.0.0.0:443 --tls-cert /etc/authgate/tls.crt --tls-key /etc/authgate/tls.key":
    # docs/login.md: the reader's policy naming their OpenID provider; the login
    # itself runs against a real provider in tests/test_login.py
    "the reader's policy, provider, certificate and key (/etc/authgate/...)",
    "authgate run --policy policies/example.yaml --upstream http://127.0.0.1:9000 "
    "--listen 0.0.0.0:8443 --tls-cert /etc/authgate/tls.crt --tls-key /etc/authgate/tls.key":
    # tests/test_tls.py runs these options with a throwaway CA
    "the reader's certificate and key (/etc/authgate/tls.*)",
    "authgate run --policy policies/example.yaml --upstream https://backend.internal:8443 "
    "--upstream-ca /etc/authgate/backend-ca.pem":
    # tests/test_tls.py covers --upstream-ca against an HTTPS backend of its own
    "the reader's CA file (/etc/authgate/backend-ca.pem)",
    "authgate run --policy policy.yaml --upstream http://127.0.0.1:9000 "
    "--tls-cert server.crt --tls-key server.key --tls-client-ca clients-ca.crt":
    # docs/credentials.md: tests/test_mtls.py runs these options with openssl-made
    # CAs, server and client certificates
    "the reader's policy, certificates and client CA",
    "AUTHGATE_REDIS_PASSWORD=secret authgate run --policy policies/rate-limits.yaml "
    "--upstream http://127.0.0.1:9000 --store rediss://redis.internal:6380/0":
    # a TLS Redis with a password: tests/test_production_redis.py's business
    "the reader's TLS Redis (rediss://redis.internal)",
}

# What each policy a documented command serves answers, for requests without
# credentials: (method, path, status). Written from the policy files' rules.
PROBES: dict[str, list[tuple[str, str, int]]] = {
    "example.yaml": [("GET", "/health", 200), ("GET", "/api/profile", 401)],
    "rate-limits.yaml": [("POST", "/login", 200), ("GET", "/api/search", 401)],
    "identity-provider.yaml": [("GET", "/api/x", 401), ("GET", "/health", 404)],
    "watch.yaml": [("GET", "/health", 200), ("GET", "/admin/users", 401)],
}
# Gateway defaults a command leaves out, which the test must move too.
DEFAULT_LISTEN, DEFAULT_BACKEND, DEFAULT_IDP = 8080, 9000, 8999


@dataclass(frozen=True)
class Documented:
    where: str  # doc:line
    line: str  # the command, continuations joined, comment stripped
    curls: tuple[str, ...]  # the curl lines that follow it in its block (with comments)


def _logical_lines(block: str) -> list[str]:
    """The block's lines with `\\` continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in block.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1].rstrip() + " "
            continue
        out.append(pending + raw.strip() if pending else raw)
        pending = ""
    return [re.sub(r"\s+", " ", line.strip()) for line in out if line.strip()]


def _uncommented(line: str) -> str:
    return re.split(r"\s+#", line, maxsplit=1)[0].strip()


def _documented() -> tuple[list[Documented], list[str]]:
    """The runnable server commands, and the skipped ones found."""
    run: list[Documented] = []
    skipped: list[str] = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in SH_BLOCK.finditer(text):
            first = text[: m.start()].count("\n") + 2
            lines = _logical_lines(m.group(1))
            for i, line in enumerate(lines):
                command = _uncommented(line)
                if not SERVER.match(command):
                    continue
                if command in SKIPPED:
                    skipped.append(command)
                    continue
                curls = []
                for later in lines[i + 1 :]:
                    if SERVER.match(later):
                        break
                    if CURL.match(later):
                        curls.append(later)
                run.append(Documented(f"{doc.name}:{first + i}", command, tuple(curls)))
    return run, skipped


COMMANDS, FOUND_SKIPPED = _documented()


def test_the_docs_have_server_commands_to_run() -> None:
    assert len(COMMANDS) >= 5
    assert any(c.curls for c in COMMANDS)


def test_every_skipped_line_is_still_in_the_docs() -> None:
    """A skip the docs no longer have is stale: remove it from SKIPPED."""
    assert sorted(set(SKIPPED) - set(FOUND_SKIPPED)) == []


def test_no_curl_in_a_sh_block_is_left_unrun() -> None:
    """A ```sh curl line must follow a server command in its block (so it is
    run against that server); one on its own needs a home in this file."""
    attached = {c for d in COMMANDS for c in d.curls}
    for doc in DOCS:
        for block in SH_BLOCK.findall(doc.read_text(encoding="utf-8")):
            for line in _logical_lines(block):
                if CURL.match(line):
                    assert line in attached, f"{doc.name}: {line}"


# --- rewriting ports ------------------------------------------------------------


class Ports:
    """Documented port -> the free port standing in for it, the same for every
    line of one command's block."""

    def __init__(self, fixed: dict[int, int] | None = None) -> None:
        self.map = dict(fixed or {})

    def __getitem__(self, documented: int) -> int:
        if documented not in self.map:
            self.map[documented] = free_port()
        return self.map[documented]

    def rewrite(self, line: str) -> str:
        return ADDRESS.sub(lambda m: f"{m.group(1)}:{self[int(m.group(2))]}", line)


def _with_defaults(command: str, ports: Ports) -> str:
    """Give the defaults a command leaves out their free stand-ins."""
    if re.search(r"\bmake run\b", command):
        assert "ARGS=" not in command, command
        return (
            f'{command} ARGS="--listen 127.0.0.1:{ports[DEFAULT_LISTEN]}'
            f' --backend 127.0.0.1:{ports[DEFAULT_BACKEND]}"'
        )
    if "mitmdump" in command:
        if "--listen-port" not in command:
            command += f" --listen-port {ports[DEFAULT_LISTEN]}"
        return command
    if "--listen" not in command:
        command += f" --listen 127.0.0.1:{ports[DEFAULT_LISTEN]}"
    if re.search(r"\bauthgate demo\b", command):
        if "--backend" not in command:
            command += f" --backend 127.0.0.1:{ports[DEFAULT_BACKEND]}"
        command = re.sub(r"--idp(?= --|$)", f"--idp 127.0.0.1:{ports[DEFAULT_IDP]}", command)
    return command


def _listen_port(command: str) -> int:
    m = re.search(r"--listen-port (\d+)", command) or re.search(r"--listen \S+:(\d+)", command)
    assert m, command
    return int(m.group(1))


def _policy(command: str) -> str:
    m = re.search(r"(?:--policy |authgate_policy=)(\S+)", command)
    return m.group(1) if m else "policies/example.yaml"  # the demo's default


def _portable_policy(policy: str, ports: Ports, tmp_path: Path) -> str:
    """The policy itself, or, when it names a port the test moved (the demo
    provider's 8999), a copy naming the stand-in, beside the demo keys."""
    text = (ROOT / policy).read_text(encoding="utf-8")
    named = {int(p) for _, p in ADDRESS.findall(text)}
    if not named & ports.map.keys():
        return policy
    (tmp_path / "keys").symlink_to(ROOT / "policies" / "keys")
    copy = tmp_path / Path(policy).name
    copy.write_text(ports.rewrite(text), encoding="utf-8")
    return str(copy)


# --- running --------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The reader's shell after `. .venv/bin/activate` (output unbuffered, so
    the test reads what the server says as it says it)."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1")


def _start(command: str, log: Path) -> subprocess.Popen[str]:
    # Its own process group, so SIGTERM reaches what `make run` starts, as
    # Ctrl-C reaches a terminal's foreground group. Its output goes to `log`.
    with log.open("w") as out:
        return subprocess.Popen(
            ["bash", "-c", command],
            cwd=ROOT,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def _wait_started(command: str, listen: int, proc: subprocess.Popen[str], log: Path) -> None:
    """Until it listens and says it has started, as the reader sees it do before
    using it (or stopping it: a SIGTERM in the midst of start-up is another
    test's business): "authgate: listening on" (mitmdump: mitmproxy's
    "listening at"), and with `--workers N` every worker listening."""
    wait_for_text(log, " listening at " if "mitmdump" in command else LISTENING, proc)
    wait_for_port(listen, proc)
    workers = re.search(r"--workers (\S+)", command)
    n = 1 if not workers else int(workers.group(1).replace("auto", str(_cores())))
    wait_until(
        lambda: log.read_text(errors="replace").count(" listening at ") >= n,
        START_SECONDS,
        what=f"{n} processes listening",
    )


def _cores() -> int:
    """What `--workers auto` starts: the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


def _stop(proc: subprocess.Popen[str], log: Path) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=START_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"did not stop on SIGTERM:\n{log.read_text()}") from None
    # Nothing it started (workers, make's demo) outlives it.
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    return log.read_text(errors="replace")


def _curl_status(line: str) -> tuple[int, str]:
    """Run a curl line as written (plus -w to read its status); (status, output)."""
    r = subprocess.run(
        ["bash", "-c", f"{_uncommented(line)} -w '\\n@status %{{http_code}}\\n'"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=START_SECONDS,
    )
    assert r.returncode == 0, f"curl failed ({r.returncode}): {r.stderr}"
    statuses = re.findall(r"^@status (\d{3})$", r.stdout, re.M)
    assert statuses, r.stdout
    return int(statuses[-1]), r.stdout


def _check_curl(line: str, promised: int | None) -> None:
    status, out = _curl_status(line)
    if promised is not None:
        assert status == promised, (line, out)
    else:  # the docs promise nothing: at least not the gateway's or backend's failure
        assert 200 <= status < 500, (line, out)


def _needs_redis(command: str, request: pytest.FixtureRequest) -> str:
    m = re.search(r"--store (redis://\S+?)(/\d+)?(?=\s|$)", command)
    if not m:
        return command
    local = request.getfixturevalue("redis_server").url  # redis://127.0.0.1:PORT/0
    return command.replace(m.group(0), f"--store {local}")


@pytest.mark.parametrize("doc", COMMANDS, ids=[f"{c.where} {c.line[:60]}" for c in COMMANDS])
def test_a_documented_server_command_serves_as_written(
    doc: Documented, backend: Backend, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if (
        doc.line.startswith("make ")
        and subprocess.run(["make", "-q", "install"], cwd=ROOT).returncode
    ):
        pytest.skip("`make run` would reinstall the venv first: run `make install`")
    upstream = UPSTREAM.search(doc.line)
    ports = Ports({int(upstream.group(1)): backend.server.server_address[1]} if upstream else {})
    command = _needs_redis(_with_defaults(ports.rewrite(doc.line), ports), request)
    policy = _policy(command)
    command = command.replace(policy, _portable_policy(policy, ports, tmp_path), 1)
    curls = [ports.rewrite(c) for c in doc.curls]
    listen = _listen_port(command)

    log = tmp_path / "server.out"
    proc = _start(command, log)
    try:
        _wait_started(command, listen, proc, log)
        admin = re.search(r"--admin \S+:(\d+)", command)
        if admin:
            wait_for_port(int(admin.group(1)), proc)
        # An upstream on another host (backend.internal) is the reader's: what
        # it would answer cannot be probed here, what the gateway denies can.
        theirs = "--upstream" in command and not upstream
        for method, path, status in PROBES[Path(policy).name]:
            if status < 400 and theirs:
                continue
            before = len(backend.seen)
            reply = send(("127.0.0.1", listen), method, path)
            assert reply.status == status, (method, path, reply.status, reply.body)
            if upstream and status >= 400:
                assert len(backend.seen) == before, "a denial reached the backend"
            elif upstream:
                assert [s.target for s in backend.seen[before:]] == [path]
        for line in curls:
            promised = STATUS_COMMENT.search(line.partition(" #")[2])
            _check_curl(line, int(promised.group(1)) if promised else None)
    finally:
        out = _stop(proc, log)
    # mitmdump's own passlib traceback is harmless and documented (operations.md).
    assert out.count("Traceback") == out.count("(trapped) error reading bcrypt version"), out
    if not command.startswith("make "):
        assert proc.returncode == 0, (proc.returncode, out)


# --- the ```text curl lines, against one demo -------------------------------------


def _text_curls() -> list[tuple[str, str, int | None]]:
    """(doc:line, command, the status the block shows) for each `$ curl` line of
    a ```text block aimed at the demo (127.0.0.1:8080) without its own server."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in TEXT_BLOCK.finditer(text):
            block = m.group(1)
            if re.search(r"^\$ (?:authgate (?:run|demo)|mitmdump)", block, re.M):
                continue  # a session with a server of its own
            first = text[: m.start()].count("\n") + 2
            sessions = re.split(r"^(?=\$ )", block, flags=re.M)
            offset = 0
            for session in sessions:
                lines = session.splitlines()
                at = offset
                offset += len(lines)
                if not session.startswith("$ curl") or "127.0.0.1:8080" not in session:
                    continue
                command_lines = [lines[0][2:]]
                while command_lines[-1].endswith("\\"):
                    command_lines.append(lines[len(command_lines)])
                command = " ".join(c.rstrip("\\").strip() for c in command_lines)
                shown = re.search(r"^HTTP/[\d.]+ (\d{3})", session, re.M)
                status = int(shown.group(1)) if shown else None
                if status is None and '"backend": "authgate demo backend"' in session:
                    status = 200  # the demo backend's echo: the request got through
                out.append((f"{doc.name}:{first + at}", command, status))
    return out


TEXT_CURLS = _text_curls()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    """One `authgate demo` on free ports; yields the port map for 8080/9000."""
    ports = Ports()
    command = (
        f"authgate demo --listen 127.0.0.1:{ports[DEFAULT_LISTEN]}"
        f" --backend 127.0.0.1:{ports[DEFAULT_BACKEND]}"
    )
    log = tmp_path_factory.mktemp("demo") / "demo.out"
    proc = _start(command, log)
    try:
        _wait_started(command, ports[DEFAULT_LISTEN], proc, log)
        yield ports
    finally:
        _stop(proc, log)


def test_the_docs_show_curl_sessions_against_the_demo() -> None:
    assert len(TEXT_CURLS) >= 2
    assert any(status for _, _, status in TEXT_CURLS)


@pytest.mark.parametrize(
    "where, command, shown", TEXT_CURLS, ids=[f"{w} {c[:50]}" for w, c, _ in TEXT_CURLS]
)
def test_a_shown_curl_gets_the_status_the_docs_show(
    where: str, command: str, shown: int | None, demo: Ports
) -> None:
    _check_curl(demo.rewrite(command), shown)


def test_ports_are_rewritten_consistently() -> None:
    """The rewriting itself: one documented port, one stand-in, everywhere."""
    ports = Ports({9000: 1234})
    line = "x --listen 0.0.0.0:8443 --upstream http://127.0.0.1:9000 --admin 127.0.0.1:8443"
    out = ports.rewrite(line)
    stand_in = ports.map[8443]
    assert out == (
        f"x --listen 0.0.0.0:{stand_in} --upstream http://127.0.0.1:1234"
        f" --admin 127.0.0.1:{stand_in}"
    )
    assert _with_defaults("make run", ports).startswith('make run ARGS="--listen 127.0.0.1:')
    demo = _with_defaults("authgate demo --idp", ports)
    assert f"--idp 127.0.0.1:{ports.map[8999]}" in demo and "--backend 127.0.0.1:1234" in demo
