"""The watch on Redis (docs/watch.md#several-gateways): the script's windows
count what the core's `Window` counts (hypothesis, on a fixed timeline), its
bans follow `core.watch.stronger`, and two real gateway processes on one
real redis-server count one window together, see one event, and enforce,
expire and lift one ban.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate.core.model import Ban, WatchSpec
from authgate.core.watch import Observation, Window, stronger
from authgate.runtime.redis_store import RedisStore
from conftest import POLICIES, Backend, send, wait_until
from redis_server import RedisServer
from test_production import Gateway, run
from test_watch import admin, model, timeline, without_ids

T = TypeVar("T")
TIMEOUT = 5.0  # a busy machine: a store timeout a live Redis meets with room to spare
BASE_US = 1_700_000_000_000_000
US = 1_000_000
_prefixes = itertools.count()
JWKS_PATH = POLICIES / "keys" / "jwks.json"


def arun(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(body())  # type: ignore[arg-type]


def spec(threshold: int, window: int, action: str = "none", duration: int = 0) -> WatchSpec:
    return WatchSpec("w", "ip", "denied_paths", threshold, window, action, duration, 1)


@pytest.fixture
def clean(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client on the session's Redis, without the watch's keys of
    earlier tests (the gateways use the default prefix)."""
    if not redis_server.running:
        redis_server.start()
    r = redis.Redis(port=redis_server.port, socket_timeout=5)
    for key in r.scan_iter(match="{authgate}:watch:*"):
        r.delete(key)
    yield r
    r.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(timeline(st.sampled_from("abcdef")), st.integers(1, 60), st.integers(1, 8))
def test_the_script_counts_what_the_window_counts(
    clean: redis.Redis,
    redis_server: RedisServer,
    events: list[tuple[int, str]],
    window: int,
    threshold: int,
) -> None:
    prefix = f"w{next(_prefixes)}"
    s = spec(threshold, window)

    async def body() -> list[tuple[int, bool]]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT, prefix=prefix)
        try:
            out = []
            for now, member in events:
                (c,) = await store.watch_at(
                    [Observation(s, "ip:10.0.0.1", member)], True, BASE_US + now * US
                )
                out.append((c.count, c.reached))
            return out
        finally:
            await store.close()

    got = arun(body)
    w = Window()
    core = [(n, n >= threshold) for n in (w.add(m, t, window, threshold) for t, m in events)]
    assert got == core == model(events, window, threshold)
    # Bounded: a window never keeps `threshold` members, and it expires.
    for key in clean.scan_iter(match=f"{{{prefix}}}:watch:*"):
        assert clean.zcard(key) < threshold
        assert 0 < clean.pttl(key) <= window * 1000 + 1


STRONGER = [
    (None, Ban("throttle", "g", 10)),
    (Ban("ban", "p", 20), Ban("throttle", "g", 10)),
    (Ban("ban", "p", 20), Ban("ban", "q", 10)),
    (Ban("ban", "p", 10), Ban("ban", "q", 20)),
    (Ban("throttle", "g", 20), Ban("ban", "p", 10)),
    (Ban("throttle", "g", 10), Ban("throttle", "h", 20)),
    (Ban("ban", "p", 10), Ban("throttle", "g", 20)),
]


@pytest.mark.parametrize("old, new", STRONGER)
def test_the_script_keeps_the_ban_the_core_keeps(
    clean: redis.Redis, redis_server: RedisServer, old: Ban | None, new: Ban
) -> None:
    prefix = f"s{next(_prefixes)}"

    def setting(ban: Ban) -> Observation:
        w = WatchSpec(ban.watch, "ip", "denials", 1, 60, ban.action, int(ban.until), 1)
        return Observation(w, "ip:10.0.0.9", "m")

    async def body() -> tuple[Any, Any]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT, prefix=prefix)
        try:
            if old is not None:
                await store.watch_at([setting(old)], True, BASE_US)
            (c,) = await store.watch_at([setting(new)], True, BASE_US)
            table = await store.bans_at("", BASE_US)
            return c, table
        finally:
            await store.close()

    c, table = arun(body)
    kept = stronger(old, new)
    assert c.reached and c.ban is not None
    assert (c.ban.action, c.ban.watch) == (kept.action, kept.watch)
    assert table is not None and list(table.bans) == ["ip:10.0.0.9"]
    ban = table.bans["ip:10.0.0.9"]
    assert (ban.action, ban.watch) == (kept.action, kept.watch)
    # Ends in this process's clock, `kept.until` seconds after the fixed time.
    assert abs(ban.until - (c.ban.until)) < 1.0


def test_versions_lifts_and_report_mode_on_the_script(
    clean: redis.Redis, redis_server: RedisServer
) -> None:
    prefix = f"v{next(_prefixes)}"
    ban = spec(2, 60, "ban", 600)

    async def body() -> None:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT, prefix=prefix)
        try:
            first = await store.bans("")
            assert first is not None and first.bans == {}
            assert await store.bans(first.version) is None  # unchanged: nothing read
            # Report mode counts and reaches the threshold, but sets nothing.
            obs = [Observation(ban, "ip:10.0.0.1", m) for m in ("/a", "/b")]
            results = [(await store.watch([o], False))[0] for o in obs]
            assert [(r.count, r.reached, r.ban) for r in results] == [
                (1, False, None),
                (2, True, None),
            ]
            assert await store.bans(first.version) is None
            results = [(await store.watch([o], True))[0] for o in obs]
            assert results[1].ban is not None and results[1].ban.action == "ban"
            assert 599 < results[1].ban.until - time.time() <= 600
            table = await store.bans(first.version)
            assert table is not None and list(table.bans) == ["ip:10.0.0.1"]
            assert await store.lift("ip:10.0.0.1") is True
            assert await store.lift("ip:10.0.0.1") is False
            after = await store.bans(table.version)
            assert after is not None and after.bans == {}
        finally:
            await store.close()

    arun(body)


# --- two gateway processes on one redis-server -------------------------------------------------

POLICY = f"""\
version: 1
authn:
  jwt:
    - name: demo
      issuer: https://issuer.example
      audience: api
      algorithms: [RS256]
      jwks_file: {JWKS_PATH}
watch:
  - {{name: probing, key: ip, counts: denied_paths, threshold: 20, window: 1m,
      action: ban, for: 8s}}
  - {{name: guessing, key: ip, counts: failed_credentials, threshold: 3, window: 1m,
      action: throttle, for: 10m}}
rules:
  - {{name: health, match: {{path: /health}}, allow: anyone}}
  - {{name: admin, match: {{path: "/admin/**"}}, allow: {{role: admin}}}}
"""


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    running: list[Gateway] = []
    yield running
    for g in running:
        g.stop()


def watch_events(g: Gateway) -> list[dict[str, Any]]:
    found = []
    for line in g.output().splitlines():
        start = line.find('{"time"')
        if start >= 0 and '"event":"watch"' in line:
            found.append(json.loads(line[start:]))
    return found


def test_two_gateways_on_one_redis_share_the_watch_and_its_bans(
    gateways: list[Gateway],
    tmp_path: Path,
    backend: Backend,
    redis_server: RedisServer,
    clean: redis.Redis,
    demo_key: Any,
) -> None:
    policy = tmp_path / "watch.yaml"
    policy.write_text(POLICY)
    args = ("--policy", str(policy), "--upstream", backend.url, "--store", redis_server.url)
    a = run(gateways, tmp_path, *args, name="a")
    b = run(gateways, tmp_path, *args, name="b")
    a.wait_ready()
    b.wait_ready()

    # One client probing through both: the two gateways count one window.
    replies = [
        send((a if i % 2 else b).address, "GET", f"/p{i}", source="127.0.0.2") for i in range(20)
    ]
    assert [r.status for r in replies] == [404] * 20
    earned = time.monotonic()
    # The 20th went to gateway a (odd i): it set the ban, and answers 403 at once.
    blocked_like = send(a.address, "GET", "/health", source="127.0.0.2")
    assert blocked_like.status == 403
    # Gateway b learns of it from Redis within its poll (0.5 s), say a few seconds here.
    wait_until(
        lambda: send(b.address, "GET", "/health", source="127.0.0.2").status == 403,
        seconds=10,
        every=0.05,
    )
    propagated = time.monotonic() - earned
    print(f"ban seen by the other gateway after {propagated:.2f} s")
    assert without_ids(send(b.address, "GET", "/nowhere", source="127.0.0.2")) == without_ids(
        blocked_like
    )
    # Nothing of the probing reached the backend; only b's /health before it knew.
    assert {s.target for s in backend.seen} <= {"/health"}
    before = len(backend.seen)
    assert [send(g.address, "GET", "/admin/x", source="127.0.0.2").status for g in (a, b)] == [
        403
    ] * 2
    assert len(backend.seen) == before
    # Exactly one event, from the gateway whose denial reached the threshold.
    assert [(e["kind"], e["key"], e["count"]) for e in watch_events(a)] == [
        ("probing", "ip:127.0.0.2", 20)
    ]
    assert watch_events(b) == []
    for g in (a, b):
        assert send(g.address, "GET", "/health", source="127.0.0.1").status == 200

    # The ban ends by itself (8 s: long enough for a busy machine to look first), on both.
    for g in (a, b):
        wait_until(
            lambda g=g: send(g.address, "GET", "/health", source="127.0.0.2").status == 200,
            every=0.2,
        )
    assert time.monotonic() - earned > 7.0

    # Guessing through a: throttled on b too; lifted through b's admin: free on a.
    bad = [("Authorization", "Bearer not.a.token")]
    assert [
        send(a.address, "GET", "/admin/x", bad, source="127.0.0.5").status for _ in range(3)
    ] == [401] * 3
    wait_until(
        lambda: send(b.address, "GET", "/health", source="127.0.0.5").status == 429, seconds=10
    )
    code, body = admin(b.admin, "GET", "/bans")
    assert [(x["key"], x["action"]) for x in body["bans"]] == [("ip:127.0.0.5", "throttle")]
    assert admin(b.admin, "DELETE", "/bans/ip:127.0.0.5") == (200, {"lifted": "ip:127.0.0.5"})
    wait_until(
        lambda: send(a.address, "GET", "/health", source="127.0.0.5").status == 200, seconds=10
    )
    assert admin(a.admin, "GET", "/bans") == (200, {"bans": []})
    assert "/admin/x" not in [s.target for s in backend.seen]


def test_without_its_store_the_watch_counts_and_bans_in_the_gateway(
    gateways: list[Gateway], tmp_path: Path, backend: Backend, demo_key: Any
) -> None:
    from test_startup import free_port

    policy = tmp_path / "watch.yaml"
    policy.write_text(POLICY)
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    g = run(gateways, tmp_path, "--policy", str(policy), "--upstream", backend.url,
            "--store", nowhere)  # fmt: skip
    g.wait_ready()
    assert [send(g.address, "GET", f"/p{i}", source="127.0.0.2").status for i in range(20)] == [
        404
    ] * 20
    assert send(g.address, "GET", "/health", source="127.0.0.2").status == 403
    assert send(g.address, "GET", "/health", source="127.0.0.1").status == 200
    assert [s.target for s in backend.seen] == ["/health"]
    assert [(e["kind"], e["key"]) for e in watch_events(g)] == [("probing", "ip:127.0.0.2")]
    wait_until(lambda: "the watch counts and bans in this process" in g.output())
    assert g.output().count("the watch counts and bans in this process") == 1  # said once
