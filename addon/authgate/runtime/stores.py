"""Rate-limit stores: where the GCRA state of `authgate.core.ratelimit` lives.

`MemoryStore` keeps it in this process: the default, exact for one process.
A `SharedStore` (`authgate.runtime.redis_store`) keeps it where several
processes and machines see the same counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from authgate.core.ratelimit import NS, Hit, Rate, Verdict, gcra, gcra_all


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

    def hit_all(self, hits: Sequence[Hit], now: float, consume: bool = True) -> list[Verdict]:
        """All of a request's limits at once; nothing counted if one denies."""
        t = round(now * NS)
        keys = [(h.limit_id, h.key) for h in hits]
        verdicts, new = gcra_all([self._tat.get(k) for k in keys], t, [h.rate for h in hits])
        if new is not None and consume:
            for k, tat in zip(keys, new, strict=True):
                if len(self._tat) >= self._max_keys and k not in self._tat:
                    self._sweep(t)
                self._tat[k] = tat
        return verdicts

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


class StoreUnavailable(Exception):
    """A shared store did not answer in time, or answered nonsense."""


class SharedStore(Protocol):
    """A store several gateways share, reached over the network: one call per
    request judges and counts all its hits (see `BatchLimiter`), with the
    store's own clock; and a cache of values with an expiry (introspection
    answers). Raises StoreUnavailable, never hangs."""

    async def hit_all(self, hits: Sequence[Hit], consume: bool = True) -> list[Verdict]: ...

    async def cache_get(self, key: str) -> bytes | None:
        """A value other gateways may have put (introspection answers), or None."""
        ...

    async def cache_put(self, key: str, value: bytes, ttl: float) -> None:
        """Put a value for `ttl` seconds, for every gateway sharing the store."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...

    def health(self) -> dict[str, object]:
        """What /status shows of the store: its address (no password), state, errors."""
        ...
