"""Rate-limit stores: where the GCRA state of `authgate.core.ratelimit` lives.

`MemoryStore` keeps it in this process: the default, exact for one process.
A `SharedStore` (`authgate.runtime.redis_store`) keeps it where several
processes and machines see the same counts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from authgate.core.model import Ban
from authgate.core.ratelimit import NS, Hit, Rate, Verdict, gcra, gcra_all
from authgate.core.watch import Observation, Window


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
        if len(hits) == 1:  # the common case (one IP limit): `hit` is the same
            h = hits[0]
            return [self.hit(h.limit_id, h.key, h.rate, now, consume)]
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


@dataclass(frozen=True, slots=True)
class Counted:
    """What a store says of one observation: the count it reached, whether
    that reached the threshold (then the key's window starts again), and
    from a shared store the ban in force on the key after it (None: none
    set; the memory store leaves bans to the gateway)."""

    count: int
    reached: bool
    ban: Ban | None = None


@dataclass(frozen=True, slots=True)
class BanTable:
    """The bans a shared store holds: its version (it changes with every
    ban set or lifted) and the bans by key, in this process's clock."""

    version: str
    bans: dict[str, Ban]


class MemoryWatch:
    """The watch's windows in this process, one per (watch, key). Bounded:
    at `max_keys`, the key counted least recently is forgotten first."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._windows: OrderedDict[tuple[str, str], Window] = OrderedDict()
        self._max_keys = max(1, max_keys)

    def __len__(self) -> int:
        return len(self._windows)

    def count(self, observations: Sequence[Observation], now: float) -> list[Counted]:
        out = []
        for o in observations:
            spec = o.spec
            k = (spec.watch_id, o.key)
            window = self._windows.get(k)
            if window is None:
                if len(self._windows) >= self._max_keys:
                    self._windows.popitem(last=False)
                window = self._windows[k] = Window()
            else:
                self._windows.move_to_end(k)
            n = window.add(o.member, now, spec.window, spec.threshold)
            if not window.seen:
                del self._windows[k]  # the threshold was reached: it starts again
            out.append(Counted(n, n >= spec.threshold))
        return out


class StoreUnavailable(Exception):
    """A shared store did not answer in time, or answered nonsense."""


class SharedStore(Protocol):
    """A store several gateways share, reached over the network: one call per
    request judges and counts all its hits (see `BatchLimiter`), with the
    store's own clock; and a cache of values with an expiry (introspection
    answers). Raises StoreUnavailable, never hangs."""

    async def hit_all(self, hits: Sequence[Hit], consume: bool = True) -> list[Verdict]: ...

    async def watch(self, observations: Sequence[Observation], act: bool) -> list[Counted]:
        """Count a denial's observations, by the store's clock; for one that
        reaches its threshold, when `act`, set its watch's action on the key
        (never shortening or softening a ban in force: `core.watch.stronger`)."""
        ...

    async def bans(self, version: str) -> BanTable | None:
        """The bans in force, or None when the version is still `version`."""
        ...

    async def lift(self, key: str) -> bool:
        """End the ban on `key`; whether there was one."""
        ...

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
