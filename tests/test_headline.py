"""The first line of a flow's comment: status, rule, the decisive reason."""

from __future__ import annotations

from typing import Any

import pytest

from authgate.core.decision import RequestView, judge
from authgate.core.headline import failed, headline
from authgate.policy.load import load_policy
from authgate.runtime.stores import MemoryStore
from authgate.tools.keys import mint
from conftest import EXAMPLE

NOW = 1_795_715_440.0


@pytest.mark.parametrize(
    "method, path, token, expected",
    [
        ("GET", "/health", None, "200 health"),
        ("GET", "/nowhere", None, "404 no rule"),
        ("GET", "/api/profile", None, "401 no credentials"),
        ("GET", "/api/profile", {"now": NOW - 7200}, "401 expired"),
        ("GET", "/api/users/bob", {}, "403 sub≠{id} / role admin (user-record)"),
        ("GET", "/api/admin/x", {}, "403 role admin (admin)"),
        ("GET", "/api/secrets/x", {}, "404 hidden (secrets)"),
        ("POST", "/api/reports", {}, "403 no scope reports:write (reports)"),
        ("GET", "/a/%2F/x", None, "400 bad path: "),
    ],
)
def test_headlines(demo_key: Any, method: str, path: str, token: Any, expected: str) -> None:
    policy = load_policy(EXAMPLE)
    headers = []
    if token is not None:
        claims = {"sub": "alice", "roles": ["user"], "now": NOW, **token}
        headers.append(("authorization", "Bearer " + mint(demo_key, **claims)))
    d = judge(policy, RequestView.build(method, path, headers, "127.0.0.1"), NOW, MemoryStore())
    assert headline(d, policy).startswith(expected)


def test_a_rate_limit_names_the_limit_and_its_rate(demo_key: Any) -> None:
    policy = load_policy(EXAMPLE)
    store = MemoryStore()
    token = mint(demo_key, sub="alice", scopes=["reports:write"], now=NOW)
    view = RequestView.build("POST", "/api/reports", [("authorization", f"Bearer {token}")], "::1")
    heads = [headline(judge(policy, view, NOW, store), policy) for _ in range(6)]
    assert heads == ["200 reports"] * 5 + ["429 reports 5/min"]


def test_report_mode_and_the_gateways_own_answers() -> None:
    policy = load_policy(EXAMPLE)
    view = RequestView.build("GET", "/api/profile", [], "127.0.0.1")
    d = judge(policy, view, NOW, MemoryStore())
    assert headline(d.__class__(**{**_fields(d), "report": True}), policy) == (
        "would 401 no credentials"
    )
    assert failed(503, "no_policy") == "503 no policy"


def _fields(d: Any) -> dict[str, Any]:
    return {name: getattr(d, name) for name in d.__dataclass_fields__}
