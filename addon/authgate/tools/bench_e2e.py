"""`make bench`, end to end: `authgate run` beside a lean mitmproxy master, under wrk.

mitmproxy's per-request cost sets the ceiling, so the figure that says what
authgate itself costs is a ratio: `authgate run` against a master that loads
the same addons (`runner.lean_addons()`, the guards, the terminal log) but no
Gateway and forwards everything, on the same backend, in the same run. The
servers under test stay up and are measured in turn, a few alternating rounds;
the medians and the ratios are printed. Cases: the allow path (a valid RS256
token) and the deny path (401, no credentials), on the example policy and on a
generated one with 1,000 rules and a large block list.

Placement: the proxy under test gets the first CPU; wrk and the backend share
the second, so the three never fight over one core (mitmproxy is
single-threaded and is the bottleneck: the backend here does tens of thousands
of requests a second). Also printed: `prepare()` + `decide()` percentiles in
process on the big policy, timed call by call.

Internal entries (what the benchmark starts in child processes):
`python -m authgate.tools.bench_e2e _backend PORT` and
`python -m authgate.tools.bench_e2e _lean UPSTREAM LISTEN`.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from authgate.core.decision import RequestView, judge
from authgate.core.ipset import format_ip
from authgate.core.model import Policy
from authgate.policy.load import load_policy
from authgate.policy.marks import PolicyError
from authgate.runtime.stores import MemoryStore
from authgate.tools.keys import ensure_demo_keys, load_private_key, mint

# A quota the benchmark cannot exhaust: the limiter still runs on every request.
UNREACHABLE_RATE = "100000000/second"
WRK_INSTALL = "apt-get install wrk"


# --- options -----------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    rounds: int
    duration: int  # seconds per wrk run
    connections: int
    threads: int
    high_connections: int  # a second concurrency for lean and the example policy (0: none)
    rules: int
    block_entries: int
    decide_calls: int
    policy: Path


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"authgate bench: {name}={value!r} is not a whole number") from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return n


def options(argv: Sequence[str]) -> Options:
    """Parse `make bench ARGS="..."`; each default can also come from AUTHGATE_BENCH_<NAME>."""
    p = argparse.ArgumentParser(
        prog="make bench",
        description="authgate's benchmark: in process, then end to end under wrk. "
        'Options go in ARGS: make bench ARGS="--rounds 5 --duration 10".',
    )
    table: tuple[tuple[str, int, str], ...] = (
        ("rounds", 5, "alternating rounds of wrk runs"),
        ("duration", 5, "seconds per wrk run"),
        ("connections", 8, "wrk connections (-c)"),
        ("high-connections", 64, "a second -c for lean and the example policy (0: skip it)"),
        ("threads", 1, "wrk threads (-t)"),
        ("rules", 1000, "rules in the generated big policy"),
        ("block-entries", 1_000_000, "block-list entries in the big policy (0: none)"),
        ("decide-calls", 20_000, "timed decide() calls per in-process case"),
    )
    for name, default, text in table:
        env = "AUTHGATE_BENCH_" + name.upper().replace("-", "_")
        value = _env_int(env, default)
        p.add_argument(f"--{name}", type=_positive, default=value, help=f"{text} ({value}; {env})")
    p.add_argument(
        "--policy",
        type=Path,
        default=Path(os.environ.get("AUTHGATE_BENCH_POLICY", "policies/example.yaml")),
        help="the small policy (policies/example.yaml); its rate limits are lifted",
    )
    a = p.parse_args(list(argv))
    if a.rounds < 1 or a.duration < 1 or a.connections < 1 or a.threads < 1:
        p.error("--rounds, --duration, --connections and --threads must be at least 1")
    return Options(
        rounds=a.rounds,
        duration=a.duration,
        connections=a.connections,
        threads=a.threads,
        high_connections=a.high_connections,
        rules=a.rules,
        block_entries=a.block_entries,
        decide_calls=max(a.decide_calls, 1),
        policy=a.policy,
    )


# --- the policies --------------------------------------------------------------


def _lift_limits(limits: Any) -> Any:
    if isinstance(limits, list):
        for spec in limits:
            if isinstance(spec, dict) and "rate" in spec:
                spec["rate"] = UNREACHABLE_RATE
    return limits


def _generated_rule(i: int) -> dict[str, Any]:
    """One of four shapes (template, tail wildcard, method-bound literal,
    anonymous file); none matches the paths the benchmark requests."""
    shapes: tuple[dict[str, Any], ...] = (
        {
            "match": {"path": f"/svc{i}/items/{{id}}", "methods": ["GET"]},
            "allow": {"role": "admin"},
        },
        {"match": {"path": f"/svc{i}/**"}, "allow": "authenticated"},
        {"match": {"path": f"/api/v{i}/reports", "methods": ["POST"]}, "allow": {"scope": "w"}},
        {"match": {"path": f"/static{i}/{{file}}"}, "allow": "anyone"},
    )
    return {"name": f"generated-{i}", **shapes[i % len(shapes)]}


def _block_lines(entries: int, seed: int = 1) -> list[str]:
    """Half /24 networks, half addresses, none in 127/8 (the benchmark's clients)."""
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < entries:
        n = rng.getrandbits(32)
        if n >> 24 in (0, 127) or n >> 24 >= 224:
            continue
        lines.append(f"{format_ip(4, n & ~0xFF)}/24" if len(lines) % 2 else format_ip(4, n))
    return lines


def write_policies(source: Path, folder: Path, rules: int, block_entries: int) -> tuple[Path, Path]:
    """(small, big) policy files in `folder`: `source` with its rate limits
    lifted, and the same with generated rules before its own (so the requests
    benchmarked match near the end of the file) up to `rules` in all, plus
    `block_entries` block-list entries. `source`'s folder is copied along, so
    its relative paths (keys, block files) still resolve."""
    base = folder / "policy"
    shutil.copytree(source.parent, base, ignore=shutil.ignore_patterns("*.tests.yaml"))
    doc = yaml.safe_load(source.read_text())
    _lift_limits(doc.get("limits"))
    for rule in doc.get("rules", []):
        _lift_limits(rule.get("limits"))
    small = base / "bench-small.yaml"
    small.write_text(yaml.safe_dump(doc, sort_keys=False))
    own = list(doc.get("rules", []))
    doc["rules"] = [_generated_rule(i) for i in range(max(rules - len(own), 0))] + own
    if block_entries:
        (base / "bench-block.txt").write_text("\n".join(_block_lines(block_entries)) + "\n")
        ip = doc.setdefault("ip", {})
        ip["block_files"] = [*ip.get("block_files", []), "bench-block.txt"]
    big = base / "bench-big.yaml"
    big.write_text(yaml.safe_dump(doc, sort_keys=False))
    return small, big


def _big_name(opts: Options) -> str:
    blocked = f" + {opts.block_entries:,} blocked" if opts.block_entries else ""
    return f"{opts.rules:,} rules{blocked}"


# --- in process: decide() percentiles -------------------------------------------


def percentiles(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(p50, p99) in µs of `calls` individually timed calls."""
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        fn()
        samples.append(clock() - start)
    samples.sort()
    return samples[len(samples) // 2] / 1e3, samples[min(len(samples) * 99 // 100, calls - 1)] / 1e3


def bench_percentiles(small: Path, big: Path, token: str, opts: Options) -> None:
    print(f"prepare() + decide() in process, {opts.decide_calls:,} calls each, p50 / p99:")
    start = time.perf_counter()
    policies = {"example policy": load_policy(small)}
    policies[_big_name(opts)] = load_policy(big)
    load_s = time.perf_counter() - start
    allow = RequestView.build(
        "GET", "/api/profile", (("authorization", f"Bearer {token}"),), "127.0.0.1"
    )
    deny = RequestView.build("GET", "/api/profile", (), "127.0.0.1")
    limiter = MemoryStore()
    for name, policy in policies.items():
        for case, view, status in (("cached token", allow, 200), ("no credentials", deny, 401)):
            d = judge(policy, view, time.time(), limiter)  # also warms the token cache
            got = 200 if d.forwarded else d.status
            if got != status or d.reason not in ("allowed", "no_credentials"):
                raise SystemExit(f"authgate bench: {name}, {case}: expected {status}, got {got}")

            def call(p: Policy = policy, v: RequestView = view) -> object:
                return judge(p, v, time.time(), limiter)

            p50, p99 = percentiles(call, opts.decide_calls)
            label = f"{name}, {case} ({status})"
            print(f"  {label:56s} {p50:7.1f} / {p99:7.1f} µs")
    print(f"  (both policies loaded in {load_s:.1f} s)")


# --- child processes --------------------------------------------------------------


def _pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None
    # In the child before exec: every thread it starts inherits the mask.
    return lambda: os.sched_setaffinity(0, cpus)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise SystemExit(f"authgate bench: {what} exited with {proc.returncode}:\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"authgate bench: {what} did not listen on port {port} within 120 s")


def _status(port: int, path: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        status = conn.getresponse().status
        return status
    finally:
        conn.close()


@dataclass(frozen=True)
class Wrk:
    rps: float
    requests: int
    not_2xx: int  # wrk's "Non-2xx or 3xx responses"
    socket_errors: int
    cpu_per_request: float = 0.0  # the server's CPU seconds per request (wrk's run)


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_wrk(out: str) -> Wrk:
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise SystemExit(f"authgate bench: cannot read wrk's output:\n{out}")
    not_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Wrk(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        not_2xx=int(not_2xx.group(1)) if not_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


@dataclass(frozen=True)
class Case:
    label: str
    server: str  # key into the running servers
    headers: tuple[tuple[str, str], ...]
    status: int  # what every answer must be


class Bench:
    """The backend and the proxies under test, alive for the whole run."""

    def __init__(
        self, folder: Path, proxy_cpus: set[int] | None, load_cpus: set[int] | None
    ) -> None:
        self.folder = folder
        self.proxy_cpus = proxy_cpus
        self.load_cpus = load_cpus
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}

    def start(self, name: str, argv: list[str], cpus: set[int] | None, port: int) -> None:
        log = self.folder / f"{name}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # the decision lines: formatted, then dropped
                stderr=err,
                preexec_fn=_pinned(cpus),  # no threads here: safe
            )
        self.procs.append(proc)
        _wait_listening(port, proc, name, log)
        self.ports[name] = port
        self.pids[name] = proc.pid

    def backend(self) -> str:
        port = _free_port()
        argv = [sys.executable, "-m", "authgate.tools.bench_e2e", "_backend", str(port)]
        self.start("backend", argv, self.load_cpus, port)
        return f"http://127.0.0.1:{port}"

    def lean(self, upstream: str) -> None:
        port = _free_port()
        argv = [
            sys.executable,
            "-m",
            "authgate.tools.bench_e2e",
            "_lean",
            upstream,
            f"127.0.0.1:{port}",
        ]
        self.start("lean", argv, self.proxy_cpus, port)

    def authgate(self, name: str, policy: Path, upstream: str, *extra: str) -> None:
        port = _free_port()
        argv = [sys.executable, "-m", "authgate.cli", "run", "--policy", str(policy)]
        argv += ["--upstream", upstream, "--listen", f"127.0.0.1:{port}", *extra]
        self.start(name, argv, self.proxy_cpus, port)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def wrk(self, case: Case, opts: Options) -> Wrk:
        port = self.ports[case.server]
        got = _status(port, "/api/profile", dict(case.headers))
        if got != case.status:
            raise SystemExit(f"authgate bench: {case.label}: expected {case.status}, got {got}")
        url = f"http://127.0.0.1:{port}/api/profile"
        result, _ = self.run_wrk(case.server, url, case.headers, opts)
        wrong = result.requests - result.not_2xx if case.status >= 300 else result.not_2xx
        if wrong > result.requests // 1000:  # a request or two cut short at the end is wrk's doing
            raise SystemExit(
                f"authgate bench: {case.label}: {wrong} of {result.requests} answers "
                f"were not {case.status}"
            )
        return result

    def run_wrk(
        self,
        server: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        opts: Options,
        extra: Sequence[str] = (),
    ) -> tuple[Wrk, str]:
        """One wrk run on the load CPUs: (the figures, with `server`'s CPU time
        per request; wrk's output)."""
        argv = ["wrk", f"-t{opts.threads}", f"-c{opts.connections}", f"-d{opts.duration}s"]
        for k, v in headers:
            argv += ["-H", f"{k}: {v}"]
        argv += [*extra, url]
        pid = self.pids[server]
        before = cpu_seconds(pid)
        out = subprocess.run(
            argv, capture_output=True, text=True, check=False, preexec_fn=_pinned(self.load_cpus)
        )
        used = cpu_seconds(pid) - before
        if out.returncode != 0:
            raise SystemExit(f"authgate bench: wrk failed ({out.returncode}): {out.stderr.strip()}")
        result = parse_wrk(out.stdout)
        return replace(result, cpu_per_request=used / max(1, result.requests)), out.stdout


def _cpus() -> tuple[set[int] | None, set[int] | None, str]:
    have = sorted(os.sched_getaffinity(0))
    if len(have) < 2:
        return None, None, "not pinned (one CPU)"
    proxy, load = have[0], have[1]
    return {proxy}, {load}, f"proxy on cpu{proxy}, wrk and backend on cpu{load}"


def bench_e2e(small: Path, big: Path, token: str, folder: Path, opts: Options) -> None:
    proxy_cpus, load_cpus, placement = _cpus()
    bench = Bench(folder, proxy_cpus, load_cpus)
    bearer = (("Authorization", f"Bearer {token}"),)
    big_name = _big_name(opts)
    cases = (
        Case("lean master (no gateway), forwarded", "lean", bearer, 200),
        Case("authgate, example policy, allow (200)", "small", bearer, 200),
        Case("authgate, example policy, deny (401)", "small", (), 401),
        Case(f"authgate, {big_name}, allow (200)", "big", bearer, 200),
        Case(f"authgate, {big_name}, deny (401)", "big", (), 401),
    )
    try:
        upstream = bench.backend()
        bench.lean(upstream)
        bench.authgate("small", small, upstream)
        start = time.perf_counter()
        bench.authgate("big", big, upstream)
        big_start = time.perf_counter() - start
        print(
            f"end to end: wrk -t{opts.threads} -c{opts.connections} -d{opts.duration}s, "
            f"{opts.rounds} round(s), {placement}; GET /api/profile"
        )
        print(f"  (the {big_name} gateway took {big_start:.1f} s to listen)")
        load = os.getloadavg()[0]
        busy = " (other work is running: expect disturbed figures)" if load > 0.5 else ""
        print(f"  load average before the runs: {load:.2f}{busy}")
        rps, cpu = _rounds(bench, cases, opts)
        _report(cases, rps, cpu)
        for path in ("allow", "deny"):
            ours = statistics.median(rps[cases[1 if path == "allow" else 2].label])
            theirs = statistics.median(rps[cases[3 if path == "allow" else 4].label])
            print(f"  {big_name} / example policy, {path}: {theirs / ours:.2f}x")
        if opts.high_connections:
            high = replace(opts, connections=opts.high_connections)
            print(
                f"end to end at -c{high.connections}: wrk -t{opts.threads} "
                f"-d{opts.duration}s, {opts.rounds} round(s)"
            )
            rps, cpu = _rounds(bench, cases[:3], high)
            _report(cases[:3], rps, cpu)
    finally:
        bench.stop()


def _rounds(
    bench: Bench, cases: Sequence[Case], opts: Options
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """req/s and CPU seconds per request of each case, each round; the first
    connections and first tokens seen (a one-second run each) not counted."""
    warm = replace(opts, duration=1)
    for case in cases:
        bench.wrk(case, warm)
    rps: dict[str, list[float]] = {c.label: [] for c in cases}
    cpu: dict[str, list[float]] = {c.label: [] for c in cases}
    for n in range(opts.rounds):
        # Alternate the order too, so no server always runs right after another.
        for case in cases if n % 2 == 0 else cases[::-1]:
            got = bench.wrk(case, opts)
            rps[case.label].append(got.rps)
            cpu[case.label].append(got.cpu_per_request)
    return rps, cpu


def round_ratios(ours: Sequence[float], lean: Sequence[float]) -> list[float]:
    """Each round's figure over the lean master's in the same round."""
    return [a / b for a, b in zip(ours, lean, strict=True) if b > 0]


def _report(
    cases: Sequence[Case], rps: dict[str, list[float]], cpu: dict[str, list[float]]
) -> None:
    lean = statistics.median(rps[cases[0].label])
    width = max(len(c.label) for c in cases) + len(", CPU/req")
    print(f"  {'':{width}s} {'median':>8s} {'x lean':>7s}   rounds (req/s)")
    for case in cases:
        runs = rps[case.label]
        med = statistics.median(runs)
        each = " ".join(f"{r:.0f}" for r in runs)
        print(f"  {case.label:{width}s} {med:8.0f} {med / lean:6.2f}x   {each}")
    # CPU time per request is steadier than req/s on a VM whose neighbours
    # come and go: the proxy's own cost, whatever the throughput of the round.
    lean_cpu = statistics.median(cpu[cases[0].label])
    print(f"  {'':{width}s} {'CPU/req':>8s} {'x lean':>7s}")
    for case in cases:
        med = statistics.median(cpu[case.label])
        print(f"  {case.label:{width}s} {med * 1e6:6.0f}µs {med / lean_cpu:6.2f}x")
    # The ratio within each round (the lean master ran beside it), then their
    # median: what the performance goals are stated in.
    print(f"  {'per round, x lean (same round)':{width}s} {'median':>8s}   rounds")
    for case in cases[1:]:
        for what, table, invert in (("req/s", rps, False), ("CPU/req", cpu, True)):
            ratios = round_ratios(table[case.label], table[cases[0].label])
            if invert:
                ratios = [1 / r for r in ratios if r > 0]  # lean's CPU over ours: higher is better
            each = " ".join(f"{r:.2f}" for r in ratios)
            label = f"{case.label}, {what}"
            print(f"  {label:{width}s} {statistics.median(ratios):7.2f}x   {each}")


def run(opts: Options) -> int:
    """The end-to-end part and the in-process percentiles; 0 when wrk is missing."""
    if not opts.policy.is_file():
        raise SystemExit(f"authgate bench: no policy file {opts.policy} (run from the repository)")
    key = load_private_key(ensure_demo_keys(opts.policy.parent / "keys"))
    try:
        load_policy(opts.policy)  # its problems named in its own lines, not the copy's
    except PolicyError as e:
        raise SystemExit(f"authgate bench: {e}") from None
    token = mint(key, sub="alice", roles=["user"], ttl=86400)
    with tempfile.TemporaryDirectory(prefix="authgate-bench-") as d:
        folder = Path(d)
        small, big = write_policies(opts.policy, folder, opts.rules, opts.block_entries)
        try:
            bench_percentiles(small, big, token, opts)
        except PolicyError as e:
            raise SystemExit(f"authgate bench: {e}") from None
        if shutil.which("wrk") is None:
            print(f"end to end: skipped, wrk is not installed (Debian/Ubuntu: {WRK_INSTALL})")
            return 0
        bench_e2e(small, big, token, folder, opts)
        from authgate.tools.bench_production import bench_production

        bench_production(small, token, folder, opts)
        from authgate.tools.bench_service import bench_service

        bench_service(small, token, folder, opts)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_backend"]:
        return serve_backend(int(args[1]))
    if args[:1] == ["_lean"]:
        return serve_lean(args[1], args[2], fast=args[3:4] == ["fast"])
    return run(options(args))


# --- the child entries ----------------------------------------------------------------

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


class _Backend(asyncio.Protocol):
    """200 to every request, keep-alive; request bodies (Content-Length) are skipped."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            m = _LENGTH.search(self.buffer, 0, end + 2)
            size = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buffer) < size:
                return
            self.buffer = self.buffer[size:]
            self.transport.write(_OK)


def serve_backend(port: int) -> int:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Backend, "127.0.0.1", port)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(serve())
    return 0


def serve_lean(upstream: str, listen: str, fast: bool = False) -> int:
    """`authgate run`'s master without the Gateway: what runner.build() loads
    (lean addons, guards, terminal log at info level), forwarding everything;
    with mitmproxy's own hook dispatch, or (`fast`) authgate's cached one."""
    import logging

    from mitmproxy import master, options

    from authgate.proxy import dispatch, guard, runner

    async def serve() -> None:
        logging.getLogger().setLevel(logging.INFO)
        # Any: mitmproxy's master and options are only partly annotated.
        opts: Any = options.Options()
        m: Any = master.Master(opts, with_termlog=True)
        m.addons.add(*runner.lean_addons())
        m.addons.add(*guard.addons())
        opts.update(mode=[runner.mode_spec(upstream, listen)], connection_strategy="lazy")
        if fast:
            dispatch.use(m)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, m.shutdown)
        await m.run()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
