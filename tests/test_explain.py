"""`authgate explain`: the trace of every row of the status table, as golden
files a person has read (tests/golden/explain/*.txt), and the pieces around it.

Regenerate the golden files after a deliberate change with
`AUTHGATE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_explain.py`,
then read the diff before committing it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authgate.core.decision import RequestView, judge
from authgate.core.explanation import explain, redact, shorten
from authgate.core.model import Policy
from authgate.policy.load import load_policy
from authgate.proxy.addon import Gateway
from authgate.runtime.stores import MemoryStore
from authgate.tools.explain import request_from_args
from authgate.tools.keys import mint
from conftest import EXAMPLE, POLICIES

NOW = 1_795_715_440.0  # 2026-11-26 17:50:40 UTC
GOLDEN = Path(__file__).parent / "golden" / "explain"
UPDATE = os.environ.get("AUTHGATE_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def example(demo_key: Any) -> Policy:
    return load_policy(EXAMPLE)


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


# (golden name, policy file, request, requests sent before it, with the same limiter)
Row = tuple[str, str, Callable[[Any], RequestView], int]
ROWS: list[Row] = [
    ("200-allowed", "example.yaml", lambda k: RequestView(
        "GET", "/api/users/alice", (bearer(mint(k, sub="alice", roles=["user"], now=NOW)),),
        "127.0.0.1"), 0),
    ("200-public-anonymous", "example.yaml", lambda k: RequestView(
        "HEAD", "/health", (), "127.0.0.1"), 0),
    ("200-behind-a-trusted-proxy", "behind-a-proxy.yaml", lambda k: RequestView(
        "GET", "/orders?page=2", (("x-forwarded-for", "198.51.100.23, 10.0.0.8"),), "10.0.0.7"),
     0),
    ("400-two-authorization-fields", "example.yaml", lambda k: RequestView(
        "GET", "/api/profile", (bearer(mint(k, sub="alice", now=NOW)),
                                bearer(mint(k, sub="bob", now=NOW))), "127.0.0.1"), 0),
    ("400-ambiguous-path", "example.yaml", lambda k: RequestView(
        "GET", "/api/users/..%2Fadmin", (), "127.0.0.1"), 0),
    ("401-no-credentials", "example.yaml", lambda k: RequestView(
        "GET", "/api/profile", (), "127.0.0.1"), 0),
    ("401-unsupported-scheme", "example.yaml", lambda k: RequestView(
        "GET", "/api/profile", (("authorization", "Basic YWxpY2U6c2VjcmV0"),), "127.0.0.1"), 0),
    ("401-expired-token", "example.yaml", lambda k: RequestView(
        "GET", "/api/profile", (bearer(mint(k, sub="alice", ttl=-3600, now=NOW)),),
        "127.0.0.1"), 0),
    ("401-unknown-kid", "example.yaml", lambda k: RequestView(
        "GET", "/api/profile", (bearer(mint(k, sub="alice", kid="rotated-2", now=NOW)),),
        "127.0.0.1"), 0),
    ("401-wrong-audience", "example.yaml", lambda k: RequestView(
        "GET", "/api/profile", (bearer(mint(k, sub="alice", aud="billing", now=NOW)),),
        "127.0.0.1"), 0),
    ("403-forbidden", "example.yaml", lambda k: RequestView(
        "GET", "/api/users/bob", (bearer(mint(k, sub="alice", roles=["user"], now=NOW)),),
        "127.0.0.1"), 0),
    ("403-insufficient-scope", "example.yaml", lambda k: RequestView(
        "POST", "/api/reports", (bearer(mint(k, sub="alice", scopes=["profile:read"], now=NOW)),),
        "127.0.0.1"), 0),
    ("403-blocked-ip", "example.yaml", lambda k: RequestView(
        "GET", "/health", (("x-forwarded-for", "10.9.9.9"),), "127.0.0.2"), 0),
    ("403-not-on-the-allow-list", "ip-lists.yaml", lambda k: RequestView(
        "GET", "/x", (), "198.51.200.1"), 0),
    ("404-hidden", "example.yaml", lambda k: RequestView(
        "GET", "/api/secrets/db", (bearer(mint(k, sub="alice", roles=["user"], now=NOW)),),
        "127.0.0.1"), 0),
    ("404-no-rule", "example.yaml", lambda k: RequestView(
        "GET", "/api/nothing-here", (), "127.0.0.1"), 0),
    ("429-rate-limited", "example.yaml", lambda k: RequestView(
        "POST", "/api/reports", (bearer(mint(k, sub="writer", scopes=["reports:write"], now=NOW)),),
        "127.0.0.1"), 5),
]  # fmt: skip


@pytest.mark.parametrize("name, policy_file, make, before", ROWS, ids=[r[0] for r in ROWS])
def test_golden(demo_key: Any, name: str, policy_file: str,
                make: Callable[[Any], RequestView], before: int) -> None:  # fmt: skip
    policy = load_policy(POLICIES / policy_file)
    request = make(demo_key)
    limiter = MemoryStore()
    for _ in range(before):
        judge(policy, request, NOW, limiter)
    text = f"# policies/{policy_file}\n" + explain(
        policy, request, NOW, limiter).text()  # fmt: skip
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"explain output changed; see {path}"
    # The status in the golden file's name is the status the gateway answers.
    assert explain(policy, request, NOW, limiter).status == int(name[:3])


def test_explain_reads_limits_but_never_counts_them(example: Policy, demo_key: Any) -> None:
    limiter = MemoryStore()
    r = RequestView("POST", "/api/reports",
                    (bearer(mint(demo_key, sub="w", scopes=["reports:write"], now=NOW)),),
                    "127.0.0.1")  # fmt: skip
    for _ in range(10):
        assert explain(example, r, NOW, limiter).status == 200
    assert len(limiter) == 0


def test_no_token_is_ever_shown_whole(example: Policy, demo_key: Any) -> None:
    tokens = [mint(demo_key, sub="alice", now=NOW), mint(demo_key, sub="alice", ttl=-10, now=NOW),
              "x" * 40 + ".y.z"]  # fmt: skip
    for token in tokens:
        text = explain(example, RequestView("GET", "/api/profile", (bearer(token),), "127.0.0.1"),
                       NOW, MemoryStore()).text()  # fmt: skip
        assert token not in text and token[10:30] not in text
        assert token[:10] + "…" in text


@pytest.mark.parametrize(
    "name, value, shown",
    [("Authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.payload.sig", "Bearer eyJhbGciOi…"),
     # The first characters of a Basic value decode to the password's first
     # (`YWxpY2U6c2` is `alice:s`): only the user is shown.
     ("authorization", "Basic YWxpY2U6c2VjcmV0", "Basic (user 'alice', password hidden)"),
     ("authorization", "Basic !!!", "Basic (not user:password)"),
     ("authorization", "Digest username=x", "Digest … (hidden)"),
     ("Proxy-Authorization", "Bearer short", "Bearer short"),
     ("Cookie", "session=0123456789abcdef", "… (24 characters, hidden)"),
     ("X-API-Key", "k-0123456789", "… (12 characters, hidden)"),
     ("authorization", "justatokenwithoutscheme", "… (23 characters, hidden)"),
     ("Accept", "application/json", "application/json")],
)  # fmt: skip
def test_redact(name: str, value: str, shown: str) -> None:
    assert redact(name, value) == shown


def test_shorten() -> None:
    assert (shorten("0123456789"), shorten("0123456789a"), shorten("")) == (
        "0123456789", "0123456789…", "")  # fmt: skip


@pytest.mark.parametrize(
    "args, kw, expected",
    [(("get", "/a?b=1", []), {}, RequestView("GET", "/a?b=1", (), "127.0.0.1")),
     (("GET", "https://api.test:8443/a/b?c", []), {},
      RequestView("GET", "/a/b?c", (), "127.0.0.1", "api.test:8443")),
     (("GET", "http://api.test", []), {}, RequestView("GET", "/", (), "127.0.0.1", "api.test")),
     (("GET", "/a", ["Host: x.test", "X-N:  v "]), {},
      RequestView("GET", "/a", (("host", "x.test"), ("x-n", "v")), "127.0.0.1", "x.test")),
     (("GET", "/a", []), {"token": "t.t.t"},
      RequestView("GET", "/a", (("authorization", "Bearer t.t.t"),), "127.0.0.1")),
     (("GET", "/a", []), {"ip": "192.0.2.7"}, RequestView("GET", "/a", (), "192.0.2.7")),
     (("GET", "/a", []), {"peer": "10.0.0.1"}, RequestView("GET", "/a", (), "10.0.0.1")),
     (("GET", "/a", []), {"ip": "192.0.2.7", "peer": "10.0.0.1"},
      RequestView("GET", "/a", (("x-forwarded-for", "192.0.2.7"),), "10.0.0.1")),
     (("GET", "/a", ["X-Forwarded-For: 1.2.3.4"]), {"ip": "192.0.2.7", "peer": "192.0.2.7"},
      RequestView("GET", "/a", (("x-forwarded-for", "1.2.3.4"),), "192.0.2.7"))],
)  # fmt: skip
def test_request_from_args(args: tuple[str, str, list[str]], kw: dict[str, str],
                           expected: RequestView) -> None:  # fmt: skip
    assert request_from_args(*args, **kw) == expected


@pytest.mark.parametrize(
    "headers, kw, message",
    [(["NoColon"], {}, "must look like 'Name: value'"), ([": v"], {}, "must look like"),
     ([" X: v"], {}, "must look like"), ([], {"ip": "nope"}, "not an IP address"),
     ([], {"peer": "1.2.3"}, "not an IP address")],
)  # fmt: skip
def test_request_from_args_problems(headers: list[str], kw: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        request_from_args("GET", "/", headers, **kw)


# --- inside mitmproxy: `authgate.explain @focus` ------------------------------------


def test_the_mitmproxy_command(demo_key: Any, caplog: pytest.LogCaptureFixture) -> None:
    from mitmproxy.test import taddons, tflow

    gw = Gateway(clock=lambda: NOW)
    flow = tflow.tflow()
    flow.request.path = "/api/users/bob"
    flow.request.headers["Authorization"] = "Bearer " + mint(
        demo_key, sub="alice", roles=["user"], now=NOW)  # fmt: skip

    async def run() -> None:
        with taddons.context(gw) as tctx:
            tctx.configure(gw, authgate_policy=str(EXAMPLE))
            assert "authgate.explain" in tctx.master.commands.commands
            with caplog.at_level(logging.INFO, logger="authgate"):
                tctx.master.commands.call("authgate.explain", [flow])
            assert len(gw.limiter) == 0  # explaining counts nothing
            assert flow.response is None  # nor does it answer the flow

    asyncio.run(run())
    [record] = [r for r in caplog.records if r.getMessage().startswith("authgate.explain")]
    text = record.getMessage()
    assert "  rule user-record: matches with {'id': 'bob'}\n" in text
    assert "      claim sub equals '{id}': false (wanted 'bob', sub is 'alice')\n" in text
    assert "=> 403 Forbidden   (reason forbidden, rule user-record)" in text
    assert flow.request.headers["Authorization"][7:] not in text
    # The story is attached to the flow itself, after its decision line.
    assert flow.comment.startswith("\n\n-- authgate.explain --\nGET /api/users/bob\n")
    assert "=> 403 Forbidden" in flow.comment


def test_explaining_again_replaces_the_story_and_keeps_the_decision(demo_key: Any) -> None:
    from mitmproxy.test import taddons, tflow

    gw = Gateway(clock=lambda: NOW)
    flow = tflow.tflow()
    flow.request.path = "/health"
    flow.comment = "authgate: allowed by rule health (allowed)"

    async def run() -> None:
        with taddons.context(gw) as tctx:
            tctx.configure(gw, authgate_policy=str(EXAMPLE))
            tctx.master.commands.call("authgate.explain", [flow])
            tctx.master.commands.call("authgate.explain", [flow])

    asyncio.run(run())
    decided, _, story = flow.comment.partition("\n\n-- authgate.explain --\n")
    assert decided == "authgate: allowed by rule health (allowed)"
    assert story.startswith("GET /health\n") and "-- authgate.explain --" not in story


def test_the_mitmproxy_command_without_a_policy() -> None:
    from mitmproxy import exceptions
    from mitmproxy.test import taddons, tflow

    gw = Gateway()

    async def run() -> None:
        with taddons.context(gw) as tctx:
            with pytest.raises(exceptions.CommandError, match="no policy loaded"):
                tctx.master.commands.call("authgate.explain", [tflow.tflow()])

    asyncio.run(run())
