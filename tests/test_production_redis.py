"""Rate limits shared on Redis, end to end: real gateway processes, a real
redis-server, real clients. Several gateways (processes, or workers of one)
count one limit exactly; Redis dying gives each `on_store_error` behaviour
with no 5xx and answers within the store timeout; Redis back is used again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Backend, send, wait_until
from redis_server import RedisServer
from test_production import Gateway, get, run, status


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    running: list[Gateway] = []
    yield running
    for g in running:
        g.stop()


def limited_policy(tmp: Path, count: int, on_store_error: str = "local") -> Path:
    """One route, one IP-keyed limit with a name no other test uses (the
    session's Redis keeps counts between tests)."""
    name = f"l{uuid.uuid4().hex[:10]}"
    p = tmp / f"{name}.yaml"
    p.write_text(
        "version: 1\nrules:\n"
        "  - name: api\n    match: {path: '/api/**'}\n    allow: anyone\n"
        f"    limits: [{{name: {name}, key: ip, rate: {count}/hour, "
        f"on_store_error: {on_store_error}}}]\n"
    )
    return p


def statuses(replies: list[Any]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in replies:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def test_two_gateway_processes_share_one_limit_exactly(
    gateways: list[Gateway], tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    policy = limited_policy(tmp_path, 10)
    args = ("--policy", str(policy), "--upstream", backend.url, "--store", redis_server.url)
    a = run(gateways, tmp_path, *args, name="a")
    b = run(gateways, tmp_path, *args, name="b")
    a.wait_ready()
    b.wait_ready()
    replies = [send((a if i % 2 else b).address, "GET", "/api/x") for i in range(16)]
    assert statuses(replies) == {200: 10, 429: 6}
    assert len(backend.seen) == 10  # the 429s reached nothing
    denied = next(r for r in replies if r.status == 429)
    assert int(denied.header("Retry-After") or 0) >= 1
    assert denied.header("RateLimit-Policy") is not None
    st = status(a.admin)["store"]
    assert st["kind"] == "redis" and st["state"] == "closed"
    assert "127.0.0.1" in st["url"]
    assert f"rate limits are counted in redis://127.0.0.1:{redis_server.port}" in a.output()


def test_a_store_away_at_start_is_said_and_limits_fall_back(
    gateways: list[Gateway], tmp_path: Path, backend: Backend
) -> None:
    from test_startup import free_port

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    policy = limited_policy(tmp_path, 2)  # on_store_error: local
    g = run(gateways, tmp_path, "--policy", str(policy), "--upstream", backend.url,
            "--store", nowhere)  # fmt: skip
    g.wait_ready()  # not fatal: the gateway serves, and says so
    wait_until(lambda: "does not answer; limits use their on_store_error" in g.output())
    assert [send(g.address, "GET", "/api/x").status for _ in range(3)] == [200, 200, 429]
    assert len(backend.seen) == 2  # the 429 reached nothing


def test_workers_share_one_limit_exactly_on_redis(
    gateways: list[Gateway], tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    policy = limited_policy(tmp_path, 12)
    g = run(
        gateways, tmp_path, "--policy", str(policy), "--upstream", backend.url,
        "--store", redis_server.url, "--workers", "2",
    )  # fmt: skip
    g.wait_ready()
    assert "use --store redis" not in g.output()  # no per-worker warning with Redis
    replies = [send(g.address, "GET", "/api/x") for _ in range(30)]
    assert statuses(replies) == {200: 12, 429: 18}
    assert len(backend.seen) == 12

    def both() -> bool:
        return all((w["status"] or {}).get("decisions", 0) > 0 for w in status(g.admin)["workers"])

    wait_until(both)  # both workers answered, and still the count is exact


def test_redis_down_each_on_store_error_then_back(
    gateways: list[Gateway], tmp_path: Path, backend: Backend
) -> None:
    redis = RedisServer()  # its own: this test kills it
    redis.start()
    try:
        _down_and_back(gateways, tmp_path, backend, redis)
    finally:
        redis.close()


def _down_and_back(
    gateways: list[Gateway], tmp_path: Path, backend: Backend, redis: RedisServer
) -> None:
    policy = tmp_path / "modes.yaml"
    policy.write_text(
        "version: 1\nrules:\n"
        "  - name: local\n    match: {path: /local}\n    allow: anyone\n"
        "    limits: [{name: loc, key: ip, rate: 3/hour, on_store_error: local}]\n"
        "  - name: deny\n    match: {path: /deny}\n    allow: anyone\n"
        "    limits: [{name: den, key: ip, rate: 100/hour, on_store_error: deny}]\n"
        "  - name: allow\n    match: {path: /allow}\n    allow: anyone\n"
        "    limits: [{name: all, key: ip, rate: 2/hour, on_store_error: allow}]\n"
    )
    log = tmp_path / "decisions.jsonl"
    g = run(
        gateways, tmp_path, "--policy", str(policy), "--upstream", backend.url,
        "--store", redis.url, "--set", f"authgate_log={log}",
    )  # fmt: skip
    g.wait_ready()
    # With Redis: /allow's 2/hour is enforced by the store.
    assert [send(g.address, "GET", "/allow").status for _ in range(3)] == [200, 200, 429]
    assert send(g.address, "GET", "/local").status == 200  # 1 of 3 counted in Redis

    redis.kill()
    seen = len(backend.seen)
    timings: list[float] = []

    def timed(path: str) -> int:
        start = time.monotonic()
        code = send(g.address, "GET", path).status
        timings.append(time.monotonic() - start)
        return code

    # local: counted in the gateway at the same rate (a fresh local count: 3).
    assert [timed("/local") for _ in range(4)] == [200, 200, 200, 429]
    # deny: refused while the store is away, with a Retry-After.
    assert [timed("/deny") for _ in range(2)] == [429, 429]
    # allow: not limited while the store is away (Redis had said 429).
    assert [timed("/allow") for _ in range(3)] == [200, 200, 200]
    assert len(backend.seen) == seen + 3 + 3
    # The store timeout is 50 ms: never a hang (the client's socket timeout is
    # 30 s), though a busy machine may take a few seconds over a request.
    assert max(timings) < 10.0, timings
    st = status(g.admin)["store"]
    assert st["state"] == "open" and st["errors"] >= 3
    _, metrics = get(g.admin, "/metrics")
    text = metrics.decode()
    for mode in ("local", "deny", "allow"):
        assert f'authgate_store_fallbacks_total{{mode="{mode}"}}' in text
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    without = [x for x in lines if "without_store" in x]
    assert {x["without_store"] for x in without} == {"local", "deny", "allow"}
    assert all(x["status"] != 500 and (x["status"] or 0) < 500 for x in lines)
    assert "the rate-limit store cannot answer" in g.output()

    # Redis back (empty: it kept nothing): after the breaker's cool-down the
    # store is used again, so /allow is limited again (2/hour, then 429).
    redis.start()

    def store_back() -> bool:
        return send(g.address, "GET", "/allow").status == 429

    wait_until(store_back, seconds=90, every=0.5)
    wait_until(lambda: status(g.admin)["store"]["state"] == "closed")
    assert "the rate-limit store answers again" in g.output()
