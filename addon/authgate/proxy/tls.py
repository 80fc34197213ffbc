"""HTTPS for `authgate run --tls-cert/--tls-key`, and trust for an https:// upstream.

mitmproxy serves TLS on a reverse listener from its `certs` option: a file with
the certificate (chain) then the key. This module checks the operator's pair
before mitmproxy sees it (naming the file and the problem), writes the combined
file privately, serves it for any SNI (`*`), refuses plain HTTP on that port,
and watches the two files: a change re-sets `certs`, which makes mitmproxy's
tlsconfig build a new certstore, so the next connection gets the new
certificate. A bad new pair is refused and the old one keeps serving.

With `--tls-client-ca`, the listener asks every client for a certificate
(mutual TLS) and verifies it in the handshake, against that CA file alone:
mitmproxy's own TlsConfig addon builds each connection's pyOpenSSL context in
`tls_start_client` (loading the serving chain into the context's store, to
send the intermediates), then this addon, later in the chain, adds the CA
file to that store, names its CAs in the CertificateRequest, and sets a
verify callback that notes OpenSSL's verdict and whether the chain passes
through a certificate of the CA file. The handshake goes on either way: a
missing or bad certificate is answered over HTTP (401, by the policy), since
mitmproxy would close a failed handshake without telling the client why.
Once the handshake is done the certificate's facts, and what was wrong with
it, are read once (core/clientcert.py) and kept on the connection for every
request on it.

For the backend, mitmproxy verifies by default (`ssl_insecure` is False) but
against certifi's bundle; `upstream_trust` points it at the system store or at
`--upstream-ca` instead.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import hashlib
import logging
import os
import ssl
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from mitmproxy import ctx, exceptions, http
from mitmproxy import tls as mtls
from OpenSSL import SSL, crypto

from authgate.core import clientcert

logger = logging.getLogger("authgate")
SOON = datetime.timedelta(days=14)  # warn this long before the certificate expires
POLL_SECONDS = 1.0
# On mitmproxy's Client: the ClientCert its handshake received (absent: none),
# with the `problem` found when it did not verify.
CLIENT_CERT = "_authgate_client_cert"
_CHECK = "_authgate_cert_check"  # on the Client: its handshake's _ChainCheck


# Contexts whose store holds the client CAs, and which (mitmproxy 12 shares one).
_PREPARED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


class CertError(ValueError):
    """A certificate, key or CA file that cannot serve; the message names the file."""


@dataclass(frozen=True)
class CertPair:
    cert_file: str
    key_file: str
    pem: bytes  # the certificates, then the key: what mitmproxy's `certs` reads
    subject: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime

    def describe(self) -> str:
        return f"{self.subject} (serial {self.serial:x}, valid until {self.not_after:%Y-%m-%d})"


_SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertError(f"authgate: {flag} {path}: cannot read it: {e.strerror}") from e


def parse_pair(cert_file: str, cert_pem: bytes, key_file: str, key_pem: bytes) -> CertPair:
    """Check a certificate and key as read; CertError names the file at fault."""
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise CertError(f"authgate: --tls-cert {cert_file}: no PEM certificate in it")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise CertError(f"authgate: --tls-cert {cert_file}: not a valid PEM certificate") from e
    leaf = chain[0]
    if b"-----BEGIN" not in key_pem or b"PRIVATE KEY-----" not in key_pem:
        raise CertError(f"authgate: --tls-key {key_file}: no PEM private key in it")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as e:  # cryptography says "Password was not given but ..."
        raise CertError(
            f"authgate: --tls-key {key_file}: the key is encrypted; give it unencrypted "
            "(readable only by the gateway's user)"
        ) from e
    except ValueError as e:
        raise CertError(f"authgate: --tls-key {key_file}: not a valid PEM private key") from e
    # The kinds of key a TLS server can sign with (not DH, DSA or X25519);
    # named by what they are, as newer cryptography deprecates the DH names.
    if not isinstance(key, _SIGNING_KEYS):
        raise CertError(f"authgate: --tls-key {key_file}: this kind of key cannot sign for TLS")
    if key.public_key() != leaf.public_key():
        raise CertError(
            f"authgate: --tls-key {key_file}: does not match the certificate in {cert_file}"
        )
    # The certificate file's own text (leaf first, then intermediates) and the key
    # in PKCS#8, which every mitmproxy version reads.
    key_out = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    certs_out = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return CertPair(
        cert_file,
        key_file,
        certs_out + key_out,
        leaf.subject.rfc4514_string() or "(empty subject)",
        leaf.serial_number,
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
    )


def load_pair(cert_file: str, key_file: str) -> CertPair:
    return parse_pair(
        cert_file, _read("--tls-cert", cert_file), key_file, _read("--tls-key", key_file)
    )


@dataclass(frozen=True)
class ClientCA:
    """The certificates client certificates must chain to (`--tls-client-ca`)."""

    file: str
    certs: tuple[crypto.X509, ...]  # pyOpenSSL's, as the handshake takes them
    digests: frozenset[bytes]  # their SHA-256, as crypto.X509.digest writes it
    subjects: tuple[str, ...]

    def describe(self) -> str:
        return "; ".join(self.subjects)


def parse_client_ca(file: str, pem: bytes) -> ClientCA:
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise CertError(f"authgate: --tls-client-ca {file}: no PEM certificate in it")
    try:
        found = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CertError(f"authgate: --tls-client-ca {file}: not a valid PEM certificate") from e
    certs = tuple(crypto.X509.from_cryptography(c) for c in found)
    return ClientCA(
        file,
        certs,
        frozenset(c.digest("sha256") for c in certs),
        tuple(c.subject.rfc4514_string() or "(empty subject)" for c in found),
    )


def load_client_ca(file: str) -> ClientCA:
    return parse_client_ca(file, _read("--tls-client-ca", file))


# What a client certificate's OpenSSL X509_V_ERR_* code means (one of
# clientcert.PROBLEMS, the decision's detail); any other code is "untrusted".
PROBLEMS = {
    7: "bad_signature",
    9: "not_yet_valid",
    10: "expired",
    26: "not_for_client_auth",  # its extended key usage lacks clientAuth
}


class _ChainCheck:
    """One handshake's verify callback. OpenSSL calls it for each certificate
    of the chain it built, from the trust anchor down to the client's own
    (depth 0), and for each problem it finds, with its own verdict (`ok`:
    signature, validity, purpose ssl_client, a known issuer). The callback
    notes the first problem and lets the handshake go on: the request is
    answered over HTTP (a 401 that says so), where a failed handshake would
    tell the client nothing (mitmproxy closes it without sending the alert).

    The context's store also holds the serving chain (mitmproxy loads it to
    send the intermediates), so OpenSSL's verdict alone would trust what the
    serving certificate's CA issued: the chain must also pass through a
    certificate of the client CA file."""

    __slots__ = ("digests", "through", "error")

    def __init__(self, digests: frozenset[bytes]) -> None:
        self.digests = digests
        self.through = False  # a certificate of the CA file was in the chain
        self.error = 0  # OpenSSL's X509_V_ERR_* code of the first problem

    def __call__(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            self.error = self.error or errno or -1
        elif cert.digest("sha256") in self.digests:
            self.through = True
        return True

    def problem(self) -> str:
        """What is wrong with the certificate; empty when its chain verified
        through the CA file."""
        if self.error:
            return PROBLEMS.get(self.error, "untrusted")
        return "" if self.through else "untrusted"


def check_order(chain: Sequence[Any], listener: TlsListener) -> None:
    """The listener's `tls_start_client` must run after mitmproxy's TlsConfig
    (hooks run in chain order): before it there is no connection to ask for
    a client certificate on. Raises OptionsError otherwise."""
    names = [type(a).__name__ for a in chain]
    if "TlsConfig" not in names or listener not in chain:
        raise exceptions.OptionsError("authgate: the TLS listener needs mitmproxy's tlsconfig")
    if names.index("TlsConfig") > list(chain).index(listener):
        raise exceptions.OptionsError(
            "authgate: the TLS listener must come after mitmproxy's tlsconfig addon"
        )


def validity_warning(pair: CertPair, now: datetime.datetime) -> str | None:
    """What to say when clients will (soon) refuse this certificate; None if fine."""
    where = f"authgate: --tls-cert {pair.cert_file}"
    if now < pair.not_before:
        return (
            f"{where} is not valid before {pair.not_before:%Y-%m-%d %H:%M} UTC; clients refuse it"
        )
    if now >= pair.not_after:
        return f"{where} expired on {pair.not_after:%Y-%m-%d}; clients refuse it"
    if pair.not_after - now < SOON:
        days = (pair.not_after - now).days
        return (
            f"{where} expires on {pair.not_after:%Y-%m-%d} (in {days} days); "
            "replace it (the gateway reloads it)"
        )
    return None


def write_combined(pem: bytes) -> str:
    """The pair in a file only this user can read (mkstemp creates it 0600),
    removed at exit even when the gateway never ran (a bad policy at start)."""
    fd, path = tempfile.mkstemp(prefix="authgate-tls-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    atexit.register(_remove, path)
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError as e:
            h.update(f"unreadable: {e.errno}".encode())
        h.update(b"\0")
    return h.hexdigest()


class TlsListener:
    """Serves the operator's certificate, refuses plain HTTP, asks clients for
    a certificate when given a client CA, and reloads the certificate (and the
    client CA) when one of the files changes."""

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        poll: float = POLL_SECONDS,
        client_ca: str | None = None,
    ) -> None:
        self.files = (cert_file, key_file) + ((client_ca,) if client_ca else ())
        self.poll = poll
        self._seen = _digest(self.files)
        self.pair = load_pair(cert_file, key_file)  # CertError: refused at start
        self.client_ca = load_client_ca(client_ca) if client_ca else None
        self.combined = write_combined(self.pair.pem)
        self.reloads = 0
        self.reload_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    # --- client certificates (mutual TLS) -----------------------------------------

    def tls_start_client(self, data: mtls.TlsData) -> None:
        cas = self.client_ca
        if cas is None:
            return
        conn = data.ssl_conn
        if conn is None:
            # mitmproxy's TlsConfig makes the connection before this hook
            # (runner.build adds this addon after it, and checks so).
            logger.error("authgate: no TLS connection to ask for a client certificate on")
            return
        check = _ChainCheck(cas.digests)
        # Asked for, never demanded: a client without one (or with a bad one)
        # gets an HTTP answer, from the rule or from authn.mtls.required.
        conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, check)
        # The CA file's certificates in the store the chain is built from (as
        # trust anchors even when they are intermediates: PARTIAL_CHAIN), and
        # named in the CertificateRequest so that a client with several
        # certificates presents the right one. mitmproxy 11 makes a context
        # per connection; mitmproxy 12 shares one (cached) between connections,
        # and pyOpenSSL 25+ refuses to change a context once a connection uses
        # it: there the store still takes the CAs (a store is not the
        # context's setting), but the request names none (a client with one
        # certificate presents it all the same).
        context = conn.get_context()
        if _PREPARED.get(context) is not cas:  # new, or the CA file changed
            store = context.get_cert_store()
            assert store is not None
            store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
            for ca in cas.certs:
                store.add_cert(ca)  # a certificate already there is ignored
            try:
                for ca in cas.certs:
                    context.add_client_ca(ca)
            except ValueError:
                pass  # in use already (see above)
            _PREPARED[context] = cas
        setattr(data.conn, _CHECK, check)

    def tls_established_client(self, data: mtls.TlsData) -> None:
        check = getattr(data.conn, _CHECK, None)
        conn = data.ssl_conn
        if check is None or conn is None:
            return
        delattr(data.conn, _CHECK)  # its work is done
        leaf = conn.get_peer_certificate()
        if leaf is None:
            return  # none sent
        problem = check.problem()
        # The chain that verified it (RFC 9440 Client-Cert-Chain), or as sent.
        chain = (conn.get_verified_chain() if not problem else None) or [
            leaf,
            *(conn.get_peer_cert_chain() or []),
        ]
        peer = data.conn.peername[0] if data.conn.peername else "?"
        try:
            cert = clientcert.read([c.to_cryptography() for c in chain], problem)
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
            # OpenSSL took it, but its fields cannot be read: it names nobody.
            logger.warning(f"authgate: client {peer}: a certificate that cannot be read: {e}")
            return
        setattr(data.conn, CLIENT_CERT, cert)
        if problem:
            why = (
                f"OpenSSL verify error {check.error}"
                if check.error
                else "its chain does not pass through --tls-client-ca"
            )
            logger.info(
                f"authgate: client {peer} presented a certificate that does not verify "
                f"({problem}: {why}): {cert.subject[:120]!r}, issuer {cert.issuer[:120]!r}"
            )

    def describe_client_ca(self) -> str | None:
        if self.client_ca is None:
            return None
        return (
            f"authgate: asking clients for a certificate issued under "
            f"{self.client_ca.describe()} ({self.client_ca.file})"
        )

    def certs_option(self) -> list[str]:
        return [f"*={self.combined}"]  # any SNI, and none, gets this certificate

    def running(self) -> None:
        logger.info(f"authgate: serving HTTPS with {self.pair.describe()} from {self.files[0]}")
        if said := self.describe_client_ca():
            logger.info(said)
        self._warn_validity()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        _remove(self.combined)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's reverse listener takes plain HTTP too; this port is HTTPS only.
        if flow.response is not None or flow.client_conn.tls_established:
            return
        flow.response = http.Response.make(
            400,
            b"This port takes HTTPS only.\n",
            {"Content-Type": "text/plain; charset=utf-8", "Connection": "close"},
        )
        flow.request.headers.pop("expect", None)

    def _warn_validity(self) -> None:
        warning = validity_warning(self.pair, datetime.datetime.now(datetime.UTC))
        if warning:
            logger.warning(warning)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            now = await asyncio.to_thread(_digest, self.files)
            if now != self._seen:
                # Remember what was tried, so a bad pair is reported once and
                # the next change (the key written after the cert) retries.
                self._seen = now
                await self.reload()

    async def reload(self) -> bool:
        """Swap in the pair (and client CA) on disk; keep the serving ones if
        either does not load."""
        try:
            pair = await asyncio.to_thread(load_pair, *self.files[:2])
            cas = await asyncio.to_thread(load_client_ca, self.files[2]) if self.client_ca else None
        except CertError as e:
            return self._refuse(str(e))
        combined = write_combined(pair.pem)
        try:
            ctx.options.update(certs=[f"*={combined}"])
        except exceptions.OptionsError as e:
            _remove(combined)
            return self._refuse(f"authgate: {self.files[0]}: {e}")
        old, self.combined, self.pair = self.combined, combined, pair
        if cas is not None:
            self.client_ca = cas
        _remove(old)
        self.reloads += 1
        self.reload_error = None
        logger.info(f"authgate: TLS certificate reloaded: {pair.describe()}")
        self._warn_validity()
        return True

    def _refuse(self, why: str) -> bool:
        self.reload_error = why
        logger.error(f"authgate: TLS certificate reload refused, the old one keeps serving: {why}")
        return False


def upstream_trust(upstream: str, upstream_ca: str | None) -> dict[str, Any]:
    """mitmproxy options that make an https:// upstream verified against
    `upstream_ca`, or else the system store (mitmproxy's own default is
    certifi's bundle, which misses CAs an operator installed system-wide)."""
    if not upstream.lower().startswith("https://"):
        if upstream_ca:
            raise CertError(f"authgate: --upstream-ca {upstream_ca}: needs an https:// --upstream")
        return {}
    if upstream_ca:
        pem = _read("--upstream-ca", upstream_ca)
        try:
            x509.load_pem_x509_certificates(pem)
        except ValueError as e:
            raise CertError(
                f"authgate: --upstream-ca {upstream_ca}: no PEM certificate in it"
            ) from e
        return {"ssl_verify_upstream_trusted_ca": os.path.abspath(upstream_ca)}
    paths = ssl.get_default_verify_paths()  # honours SSL_CERT_FILE / SSL_CERT_DIR
    out: dict[str, Any] = {}
    if paths.cafile and os.path.isfile(paths.cafile):
        out["ssl_verify_upstream_trusted_ca"] = paths.cafile
    if paths.capath and os.path.isdir(paths.capath):
        out["ssl_verify_upstream_trusted_confdir"] = paths.capath
    return out


def describe_trust(upstream: str, options: Any) -> str | None:
    """The log line saying how the backend's certificate is checked."""
    if not upstream.lower().startswith("https://"):
        return None
    if options.ssl_insecure:
        return (
            f"authgate: WARNING: ssl_insecure is set: the certificate of {upstream} is NOT "
            "verified; anyone on the path to the backend can read and change the traffic"
        )
    where = [
        p
        for p in (
            options.ssl_verify_upstream_trusted_ca,
            options.ssl_verify_upstream_trusted_confdir,
        )
        if p
    ]
    return f"authgate: verifying {upstream} against {' and '.join(where) or 'certifi'}"
