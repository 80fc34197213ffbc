"""What a TLS client certificate says, read once per connection.

The TLS handshake verifies the certificate (proxy/tls.py) and notes what was
wrong if it did not verify; this module only reads the facts a policy can
name the client by or write conditions on: the subject, the subject
alternative names, the issuer, the SHA-256 fingerprint, the validity, and the
certificate (and its chain) as RFC 9440 `Client-Cert` and `Client-Cert-Chain`
field values for the backend. No I/O, no trust decisions: the handshake made
those.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

# The fields a policy may name a certificate's holder by (`authn.mtls.name_from`).
NAME_FIELDS = ("subject", "cn", "san_dns", "san_uri", "san_email")
# What the handshake can find wrong with a client certificate (ClientCert.problem).
PROBLEMS = ("untrusted", "expired", "not_yet_valid", "not_for_client_auth", "bad_signature")
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ClientCert:
    """The facts of a client certificate the handshake received; `problem`
    says what was wrong if it did not verify (then it names nobody)."""

    sha256: str  # the fingerprint of the DER certificate: 64 lower-case hex digits
    subject: str  # RFC 4514, as `openssl x509 -nameopt rfc2253` prints it
    issuer: str  # RFC 4514
    serial: str  # lower-case hex
    not_before: float  # seconds since the epoch
    not_after: float
    cn: tuple[str, ...] = ()  # the subject's common names, in order
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    san_email: tuple[str, ...] = ()
    san_ip: tuple[str, ...] = ()
    # RFC 9440 field values: the certificate, and the chain that verified it
    # (leaf excluded, in TLS order) as sf-binary items.
    client_cert: str = ""
    client_cert_chain: str = ""
    # Empty when the chain verified through the client CA; else what did not:
    # untrusted, expired, not_yet_valid, not_for_client_auth, bad_signature.
    problem: str = ""
    # For conditions: the `cert` claim of the identity (lists, as JSON has them).
    claims: dict[str, Any] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        claims = {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "sha256": self.sha256,
            "cn": list(self.cn),
            "san_dns": list(self.san_dns),
            "san_uri": list(self.san_uri),
            "san_email": list(self.san_email),
            "san_ip": list(self.san_ip),
        }
        object.__setattr__(self, "claims", claims)

    def valid_at(self, now: float) -> bool:
        """Verified, and within its validity at `now` (a connection can outlive
        its certificate)."""
        return not self.problem and self.not_before <= now < self.not_after

    def name(self, name_from: str) -> str | None:
        """The holder's name by one of NAME_FIELDS: the subject, or the first
        value of that kind in the certificate; None when it has none."""
        if name_from == "subject":
            return self.subject or None
        values: tuple[str, ...] = getattr(self, name_from)
        return values[0] if values else None


def sf_binary(der: bytes) -> str:
    """An RFC 8941 byte sequence: `:` base64 `:` (RFC 9440 §2.1)."""
    return ":" + base64.b64encode(der).decode("ascii") + ":"


def normalize_fingerprint(text: str) -> str:
    """64 lower-case hex digits from `AB:CD:...` (what `openssl x509
    -fingerprint -sha256` prints) or plain hex. Raises ValueError."""
    hexed = text.strip().lower().replace(":", "")
    if not _HEX.fullmatch(hexed):
        raise ValueError(
            "sha256 must be a SHA-256 fingerprint: 64 hex digits, with or without colons "
            "(openssl x509 -noout -fingerprint -sha256 -in CERT prints it)"
        )
    return hexed


def read(chain: Sequence[x509.Certificate], problem: str = "") -> ClientCert:
    """The facts of `chain[0]`; `chain[1:]`: the rest of the chain that verified
    it (or as the client sent it, with the `problem` found)."""
    leaf = chain[0]
    der = leaf.public_bytes(serialization.Encoding.DER)
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    email: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uri = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        email = tuple(san.get_values_for_type(x509.RFC822Name))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    cns = tuple(str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    rest = [c.public_bytes(serialization.Encoding.DER) for c in chain[1:]]
    return ClientCert(
        sha256=hashlib.sha256(der).hexdigest(),
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        serial=format(leaf.serial_number, "x"),
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        cn=cns,
        san_dns=dns,
        san_uri=uri,
        san_email=email,
        san_ip=ips,
        client_cert=sf_binary(der),
        client_cert_chain=", ".join(sf_binary(d) for d in rest),
        problem=problem,
    )
