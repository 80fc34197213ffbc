"""The "authgate" content view (proxy/views.py) and the comment's first line,
through the installed mitmproxy's own content view machinery: run under both
venvs (`.venv/bin/python -m pytest tests/test_views.py` for 11,
`/tmp/v312/bin/python -m pytest tests/test_views.py` for 12)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authgate.proxy import views
from authgate.proxy.addon import Gateway
from authgate.tools.keys import mint
from conftest import EXAMPLE, POLICIES

NOW = 1_795_715_440.0  # 2026-11-26 17:50:40 UTC


def render(message: Any, flow: Any) -> tuple[str, str]:
    """(view name or description, text) as mitmweb gets them, on 11 and on 12."""
    from mitmproxy import contentviews

    if hasattr(contentviews, "prettify_message"):  # 12
        result = contentviews.prettify_message(message, flow)
        return str(result.view_name), result.text
    description, lines, error = contentviews.get_message_content_view("auto", message, flow)
    assert error is None, error
    return description, "\n".join("".join(str(t) for _, t in line) for line in lines)


def judged(
    policy: Path, path: str, headers: list[tuple[str, str]], check: Callable[[Any], None]
) -> Any:
    """A tflow judged by a Gateway (at NOW) under `policy`; `check(flow)` runs
    while the gateway is loaded (the view needs it)."""
    from mitmproxy.test import taddons, tflow

    gw = Gateway(clock=lambda: NOW)
    flow = tflow.tflow()
    flow.request.path = path
    flow.request.timestamp_start = NOW
    for name, value in headers:
        flow.request.headers[name] = value

    async def run() -> None:
        with taddons.context(gw) as tctx:
            tctx.configure(gw, authgate_policy=str(policy))
            if (waiting := gw.requestheaders(flow)) is not None:
                await waiting
            check(flow)

    asyncio.run(run())
    return flow


def test_a_denial_with_a_jwt_opens_on_the_authgate_view(demo_key: Any) -> None:
    token = mint(demo_key, sub="alice", roles=["user"], now=NOW - 120)
    seen: dict[str, tuple[str, str]] = {}

    def check(flow: Any) -> None:
        seen["response"] = render(flow.response, flow)
        seen["request"] = render(flow.request, flow)

    flow = judged(EXAMPLE, "/api/users/bob", [("Authorization", f"Bearer {token}")], check)
    head, long = flow.comment.split("\n")
    assert head == "403 sub≠{id} / role admin (user-record)"
    assert long == "authgate: 403 by rule user-record (forbidden)"
    name, text = seen["response"]
    assert "authgate" in name
    assert text.startswith("authgate: 403 sub≠{id} / role admin (user-record)\n")
    assert "  rule        user-record\n" in text
    assert "  subject     alice\n" in text
    assert "  client ip   127.0.0.1\n" in text
    assert "credential: JWT from the authorization\n" in text
    assert "    alg  RS256\n" in text
    assert "    sub    alice\n" in text
    # Times in words, relative to the request's time.
    assert "2026-11-26 17:48:40 UTC (2 min ago)" in text
    assert "  signature  (not shown)\n" in text
    assert "claim sub equals '{id}': false (wanted 'bob', sub is 'alice')" in text
    assert "=> 403 Forbidden" in text
    signature = token.rsplit(".", 1)[1]
    assert signature not in text and token not in text
    # A request carrying a credential: the same view (mitmweb shows it when
    # the request has a body; a GET's says "No content").
    assert seen["request"][1] == text


def test_basic_shows_the_user_never_the_password() -> None:
    basic = base64.b64encode(b"alice:pa:ss-word").decode()
    out: list[str] = []
    flow = judged(
        POLICIES / "basic-auth.yaml",
        "/reports/q3",
        [("Authorization", f"Basic {basic}")],
        lambda f: out.append(views.describe(f, *_source(f))),
    )
    assert flow.comment.startswith("200 reports\nauthgate: allowed by rule reports (allowed)")
    [text] = out
    assert "credential: Basic from the authorization\n  user      'alice'\n" in text
    assert "pa:ss-word" not in text and basic not in text
    assert "  password  (not shown)\n" in text


@pytest.mark.parametrize(
    "key, name",
    [("demo-ci-bot-key-not-secret", "'ci-bot'"), ("guessed", "none: not a key of this policy")],
)
def test_an_api_key_by_its_name_never_the_key(key: str, name: str) -> None:
    out: list[str] = []
    flow = judged(
        POLICIES / "api-keys.yaml",
        "/metrics/cpu",
        [("X-API-Key", key)],
        lambda f: out.append(views.describe(f, *_source(f))),
    )
    [text] = out
    assert f"credential: API key from the x-api-key\n  name  {name}\n" in text
    assert key not in text
    if key == "guessed":
        assert flow.comment.split("\n")[0] == "401 unknown api key"


def _source(flow: Any) -> tuple[Any, Any, Any]:
    s = views.SOURCE
    assert s.limiter is not None and s.fallback is not None
    return s.policy(), s.limiter(), s.fallback


def test_the_view_leaves_with_the_gateway() -> None:
    from mitmproxy.test import taddons, tflow

    gw = Gateway(clock=lambda: NOW)

    async def run() -> None:
        with taddons.context(gw) as tctx:
            tctx.configure(gw, authgate_policy=str(EXAMPLE))
            assert views.SOURCE.owner is gw
            tctx.master.addons.remove(gw)  # runs `done`

    asyncio.run(run())
    assert views.SOURCE.owner is None and views.SOURCE.limiter is None
    with pytest.raises(ValueError, match="not loaded"):
        views._render(tflow.tflow())


def test_a_flow_from_a_file_is_read_as_it_is_now(demo_key: Any) -> None:
    """No request kept from the judging (a loaded flow): the request as it is."""
    from mitmproxy.test import taddons, tflow

    gw = Gateway(clock=lambda: NOW)
    flow = tflow.tflow()
    flow.request.path = "/api/profile"
    flow.request.timestamp_start = NOW
    out: list[str] = []

    async def run() -> None:
        with taddons.context(gw) as tctx:
            tctx.configure(gw, authgate_policy=str(EXAMPLE))
            out.append(views.describe(flow, *_source(flow)))

    asyncio.run(run())
    [text] = out
    assert text.startswith("authgate: no decision recorded on this flow\n")
    assert "credential: none this policy reads\n" in text
    assert "=> 401 Unauthorized" in text


@pytest.mark.parametrize(
    "arguments, works",
    [
        (["@all"], True),
        (["@marked"], True),  # the ✖ (and ⚠, ‼) flows
        # `authgate.explain '~comment "authgate: [45]"'`: one argument.
        (['~comment "authgate: [45]"'], True),
        # Unquoted, the filter is two arguments: refused (and mitmweb's parser
        # throws in the browser before sending anything).
        (["~comment", '"authgate: [45]"'], False),
    ],
)
def test_explain_as_mitmweb_sends_it(arguments: list[str], works: bool) -> None:
    """mitmweb's command bar POSTs {"arguments": [...]} to /commands/NAME, which
    calls `commands.call_strings(NAME, arguments)` (tools/web/app.py,
    ExecuteCommand); flow filters resolve through the view addon."""
    from mitmproxy import exceptions
    from mitmproxy.addons import view
    from mitmproxy.test import taddons, tflow

    gw, flows = Gateway(clock=lambda: NOW), view.View()
    flow = tflow.tflow()
    flow.request.path = "/api/profile"

    async def run() -> None:
        with taddons.context(gw, flows) as tctx:
            tctx.configure(gw, authgate_policy=str(EXAMPLE))
            if (waiting := gw.requestheaders(flow)) is not None:
                await waiting
            flows.add([flow])
            if works:
                tctx.master.commands.call_strings("authgate.explain", arguments)
            else:
                with pytest.raises(exceptions.CommandError, match="argument mismatch"):
                    tctx.master.commands.call_strings("authgate.explain", arguments)

    asyncio.run(run())
    decided, _, story = flow.comment.partition("\n\n-- authgate.explain --\n")
    assert decided == "401 no credentials\nauthgate: 401 by rule profile (no_credentials)"
    assert ("=> 401 Unauthorized" in story) == works


def test_the_mitmweb_address_printed_is_one_mitmweb_accepts(backend: Any) -> None:
    """mitmweb 12 answers 403 to a browser without its token: the URL
    `authgate run --web` prints carries it (11 has no password)."""
    from mitmproxy.version import VERSION

    from authgate.proxy import runner

    async def run() -> str:
        m = await runner.build(str(EXAMPLE), backend.url, "127.0.0.1:0", web="127.0.0.1:18999")
        url = runner.web_url(m, "127.0.0.1:18999")
        if int(VERSION.split(".")[0]) >= 12:
            base, _, token = url.partition("/?token=")
            assert base == "http://127.0.0.1:18999" and token
            assert m.addons.get("webauth").is_valid_password(token)
            m.options.update(web_password="chosen")  # a password of your own: not printed
            assert runner.web_url(m, "127.0.0.1:18999") == "http://127.0.0.1:18999/"
        else:
            assert url == "http://127.0.0.1:18999/"
        return url

    asyncio.run(run())
