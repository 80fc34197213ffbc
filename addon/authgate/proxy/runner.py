"""`authgate run`: a lean mitmproxy master with the gateway loaded as code.

mitmdump loads about thirty addons, and most of its per-request cost is
dispatching hooks to them (measured: a master with only these addons roughly
doubles throughput). The gateway needs only the
proxy core, TLS (for `--mode reverse:https://...` and HTTPS listeners),
flow saving (`-w` / `save_stream_file`) and the terminal log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
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

from authgate.proxy import dispatch, guard, tls, workers
from authgate.proxy.addon import Gateway


class _Ready:
    """Once the proxy server listens: says where, in words (with `scheme`),
    and calls back with the bound port (with `callback`)."""

    def __init__(self, callback: Callable[[int], None] | None, scheme: str | None = None) -> None:
        self.callback = callback
        self.scheme = scheme

    def running(self) -> None:
        from mitmproxy import ctx

        addrs = ctx.master.addons.get("proxyserver").listen_addrs()
        if not addrs:
            return  # stopped (SIGTERM) before it started: nothing listens
        if self.scheme is not None:
            logging.getLogger("authgate").info(where_listening(self.scheme, addrs))
        if self.callback is not None:
            self.callback(addrs[0][1])


def where_listening(scheme: str, addrs: Sequence[tuple[Any, ...]]) -> str:
    """What the bound sockets `addrs` ((host, port, ...) each) mean for who can
    connect: 'authgate: listening on http://127.0.0.1:8080 (loopback only; ...)'."""
    urls: list[str] = []
    kinds: set[str] = set()
    for addr in addrs:
        host, port = str(addr[0]), int(addr[1])
        url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        if url not in urls:
            urls.append(url)
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            kinds.add("other")
            continue
        if ip.is_loopback:
            kinds.add("loopback")
        elif ip.is_unspecified:
            kinds.add(f"every IPv{ip.version} interface")
        else:
            kinds.add("other")
    port = int(addrs[0][1]) if addrs else 0
    if kinds == {"loopback"}:
        what = f"loopback only; --listen 0.0.0.0:{port} takes other machines' requests too"
    else:
        every = sorted(k for k in kinds if k.startswith("every"))
        what = ", ".join([*every, "reachable from other machines"])
    return f"authgate: listening on {' and '.join(urls)} ({what})"


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
    """`reverse:UPSTREAM@HOST:PORT` from `--upstream` and `--listen`. A port
    alone is 127.0.0.1 (mitmproxy would listen on every interface), and an
    IPv6 host loses its brackets (mitmproxy would look them up as a name)."""
    host, _, port = listen.rpartition(":")
    return f"reverse:{upstream}@{host.strip('[]') or '127.0.0.1'}:{port}"


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
    tls_cert: str | None = None,
    tls_key: str | None = None,
    upstream_ca: str | None = None,
    announce: bool = False,
    tls_client_ca: str | None = None,
) -> master.Master:
    """Build (not run) the gateway's master. Raises OptionsError on bad options
    or a bad policy; call inside a running event loop. `announce` logs where
    it listens, in words, once it does.

    `web="HOST:PORT"` builds mitmweb's master instead (all of mitmproxy's
    addons, the flow list in a browser): for watching decisions, not for speed.
    `tls_cert`/`tls_key` make the listener HTTPS only (see authgate.proxy.tls);
    `tls_client_ca` makes it ask clients for certificates issued under that CA.
    """
    if tls_client_ca and not (tls_cert and tls_key):
        raise exceptions.OptionsError(
            "authgate: --tls-client-ca needs --tls-cert and --tls-key (client certificates "
            "come with HTTPS)"
        )
    try:
        trust = tls.upstream_trust(upstream, upstream_ca)
        served = (
            tls.TlsListener(tls_cert, tls_key, client_ca=tls_client_ca)
            if tls_cert and tls_key
            else None
        )
    except tls.CertError as e:
        raise exceptions.OptionsError(str(e)) from e
    opts = options.Options()
    m: master.Master
    if web is not None:
        from mitmproxy.tools.web.master import WebMaster

        m = WebMaster(opts, with_termlog=termlog)
    else:
        m = master.Master(opts, with_termlog=termlog)
        m.addons.add(*lean_addons())
    gw = gateway or Gateway()
    if served is not None:
        # After mitmproxy's TlsConfig, which makes each connection's TLS
        # context that the listener then asks for a client certificate on;
        # before the Gateway: plain HTTP is refused first.
        m.addons.add(served)
        opts.update(certs=served.certs_option())
        tls.check_order(m.addons.chain, served)
        if served.client_ca is not None:
            gw.house.no_client_certs = ""
    m.addons.add(gw)
    m.addons.add(*guard.addons())  # after the Gateway: they read what it decided
    if ready is not None or announce:
        m.addons.add(_Ready(ready, ("https" if served else "http") if announce else None))
    opts.update(mode=[mode_spec(upstream, listen)], connection_strategy="lazy", **trust)
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
    if trusted := tls.describe_trust(upstream, opts):
        (tls.logger.warning if opts.ssl_insecure else tls.logger.info)(trusted)
    # The policy last: it is checked against the options set above (a policy
    # with host rules needs keep_host_header=true).
    opts.update(authgate_policy=policy)
    if web is None:
        dispatch.use(m)  # each event's handlers looked up once (see dispatch.py)
    return m


def serve(
    policy: str,
    upstream: str,
    listen: str,
    sets: Sequence[str],
    on_ready: str | None = None,
    web: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    upstream_ca: str | None = None,
    tls_client_ca: str | None = None,
) -> int:
    """Run the gateway until SIGINT/SIGTERM; 2 when the policy or options are refused."""

    async def main() -> int:
        logging.getLogger().setLevel(logging.INFO)  # mitmproxy's termlog filters by verbosity
        if os.environ.get("AUTHGATE_SHARE_PORT") == "1":
            workers.share_port()  # a worker of `authgate run --workers N`

        def ready(port: int) -> None:
            if on_ready:
                print(on_ready, flush=True)

        try:
            m = await build(
                policy,
                upstream,
                listen,
                sets,
                ready=ready,
                web=web,
                tls_cert=tls_cert,
                tls_key=tls_key,
                upstream_ca=upstream_ca,
                tls_client_ca=tls_client_ca,
                # Of `--workers N`, the first says it for all.
                announce=os.environ.get("AUTHGATE_WORKER", "0") == "0",
            )
        except exceptions.OptionsError as e:
            print(str(e), file=sys.stderr)  # already "authgate: FILE:LINE: problem"
            return 2
        if web:
            print(f"authgate: mitmweb on {web_url(m, web)} (each flow shows its decision)",
                  flush=True)  # fmt: skip
        install_signals(m)
        await m.run()
        return 0

    return asyncio.run(main())


def web_url(m: master.Master, web: str) -> str:
    """The address to open mitmweb at: 12 wants its token (`?token=...`, random
    at each start unless `web_password` is set, then no token: type it), 11
    has no password."""
    url = getattr(m, "web_url", None)  # mitmproxy 12's WebMaster
    return url if isinstance(url, str) else f"http://{web}/"


# How long SIGTERM waits for requests in flight before the gateway exits.
GRACE_SECONDS = 25.0  # inside systemd's and Kubernetes' default 30 s stop timeout


def install_signals(m: master.Master, grace: float = GRACE_SECONDS) -> None:
    """SIGHUP reloads the policy; SIGTERM stops accepting connections, lets
    the requests in flight finish (at most `grace` seconds), then exits;
    SIGINT (or a second SIGTERM) exits at once."""
    loop = asyncio.get_running_loop()
    gateway = m.addons.get("gateway")
    tasks: set[asyncio.Task[None]] = set()

    def later(coro: Any) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def graceful() -> None:
        logging.getLogger("authgate").info(
            f"authgate: SIGTERM: no new connections; waiting up to {grace:g} s for "
            "requests in flight"
        )
        if gateway is not None:
            gateway.draining = True
        await m.addons.get("proxyserver").servers.update([])
        left = await gateway.drain(grace) if gateway is not None else 0
        if left:
            logging.getLogger("authgate").warning(
                f"authgate: {left} requests still in flight after {grace:g} s; exiting"
            )
        m.shutdown()

    def on_term() -> None:
        if gateway is not None and gateway.draining:
            m.shutdown()  # a second SIGTERM: now
        else:
            later(graceful())

    loop.add_signal_handler(signal.SIGINT, m.shutdown)
    loop.add_signal_handler(signal.SIGTERM, on_term)
    if gateway is not None:
        # Before the gateway runs, a reload has nothing to do: the policy
        # was just read.
        loop.add_signal_handler(signal.SIGHUP, lambda: gateway.house.reload_later("SIGHUP"))
