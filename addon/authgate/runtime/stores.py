"""Rate-limit stores: where the GCRA state of `authgate.core.ratelimit` lives.

`MemoryStore` keeps it in this process: the default, exact for one process.
"""

from __future__ import annotations

from authgate.core.ratelimit import NS, Rate, Verdict, gcra


class MemoryStore:
    """In-memory GCRA state. Keys are (limit identity, key value).

    Single-threaded by design: mitmproxy calls hooks on one event loop.
    Bounded: at `max_keys`, keys whose quota is fully back are forgotten
    first, then the oldest half.
    """

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._tat: dict[tuple[str, str], int] = {}
        self._max_keys = max(1, max_keys)

    def __len__(self) -> int:
        return len(self._tat)

    def hit(self, limit_id: str, key: str, rate: Rate, now: float, consume: bool = True) -> Verdict:
        t = round(now * NS)
        store_key = (limit_id, key)
        verdict, new_tat = gcra(self._tat.get(store_key), t, rate)
        if verdict.allowed and consume:
            if len(self._tat) >= self._max_keys and store_key not in self._tat:
                self._sweep(t)
            self._tat[store_key] = new_tat
        return verdict

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
