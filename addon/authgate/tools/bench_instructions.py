"""`make bench-instructions`: what one request costs each server, counted in
CPU instructions under valgrind's callgrind instead of timed.

On a shared 2-core VM, req/s and even CPU time per request drift from round
to round by more than the 10% the performance goals are about. Instructions
executed do not: the same program answering the same requests executes the
same instructions whatever else the machine is doing (to within a fraction
of a percent: hash seeds are fixed, and the garbage collector runs at the same
allocation counts). They are not time (a cache miss costs more than an add),
but for two builds of the same Python program doing the same kind of work,
their ratio is the cost ratio the goals ask about.

Each server runs under `valgrind --tool=callgrind --instr-atstart=no`;
after it listens and has answered a warm-up, counting is switched on
(`callgrind_control -i on`), what it does idle for a few seconds is counted
(its timers, which valgrind's slowness would otherwise charge to the
requests), then N requests are sent one after another on one keep-alive
connection, the counts are dumped, and the server stopped. The figure is the
requests' count less the idle rate over their wall time, divided by N. The
servers: the lean master (`authgate run`'s master without the gateway, with
mitmproxy's own hook dispatch, as `make bench`'s floor), the lean master with
authgate's cached hook dispatch (`proxy/dispatch.py`, what `authgate run`
uses), and `authgate run` on the example policy (rate limits lifted),
allowed and denied.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from authgate.tools.bench_e2e import _free_port, _wait_listening, write_policies
from authgate.tools.keys import ensure_demo_keys, load_private_key, mint

VALGRIND_INSTALL = "apt-get install valgrind"


@dataclass(frozen=True)
class Server:
    label: str
    argv: tuple[str, ...]  # {port} and {upstream} filled in
    headers: tuple[tuple[str, str], ...]
    status: int


def parse_summary(text: str) -> int:
    """The instruction count of one callgrind output file (its `summary:` or
    `totals:` line); 0 when it has none."""
    for line in text.splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    return 0


def send(
    port: int, n: int, headers: Sequence[tuple[str, str]], timeout: float = 300
) -> dict[int, int]:
    """N GETs of /api/profile on one keep-alive connection: {status: count}."""
    seen: collections.Counter[int] = collections.Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        for _ in range(n):
            conn.request("GET", "/api/profile", headers=dict(headers))
            response = conn.getresponse()
            response.read()
            seen[response.status] += 1
    finally:
        conn.close()
    return dict(seen)


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=True, timeout=120)


def _dumped(out: Path, before: set[Path]) -> int:
    """The instructions in the dump files that appeared since `before`."""
    files = set(out.parent.glob(f"{out.name}.*")) - before
    return sum(parse_summary(f.read_text()) for f in files if not f.name.endswith(".log"))


def count(server: Server, upstream: str, folder: Path, requests: int, idle: float) -> int:
    """Instructions per request of one server, less what it does while idle.

    A server's timers (file watching, sweeps) run by the wall clock, and under
    valgrind a second of wall clock holds a hundred requests, not thousands:
    so the instructions of `idle` seconds without requests are counted first,
    and that rate times the requests' wall time taken off their count."""
    port = _free_port()
    out = folder / f"{server.label.replace(' ', '-').replace(',', '')}.callgrind"
    argv = [a.format(port=port, upstream=upstream) for a in server.argv]
    log = folder / f"{out.name}.log"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                *argv,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    try:
        _wait_listening(port, proc, server.label, log)
        send(port, 20, server.headers)  # first connection, first token seen: not counted
        pid = str(proc.pid)
        seen_files = set(folder.glob(f"{out.name}.*"))
        _control("-i", "on", pid)
        idle_count = 0
        if idle > 0:
            start = time.monotonic()
            time.sleep(idle)
            _control("-d", pid)
            idle_rate = _dumped(out, seen_files) / (time.monotonic() - start)
            seen_files = set(folder.glob(f"{out.name}.*"))
        else:
            idle_rate = 0.0
        start = time.monotonic()
        seen = send(port, requests, server.headers)
        _control("-d", pid)
        wall = time.monotonic() - start
        idle_count = int(idle_rate * wall)
        busy = _dumped(out, seen_files)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(60)
    if seen != {server.status: requests}:
        raise SystemExit(f"authgate bench: {server.label}: expected {server.status}, got {seen}")
    return max(0, busy - idle_count) // requests


def servers(policy: Path, token: str) -> tuple[Server, ...]:
    py = sys.executable
    lean = (py, "-m", "authgate.tools.bench_e2e", "_lean", "{upstream}", "127.0.0.1:{port}")
    run: tuple[str, ...] = (py, "-m", "authgate.cli", "run", "--policy", str(policy))
    run += ("--upstream", "{upstream}", "--listen", "127.0.0.1:{port}")
    bearer = (("Authorization", f"Bearer {token}"),)
    return (
        Server("lean master", lean, bearer, 200),
        Server("lean master, cached dispatch", (*lean, "fast"), bearer, 200),
        Server("authgate, example policy, allow (200)", run, bearer, 200),
        Server("authgate, example policy, deny (401)", run, (), 401),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="make bench-instructions",
        description="Instructions per request of the lean master and authgate run, "
        "counted under valgrind (about a minute per server).",
    )
    p.add_argument("--requests", type=int, default=1000, help="counted requests per server (1000)")
    p.add_argument("--only", default="", help="only the servers whose label contains this")
    p.add_argument(
        "--idle", type=float, default=5.0, help="seconds of idle counting taken off (5; 0: none)"
    )
    p.add_argument("--policy", type=Path, default=Path("policies/example.yaml"))
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print(f"authgate bench: valgrind is not installed (Debian/Ubuntu: {VALGRIND_INSTALL})")
        return 1
    if a.requests < 1:
        p.error("--requests must be at least 1")
    key = load_private_key(ensure_demo_keys(a.policy.parent / "keys"))
    token = mint(key, sub="alice", roles=["user"], ttl=86400)
    with tempfile.TemporaryDirectory(prefix="authgate-instructions-") as d:
        folder = Path(d)
        small, _ = write_policies(a.policy, folder, 0, 0)
        port = _free_port()
        backend = subprocess.Popen(
            [sys.executable, "-m", "authgate.tools.bench_e2e", "_backend", str(port)],
            stdin=subprocess.DEVNULL,
        )
        try:
            _wait_listening(port, backend, "backend", folder / "backend.log")
            upstream = f"http://127.0.0.1:{port}"
            print(
                f"instructions per request under callgrind, {a.requests} GET /api/profile "
                "one after another on one connection:"
            )
            results: dict[str, int] = {}
            for server in servers(small, token):
                if a.only and a.only not in server.label:
                    continue
                results[server.label] = count(server, upstream, folder, a.requests, a.idle)
                print(f"  {server.label:40s} {results[server.label]:>12,}", flush=True)
        finally:
            backend.terminate()
            backend.wait(30)
    report(results)
    return 0


def report(results: dict[str, int]) -> None:
    """The ratios the goals are stated in, from what was counted."""
    lean = results.get("lean master")
    fast = results.get("lean master, cached dispatch")
    allow = results.get("authgate, example policy, allow (200)")
    if lean and fast:
        share = 1 - fast / lean
        print(f"  mitmproxy's hook dispatch: {share:.0%} of the lean master's instructions")
    if allow and fast:
        own = allow / fast - 1
        print(
            f"  authgate's own cost on an allowed request: {own:+.1%} over the same master "
            f"(x{fast / allow:.2f} in throughput terms)"
        )
    if allow and lean:
        ratio = lean / allow
        print(f"  authgate run / the lean master as shipped: x{ratio:.2f} in throughput terms")


if __name__ == "__main__":
    sys.exit(main())
