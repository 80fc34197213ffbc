"""The cached hook dispatch of `authgate run`'s master (proxy/dispatch.py):
every event reaches the same handlers, in the same order, with the same
arguments and the same error handling as mitmproxy's own walk."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from mitmproxy import addonmanager, exceptions, master, options
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpResponseHook
from mitmproxy.test import tflow

from authgate.proxy import dispatch, runner


class Recorder:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    def requestheaders(self, flow: Any) -> None:
        self.calls.append(f"{self.name}.requestheaders:{flow.request.path}")


class AsyncRecorder(Recorder):
    async def requestheaders(self, flow: Any) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.requestheaders(async):{flow.request.path}")

    def response(self, flow: Any) -> None:
        self.calls.append(f"{self.name}.response")


class Fails(Recorder):
    def requestheaders(self, flow: Any) -> None:
        self.calls.append(f"{self.name}.requestheaders")
        raise ValueError("boom")


class Halts(Recorder):
    def response(self, flow: Any) -> None:
        self.calls.append(f"{self.name}.response")
        raise exceptions.AddonHalt()


class BadOption(Recorder):
    def requestheaders(self, flow: Any) -> None:
        raise exceptions.OptionsError("bad option")


class Parent:
    def __init__(self, child: Recorder) -> None:
        self.addons = [child]


_LOOP = asyncio.new_event_loop()


def _master(fast: bool, *addons: Any) -> master.Master:
    m = master.Master(options.Options(), with_termlog=False, event_loop=_LOOP)
    m.addons.add(*addons)
    if fast:
        assert dispatch.use(m)
        assert type(m.addons) is dispatch.FastAddonManager
    return m


def _run(m: master.Master, *events: Any) -> None:
    async def go() -> None:
        for event in events:
            await m.addons.trigger_event(event)

    _LOOP.run_until_complete(go())


def _story(fast: bool, caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    calls: list[str] = []
    addons = (
        Recorder("a", calls),
        AsyncRecorder("b", calls),
        Fails("c", calls),
        Halts("d", calls),
        AsyncRecorder("e", calls),  # after the halt: never sees the response
    )
    m = _master(fast, *addons)
    flow = tflow.tflow()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=addonmanager.logger.name):
        _run(m, HttpRequestHeadersHook(flow), HttpResponseHook(flow))
    return calls, [r.getMessage() for r in caplog.records]


def test_same_handlers_order_arguments_and_errors_as_mitmproxys_walk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stock = _story(False, caplog)
    fast = _story(True, caplog)
    assert fast == stock
    calls, errors = fast
    assert calls == [
        "a.requestheaders:/path",
        "b.requestheaders(async):/path",
        "c.requestheaders",
        "d.requestheaders:/path",  # an error in c does not stop the others
        "e.requestheaders(async):/path",
        "b.response",
        "d.response",  # AddonHalt: e's response hook is not called
    ]
    assert errors == ["Addon error: boom"]


def test_an_options_error_propagates_as_in_mitmproxy() -> None:
    for fast in (False, True):
        m = _master(fast, BadOption("x", []))
        with pytest.raises(exceptions.OptionsError):
            _run(m, HttpRequestHeadersHook(tflow.tflow()))


def test_added_and_removed_addons_are_seen_on_the_next_event() -> None:
    calls: list[str] = []
    first, later = Recorder("first", calls), Recorder("later", calls)
    m = _master(True, first)
    flow = tflow.tflow()
    _run(m, HttpRequestHeadersHook(flow))
    m.addons.add(later)
    _run(m, HttpRequestHeadersHook(flow))
    m.addons.remove(first)
    _run(m, HttpRequestHeadersHook(flow))
    assert calls == [
        "first.requestheaders:/path",
        "first.requestheaders:/path",
        "later.requestheaders:/path",
        "later.requestheaders:/path",
    ]


def test_a_master_with_nested_addons_keeps_mitmproxys_walk() -> None:
    calls: list[str] = []
    m = master.Master(options.Options(), with_termlog=False, event_loop=_LOOP)
    m.addons.add(Parent(Recorder("child", calls)))
    assert not dispatch.use(m)
    assert type(m.addons) is addonmanager.AddonManager


def test_an_addon_with_children_added_later_returns_the_master_to_the_walk() -> None:
    calls: list[str] = []
    m = _master(True, Recorder("leaf", calls))
    child = Recorder("child", calls)
    m.addons.add(Parent(child))
    flow = tflow.tflow()
    _run(m, HttpRequestHeadersHook(flow))
    assert type(m.addons) is addonmanager.AddonManager
    assert calls == ["leaf.requestheaders:/path", "child.requestheaders:/path"]
    # The child's list can change at run time, as a script's does; the walk sees it.
    child2 = Recorder("child2", calls)
    m.addons.chain[-1].addons.append(child2)
    _run(m, HttpRequestHeadersHook(flow))
    assert calls[-1] == "child2.requestheaders:/path"


def test_authgate_run_uses_it_and_mitmweb_does_not(tmp_path: Any) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - name: all\n    match: {path: /**}\n    allow: anyone\n"
    )

    async def build(web: str | None) -> type:
        m = await runner.build(
            str(policy), "http://127.0.0.1:9", "127.0.0.1:0", termlog=False, web=web
        )
        kind = type(m.addons)
        m.shutdown()
        return kind

    assert asyncio.run(build(None)) is dispatch.FastAddonManager
    assert asyncio.run(build("127.0.0.1:0")) is addonmanager.AddonManager
