"""Client certificates (mutual TLS) as a credential: `authn.mtls`, `--tls-client-ca`.

The test session makes its PKI with `openssl` in a temporary directory: a
client CA, a server CA (whose certificate is in the gateway's serving chain),
and client certificates (a valid one, one pinned by fingerprint, one without a
DNS name, one from another CA, an expired one, one for servers only, one the
server CA issued). Real `authgate run --tls-cert --tls-key --tls-client-ca`
gateways stand in front of a recording backend; clients are `curl --cert` and
Python's `ssl` (http.client with load_cert_chain). Every denial asserts that
the backend saw nothing.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import http.client
import re
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import exceptions

from authgate.core.clientcert import ClientCert, normalize_fingerprint, read, sf_binary
from authgate.core.credentials import MTLS, CertClient, ClientCerts, hash_key
from authgate.core.decision import RequestView, judge
from authgate.core.identity import Identity
from authgate.policy.load import parse_policy
from authgate.policy.marks import PolicyError
from authgate.proxy import runner, tls, views
from authgate.runtime.stores import MemoryStore
from authgate.tools.policytests import run_policy
from conftest import REQUEST_SECONDS, ROOT, Backend, recording_server, wait_until
from test_startup import BIN, authgate_run, free_port, start_logged, stop, wait_started

# --- the PKI, made with openssl ---------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, stem: str, cn: str) -> None:
    _openssl(
        d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{stem}.key", "-out", f"{stem}.crt", "-days", "30", "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _leaf(d: Path, stem: str, subject: str, ca: str, ext: str) -> None:
    (d / f"{stem}.ext").write_text(ext)
    _openssl(
        d, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", subject,
    )  # fmt: skip
    _openssl(
        d, "x509", "-req", "-in", f"{stem}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{stem}.crt", "-days", "30", "-extfile", f"{stem}.ext",
    )  # fmt: skip


def _expired(d: Path, stem: str, ca: str, ext: str) -> None:
    """Valid in January 2020 only (`openssl ca` takes both dates)."""
    (d / "db").mkdir()
    (d / "db" / "index.txt").write_text("")
    (d / "db" / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = t\n[t]\ndatabase = db/index.txt\nserial = db/serial\n"
        "new_certs_dir = db\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n"
    )
    (d / f"{stem}.ext").write_text(ext)
    _openssl(
        d, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", "/CN=expired",
    )  # fmt: skip
    _openssl(
        d, "ca", "-batch", "-config", "ca.cnf", "-cert", f"{ca}.crt", "-keyfile", f"{ca}.key",
        "-in", f"{stem}.csr", "-out", f"{stem}.crt", "-notext", "-extfile", f"{stem}.ext",
        "-startdate", "20200101000000Z", "-enddate", "20200201000000Z",
    )  # fmt: skip


CLIENT = "extendedKeyUsage=clientAuth\n"
BILLING_SAN = (
    "subjectAltName=DNS:billing.internal,URI:spiffe://example.org/billing,"
    "email:billing@example.org\n"
)


@dataclass(frozen=True)
class Pki:
    dir: Path

    def path(self, stem: str, ext: str = "crt") -> Path:
        return self.dir / f"{stem}.{ext}"

    def der(self, stem: str) -> bytes:
        cert = x509.load_pem_x509_certificate(self.path(stem).read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)

    def sha256(self, stem: str) -> str:
        return hashlib.sha256(self.der(stem)).hexdigest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "client-ca", "authgate test client CA")
    _ca(d, "server-ca", "authgate test server CA")
    _ca(d, "other-ca", "somebody else's CA")
    _leaf(d, "server", "/CN=localhost", "server-ca",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    (d / "server-chain.crt").write_bytes((d / "server.crt").read_bytes()
                                         + (d / "server-ca.crt").read_bytes())  # fmt: skip
    _leaf(d, "billing", "/O=Example/CN=billing", "client-ca", BILLING_SAN + CLIENT)
    _leaf(d, "reports", "/CN=reports", "client-ca",
          "subjectAltName=DNS:reports.internal\n" + CLIENT)  # fmt: skip
    _leaf(d, "nameless", "/CN=nameless", "client-ca", CLIENT)  # no SAN at all
    _leaf(d, "stranger", "/CN=stranger", "other-ca", BILLING_SAN + CLIENT)
    _leaf(d, "server-only", "/CN=server-only", "client-ca",
          BILLING_SAN + "extendedKeyUsage=serverAuth\n")  # fmt: skip
    # Issued by the CA of the gateway's own serving chain, which mitmproxy puts
    # in each connection's trust store: it must not pass as a client.
    _leaf(d, "intruder", "/CN=intruder", "server-ca", BILLING_SAN + CLIENT)
    _expired(d, "expired", "client-ca", BILLING_SAN + CLIENT)
    return Pki(d)


# --- the gateway's policy and a recording backend ---------------------------------------

OPS_KEY = "ops-secret-key-0123456789"


def policy_text(pki: Pki, required: bool) -> str:
    return f"""\
version: 1
authn:
  api_keys:
    keys:
      - {{name: ops-key, sha256: {hash_key(OPS_KEY)}, roles: [ops]}}
  mtls:
    required: {str(required).lower()}
    name_from: san_dns
    forward_certificate: true
    clients:
      - name: billing.internal
        roles: [billing]
        scopes: [invoices:read]
      - sha256: "{pki.sha256("reports").upper()}"
        name: reports-batch
        roles: [reports]
rules:
  - name: health
    match: {{path: /health}}
    accept: []
    allow: anyone
  - name: billing
    match: {{path: "/billing/**"}}
    accept: [mtls]
    allow: {{role: billing}}
  - name: reports
    match: {{path: "/reports/**"}}
    accept: [mtls, api_key]
    allow: {{any: [{{role: reports}}, {{role: ops}}]}}
  - name: spiffe
    match: {{path: "/spiffe/**"}}
    accept: [mtls]
    allow: {{claim: cert.san_uri, contains: "spiffe://example.org/billing"}}
  - name: signed-in
    match: {{path: "/any/**"}}
    accept: [mtls]
    allow: authenticated
"""


@pytest.fixture(scope="module")
def recorder() -> Iterator[Backend]:
    with recording_server() as backend:
        yield backend


@dataclass
class Gate:
    port: int
    pki: Pki
    backend: Backend
    log: Path


def _start(pki: Pki, backend: Backend, required: bool, tmp: Path) -> Iterator[Gate]:
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text(pki, required))
    port = free_port()
    log = tmp / "gateway.out"
    cmd = authgate_run(
        policy, backend.url, port,
        "--tls-cert", str(pki.path("server-chain")), "--tls-key", str(pki.path("server", "key")),
        "--tls-client-ca", str(pki.path("client-ca")),
    )  # fmt: skip
    proc = start_logged(cmd, log)
    try:
        wait_started(log, proc, port)
        yield Gate(port, pki, backend, log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def optional_gate(
    pki: Pki, recorder: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gate]:
    yield from _start(pki, recorder, False, tmp_path_factory.mktemp("optional"))


@pytest.fixture(scope="module")
def required_gate(
    pki: Pki, recorder: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gate]:
    yield from _start(pki, recorder, True, tmp_path_factory.mktemp("required"))


@pytest.fixture
def gate(optional_gate: Gate) -> Gate:
    optional_gate.backend.clear()
    return optional_gate


# --- the clients ---------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def py_get(
    g: Gate, path: str, cert: str | None = None, headers: dict[str, str] | None = None
) -> Answer:
    """Python's ssl: http.client over an SSLContext with load_cert_chain."""
    context = ssl.create_default_context(cafile=str(g.pki.path("server-ca")))
    if cert is not None:
        context.load_cert_chain(g.pki.path(cert), g.pki.path(cert, "key"))
    conn = http.client.HTTPSConnection(
        "localhost", g.port, context=context, timeout=REQUEST_SECONDS
    )
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        r.read()
        return Answer(r.status, r.getheaders())
    finally:
        conn.close()


def curl_get(
    g: Gate, path: str, cert: str | None = None, headers: dict[str, str] | None = None
) -> Answer:
    """`curl --cert` (HTTP/2 over ALPN, as curl does by default)."""
    cmd = ["curl", "-sS", "--cacert", str(g.pki.path("server-ca")), "-D", "-", "-o", "/dev/null"]
    if cert is not None:
        cmd += ["--cert", str(g.pki.path(cert)), "--key", str(g.pki.path(cert, "key"))]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run(
        [*cmd, f"https://localhost:{g.port}{path}"],
        capture_output=True, text=True, timeout=REQUEST_SECONDS, check=True,
    ).stdout  # fmt: skip
    status_line, *lines = [line for line in out.splitlines() if line]
    parsed = [tuple(line.split(": ", 1)) for line in lines if ": " in line]
    return Answer(int(status_line.split()[1]), [(k, v) for k, v in parsed])


CLIENTS = {"python-ssl": py_get, "curl": curl_get}


# --- real gateways: the certificate as a credential -------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_a_valid_certificate_reaches_the_backend_as_its_holder(gate: Gate, client: str) -> None:
    forged = {"Client-Cert": ":Zm9yZ2Vk:", "Client_Cert": ":Zm9yZ2Vk:",
              "X-Forwarded-Client-Cert": "Hash=1;Subject=\"CN=root\""}  # fmt: skip
    answer = CLIENTS[client](gate, "/billing/invoices", "billing", forged)
    assert answer.status == 200
    (seen,) = gate.backend.seen
    assert seen.target == "/billing/invoices"
    assert seen.header("X-Auth-Subject") == "billing.internal"
    assert seen.header("X-Auth-Roles") == "billing"
    assert seen.header("X-Auth-Scopes") == "invoices:read"
    assert seen.header("X-Auth-Issuer") == "mtls"
    # RFC 9440: the certificate and the chain that verified it, the client's
    # own fields gone (in any spelling).
    assert seen.header_all("Client-Cert") == [sf_binary(gate.pki.der("billing"))]
    assert seen.header_all("Client-Cert-Chain") == [sf_binary(gate.pki.der("client-ca"))]
    assert seen.header_all("Client_Cert") == []
    assert seen.header_all("X-Forwarded-Client-Cert") == []


@pytest.mark.parametrize("client", CLIENTS)
def test_no_certificate_where_one_is_needed_is_a_401_with_a_challenge(
    gate: Gate, client: str
) -> None:
    answer = CLIENTS[client](gate, "/billing/invoices")
    assert answer.status == 401
    assert answer.header("WWW-Authenticate") == 'ClientCert realm="api"'
    assert gate.backend.seen == []
    # Optional: a rule that reads no certificate serves without one.
    assert CLIENTS[client](gate, "/health").status == 200
    assert [s.target for s in gate.backend.seen] == ["/health"]


@pytest.mark.parametrize(
    "cert,client",
    [
        ("stranger", "python-ssl"),  # another CA
        ("expired", "curl"),
        ("expired", "python-ssl"),
        ("server-only", "python-ssl"),  # no clientAuth in its extended key usage
        ("intruder", "curl"),  # issued by the serving chain's CA, not the client CA
        ("nameless", "python-ssl"),  # valid, but names nobody by DNS name
    ],
)
def test_a_certificate_that_names_nobody_is_a_401_and_reaches_nothing(
    gate: Gate, cert: str, client: str
) -> None:
    answer = CLIENTS[client](gate, "/any/thing", cert)
    assert answer.status == 401
    assert answer.header("WWW-Authenticate") == 'ClientCert realm="api"'
    assert gate.backend.seen == []
    # Where no rule reads certificates, the request goes on without one.
    assert CLIENTS[client](gate, "/health", cert).status == 200
    assert [s.header("X-Auth-Subject") for s in gate.backend.seen] == [None]


def test_why_a_certificate_did_not_verify_is_logged(gate: Gate) -> None:
    assert py_get(gate, "/any/x", "intruder").status == 401
    assert py_get(gate, "/any/x", "expired").status == 401
    said = [
        "(untrusted: its chain does not pass through --tls-client-ca): 'CN=intruder', "
        "issuer 'CN=authgate test server CA'",
        "(expired: OpenSSL verify error 10): 'CN=expired', issuer 'CN=authgate test client CA'",
    ]
    wait_until(lambda: all(line in gate.log.read_text() for line in said), what=said)


def test_a_pinned_fingerprint_names_its_holder(gate: Gate) -> None:
    assert py_get(gate, "/reports/daily", "reports").status == 200
    (seen,) = gate.backend.seen
    assert (seen.header("X-Auth-Subject"), seen.header("X-Auth-Roles")) == (
        "reports-batch",
        "reports",
    )
    # The billing certificate is valid but lacks the role: known, refused.
    assert py_get(gate, "/reports/daily", "billing").status == 403
    assert len(gate.backend.seen) == 1


def test_conditions_on_the_certificates_fields(gate: Gate) -> None:
    assert curl_get(gate, "/spiffe/x", "billing").status == 200
    assert curl_get(gate, "/spiffe/x", "reports").status == 403  # no such URI name
    assert [s.target for s in gate.backend.seen] == ["/spiffe/x"]


def test_a_credential_in_the_request_wins_over_the_connections_certificate(gate: Gate) -> None:
    answer = py_get(gate, "/reports/x", "billing", {"X-API-Key": OPS_KEY})
    assert answer.status == 200
    assert [s.header("X-Auth-Subject") for s in gate.backend.seen] == ["ops-key"]
    # ... and a wrong one is not rescued by the certificate.
    assert py_get(gate, "/reports/x", "reports", {"X-API-Key": "wrong"}).status == 401
    assert len(gate.backend.seen) == 1


@pytest.fixture
def required(required_gate: Gate) -> Gate:
    required_gate.backend.clear()
    return required_gate


@pytest.mark.parametrize("client", CLIENTS)
def test_required_without_a_valid_certificate_nothing_is_served(
    required: Gate, client: str
) -> None:
    get = CLIENTS[client]
    for path, cert in [("/health", None), ("/nowhere", None), ("/health", "expired"),
                       ("/health", "intruder")]:  # fmt: skip
        answer = get(required, path, cert)
        assert (path, cert, answer.status) == (path, cert, 401)
        assert answer.header("WWW-Authenticate") == 'ClientCert realm="api"'
    assert required.backend.seen == []
    assert get(required, "/health", "billing").status == 200
    assert get(required, "/nowhere", "billing").status == 404  # past the gate: the rules
    assert get(required, "/billing/x", "nameless").status == 401  # valid, names nobody
    assert [s.target for s in required.backend.seen] == ["/health"]


def test_a_new_client_ca_file_is_used_for_new_connections(
    pki: Pki, recorder: Backend, tmp_path: Path
) -> None:
    ca_file = tmp_path / "clients-ca.crt"
    ca_file.write_bytes(pki.path("client-ca").read_bytes())
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(pki, False))
    port = free_port()
    log = tmp_path / "gateway.out"
    cmd = authgate_run(
        policy, recorder.url, port,
        "--tls-cert", str(pki.path("server-chain")), "--tls-key", str(pki.path("server", "key")),
        "--tls-client-ca", str(ca_file),
    )  # fmt: skip
    proc = start_logged(cmd, log)
    try:
        wait_started(log, proc, port)
        g = Gate(port, pki, recorder, log)
        assert (
            py_get(g, "/billing/x", "billing").status,
            py_get(g, "/billing/x", "stranger").status,
        ) == (200, 401)
        ca_file.write_bytes(pki.path("other-ca").read_bytes())
        wait_until(lambda: py_get(g, "/billing/x", "stranger").status == 200, every=0.2,
                   what="the other CA's client served")  # fmt: skip
        assert py_get(g, "/billing/x", "billing").status == 401
    finally:
        stop(proc)


# --- starting: what is refused ------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_a_policy_with_mtls_needs_a_client_ca(pki: Pki, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(policy_text(pki, False))
    tls_args = ["--tls-cert", str(pki.path("server-chain")),
                "--tls-key", str(pki.path("server", "key"))]  # fmt: skip
    done = _run(*authgate_run(policy, "http://127.0.0.1:9", free_port(), *tls_args))
    assert done.returncode == 2
    assert f"{policy}:6: authn.mtls: this gateway does not ask clients for certificates" in (
        done.stderr
    )
    done = _run(*authgate_run(policy, "http://127.0.0.1:9", free_port(),
                              "--tls-client-ca", str(pki.path("client-ca"))))  # fmt: skip
    assert done.returncode == 2
    assert "--tls-client-ca needs --tls-cert and --tls-key" in done.stderr
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    done = _run(*authgate_run(policy, "http://127.0.0.1:9", free_port(), *tls_args,
                              "--tls-client-ca", str(bad)))  # fmt: skip
    assert done.returncode == 2
    assert f"authgate: --tls-client-ca {bad}: no PEM certificate in it" in done.stderr


def test_the_decision_service_refuses_a_policy_with_mtls(pki: Pki, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(policy_text(pki, False))
    done = _run(str(BIN / "authgate"), "serve", "--policy", str(policy),
                "--listen", f"127.0.0.1:{free_port()}")  # fmt: skip
    assert done.returncode == 2
    assert "authn.mtls: the decision service sees no client certificates" in done.stderr


def test_the_listener_asks_after_mitmproxys_tlsconfig(pki: Pki, tmp_path: Path) -> None:
    """Hooks run in chain order: TlsConfig must have made the connection the
    listener then asks for a certificate on (the real gateways above show the
    asking works; this pins the order that makes it work)."""
    policy = tmp_path / "p.yaml"
    policy.write_text(policy_text(pki, True))

    async def chain() -> list[str]:
        m = await runner.build(
            str(policy), "http://127.0.0.1:9", "127.0.0.1:0", termlog=False,
            tls_cert=str(pki.path("server-chain")), tls_key=str(pki.path("server", "key")),
            tls_client_ca=str(pki.path("client-ca")),
        )  # fmt: skip
        names = [type(a).__name__ for a in m.addons.chain]
        listener = m.addons.get("tlslistener")
        with pytest.raises(exceptions.OptionsError, match="after mitmproxy's tlsconfig"):
            tls.check_order([listener, *m.addons.chain], listener)
        listener.done()
        return names

    names = asyncio.run(chain())
    assert names.index("TlsConfig") < names.index("TlsListener") < names.index("Gateway")


# --- unit: the certificate's facts and the identity they give, as tables ----------------

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC).timestamp()
DAY = 86400.0


def cert(**facts: Any) -> ClientCert:
    base: dict[str, Any] = dict(
        sha256="a" * 64, subject="CN=svc,O=Example", issuer="CN=CA", serial="1f",
        not_before=NOW - DAY, not_after=NOW + DAY, cn=("svc",),
        san_dns=("svc.internal", "svc.example"), san_uri=("spiffe://example.org/svc",),
        san_email=("svc@example.org",), client_cert=":AA==:",
    )  # fmt: skip
    return ClientCert(**{**base, **facts})


LISTED = {"b" * 64: CertClient("pinned", frozenset({"batch"}), frozenset())}
NAMED = {
    "svc.internal": CertClient("svc.internal", frozenset({"billing"}), frozenset({"read"})),
    "CN=svc,O=Example": CertClient("CN=svc,O=Example", frozenset({"dn"}), frozenset()),
}


def certs(name_from: str = "san_dns", listed_only: bool = False) -> ClientCerts:
    return ClientCerts(False, name_from, LISTED, NAMED, listed_only, forward=True)


@pytest.mark.parametrize(
    "config,facts,expected",
    [
        # (subject, roles) or the refusal's code
        (certs(), {}, ("svc.internal", {"billing"})),
        (certs("subject"), {}, ("CN=svc,O=Example", {"dn"})),
        (certs("cn"), {}, ("svc", set())),
        (certs("san_uri"), {}, ("spiffe://example.org/svc", set())),
        (certs("san_email"), {}, ("svc@example.org", set())),
        (certs(), {"san_dns": ("svc.example", "svc.internal")}, ("svc.example", set())),
        (certs(), {"san_dns": ()}, "no_name"),
        (certs("cn"), {"cn": ()}, "no_name"),
        (certs("subject"), {"subject": ""}, "no_name"),
        (certs(), {"san_dns": ("evil\r\nX-Auth-Roles: admin",)}, "bad_name"),
        (certs(listed_only=True), {"san_dns": ("other.internal",)}, "unlisted_certificate"),
        (certs(listed_only=True), {}, ("svc.internal", {"billing"})),
        # A pinned fingerprint names its holder whatever the certificate says.
        (certs(), {"sha256": "b" * 64, "san_dns": ()}, ("pinned", {"batch"})),
        (certs(listed_only=True), {"sha256": "b" * 64}, ("pinned", {"batch"})),
    ],
)
def test_the_identity_a_certificate_gives(
    config: ClientCerts, facts: dict[str, Any], expected: tuple[str, set[str]] | str
) -> None:
    got = config.identify(cert(**facts))
    if isinstance(expected, str):
        assert isinstance(got, tuple) and got[0] == expected
        return
    assert isinstance(got, Identity)
    assert (got.subject, set(got.roles)) == expected
    assert (got.method, got.issuer, got.claims["sub"]) == (MTLS, MTLS, expected[0])
    assert got.claims["cert"]["san_dns"] == list(cert(**facts).san_dns)
    assert got.forward == (("Client-Cert", ":AA==:"),)  # no chain: no Client-Cert-Chain


def test_facts_read_from_an_openssl_certificate(pki: Pki) -> None:
    leaf = x509.load_pem_x509_certificate(pki.path("billing").read_bytes())
    ca = x509.load_pem_x509_certificate(pki.path("client-ca").read_bytes())
    got = read([leaf, ca])
    assert got.subject == "CN=billing,O=Example"
    assert got.issuer == "CN=authgate test client CA"
    assert (got.cn, got.san_dns, got.san_uri, got.san_email) == (
        ("billing",), ("billing.internal",), ("spiffe://example.org/billing",),
        ("billing@example.org",),
    )  # fmt: skip
    assert got.sha256 == pki.sha256("billing")
    assert base64.b64decode(got.client_cert.strip(":")) == pki.der("billing")
    assert got.client_cert_chain == sf_binary(pki.der("client-ca"))
    assert got.valid_at(datetime.datetime.now(datetime.UTC).timestamp())
    assert not got.valid_at(got.not_after) and not got.valid_at(got.not_before - 1)
    assert not read([leaf], "untrusted").valid_at(got.not_before + 1)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("AB:" * 31 + "CD", "ab" * 31 + "cd"),
        (" " + "0F" * 32 + "\n", "0f" * 32),
        ("ab" * 32, "ab" * 32),
        ("ab" * 31, None),  # too short
        ("zz" * 32, None),
        ("ab" * 33, None),
        ("", None),
    ],
)
def test_fingerprints(text: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="64 hex digits"):
            normalize_fingerprint(text)
    else:
        assert normalize_fingerprint(text) == expected


@given(st.binary(min_size=32, max_size=32), st.booleans(), st.booleans())
def test_any_spelling_of_a_digest_is_that_digest(digest: bytes, upper: bool, colons: bool) -> None:
    text = digest.hex()
    if colons:
        text = ":".join(text[i : i + 2] for i in range(0, 64, 2))
    assert normalize_fingerprint(text.upper() if upper else text) == digest.hex()


# --- unit: the policy's `authn.mtls`, and the decision ----------------------------------

BASE = """\
version: 1
authn:
  mtls:
{mtls}
rules:
  - name: svc
    match: {{path: "/svc/**"}}
    accept: [mtls]
    allow: {{role: billing}}
  - name: open
    match: {{path: /open}}
    allow: anyone
"""


def load(mtls: str = "    name_from: san_dns") -> Any:
    return parse_policy(BASE.format(mtls=mtls), "p.yaml")


@pytest.mark.parametrize(
    "mtls,line,problem",
    [
        ("    name_from: dns", 4, "name_from must be one of subject, cn, san_dns"),
        ("    require: true", 4, "unknown key 'require' in authn.mtls"),
        ("    required: yes please", 4, "authn.mtls.required must be true or false"),
        ("    clients:\n      - sha256: abc\n        name: x", 5, "64 hex digits"),
        ("    clients:\n      - roles: [a]", 5, "authn.mtls.clients[0] needs 'name'"),
        ("    clients:\n      - {name: 'a,b'}", 5, "without a comma"),
        ("    clients:\n      - {name: a}\n      - {name: a}", 6, "client 'a' is listed twice"),
        (
            f"    clients:\n      - {{name: a, sha256: '{'ab' * 32}'}}\n"
            f"      - {{name: b, sha256: '{'AB' * 32}'}}",
            6,
            "this fingerprint is listed twice",
        ),
    ],
)
def test_policy_errors_name_the_line(mtls: str, line: int, problem: str) -> None:
    with pytest.raises(PolicyError) as e:
        load(mtls)
    assert e.value.line == line, str(e.value)
    assert problem in str(e.value)


def test_accepting_mtls_needs_it_configured() -> None:
    text = "version: 1\nrules:\n" + BASE.split("rules:\n", 1)[1].replace("{{", "{")
    with pytest.raises(PolicyError, match="accept: 'mtls' is not configured under authn") as e:
        parse_policy(text.replace("}}", "}"), "p.yaml")
    assert e.value.line == 5


def _judge(policy: Any, path: str, client_cert: ClientCert | None, now: float = NOW) -> Any:
    view = RequestView("GET", path, (("host", "x"),), "127.0.0.1", client_cert=client_cert)
    return judge(policy, view, now, MemoryStore())


BILLING = cert(san_dns=("svc.internal",))


@pytest.mark.parametrize(
    "mtls,path,client_cert,now,expected",
    [
        ("    name_from: san_dns", "/svc/a", BILLING, NOW, (0, "allowed")),
        ("    name_from: san_dns", "/svc/a", None, NOW, (401, "no_credentials")),
        ("    name_from: san_dns", "/svc/a", BILLING, NOW + 2 * DAY, (401, "invalid_credentials")),
        ("    name_from: cn", "/svc/a", BILLING, NOW, (403, "forbidden")),
        ("    name_from: san_dns", "/open", None, NOW, (0, "allowed")),
        (
            "    name_from: san_dns",
            "/open",
            cert(problem="untrusted"),
            NOW,
            (401, "invalid_credentials"),
        ),  # fmt: skip
        ("    required: true", "/open", None, NOW, (401, "no_credentials")),
        ("    required: true", "/nowhere", None, NOW, (401, "no_credentials")),
        ("    required: true", "/open", cert(problem="expired"), NOW, (401, "invalid_credentials")),
        ("    required: true", "/open", BILLING, NOW + 2 * DAY, (401, "invalid_credentials")),
        ("    required: true", "/open", BILLING, NOW, (0, "allowed")),
        ("    required: true", "/nowhere", BILLING, NOW, (404, "no_rule")),
    ],
)
def test_decisions(
    mtls: str, path: str, client_cert: ClientCert | None, now: float, expected: tuple[int, str]
) -> None:
    policy = load(mtls + "\n    clients: [{name: svc.internal, roles: [billing]}]")
    d = _judge(policy, path, client_cert, now)
    assert (d.status, d.reason) == expected
    if d.status == 401:
        assert d.challenges == (("ClientCert", ()),)


def test_required_in_report_mode_forwards_and_says_it_would_deny() -> None:
    policy = parse_policy(BASE.format(mtls="    required: true") + "mode: report\n", "p.yaml")
    d = _judge(policy, "/open", None)
    assert (d.forwarded, d.outcome, d.status, d.reason) == (True, "would_deny", 401,
                                                            "no_credentials")  # fmt: skip


def test_the_identity_headers_carry_the_certificate_only_when_asked() -> None:
    for forward, fields in [("true", {"Client-Cert"}), ("false", set())]:
        policy = load(f"    forward_certificate: {forward}\n    name_from: san_dns\n"
                      "    clients: [{name: svc.internal, roles: [billing]}]")  # fmt: skip
        d = _judge(policy, "/svc/a", BILLING)
        names = {k for k, _ in d.upstream_headers}
        assert names - {"X-Auth-Subject", "X-Auth-Roles", "X-Auth-Scopes", "X-Auth-Issuer"} == (
            fields
        )


# --- policy tests (`authgate test`) describe the certificate ----------------------------


@pytest.mark.parametrize(
    "client_cert,problem",
    [
        ("{san_dns: billing.internal}", "client_cert.san_dns must be a list of strings"),
        ("{problem: revoked}", "client_cert.problem must be one of untrusted, expired"),
        ("{sha256: abc}", "64 hex digits"),
        ("{issuer: x}", "unknown key 'issuer' in test 't' client_cert"),
    ],
)
def test_a_case_describing_a_bad_certificate_names_the_line(client_cert: str, problem: str) -> None:
    cases = f"tests:\n  - name: t\n    request: {{path: /x}}\n    client_cert: {client_cert}\n"
    cases += "    expect: {status: 200}\n"
    with pytest.raises(PolicyError, match=re.escape(problem)) as e:
        run_policy(parse_policy(BASE.format(mtls="    required: false") + cases, "p.yaml"))
    assert e.value.line == 16


def test_a_case_with_a_certificate_is_judged_as_the_gateway_would() -> None:
    cases = """\
tests:
  - name: valid
    request: {path: /svc/a}
    client_cert: {san_dns: [svc.internal]}
    expect: {status: 200, headers: {X-Auth-Subject: svc.internal, X-Auth-Roles: billing}}
  - name: untrusted
    request: {path: /svc/a}
    client_cert: {san_dns: [svc.internal], problem: untrusted}
    expect: {status: 401, reason: invalid_credentials}
"""
    mtls = "    name_from: san_dns\n    clients: [{name: svc.internal, roles: [billing]}]"
    report = run_policy(parse_policy(BASE.format(mtls=mtls) + cases, "p.yaml"))
    assert [(o.case.name, o.problems) for o in report.outcomes] == [
        ("valid", ()),
        ("untrusted", ()),
    ]


@pytest.mark.parametrize(
    "client_cert,first",
    [
        (BILLING, "credential: client certificate (verified in the TLS handshake)"),
        (
            cert(san_dns=("svc.internal",), problem="expired"),
            "credential: client certificate (did not verify in the TLS handshake: expired)",
        ),
    ],
)
def test_the_content_view_shows_the_certificate_and_its_verdict(
    client_cert: ClientCert, first: str
) -> None:
    policy = load("    name_from: san_dns")
    view = RequestView("GET", "/svc/a", (("host", "x"),), "127.0.0.1", client_cert=client_cert)
    lines = views.credential(view, policy, NOW)
    assert lines[0] == first
    assert any(line.split() == ["dns", "svc.internal"] for line in lines), lines
    assert any(line.split() == ["sha256", "a" * 64] for line in lines), lines
