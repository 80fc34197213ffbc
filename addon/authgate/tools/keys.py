"""Signing keys and tokens for the demo, the tests and `authgate token`.

The demo key is generated on first use into an ignored folder; no private
key is ever committed.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEMO_KID = "demo-1"
DEMO_ISSUER = "https://issuer.example"
DEMO_AUDIENCE = "api"
PRIVATE_NAME = "demo-private.pem"
JWKS_NAME = "jwks.json"
# Stand-ins for the secrets a provider gives its clients: the introspecting
# client of policies/opaque-tokens.yaml, and the login of
# policies/oidc-login.yaml (with the keys that seal its sessions).
INTROSPECTION_SECRET_NAME = "introspection-client.secret"
OIDC_SECRET_NAME = "oidc-client-secret"
SESSION_KEYS_NAME = "session-keys"


def demo_key_path() -> Path:
    """The key `authgate token` signs with by default: policies/keys/ under the
    current folder (the repository, or a copy of it), else under the project
    authgate is installed from, so that the command works from any folder."""
    here = Path("policies", "keys", PRIVATE_NAME)
    project = Path(__file__).resolve().parents[3] / "policies" / "keys" / PRIVATE_NAME
    return project if not here.is_file() and project.is_file() else here


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks_for(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return {"keys": [jwk]}


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_demo_keys(folder: Path) -> Path:
    """Create the demo key pair in `folder` unless it exists, and stand-ins
    for the introspection client's secret (policies/opaque-tokens.yaml), the
    login's client secret and its session key (policies/oidc-login.yaml);
    return the private key path."""
    folder.mkdir(parents=True, exist_ok=True)
    private = folder / PRIVATE_NAME
    jwks = folder / JWKS_NAME
    made = {
        INTROSPECTION_SECRET_NAME: secrets.token_urlsafe(32),
        OIDC_SECRET_NAME: secrets.token_urlsafe(32),
        SESSION_KEYS_NAME: base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    for name, text in made.items():
        if not (folder / name).exists():
            _write_atomic(folder / name, (text + "\n").encode(), 0o600)
    if private.exists() and jwks.exists():
        return private
    key = new_rsa_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(private, pem, 0o600)
    _write_atomic(jwks, json.dumps(jwks_for(key, DEMO_KID), indent=2).encode() + b"\n")
    return private


def load_private_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def mint(
    key: Any,
    *,
    sub: str,
    roles: Iterable[str] = (),
    scopes: Iterable[str] = (),
    ttl: float = 3600,
    iss: str = DEMO_ISSUER,
    aud: str | list[str] | None = DEMO_AUDIENCE,
    kid: str | None = DEMO_KID,
    alg: str = "RS256",
    now: float | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
) -> str:
    """Sign a token. A negative ttl makes an expired one."""
    now = time.time() if now is None else now
    claims: dict[str, Any] = {
        "iss": iss,
        "sub": sub,
        "iat": int(now),
        "exp": int(now + ttl),
        "jti": uuid.uuid4().hex,
    }
    if ttl < 0:
        claims["iat"] = int(now + ttl - 60)
    if aud is not None:
        claims["aud"] = aud
    roles = list(roles)
    scopes = list(scopes)
    if roles:
        claims["roles"] = roles
    if scopes:
        claims["scope"] = " ".join(scopes)
    claims.update(extra or {})
    header: dict[str, Any] = {"kid": kid} if kid else {}
    header.update(headers or {})
    return jwt.encode(claims, key, algorithm=alg, headers=header or None)
