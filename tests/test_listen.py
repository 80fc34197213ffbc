"""Where the gateway listens (Hardening 2, item 8): a port alone is loopback,
every HOST:PORT option reads addresses the same way, and the gateway says at
start, in words, who can connect.

The real processes are checked from outside: a listener on 127.0.0.1 takes a
connection to 127.0.0.1 but not to 127.0.0.2 (loopback too, so a 0.0.0.0
listener would take it), and /proc/net/tcp{,6} shows every listening socket.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from authgate.cli import host_port, parser
from authgate.proxy.runner import mode_spec, where_listening
from conftest import EXAMPLE, ROOT
from test_startup import free_port, stop, wait_for_port

BIN = Path(sys.executable).parent
P = pytest.param

linux_only = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)"
)


# --- the options ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        P("28080", "127.0.0.1:28080", id="port-alone-is-loopback"),
        P(":28080", "127.0.0.1:28080", id="empty-host-is-loopback"),
        P(" 8080 ", "127.0.0.1:8080", id="spaces"),
        P("127.0.0.1:8080", "127.0.0.1:8080", id="loopback"),
        P("0.0.0.0:8080", "0.0.0.0:8080", id="every-ipv4-interface"),
        P("[::]:8080", "[::]:8080", id="every-ipv6-interface"),
        P("[::1]:8080", "[::1]:8080", id="ipv6-loopback"),
        P("10.1.2.3:8080", "10.1.2.3:8080", id="an-address"),
        P("gw.internal.example:8080", "gw.internal.example:8080", id="a-name"),
        P("localhost:0", "localhost:0", id="any-free-port"),
        P("08080", "127.0.0.1:8080", id="leading-zero"),
    ],
)
def test_host_port(text: str, expected: str) -> None:
    assert host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        P("", "expected HOST:PORT or a port, not ''", id="empty"),
        P("abc", "expected HOST:PORT or a port, not 'abc'", id="no-port"),
        P("host:", "expected HOST:PORT or a port, not 'host:'", id="empty-port"),
        P("65536", "expected HOST:PORT or a port, not '65536'", id="port-too-big"),
        P("\u0668080", "expected HOST:PORT or a port", id="non-ascii-digit"),
        P("::1:8080", "write an IPv6 address in brackets, as in [::1]:8080", id="bare-ipv6"),
        P("[10.0.0.1]:80", "[10.0.0.1] in '[10.0.0.1]:80' is not an IPv6 address", id="v4-in-[]"),
        P("*:8080", "(every interface: 0.0.0.0:8080 or [::]:8080)", id="star"),
        P("a b:80", "'a b' in 'a b:80' is not a host name or address", id="space-in-host"),
    ],
)
def test_host_port_rejects(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as e:
        host_port(text)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("argv", "dest", "expected"),
    [
        P(["run", "--policy", "p", "--upstream", "http://u"], "listen", "127.0.0.1:8080",
          id="run-default"),
        P(["run", "--policy", "p", "--upstream", "http://u", "--listen", "28080"], "listen",
          "127.0.0.1:28080", id="run-listen"),
        P(["run", "--policy", "p", "--upstream", "http://u", "--admin", "9901"], "admin",
          "127.0.0.1:9901", id="run-admin"),
        P(["run", "--policy", "p", "--upstream", "http://u", "--web-listen", "8081"],
          "web_listen", "127.0.0.1:8081", id="run-web-listen"),
        P(["demo", "--listen", "18080"], "listen", "127.0.0.1:18080", id="demo-listen"),
        P(["demo", "--backend", "19000"], "backend", "127.0.0.1:19000", id="demo-backend"),
        P(["demo", "--idp", "18999"], "idp", "127.0.0.1:18999", id="demo-idp"),
        P(["demo", "--idp"], "idp", "127.0.0.1:8999", id="demo-idp-default"),
        P(["check", "--listen", "8080", "p"], "listen", "127.0.0.1:8080", id="check-port"),
        P(["check", "--listen", "https://gw.example:443", "p"], "listen",
          "https://gw.example:443", id="check-url"),
    ],
)  # fmt: skip
def test_every_host_port_option_reads_a_port_alone_as_loopback(
    argv: list[str], dest: str, expected: str
) -> None:
    assert getattr(parser().parse_args(argv), dest) == expected


@pytest.mark.parametrize(
    ("listen", "spec"),
    [
        P("127.0.0.1:8080", "reverse:http://b@127.0.0.1:8080", id="as-given"),
        P("8080", "reverse:http://b@127.0.0.1:8080", id="port-alone"),
        P("[::]:8080", "reverse:http://b@:::8080", id="ipv6-unbracketed"),
        P("0.0.0.0:8080", "reverse:http://b@0.0.0.0:8080", id="every-ipv4-interface"),
    ],
)
def test_mode_spec_never_leaves_the_host_to_mitmproxy(listen: str, spec: str) -> None:
    assert mode_spec("http://b", listen) == spec


@pytest.mark.parametrize(
    ("scheme", "addrs", "said"),
    [
        P("http", [("127.0.0.1", 28080)],
          "authgate: listening on http://127.0.0.1:28080 (loopback only; --listen "
          "0.0.0.0:28080 takes other machines' requests too)", id="loopback"),
        P("https", [("127.0.0.1", 8443), ("::1", 8443, 0, 0)],
          "authgate: listening on https://127.0.0.1:8443 and https://[::1]:8443 (loopback "
          "only; --listen 0.0.0.0:8443 takes other machines' requests too)", id="localhost"),
        P("http", [("0.0.0.0", 8080)],
          "authgate: listening on http://0.0.0.0:8080 (every IPv4 interface, reachable from "
          "other machines)", id="every-ipv4-interface"),
        P("http", [("0.0.0.0", 8080), ("::", 8080, 0, 0)],
          "authgate: listening on http://0.0.0.0:8080 and http://[::]:8080 (every IPv4 "
          "interface, every IPv6 interface, reachable from other machines)", id="both"),
        P("http", [("10.1.2.3", 8080)],
          "authgate: listening on http://10.1.2.3:8080 (reachable from other machines)",
          id="an-address"),
    ],
)  # fmt: skip
def test_where_listening(scheme: str, addrs: list[tuple[object, ...]], said: str) -> None:
    assert where_listening(scheme, addrs) == said


# --- real processes -------------------------------------------------------------------


def listening_on(port: int) -> set[str]:
    """The local addresses of the listening TCP sockets on `port`, from /proc."""
    found: set[str] = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hexport = local.partition(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc writes each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def start(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "authgate"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )


@linux_only
def test_run_with_a_port_alone_listens_on_loopback_only_and_says_so() -> None:
    port, admin = free_port(), free_port()
    proc = start("run", "--policy", str(EXAMPLE), "--upstream", "http://127.0.0.1:9",
                 "--listen", str(port), "--admin", str(admin))  # fmt: skip
    try:
        wait_for_port(port, proc)
        wait_for_port(admin, proc)
        assert listening_on(port) == {"127.0.0.1"}
        assert listening_on(admin) == {"127.0.0.1"}
        assert not accepts("127.0.0.2", port)  # a 0.0.0.0 listener would take it
        assert not accepts("127.0.0.2", admin)
    finally:
        out = stop(proc)
    assert (
        f"authgate: listening on http://127.0.0.1:{port} (loopback only; --listen "
        f"0.0.0.0:{port} takes other machines' requests too)"
    ) in out, out
    assert f"authgate: admin on http://127.0.0.1:{admin} " in out


@linux_only
def test_the_demo_with_ports_alone_listens_on_loopback_only() -> None:
    port, backend = free_port(), free_port()
    proc = start("demo", "--listen", str(port), "--backend", str(backend))
    try:
        wait_for_port(port, proc)
        wait_for_port(backend, proc)
        assert listening_on(port) == {"127.0.0.1"}
        assert listening_on(backend) == {"127.0.0.1"}
        assert not accepts("127.0.0.2", port)
    finally:
        out = stop(proc)
    assert f"authgate: listening on http://127.0.0.1:{port} (loopback only;" in out, out
    assert f"authgate demo: gateway on http://127.0.0.1:{port}," in out


@linux_only
def test_every_interface_takes_an_address_and_is_said_in_words() -> None:
    port = free_port()
    proc = start("run", "--policy", str(EXAMPLE), "--upstream", "http://127.0.0.1:9",
                 "--listen", f"0.0.0.0:{port}")  # fmt: skip
    try:
        wait_for_port(port, proc)
        assert listening_on(port) == {"0.0.0.0"}
        assert accepts("127.0.0.2", port)
    finally:
        out = stop(proc)
    assert (
        f"authgate: listening on http://0.0.0.0:{port} (every IPv4 interface, reachable from "
        "other machines)"
    ) in out, out
