"""`make bench-workers`: what `authgate run --workers 2` serves beside
`--workers 1`, and what each request costs the workers; and `--workers 2`
with its rate limits on Redis (`--store redis://...`, a redis-server this
benchmark starts on loopback, when one is installed) beside the same on the
memory store.

The gateways run at once on the example policy (rate limits lifted, but
counted on every request) in front of the benchmark's backend, and wrk loads
them in turn, each round in another order.
Nothing is pinned: two workers need both cores. Per round: req/s, the
workers' CPU time per request (their own /proc counters: the process and
its children), the backend's, and how busy the whole machine was (/proc/stat).
Then the medians and each round's ratio of two workers to one.

What the figures mean: workers that share nothing on the request path cost
the same CPU per request however many run (a ratio near 1.00), and N of them
serve N times one as long as the machine has N cores to spare. On a 2-core
machine that also runs wrk and the backend, two workers leave it 100% busy
before that: the req/s ratio there is the machine's limit, the CPU ratio is
the gateway's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from authgate.tools.bench_e2e import (
    WRK_INSTALL,
    Bench,
    cpu_seconds,
    parse_wrk,
    write_policies,
)
from authgate.tools.bench_production import start_redis
from authgate.tools.keys import ensure_demo_keys, load_private_key, mint


@dataclass(frozen=True)
class Round:
    name: str  # the gateway: GATEWAYS
    rps: float
    cpu_us: float  # the gateway's processes, per request
    backend_us: float
    redis_us: float  # redis-server's CPU per request (0 without it)
    busy: float  # the machine, 0..1


# name: (workers, on Redis), in the order of the report
GATEWAYS = {
    "--workers 1": (1, False),
    "--workers 2": (2, False),
    "--workers 2, Redis": (2, True),
}


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (a supervisor's workers)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0.0
    for p in pids:
        try:
            total += cpu_seconds(p)
        except OSError:
            pass  # a child that ended meanwhile
    return total


def one_round(bench: Bench, name: str, token: str, seconds: int) -> Round:
    port = bench.ports[name]
    argv = ["wrk", "-t2", "-c16", f"-d{seconds}s", "-H", f"Authorization: Bearer {token}"]
    argv.append(f"http://127.0.0.1:{port}/api/profile")
    gateway, backend = bench.pids[name], bench.pids["backend"]
    redis = bench.pids.get("redis")
    cpu0, back0, (busy0, all0) = tree_cpu(gateway), cpu_seconds(backend), machine_ticks()
    redis0 = cpu_seconds(redis) if redis else 0.0
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    cpu1, back1, (busy1, all1) = tree_cpu(gateway), cpu_seconds(backend), machine_ticks()
    redis1 = cpu_seconds(redis) if redis else 0.0
    if out.returncode != 0:
        raise SystemExit(f"authgate bench: wrk failed ({out.returncode}): {out.stderr.strip()}")
    result = parse_wrk(out.stdout)
    if result.not_2xx > result.requests // 1000:
        raise SystemExit(f"authgate bench: {result.not_2xx} answers were not 200")
    n = max(1, result.requests)
    return Round(
        name,
        result.rps,
        (cpu1 - cpu0) / n * 1e6,
        (back1 - back0) / n * 1e6,
        (redis1 - redis0) / n * 1e6 if GATEWAYS[name][1] else 0.0,
        (busy1 - busy0) / max(1, all1 - all0),
    )


def report(rounds: Sequence[Round]) -> None:
    by: dict[str, list[Round]] = {}
    for r in rounds:
        by.setdefault(r.name, []).append(r)
    for label, rs in by.items():
        redis = statistics.median(r.redis_us for r in rs)
        print(
            f"  {label}: {statistics.median(r.rps for r in rs):,.0f} req/s, "
            f"{statistics.median(r.cpu_us for r in rs):,.0f} us CPU per request "
            f"(backend {statistics.median(r.backend_us for r in rs):,.0f} us"
            + (f", redis-server {redis:,.0f} us" if GATEWAYS[label][1] else "")
            + f"), machine {statistics.median(r.busy for r in rs):.0%} busy"
        )
    _ratios("2 workers / 1", by["--workers 1"], by["--workers 2"], "nothing grows with the workers")
    if "--workers 2, Redis" in by:
        _ratios(
            "2 workers, Redis / memory",
            by["--workers 2"],
            by["--workers 2, Redis"],
            "what the store's round trip costs the workers",
        )


def _ratios(label: str, base: Sequence[Round], other: Sequence[Round], cpu_means: str) -> None:
    rps = [b.rps / a.rps for a, b in zip(base, other, strict=True)]
    cpu = [b.cpu_us / a.cpu_us for a, b in zip(base, other, strict=True)]
    print(
        f"  {label}, req/s: {statistics.median(rps):.2f}x "
        f"(rounds {', '.join(f'{x:.2f}' for x in rps)})"
    )
    print(
        f"  {label}, CPU per request: {statistics.median(cpu):.2f}x "
        f"(rounds {', '.join(f'{x:.2f}' for x in cpu)}; 1.00: {cpu_means})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="make bench-workers",
        description="authgate run --workers 2 beside --workers 1 under wrk, alternating rounds.",
    )
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    p.add_argument("--duration", type=int, default=10, help="seconds of wrk per run (10)")
    p.add_argument("--policy", type=Path, default=Path("policies/example.yaml"))
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if a.rounds < 1 or a.duration < 1:
        p.error("--rounds and --duration must be at least 1")
    if shutil.which("wrk") is None:
        print(f"authgate bench: wrk is not installed (Debian/Ubuntu: {WRK_INSTALL})")
        return 1
    key = load_private_key(ensure_demo_keys(a.policy.parent / "keys"))
    token = mint(key, sub="alice", roles=["user"], ttl=86400)
    with tempfile.TemporaryDirectory(prefix="authgate-workers-") as d:
        folder = Path(d)
        small, _ = write_policies(a.policy, folder, 0, 0)
        bench = Bench(folder, None, None)
        redis = start_redis(folder)
        names = [n for n, (_, on_redis) in GATEWAYS.items() if redis or not on_redis]
        try:
            upstream = bench.backend()
            for name in names:
                workers, on_redis = GATEWAYS[name]
                store = ["--store", redis[1]] if redis and on_redis else []
                bench.authgate(name, small, upstream, "--workers", str(workers), *store)
            if redis:
                bench.pids["redis"] = redis[0].pid
            print(
                f"{', '.join(names)}: {a.rounds} rounds of wrk -t2 -c16 -d{a.duration}s each, "
                f"in turn, GET /api/profile with a valid token:"
            )
            if not redis:
                print("  (no Redis: redis-server is not installed; apt-get install redis-server)")
            rounds: list[Round] = []
            for i in range(a.rounds):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    r = one_round(bench, name, token, a.duration)
                    rounds.append(r)
                    print(
                        f"  round {i + 1}, {name}: {r.rps:,.0f} req/s, "
                        f"{r.cpu_us:,.0f} us CPU per request, machine {r.busy:.0%} busy",
                        flush=True,
                    )
            report(rounds)
        finally:
            bench.stop()
            if redis:
                redis[0].terminate()
                redis[0].wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
