"""The two doors, as a user runs them: `authgate run` and `mitmdump -s`.

Real subprocesses: a bad policy refuses to start naming file and line, no
policy refuses to start, and a good one serves.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    EXAMPLE,
    REQUEST_SECONDS,
    ROOT,
    START_SECONDS,
    UNBUFFERED_ENV,
    Backend,
    send,
    wait_until,
)
from ports import free_port

BIN = Path(sys.executable).parent
BROKEN = "version: 1\nrules:\n  - name: a\n    match: {path: /x, methods: GET}\n    allow: anyone\n"


def wait_for_port(port: int, proc: subprocess.Popen[str], seconds: float = START_SECONDS) -> None:
    """Until something accepts on 127.0.0.1:port; fails at once if `proc` exits."""

    def listening() -> bool:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"exited early with {proc.returncode}: {out}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, seconds, every=0.1, what=f"something listening on port {port}")


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, then collect the output (closing the pipe)."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=START_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def wait_for_text(log: Path, text: str, proc: subprocess.Popen[str] | None = None) -> str:
    """Until `text` is in the file a process writes its output to; the output.
    Fails at once if `proc` exits first."""

    def said() -> str | None:
        out = log.read_text(errors="replace") if log.exists() else ""
        if text in out:
            return out
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before saying {text!r}: {out}")
        return None

    result: str = wait_until(said, START_SECONDS, what=f"{text!r} in {log}")
    return result


# What `authgate run` says once it has started (its last start-up hook), as
# docs/operations.md shows; mitmdump says only mitmproxy's " listening at ".
LISTENING = "authgate: listening on "


def wait_started(log: Path, proc: subprocess.Popen[str], port: int, said: str = LISTENING) -> None:
    """Until the gateway writing to `log` listens on `port` and has said it has
    started: its start-up hooks (which log the start-up warnings) have run,
    and a SIGTERM no longer races them."""
    wait_for_text(log, said, proc)  # (with the output, should it exit instead)
    wait_for_port(port, proc)


def start_logged(cmd: list[str], log: Path) -> subprocess.Popen[str]:
    """`cmd` with its output (stdout and stderr) going to `log`, readable while it runs."""
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=UNBUFFERED_ENV
        )


def authgate_run(policy: Path | str, upstream: str, port: int, *extra: str) -> list[str]:
    return [
        str(BIN / "authgate"),
        "run",
        "--policy",
        str(policy),
        "--upstream",
        upstream,
        "--listen",
        f"127.0.0.1:{port}",
        *extra,
    ]


def mitmdump(policy: Path | str | None, upstream: str, port: int) -> list[str]:
    cmd = [
        str(BIN / "mitmdump"),
        "-s",
        str(ROOT / "addon" / "gateway.py"),
        "--mode",
        f"reverse:{upstream}@127.0.0.1:{port}",
        "--set",
        "connection_strategy=lazy",
    ]
    if policy is not None:
        cmd += ["--set", f"authgate_policy={policy}"]
    return cmd


@pytest.mark.parametrize("door", [authgate_run, mitmdump], ids=["authgate-run", "mitmdump-s"])
def test_a_broken_policy_refuses_to_start_naming_file_and_line(door, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    policy = tmp_path / "broken.yaml"
    policy.write_text(BROKEN)
    proc = subprocess.run(
        door(policy, "http://127.0.0.1:9", free_port()),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"{policy}:4: rule 'a' match.methods must be a list" in out


def test_mitmdump_without_a_policy_refuses_to_start() -> None:
    proc = subprocess.run(
        mitmdump(None, "http://127.0.0.1:9", free_port()),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "authgate: no policy" in proc.stdout + proc.stderr


@pytest.mark.parametrize("door", [authgate_run, mitmdump], ids=["authgate-run", "mitmdump-s"])
def test_both_doors_serve_the_example_policy(  # type: ignore[no-untyped-def]
    door, backend: Backend, token, demo_key, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "gateway.out"
    proc = start_logged(door(EXAMPLE, backend.url, port), log)
    try:
        wait_started(log, proc, port, LISTENING if door is authgate_run else " listening at ")
        address = ("127.0.0.1", port)
        assert send(address, "GET", "/api/profile").status == 401
        user = token(sub="alice", roles=["user"])
        assert (
            send(address, "GET", "/api/admin/x", [("Authorization", f"Bearer {user}")]).status
            == 403
        )
        assert backend.seen == []
        assert (
            send(address, "GET", "/api/profile", [("Authorization", f"Bearer {user}")]).status
            == 200
        )
        assert [s.header("X-Auth-Subject") for s in backend.seen] == ["alice"]
    finally:
        stop(proc)
    if door is authgate_run:
        assert proc.returncode == 0, log.read_text()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_demo_prints_a_curl_for_every_status_and_each_gets_it() -> None:
    """`authgate demo` (what `make run` starts) prints ready-to-paste curl
    commands, one per row of the status table; run each and check its status."""
    port, backend_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "authgate"),
            "demo",
            "--listen",
            f"127.0.0.1:{port}",
            "--backend",
            f"127.0.0.1:{backend_port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    banner: list[str] = []
    try:
        wait_for_port(port, proc)
        for line in proc.stdout:
            banner.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C"):
                break
        commands = [
            (banner[i][2:], banner[i + 1])
            for i in range(len(banner) - 1)
            if banner[i].startswith("# ") and banner[i][2:5].isdigit()
        ]
        seen_statuses = set()
        for what, command in commands:
            expected = what[:3]
            seen_statuses.add(expected)
            out = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT
            ).stdout
            got = re.findall(r"^HTTP/1.1 (\d{3})", out, re.MULTILINE) or out.split()
            if expected == "429":
                assert got == ["200"] * 5 + ["429"], (what, got)
            else:
                assert got and all(g == expected for g in got), (what, got)
        assert seen_statuses == {"200", "400", "401", "403", "404", "429"}
    finally:
        stop(proc)


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_basic_beyond_loopback_is_warned_about_at_start(
    host: str, warned: bool, tmp_path: Path
) -> None:
    port = free_port()
    cmd = [
        str(BIN / "authgate"),
        "run",
        "--policy",
        str(ROOT / "policies" / "basic-auth.yaml"),
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        f"{host}:{port}",
    ]
    log = tmp_path / "gateway.out"
    proc = start_logged(cmd, log)
    try:
        # The warning comes with the start-up hooks, after the port listens.
        wait_started(log, proc, port)
    finally:
        stop(proc)
    out = log.read_text()
    assert ("cross the network in clear text" in out) == warned, out


def test_mitmweb_shows_the_decision_in_the_flow_list(backend: Backend) -> None:
    """`authgate run --web`: mitmweb's HTTP API, as its flow list reads it."""
    import json
    import urllib.request

    from mitmproxy.version import VERSION

    port, web = free_port(), free_port()
    cmd = [*authgate_run(EXAMPLE, backend.url, port), "--web", "--web-listen", f"127.0.0.1:{web}"]
    auth: dict[str, str] = {}
    if int(VERSION.split(".")[0]) >= 12:  # mitmweb 12 asks for a password (11 has none)
        cmd += ["--set", "web_password=test-password"]
        auth = {"Authorization": "Bearer test-password"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc)
        wait_for_port(web, proc)
        assert send(("127.0.0.1", port), "GET", "/api/profile").status == 401
        assert send(("127.0.0.1", port), "GET", "/health").status == 200

        def get(path: str) -> object:
            request = urllib.request.Request(f"http://127.0.0.1:{web}{path}", headers=auth)
            with urllib.request.urlopen(request, timeout=REQUEST_SECONDS) as r:
                return json.load(r)

        def both_listed() -> object:
            flows = get("/flows")
            assert isinstance(flows, list)
            return {"/api/profile", "/health"} <= {f["request"]["path"] for f in flows} and flows

        flows = wait_until(both_listed, what="both flows in mitmweb's list")
        comments = {f["request"]["path"]: f["comment"] for f in flows}
        markers = {f["request"]["path"]: f["marked"] for f in flows}
        # Symbols stock fonts draw, not emoji that show as boxes without an emoji font.
        assert markers == {"/api/profile": "\u2716", "/health": ""}
        # The short form first (the Comment column is narrow), then the line filters read.
        assert comments["/api/profile"] == (
            "401 no credentials\nauthgate: 401 by rule profile (no_credentials)"
        )
        assert comments["/health"] == "200 health\nauthgate: allowed by rule health (allowed)"
        options = get("/options")
        assert isinstance(options, dict)
        assert "comment" in options["web_columns"]["value"]  # a column, no click needed
        assert options["listen_port"]["value"] == port  # what the status bar shows
    finally:
        stop(proc)


def test_run_with_an_https_upstream_exits_0_on_sigterm_every_time(tmp_path: Path) -> None:
    """The interpreter's teardown after a clean stop used to crash (SIGSEGV)
    about one exit in ten with an https:// upstream; a stopped gateway now
    ends without it. Several starts, each stopped after one request."""
    for i in range(6):
        port = free_port()
        log = tmp_path / f"gateway-{i}.out"
        proc = start_logged(authgate_run(EXAMPLE, "https://127.0.0.1:9", port), log)
        wait_started(log, proc, port)
        assert send(("127.0.0.1", port), "GET", "/api/profile").status == 401
        stop(proc)
        assert proc.returncode == 0, (proc.returncode, log.read_text())


# --- the commands that never proxy start without mitmproxy ------------------------

_NO_MITMPROXY = """
import sys
from authgate.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m == "mitmproxy" or m.startswith("mitmproxy."))
print("mitmproxy modules:", len(loaded), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "policies/example.yaml"],
        ["test", "policies/example.yaml"],
        ["explain", "policies/example.yaml", "GET", "/api/profile"],
        ["token", "--sub", "alice"],
    ],
    ids=["check", "test", "explain", "token"],
)
def test_a_command_that_never_proxies_never_imports_mitmproxy(argv: list[str]) -> None:
    """mitmproxy takes half a second to import: the policy tools (and the
    decision service, below) do without it."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", _NO_MITMPROXY, *argv],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "mitmproxy modules: 0" in out.stderr, out.stderr[-2000:]
    assert out.returncode in (0, 1), out.stderr[-2000:]  # explain's 401 is 1


def test_the_decision_service_never_imports_mitmproxy() -> None:
    code = (
        "import sys\n"
        "from authgate.tools import commands\n"
        "from authgate.service import server\n"
        "from authgate.house import workers\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mitmproxy'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
