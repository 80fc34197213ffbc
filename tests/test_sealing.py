"""Sealed values (`authgate.core.sealing`): AES-256-GCM with key rotation,
bound to a purpose; and the key file format."""

from __future__ import annotations

import base64
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.core.sealing import KEY_BYTES, Sealer, fingerprint, parse_keys

OLD = bytes(range(32))
NEW = bytes(range(32, 64))
OTHER = bytes(range(64, 96))
PURPOSE = b"session|authgate_session|app"


def flip(text: str, at: int) -> str:
    """One character of a sealed value changed (to another base64url one)."""
    swapped = "A" if text[at] != "A" else "B"
    return text[:at] + swapped + text[at + 1 :]


@pytest.mark.parametrize(
    "sealed_with, opened_with, opens",
    [
        ([OLD], [OLD], True),
        ([NEW, OLD], [NEW, OLD], True),  # the first key seals
        ([OLD], [NEW, OLD], True),  # rotated: an old session still opens
        ([NEW, OLD], [NEW], True),
        ([OLD], [NEW], False),  # the old key retired: its sessions end
        ([OTHER], [NEW, OLD], False),  # another deployment's key
    ],
)
def test_rotation(sealed_with: list[bytes], opened_with: list[bytes], opens: bool) -> None:
    sealed = Sealer(sealed_with).seal(b"hello", PURPOSE)
    assert Sealer(opened_with).open(sealed, PURPOSE) == (b"hello" if opens else None)


def test_a_value_sealed_for_one_purpose_does_not_open_for_another() -> None:
    sealer = Sealer([NEW])
    login = sealer.seal(b'["state","nonce"]', b"login|authgate_session|app")
    assert sealer.open(login, b"session|authgate_session|app") is None
    assert sealer.open(login, b"login|authgate_session|app") == b'["state","nonce"]'


def test_each_seal_differs_and_names_its_key() -> None:
    sealer = Sealer([NEW, OLD])
    a, b = sealer.seal(b"x", PURPOSE), sealer.seal(b"x", PURPOSE)
    assert a != b  # a fresh nonce each time
    raw = base64.urlsafe_b64decode(a + "=" * (-len(a) % 4))
    assert raw[0] == 1 and raw[1:5] == fingerprint(NEW)
    assert len(a) == Sealer.sealed_length(1)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: flip(s, 0),  # version
        lambda s: flip(s, 3),  # key fingerprint
        lambda s: flip(s, 10),  # nonce
        lambda s: flip(s, len(s) // 2 + 8),  # ciphertext
        lambda s: flip(s, len(s) - 2),  # tag
        lambda s: s[:-4],  # truncated
        lambda s: s + "AAAA",  # extended
        lambda s: s[:20],
        lambda s: "",
        lambda s: s + "=",  # not base64url
        lambda s: s.replace(s[5], "+"),
        lambda s: "A" * 70_000,  # absurdly long
    ],
)
def test_tampered_values_do_not_open(tamper: object) -> None:
    sealer = Sealer([NEW])
    sealed = sealer.seal(b'{"sub":"alice"}', PURPOSE)
    assert callable(tamper)
    changed = tamper(sealed)
    assert changed != sealed
    assert sealer.open(changed, PURPOSE) is None


@given(st.binary(max_size=3000), st.binary(max_size=40))
def test_whatever_is_sealed_opens_as_it_was(data: bytes, purpose: bytes) -> None:
    sealer = Sealer([NEW, OLD])
    sealed = sealer.seal(data, purpose)
    assert sealer.open(sealed, purpose) == data
    assert len(sealed) == Sealer.sealed_length(len(data))


@given(st.text(max_size=200))
def test_no_text_opens_without_the_key(text: str) -> None:
    assert Sealer([NEW]).open(text, PURPOSE) is None


@pytest.mark.parametrize("count", [0, 1, 3])
def test_sealer_keys_are_32_bytes(count: int) -> None:
    if count == 0:
        with pytest.raises(ValueError, match="at least one key"):
            Sealer([])
    else:
        with pytest.raises(ValueError, match="32 bytes, not 16"):
            Sealer([NEW] * (count - 1) + [b"x" * 16])


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.mark.parametrize(
    "text, keys",
    [
        (_b64(NEW), [NEW]),
        (_b64(NEW) + "\n" + _b64(OLD) + "\n", [NEW, OLD]),
        (f"# rotated on Monday\n{_b64(NEW)}\n  # the old one\n{_b64(OLD)}", [NEW, OLD]),
        (f"{_b64(NEW)}, {_b64(OLD)}", [NEW, OLD]),  # an environment variable
        (base64.urlsafe_b64encode(OTHER).decode().rstrip("="), [OTHER]),  # URL-safe, unpadded
        (NEW.hex(), [NEW]),
        (NEW.hex().upper() + " " + _b64(OLD), [NEW, OLD]),
    ],
)
def test_key_files(text: str, keys: list[bytes]) -> None:
    assert parse_keys(text) == keys


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no key"),
        ("# only a comment\n", "no key"),
        (_b64(b"x" * 16), "key 1 is not 32 bytes"),
        (f"{_b64(NEW)}\nnot-a-key", "key 2 is not 32 bytes"),
        (_b64(b"x" * 33), "key 1 is not 32 bytes"),
        ("zz" * 32, "key 1 is not 32 bytes"),
        (f"{_b64(NEW)}\n{NEW.hex()}", "key 2 appears twice"),
    ],
)
def test_bad_key_files(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_keys(text)


def test_what_openssl_prints_is_a_key() -> None:
    # `openssl rand -base64 32` prints 44 characters of standard base64.
    printed = base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n"
    assert len(parse_keys(printed)[0]) == KEY_BYTES
