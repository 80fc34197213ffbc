"""Ports for the servers the tests start.

A port the kernel hands out with bind(("127.0.0.1", 0)) comes from the
ephemeral range (ip_local_port_range, 32768-60999 on Linux), the same range it
takes every outgoing connection's local port from. Between the test picking
such a port and the server it starts binding it (a second or so for a gateway),
any connection on the machine (pip, the provider, another test's client) may
take it: "address already in use", now and then. So the tests take ports below
that range, which outgoing connections never use, free on every address when
picked, and never the same one twice in a session.
"""

from __future__ import annotations

import errno
import random
import socket

LOW, HIGH = 20000, 32767  # below the ephemeral range
_given: set[int] = set()
_pick = random.Random()  # not the tests' seeded random: ports must differ per run


def free_port() -> int:
    """A TCP port nothing listens on or connects from, on any address."""
    for _ in range(1000):
        port = _pick.randint(LOW, HIGH)
        if port in _given:
            continue
        if not (_free(socket.AF_INET, "0.0.0.0", port) and _free(socket.AF_INET6, "::", port)):
            continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port between {LOW} and {HIGH}")


def _free(family: socket.AddressFamily, address: str, port: int) -> bool:
    """Whether `port` binds on `address` (a machine without IPv6: as if free)."""
    try:
        with socket.socket(family) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((address, port))
    except OSError as e:
        return e.errno not in (errno.EADDRINUSE, errno.EACCES)
    return True
