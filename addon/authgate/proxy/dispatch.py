"""Hook dispatch for the master `authgate run` builds: each event's handlers
looked up once, not on every event.

mitmproxy's `AddonManager.trigger_event` walks the whole addon chain for
every event of every request: for each addon a generator over its children,
a `getattr` for the hook, a `safecall()` context manager, and `event.args()`
(a `dataclasses.fields` call) again. Measured in instructions under callgrind
(`make bench-instructions`), that walk is about a third of what the lean
master spends on a forwarded request, and each addon in the chain adds to it
whether or not it handles the event.

`FastAddonManager` keeps, per event name, the list of handlers the walk
would find, in the walk's order, and rebuilds it when the chain changes
(`add` appends to it, `remove` replaces it). What a handler sees is the
same: the same handlers in the same order, the same arguments, an
`AddonHalt` stops the rest, an `OptionsError` propagates, and any other
exception is logged as mitmproxy logs it ("Addon error: ...") and the next
handler runs.

It is only for a master whose addons have no children (`addons` attributes,
which scripts and some of mitmproxy's own addons change at run time): `use()`
leaves any other master as it is, and a master that gains such an addon
later goes back to mitmproxy's own walk. mitmproxy's own fix would be the same
table inside `AddonManager`; see docs/operations.md#performance.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks, master

_logger = addonmanager.logger  # mitmproxy's own, so errors read as they always did


class FastAddonManager(addonmanager.AddonManager):
    _handlers: dict[str, list[Callable[..., Any]]]
    _chain_seen: tuple[int, int]

    def _table(self) -> dict[str, list[Callable[..., Any]]]:
        seen = (id(self.chain), len(self.chain))
        if getattr(self, "_chain_seen", None) != seen:
            self._handlers = {}
            self._chain_seen = seen
        return self._handlers

    async def trigger_event(self, event: hooks.Hook) -> None:
        table = self._table()
        if not table and any(hasattr(a, "addons") for a in self.chain):
            # An addon with children joined: back to mitmproxy's own walk.
            self.__class__ = addonmanager.AddonManager  # type: ignore[assignment]
            await addonmanager.AddonManager.trigger_event(self, event)
            return
        handlers = table.get(event.name)
        if handlers is None:
            handlers = [f for a in self.chain for _, f in self._iter_hooks(a, event)]
            table[event.name] = handlers
        if not handlers:
            return
        args = event.args()
        for handler in handlers:
            try:
                result = handler(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:  # noqa: BLE001 - what mitmproxy's safecall does
                _logger.error(f"Addon error: {e}", exc_info=True)


def eligible(m: master.Master) -> bool:
    """Whether every addon of the master's chain is a leaf."""
    return not any(hasattr(a, "addons") for a in m.addons.chain)


def use(m: master.Master) -> bool:
    """Give the master the cached dispatch, if its chain allows it; whether it did."""
    if type(m.addons) is not addonmanager.AddonManager or not eligible(m):
        return False
    m.addons.__class__ = FastAddonManager
    return True
