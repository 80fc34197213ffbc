"""The Redis rate-limit store against a real redis-server (tests/redis_server.py):
exact bursts and Retry-After, one limit shared by two clients, all or nothing,
read-only checks, TTLs, the same answers as MemoryStore on a fixed timeline,
key escaping, and every failure (crash, hang, wrong password, flushed scripts,
a reply of the wrong shape) as StoreUnavailable within the timeout, with the
circuit breaker opening and closing again."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from authgate.core.ratelimit import Hit, Rate, Verdict, gcra
from authgate.runtime.redis_store import (
    MAX_BATCH,
    Breaker,
    RedisStore,
    StoreUnavailable,
    StoreURL,
    _verdicts,
    parse_store_url,
    store_key,
)
from authgate.runtime.stores import MemoryStore
from redis_server import RedisServer

T = TypeVar("T")
# The machine may be busy: a store timeout that a live Redis meets with room to
# spare. What must come without waiting for Redis (a refused connection, an open
# circuit) comes within NO_WAIT, far below it: "no wait" is not "a wait".
TIMEOUT = 5.0
NO_WAIT = 1.0
HUNG_TIMEOUT = 2.0  # what a hung Redis waits for: each call ends within it, not twice it
BASE_US = 1_700_000_000_000_000  # a realistic epoch in µs for the fixed-timeline tests
_prefixes = itertools.count()


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(body())  # type: ignore[arg-type]


def fresh_prefix() -> str:
    return f"t{next(_prefixes)}"


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client on the session's Redis, running and emptied for this test."""
    if not redis_server.running:
        redis_server.start()
    r = redis.Redis(port=redis_server.port, socket_timeout=5)
    r.flushall()
    yield r
    r.close()
    if not redis_server.running:
        redis_server.start()  # a test that killed it leaves it running for the next


def hits(*specs: tuple[str, str, str]) -> list[Hit]:
    return [Hit(limit, key, Rate.parse(rate)) for limit, key, rate in specs]


# --- counting -------------------------------------------------------------------


def test_burst_of_n_then_429_with_retry_after(redis_server: RedisServer, admin: Any) -> None:
    async def body() -> list[Verdict]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            return [(await store.hit_all(hits(("r", "ip:1", "5/minute"))))[0] for _ in range(7)]
        finally:
            await store.close()

    got = run(body)
    assert [v.allowed for v in got] == [True] * 5 + [False] * 2
    assert [v.remaining for v in got[:5]] == [4, 3, 2, 1, 0]
    # One request every 12 s: the sixth fits 12 s after the first.
    assert all(11 <= v.retry_after <= 12 for v in got[5:])
    assert all(59 <= v.reset <= 60 for v in got[5:])
    assert 11 <= got[0].reset <= 12


def test_two_clients_share_one_limit_exactly(redis_server: RedisServer, admin: Any) -> None:
    async def body() -> list[bool]:
        a = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        b = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            out = []
            for i in range(25):
                store = a if i % 2 else b
                out.append((await store.hit_all(hits(("r", "sub:alice", "10/minute"))))[0].allowed)
            return out
        finally:
            await a.close()
            await b.close()

    got = run(body)
    assert got == [True] * 10 + [False] * 15


def test_concurrent_requests_from_many_connections_count_exactly(
    redis_server: RedisServer, admin: Any
) -> None:
    async def body() -> list[bool]:
        stores = [RedisStore.from_url(redis_server.url, timeout=TIMEOUT) for _ in range(3)]
        try:
            calls = [s.hit_all(hits(("r", "ip:9", "50/hour"))) for s in stores for _ in range(40)]
            return [v[0].allowed for v in await asyncio.gather(*calls)]
        finally:
            for s in stores:
                await s.close()

    assert sum(run(body)) == 50


def evalsha_calls(admin: Any) -> int:
    return int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


EAGER = getattr(asyncio, "eager_task_factory", None)  # Python 3.12+


@pytest.mark.parametrize(
    "eager",
    [
        False,
        pytest.param(
            True, marks=pytest.mark.skipif(EAGER is None, reason="no eager tasks before 3.12")
        ),
    ],
    ids=["tasks", "eager-tasks"],
)
def test_requests_asking_together_share_one_round_trip_judged_in_turn(
    redis_server: RedisServer, admin: Any, eager: bool
) -> None:
    """Ten requests in one turn of the event loop: one script run, which
    judges them in the order they asked, as ten calls would; also under an
    eager task factory, which mitmproxy 12 sets (a regression: there the run
    started before the first request joined it, and every request hung)."""

    async def body() -> list[Verdict]:
        if eager:
            asyncio.get_running_loop().set_task_factory(EAGER)
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            await store.hit_all(hits(("warm", "k", "1/second")))  # the script loaded
            admin.config_resetstat()
            return [v[0] for v in await asyncio.gather(
                *(store.hit_all(hits(("r", "ip:1", "5/minute"))) for _ in range(10))
            )]  # fmt: skip
        finally:
            await store.close()

    got = run(body)
    assert evalsha_calls(admin) == 1
    assert [v.allowed for v in got] == [True] * 5 + [False] * 5
    assert [v.remaining for v in got[:5]] == [4, 3, 2, 1, 0]


def test_in_one_run_each_request_is_all_or_nothing_on_its_own(
    redis_server: RedisServer, admin: Any
) -> None:
    """A request of the batch that is refused counts nothing; the requests
    before and after it in the same run count as they would alone."""
    both = hits(("per-ip", "ip:1", "10/minute"), ("per-sub", "sub:bob", "1/minute"))
    ip_only = hits(("per-ip", "ip:1", "10/minute"))

    async def body() -> list[list[Verdict]]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            admin.config_resetstat()
            batch = [store.hit_all(both), store.hit_all(both), store.hit_all(ip_only)]
            return list(await asyncio.gather(*batch))
        finally:
            await store.close()

    first, refused, after = run(body)
    assert evalsha_calls(admin) == 1
    assert [v.allowed for v in first] == [True, True]
    assert [v.allowed for v in refused] == [True, False]
    assert refused[0].remaining == 8  # judged, not counted
    assert after[0].allowed and after[0].remaining == 8  # the refused one used nothing


def test_a_big_batch_is_split_and_counts_exactly(redis_server: RedisServer, admin: Any) -> None:
    n = 2 * MAX_BATCH + 1

    async def body() -> list[bool]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            await store.hit_all(hits(("warm", "k", "1/second")))
            admin.config_resetstat()
            calls = [store.hit_all(hits(("r", "ip:4", f"{MAX_BATCH}/hour"))) for _ in range(n)]
            return [v[0].allowed for v in await asyncio.gather(*calls)]
        finally:
            await store.close()

    got = run(body)
    # Three runs, on up to three connections: exactly the limit allowed, in
    # whichever order Redis took them.
    assert len(got) == n and sum(got) == MAX_BATCH
    assert evalsha_calls(admin) == 3


def test_a_request_that_goes_away_leaves_its_batch_answered(
    redis_server: RedisServer, admin: Any
) -> None:
    """A client that disconnects cancels its own wait (and, gone before the
    run, is not counted); the requests that asked with it get their answers."""

    async def body() -> list[object]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            calls = [
                asyncio.ensure_future(store.hit_all(hits(("r", f"ip:{i}", "5/minute"))))
                for i in range(3)
            ]
            await asyncio.sleep(0)  # all three asked
            calls[1].cancel()
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await store.close()

    first, gone, last = run(body)
    assert isinstance(gone, asyncio.CancelledError)
    assert not admin.exists(store_key("authgate", "r", "ip:1"))  # gone before the run: not counted
    assert isinstance(first, list) and first[0].allowed and first[0].remaining == 4
    assert isinstance(last, list) and last[0].allowed and last[0].remaining == 4


def test_a_run_that_never_answers_fails_its_requests_not_hangs_them(
    redis_server: RedisServer, admin: Any
) -> None:
    """A fault in the batching (a run that ends without answering, as under
    the eager-task regression) gives its requests StoreUnavailable after
    twice the timeout, never a hang."""

    async def body() -> tuple[list[object], float]:
        store = RedisStore.from_url(redis_server.url, timeout=0.2)

        async def answers_nothing(batch: object) -> None:
            return None

        store._run_batch = answers_nothing  # type: ignore[method-assign]
        try:
            start = time.monotonic()
            calls = [store.hit_all(hits(("r", f"ip:{i}", "5/minute"))) for i in range(3)]
            got = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
            return got, time.monotonic() - start
        finally:
            await store.close()

    got, took = run(body)
    assert all(isinstance(e, StoreUnavailable) and "no answer" in str(e) for e in got), got
    assert took < 2


def test_a_request_that_joins_a_run_that_never_starts_fails_in_twice_the_timeout(
    redis_server: RedisServer, admin: Any
) -> None:
    """The watchdog: a run that never answers (here: its task never runs)
    fails its requests after twice the timeout."""

    async def body() -> tuple[object, float]:
        store = RedisStore.from_url(redis_server.url, timeout=0.2)

        async def never(batch: object) -> None:
            await asyncio.Event().wait()

        store._send = never  # type: ignore[method-assign]
        try:
            start = time.monotonic()
            got = await asyncio.wait_for(
                asyncio.gather(store.hit_all(hits(("r", "k", "5/minute"))), return_exceptions=True),
                5,
            )
            return got[0], time.monotonic() - start
        finally:
            for task in store._sending:
                task.cancel()
            store._sending.clear()
            await store.close()

    got, took = run(body)
    assert isinstance(got, StoreUnavailable) and "no answer from the script run" in str(got)
    assert 0.35 <= took < 2


def test_a_failed_run_fails_each_request_of_it_once(admin: Any) -> None:
    breaker = Breaker(threshold=3)

    async def body() -> list[object]:
        store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=TIMEOUT, breaker=breaker)
        try:
            calls = [store.hit_all(hits(("r", f"ip:{i}", "5/minute"))) for i in range(3)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await store.close()

    got = run(body)
    assert all(isinstance(e, StoreUnavailable) and "cannot connect" in str(e) for e in got)
    assert breaker.errors == 1  # one attempt at Redis
    assert breaker.state == "closed"


def test_a_denied_request_consumes_nothing(redis_server: RedisServer, admin: Any) -> None:
    both = hits(("per-ip", "ip:1", "10/minute"), ("per-sub", "sub:bob", "1/minute"))

    async def body() -> tuple[list[Verdict], list[Verdict], list[Verdict], bytes, bytes]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            first = await store.hit_all(both)
            before = admin.get(store_key("authgate", "per-ip", "ip:1"))
            second = await store.hit_all(both)
            after = admin.get(store_key("authgate", "per-ip", "ip:1"))
            alone = await store.hit_all(both[:1])
            return first, second, alone, before, after
        finally:
            await store.close()

    first, second, alone, before, after = run(body)
    assert [v.allowed for v in first] == [True, True]
    assert [v.allowed for v in second] == [True, False]
    assert second[0].remaining == 8  # what it would be: judged, not counted
    assert before == after
    assert alone[0].allowed and alone[0].remaining == 8  # the second request used nothing


def test_consume_false_only_reads(redis_server: RedisServer, admin: Any) -> None:
    async def body() -> list[Verdict]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            h = hits(("r", "ip:2", "2/minute"))
            reads = [(await store.hit_all(h, consume=False))[0] for _ in range(5)]
            assert admin.dbsize() == 0
            await store.hit_all(h)
            await store.hit_all(h)
            return reads + [(await store.hit_all(h, consume=False))[0]]
        finally:
            await store.close()

    got = run(body)
    assert all(v.allowed and v.remaining == 1 for v in got[:5])
    assert not got[5].allowed and got[5].retry_after >= 29


def test_ttl_is_the_time_until_the_quota_is_back(redis_server: RedisServer, admin: Any) -> None:
    async def body() -> list[int]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        key = store_key("authgate", "r", "ip:3")
        try:
            ttls = []
            for _ in range(3):
                await store.hit_all(hits(("r", "ip:3", "10/minute")))
                ttls.append(admin.pttl(key))
            return ttls
        finally:
            await store.close()

    ttls = run(body)
    # Each counted request adds one emission interval (6 s) to the wait.
    for i, ttl in enumerate(ttls, start=1):
        assert 6000 * i - 1000 < ttl <= 6000 * i


def test_empty_request_makes_no_round_trip(redis_server: RedisServer, admin: Any) -> None:
    async def body() -> list[Verdict]:
        store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=TIMEOUT)
        try:
            return await store.hit_all([])
        finally:
            await store.close()

    assert run(body) == []


# --- the same arithmetic as the core ----------------------------------------------

# Rates whose emission interval is a whole microsecond: the µs script and the ns
# core then agree exactly, on any timeline.
EXACT_RATES = ["1/second", "2/second", "5/second", "3/minute", "6/minute", "100/minute", "9/hour"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rates=st.lists(st.sampled_from(EXACT_RATES), min_size=1, max_size=3),
    steps=st.lists(
        st.tuples(
            st.integers(0, 2_500_000),  # µs since the previous request
            st.integers(1, 7),  # which limits the request touches (a bit mask)
            st.booleans(),  # consume
        ),
        min_size=1,
        max_size=25,
    ),
)
def test_same_verdicts_as_memory_store(
    redis_server: RedisServer, rates: list[str], steps: list[tuple[int, int, bool]]
) -> None:
    if not redis_server.running:
        redis_server.start()
    limits = [Hit(f"lim{i}", f"key{i % 2}", Rate.parse(r)) for i, r in enumerate(rates)]

    async def body() -> tuple[list[list[Verdict]], list[list[Verdict]]]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT, prefix=fresh_prefix())
        memory = MemoryStore()
        t = 0
        ours, theirs = [], []
        try:
            for dt, mask, consume in steps:
                t += dt
                chosen = [h for i, h in enumerate(limits) if mask >> i & 1] or limits[:1]
                ours.append(await store.hit_all_at(chosen, BASE_US + t, consume))
                # MemoryStore on a small epoch (GCRA only sees differences): exact floats.
                theirs.append(memory.hit_all(chosen, t / 1_000_000, consume))
        finally:
            await store.close()
        return ours, theirs

    ours, theirs = run(body)
    assert ours == theirs


# Rates whose interval is not a whole µs: the script rounds it down to one, so the
# burst is still exactly N and the next request fits at most 1 µs per counted
# request earlier than in the ns core.
@pytest.mark.parametrize(
    "rate,times_us,expected",
    [
        # 3/second: T = 333333 µs; after a burst of 3 the TAT is 999999 µs.
        ("3/second", [0, 0, 0, 0], [(1, 2, 0, 1), (1, 1, 0, 1), (1, 0, 0, 1), (0, 0, 1, 1)]),
        ("3/second", [0, 0, 0, 333331], [(1, 2, 0, 1), (1, 1, 0, 1), (1, 0, 0, 1), (0, 0, 1, 1)]),
        ("3/second", [0, 0, 0, 333332], [(1, 2, 0, 1), (1, 1, 0, 1), (1, 0, 0, 1), (1, 0, 0, 1)]),
        # 7/minute: T = 8571428 µs; the quota is fully back one period later.
        (
            "7/minute",
            [0] * 8,
            [
                (1, 6, 0, 9),
                (1, 5, 0, 18),
                (1, 4, 0, 26),
                (1, 3, 0, 35),
                (1, 2, 0, 43),
                (1, 1, 0, 52),
                (1, 0, 0, 60),
                (0, 0, 9, 60),
            ],
        ),
        ("7/minute", [0, 60_000_000], [(1, 6, 0, 9), (1, 6, 0, 9)]),
        # 1/day: a denial says when, in whole seconds rounded up.
        (
            "1/day",
            [0, 1, 86_399_000_001, 86_400_000_000],
            [(1, 0, 0, 86400), (0, 0, 86400, 86400), (0, 0, 1, 1), (1, 0, 0, 86400)],
        ),
    ],
)
def test_microsecond_arithmetic(
    redis_server: RedisServer,
    admin: Any,
    rate: str,
    times_us: list[int],
    expected: list[tuple[int, int, int, int]],
) -> None:
    h = hits(("r", "k", rate))

    async def body() -> list[Verdict]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            return [(await store.hit_all_at(h, BASE_US + t))[0] for t in times_us]
        finally:
            await store.close()

    got = [(int(v.allowed), v.remaining, v.retry_after, v.reset) for v in run(body)]
    assert got == expected
    # The core on the same timeline agrees on everything but sub-µs boundaries.
    tat: int | None = None
    r = Rate.parse(rate)
    for t, (allowed, *_) in zip(times_us, expected, strict=True):
        v, new = gcra(tat, t * 1000, r)
        if v.allowed:
            tat = new
        if t not in (333332,):  # the one boundary where rounding the interval shows
            assert int(v.allowed) == allowed


# --- keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a,b",
    [
        (("a:b", "c"), ("a", "b:c")),
        (("r", "x}{y"), ("r", "x")),
        (("r", "x}{y"), ("r", "{y")),
        (("r", "%3A"), ("r", ":")),
        (("r", "\udcc3\udca9"), ("r", "é")),  # undecodable bytes vs the text they spell
        (("r", "k" * 300), ("r", "k" * 301)),
    ],
)
def test_keys_do_not_collide(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert store_key("authgate", *a) != store_key("authgate", *b)


@given(st.tuples(st.text(), st.text()), st.tuples(st.text(), st.text()))
def test_keys_are_injective_and_keep_the_tag(a: tuple[str, str], b: tuple[str, str]) -> None:
    ka, kb = store_key("authgate", *a), store_key("authgate", *b)
    assert (ka == kb) == (a == b)
    for k in (ka, kb):
        assert k.startswith(b"{authgate}:")
        assert b"{" not in k[1:] and b"}" not in k[10:]
        assert key_slot(k) == key_slot(b"{authgate}")


def test_a_braced_subject_cannot_reach_another_key(redis_server: RedisServer, admin: Any) -> None:
    async def body() -> list[bool]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            out = []
            for key in ["x}{y", "x", "{y", "x}{y", "x:y", "x%3Ay"]:
                out.append((await store.hit_all(hits(("r", key, "1/minute"))))[0].allowed)
            return out
        finally:
            await store.close()

    assert run(body) == [True, True, True, False, True, True]
    assert {key_slot(k) for k in admin.keys("*")} == {key_slot(b"{authgate}")}


def test_prefixes_are_separate(redis_server: RedisServer, admin: Any) -> None:
    async def body() -> list[bool]:
        a = RedisStore.from_url(redis_server.url, timeout=TIMEOUT, prefix="tenant-a")
        b = RedisStore.from_url(redis_server.url, timeout=TIMEOUT, prefix="tenant-b")
        try:
            h = hits(("r", "ip:1", "1/minute"))
            return [(await s.hit_all(h))[0].allowed for s in (a, b, a)]
        finally:
            await a.close()
            await b.close()

    assert run(body) == [True, True, False]


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "a:b", "a b", "é"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="bad store prefix"):
        RedisStore.from_url("redis://127.0.0.1/0", prefix=prefix)


# --- failures ---------------------------------------------------------------------


def test_redis_killed_then_back(redis_server: RedisServer, admin: Any) -> None:
    clock = [0.0]
    breaker = Breaker(threshold=3, cooldown=1.0, clock=lambda: clock[0])
    h = hits(("r", "ip:5", "100/minute"))

    async def body() -> None:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT, breaker=breaker)
        try:
            assert (await store.hit_all(h))[0].remaining == 99
            assert await store.ping()
            redis_server.kill()
            for _ in range(3):
                start = time.monotonic()
                with pytest.raises(StoreUnavailable, match="cannot connect"):
                    await store.hit_all(h)
                assert time.monotonic() - start < NO_WAIT  # refused: no wait for the timeout
            assert breaker.state == "open"
            assert not await store.ping()

            redis_server.start()
            before = admin.info("stats")
            for _ in range(5):
                start = time.monotonic()
                with pytest.raises(StoreUnavailable, match="circuit open"):
                    await store.hit_all(h)
                assert time.monotonic() - start < NO_WAIT  # no wait for a Redis that is back
            after = admin.info("stats")
            # Not one connection or command from the store while open (the
            # admin's own INFO is the one command in between).
            assert after["total_connections_received"] == before["total_connections_received"]
            assert after["total_commands_processed"] == before["total_commands_processed"] + 1
            assert breaker.rejected == 5

            clock[0] += 1.0
            assert breaker.state == "half_open"
            v = await store.hit_all(h)  # the probe
            assert breaker.state == "closed"
            # Redis lost its data with the crash: a fresh quota.
            assert v[0].allowed and v[0].remaining == 99
            assert (await store.hit_all(h))[0].remaining == 98
        finally:
            await store.close()

    run(body)
    assert breaker.errors == 3 and breaker.opened == 1


def test_first_request_after_a_restart_succeeds(redis_server: RedisServer, admin: Any) -> None:
    """Regression: the pool's connections are stale after Redis restarts; the
    request on one reconnects rather than failing."""
    h = hits(("r", "ip:8", "100/minute"))

    async def body() -> list[int]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        try:
            await asyncio.gather(*(store.hit_all(h) for _ in range(4)))  # a pooled connection
            redis_server.kill()
            redis_server.start()
            out = [(await store.hit_all(h))[0].remaining for _ in range(2)]
            return [*out, store.breaker.errors]
        finally:
            await store.close()

    assert run(body) == [99, 98, 0]


def test_a_hung_redis_times_out(redis_server: RedisServer, admin: Any) -> None:
    h = hits(("r", "ip:6", "100/minute"))

    async def body() -> list[float]:
        store = RedisStore.from_url(redis_server.url, timeout=HUNG_TIMEOUT)
        elapsed = []
        try:
            await store.hit_all(h)
            redis_server.pause()
            try:
                for _ in range(2):
                    start = time.monotonic()
                    with pytest.raises(StoreUnavailable, match="no answer within 2000 ms"):
                        await store.hit_all(h)
                    elapsed.append(time.monotonic() - start)
                start = time.monotonic()
                assert not await store.ping()
                elapsed.append(time.monotonic() - start)
            finally:
                redis_server.resume()
            assert (await store.hit_all(h))[0].allowed  # below the threshold: still closed
        finally:
            await store.close()
        return elapsed

    assert all(e < 2 * HUNG_TIMEOUT for e in run(body))


def test_nothing_listening(admin: Any) -> None:
    async def body() -> str:
        store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=TIMEOUT)
        try:
            with pytest.raises(StoreUnavailable) as e:
                await store.hit_all(hits(("r", "k", "1/second")))
            return str(e.value)
        finally:
            await store.close()

    assert run(body).startswith("redis://127.0.0.1:1/0: cannot connect")


def test_script_flush_recovers(redis_server: RedisServer, admin: Any) -> None:
    breaker = Breaker()

    async def body() -> list[int]:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT, breaker=breaker)
        h = hits(("r", "ip:7", "10/minute"))
        try:
            out = [(await store.hit_all(h))[0].remaining]
            admin.script_flush()
            out.append((await store.hit_all(h))[0].remaining)
            admin.script_flush()
            out.append((await store.hit_all(h, consume=False))[0].remaining)
            return out
        finally:
            await store.close()

    assert run(body) == [9, 8, 7]
    assert breaker.errors == 0


def test_a_reply_of_the_wrong_shape(redis_server: RedisServer, admin: Any) -> None:
    async def body() -> str:
        store = RedisStore.from_url(redis_server.url, timeout=TIMEOUT)
        # A script that answers something else, as a Redis proxy or another
        # version of the script could.
        store._script = store.client.register_script("return {1, 2}")
        try:
            with pytest.raises(StoreUnavailable) as e:
                await store.hit_all(hits(("r", "k", "1/second")))
            return str(e.value)
        finally:
            await store.close()

    assert "bad reply (expected 4 integers" in run(body)


@pytest.mark.parametrize(
    "reply,n,problem",
    [
        (None, 1, "expected 4 integers"),
        ([1, 0, 0], 1, "expected 4 integers"),
        ([1, 0, 0, 1, 1], 1, "expected 4 integers"),
        ([1, 0, 0, b"1"], 1, "non-negative integers"),
        ([1, -1, 0, 1], 1, "non-negative integers"),
        ([2, 0, 0, 1], 1, "0 or 1"),
        (b"OK", 1, "expected 4 integers"),
    ],
)
def test_verdicts_reject_bad_replies(reply: object, n: int, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        _verdicts(reply, n)


@pytest.fixture
def locked_redis() -> Iterator[RedisServer]:
    server = RedisServer(extra=["--requirepass", "s3cret"], password="s3cret")
    server.start()
    yield server
    server.close()


@pytest.mark.parametrize(
    "auth,env,ok,reason",
    [
        (":s3cret@", None, True, ""),
        ("", "s3cret", True, ""),
        ("default:s3cret@", "wrong", True, ""),  # the URL wins over the environment
        (":wrong@", None, False, "authentication failed"),
        ("", "wrong", False, "authentication failed"),
        ("", None, False, "wants a password and none was given"),
    ],
)
def test_passwords(
    locked_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    auth: str,
    env: str | None,
    ok: bool,
    reason: str,
) -> None:
    if env is None:
        monkeypatch.delenv("AUTHGATE_REDIS_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("AUTHGATE_REDIS_PASSWORD", env)
    url = f"redis://{auth}127.0.0.1:{locked_redis.port}/0"

    async def body() -> str:
        store = RedisStore.from_url(url, timeout=TIMEOUT)
        try:
            await store.hit_all(hits(("r", "k", "1/second")))
            return ""
        except StoreUnavailable as e:
            return str(e)
        finally:
            await store.close()

    got = run(body)
    assert (got == "") == ok, got
    assert reason in got
    assert "s3cret" not in got and "wrong" not in got


# --- the breaker ------------------------------------------------------------------


def drive(breaker: Breaker, clock: list[float], script: str) -> str:
    """Steps: `a` allow, `s` success, `f` failure, `+N` advance the clock N s.
    One letter per step: `a`/`r` (allowed/refused) for `a`, else the state
    after the step (`c`losed, `o`pen, `h`alf-open)."""
    out = []
    for step in script.split():
        if step == "a":
            out.append("a" if breaker.allow() else "r")
            continue
        if step.startswith("+"):
            clock[0] += float(step[1:])
        elif step == "s":
            breaker.success()
        elif step == "f":
            breaker.failure("boom")
        out.append(breaker.state[0])
    return "".join(out)


@pytest.mark.parametrize(
    "script,expected,cooldown",
    [
        # Two failures stay closed; a success resets the count.
        ("a f a f a s a f a f", "acacacacac", 1.0),
        # The third consecutive failure opens it: the next call is refused.
        ("a f a f a f a", "acacaor", 1.0),
        # Open for 1 s, then one probe at a time; its success closes it.
        ("a f a f a f +0.9 a +0.1 a a s a", "acacaoorharca", 1.0),
        # A failed probe reopens it for twice as long.
        ("a f a f a f +1 a f +1 a +1 a", "acacaohaoorha", 2.0),
    ],
)
def test_breaker_table(script: str, expected: str, cooldown: float) -> None:
    clock = [0.0]
    breaker = Breaker(threshold=3, cooldown=1.0, max_cooldown=30.0, clock=lambda: clock[0])
    assert drive(breaker, clock, script) == expected
    assert breaker.cooldown == cooldown


def test_breaker_cooldown_doubles_up_to_the_maximum() -> None:
    clock = [0.0]
    breaker = Breaker(threshold=1, cooldown=1.0, max_cooldown=30.0, clock=lambda: clock[0])
    breaker.allow()
    breaker.failure("down")
    seen = []
    for _ in range(7):
        clock[0] += breaker.cooldown
        assert breaker.allow()
        breaker.failure("still down")
        seen.append(breaker.cooldown)
    assert seen == [2, 4, 8, 16, 30, 30, 30]
    snap = breaker.snapshot()
    assert snap["state"] == "open" and snap["last_error"] == "still down" and snap["errors"] == 8


def test_breaker_abandoned_probe_lets_another_go() -> None:
    clock = [0.0]
    breaker = Breaker(threshold=1, clock=lambda: clock[0])
    breaker.allow()
    breaker.failure("down")
    clock[0] += 1
    assert breaker.allow() and not breaker.allow()
    breaker.abandon()
    assert breaker.allow()


# --- URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("redis://127.0.0.1:6380/2", StoreURL(False, "127.0.0.1", 6380, 2)),
        ("redis://localhost", StoreURL(False, "localhost", 6379, 0)),
        ("redis://localhost/", StoreURL(False, "localhost", 6379, 0)),
        ("REDIS://cache.internal:7000/0", StoreURL(False, "cache.internal", 7000, 0)),
        ("rediss://cache.example.com:6380/1", StoreURL(True, "cache.example.com", 6380, 1)),
        ("rediss://[::1]:6380/0", StoreURL(True, "::1", 6380, 0)),
        ("redis://:p%40ss@h:1/0", StoreURL(False, "h", 1, 0, None, "p@ss")),
        ("rediss://gw:secret@h/3", StoreURL(True, "h", 6379, 3, "gw", "secret")),
        ("redis://gw@h/0", StoreURL(False, "h", 6379, 0, "gw", None)),
    ],
)
def test_parse_store_url(text: str, expected: StoreURL) -> None:
    assert parse_store_url(text) == expected


@pytest.mark.parametrize(
    "text,problem",
    [
        ("", "no spaces"),
        (" redis://h/0", "no spaces"),
        ("memory", "unknown scheme ''"),
        ("http://h/0", "unknown scheme 'http'"),
        ("unix:///tmp/redis.sock", "unknown scheme 'unix'"),
        ("redis://", "no host"),
        ("redis://:6379/0", "no host"),
        ("redis://h:99999/0", "port must be 1-65535"),
        ("redis://h:0/0", "port must be 1-65535"),
        ("redis://h:port/0", "port must be 1-65535"),
        ("redis://h/db", "database number"),
        ("redis://h/0/1", "database number"),
        ("redis://h/-1", "database number"),
        ("redis://h/0?ssl_cert_reqs=none", "query strings"),
        ("redis://h/0#x", "fragments"),
    ],
)
def test_bad_store_urls(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as e:
        parse_store_url(text)
    assert str(e.value).startswith("bad store URL")


def test_passwords_never_appear_in_messages() -> None:
    with pytest.raises(ValueError) as e:
        parse_store_url("redis://gw:hunter2@h/db")
    assert "hunter2" not in str(e.value) and "gw:***@h" in str(e.value)
    u = parse_store_url("rediss://gw:hunter2@h:6380/1")
    assert str(u) == "rediss://gw:***@h:6380/1"
    assert "hunter2" not in repr(u)
    store = RedisStore.from_url("rediss://:hunter2@h:6380/1")
    assert store.health()["url"] == "rediss://:***@h:6380/1"


def test_rediss_uses_tls_and_checks_the_host() -> None:
    store = RedisStore.from_url("rediss://cache.example.com:6380/1", timeout=0.02)
    kw = store.client.connection_pool.connection_kwargs
    cls = store.client.connection_pool.connection_class
    assert cls.__name__ == "SSLConnection"
    assert kw["ssl_cert_reqs"] == "required" and kw["ssl_check_hostname"] is True
    assert kw["socket_timeout"] == kw["socket_connect_timeout"] == 0.02
    assert (kw["host"], kw["port"], kw["db"]) == ("cache.example.com", 6380, 1)
