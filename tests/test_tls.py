"""`authgate run --tls-cert/--tls-key` and a verified https:// upstream.

A throwaway CA made with `cryptography` signs the gateway's and the backend's
certificates; real `authgate run` processes; clients that verify against that
CA, over HTTP/1.1 (http.client) and HTTP/2 (h2 over ALPN).
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path

import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from authgate.proxy.tls import CertError, CertPair, parse_pair, validity_warning
from conftest import EXAMPLE, POLICIES, REQUEST_SECONDS, ROOT, Backend, _handler, wait_until
from test_startup import authgate_run as run_cmd
from test_startup import free_port, start_logged, stop, wait_for_port, wait_for_text, wait_started

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)

# --- a throwaway PKI ------------------------------------------------------------


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "authgate test CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(
    ca: Issued,
    cn: str,
    serial: int,
    not_before: datetime.datetime = NOW - DAY,
    not_after: datetime.datetime = NOW + 365 * DAY,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(key, cert)


def write_pair(directory: Path, issued: Issued, stem: str = "server") -> tuple[Path, Path]:
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    return cert, key


# --- unit: the pair checks, as a table ------------------------------------------

CA = make_ca()
LEAF = issue(CA, "gateway.test", 1)
OTHER = issue(CA, "other.test", 2)


@pytest.mark.parametrize(
    "cert_pem,key_pem,problem",
    [
        (b"", LEAF.key_pem(), "--tls-cert c.pem: no PEM certificate in it"),
        (LEAF.key_pem(), LEAF.key_pem(), "--tls-cert c.pem: no PEM certificate in it"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            LEAF.key_pem(),
            "--tls-cert c.pem: not a valid PEM certificate",
        ),
        (LEAF.cert_pem(), b"", "--tls-key k.pem: no PEM private key in it"),
        (LEAF.cert_pem(), LEAF.cert_pem(), "--tls-key k.pem: no PEM private key in it"),
        (
            LEAF.cert_pem(),
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
            "--tls-key k.pem: not a valid PEM private key",
        ),
        (
            LEAF.cert_pem(),
            OTHER.key_pem(),
            "--tls-key k.pem: does not match the certificate in c.pem",
        ),
        (
            LEAF.cert_pem(),
            LEAF.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            "--tls-key k.pem: the key is encrypted",
        ),
    ],
)
def test_bad_pairs_are_refused_naming_the_file(
    cert_pem: bytes, key_pem: bytes, problem: str
) -> None:
    with pytest.raises(CertError, match="^authgate: " + problem.replace(".", r"\.")):
        parse_pair("c.pem", cert_pem, "k.pem", key_pem)


def test_a_good_pair_keeps_the_chain_then_the_key() -> None:
    pair = parse_pair("c.pem", LEAF.cert_pem() + CA.cert_pem(), "k.pem", LEAF.key_pem())
    certs = x509.load_pem_x509_certificates(pair.pem)
    assert [c.serial_number for c in certs] == [1, CA.cert.serial_number]
    key = serialization.load_pem_private_key(pair.pem, password=None)
    assert key.public_key() == LEAF.cert.public_key()
    assert (pair.subject, pair.serial) == ("CN=gateway.test", 1)


def _pair(not_before: datetime.datetime, not_after: datetime.datetime) -> CertPair:
    return CertPair("c.pem", "k.pem", b"", "CN=x", 1, not_before, not_after)


@pytest.mark.parametrize(
    "not_before,not_after,warning",
    [
        (NOW - DAY, NOW + 100 * DAY, None),
        (NOW - DAY, NOW + 15 * DAY, None),
        (NOW - DAY, NOW + 5 * DAY + datetime.timedelta(hours=1), "expires on .* \\(in 5 days\\)"),
        (NOW - 10 * DAY, NOW - DAY, "expired on"),
        (NOW + DAY, NOW + 100 * DAY, "is not valid before"),
    ],
)
def test_validity_warnings(
    not_before: datetime.datetime, not_after: datetime.datetime, warning: str | None
) -> None:
    said = validity_warning(_pair(not_before, not_after), NOW)
    if warning is None:
        assert said is None
    else:
        assert said is not None and said.startswith("authgate: --tls-cert c.pem ")
        assert re.search(warning, said), said


# --- real gateways ----------------------------------------------------------------


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    port: int
    ca: Issued

    def context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca.cert_pem().decode())
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(
            "localhost", self.port, context=self.context(["http/1.1"]), timeout=REQUEST_SECONDS
        )
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def peer_cert(self) -> x509.Certificate:
        with socket.create_connection(("127.0.0.1", self.port), timeout=REQUEST_SECONDS) as raw:
            with self.context().wrap_socket(raw, server_hostname="localhost") as s:
                der = s.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def start(cmd: list[str], log: Path | None = None) -> subprocess.Popen[str]:
    """`cmd` running; its output read at stop(), or written as it comes to `log`."""
    if log is not None:
        return start_logged(cmd, log)
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )


def start_tls(
    backend: Backend, cert: Path, key: Path, ca: Issued, log: Path | None = None
) -> Gateway:
    """`authgate run --tls-cert CERT --tls-key KEY` with the example policy, listening."""
    port = free_port()
    proc = start(
        run_cmd(EXAMPLE, backend.url, port, "--tls-cert", str(cert), "--tls-key", str(key)), log
    )
    try:
        wait_for_port(port, proc)
    except BaseException:
        stop(proc)
        raise
    return Gateway(proc, port, ca)


@pytest.fixture
def tls_gateway(tmp_path: Path, backend: Backend) -> Iterator[Gateway]:
    """`authgate run --tls-cert --tls-key` in front of the recording backend."""
    ca = make_ca()
    cert, key = write_pair(tmp_path, issue(ca, "gateway-one.test", 1001))
    gw = start_tls(backend, cert, key, ca)
    try:
        yield gw
    finally:
        stop(gw.proc)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_https_http1_denies_without_and_forwards_with_a_token(
    tls_gateway: Gateway, backend: Backend, token: Callable[..., str]
) -> None:
    status, _ = tls_gateway.get("/api/profile")
    assert status == 401
    assert backend.seen == []
    status, body = tls_gateway.get("/api/profile", bearer(token(sub="alice", roles=["user"])))
    assert status == 200
    assert json.loads(body) == {"path": "/api/profile"}
    assert [s.header("X-Auth-Subject") for s in backend.seen] == ["alice"]
    assert tls_gateway.peer_cert().serial_number == 1001


def h2_get(gw: Gateway, path: str, headers: dict[str, str]) -> tuple[str | None, int]:
    """One HTTP/2 request over TLS with ALPN: (negotiated protocol, status)."""
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=REQUEST_SECONDS)
    with gw.context(["h2", "http/1.1"]).wrap_socket(raw, server_hostname="localhost") as s:
        proto = s.selected_alpn_protocol()
        if proto != "h2":
            return proto, 0
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        request = [(":method", "GET"), (":path", path), (":scheme", "https")]
        request += [(":authority", f"localhost:{gw.port}"), *headers.items()]
        conn.send_headers(sid, request, end_stream=True)
        s.sendall(conn.data_to_send())
        status = 0
        ended = False
        while not ended:
            data = s.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    status = int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    ended = event.stream_id == sid
            s.sendall(conn.data_to_send())
        return proto, status


def test_http2_over_alpn(tls_gateway: Gateway, backend: Backend, token: Callable[..., str]) -> None:
    assert h2_get(tls_gateway, "/api/profile", {}) == ("h2", 401)
    assert backend.seen == []
    user = token(sub="alice", roles=["user"])
    assert h2_get(tls_gateway, "/api/profile", bearer(user)) == ("h2", 200)
    assert [s.header("X-Auth-Subject") for s in backend.seen] == ["alice"]


def test_plain_http_on_the_tls_port_is_refused(tls_gateway: Gateway, backend: Backend) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", tls_gateway.port, timeout=REQUEST_SECONDS)
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert (r.status, r.read()) == (400, b"This port takes HTTPS only.\n")
    conn.close()
    assert backend.seen == []
    assert tls_gateway.get("/health")[0] == 200  # and HTTPS is served


def test_certificate_reload_on_change(tmp_path: Path, backend: Backend) -> None:
    ca = make_ca()
    cert, key = write_pair(tmp_path, issue(ca, "first.test", 111))
    log = tmp_path / "gateway.out"
    gw = start_tls(backend, cert, key, ca, log)
    proc = gw.proc
    try:
        assert gw.peer_cert().serial_number == 111
        # A bad pair (a key that does not match) is refused; the old one serves.
        key.write_bytes(issue(ca, "stray.test", 5).key_pem())
        wait_for_text(log, f"--tls-key {key}: does not match the certificate in {cert}", proc)
        assert gw.peer_cert().serial_number == 111
        write_pair(tmp_path, issue(ca, "second.test", 222))
        wait_until(lambda: gw.peer_cert().serial_number == 222, every=0.2, what="serial 222")
        seen = gw.peer_cert()
        assert seen.serial_number == 222
        assert seen.subject == _name("second.test")
        assert gw.get("/health")[0] == 200
    finally:
        stop(proc)
    out = log.read_text()
    assert "reload refused, the old one keeps serving" in out
    assert f"--tls-key {key}: does not match the certificate in {cert}" in out
    assert "TLS certificate reloaded: CN=second.test (serial de," in out


@pytest.mark.parametrize("with_tls", [False, True])
def test_the_in_clear_warning_only_without_tls(
    with_tls: bool, tmp_path: Path, backend: Backend
) -> None:
    # Basic credentials on a listener beyond loopback: in clear unless TLS.
    cert, key = write_pair(tmp_path, LEAF)
    port = free_port()
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)] if with_tls else []
    cmd = run_cmd(POLICIES / "basic-auth.yaml", backend.url, port, *tls)
    cmd[cmd.index("--listen") + 1] = f"0.0.0.0:{port}"
    log = tmp_path / "gateway.out"
    proc = start(cmd, log)
    try:
        # The warning comes with the start-up hooks, after the port listens.
        wait_started(log, proc, port)
    finally:
        stop(proc)
    out = log.read_text()
    assert ("cross the network in clear text" in out) is not with_tls, out


@pytest.mark.parametrize(
    "cert_pem,key_pem,message",
    [
        (None, LEAF.key_pem(), "--tls-cert {cert}: cannot read it: No such file or directory"),
        (b"hello", LEAF.key_pem(), "--tls-cert {cert}: no PEM certificate in it"),
        (
            LEAF.cert_pem(),
            OTHER.key_pem(),
            "--tls-key {key}: does not match the certificate in {cert}",
        ),
    ],
)
def test_a_bad_pair_at_start_exits_2_naming_the_file(
    tmp_path: Path, backend: Backend, cert_pem: bytes | None, key_pem: bytes, message: str
) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    if cert_pem is not None:
        cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    cmd = run_cmd(EXAMPLE, backend.url, free_port(), "--tls-cert", str(cert), "--tls-key", str(key))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "authgate: " + message.format(cert=cert, key=key) in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize("given", ["--tls-cert", "--tls-key"])
def test_half_a_pair_is_refused(given: str, backend: Backend) -> None:
    cmd = run_cmd(EXAMPLE, backend.url, free_port(), given, "x.pem")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    missing = ({"--tls-cert", "--tls-key"} - {given}).pop()
    assert done.returncode == 2
    assert f"authgate run: {given} needs {missing} too" in done.stderr


# --- an https:// upstream ------------------------------------------------------------


@pytest.fixture
def https_backend(tmp_path: Path) -> Iterator[tuple[Backend, Path]]:
    """A recording backend over TLS, its certificate from a throwaway CA (whose
    PEM file is returned): the system store does not know it."""
    ca = make_ca("backend CA")
    cert, key = write_pair(tmp_path, issue(ca, "backend.test", 77), "backend")
    ca_file = tmp_path / "backend-ca.pem"
    ca_file.write_bytes(ca.cert_pem())
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    b = Backend(server)
    server.RequestHandlerClass = _handler(b)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield b, ca_file
    server.shutdown()
    server.server_close()


def _plain_get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_SECONDS)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_https_upstream_unknown_ca_is_502_never_forwarded(
    https_backend: tuple[Backend, Path],
) -> None:
    backend, _ = https_backend
    upstream = f"https://127.0.0.1:{backend.server.server_address[1]}"
    port = free_port()
    proc = start(run_cmd(EXAMPLE, upstream, port))
    try:
        wait_for_port(port, proc)
        assert _plain_get(port, "/health") == 502
        assert backend.seen == []
    finally:
        out = stop(proc)
    assert f"verifying {upstream} against {ssl.get_default_verify_paths().cafile}" in out


def test_https_upstream_with_upstream_ca_is_verified_and_forwarded(
    https_backend: tuple[Backend, Path],
) -> None:
    backend, ca_file = https_backend
    upstream = f"https://127.0.0.1:{backend.server.server_address[1]}"
    port = free_port()
    proc = start(run_cmd(EXAMPLE, upstream, port, "--upstream-ca", str(ca_file)))
    try:
        wait_for_port(port, proc)
        assert _plain_get(port, "/health") == 200
        assert [s.target for s in backend.seen] == ["/health"]
    finally:
        out = stop(proc)
    assert f"verifying {upstream} against {ca_file}" in out


def test_ssl_insecure_is_loud(https_backend: tuple[Backend, Path]) -> None:
    backend, _ = https_backend
    upstream = f"https://127.0.0.1:{backend.server.server_address[1]}"
    port = free_port()
    proc = start(run_cmd(EXAMPLE, upstream, port, "--set", "ssl_insecure=true"))
    try:
        wait_for_port(port, proc)
        assert _plain_get(port, "/health") == 200  # what the operator asked for
    finally:
        out = stop(proc)
    assert f"WARNING: ssl_insecure is set: the certificate of {upstream} is NOT verified" in out


def test_upstream_ca_needs_an_https_upstream(backend: Backend, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(CA.cert_pem())
    cmd = run_cmd(EXAMPLE, backend.url, free_port(), "--upstream-ca", str(ca_file))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert f"--upstream-ca {ca_file}: needs an https:// --upstream" in done.stderr


def test_combined_file_is_private_and_removed(tmp_path: Path, backend: Backend) -> None:
    tmp = Path(tempfile.gettempdir())

    def combined() -> set[str]:
        return {p for p in os.listdir(tmp) if p.startswith("authgate-tls-")}

    before = combined()
    cert, key = write_pair(tmp_path, LEAF)
    port = free_port()
    proc = start(
        run_cmd(EXAMPLE, backend.url, port, "--tls-cert", str(cert), "--tls-key", str(key))
    )
    try:
        wait_for_port(port, proc)
        new = combined() - before
        assert len(new) == 1
        assert (tmp / new.pop()).stat().st_mode & 0o777 == 0o600
    finally:
        stop(proc)
    assert combined() <= before
