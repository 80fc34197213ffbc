"""Sealed values: what the gateway hands a browser to keep (its session, a
login in progress) and must get back unchanged and unread.

AES-256-GCM (`cryptography`), an AEAD: a sealed value can be neither read
nor altered without the key, and each is bound to its purpose (the
associated data), so a value sealed as a login in progress never opens as a
session. Keys rotate: the first key seals, every key opens; a sealed value
names its key by a 4-byte fingerprint, so opening tries one key, not all.

    sealed = base64url(version 1 | key fingerprint (4) | nonce (12) | ciphertext+tag)

Pure: the nonce is 96 random bits from `secrets` (no clock, no I/O).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32  # AES-256
VERSION = b"\x01"
_FINGERPRINT = 4
_NONCE = 12
_TAG = 16
_HEAD = len(VERSION) + _FINGERPRINT + _NONCE
_B64URL = re.compile(r"^[A-Za-z0-9_-]+\Z")
_SEPARATORS = re.compile(r"[\s,]+")


def fingerprint(key: bytes) -> bytes:
    """The 4 bytes that name a key inside a sealed value (not the key)."""
    return hashlib.sha256(b"authgate sealing key\x00" + key).digest()[:_FINGERPRINT]


def parse_keys(text: str) -> list[bytes]:
    """Keys as written in a key file or variable: one or more, separated by
    white space, newlines or commas, `#` starts a comment line; each 32 bytes
    in base64 (standard or URL-safe, padding optional, what `openssl rand
    -base64 32` prints) or 64 hex digits. Raises ValueError naming the entry."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    entries = [e for e in _SEPARATORS.split("\n".join(lines)) if e]
    if not entries:
        raise ValueError("no key (one per line: 32 random bytes, e.g. `openssl rand -base64 32`)")
    keys: list[bytes] = []
    for number, entry in enumerate(entries, 1):
        key = _decode_key(entry)
        if key is None:
            raise ValueError(
                f"key {number} is not 32 bytes in base64 or hex "
                "(make one with `openssl rand -base64 32`)"
            )
        if key in keys:
            raise ValueError(f"key {number} appears twice")
        keys.append(key)
    return keys


def _decode_key(entry: str) -> bytes | None:
    if len(entry) == 2 * KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in entry):
        return bytes.fromhex(entry)
    padded = entry + "=" * (-len(entry) % 4)
    for alphabet in (b"+/", b"-_"):
        try:
            key = base64.b64decode(padded, altchars=alphabet, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(key) == KEY_BYTES:
            return key
    return None


class Sealer:
    """Seals with the first key, opens with any. Keys are 32 bytes each."""

    __slots__ = ("_by_print", "_first", "_first_print", "count")

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a sealer needs at least one key")
        for key in keys:
            if len(key) != KEY_BYTES:
                raise ValueError(f"a sealing key is {KEY_BYTES} bytes, not {len(key)}")
        self._by_print: dict[bytes, list[AESGCM]] = {}
        for key in keys:
            self._by_print.setdefault(fingerprint(key), []).append(AESGCM(key))
        self._first = AESGCM(keys[0])
        self._first_print = fingerprint(keys[0])
        self.count = len(keys)

    def seal(self, data: bytes, purpose: bytes) -> str:
        """`data` sealed for `purpose`, as URL-safe base64 without padding."""
        nonce = secrets.token_bytes(_NONCE)
        head = VERSION + self._first_print
        sealed = self._first.encrypt(nonce, data, head + purpose)
        return base64.urlsafe_b64encode(head + nonce + sealed).rstrip(b"=").decode("ascii")

    def open(self, text: str, purpose: bytes) -> bytes | None:
        """The data, or None: not sealed by one of our keys for `purpose`, altered,
        truncated, or not a sealed value at all."""
        if len(text) > 64 * 1024 or not _B64URL.match(text):
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < _HEAD + _TAG or raw[:1] != VERSION:
            return None
        head, nonce, sealed = raw[:5], raw[5:_HEAD], raw[_HEAD:]
        for aead in self._by_print.get(head[1:], ()):
            try:
                return aead.decrypt(nonce, sealed, head + purpose)
            except InvalidTag:
                continue
        return None

    @staticmethod
    def sealed_length(size: int) -> int:
        """How many characters sealing `size` bytes gives."""
        raw = _HEAD + size + _TAG
        return (raw * 4 + 2) // 3
