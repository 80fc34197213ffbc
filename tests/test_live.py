"""Running it live, end to end: hot reload under traffic, report-only rollout,
the backend auth lint in warn and repair modes, the Prometheus endpoint, and
the filters a mitmweb user types.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import flowfilter
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    REQUEST_SECONDS,
    Answer,
    Backend,
    Recording,
    RunningGateway,
    Seen,
    send,
    wait_until,
)

Start = Callable[..., RunningGateway]

V1 = """version: 1
authn:
  jwt:
    - {name: demo, issuer: https://issuer.example, audience: api, algorithms: [RS256],
       jwks_file: %(keys)s}
ip:
  block_files: [%(blocklist)s]
limits:
  - {name: per-ip, key: ip, rate: %(rate)s}
rules:
  - {name: open, match: {path: "/a"}, allow: %(allow_a)s}
  - {name: admin, match: {path: "/admin/**"}, allow: {role: admin}}
"""


def write_policy(folder: Path, **kw: str) -> Path:
    # A limit that the traffic loops below never reach, however fast they run.
    values = {"keys": "", "blocklist": "block.txt", "rate": "10000000/minute", "allow_a": "anyone"}
    values.update(kw)
    if not values["keys"]:
        from conftest import POLICIES

        values["keys"] = str(POLICIES / "keys" / "jwks.json")
    if not (folder / "block.txt").exists():
        (folder / "block.txt").write_text("192.0.2.1\n")
    path = folder / "policy.yaml"
    text = V1 % values
    tmp = folder / ".policy.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(path)  # as editors do: the file is whole at every moment
    return path


# --- hot reload ----------------------------------------------------------------------------


def test_reload_under_traffic_break_and_fix(
    start_gateway: Start, backend: Backend, tmp_path: Path, demo_key: Any
) -> None:
    policy = write_policy(tmp_path)
    gw = start_gateway(policy)
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(send(gw.address, "GET", "/a").status)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        wait_until(lambda: len(results) > 20)
        write_policy(tmp_path, allow_a="authenticated")  # /a now needs credentials
        wait_until(lambda: results[-1] == 401)
        after_reload = len(results)
        wait_until(lambda: len(results) > after_reload + 20)

        # A broken edit: the last good policy keeps serving, the status says why.
        policy.write_text(policy.read_text().replace("rules:", "rules:\n  - {name: x}\n"))
        wait_until(lambda: gw.addon.reload_error is not None)
        broken_at = len(results)
        wait_until(lambda: len(results) > broken_at + 20)
        status = gw.addon.status()
        assert status["reload_error"] == f"{policy}:11: rules[0] needs 'allow'"

        # Fixed: /a is open again.
        write_policy(tmp_path, allow_a="anyone")
        wait_until(lambda: results[-1] == 200)
        assert gw.addon.status()["reload_error"] is None
    finally:
        stop.set()
        thread.join()
    # Every answer was one of the two policies' answers, never an error...
    assert set(results) <= {200, 401}, sorted(set(results))
    # ...the switch happened once each way, with no flapping...
    changes = [i for i in range(1, len(results)) if results[i] != results[i - 1]]
    assert len(changes) == 2
    # ...and nothing was forwarded unjudged: the backend saw exactly the 200s.
    assert len(backend.seen) == results.count(200)
    assert gw.addon.reloads == 2


def test_a_reload_that_loses_a_needed_file_is_a_broken_edit(
    start_gateway: Start, backend: Backend, tmp_path: Path, demo_key: Any
) -> None:
    policy = write_policy(tmp_path)
    gw = start_gateway(policy)
    assert send(gw.address, "GET", "/a", source="127.0.0.1").status == 200
    (tmp_path / "block.txt").unlink()
    wait_until(lambda: gw.addon.reload_error is not None)
    assert "cannot read block file" in gw.addon.reload_error
    assert send(gw.address, "GET", "/a").status == 200  # the last good policy serves
    (tmp_path / "block.txt").write_text("127.0.0.1\n")  # the file is back: reload
    wait_until(lambda: gw.addon.reload_error is None and gw.addon.reloads == 1)
    assert send(gw.address, "GET", "/a").status == 403
    assert len(backend.seen) == 2


def test_rate_limit_counters_survive_a_reload_when_the_limit_is_unchanged(
    start_gateway: Start, backend: Backend, tmp_path: Path, demo_key: Any
) -> None:
    gw = start_gateway(write_policy(tmp_path, rate="3/minute"))
    assert [send(gw.address, "GET", "/a").status for _ in range(2)] == [200, 200]
    write_policy(tmp_path, rate="3/minute", allow_a="{any: [anyone]}")
    wait_until(lambda: gw.addon.reloads == 1)
    assert [send(gw.address, "GET", "/a").status for _ in range(2)] == [200, 429]
    # A changed limit starts afresh.
    write_policy(tmp_path, rate="4/minute")
    wait_until(lambda: gw.addon.reloads == 2)
    assert send(gw.address, "GET", "/a").status == 200


def test_reload_command_and_status(
    start_gateway: Start, backend: Backend, tmp_path: Path, demo_key: Any
) -> None:
    policy = write_policy(tmp_path)
    gw = start_gateway(policy, "authgate_watch=false")
    write_policy(tmp_path, allow_a="nobody")
    time.sleep(1.5)
    assert send(gw.address, "GET", "/a").status == 200  # not watching: nothing changed
    assert "reload started" in gw.call("authgate.reload")
    wait_until(lambda: gw.addon.reloads == 1)
    assert send(gw.address, "GET", "/a").status == 401
    status = json.loads(gw.call("authgate.status"))
    assert status["policy"] == str(policy) and status["rules"] == 2 and status["reloads"] == 1


def test_after_a_reload_nothing_keeps_the_old_policy(
    start_gateway: Start, backend: Backend, tmp_path: Path, demo_key: Any
) -> None:
    """Two policies (two block lists) are held only until the swap."""
    gw = start_gateway(write_policy(tmp_path))
    assert send(gw.address, "GET", "/a").status == 200
    assert gw.addon.policy is not None
    old_block = weakref.ref(gw.addon.policy.block)  # (a Policy has no weakref slot)
    (tmp_path / "block.txt").write_text("192.0.2.2\n")
    wait_until(lambda: gw.addon.reloads == 1)
    assert send(gw.address, "GET", "/a").status == 200
    gc.collect()
    assert gw.addon.policy.block.contains(4, 0xC0000202)
    assert old_block() is None


# --- report-only rollout ------------------------------------------------------------------------

REPORT = """version: 1
mode: %(mode)s
authn:
  jwt:
    - {name: demo, issuer: https://issuer.example, audience: api, algorithms: [RS256],
       jwks_file: %(keys)s}
rules:
  - {name: admin, match: {path: "/admin/**"}, allow: {role: admin}}
  - {name: secret, match: {path: "/secret/**"}, allow: {role: admin}, hide: true}
  - {name: strict, match: {path: "/strict"}, allow: nobody, mode: enforce}
"""


@pytest.fixture
def report_policy(tmp_path: Path, demo_key: Any) -> Callable[[str], Path]:
    from conftest import POLICIES

    def make(mode: str) -> Path:
        path = tmp_path / f"{mode}.yaml"
        path.write_text(REPORT % {"mode": mode, "keys": POLICIES / "keys" / "jwks.json"})
        return path

    return make


def test_report_mode_forwards_and_logs_what_enforce_would_deny(
    start_gateway: Start,
    backend: Backend,
    report_policy: Callable[[str], Path],
    tmp_path: Path,
    token: Callable[..., str],
) -> None:
    log = tmp_path / "decisions.jsonl"
    gw = start_gateway(report_policy("report"), f"authgate_log={log}")
    user = token(sub="alice", roles=["user"])
    r = send(gw.address, "GET", "/admin/x", [("Authorization", f"Bearer {user}")])
    assert r.status == 200  # the backend's answer
    anonymous = send(gw.address, "GET", "/admin/x")
    assert anonymous.status == 200
    hidden = send(gw.address, "GET", "/secret/x")
    assert hidden.status == 200 and hidden.header("WWW-Authenticate") is None
    # A rule can stay enforced inside a report-mode policy.
    assert send(gw.address, "GET", "/strict").status == 401
    assert [s.target for s in backend.seen] == ["/admin/x", "/admin/x", "/secret/x"]
    assert backend.seen[0].header("X-Auth-Subject") == "alice"  # a proven identity
    assert backend.seen[1].header("X-Auth-Subject") is None
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["decision"], e["status"], e["rule"]) for e in entries] == [
        ("would_deny", 403, "admin"),
        ("would_deny", 401, "admin"),
        ("would_deny", 404, "secret"),
        ("deny", 401, "strict"),
    ]
    assert gw.addon.status()["would_deny"] == {"admin": 2, "secret": 1}


@pytest.mark.parametrize(
    "file_mode, override, forwarded",
    [("report", "enforce", False), ("enforce", "report", True), ("enforce", "", False)],
)
def test_authgate_mode_overrides_the_file(
    start_gateway: Start,
    backend: Backend,
    report_policy: Callable[[str], Path],
    file_mode: str,
    override: str,
    forwarded: bool,
) -> None:
    gw = start_gateway(report_policy(file_mode), f"authgate_mode={override}")
    r = send(gw.address, "GET", "/admin/x")
    assert r.status == (200 if forwarded else 401)
    assert len(backend.seen) == (1 if forwarded else 0)


# --- backend auth lint ----------------------------------------------------------------------------

LINT = """version: 1
authn:
  jwt:
    - {name: demo, issuer: https://issuer.example, audience: api, algorithms: [RS256],
       jwks_file: %(keys)s}
rules:
  - {name: legacy, match: {path: "/**"}, allow: anyone}
"""

MISTAKES: dict[str, Answer] = {
    "/bare-401": (401, [], b"no"),
    "/forbidden": (403, [], b"no"),
    "/401-rate-limit": (401, [("WWW-Authenticate", 'Basic realm="x"'), ("Retry-After", "5")], b""),
    "/503-rate-limit": (503, [("X-RateLimit-Remaining", "0")], b""),
    "/403-challenge": (403, [("WWW-Authenticate", 'Bearer realm="x"')], b""),
    "/fine": (200, [], b"ok"),
}


def mistaken(seen: Seen) -> Answer | None:
    return MISTAKES.get(seen.target)


@pytest.fixture
def lint_policy(tmp_path: Path, demo_key: Any) -> Path:
    from conftest import POLICIES

    path = tmp_path / "lint.yaml"
    path.write_text(LINT % {"keys": POLICIES / "keys" / "jwks.json"})
    return path


def test_lint_warn_reports_and_changes_nothing(
    start_gateway: Start, backend: Backend, lint_policy: Path
) -> None:
    backend.answer = mistaken
    gw = start_gateway(lint_policy)  # warn is the default
    for path, (status, _, _) in MISTAKES.items():
        r = send(gw.address, "GET", path)
        assert r.status == status, path
    send(gw.address, "GET", "/bare-401")
    assert send(gw.address, "GET", "/bare-401").header("WWW-Authenticate") is None
    summary = {
        (e["rule"], e["finding"], e["count"], e["repaired"]) for e in gw.addon.lint.summary()
    }
    assert summary == {
        ("legacy", "401_without_challenge", 3, 0),
        ("legacy", "403_without_credentials", 2, 0),  # /forbidden and /403-challenge
        ("legacy", "401_403_for_rate_limiting", 1, 0),
        ("legacy", "503_for_rate_limiting", 1, 0),
        ("legacy", "403_with_challenge_not_insufficient_scope", 1, 0),
    }
    assert len(backend.seen) == len(MISTAKES) + 2


def test_lint_repair_fixes_only_what_needs_no_guessing(
    start_gateway: Start, backend: Backend, lint_policy: Path, token: Callable[..., str]
) -> None:
    backend.answer = mistaken
    gw = start_gateway(lint_policy, "authgate_lint_upstream=repair")
    bare = send(gw.address, "GET", "/bare-401")
    assert bare.status == 401
    assert bare.header_all("WWW-Authenticate") == ['Bearer realm="api"']
    forbidden = send(gw.address, "GET", "/forbidden")
    assert forbidden.status == 401
    assert forbidden.header_all("WWW-Authenticate") == ['Bearer realm="api"']
    # With credentials, a backend 403 is a real 403: left alone.
    authed = send(gw.address, "GET", "/forbidden", [("Authorization", f"Bearer {token()}")])
    assert authed.status == 403 and authed.header("WWW-Authenticate") is None
    # A 401 that is really a rate limit is reported, not dressed up.
    limited = send(gw.address, "GET", "/401-rate-limit")
    assert limited.status == 401 and limited.header_all("WWW-Authenticate") == ['Basic realm="x"']
    assert send(gw.address, "GET", "/503-rate-limit").status == 503
    summary = {(e["finding"], e["repaired"]) for e in json.loads(gw.call("authgate.lint"))}
    assert ("401_without_challenge", 1) in summary
    assert ("403_without_credentials", 1) in summary
    assert ("401_403_for_rate_limiting", 0) in summary
    assert ("503_for_rate_limiting", 0) in summary


# --- metrics ------------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=REQUEST_SECONDS) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list[Any], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_endpoint(
    start_gateway: Start,
    backend: Backend,
    lint_policy: Path,
    report_policy: Callable[[str], Path],
    tmp_path: Path,
    token: Callable[..., str],
) -> None:
    backend.answer = mistaken
    gw = start_gateway(lint_policy, "authgate_metrics=127.0.0.1:0")
    port = gw.addon.metrics.port
    assert port
    send(gw.address, "GET", "/fine")
    send(gw.address, "GET", "/bare-401")
    send(gw.address, "GET", "/x", [("Authorization", "Bearer nope")])
    send(gw.address, "GET", "/x%2F")
    gw.call("authgate.reload")
    wait_until(lambda: gw.addon.reloads == 1)
    metrics = scrape(port)
    decisions = metrics["authgate_decisions"]
    assert (
        value(decisions, "authgate_decisions_total", decision="allow", status="0", reason="allowed")
        == 2
    )
    assert (
        value(
            decisions,
            "authgate_decisions_total",
            decision="deny",
            status="401",
            reason="invalid_token",
        )
        == 1
    )
    assert (
        value(
            decisions, "authgate_decisions_total", decision="deny", status="400", reason="bad_path"
        )
        == 1
    )
    lint = metrics["authgate_upstream_lint_findings"]
    assert (
        value(lint, "authgate_upstream_lint_findings_total", finding="401_without_challenge") == 1
    )
    assert value(metrics["authgate_policy_reloads"], "authgate_policy_reloads_total") == 1
    hist = metrics["authgate_decision_seconds"]
    assert value(hist, "authgate_decision_seconds_count") == 4


# --- what a mitmweb user sees and filters on ------------------------------------------------------


@pytest.mark.parametrize(
    "expression, expected",
    [
        # /admin/x and /nowhere match no rule; /api/admin/x is the admin rule's 403.
        ('~comment "authgate: [45]"', ["/admin/x", "/api/admin/x", "/nowhere"]),
        ('~comment "by rule admin "', ["/api/admin/x"]),
        ('~comment "by rule health "', ["/health"]),  # allowed flows too
        ("~comment allowed", ["/health"]),
    ],
)
def test_the_documented_mitmweb_filters(
    backend: Backend,
    demo_key: Any,
    token: Callable[..., str],
    expression: str,
    expected: list[str],
) -> None:
    from conftest import EXAMPLE

    addon = Recording()
    gw = RunningGateway(EXAMPLE, backend.url, [], gateway=addon)
    try:
        user = [("Authorization", f"Bearer {token(roles=['user'])}")]
        send(gw.address, "GET", "/health")
        send(gw.address, "GET", "/admin/x", user)
        send(gw.address, "GET", "/api/admin/x", user)
        send(gw.address, "GET", "/nowhere")
        matcher = flowfilter.parse(expression)
        assert [f.request.path for f in addon.flows if matcher(f)] == expected
        statuses = [(f.request.path, f.response.status_code, bool(f.marked)) for f in addon.flows]
        assert statuses == [
            ("/health", 200, False),
            ("/admin/x", 404, True),
            ("/api/admin/x", 403, True),
            ("/nowhere", 404, True),
        ]
    finally:
        gw.stop()
