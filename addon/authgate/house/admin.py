"""The admin listener (`--admin HOST:PORT`, option `authgate_admin`): what a
load balancer, an orchestrator and Prometheus ask a gateway.

    /live     200 while the process serves at all
    /ready    200 when a policy is loaded, every issuer with remote keys has
              keys, and the gateway is not draining; 503 with the reasons else
    /metrics  Prometheus text (every worker's, with `--workers`)
    /status   JSON: policy, load time, last reload error, store, workers
    /bans     JSON: the watch's bans in force (GET); DELETE /bans/KEY lifts
              the ban on KEY (`ip:ADDRESS` or `sub:ISSUER:SUBJECT`,
              percent-encoded as a path segment): 200, or 404 when none

It runs in its own thread (a slow scraper never holds up the event loop) and
reads state through two callables, so the same server answers for one
gateway process (`authgate run`) and for the supervisor of several
(`authgate run --workers N`). Bound to loopback unless told otherwise: it
tells more than a client should know.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST

Status = Callable[[], dict[str, Any]]
Bans = Callable[[], list[dict[str, Any]]]
Lift = Callable[[str], str | None]  # the key as lifted (canonical), None: no ban on it
logger = logging.getLogger("authgate")


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...] = ()


def parse_address(text: str, option: str = "--admin") -> tuple[str, int]:
    """HOST:PORT (host defaults to 127.0.0.1; [v6] allowed). Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{option} must be HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class AdminServer:
    """The four endpoints over HTTP/1.1, in a daemon thread."""

    def __init__(
        self,
        address: str,
        status: Status,
        ready: Callable[[], Readiness],
        metrics: Callable[[], bytes],
        bans: Bans | None = None,
        lift: Lift | None = None,
    ) -> None:
        host, port = parse_address(address)
        handler = _handler(status, ready, metrics, bans, lift)
        self._server = (_Server6 if ":" in host else _Server)((host, port), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="authgate-admin", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _handler(
    status: Status,
    ready: Callable[[], Readiness],
    metrics: Callable[[], bytes],
    bans: Bans | None,
    lift: Lift | None,
) -> type[BaseHTTPRequestHandler]:
    class Admin(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "authgate-admin"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/live":
                self._send(200, b"live\n", "text/plain; charset=utf-8")
            elif path == "/ready":
                r = ready()
                body = {"ready": r.ready, "reasons": list(r.reasons)}
                self._json(200 if r.ready else 503, body)
            elif path == "/metrics":
                self._send(200, metrics(), CONTENT_TYPE_LATEST)
            elif path == "/status":
                self._json(200, status())
            elif path == "/bans" and bans is not None:
                self._json(200, {"bans": bans()})
            else:
                self._json(404, {"error": "not found", "paths": ADMIN_PATHS})

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def do_DELETE(self) -> None:  # noqa: N802
            # DELETE, not POST: a web page cannot send one across origins
            # without a CORS preflight, which this listener never allows.
            path = self.path.split("?", 1)[0]
            if not path.startswith("/bans/") or lift is None:
                self._json(405, {"error": "only DELETE /bans/KEY"}, allow="GET, HEAD")
                return
            length = self.headers.get("Content-Length", "0")
            if length.isdigit() and 0 < int(length) <= 65536:
                self.rfile.read(int(length))  # a body means nothing here
            elif length != "0" or self.headers.get("Transfer-Encoding"):
                self.close_connection = True  # not read: the connection cannot go on
            try:
                key = unquote(path[len("/bans/") :], errors="strict")
            except UnicodeDecodeError:
                key = ""
            if not key:
                self._json(400, {"error": "DELETE /bans/KEY, KEY as GET /bans lists it"})
                return
            try:
                lifted = lift(key)
            except Exception as e:  # noqa: BLE001 - any failure: say so, 503
                logger.error(f"authgate: admin: cannot lift the ban on {key!r}: {e}")
                self._json(503, {"error": f"cannot lift the ban: {e}"})
                return
            if lifted is not None:
                self._json(200, {"lifted": lifted})
            else:
                self._json(404, {"error": "no ban in force on this key", "key": key})

        def _json(self, code: int, body: Any, allow: str = "") -> None:
            data = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
            self._send(code, data, "application/json", allow)

        def _send(self, code: int, body: bytes, content_type: str, allow: str = "") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            if allow:
                self.send_header("Allow", allow)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # scrapes every few seconds would drown the decision log

    return Admin


ADMIN_PATHS = ["/live", "/ready", "/metrics", "/status", "/bans"]
