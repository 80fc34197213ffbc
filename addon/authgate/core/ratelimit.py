"""Rate limits: the limit (parsed once), the algorithm (GCRA) and the store.

GCRA (the generic cell rate algorithm) keeps one number per key, the
theoretical arrival time. It allows bursts of up to N requests and then one
every period/N, and it tells exactly when the next request would pass, which
is what `Retry-After` promises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

    def __str__(self) -> str:
        name = next(k for k, v in PERIODS.items() if v == self.period)
        return f"{self.count}/{name}"


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    remaining: int
    retry_after: int  # whole seconds >= 1 when not allowed, else 0
    reset: int  # whole seconds until the quota is fully back


NS = 1_000_000_000


class Limiter:
    """In-memory GCRA state. Keys are (limit identity, key value).

    Times are integer nanoseconds, so a burst of N is exactly N (floats lose
    a request to rounding). Single-threaded by design: mitmproxy calls hooks
    on one event loop.
    """

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._tat: dict[tuple[str, str], int] = {}
        self._max_keys = max(1, max_keys)

    def __len__(self) -> int:
        return len(self._tat)

    def hit(self, limit_id: str, key: str, rate: Rate, now: float, consume: bool = True) -> Verdict:
        t = round(now * NS)
        period = rate.period * NS
        interval = period // rate.count  # rounded down: the whole burst always fits
        store_key = (limit_id, key)
        tat = max(self._tat.get(store_key, t), t)
        new_tat = tat + interval
        allow_at = new_tat - period  # the earliest time this request fits
        if allow_at > t:
            return Verdict(False, 0, max(1, -(-(allow_at - t) // NS)), max(1, -(-(tat - t) // NS)))
        if consume:
            if len(self._tat) >= self._max_keys and store_key not in self._tat:
                self._sweep(t)
            self._tat[store_key] = new_tat
        remaining = (t - allow_at) // interval
        return Verdict(True, remaining, 0, -(-(new_tat - t) // NS))

    def _sweep(self, now: int) -> None:
        """Forget keys whose quota is fully back; they carry no state."""
        expired = [k for k, t in self._tat.items() if t <= now]
        for k in expired:
            del self._tat[k]
        if len(self._tat) >= self._max_keys:
            # Still full of active keys: drop the oldest half rather than grow
            # without bound. Those keys get a fresh quota (documented).
            drop = max(1, len(self._tat) - self._max_keys // 2)
            for k in sorted(self._tat, key=self._tat.__getitem__)[:drop]:
                del self._tat[k]
