"""Cookies (`authgate.core.cookies`): reading them, the gateway's own
Set-Cookie values, and a long value split across several cookies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.core import cookies


@pytest.mark.parametrize(
    "fields, names, found",
    [
        (["a=1; b=2"], {"b"}, {"b": ["2"]}),
        (["a=1", "b=2; a=3"], {"a"}, {"a": ["1", "3"]}),
        (['s="quoted"'], {"s"}, {"s": ["quoted"]}),
        (["odd cookie={json: 1}; s=x"], {"s"}, {"s": ["x"]}),
        (["s"], {"s"}, {}),  # no "=": not a cookie
        (["  s =  v  "], {"s"}, {"s": ["v"]}),
    ],
)
def test_read(fields: list[str], names: set[str], found: dict[str, list[str]]) -> None:
    assert cookies.read(fields, names) == found


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"secure": True}, "n=v; Path=/; HttpOnly; Secure; SameSite=Lax"),
        ({"secure": False, "max_age": 600}, "n=v; Path=/; Max-Age=600; HttpOnly; SameSite=Lax"),
        (
            {"secure": True, "max_age": 60, "path": "/oauth2/callback"},
            "n=v; Path=/oauth2/callback; Max-Age=60; HttpOnly; Secure; SameSite=Lax",
        ),
        ({"secure": False, "max_age": -5}, "n=v; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"),
    ],
)
def test_set_cookie(kwargs: dict[str, object], expected: str) -> None:
    assert cookies.set_cookie("n", "v", **kwargs) == expected  # type: ignore[arg-type]


def test_clear_cookie() -> None:
    assert cookies.clear_cookie("__Host-s", secure=True) == (
        "__Host-s=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax"
    )


@pytest.mark.parametrize(
    "length, pieces",
    [(0, 1), (10, 1), (3800, 1), (3801, 2), (7598, 2), (7599, 3), (11000, 3), (30000, 8)],
)
def test_split_sizes(length: int, pieces: int) -> None:
    value = "x" * length
    parts = cookies.split(value)
    assert len(parts) == pieces
    assert all(len(p) <= cookies.CHUNK for p in parts)
    assert cookies.join(parts[0], parts[1:]) == value


def test_split_refuses_more_than_nine() -> None:
    with pytest.raises(ValueError, match="more than 9 cookies"):
        cookies.split("x" * 40_000)


@pytest.mark.parametrize(
    "first, rest, joined",
    [
        ("abc", [], "abc"),
        ("2.abc", ["def"], "abcdef"),
        ("2.abc", ["def", "stale"], "abcdef"),  # a piece left over from a longer session
        ("3.abc", ["def", None], None),  # one missing
        ("2.abc", [], None),
        ("1.abc", [], "1.abc"),  # no count below 2: a plain value
    ],
)
def test_join(first: str, rest: list[str | None], joined: str | None) -> None:
    assert cookies.join(first, rest) == joined


@given(st.text(alphabet="ABCDEFabcdef0123456789-_", max_size=30000))
def test_split_then_join(value: str) -> None:
    parts = cookies.split(value)
    assert cookies.join(parts[0], parts[1:]) == value


def test_chunk_names() -> None:
    assert cookies.chunk_names("__Host-s", 3) == ("__Host-s", "__Host-s.1", "__Host-s.2")


@given(st.integers(min_value=0, max_value=34_000))
def test_count_is_what_split_makes(length: int) -> None:
    assert cookies.count(length) == len(cookies.split("x" * length))
