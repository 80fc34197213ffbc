"""`make bench`, the production part: what `--workers 2` buys over one process
on this machine, and what a Redis-limited route adds over the memory store.

- Throughput: `authgate run --workers 1` and `--workers 2` on the example
  policy (allow path, a valid token) under wrk at c=16, not pinned (two
  workers need both cores, which wrk and the backend share with them).
- Latency: the example policy's limits (global per-IP, lifted so that they
  never refuse, but counted on every request) with `--store memory` and with
  `--store redis://...` on a redis-server this benchmark starts on loopback,
  under wrk at c=1 with `--latency`: p50 and p99, and what Redis adds.

Needs wrk and redis-server (Debian packages); says so and skips otherwise.
Uses the servers and the wrk runner of authgate.tools.bench_e2e, which runs it
after its own part.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from authgate.tools import bench_e2e
from authgate.tools.bench_e2e import Bench, Case, Options

_LATENCY = re.compile(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class Latency:
    p50: float  # seconds
    p99: float


def parse_latency(out: str) -> Latency:
    """p50 and p99 from wrk's `--latency` distribution."""
    found = {int(m.group(1)): float(m.group(2)) * _UNIT[m.group(3)] for m in _LATENCY.finditer(out)}
    if 50 not in found or 99 not in found:
        raise ValueError(f"no latency distribution in wrk's output: {out[:300]!r}")
    return Latency(found[50], found[99])


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = bench_e2e._free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--logfile", str(folder / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            bench_e2e._wait_listening(port, proc, "redis-server", folder / "redis.log")
            return proc, f"redis://127.0.0.1:{port}/0"
        except SystemExit:
            break
    proc.kill()
    return None


def _wrk_latency(bench: Bench, case: Case, opts: Options) -> Latency:
    port = bench.ports[case.server]
    argv = ["wrk", "-t1", "-c1", f"-d{opts.duration}s", "--latency"]
    for k, v in case.headers:
        argv += ["-H", f"{k}: {v}"]
    argv.append(f"http://127.0.0.1:{port}/api/profile")
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"authgate bench: wrk failed: {out.stderr.strip()}")
    return parse_latency(out.stdout)


def bench_production(small: Path, token: str, folder: Path, opts: Options) -> None:
    bearer = (("Authorization", f"Bearer {token}"),)
    bench = Bench(folder, None, None)  # not pinned: the workers need both cores
    redis = start_redis(folder)
    try:
        upstream = bench.backend()
        bench.authgate("w1", small, upstream)
        bench.authgate("w2", small, upstream, "--workers", "2")
        wide = replace(opts, connections=16)
        cases = (
            Case("--workers 1, allow (200)", "w1", bearer, 200),
            Case("--workers 2, allow (200)", "w2", bearer, 200),
        )
        for case in cases:
            bench.wrk(case, replace(wide, duration=1))
        rps: dict[str, list[float]] = {c.label: [] for c in cases}
        for n in range(opts.rounds):
            for case in cases if n % 2 == 0 else cases[::-1]:
                rps[case.label].append(bench.wrk(case, wide).rps)
        print(f"workers: wrk -c16 -d{opts.duration}s, {opts.rounds} round(s), not pinned")
        one = statistics.median(rps[cases[0].label])
        for case in cases:
            med = statistics.median(rps[case.label])
            each = " ".join(f"{r:.0f}" for r in rps[case.label])
            print(f"  {case.label:28s} {med:8.0f} req/s {med / one:5.2f}x   {each}")
        if redis is None:
            print("store latency: skipped, no redis-server (apt-get install redis-server)")
            return
        bench.authgate("mem", small, upstream)
        bench.authgate("redis", small, upstream, "--store", redis[1])
        lat = (Case("memory store", "mem", bearer, 200), Case("redis store", "redis", bearer, 200))
        for case in lat:
            bench.wrk(case, replace(opts, duration=1))
        got: dict[str, list[Latency]] = {c.label: [] for c in lat}
        for n in range(opts.rounds):
            for case in lat if n % 2 == 0 else lat[::-1]:
                got[case.label].append(_wrk_latency(bench, case, opts))
        print(f"store latency: wrk -c1 -d{opts.duration}s --latency, example policy's limits")
        lats = {
            label: Latency(
                statistics.median(x.p50 for x in runs), statistics.median(x.p99 for x in runs)
            )
            for label, runs in got.items()
        }
        for label, m in lats.items():
            print(f"  {label:28s} p50 {m.p50 * 1e3:6.2f} ms   p99 {m.p99 * 1e3:6.2f} ms")
        mem, red = lats["memory store"], lats["redis store"]
        print(
            f"  {'redis adds':28s} p50 {(red.p50 - mem.p50) * 1e3:+6.2f} ms   "
            f"p99 {(red.p99 - mem.p99) * 1e3:+6.2f} ms"
        )
    finally:
        bench.stop()
        if redis is not None:
            redis[0].terminate()
            redis[0].wait(10)
