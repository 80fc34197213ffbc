"""How fast `authgate denials` reads a decision log.

Writes a log of a million lines in the gateway's own format (nine in ten
allowed, most of them authenticated; the denials a mix of 401s with
fingerprints, 403s with their condition, hidden 404s, 429s and report-mode
would-denies, with a prober and a password guesser among them), plain and
gzip-compressed, then times `authgate denials` on each as a subprocess (start
included) and the analysis alone in this process. Figures, never assertions:
docs/denials.md records them.

    python -m authgate.tools.bench_denials [--lines N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from authgate.tools.denials import analyze

_LINE = json.JSONEncoder(separators=(",", ":"))
START = 1_800_000_000.0


def entries(n: int, seed: int = 1) -> Iterator[dict[str, Any]]:
    """`n` entries over about a day, in time order, in the log's key order."""
    rng = random.Random(seed)
    users = [f"user{i}" for i in range(2000)]
    rules = ["profile", "orders", "user-record", "reports", "admin", "health", "exports"]
    for i in range(n):
        sub, rule, roll = rng.choice(users), rng.choice(rules), rng.random()
        path = f"/api/{rule}/{rng.randrange(10**6)}"
        who: str | None = sub
        more: dict[str, str] = {}
        decision, status, reason = "deny", 0, "allowed"
        if roll < 0.8:
            decision = "allow"
        elif roll < 0.9:
            decision, path, rule, who = "allow", "/health", "health", None
        elif roll < 0.94:
            status, reason, who = 401, "invalid_token", None
            more = {"detail": "expired", "cred_fp": f"{rng.getrandbits(48):012x}"}
        elif roll < 0.97:
            status, reason = 403, "forbidden"
            more = {"condition": "any of(claim sub equals '{id}'=false, role admin=false)"}
        elif roll < 0.98:
            path, rule, status, reason = f"/admin/{rng.randrange(100)}", "admin", 404, "hidden"
            more = {"detail": "forbidden", "condition": "role admin=false"}
        elif roll < 0.99:
            decision, rule, status, reason = "would_deny", "exports", 403, "forbidden"
            more = {"condition": "role exporter=false"}
        else:
            status, reason, more = 429, "rate_limited", {"detail": "per-ip"}
        yield {
            "time": round(START + i * 86400 / n, 3),
            "request_id": os.urandom(16).hex(),
            "client_ip": f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}",
            "method": "GET",
            "path": path,
            "rule": rule,
            "decision": decision,
            "status": status or None,
            "reason": reason,
            "subject": who,
            "via": "authorization" if who or status == 401 else None,
            **more,
        }


def write(folder: Path, n: int) -> tuple[Path, Path]:
    plain = folder / "decisions.jsonl"
    with plain.open("w") as f:
        for e in entries(n):
            f.write(_LINE.encode(e) + "\n")
    packed = folder / "decisions.jsonl.1.gz"
    with plain.open("rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return plain, packed


def timed(argv: list[str]) -> tuple[float, float, float]:
    """A command's wall and CPU seconds (on a busy machine the CPU time says
    what the command costs), and its peak memory in MB."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall = time.perf_counter() - start
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m authgate.tools.bench_denials")
    p.add_argument("--lines", type=int, default=1_000_000, help="lines in the log (1,000,000)")
    args = p.parse_args(argv)
    command = [str(Path(sys.executable).parent / "authgate"), "denials"]
    with tempfile.TemporaryDirectory() as tmp:
        plain, packed = write(Path(tmp), args.lines)
        size = plain.stat().st_size / 1e6
        print(f"{args.lines:,} lines, {size:.0f} MB ({packed.stat().st_size / 1e6:.0f} MB gzip)")
        # The commands first: a child's peak memory counts its parent's at the
        # fork, so this process stays small until they are done.
        for name, path in (("plain", plain), ("gzip", packed)):
            wall, cpu, peak = timed([*command, str(path)])
            print(
                f"  authgate denials, {name}: {wall:5.2f} s, CPU {cpu:5.2f} s, {peak:.0f} MB peak"
            )
        start, cpu = time.perf_counter(), time.process_time()
        report = analyze([str(plain)])
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        rate = args.lines / cpu / 1e6
        found = len(report.findings)
        print(
            f"  analysis in process:     {wall:5.2f} s, CPU {cpu:5.2f} s ({rate:.2f} M lines/s "
            f"of CPU, {found} findings)"
        )


if __name__ == "__main__":
    main()
