"""Rate limits, as three things: the rate arithmetic (`Rate`: parsed once,
its emission interval and burst tolerance), the algorithm (`gcra`: a pure
function of one stored value and the time), and the store that keeps those
values (the `Limiter` protocol; `authgate.runtime.stores` has the in-memory
one, and a shared store plugs in without touching the algorithm).

GCRA (the generic cell rate algorithm) keeps one number per key, the
theoretical arrival time (TAT). It allows bursts of up to N requests and then
one every period/N, and it tells exactly when the next request would pass,
which is what `Retry-After` promises. Times are integer nanoseconds, so a
burst of N is exactly N (floats lose a request to rounding), and a rate is
at most one request a nanosecond (1000000000/second, 60000000000/minute, ...):
beyond that the emission interval would be zero.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from authgate.core.records import record

NS = 1_000_000_000
PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(
    r"""^\s*
    (?P<count>[1-9][0-9]*)\s*
    (?:/|\s+per\s+)\s*
    (?P<period>second|minute|hour|day)s?
    \s*$""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    period: int  # seconds

    @classmethod
    def parse(cls, text: str) -> Rate:
        m = _RATE.match(text)
        if not m:
            raise ValueError(
                f"bad rate {text!r}: expected N/second, N/minute, N/hour or N/day (one rate)"
            )
        name = m.group("period")
        period, count = PERIODS[name], m.group("count")
        most = period * NS  # one request a nanosecond: an emission interval of 1
        # (Compared by length first: int() refuses more than 4300 digits.)
        if len(count) > len(str(most)) or int(count) > most:
            raise ValueError(f"bad rate {text!r}: at most {most}/{name} (one request a nanosecond)")
        return cls(int(count), period)

    @property
    def interval(self) -> float:
        return self.period / self.count

    @property
    def emission_ns(self) -> int:
        """The GCRA emission interval T, rounded down: the whole burst always fits."""
        return self.period * NS // self.count

    @property
    def tolerance_ns(self) -> int:
        """The GCRA burst tolerance tau = period - T (a burst of `count`)."""
        return self.period * NS - self.emission_ns

    def __str__(self) -> str:
        name = next(k for k, v in PERIODS.items() if v == self.period)
        return f"{self.count}/{name}"


@record
class Verdict:
    allowed: bool
    remaining: int
    retry_after: int  # whole seconds >= 1 when not allowed, else 0
    reset: int  # whole seconds until the quota is fully back


def gcra(tat: int | None, now_ns: int, rate: Rate) -> tuple[Verdict, int]:
    """One request against a key whose stored TAT is `tat` (None: never seen)
    at `now_ns` -> (the verdict, the TAT to store if the request is counted)."""
    interval = rate.emission_ns
    period = rate.period * NS
    tat = now_ns if tat is None or tat < now_ns else tat
    new_tat = tat + interval
    allow_at = new_tat - period  # the earliest time this request fits
    if allow_at > now_ns:
        retry = max(1, -(-(allow_at - now_ns) // NS))
        return Verdict(False, 0, retry, max(1, -(-(tat - now_ns) // NS))), tat
    remaining = (now_ns - allow_at) // interval
    return Verdict(True, remaining, 0, -(-(new_tat - now_ns) // NS)), new_tat


class Limiter(Protocol):
    """Where the TATs live. `hit` judges one request against one limit and key
    and, when allowed and `consume`, counts it. A denied request consumes
    nothing."""

    def hit(
        self, limit_id: str, key: str, rate: Rate, now: float, consume: bool = True
    ) -> Verdict: ...


@record
class Hit:
    """One limit a request is counted against: the limit's identity, the key
    value (`ip:...`, `sub:...`, `hdr:...`) and its rate."""

    limit_id: str
    key: str
    rate: Rate


ALLOWED = Verdict(True, 0, 0, 0)
_NO_VERDICTS: dict[tuple[str, str], Verdict] = {}


class Recorder:
    """A Limiter that counts nothing: it notes every limit the core asks about
    and answers from `verdicts` (allowed for the rest). The gateway judges a
    request with one, has a store judge all the noted hits at once (one round
    trip, all or nothing), and judges again with the store's verdicts only if
    one of them is a denial, so the core alone says what a 429 looks like."""

    __slots__ = ("hits", "verdicts")

    def __init__(self, verdicts: dict[tuple[str, str], Verdict] | None = None) -> None:
        self.hits: list[Hit] = []
        self.verdicts = verdicts or _NO_VERDICTS  # only read

    @classmethod
    def told(cls, hits: Sequence[Hit], verdicts: Sequence[Verdict]) -> Recorder:
        """A Recorder answering with a store's verdicts for these hits."""
        return cls({(h.limit_id, h.key): v for h, v in zip(hits, verdicts, strict=True)})

    def hit(self, limit_id: str, key: str, rate: Rate, now: float, consume: bool = True) -> Verdict:
        self.hits.append(Hit(limit_id, key, rate))
        return self.verdicts.get((limit_id, key), ALLOWED) if self.verdicts else ALLOWED


def gcra_all(
    tats: Sequence[int | None], now_ns: int, rates: Sequence[Rate]
) -> tuple[list[Verdict], list[int] | None]:
    """A request against several limits at once: (each limit's verdict, the
    TATs to store, or None when any limit denies: then nothing is counted).
    The hits are distinct (limit, key) pairs: the core asks about each limit
    once per request."""
    verdicts: list[Verdict] = []
    new: list[int] = []
    ok = True
    for tat, rate in zip(tats, rates, strict=True):
        verdict, new_tat = gcra(tat, now_ns, rate)
        verdicts.append(verdict)
        new.append(new_tat)
        ok = ok and verdict.allowed
    return verdicts, (new if ok else None)


class BatchLimiter(Protocol):
    """A store that judges all of a request's hits in one step: each hit's
    verdict; when any is denied, nothing is counted (a refused request uses no
    quota). `consume=False` only reads."""

    def hit_all(self, hits: Sequence[Hit], now: float, consume: bool = True) -> list[Verdict]: ...


class Store(Limiter, BatchLimiter, Protocol):
    """A store the core can use either way (the in-memory one)."""
