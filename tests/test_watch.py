"""The watch (`watch:`, docs/watch.md): thresholds over sliding windows, the
events, and the bans and throttles they set.

The window arithmetic against a brute-force model (hypothesis); the policy
section's errors and lint; what a decision counts toward, on the real core;
then real gateways (the mitmproxy door in a thread, the decision service as a
process) under scripted traffic: a user probing 30 admin paths, a client
cycling passwords, report mode, the admin listener. Every denial asserts the
upstream saw nothing. Two gateway processes on one Redis: test_watch_redis.py.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.core.decision import RequestView, judge
from authgate.core.model import Ban, Policy
from authgate.core.watch import Window, observations, stronger
from authgate.policy.load import parse_policy
from authgate.policy.marks import PolicyError
from authgate.proxy.addon import WATCH_MARKER
from authgate.runtime.stores import MemoryStore, MemoryWatch
from authgate.tools.lint import lint
from conftest import (
    POLICIES,
    REQUEST_SECONDS,
    Backend,
    Recording,
    Reply,
    RunningGateway,
    send,
    wait_until,
)

JWKS = POLICIES / "keys" / "jwks.json"

# --- the window: exact, bounded, against a brute-force model --------------------------


def model(events: list[tuple[int, str]], window: int, threshold: int) -> list[tuple[int, bool]]:
    """What the watch means, counted the slow way: after each event, the
    distinct members seen in (now - window, now] since the key last reached
    the threshold; reaching it starts the count again."""
    since = 0
    out = []
    for i, (now, _) in enumerate(events):
        members = {m for t, m in events[since : i + 1] if t > now - window}
        count = len(members)
        out.append((count, count >= threshold))
        if count >= threshold:
            since = i + 1
    return out


def timeline(members: st.SearchStrategy[str]) -> st.SearchStrategy[list[tuple[int, str]]]:
    """Events at times that never go back (gaps of 0 allowed: one instant)."""
    steps = st.lists(st.tuples(st.integers(0, 40), members), max_size=80)
    return steps.map(
        lambda xs: [(sum(g for g, _ in xs[: i + 1]), m) for i, (_, m) in enumerate(xs)]
    )


@settings(max_examples=300, deadline=None)
@given(
    timeline(st.sampled_from("abcdefgh")),
    st.integers(1, 120),
    st.integers(1, 12),
)
def test_the_window_counts_what_the_model_counts(
    events: list[tuple[int, str]], window: int, threshold: int
) -> None:
    w = Window()
    got = []
    for now, member in events:
        got.append(w.add(member, now, window, threshold))
        assert len(w.seen) < threshold  # bounded: never more than threshold - 1 kept
    assert [(n, n >= threshold) for n in got] == model(events, window, threshold)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=60), st.integers(1, 100), st.integers(1, 10))
def test_unique_members_reach_the_threshold_exactly_when_enough_fall_in_the_window(
    gaps: list[int], window: int, threshold: int
) -> None:
    # Denials and failed credentials: a fresh member each time.
    events = [(sum(gaps[: i + 1]), f"id{i}") for i in range(len(gaps))]
    w = Window()
    for (now, member), (count, reached) in zip(
        events, model(events, window, threshold), strict=True
    ):
        assert w.add(member, now, window, threshold) == count
        assert (count >= threshold) is reached


def test_a_window_by_hand() -> None:
    w = Window()
    # Threshold 3 in 10 s: /a at 0, /a again at 1 (one path), /b at 5, /c at 10;
    # /a, last seen at 1, is within (0, 10]: three distinct paths.
    seen = [(0, "/a"), (1, "/a"), (5, "/b"), (10, "/c")]
    assert [w.add(m, t, 10, 3) for t, m in seen] == [1, 1, 2, 3]
    assert not w.seen  # reached: it starts again
    assert w.add("/d", 12, 10, 3) == 1
    assert w.add("/e", 22, 10, 3) == 1  # /d at 12 is not within (12, 22]


def test_memory_watch_forgets_the_least_recently_counted_key_first() -> None:
    policy = policy_with(
        "  - {name: w, key: ip, counts: denials, threshold: 5, window: 1m, action: none}\n"
    )
    spec = policy.watch[0]
    store = MemoryWatch(max_keys=2)
    from authgate.core.watch import Observation

    def see(key: str, now: float) -> int:
        return store.count([Observation(spec, key, f"{key}{now}")], now)[0].count

    assert [see("ip:a", 0), see("ip:b", 1), see("ip:a", 2)] == [1, 1, 2]
    see("ip:c", 3)  # b was counted least recently: forgotten
    assert len(store) == 2
    assert see("ip:b", 4) == 1 and see("ip:a", 5) == 1  # c, then... a went when b came back


# --- the policy section: errors name file and line; the lint --------------------------------

RULES = "rules: [{name: a, match: {path: /a}, allow: anyone}]\n"


def policy_with(watch: str, more: str = "") -> Policy:
    return parse_policy(f"version: 1\n{more}watch:\n{watch}{RULES}", "p.yaml")


ENTRY = "{name: w, key: ip, counts: denials, threshold: 5, window: 1m, action: ban, for: 10m"


@pytest.mark.parametrize(
    "watch, line, message",
    [
        (
            "  - " + ENTRY.replace("threshold: 5", "threshold: 0") + "}\n",
            3,
            "threshold must be a whole number from 1 to 10000, not 0",
        ),
        ("  - " + ENTRY.replace("threshold: 5", "threshold: 10001") + "}\n", 3, "from 1 to 10000"),
        ("  - " + ENTRY.replace("threshold: 5", "threshold: '5'") + "}\n", 3, "not '5'"),
        (
            "  - " + ENTRY.replace("key: ip", "key: header") + "}\n",
            3,
            "key must be ip or subject, not 'header'",
        ),
        (
            "  - " + ENTRY.replace("counts: denials", "counts: paths") + "}\n",
            3,
            "counts must be one of denials, denied_paths, failed_credentials",
        ),
        (
            "  - " + ENTRY.replace("action: ban", "action: block") + "}\n",
            3,
            "action must be one of ban, throttle, none",
        ),
        ("  - " + ENTRY.replace(", for: 10m", "") + "}\n", 3, "action ban needs `for`"),
        (
            "  - " + ENTRY.replace("action: ban", "action: none") + "}\n",
            3,
            "action none lasts no time",
        ),
        (
            "  - " + ENTRY.replace("window: 1m", "window: 0s") + "}\n",
            3,
            "window must be from 1s to 7d",
        ),
        ("  - " + ENTRY.replace("for: 10m", "for: 8d") + "}\n", 3, "for must be from 1s to 7d"),
        ("  - " + ENTRY.replace("window: 1m", "window: soon") + "}\n", 3, "expected a duration"),
        ("  - " + ENTRY + ", extra: 1}\n", 3, "unknown key 'extra' in watch[0]"),
        ("  - " + ENTRY.replace("name: w", "name: 'a b'") + "}\n", 3, "may hold only letters"),
        ("  - " + ENTRY + "}\n  - " + ENTRY + "}\n", 4, "duplicate watch name 'w'"),
        ("  - {name: w}\n", 3, "watch[0] needs 'action'"),
        ("  x: 1\n", 2, "the policy.watch must be a list"),
    ],
)
def test_a_bad_watch_is_refused_naming_file_and_line(watch: str, line: int, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        policy_with(watch)
    assert (e.value.file, e.value.line) == ("p.yaml", line)


def test_a_watch_loads_as_written() -> None:
    p = policy_with(
        "  - {name: probing, key: ip, counts: denied_paths, threshold: 20, window: 1m,"
        " action: ban, for: 10m}\n"
        "  - {name: guessing, key: subject, counts: failed_credentials, threshold: 5,"
        " window: 5m, action: throttle, for: 300}\n"
        "  - {name: noisy, key: ip, counts: denials, threshold: 100, window: 1h, action: none}\n"
    )
    got = [
        (w.name, w.key, w.counts, w.threshold, w.window, w.action, w.duration, w.line)
        for w in p.watch
    ]
    assert got == [
        ("probing", "ip", "denied_paths", 20, 60, "ban", 600, 3),
        ("guessing", "subject", "failed_credentials", 5, 300, "throttle", 300, 4),
        ("noisy", "ip", "denials", 100, 3600, "none", 0, 5),
    ]
    assert [w.acts for w in p.watch] == ["ban 600s", "throttle 300s", "none"]


BASIC = "authn: {basic: {htpasswd: users.htpasswd}}\n"


def entry(key: str, counts: str, threshold: int, action: str = "ban, for: 1h") -> str:
    return (
        f"{{name: w, key: {key}, counts: {counts}, threshold: {threshold}, window: 1m, "
        f"action: {action}}}"
    )


@pytest.mark.parametrize(
    "watch, more, expected",
    [
        (entry("ip", "denied_paths", 2), "", {"watch-hair-trigger"}),
        (entry("ip", "denials", 1, "throttle, for: 1m"), "", {"watch-hair-trigger"}),
        (entry("ip", "denials", 1, "none"), "", set()),  # an event only: fine
        (entry("ip", "failed_credentials", 1), "", set()),  # a wrong password is no slip
        (entry("ip", "denied_paths", 20), "", set()),
        (entry("subject", "failed_credentials", 5), "", {"watch-never-counts"}),
        (entry("subject", "failed_credentials", 5), BASIC, set()),
        (entry("subject", "denials", 5), "", {"watch-never-counts"}),
        (entry("subject", "denials", 5), BASIC, set()),
    ],
)
def test_lint_says_when_a_watch_is_nonsensical(
    tmp_path: Path, watch: str, more: str, expected: set[str]
) -> None:
    (tmp_path / "users.htpasswd").write_text(
        f"alice:{bcrypt.hashpw(b'pw', bcrypt.gensalt(10)).decode()}\n"
    )
    text = f"version: 1\n{more}watch:\n  - {watch}\n{RULES}"
    policy = parse_policy(text, str(tmp_path / "p.yaml"), tmp_path)
    found = [f for f in lint(policy) if f.code.startswith("watch-")]
    assert {f.code for f in found} == expected
    assert all(f.line == policy.watch[0].line for f in found)


# --- what a decision counts toward (the real core) ------------------------------------------

AUTHN = f"""\
authn:
  jwt:
    - name: demo
      issuer: https://issuer.example
      audience: api
      algorithms: [RS256]
      jwks_file: {JWKS}
  basic: {{htpasswd: users.htpasswd}}
"""
CORE = f"""\
version: 1
{AUTHN}limits:
  - {{name: per-ip, key: ip, rate: 2/minute}}
watch:
  - {entry("ip", "denials", 9, "none").replace("name: w", "name: d-ip")}
  - {entry("subject", "denied_paths", 9, "none").replace("name: w", "name: p-sub")}
  - {entry("ip", "failed_credentials", 9, "none").replace("name: w", "name: f-ip")}
  - {entry("subject", "failed_credentials", 9, "none").replace("name: w", "name: f-sub")}
rules:
  - {{name: open, match: {{path: /open}}, allow: anyone}}
  - {{name: admin, match: {{path: "/admin/**"}}, allow: {{role: admin}}}}
  - {{name: secret, match: {{path: "/secret/**"}}, allow: {{role: admin}}, hide: true}}
  - {{name: login, match: {{path: /login}}, allow: authenticated, login_url: /sign-in}}
"""


@pytest.fixture(scope="module")
def core_policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    folder = tmp_path_factory.mktemp("core")
    (folder / "users.htpasswd").write_text(
        f"alice:{bcrypt.hashpw(b'right', bcrypt.gensalt(4)).decode()}\n"
    )
    return parse_policy(CORE, str(folder / "p.yaml"), folder)


def basic(user: str, password: str) -> tuple[str, str]:
    import base64

    return ("authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())


@pytest.mark.parametrize(
    "path, who, headers, counted",
    [
        ("/open", None, (), []),  # allowed: never counted
        ("/nowhere", None, (), [("d-ip", "ip:10.0.0.1", None)]),  # 404
        ("/a%2fb", None, (), [("d-ip", "ip:10.0.0.1", None)]),  # 400 bad path
        ("/admin/x", None, (), [("d-ip", "ip:10.0.0.1", None)]),  # 401 no credentials
        (
            "/admin/x",
            "user",
            (),
            [
                ("d-ip", "ip:10.0.0.1", None),
                ("p-sub", "sub:https://issuer.example:alice", "/admin/x"),
            ],
        ),
        # a hidden rule's 404 to a proven caller: by address and by that caller
        # (the client's answer is the unknown path's; the gateway knows who asked)
        (
            "/secret/x",
            "user",
            (),
            [
                ("d-ip", "ip:10.0.0.1", None),
                ("p-sub", "sub:https://issuer.example:alice", "/secret/x"),
            ],
        ),
        (
            "/admin/x",
            "bad-token",
            (),
            [("d-ip", "ip:10.0.0.1", None), ("f-ip", "ip:10.0.0.1", None)],
        ),
        # a wrong password counts against the user it names, unproven
        (
            "/admin/x",
            None,
            (basic("alice", "wrong"),),
            [
                ("d-ip", "ip:10.0.0.1", None),
                ("f-ip", "ip:10.0.0.1", None),
                ("f-sub", "sub:basic:alice", None),
            ],
        ),
        (
            "/login",
            None,
            (("accept", "text/html"), ("sec-fetch-mode", "navigate")),
            [],
        ),  # 303 to sign in
    ],
)
def test_what_a_decision_counts_toward(
    core_policy: Policy, token: Callable[..., str], path: str, who: str | None,
    headers: tuple[tuple[str, str], ...], counted: list[tuple[str, str, str | None]],
) -> None:  # fmt: skip
    h = list(headers)
    if who == "user":
        h.append(("authorization", f"Bearer {token(sub='alice', roles=['user'])}"))
    elif who == "bad-token":
        h.append(("authorization", f"Bearer {token(sub='alice')[:-4]}AAAA"))
    d = judge(
        core_policy, RequestView.build("GET", path, h, "10.0.0.1"), time.time(), MemoryStore()
    )
    ids = iter(range(100))
    found = observations(core_policy, d, path, lambda: f"id{next(ids)}")
    got = [
        (o.spec.name, o.key, o.member if o.spec.counts == "denied_paths" else None) for o in found
    ]
    assert got == counted
    assert all(o.member.startswith("id") for o in found if o.spec.counts != "denied_paths")


def test_a_rate_limited_request_is_not_counted(core_policy: Policy) -> None:
    store = MemoryStore()
    view = RequestView.build("GET", "/nowhere", (), "10.0.0.2")
    decisions = [judge(core_policy, view, 1000.0, store) for _ in range(3)]
    assert [d.status for d in decisions] == [404, 404, 429]
    assert observations(core_policy, decisions[2], "/nowhere", str) == ()


@pytest.mark.parametrize(
    "old, new, kept",
    [
        (None, Ban("throttle", "g", 10), "new"),
        (Ban("ban", "p", 20), Ban("throttle", "g", 10), "old"),  # a throttle never softens a ban
        (Ban("ban", "p", 20), Ban("ban", "q", 10), "old"),  # nor does a shorter ban shorten it
        (Ban("ban", "p", 10), Ban("ban", "q", 20), "new"),
        (Ban("throttle", "g", 20), Ban("ban", "p", 10), "new"),  # a ban is stronger
        (Ban("throttle", "g", 10), Ban("throttle", "h", 20), "new"),
        (Ban("ban", "p", 10), Ban("throttle", "g", 20), "new"),  # lasts longer
    ],
)
def test_which_ban_stays_on_a_key(old: Ban | None, new: Ban, kept: str) -> None:
    assert stronger(old, new) is (old if kept == "old" else new)


def test_a_ban_by_a_watch_the_policy_no_longer_has_is_not_enforced() -> None:
    p = policy_with(f"  - {entry('ip', 'denials', 5).replace('name: w', 'name: probing')}\n")
    view = RequestView.build("GET", "/a", (), "10.0.0.3")
    bans = {"ip:10.0.0.3": Ban("ban", "probing", 100.0)}
    assert judge(p, view, 50.0, MemoryStore(), bans=bans).status == 403
    assert judge(p, view, 100.0, MemoryStore(), bans=bans).status == 0  # ended
    gone = {"ip:10.0.0.3": Ban("ban", "renamed", 100.0)}
    assert judge(p, view, 50.0, MemoryStore(), bans=gone).status == 0


# --- real gateways ------------------------------------------------------------------------------

POLICY = f"""\
version: 1
realm: api
client_ip:
  trusted_proxies: [127.0.0.1/32]
ip:
  block: [127.0.0.3]
{AUTHN}watch:
  - {{name: probing, key: ip, counts: denied_paths, threshold: 20, window: 1m,
      action: ban, for: BAN}}
  - {{name: prowling, key: subject, counts: denied_paths, threshold: 25, window: 1m,
      action: ban, for: BAN}}
  - {{name: guessing, key: ip, counts: failed_credentials, threshold: 5, window: 1m,
      action: throttle, for: 30s}}
  - {{name: account, key: subject, counts: failed_credentials, threshold: 8, window: 1m,
      action: throttle, for: 30s}}
rules:
  - {{name: health, match: {{path: /health}}, allow: anyone}}
  - {{name: me, match: {{path: /me}}, allow: authenticated, accept: [jwt]}}
  - {{name: admin, match: {{path: "/admin/**"}}, allow: {{role: admin}}, accept: [jwt]}}
  - {{name: reports, match: {{path: "/reports/**"}}, allow: authenticated, accept: [basic]}}
"""


def write_policy(folder: Path, ban: str = "3s", mode: str = "") -> Path:
    users = [("alice", b"right"), ("bob", b"bobs")]
    lines = [f"{u}:{bcrypt.hashpw(p, bcrypt.gensalt(4)).decode()}" for u, p in users]
    (folder / "users.htpasswd").write_text("\n".join(lines) + "\n")
    path = folder / "watch.yaml"
    path.write_text(POLICY.replace("BAN", ban) + (f"mode: {mode}\n" if mode else ""))
    return path


@pytest.fixture
def gateway(backend: Backend, tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    running: list[RunningGateway] = []

    def start(policy: Path, *sets: str) -> RunningGateway:
        log = tmp_path / "decisions.jsonl"
        g = RunningGateway(policy, backend.url, [f"authgate_log={log}", *sets], gateway=Recording())
        running.append(g)
        return g

    yield start
    for g in running:
        g.stop()


def events(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "decisions.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [x for x in lines if x.get("event") == "watch"]


def without_ids(r: Reply) -> tuple[int, list[tuple[str, str]], bytes]:
    """An answer as two answers to two requests can be identical: Date and the
    request id set aside (the id is in the body too)."""
    rid = r.header("X-Request-Id") or "-"
    headers = sorted(
        (k.lower(), v) for k, v in r.headers if k.lower() not in ("date", "x-request-id")
    )
    return r.status, headers, r.body.replace(rid.encode(), b"ID")


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def basic_auth(user: str, password: str) -> list[tuple[str, str]]:
    return [basic(user, password)]


def test_a_user_probing_30_admin_paths_is_banned_with_the_block_lists_403(
    gateway: Callable[..., RunningGateway],
    backend: Backend,
    tmp_path: Path,
    token: Callable[..., str],
) -> None:
    gw = gateway(write_policy(tmp_path, ban="6s"))  # long enough for a busy machine
    user = bearer(token(sub="mallory", roles=["user"]))
    probes = [send(gw.address, "GET", f"/admin/p{i}", user, source="127.0.0.2") for i in range(30)]
    banned_at = time.monotonic()
    assert [r.status for r in probes] == [403] * 30
    assert backend.seen == []
    # The first 20 were the rule's 403 (the 20th reached the threshold); then banned.
    flows = [f for f in gw.addon.flows if f.request.path.startswith("/admin/")]
    reasons = [f.metadata["authgate"]["reason"] for f in flows]
    assert reasons == ["forbidden"] * 20 + ["banned"] * 10
    assert (
        flows[19].marked == WATCH_MARKER
        and "watch probing: ip:127.0.0.2 reached 20" in flows[19].comment
    )
    assert not any(f.marked == WATCH_MARKER for i, f in enumerate(flows) if i != 19)

    # Banned: the block list's very 403 on everything, with or without credentials.
    blocked = [send(gw.address, "GET", p, source="127.0.0.3") for p in ("/health", "/nowhere")]
    for path, anonymous in zip(("/health", "/nowhere"), blocked, strict=True):
        for headers in ([], user):
            reply = send(gw.address, "GET", path, headers, source="127.0.0.2")
            assert without_ids(reply) == without_ids(anonymous)
    assert [without_ids(r) for r in probes[20:]] == [without_ids(probes[20])] * 10
    assert without_ids(probes[20]) == without_ids(
        send(gw.address, "GET", "/admin/p0", user, source="127.0.0.3")
    )
    assert backend.seen == []
    assert send(gw.address, "GET", "/health", source="127.0.0.1").status == 200  # others go on
    # `authgate.explain` (and the flow's content view) tell why.
    gw.addon.explain([flows[25]])
    assert "ip:127.0.0.2: banned by watch probing for another" in flows[25].comment
    assert "=> 403 Forbidden   (reason banned, no rule; detail: probing)" in flows[25].comment

    # One event, in the decision log and the metrics.
    (event,) = events(tmp_path)
    told = ("event", "kind", "counts", "key", "count", "window", "action")
    assert {k: event[k] for k in told} == {
        "event": "watch", "kind": "probing", "counts": "denied_paths", "key": "ip:127.0.0.2",
        "count": 20, "window": 60, "action": "ban 6s",
    }  # fmt: skip
    assert event["request_id"] == flows[19].metadata["authgate"]["request_id"]
    from prometheus_client import generate_latest

    text = generate_latest(gw.addon.metrics.registry).decode()
    assert 'authgate_watch_events_total{action="ban",watch="probing"} 1.0' in text
    assert 'authgate_decisions_total{decision="deny",reason="banned",rule="-",status="403"}' in text

    # The ban ends by itself after its 6 s; nothing reached the backend before.
    wait_until(
        lambda: send(gw.address, "GET", "/health", source="127.0.0.2").status == 200, every=0.2
    )
    assert time.monotonic() - banned_at > 5.5
    assert [s.target for s in backend.seen] == ["/health", "/health"]
    assert gw.addon.house.list_bans() == []


def test_a_subject_probing_from_several_addresses_is_banned_where_it_is_known(
    gateway: Callable[..., RunningGateway],
    backend: Backend,
    tmp_path: Path,
    token: Callable[..., str],
) -> None:
    gw = gateway(write_policy(tmp_path, ban="10m"), "authgate_admin=127.0.0.1:0")
    alice = bearer(token(sub="alice", roles=["user"]))
    statuses = [
        send(gw.address, "GET", f"/admin/x{i}", alice, source=f"127.0.0.{10 + i % 3}").status
        for i in range(25)
    ]
    assert statuses == [403] * 25  # 8 or 9 a client address: under its threshold of 20
    assert backend.seen == []
    (event,) = events(tmp_path)
    assert (event["kind"], event["key"]) == ("prowling", "sub:https://issuer.example:alice")
    # Banned wherever alice is known, from any address, even where she is allowed ...
    me = send(gw.address, "GET", "/me", alice, source="127.0.0.20")
    assert me.status == 403 and me.header("WWW-Authenticate") is None
    assert without_ids(me) == without_ids(send(gw.address, "GET", "/health", source="127.0.0.3"))
    # ... while others are not, and an unknown path is still the unknown path's 404.
    assert (
        send(gw.address, "GET", "/me", bearer(token(sub="bob")), source="127.0.0.20").status == 200
    )
    assert send(gw.address, "GET", "/nowhere", alice, source="127.0.0.20").status == 404
    # The addresses are not banned.
    assert send(gw.address, "GET", "/health", source="127.0.0.10").status == 200
    assert [s.target for s in backend.seen] == ["/me", "/health"]
    # Lifted by the key /bans lists, its slashes percent-encoded.
    assert gw.addon.house.admin is not None
    port = gw.addon.house.admin.port
    key = "sub:https://issuer.example:alice"
    assert [b["key"] for b in admin(port, "GET", "/bans")[1]["bans"]] == [key]
    lifted = admin(port, "DELETE", "/bans/sub:https:%2F%2Fissuer.example:alice")
    assert lifted == (200, {"lifted": key})
    assert send(gw.address, "GET", "/me", alice, source="127.0.0.20").status == 200


def test_a_client_cycling_passwords_gets_429_with_retry_after(
    gateway: Callable[..., RunningGateway], backend: Backend, tmp_path: Path
) -> None:
    gw = gateway(write_policy(tmp_path))
    guesses = [f"guess{i}" for i in range(5)]
    replies = [
        send(gw.address, "GET", "/reports/q1", basic_auth("alice", p), source="127.0.0.7")
        for p in guesses
    ]
    assert [r.status for r in replies] == [401] * 5
    # Throttled: a rate limit, not a permission. The right password gets the
    # same 429 (no oracle), and so does everything else from that address.
    for headers, path in (
        (basic_auth("alice", "right"), "/reports/q1"),
        ([], "/health"),
        ([], "/nowhere"),
    ):
        r = send(gw.address, "GET", path, headers, source="127.0.0.7")
        assert r.status == 429, path
        assert 1 <= int(r.header("Retry-After") or 0) <= 30
        assert r.header("WWW-Authenticate") is None
    assert backend.seen == []
    (event,) = events(tmp_path)
    assert (event["kind"], event["key"], event["action"], event["count"]) == (
        "guessing",
        "ip:127.0.0.7",
        "throttle 30s",
        5,
    )
    # Another address with the right password is let in.
    assert (
        send(
            gw.address, "GET", "/reports/q1", basic_auth("alice", "right"), source="127.0.0.8"
        ).status
        == 200
    )
    assert [s.target for s in backend.seen] == ["/reports/q1"]


def test_guessing_one_account_from_many_addresses_throttles_the_account(
    gateway: Callable[..., RunningGateway], backend: Backend, tmp_path: Path
) -> None:
    gw = gateway(write_policy(tmp_path))
    statuses = [
        send(
            gw.address,
            "GET",
            "/reports/q",
            basic_auth("alice", f"g{i}"),
            source=f"127.0.1.{i % 2 + 1}",
        ).status
        for i in range(8)  # 4 an address: under the address's threshold of 5
    ]
    assert statuses == [401] * 8
    (event,) = events(tmp_path)
    assert (event["kind"], event["key"]) == ("account", "sub:basic:alice")
    # alice is throttled from a fresh address, her right password included; bob is not.
    r = send(gw.address, "GET", "/reports/q", basic_auth("alice", "right"), source="127.0.1.9")
    assert r.status == 429 and 1 <= int(r.header("Retry-After") or 0) <= 30
    assert (
        send(gw.address, "GET", "/reports/q", basic_auth("bob", "bobs"), source="127.0.1.9").status
        == 200
    )
    assert send(gw.address, "GET", "/health", source="127.0.1.1").status == 200
    assert [s.target for s in backend.seen] == ["/reports/q", "/health"]


def test_report_mode_counts_and_tells_but_never_bans(
    gateway: Callable[..., RunningGateway],
    backend: Backend,
    tmp_path: Path,
    token: Callable[..., str],
) -> None:
    gw = gateway(write_policy(tmp_path, ban="10m"), "authgate_mode=report")
    user = bearer(token(sub="mallory", roles=["user"]))
    replies = [send(gw.address, "GET", f"/admin/p{i}", user, source="127.0.0.2") for i in range(45)]
    assert {r.status for r in replies} == {200}  # report mode forwards everything
    assert len(backend.seen) == 45
    found = events(tmp_path)
    # 45 denied paths: the address's threshold of 20 reached twice (the count
    # starts again each time), the subject's 25 once.
    got = sorted((e["kind"], e["count"]) for e in found)
    assert got == [("probing", 20), ("probing", 20), ("prowling", 25)]
    assert all(e["action"] == "none" and e["would"] == "ban 600s" for e in found)
    assert gw.addon.house.bans == {}
    assert send(gw.address, "GET", "/health", source="127.0.0.2").status == 200
    from prometheus_client import generate_latest

    text = generate_latest(gw.addon.metrics.registry).decode()
    assert 'authgate_watch_events_total{action="report",watch="probing"} 2.0' in text


def admin(port: int, method: str, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=REQUEST_SECONDS) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body.startswith(b"{") else body


def test_the_admin_listener_lists_bans_and_lifts_one(
    gateway: Callable[..., RunningGateway],
    backend: Backend,
    tmp_path: Path,
    token: Callable[..., str],
) -> None:
    gw = gateway(write_policy(tmp_path, ban="10m"), "authgate_admin=127.0.0.1:0")
    assert gw.addon.house.admin is not None
    port = gw.addon.house.admin.port
    assert admin(port, "GET", "/bans") == (200, {"bans": []})
    for i in range(20):
        send(gw.address, "GET", f"/p{i}", source="127.0.0.2")  # 404s: unknown paths are probes too
    for i in range(5):
        send(gw.address, "GET", "/reports/x", basic_auth("eve", f"g{i}"), source="127.0.0.5")
    code, body = admin(port, "GET", "/bans")
    assert code == 200
    assert [(b["key"], b["action"], b["watch"]) for b in body["bans"]] == [
        ("ip:127.0.0.2", "ban", "probing"),
        ("ip:127.0.0.5", "throttle", "guessing"),
    ]
    assert 590 < body["bans"][0]["seconds_left"] <= 600
    assert admin(port, "GET", "/status")[1]["bans"] == body["bans"]
    assert send(gw.address, "GET", "/health", source="127.0.0.2").status == 403

    # Lift one: the key as listed, percent-encoded as one path segment.
    assert admin(port, "DELETE", "/bans/ip%3A127.0.0.2") == (200, {"lifted": "ip:127.0.0.2"})
    assert send(gw.address, "GET", "/health", source="127.0.0.2").status == 200
    assert [b["key"] for b in admin(port, "GET", "/bans")[1]["bans"]] == ["ip:127.0.0.5"]
    assert admin(port, "DELETE", "/bans/ip:127.0.0.2")[0] == 404  # none in force any more
    assert admin(port, "DELETE", "/bans/")[0] == 400
    assert admin(port, "DELETE", "/status")[0] == 405
    assert admin(port, "POST", "/bans/ip:127.0.0.5")[0] == 501  # lifting is DELETE only
    assert send(gw.address, "GET", "/health", source="127.0.0.5").status == 429
    # An IPv4-mapped spelling names the same address.
    assert admin(port, "DELETE", "/bans/ip:::ffff:127.0.0.5") == (200, {"lifted": "ip:127.0.0.5"})
    assert send(gw.address, "GET", "/health", source="127.0.0.5").status == 200
    lifts = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lifts if x.get("event") == "lift"] == ["ip:127.0.0.2", "ip:127.0.0.5"]


def test_the_decision_service_enforces_bans_too(tmp_path: Path, demo_key: Any) -> None:
    from test_service import Serve, admin_get, ask, auth

    policy = write_policy(tmp_path, ban="10m")
    log = tmp_path / "service.jsonl"
    admin_port = free_port()
    service = Serve(
        tmp_path,
        policy,
        "--set",
        f"authgate_log={log}",
        "--admin",
        f"127.0.0.1:{admin_port}",
        name="svc",
    )
    try:
        service.wait_listening()
        prober = ("X-Forwarded-For", "198.51.100.7")
        statuses = [
            ask(service.address, "GET", "/auth", auth(f"/p{i}", prober)).status for i in range(20)
        ]
        assert statuses == [404] * 20
        # Banned: the block list's 403 for every original request from that client.
        blocked = ask(
            service.address, "GET", "/auth", auth("/health", ("X-Forwarded-For", "127.0.0.3"))
        )
        for path in ("/health", "/nowhere"):
            r = ask(service.address, "GET", "/auth", auth(path, prober))
            assert without_ids(r) == without_ids(blocked)
            assert r.header("X-Authgate-Decision") == "deny"
        other = ask(
            service.address, "GET", "/auth", auth("/health", ("X-Forwarded-For", "198.51.100.8"))
        )
        assert other.status == 200 and other.header("X-Authgate-Decision") == "allow"
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        (event,) = [x for x in lines if x.get("event") == "watch"]
        assert (event["kind"], event["key"], event["action"]) == (
            "probing",
            "ip:198.51.100.7",
            "ban 600s",
        )
        assert [b["key"] for b in admin_get(admin_port, "/bans")[1]["bans"]] == ["ip:198.51.100.7"]
    finally:
        service.stop()


def free_port() -> int:
    from ports import free_port as free

    return free()


def test_the_example_policy_does_what_its_comment_says(token: Callable[..., str]) -> None:
    from authgate.house.gatehouse import Gatehouse

    house = Gatehouse()
    house.load(str(POLICIES / "watch.yaml"), False, "")
    policy = house.policy
    assert policy is not None

    def ask(path: str, peer: str, headers: list[tuple[str, str]]) -> tuple[int, list[str]]:
        judged = house.judge_now(policy, RequestView.build("GET", path, headers, peer), time.time())
        assert judged is not None
        d, found = judged
        return d.status, [f"{e.spec.name} {e.action}" for e in found]

    # 20 paths it may not have, in a minute: banned for 10 minutes, on everything.
    user = bearer(token(sub="alice", roles=["user"]))
    probes = [ask(f"/admin/p{i}", "203.0.113.1", user) for i in range(20)]
    assert probes == [(403, [])] * 19 + [(403, ["probing ban 600s"])]
    assert ask("/health", "203.0.113.1", []) == (403, [])
    assert ask("/api/things", "203.0.113.2", user) == (0, [])  # others go on
    # 10 tokens that fail in 5 minutes: throttled for 5, the right one too.
    bad = bearer(token(sub="alice")[:-4] + "AAAA")
    guesses = [ask("/api/things", "203.0.113.3", bad) for _ in range(10)]
    assert guesses == [(401, [])] * 9 + [(401, ["guessing throttle 300s"])]
    assert ask("/api/things", "203.0.113.3", user) == (429, [])
    assert [(b["key"], b["action"]) for b in house.list_bans()] == [
        ("ip:203.0.113.1", "ban"),
        ("ip:203.0.113.3", "throttle"),
    ]


def test_with_workers_the_supervisor_lists_and_lifts_every_workers_bans(
    tmp_path: Path, backend: Backend, demo_key: Any
) -> None:
    from test_production import run

    policy = write_policy(tmp_path, ban="10m")
    gateways: list[Any] = []
    try:
        g = run(gateways, tmp_path, "--policy", str(policy), "--upstream", backend.url,
                "--workers", "2")  # fmt: skip
        g.wait_ready()
        # The memory store: each worker counts on its own; 60 probes, so that
        # at least one worker sees 20 (the kernel spreads the connections).
        for i in range(60):
            send(g.address, "GET", f"/p{i}", source="127.0.0.2")

        def listed() -> list[str]:
            return [b["key"] for b in admin(g.admin, "GET", "/bans")[1]["bans"]]

        wait_until(lambda: listed() == ["ip:127.0.0.2"], what="the ban in /bans")
        assert admin(g.admin, "DELETE", "/bans/ip:127.0.0.9")[0] == 404
        assert admin(g.admin, "DELETE", "/bans/ip:127.0.0.2") == (200, {"lifted": "ip:127.0.0.2"})
        wait_until(lambda: listed() == [], what="every worker lifted it")
        assert [send(g.address, "GET", "/health", source="127.0.0.2").status
                for _ in range(10)] == [200] * 10  # fmt: skip
        assert backend.seen and {s.target for s in backend.seen} == {"/health"}
    finally:
        for gw in gateways:
            gw.stop()
