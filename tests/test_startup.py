"""The two doors, as a user runs them: `authgate run` and `mitmdump -s`.

Real subprocesses: a bad policy refuses to start naming file and line, no
policy refuses to start, and a good one serves.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE, ROOT, Backend, send

BIN = Path(sys.executable).parent
BROKEN = "version: 1\nrules:\n  - name: a\n    match: {path: /x, methods: GET}\n    allow: anyone\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[str], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}: {proc.stdout.read()}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the gateway did not start listening")


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, then collect the output (closing the pipe)."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def authgate_run(policy: Path | str, upstream: str, port: int) -> list[str]:
    return [
        str(BIN / "authgate"),
        "run",
        "--policy",
        str(policy),
        "--upstream",
        upstream,
        "--listen",
        f"127.0.0.1:{port}",
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
    door, backend: Backend, token, demo_key
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        door(EXAMPLE, backend.url, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        wait_for_port(port, proc)
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
        assert proc.returncode == 0


def test_make_run_pieces_demo_command_prints_a_curl_for_every_status(tmp_path: Path) -> None:
    """`authgate demo` (what `make run` starts) prints ready-to-paste commands."""
    port, backend_port = free_port(), free_port()
    env = dict(os.environ)
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
        env=env,
    )
    try:
        wait_for_port(port, proc)
        assert send(("127.0.0.1", port), "GET", "/health").status == 200
    finally:
        out = stop(proc)
    for status in ("200", "401", "400", "403", "404", "429"):
        assert f"# {status} " in out
    assert "insufficient_scope" in out and "--interface 127.0.0.2" in out
