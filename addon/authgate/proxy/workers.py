"""`authgate run --workers N`: mitmproxy's listeners share their port.

Each worker binds the same HOST:PORT with SO_REUSEPORT (the supervisor is
`authgate.house.workers`). mitmproxy binds its listeners itself, with
`asyncio.start_server(handler, host, port)` in `AsyncioServerInstance.listen`
(mitmproxy/proxy/mode_servers.py, the same in 11.0 and 12.x): `share_port()`
gives that one module an asyncio whose start_server also passes
`reuse_port=True`, and refuses to run if the module no longer looks that way.
"""

from __future__ import annotations

import asyncio
from typing import Any


class _ReusePortAsyncio:
    """asyncio, except that start_server binds with SO_REUSEPORT."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def start_server(*args: Any, **kwargs: Any) -> asyncio.Server:
        kwargs.setdefault("reuse_port", True)
        return await asyncio.start_server(*args, **kwargs)


def share_port() -> None:
    """In a worker: let mitmproxy's TCP listeners share their port."""
    from mitmproxy.proxy import mode_servers

    if getattr(mode_servers, "asyncio", None) is not asyncio or not hasattr(
        mode_servers, "AsyncioServerInstance"
    ):
        raise RuntimeError(
            "authgate --workers: this mitmproxy binds its listeners differently than "
            "11.0/12.x; run one process per port instead"
        )
    mode_servers.asyncio = _ReusePortAsyncio()  # type: ignore[attr-defined,assignment]
