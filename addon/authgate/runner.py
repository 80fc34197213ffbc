"""`authgate run`: a lean mitmproxy master with the gateway loaded as code.

mitmdump loads about thirty addons, and most of its per-request cost is
dispatching hooks to them (mitmproxy-facts §8). The gateway needs only the
proxy core, TLS (for `--mode reverse:https://...` and HTTPS listeners),
flow saving (`-w` / `save_stream_file`) and the terminal log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import master, options
from mitmproxy.addons import (
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    save,
    tlsconfig,
)

from .addon import Gateway


class _Ready:
    """Calls back with the bound port once the proxy server listens."""

    def __init__(self, callback: Callable[[int], None]) -> None:
        self.callback = callback

    def running(self) -> None:
        from mitmproxy import ctx

        ps = ctx.master.addons.get("proxyserver")
        self.callback(ps.listen_addrs()[0][1])


def lean_addons() -> list[Any]:
    return [
        core.Core(),
        disable_h2c.DisableH2C(),  # kills HTTP/2 prior-knowledge prefaces in cleartext
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        save.Save(),
        errorcheck.ErrorCheck(),
    ]


def mode_spec(upstream: str, listen: str) -> str:
    """`reverse:UPSTREAM@HOST:PORT` from `--upstream` and `--listen`."""
    return f"reverse:{upstream}@{listen}"


async def build(
    policy: str,
    upstream: str,
    listen: str,
    sets: Sequence[str] = (),
    *,
    ready: Callable[[int], None] | None = None,
    termlog: bool = True,
    gateway: Gateway | None = None,
    web: str | None = None,
) -> master.Master:
    """Build (not run) the gateway's master. Raises OptionsError on bad options
    or a bad policy; call inside a running event loop.

    `web="HOST:PORT"` builds mitmweb's master instead (all of mitmproxy's
    addons, the flow list in a browser): for watching decisions, not for speed.
    """
    opts = options.Options()
    m: master.Master
    if web is not None:
        from mitmproxy.tools.web.master import WebMaster

        m = WebMaster(opts, with_termlog=termlog)
    else:
        m = master.Master(opts, with_termlog=termlog)
        m.addons.add(*lean_addons())
    m.addons.add(gateway or Gateway())
    if ready is not None:
        m.addons.add(_Ready(ready))
    opts.update(
        mode=[mode_spec(upstream, listen)],
        connection_strategy="lazy",
        authgate_policy=policy,
    )
    if web is not None:
        host, _, port = web.rpartition(":")
        # mitmweb's own block_global would drop public clients before the
        # gateway sees them; the lean master has no such addon either.
        opts.update(
            web_host=host.strip("[]") or "127.0.0.1",
            web_port=int(port),
            web_open_browser=False,
            block_global=False,
        )
    if sets:
        opts.set(*sets)
    return m
