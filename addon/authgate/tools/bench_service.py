"""`make bench`, the decision service: `authgate serve` under wrk, and nginx +
one `authgate serve` process end to end beside one `authgate run` worker.

- Allowed decisions a second on one core: the example policy (its limits out
  of reach, so the limiter still runs), a token the service has seen before,
  check requests shaped as the shipped nginx configuration sends them. The
  service gets the first CPU; wrk the second. CPU time per decision from the
  service's own /proc counters.
- p99 at half that rate: wrk with a delay between each connection's requests
  (an open-ish load: the rate is set by the script, not by the service).
- End to end: nginx (`authgate config nginx`, one worker) with the service
  behind `auth_request`, against `authgate run` (one worker), same backend,
  same wrk, alternating rounds; the service on the first CPU, nginx, the
  backend and wrk on the second.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
from pathlib import Path

import yaml

from authgate.tools.bench_e2e import Bench, Options, Wrk, _cpus, _free_port

_DELAY_SCRIPT = """
wrk.method = "GET"
function delay() return {delay_ms} end
"""


def _with_trusted_proxy(source: Path) -> Path:
    """The bench copy of the policy, trusting the loopback proxy."""
    doc = yaml.safe_load(source.read_text())
    doc.setdefault("client_ip", {})["trusted_proxies"] = ["127.0.0.1/32"]
    out = source.parent / "bench-service.yaml"  # beside it: its relative paths hold
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def _wrk(
    bench: Bench,
    name: str,
    url: str,
    headers: dict[str, str],
    opts: Options,
    *,
    latency: bool = False,
    script: Path | None = None,
) -> tuple[Wrk, float]:
    """One wrk run, every answer a 2xx: (the figures, p99 in seconds or 0)."""
    extra = ["--latency"] if latency else []
    if script is not None:
        extra += ["-s", str(script)]
    got, out = bench.run_wrk(name, url, tuple(headers.items()), opts, extra)
    if got.not_2xx > got.requests // 1000:
        raise SystemExit(f"authgate bench: {name}: {got.not_2xx} answers were not 2xx")
    p99 = 0.0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "99%":
            value = parts[1]
            unit = 1e-6 if value.endswith("us") else 1e-3 if value.endswith("ms") else 1.0
            p99 = float(value.rstrip("usm")) * unit
    return got, p99


def bench_service(small: Path, token: str, folder: Path, opts: Options) -> None:
    proxy_cpus, load_cpus, placement = _cpus()
    bench = Bench(folder, proxy_cpus, load_cpus)
    policy = _with_trusted_proxy(small)
    check = {
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Uri": "/api/profile",
        "Authorization": f"Bearer {token}",
    }
    try:
        port = _free_port()
        argv = [sys.executable, "-m", "authgate.cli", "serve", "--policy", str(policy)]
        argv += ["--listen", f"127.0.0.1:{port}"]
        bench.start("serve", argv, proxy_cpus, port)
        url = f"http://127.0.0.1:{port}/auth"
        print(
            f"decision service: authgate serve, one process, {placement}; "
            f"wrk -t{opts.threads} -c{opts.connections} -d{opts.duration}s; "
            "GET /auth as nginx asks it, a token seen before"
        )
        _wrk(bench, "serve", url, check, Options(**{**opts.__dict__, "duration": 1}))
        rounds = [_wrk(bench, "serve", url, check, opts)[0] for _ in range(opts.rounds)]
        rps = statistics.median(r.rps for r in rounds)
        cpu = statistics.median(r.cpu_per_request for r in rounds)
        each = " ".join(f"{r.rps:.0f}" for r in rounds)
        print(f"  allowed decisions/s (median)       {rps:8.0f}   rounds: {each}")
        print(f"  CPU per decision                   {cpu * 1e6:6.1f} µs  ({1 / cpu:.0f}/s a core)")
        target = rps / 2
        delay_ms = max(0, int(opts.connections * 1000 / target))
        script = folder / "delay.lua"
        script.write_text(_DELAY_SCRIPT.format(delay_ms=delay_ms))
        half, p99 = _wrk(bench, "serve", url, check, opts, latency=True, script=script)
        print(
            f"  at about half that rate ({half.rps:.0f}/s)   p99 {p99 * 1e3:6.2f} ms "
            f"({opts.connections} connections, {delay_ms} ms apart)"
        )
    finally:
        bench.stop()
    bench_nginx(policy, token, folder, opts)


def bench_nginx(policy: Path, token: str, folder: Path, opts: Options) -> None:
    """nginx + one decision process, against one `authgate run` worker."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    try:
        from authgate.tools import proxyconfig
    except ImportError:
        print("  nginx end to end: skipped (no `authgate config nginx` in this version)")
        return
    if not nginx:
        print("  nginx end to end: skipped, nginx is not installed (Debian: apt-get install nginx)")
        return
    proxy_cpus, load_cpus, placement = _cpus()
    bench = Bench(folder, proxy_cpus, load_cpus)
    bearer = {"Authorization": f"Bearer {token}"}
    try:
        upstream = bench.backend()
        service_port, front_port, run_port = _free_port(), _free_port(), _free_port()
        argv = [sys.executable, "-m", "authgate.cli", "serve", "--policy", str(policy)]
        argv += ["--listen", f"127.0.0.1:{service_port}"]
        bench.start("serve", argv, proxy_cpus, service_port)
        conf = folder / "nginx.conf"
        prefix = folder / "nginx"
        prefix.mkdir(exist_ok=True)
        text = proxyconfig.nginx(
            authgate=f"127.0.0.1:{service_port}",
            upstream=upstream,
            listen=f"127.0.0.1:{front_port}",
            policy=None,
        )
        conf.write_text(proxyconfig.nginx_main(text, prefix, workers=1))
        bench.start(
            "nginx",
            [nginx, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
            load_cpus,
            front_port,
        )
        argv = [sys.executable, "-m", "authgate.cli", "run", "--policy", str(policy)]
        argv += ["--upstream", upstream, "--listen", f"127.0.0.1:{run_port}"]
        bench.start("run", argv, proxy_cpus, run_port)
        print(
            f"  end to end, allowed GET /api/profile: nginx (1 worker) + authgate serve vs "
            f"authgate run (1 worker); {placement} (nginx beside wrk)"
        )
        urls = {
            "nginx": f"http://127.0.0.1:{front_port}/api/profile",
            "run": f"http://127.0.0.1:{run_port}/api/profile",
        }
        warm = Options(**{**opts.__dict__, "duration": 1})
        for name, url in urls.items():
            _wrk(bench, name if name == "run" else "serve", url, bearer, warm)
        rps: dict[str, list[float]] = {"nginx": [], "run": []}
        for n in range(opts.rounds):
            for name in ("nginx", "run") if n % 2 == 0 else ("run", "nginx"):
                got, _ = _wrk(bench, name if name == "run" else "serve", urls[name], bearer, opts)
                rps[name].append(got.rps)
    finally:
        bench.stop()
    front = statistics.median(rps["nginx"])
    alone = statistics.median(rps["run"])
    print(f"  nginx + authgate serve             {front:8.0f}   rounds: "
          + " ".join(f"{r:.0f}" for r in rps["nginx"]))  # fmt: skip
    print(f"  authgate run                       {alone:8.0f}   rounds: "
          + " ".join(f"{r:.0f}" for r in rps["run"]))  # fmt: skip
    print(f"  ratio                              {front / alone:8.2f}x")
    print(f"  machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
