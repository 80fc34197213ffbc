"""Rate limits, as three things: the rate arithmetic (`Rate`: parsed once,
its emission interval and burst tolerance), the algorithm (`gcra`: a pure
function of one stored value and the time), and the store that keeps those
values (the `Limiter` protocol; `authgate.runtime.stores` has the in-memory
one, and a shared store plugs in without touching the algorithm).

GCRA (the generic cell rate algorithm) keeps one number per key, the
theoretical arrival time (TAT). It allows bursts of up to N requests and then
one every period/N, and it tells exactly when the next request would pass,
which is what `Retry-After` promises. Times are integer nanoseconds, so a
burst of N is exactly N (floats lose a request to rounding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

NS = 1_000_000_000
PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(
    r"""^\s*
    (?P<count>[1-9][0-9]{0,8})\s*
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
        return cls(int(m.group("count")), PERIODS[m.group("period")])

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


@dataclass(frozen=True, slots=True)
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
