"""The end-to-end benchmark runs and prints its table (no timing is asserted).

Real processes: the benchmark's backend, the lean master and two `authgate run`
gateways, under wrk. Skipped where wrk is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from authgate.core.decision import RequestView, judge
from authgate.policy.load import load_policy
from authgate.runtime.stores import MemoryStore
from authgate.tools import bench_e2e

ROOT = Path(__file__).resolve().parent.parent

ROWS = (
    "lean master (no gateway), forwarded",
    "authgate, example policy, allow (200)",
    "authgate, example policy, deny (401)",
    "authgate, 50 rules + 100 blocked, allow (200)",
    "authgate, 50 rules + 100 blocked, deny (401)",
)


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_prints_every_row_with_a_rate_and_a_ratio() -> None:
    argv = ["--rounds", "1", "--duration", "1", "--rules", "50", "--block-entries", "100"]
    out = subprocess.run(
        [sys.executable, "-m", "authgate.tools.bench_e2e", *argv, "--decide-calls", "200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # generous: the machine may be busy with other work
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for row in ROWS:
        # label, median req/s, ratio to the lean master, the round's figure
        assert re.search(rf"^  {re.escape(row)}\s+\d+\s+\d+\.\d\dx\s+\d+$", out.stdout, re.M), (
            row,
            out.stdout,
        )
    assert re.search(r"^  lean master \(no gateway\), forwarded\s+\d+\s+1\.00x", out.stdout, re.M)
    # The goals' figures: each round's ratio to the lean master of that round,
    # req/s and CPU, at the usual concurrency and at 64 connections.
    for row in ROWS[1:]:
        for what in ("req/s", "CPU/req"):
            label = re.escape(f"{row}, {what}")
            assert re.search(rf"^  {label}\s+\d+\.\d\dx\s+\d+\.\d\d$", out.stdout, re.M), out.stdout
    assert "end to end at -c64:" in out.stdout
    # The production part: workers and the store's latency.
    for workers in ("1", "2"):
        assert re.search(rf"^  --workers {workers}, allow \(200\)\s+\d+ req/s", out.stdout, re.M)
    for store in ("memory store", "redis store", "redis adds"):
        assert re.search(rf"^  {store}\s+p50\s+[+-]?[\d.]+ ms\s+p99", out.stdout, re.M), out.stdout
    for path in ("allow", "deny"):
        assert re.search(
            rf"50 rules \+ 100 blocked / example policy, {path}: \d+\.\d\dx", out.stdout
        )
    for case in ("cached token (200)", "no credentials (401)"):
        assert re.search(
            rf"50 rules \+ 100 blocked, {re.escape(case)}\s+[\d.]+ /\s+[\d.]+ µs", out.stdout
        )


WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:1/api/profile
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    10.01ms    1.00ms  20.00ms   90.00%
    Req/Sec   800.00    10.00   810.00     90.00%
  812 requests in 1.01s, 100.00KB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 812
Requests/sec:    803.96
Transfer/sec:     99.00KB
"""


@pytest.mark.parametrize(
    "text,rps,requests,not_2xx,errors",
    [
        (WRK_OUTPUT, 803.96, 812, 812, 3),
        (
            "\n".join(
                line
                for line in WRK_OUTPUT.splitlines()
                if not line.strip().startswith(("Non-2xx", "Socket"))
            ),
            803.96,
            812,
            0,
            0,
        ),
    ],
)
def test_reads_wrk_output(text: str, rps: float, requests: int, not_2xx: int, errors: int) -> None:
    got = bench_e2e.parse_wrk(text)
    assert (got.rps, got.requests, got.not_2xx, got.socket_errors) == (
        rps,
        requests,
        not_2xx,
        errors,
    )


def test_unreadable_wrk_output_stops_the_bench() -> None:
    with pytest.raises(SystemExit, match="cannot read wrk's output"):
        bench_e2e.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_bad_option_is_refused_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_e2e.options(["--rounds", "many"])
    assert "'many' is not a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("rules,entries", [(10, 0), (1000, 2000)])
def test_generated_policies_load_and_keep_the_example_rules_last(
    tmp_path: Path, rules: int, entries: int
) -> None:
    small, big = bench_e2e.write_policies(
        ROOT / "policies" / "example.yaml", tmp_path, rules, entries
    )
    small_policy, big_policy = load_policy(small), load_policy(big)
    names = [r.name for r in big_policy.rules]
    assert len(names) == max(rules, len(small_policy.rules))
    assert names[-len(small_policy.rules) :] == [r.name for r in small_policy.rules]
    # the benchmark's client is never blocked, and the deny path still reaches the rule
    for policy in (small_policy, big_policy):
        d = judge(
            policy, RequestView.build("GET", "/api/profile", (), "127.0.0.1"), 0.0, MemoryStore()
        )
        assert (d.status, d.rule) == (401, "profile")
    blocked = tmp_path / "policy" / "bench-block.txt"
    assert (len(blocked.read_text().splitlines()) if entries else blocked.exists()) == (
        entries or False
    )


@pytest.mark.parametrize(
    ("ours", "lean", "want"),
    [
        ([90.0, 80.0], [100.0, 100.0], [0.9, 0.8]),
        ([50.0], [0.0], []),  # a round where the lean master served nothing says nothing
        ([], [], []),
    ],
)
def test_round_ratios_pair_each_round_with_the_lean_master_of_that_round(
    ours: list[float], lean: list[float], want: list[float]
) -> None:
    assert bench_e2e.round_ratios(ours, lean) == pytest.approx(want)


def test_without_wrk_says_how_to_install_it_and_still_times_decide(tmp_path: Path) -> None:
    argv = ["--rules", "20", "--block-entries", "100", "--decide-calls", "100"]
    out = subprocess.run(
        [sys.executable, "-m", "authgate.tools.bench_e2e", *argv],
        cwd=ROOT,
        env={"PATH": str(tmp_path)},  # an empty folder: no wrk on it
        capture_output=True,
        text=True,
        timeout=600,  # generous: the machine may be busy with other work
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "end to end: skipped, wrk is not installed" in out.stdout
    assert "apt-get install wrk" in out.stdout
    assert re.search(r"20 rules \+ 100 blocked, cached token \(200\)\s+[\d.]+ /", out.stdout)
    assert "lean master" not in out.stdout


@pytest.mark.parametrize(
    "text, p50, p99",
    [
        ("  Latency Distribution\n     50%    1.17ms\n     75%    1.30ms\n     99%    2.68ms\n",
         1.17e-3, 2.68e-3),
        ("     50%  812.00us\n     90%    1.00ms\n     99%    1.20s\n", 812e-6, 1.2),
    ],
)  # fmt: skip
def test_reads_wrk_latency(text: str, p50: float, p99: float) -> None:
    from authgate.tools.bench_production import parse_latency

    got = parse_latency(text)
    assert got.p50 == pytest.approx(p50) and got.p99 == pytest.approx(p99)


def test_no_latency_distribution_is_an_error() -> None:
    from authgate.tools.bench_production import parse_latency

    with pytest.raises(ValueError, match="no latency distribution"):
        parse_latency("Requests/sec: 10\n")


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_bench_workers_prints_all_three_and_their_ratios() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "authgate.tools.bench_workers", "--rounds", "1", "--duration", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for n in (1, 2):
        assert re.search(
            rf"^  --workers {n}: [\d,]+ req/s, [\d,]+ us CPU per request "
            rf"\(backend [\d,]+ us\), machine \d+% busy$",
            out.stdout,
            re.M,
        ), out.stdout
    assert re.search(r"^  2 workers / 1, req/s: \d+\.\d\dx \(rounds", out.stdout, re.M)
    assert re.search(r"^  2 workers / 1, CPU per request: \d+\.\d\dx", out.stdout, re.M)
    # `make test` installs redis-server: the third gateway, on Redis.
    assert re.search(
        r"^  --workers 2, Redis: [\d,]+ req/s, [\d,]+ us CPU per request "
        r"\(backend [\d,]+ us, redis-server [\d,]+ us\), machine \d+% busy$",
        out.stdout,
        re.M,
    ), out.stdout
    assert re.search(r"^  2 workers, Redis / memory, req/s: \d+\.\d\dx \(rounds", out.stdout, re.M)
