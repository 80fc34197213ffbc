"""Rate.parse and the GCRA Limiter with an injected clock (R-01, R-02, Part 1 item 10)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.core.ratelimit import Limiter, Rate, Verdict
from authgate.runtime.stores import MemoryStore

P = pytest.param

# --- Rate.parse -------------------------------------------------------------

GOOD_RATES = [
    P("5/minute", 5, 60, "5/minute", id="per-minute"),
    P("600/minute", 600, 60, "600/minute", id="600-per-minute"),
    P("1/second", 1, 1, "1/second", id="per-second"),
    P("10 per hour", 10, 3600, "10/hour", id="per-word"),
    P("3/days", 3, 86400, "3/day", id="plural-days"),
    P("2/day", 2, 86400, "2/day", id="per-day"),
    P("100/hours", 100, 3600, "100/hour", id="plural-hours"),
    P("7/seconds", 7, 1, "7/second", id="plural-seconds"),
    P("5 per minutes", 5, 60, "5/minute", id="per-word-plural"),
    P("5 / minute", 5, 60, "5/minute", id="spaces-around-slash"),
    P("  5/minute  ", 5, 60, "5/minute", id="surrounding-spaces"),
    P("5\tper\tminute", 5, 60, "5/minute", id="tabs"),
    P("5 per  minute", 5, 60, "5/minute", id="two-spaces"),
    P("999999999/second", 999999999, 1, "999999999/second", id="nine-digits"),
    # Hardening 2, item 12: large counts, up to one request a nanosecond.
    P("1000000000/minute", 10**9, 60, "1000000000/minute", id="ten-digits-per-minute"),
    P("1000000000/second", 10**9, 1, "1000000000/second", id="one-a-nanosecond"),
    P("60000000000/minute", 6 * 10**10, 60, "60000000000/minute", id="at-most-per-minute"),
    P("3600000000000 per hour", 36 * 10**11, 3600, "3600000000000/hour", id="at-most-per-hour"),
    P("86400000000000/days", 864 * 10**11, 86400, "86400000000000/day", id="at-most-per-day"),
    P("10/minute\n", 10, 60, "10/minute", id="trailing-newline"),
]


@pytest.mark.parametrize(("text", "count", "period", "canonical"), GOOD_RATES)
def test_rate_parse(text: str, count: int, period: int, canonical: str) -> None:
    rate = Rate.parse(text)
    assert rate == Rate(count, period)
    assert str(rate) == canonical
    assert Rate.parse(str(rate)) == rate


BAD_RATES = [
    P("0/minute", id="zero"),
    P("5", id="no-period"),
    P("5/fortnight", id="unknown-period"),
    P("1/second; 5/minute", id="two-rates"),
    P("1/second, 5/minute", id="two-rates-comma"),
    P("-1/minute", id="negative"),
    P("+5/minute", id="plus-sign"),
    P("", id="empty"),
    P("   ", id="blank"),
    P("/minute", id="no-count"),
    P("05/minute", id="leading-zero"),
    P("5.0/minute", id="decimal"),
    P("1e3/minute", id="exponent"),
    P("five/minute", id="word-count"),
    P("\u0665/minute", id="arabic-indic-digit"),
    P("5/Minute", id="capitalised"),
    P("5/MINUTE", id="upper-case"),
    P("5/min", id="abbreviated-min"),
    P("5/sec", id="abbreviated-sec"),
    P("5/m", id="single-letter"),
    P("5/minutess", id="double-plural"),
    P("5//minute", id="double-slash"),
    P("5per minute", id="per-without-space-before"),
    P("5 perminute", id="per-without-space-after"),
    P("5 PER minute", id="upper-per"),
    P("5/minute/second", id="two-periods"),
    P("5/2minutes", id="period-multiplier"),
    P("5/minute x", id="trailing-junk"),
    P("5 every minute", id="every"),
]


@pytest.mark.parametrize("text", BAD_RATES)
def test_rate_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^bad rate "):
        Rate.parse(text)


# (rate, the bound the error names): one request a nanosecond at most, since
# the GCRA emission interval is whole nanoseconds (zero beyond).
TOO_FAST = [
    P("1000000001/second", "at most 1000000000/second", id="per-second"),
    P("60000000001/minute", "at most 60000000000/minute", id="per-minute"),
    P("3600000000001 per hours", "at most 3600000000000/hour", id="per-hour"),
    P("86400000000001/day", "at most 86400000000000/day", id="per-day"),
    P("99999999999999999999999/second", "at most 1000000000/second", id="23-digits"),
    P("9" * 5000 + "/minute", "at most 60000000000/minute", id="more-digits-than-int-takes"),
]


@pytest.mark.parametrize(("text", "bound"), TOO_FAST)
def test_rate_parse_names_the_bound(text: str, bound: str) -> None:
    with pytest.raises(ValueError, match=rf"^bad rate .*: {bound} \(one request a nanosecond\)$"):
        Rate.parse(text)


@pytest.mark.parametrize(
    ("text", "interval"),
    [
        P("5/minute", 12.0, id="5-per-minute"),
        P("1/second", 1.0, id="1-per-second"),
        P("600/minute", 0.1, id="600-per-minute"),
        P("2/day", 43200.0, id="2-per-day"),
    ],
)
def test_rate_interval(text: str, interval: float) -> None:
    assert Rate.parse(text).interval == interval


# --- Limiter.hit ------------------------------------------------------------

T0 = 1000.0


def test_burst_then_denied_exact_verdicts() -> None:
    lim = MemoryStore()
    rate = Rate.parse("3/minute")  # one every 20 s, burst of 3
    got = [lim.hit("L", "k", rate, T0) for _ in range(5)]
    assert got == [
        Verdict(True, 2, 0, 20),
        Verdict(True, 1, 0, 40),
        Verdict(True, 0, 0, 60),
        Verdict(False, 0, 20, 60),
        Verdict(False, 0, 20, 60),
    ]


# (rate, burst size, Retry-After once the burst is spent)
BURSTS = [
    P("1/second", 1, 1, id="1-per-second"),
    P("3/minute", 3, 20, id="3-per-minute"),
    P("5/minute", 5, 12, id="5-per-minute"),
    P("7/minute", 7, 9, id="7-per-minute-fractional-interval"),
    P("10 per hour", 10, 360, id="10-per-hour"),
    P("600/minute", 600, 1, id="600-per-minute-sub-second-wait"),
    P("2/day", 2, 43200, id="2-per-day"),
]


@pytest.mark.parametrize(("text", "burst", "retry_after"), BURSTS)
def test_burst_then_retry_after(text: str, burst: int, retry_after: int) -> None:
    lim = MemoryStore()
    rate = Rate.parse(text)
    remaining = [lim.hit("L", "k", rate, T0).remaining for _ in range(burst)]
    assert remaining == list(range(burst - 1, -1, -1))  # counts down to 0
    denied = lim.hit("L", "k", rate, T0)
    assert denied.allowed is False
    assert denied.remaining == 0
    assert type(denied.retry_after) is int
    assert denied.retry_after == retry_after
    # a second early is still too early; exactly Retry-After later succeeds.
    assert lim.hit("L", "k", rate, T0 + retry_after - 1).allowed is False
    assert lim.hit("L", "k", rate, T0 + retry_after).allowed is True


# (rate, clock): the whole burst of N fits at one instant, whatever the clock reads.
@pytest.mark.parametrize(
    ("text", "now"),
    [
        P("3/minute", 1000.0, id="3-per-minute"),
        P("5/minute", 1.7e9, id="5-per-minute-wall-clock"),
        P("7/minute", 1000.0, id="7-per-minute"),
        P("53/second", 2.0, id="53-per-second"),
        P("600/minute", 0.0, id="600-per-minute-at-zero"),
        P("600/minute", 1000.0, id="600-per-minute"),
        P("3/hour", 1_700_000_000.5, id="3-per-hour-wall-clock"),
    ],
)
def test_full_burst_fits(text: str, now: float) -> None:
    lim = MemoryStore()
    rate = Rate.parse(text)
    assert spend(lim, rate, now) == rate.count


# A fresh key always gets its first request, whatever the clock reads.
@pytest.mark.parametrize(
    ("text", "now", "reset"),
    [
        P("1/minute", 1000.0, 60, id="1-per-minute"),
        P("1/minute", 0.1, 60, id="1-per-minute-at-0.1"),
        P("1/minute", 1e-05, 60, id="1-per-minute-at-1e-5"),
        P("1/hour", 0.1, 3600, id="1-per-hour-at-0.1"),
        P("1/second", 0.1, 1, id="1-per-second-at-0.1"),
    ],
)
def test_first_request_is_allowed(text: str, now: float, reset: int) -> None:
    assert MemoryStore().hit("L", "k", Rate.parse(text), now) == Verdict(True, 0, 0, reset)


def test_exact_retry_after_for_integer_interval() -> None:
    lim = MemoryStore()
    rate = Rate.parse("3/minute")
    for _ in range(3):
        lim.hit("L", "k", rate, T0)
    assert lim.hit("L", "k", rate, T0 + 20) == Verdict(True, 0, 0, 60)
    assert lim.hit("L", "k", rate, T0 + 20) == Verdict(False, 0, 20, 60)


def test_refill_over_time() -> None:
    lim = MemoryStore()
    rate = Rate.parse("3/minute")
    for _ in range(3):
        lim.hit("L", "k", rate, T0)
    assert lim.hit("L", "k", rate, T0 + 19.5) == Verdict(False, 0, 1, 41)
    assert lim.hit("L", "k", rate, T0 + 20) == Verdict(True, 0, 0, 60)
    assert lim.hit("L", "k", rate, T0 + 45) == Verdict(True, 0, 0, 55)  # tat was 1080
    assert lim.hit("L", "k", rate, T0 + 200) == Verdict(True, 2, 0, 20)  # fully back


def test_partial_refill_gives_partial_remaining() -> None:
    lim = MemoryStore()
    rate = Rate.parse("3/minute")
    for _ in range(3):
        lim.hit("L", "k", rate, T0)  # theoretical arrival time now T0 + 60
    assert lim.hit("L", "k", rate, T0 + 45) == Verdict(True, 1, 0, 35)


def test_keys_are_independent() -> None:
    lim = MemoryStore()
    rate = Rate.parse("2/minute")
    assert [lim.hit("L", "a", rate, T0).allowed for _ in range(3)] == [True, True, False]
    assert lim.hit("L", "b", rate, T0) == Verdict(True, 1, 0, 30)
    assert lim.hit("other", "a", rate, T0) == Verdict(True, 1, 0, 30)
    assert lim.hit("L", "a", rate, T0) == Verdict(False, 0, 30, 60)
    assert len(lim) == 3


def test_consume_false_does_not_change_state() -> None:
    lim = MemoryStore()
    rate = Rate.parse("3/minute")
    peeks = [lim.hit("L", "k", rate, T0, consume=False) for _ in range(5)]
    assert peeks == [Verdict(True, 2, 0, 20)] * 5
    assert len(lim) == 0
    lim.hit("L", "k", rate, T0)
    lim.hit("L", "k", rate, T0)
    assert lim.hit("L", "k", rate, T0, consume=False) == Verdict(True, 0, 0, 60)
    assert lim.hit("L", "k", rate, T0, consume=False) == Verdict(True, 0, 0, 60)
    assert lim.hit("L", "k", rate, T0) == Verdict(True, 0, 0, 60)
    assert lim.hit("L", "k", rate, T0, consume=False) == Verdict(False, 0, 20, 60)
    assert lim.hit("L", "k", rate, T0 + 20, consume=False) == Verdict(True, 0, 0, 60)
    assert lim.hit("L", "k", rate, T0 + 20, consume=False) == Verdict(True, 0, 0, 60)
    assert len(lim) == 1


def test_denied_hit_does_not_push_the_wait_further() -> None:
    lim = MemoryStore()
    rate = Rate.parse("1/minute")
    lim.hit("L", "k", rate, T0)
    assert [lim.hit("L", "k", rate, T0 + 1).retry_after for _ in range(10)] == [59] * 10
    assert lim.hit("L", "k", rate, T0 + 60).allowed is True


# --- memory bound -----------------------------------------------------------


def test_sweep_forgets_expired_keys() -> None:
    lim = MemoryStore(max_keys=3)
    fast = Rate.parse("1/second")
    for k in ("a", "b", "c"):
        lim.hit("L", k, fast, 0.0)
    assert len(lim) == 3
    assert lim.hit("L", "d", fast, 5.0) == Verdict(True, 0, 0, 1)
    assert len(lim) == 1


def test_sweep_keeps_active_keys() -> None:
    lim = MemoryStore(max_keys=3)
    fast, slow = Rate.parse("1/second"), Rate.parse("1/hour")
    lim.hit("L", "expired", fast, 0.0)
    lim.hit("L", "busy1", slow, 0.0)
    lim.hit("L", "busy2", slow, 0.0)
    lim.hit("L", "new", slow, 10.0)
    assert len(lim) == 3
    assert lim.hit("L", "busy1", slow, 10.0, consume=False) == Verdict(False, 0, 3590, 3590)
    assert lim.hit("L", "busy2", slow, 10.0, consume=False) == Verdict(False, 0, 3590, 3590)


def test_full_of_active_keys_drops_the_oldest_half() -> None:
    lim = MemoryStore(max_keys=4)
    slow = Rate.parse("1/hour")
    for t, k in enumerate(("k0", "k1", "k2", "k3")):
        lim.hit("L", k, slow, float(t))
    lim.hit("L", "k4", slow, 4.0)
    assert len(lim) == 3
    allowed = {k: lim.hit("L", k, slow, 5.0, consume=False).allowed for k in ("k0", "k1", "k2")}
    assert allowed == {"k0": True, "k1": True, "k2": False}  # k0, k1 forgotten


@pytest.mark.parametrize("max_keys", [1, 2, 3, 4, 10])
def test_memory_stays_bounded(max_keys: int) -> None:
    lim = MemoryStore(max_keys=max_keys)
    slow = Rate.parse("1/hour")  # nothing expires during the test
    sizes = []
    for i in range(50):
        lim.hit("L", f"client-{i}", slow, T0 + i)
        sizes.append(len(lim))
    assert max(sizes) <= max_keys


# --- properties -------------------------------------------------------------

RATES = st.builds(Rate, count=st.integers(1, 1000), period=st.sampled_from([1, 60, 3600, 86400]))
CLOCKS = st.floats(0, 2e9, allow_nan=False, allow_infinity=False)


def spend(lim: Limiter, rate: Rate, now: float) -> int:
    """Hit until denied (at most count + 1 times); how many were allowed."""
    allowed = 0
    while allowed <= rate.count and lim.hit("L", "k", rate, now).allowed:
        allowed += 1
    return allowed


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(rate=RATES, now=CLOCKS, extra=st.integers(1, 5))
def test_retry_after_is_honest(rate: Rate, now: float, extra: int) -> None:
    """R-01/R-02: Retry-After is a whole number >= 1 and waiting that long is enough."""
    lim = MemoryStore()
    spend(lim, rate, now)
    for _ in range(extra):  # denied hits do not move the goalposts
        v = lim.hit("L", "k", rate, now)
        assert v.allowed is False
        assert type(v.retry_after) is int and v.retry_after >= 1
        # at most ceil(period / count), plus one second of slack for float rounding
        assert v.retry_after <= -(-rate.period // rate.count) + 1
    assert lim.hit("L", "k", rate, now + v.retry_after).allowed is True


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(rate=RATES, now=CLOCKS)
def test_whole_quota_is_usable(rate: Rate, now: float) -> None:
    """N/period allows a burst of exactly N, with `remaining` counting N-1 .. 0."""
    lim = MemoryStore()
    remaining = [lim.hit("L", "k", rate, now).remaining for _ in range(rate.count)]
    assert remaining == list(range(rate.count - 1, -1, -1))
    assert lim.hit("L", "k", rate, now).allowed is False


# --- all of a request's limits at once --------------------------------------------


def test_hit_all_counts_every_hit_when_all_allow() -> None:
    from authgate.core.ratelimit import Hit

    lim = MemoryStore()
    hits = [Hit("a", "ip:1", Rate(2, 60)), Hit("b", "sub:x", Rate(5, 60))]
    assert [v.allowed for v in lim.hit_all(hits, 0.0)] == [True, True]
    assert [v.remaining for v in lim.hit_all(hits, 0.0)] == [0, 3]
    # The third: "a" refuses, so "b" is not counted either.
    assert [v.allowed for v in lim.hit_all(hits, 0.0)] == [False, True]
    assert lim.hit("b", "sub:x", Rate(5, 60), 0.0, consume=False).remaining == 2


def test_hit_all_consume_false_only_reads() -> None:
    from authgate.core.ratelimit import Hit

    lim = MemoryStore()
    hits = [Hit("a", "ip:1", Rate(1, 60))]
    for _ in range(3):
        assert lim.hit_all(hits, 0.0, consume=False)[0].allowed
    assert len(lim) == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30)), min_size=1, max_size=40),
)
def test_hit_all_is_all_or_nothing(seq: list[tuple[int, int]]) -> None:
    """Against a reference: a batch is counted only when every hit in it would
    pass on its own; a refused batch leaves every key as it was."""
    from authgate.core.ratelimit import Hit

    rates = [Rate(2, 10), Rate(3, 10), Rate(5, 60)]
    lim, ref = MemoryStore(), MemoryStore()
    now = 0.0
    for which, dt in seq:
        now += dt / 10
        hits = [Hit(str(i), "k", rates[i]) for i in range(which + 1)]
        fits = all(ref.hit(h.limit_id, h.key, h.rate, now, consume=False).allowed for h in hits)
        if fits:
            for h in hits:
                ref.hit(h.limit_id, h.key, h.rate, now)
        verdicts = lim.hit_all(hits, now)
        assert all(v.allowed for v in verdicts) == fits
        for h in hits:
            assert lim.hit(h.limit_id, h.key, h.rate, now, False) == ref.hit(
                h.limit_id, h.key, h.rate, now, False
            )


def test_a_request_refused_by_one_limit_counts_against_none() -> None:
    """IP 2/hour and subject 1/hour: alice's second request is refused by her
    subject limit and so uses none of the IP's quota, which bob then gets."""
    from authgate.core.decision import RequestView, judge
    from authgate.core.model import Policy
    from authgate.policy.load import parse_policy

    policy: Policy = parse_policy(
        "version: 1\n"
        "authn:\n  api_keys:\n    header: X-Key\n    keys:\n"
        "      - {name: alice, sha256: " + "a" * 64 + "}\n"
        "rules:\n  - name: r\n    match: {path: /x}\n    allow: anyone\n"
        "    limits:\n      - {name: per-ip, key: ip, rate: 2/hour}\n"
        "      - {name: per-sub, key: header:x-user, rate: 1/hour}\n"
    )
    store = MemoryStore()

    def ask(user: str) -> int:
        view = RequestView.build("GET", "/x", [("Host", "h"), ("X-User", user)], "192.0.2.1")
        return judge(policy, view, 1000.0, store).status

    assert [ask("alice"), ask("alice"), ask("bob"), ask("carol")] == [0, 429, 0, 429]


# --- huge rates (Hardening 2, item 12) --------------------------------------------

HUGE = ["1000000000/minute", "1000000000/second", "60000000000/minute", "86400000000000/day"]


@pytest.mark.parametrize("text", HUGE)
def test_a_huge_rate_allows_and_counts_down(text: str) -> None:
    lim = MemoryStore()
    rate = Rate.parse(text)
    got = [lim.hit("L", "k", rate, T0) for _ in range(1000)]
    assert all(v.allowed for v in got)
    assert [v.remaining for v in got] == list(range(rate.count - 1, rate.count - 1001, -1))


@pytest.mark.parametrize("text", HUGE)
def test_a_huge_rate_still_allows_exactly_its_burst(text: str) -> None:
    """Too many to spend one by one: the GCRA state just before and after the
    last request of the burst (N-1 and N emission intervals ahead)."""
    from authgate.core.ratelimit import gcra

    rate = Rate.parse(text)
    assert rate.emission_ns >= 1
    now = 1_700_000_000 * 10**9
    last, _ = gcra(now + (rate.count - 1) * rate.emission_ns, now, rate)
    assert (last.allowed, last.remaining) == (True, 0)
    over, _ = gcra(now + rate.count * rate.emission_ns, now, rate)
    assert (over.allowed, over.retry_after) == (False, 1)


def test_a_huge_rate_allows_in_redis_too(redis_server: Any) -> None:
    """The Redis script works in whole microseconds: a rate above one a µs
    rounded to an interval of 0 and every reply was nonsense (so the store
    was 'unavailable'); it is judged as one a µs, its remaining scaled back."""
    import asyncio

    from authgate.core.ratelimit import Hit
    from authgate.runtime.redis_store import RedisStore

    if not redis_server.running:
        redis_server.start()
    hits = [Hit("huge", "ip:1", Rate.parse("1000000000/minute")),
            Hit("fast", "ip:1", Rate.parse("2000000/second")),
            Hit("usual", "ip:1", Rate.parse("5/minute"))]  # fmt: skip

    async def body() -> list[list[Verdict]]:
        prefix = f"huge-rates-{os.getpid()}-{time.monotonic_ns()}"  # nothing left from before
        store = RedisStore.from_url(redis_server.url, timeout=2, prefix=prefix)
        try:
            # One instant (Redis's clock would refill a µs-sized quota between calls).
            return [await store.hit_all_at(hits, 1_700_000_000_000_000) for _ in range(3)]
        finally:
            await store.close()

    got = asyncio.run(body())
    assert all(v.allowed for verdicts in got for v in verdicts)
    huge = [verdicts[0].remaining for verdicts in got]
    # A µs-sized quota's key lives a few µs of Redis's own clock: on a busy
    # machine it may be gone before the next call, which then starts afresh.
    assert 10**9 - 100 < huge[2] <= huge[1] <= huge[0] < 10**9
    assert [verdicts[2].remaining for verdicts in got] == [4, 3, 2]
