"""`authgate run`: a lean mitmproxy master with the gateway loaded as code.

mitmdump loads about thirty addons, and most of its per-request cost is
dispatching hooks to them (measured: a master with only these addons roughly
doubles throughput). The gateway needs only the
proxy core, TLS (for `--mode reverse:https://...` and HTTPS listeners),
flow saving (`-w` / `save_stream_file`) and the terminal log.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import exceptions, master, options
from mitmproxy.addons import (
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    save,
    tlsconfig,
)

from authgate.proxy import guard
from authgate.proxy.addon import Gateway


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
    m.addons.add(*guard.addons())  # after the Gateway: they read what it decided
    if ready is not None:
        m.addons.add(_Ready(ready))
    opts.update(mode=[mode_spec(upstream, listen)], connection_strategy="lazy")
    if web is not None:
        host, _, port = web.rpartition(":")
        # mitmweb's own block_global would drop public clients before the
        # gateway sees them; the lean master has no such addon either.
        listen_host, _, listen_port = listen.rpartition(":")
        opts.update(
            web_host=host.strip("[]") or "127.0.0.1",
            web_port=int(port),
            web_open_browser=False,
            block_global=False,
            # The decision in the flow list, without a click.
            web_columns=["icon", "method", "path", "status", "comment", "size", "time"],
            # What mitmweb's status bar shows (the mode's own address is what binds).
            listen_host=listen_host.strip("[]"),
            listen_port=int(listen_port) if listen_port.isdigit() else None,
        )
    if sets:
        opts.set(*sets)
    # The policy last: it is checked against the options set above (a policy
    # with host rules needs keep_host_header=true).
    opts.update(authgate_policy=policy)
    return m


def serve(
    policy: str,
    upstream: str,
    listen: str,
    sets: Sequence[str],
    on_ready: str | None = None,
    web: str | None = None,
) -> int:
    """Run the gateway until SIGINT/SIGTERM; 2 when the policy or options are refused."""

    async def main() -> int:
        logging.getLogger().setLevel(logging.INFO)  # mitmproxy's termlog filters by verbosity

        def ready(port: int) -> None:
            if on_ready:
                print(on_ready, flush=True)

        try:
            m = await build(policy, upstream, listen, sets, ready=ready, web=web)
        except exceptions.OptionsError as e:
            print(str(e), file=sys.stderr)  # already "authgate: FILE:LINE: problem"
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, m.shutdown)
        await m.run()
        return 0

    return asyncio.run(main())
