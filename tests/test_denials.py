"""`authgate denials`: each finding on synthetic log entries (tables), the log
reader (gzip, rotation, junk, the fast path for allowed lines), and a real
gateway under scripted traffic whose log the real command reads."""

from __future__ import annotations

import base64
import gzip
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.cli import main
from authgate.core import conditions as c
from authgate.core.credentials import BASIC, JWT, Presented
from authgate.core.decision import Decision, RequestView, describe, judge
from authgate.core.identity import Identity
from authgate.house.gatehouse import Gatehouse
from authgate.policy.load import load_policy
from authgate.runtime.stores import MemoryStore
from authgate.tools import denials as dn
from authgate.tools.keys import DEMO_AUDIENCE, DEMO_ISSUER
from conftest import POLICIES, ROOT, Backend, RunningGateway, send, wait_until

T0 = 1_800_000_000.0
AUTHGATE = Path(sys.executable).parent / "authgate"
Entries = list[dict[str, Any]]


def allow(
    t: float,
    rule: str | None,
    subject: str | None = None,
    *,
    ip: str = "10.0.0.1",
    path: str = "/x",
    method: str = "GET",
) -> dict[str, Any]:
    """An allowed request's entry, in the gateway's key order."""
    return {
        "time": T0 + t,
        "request_id": "0" * 32,
        "client_ip": ip,
        "method": method,
        "path": path,
        "rule": rule,
        "decision": "allow",
        "status": None,
        "reason": "allowed",
        "subject": subject,
        "via": "authorization" if subject else None,
    }


def deny(
    t: float,
    rule: str | None,
    status: int,
    reason: str,
    subject: str | None = None,
    *,
    ip: str = "10.0.0.1",
    path: str = "/x",
    method: str = "GET",
    would: bool = False,
    **extra: str,
) -> dict[str, Any]:
    """A denial's entry (a would-deny with `would`); `extra`: detail, condition, ..."""
    entry = allow(t, rule, subject, ip=ip, path=path, method=method)
    entry.update(decision="would_deny" if would else "deny", status=status, reason=reason)
    entry.update(extra)
    return entry


def lines(entries: Entries) -> list[str]:
    return [json.dumps(e, separators=(",", ":")) + "\n" for e in entries]


def report(entries: Entries, policy: Any = None, **thresholds: Any) -> dn.Report:
    a = dn.Analysis(dn.Thresholds(**thresholds))
    a.read(lines(entries))
    return a.report(["log"], policy)


def kinds(r: dn.Report, kind: str) -> list[dn.Finding]:
    return [f for f in r.findings if f.kind == kind]


def forbid(
    t: float, rule: str, subject: str, condition: str = "role admin=false", **kw: Any
) -> dict[str, Any]:
    return deny(t, rule, 403, "forbidden", subject, condition=condition, **kw)


# --- what the log records ---------------------------------------------------------------


def test_the_fingerprint_is_keyed_per_process_and_never_the_credential() -> None:
    tried = Presented(BASIC, "authorization", "carol:s3cret-\ud800")  # any str
    d = Decision(False, 401, "invalid_credentials", rule="r", detail="wrong_password",
                 rejected=tried)  # fmt: skip
    one, other = Gatehouse(), Gatehouse()  # two processes' worth
    first, again = (one.record(d, None, "GET", "/x") for _ in range(2))
    elsewhere = other.record(d, None, "GET", "/x")
    assert re.fullmatch(r"[0-9a-f]{12}", first["cred_fp"])
    assert first["cred_fp"] == again["cred_fp"] != elsewhere["cred_fp"]
    assert (first["user"], first["detail"]) == ("carol", "wrong_password")
    assert "s3cret" not in json.dumps(first)
    token = Presented(JWT, "authorization", "a.b.c")
    entry = one.record(replace(d, reason="invalid_token", rejected=token), None, "GET", "/x")
    assert "user" not in entry and entry["cred_fp"] != first["cred_fp"]
    allowed = one.record(Decision(True, 0, "allowed", rule="r"), None, "GET", "/x")
    assert not {"detail", "condition", "cred_fp", "user"} & set(allowed)


# --- refusing rules -----------------------------------------------------------------

BILLING = "all of(authenticated=true, role biling=false)"

REFUSING: list[tuple[str, Entries, dict[str, Any] | None]] = [
    (
        "every caller refused: the failed branch named",
        [forbid(i, "billing", s, BILLING) for i, s in enumerate(["alice", "bob", "dave"])],
        {
            "refused_callers": 3,
            "allowed_callers": 0,
            "refused_requests": 3,
            "failed": [{"leaf": "role biling", "callers": 3}],
        },
    ),
    (
        "nine refused, one allowed: 90%",
        [forbid(i, "r", f"u{i}") for i in range(9)] + [allow(10, "r", "boss")],
        {
            "refused_callers": 9,
            "allowed_callers": 1,
            "refused_requests": 9,
            "failed": [{"leaf": "role admin", "callers": 9}],
        },
    ),
    (
        "two of three refused: under 90%",
        [forbid(0, "r", "a"), forbid(1, "r", "b"), allow(2, "r", "c")],
        None,
    ),
    ("two callers: too few to say", [forbid(0, "r", "a"), forbid(1, "r", "b")], None),
    (
        "callers refused on one record and allowed on theirs do not count (ownership)",
        [forbid(i, "r", s) for i, s in enumerate("abcd")]
        + [allow(10 + i, "r", s) for i, s in enumerate("abcd")],
        None,
    ),
    (
        "anonymous 401s are not refused callers",
        [deny(i, "r", 401, "no_credentials") for i in range(10)],
        None,
    ),
    (
        "a hidden rule refusing every caller (404, the reason in detail)",
        [
            deny(i, "ops", 404, "hidden", s, detail="forbidden", condition="role ops=false")
            for i, s in enumerate("abc")
        ],
        {
            "refused_callers": 3,
            "allowed_callers": 0,
            "refused_requests": 3,
            "failed": [{"leaf": "role ops", "callers": 3}],
        },
    ),
    (
        "report mode: would-denies are not refusals (see report_mode)",
        [forbid(i, "r", s, would=True) for i, s in enumerate("abc")],
        None,
    ),
]


@pytest.mark.parametrize(
    "entries, expected", [r[1:] for r in REFUSING], ids=[r[0] for r in REFUSING]
)
def test_refusing_rule(entries: Entries, expected: dict[str, Any] | None) -> None:
    found = kinds(report(entries), dn.REFUSING_RULE)
    if expected is None:
        assert found == []
        return
    [f] = found
    assert {k: f.evidence[k] for k in expected} == expected
    assert f.evidence["callers"] == expected["refused_callers"] + expected["allowed_callers"]
    assert f.suggestion


def test_refusing_rule_thresholds_are_the_options() -> None:
    entries = [forbid(0, "r", "a"), forbid(1, "r", "b"), allow(2, "r", "c")]
    assert kinds(report(entries, rule_refused=66), dn.REFUSING_RULE)
    assert not kinds(report(entries, rule_refused=67), dn.REFUSING_RULE)
    two = [forbid(0, "r", "a"), forbid(1, "r", "b")]
    assert kinds(report(two, rule_callers=2), dn.REFUSING_RULE)


# --- probing ---------------------------------------------------------------------------


def hidden(t: float, subject: str | None, path: str, **kw: Any) -> dict[str, Any]:
    detail = "forbidden" if subject else "no_credentials"
    return deny(t, "admin", 404, "hidden", subject, path=path, detail=detail, **kw)


PROBING: list[tuple[str, Entries, dict[str, Any] | None]] = [
    (
        "ten distinct paths in a minute",
        [hidden(6 * i, "alice", f"/admin/{i}") for i in range(10)],
        {"caller": {"subject": "alice"}, "distinct_paths_in_window": 10, "refusals": 10},
    ),
    ("nine distinct paths", [hidden(i, "alice", f"/admin/{i}") for i in range(9)], None),
    (
        "ten paths, one every two minutes: never ten in five minutes",
        [hidden(120 * i, "alice", f"/admin/{i}") for i in range(10)],
        None,
    ),
    ("one path fifty times", [hidden(i, "alice", "/admin/x") for i in range(50)], None),
    (
        "anonymous scanner: unknown paths, by address",
        [deny(i, None, 404, "no_rule", ip="192.0.2.7", path=f"/.env{i}") for i in range(12)],
        {"caller": {"address": "192.0.2.7"}, "distinct_paths_in_window": 12, "refusals": 12},
    ),
    (
        "403s on many rules count as well",
        [forbid(i, f"rule{i}", "bob", path=f"/r{i}") for i in range(10)],
        {"caller": {"subject": "bob"}, "distinct_paths_in_window": 10, "refusals": 10},
    ),
    (
        "401s are not probing (a client without its token)",
        [deny(i, "api", 401, "no_credentials", path=f"/api/{i}") for i in range(20)],
        None,
    ),
    (
        "a blocked address is refused already",
        [deny(i, None, 403, "ip_blocked", path=f"/{i}") for i in range(20)],
        None,
    ),
    (
        "two callers, six paths each, are two callers",
        [hidden(i, "alice" if i % 2 else "bob", f"/admin/{i}") for i in range(12)],
        None,
    ),
]


@pytest.mark.parametrize("entries, expected", [r[1:] for r in PROBING], ids=[r[0] for r in PROBING])
def test_probing(entries: Entries, expected: dict[str, Any] | None) -> None:
    found = kinds(report(entries), dn.PROBING)
    if expected is None:
        assert found == []
        return
    [f] = found
    assert {k: f.evidence[k] for k in expected} == expected


def test_probing_window_is_the_option() -> None:
    entries = [hidden(120 * i, "alice", f"/admin/{i}") for i in range(10)]
    [f] = kinds(report(entries, window=3600), dn.PROBING)
    assert f.evidence["distinct_paths_in_window"] == 10
    assert kinds(report(entries[:5], window=3600, probe_paths=5), dn.PROBING)


# --- credential guessing -------------------------------------------------------------


def failed(
    t: float,
    fp: str,
    *,
    ip: str = "198.51.100.9",
    user: str | None = "carol",
    reason: str = "invalid_credentials",
    detail: str = "wrong_password",
    **kw: Any,
) -> dict[str, Any]:
    extra = {"detail": detail, "cred_fp": fp} | ({"user": user} if user is not None else {})
    return deny(t, "reports", 401, reason, ip=ip, **extra, **kw)


GUESSING: list[tuple[str, Entries, dict[str, Any] | None]] = [
    (
        "twenty passwords for one user in twenty seconds, then allowed",
        [failed(i, f"{i:012x}") for i in range(20)]
        + [allow(21, "reports", "carol", ip="198.51.100.9")],
        {
            "address": "198.51.100.9",
            "distinct_credentials_in_window": 20,
            "attempts": 20,
            "users": {"carol": 20},
            "failures": {"wrong_password": 20},
            "allowed_after": {
                "time": "2027-01-15T08:00:21Z",
                "subject": "carol",
                "rule": "reports",
            },
        },
    ),
    (
        "one user name each (spraying) counts the same",
        [failed(i, f"{i:012x}", user=f"user{i}") for i in range(10)],
        {"distinct_credentials_in_window": 10, "attempts": 10, "allowed_after": None},
    ),
    (
        "tokens: expired and bad signatures",
        [
            failed(i, f"{i:012x}", user=None, reason="invalid_token", detail="bad_signature")
            for i in range(10)
        ],
        {"distinct_credentials_in_window": 10, "users": {}, "failures": {"bad_signature": 10}},
    ),
    (
        "a stale token sent thirty times is one credential",
        [
            failed(i, "aaaaaaaaaaaa", user=None, reason="invalid_token", detail="expired")
            for i in range(30)
        ],
        None,
    ),
    (
        "ten credentials from ten addresses",
        [failed(i, f"{i:012x}", ip=f"10.0.0.{i}") for i in range(10)],
        None,
    ),
    (
        "ten credentials over an hour",
        [failed(400 * i, f"{i:012x}") for i in range(10)],
        None,
    ),
    (
        "a hidden rule's 401s (detail invalid_credentials) count",
        [
            deny(
                i,
                "ops",
                404,
                "hidden",
                ip="198.51.100.9",
                detail="invalid_credentials",
                cred_fp=f"{i:012x}",
                user="carol",
            )
            for i in range(10)
        ],
        {"distinct_credentials_in_window": 10, "users": {"carol": 10}},
    ),
    (
        "an allowed request before the burst is not 'allowed after'",
        [allow(0, "reports", "carol", ip="198.51.100.9")]
        + [failed(1 + i, f"{i:012x}") for i in range(10)],
        {"distinct_credentials_in_window": 10, "allowed_after": None},
    ),
]


@pytest.mark.parametrize(
    "entries, expected", [r[1:] for r in GUESSING], ids=[r[0] for r in GUESSING]
)
def test_credential_guessing(entries: Entries, expected: dict[str, Any] | None) -> None:
    found = kinds(report(entries), dn.CREDENTIAL_GUESSING)
    if expected is None:
        assert found == []
        return
    [f] = found
    assert {k: f.evidence[k] for k in expected} == expected


def test_memory_follows_the_callers_of_one_window() -> None:
    """5,000 addresses failing once each, a second apart: only the last
    window's are kept, and a burst among them is still found afterwards."""
    ones = [failed(i, f"{i:012x}", ip=f"10.0.{i // 256}.{i % 256}") for i in range(5000)]
    burst = [failed(2500 + i / 10, f"b{i:011x}", ip="192.0.2.9") for i in range(10)]
    a = dn.Analysis()
    a.read(lines(sorted(ones + burst, key=lambda e: e["time"])))
    assert len(a.guessers) <= 2 * 300 + 1
    [f] = kinds(a.report(), dn.CREDENTIAL_GUESSING)
    assert f.evidence["address"] == "192.0.2.9"


def test_a_tally_keeps_a_thousand_names_and_counts_the_rest_together() -> None:
    sprayed = [failed(i / 100, f"{i:012x}", user=f"user{i}") for i in range(1500)]
    [f] = kinds(report(sprayed), dn.CREDENTIAL_GUESSING)
    users = f.evidence["users"]
    assert len(users) == 1001 and users[dn.OTHERS] == 500
    assert f.suggestion.startswith("Password spraying")


# --- hiding revealed --------------------------------------------------------------------

HIDING: list[tuple[str, Entries, dict[str, Any] | None]] = [
    (
        "hidden /admin/x, a 403 on /admin/reports for the same caller",
        [
            hidden(0, "alice", "/admin/x"),
            forbid(1, "admin-reports", "alice", path="/admin/reports"),
        ],
        {
            "hidden_rule": "admin",
            "revealing_rule": "admin-reports",
            "statuses": [403],
            "callers": [{"subject": "alice"}],
        },
    ),
    (
        "the same path by another method, anonymous: a 401",
        [
            hidden(0, None, "/admin/x"),
            deny(1, "admin-write", 401, "no_credentials", path="/admin/x", method="DELETE"),
        ],
        {
            "hidden_rule": "admin",
            "revealing_rule": "admin-write",
            "statuses": [401],
            "callers": [{"anonymous": True}],
            "anonymous_addresses": ["10.0.0.1"],
        },
    ),
    (
        "different callers: nothing learnt",
        [hidden(0, "alice", "/admin/x"), forbid(1, "admin-reports", "bob", path="/admin/reports")],
        None,
    ),
    (
        "a 403 elsewhere: unrelated",
        [hidden(0, "alice", "/admin/x"), forbid(1, "api", "alice", path="/api/x")],
        None,
    ),
    (
        "a hidden one-segment path has no parent to share",
        [hidden(0, "alice", "/admin"), forbid(1, "other", "alice", path="/other")],
        None,
    ),
]


@pytest.mark.parametrize("entries, expected", [r[1:] for r in HIDING], ids=[r[0] for r in HIDING])
def test_hiding_revealed(entries: Entries, expected: dict[str, Any] | None) -> None:
    found = kinds(report(entries), dn.HIDING_REVEALED)
    if expected is None:
        assert found == []
        return
    [f] = found
    assert {k: f.evidence[k] for k in expected} == expected
    assert "hide: true" in f.suggestion


POLICY = f"""\
version: 1
authn:
  jwt:
    - {{name: demo, issuer: {DEMO_ISSUER}, audience: {DEMO_AUDIENCE}, algorithms: [RS256],
       jwks_file: {POLICIES / "keys" / "jwks.json"}}}
rules:
  - name: admin-reports
    match: {{path: /admin/reports}}
    allow: {{role: admin}}
  - name: admin
    match: {{path: "/admin/**"}}
    allow: {{role: admin}}
    hide: true
  - name: exports
    match: {{path: "/exports/**"}}
    allow: {{role: exporter}}
    mode: report
  - name: audit
    match: {{path: "/audit/**"}}
    allow: {{role: auditor}}
    mode: report
default: not_found
"""


@pytest.fixture
def policy(tmp_path: Path) -> Any:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return load_policy(str(path))


@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_a_hidden_rule_keeps_the_refused_identity_for_the_log(
    tmp_path: Path, token: Callable[..., str], mode: str
) -> None:
    """The 404 is the same for everyone; the decision behind it names the
    caller and the failed condition (for the log), and in report mode the
    proven identity is forwarded, as for any other rule."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace("    hide: true", f"    hide: true\n    mode: {mode}"))
    view = RequestView.build(
        "GET", "/admin/x", [("authorization", f"Bearer {token(sub='alice', roles=['user'])}")],
        "127.0.0.1",
    )  # fmt: skip
    d = judge(load_policy(str(path)), view, time.time(), MemoryStore())
    assert (d.status, d.reason, d.detail) == (404, "hidden", "forbidden")
    assert d.identity is not None and d.identity.subject == "alice"
    assert d.condition == "role admin=false"
    assert d.report == (mode == "report")
    assert dict(d.upstream_headers).get("X-Auth-Subject") == ("alice" if d.report else None)


def test_hiding_revealed_with_the_policy_uses_the_hidden_rules_pattern(policy: Any) -> None:
    # /admin/users/42's parent is /admin/users: /admin/reports is not beside
    # it, but the hidden rule's pattern /admin/** covers it.
    entries = [
        hidden(0, "alice", "/admin/users/42"),
        forbid(1, "admin-reports", "alice", path="/admin/reports"),
    ]
    assert kinds(report(entries), dn.HIDING_REVEALED) == []
    [f] = kinds(report(entries, policy), dn.HIDING_REVEALED)
    assert any(t.endswith("policy.yaml:10, hidden)") for _, t in f.lines)


# --- report mode ----------------------------------------------------------------------------


def test_report_mode_says_what_enforcing_would_refuse_and_whom() -> None:
    entries = [
        forbid(0, "exports", "alice", "role exporter=false", would=True, path="/exports/a"),
        forbid(1, "exports", "alice", "role exporter=false", would=True, path="/exports/b"),
        deny(2, "exports", 401, "no_credentials", would=True, ip="192.0.2.1"),
        allow(3, "exports", "erin"),
    ]
    [f] = kinds(report(entries), dn.REPORT_MODE)
    assert f.evidence["rule"] == "exports"
    assert f.evidence["would_refuse"] == 3
    assert f.evidence["answers"] == {"403 forbidden": 2, "401 no_credentials": 1}
    assert f.evidence["subjects"] == {"alice": 2}
    assert f.evidence["addresses"] == {"192.0.2.1": 1}
    assert f.evidence["allowed_requests"] == 1
    assert "refuses_most_callers" not in f.evidence  # two callers: too few to say


def test_report_mode_that_would_refuse_every_caller_says_fix_it_first() -> None:
    entries = [
        forbid(i, "exports", s, "role exportr=false", would=True) for i, s in enumerate("abc")
    ]
    [f] = kinds(report(entries), dn.REPORT_MODE)
    assert f.evidence["refuses_most_callers"] == {
        "callers": 3,
        "refused": 3,
        "failed": [{"leaf": "role exportr", "callers": 3}],
    }
    assert f.suggestion.startswith("Do not enforce exports yet")


def test_report_mode_with_the_policy(policy: Any) -> None:
    entries = [
        forbid(0, "exports", "alice", would=True),
        forbid(1, "admin", "bob", would=True),  # enforced in the policy now
        allow(2, "audit", "carol"),  # report mode, reached, refused nobody
    ]
    found = {f.evidence["rule"]: f for f in kinds(report(entries, policy), dn.REPORT_MODE)}
    assert set(found) == {"exports", "admin", "audit"}
    assert "is enforced in" in found["admin"].suggestion
    assert "is enforced in" not in found["exports"].suggestion
    assert found["audit"].evidence == {"rule": "audit", "would_refuse": 0, "allowed_requests": 1}
    assert "ready to enforce" in found["audit"].suggestion
    # Without the policy nothing says which rules are in report mode.
    assert {f.evidence["rule"] for f in kinds(report(entries), dn.REPORT_MODE)} == {
        "exports",
        "admin",
    }


# --- the failed branch of a condition --------------------------------------------------

LEAVES = [
    ("role admin=false", ["role admin"]),
    ("all of(authenticated=true, role biling=false)", ["role biling"]),
    (
        "any of(claim sub equals '{id}'=false, role admin=false)",
        ["claim sub equals '{id}'", "role admin"],
    ),
    ("not(role banned=true)", ["role banned"]),
    ("all of(not(role x=false), scope s=false)", ["scope s"]),
    ("all of(claim team equals 'a, b'=false, anyone=true)", ["claim team equals 'a, b'"]),
    ("all of(role a=false, any of(role a=false, role b=false))", ["role a", "role b"]),
    ("", []),
    ("not a condition", []),
]


@pytest.mark.parametrize("condition, leaves", LEAVES)
def test_failed_leaves(condition: str, leaves: list[str]) -> None:
    assert dn.failed_leaves(condition) == leaves


NAMES = st.sampled_from(["admin", "user", "read", "write:all", "a b", "x=y"])
LEAF = st.one_of(
    st.builds(c.HasRole, NAMES),
    st.builds(c.HasScope, NAMES),
    st.just(c.Authenticated()),
    st.just(c.Anyone()),
    st.just(c.Nobody()),
)
TREE = st.recursive(
    LEAF,
    lambda kids: st.one_of(
        st.builds(lambda xs: c.AnyOf(tuple(xs)), st.lists(kids, min_size=1, max_size=3)),
        st.builds(lambda xs: c.AllOf(tuple(xs)), st.lists(kids, min_size=1, max_size=3)),
        st.builds(c.Not, kids),
    ),
    max_leaves=8,
)


def _expected_leaves(cond: c.Condition, who: Identity, negated: bool = False) -> list[str]:
    if not cond.children():
        return [cond.describe()] if cond.holds(who, {}) == negated else []
    inner = negated != isinstance(cond, c.Not)
    return [leaf for k in cond.children() for leaf in _expected_leaves(k, who, inner)]


@settings(max_examples=300, deadline=None)
@given(TREE, st.frozensets(NAMES), st.frozensets(NAMES))
def test_failed_leaves_reads_what_describe_wrote(
    cond: c.Condition, roles: frozenset[str], scopes: frozenset[str]
) -> None:
    """Property: from the core's own describe() text, the leaves that made the
    condition false (true under an odd number of nots), each once, in order."""
    who = Identity("s", "i", "jwt", roles, scopes, {})
    text = describe(cond, who, {})
    assert dn.failed_leaves(text) == list(dict.fromkeys(_expected_leaves(cond, who)))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="aon(l),= trufsey", max_size=60))
def test_failed_leaves_of_any_text_are_pieces_of_it(text: str) -> None:
    """Property: text that is not a condition tree (a role named `a, b=false)`)
    gives no exception, only pieces of the text."""
    assert all(leaf in text for leaf in dn.failed_leaves(text))


# --- reading -------------------------------------------------------------------------------

SUBJECTS = st.one_of(st.none(), st.text(max_size=12))


def _state(a: dn.Analysis) -> tuple[Any, ...]:
    return (a.entries, a.allowed, a.skipped, a.allowed_pairs, a.allowed_requests, a.first, a.last)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=12),
    SUBJECTS,
    st.one_of(st.none(), st.text(max_size=12)),
    st.text(max_size=20),
    st.floats(min_value=0, max_value=4e9),
)
def test_the_fast_path_reads_an_allowed_line_as_json_does(
    ip: str, subject: str | None, rule: str | None, path: str, t: float
) -> None:
    """Property: an allowed line read by substring search leaves the analysis
    as the line read by json.loads does."""
    entry = allow(0, rule, subject, ip=ip, path=path) | {"time": round(t, 3)}
    fast, slow = dn.Analysis(), dn.Analysis()
    fast.read(lines([entry]))
    parsed = dn.parse(json.loads(lines([entry])[0]))
    assert isinstance(parsed, dn.Allowed)
    slow.allow(*parsed)
    slow.lines = 1
    assert _state(fast) == _state(slow)


def test_the_fast_path_sees_the_guesser_allowed_in_the_end() -> None:
    guesses = [failed(i, f"{i:012x}", ip="192.0.2.5") for i in range(10)]
    for end in (
        allow(11, "reports", "carol", ip="192.0.2.5"),
        allow(11, "reports", 'car"ol', ip="192.0.2.5"),
    ):
        [f] = kinds(report([*guesses, end]), dn.CREDENTIAL_GUESSING)
        assert f.evidence["allowed_after"]["subject"] == end["subject"]


def test_lines_that_are_not_decision_entries_are_counted_and_skipped() -> None:
    junk = [
        "not json\n",
        "[1, 2]\n",
        '{"time": "yesterday", "decision": "deny"}\n',
        '{"time": 1, "decision": "maybe", "status": 403, "reason": "x", "path": "/"}\n',
        '{"time": 1, "decision": "deny", "status": "403", "reason": "x", "path": "/"}\n',
        '{"time": 1e999, "decision": "deny"}\n',
        '{"time": 1, "decision": "allow"\n',  # cut short
        "\n",  # blank: not counted
    ]
    escaped = allow(1, "r", 'al"ice')  # read by json.loads, not the fast path
    prefixed = "[18:42:55.488] " + lines([deny(2, "r", 401, "no_credentials")])[0]
    a = dn.Analysis()
    a.read(junk + lines([escaped]) + [prefixed])
    assert (a.skipped, a.entries, a.allowed) == (7, 2, 1)
    assert a.allowed_subjects() == {"r": {'al"ice'}}


def test_the_watchs_events_are_counted_not_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    events = [
        '{"time":1,"event":"watch","kind":"probing","counts":"denied_paths","key":"ip:10.0.0.9",'
        '"count":20,"window":60,"action":"ban","until":601}\n',
        '{"time":2,"event":"watch","kind":"probing","action":"ban"}\n',
        '{"time":3,"event":"watch","kind":"guessing","action":"throttle"}\n',
        '{"time":4,"event":"watch"}\n',  # no kind: not an event
    ]
    a = dn.Analysis()
    a.read(events)
    r = a.report()
    assert (a.skipped, a.entries, r.events) == (1, 0, {"probing ban": 2, "guessing throttle": 1})
    assert r.as_dict()["watch_events"] == {"guessing throttle": 1, "probing ban": 2}
    assert "the watch acted already (docs/watch.md): guessing throttle x1, probing ban x2" in (
        r.text()
    )


def write(path: Path, entries: Entries, gz: bool = False) -> None:
    data = "".join(lines(entries)).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_rotated_and_compressed_files_are_read_in_time_order(tmp_path: Path) -> None:
    """Probing spread over three rotated files, given in any order, is one
    burst; a compressed file cut short is read as far as it goes."""
    burst = [hidden(i, "alice", f"/admin/{i}") for i in range(12)]
    write(tmp_path / "d.jsonl.2.gz", burst[:4], gz=True)
    write(tmp_path / "d.jsonl.1", burst[4:8])
    write(tmp_path / "d.jsonl", burst[8:])
    names = ["d.jsonl", "d.jsonl.2.gz", "d.jsonl.1"]
    r = dn.analyze([str(tmp_path / n) for n in names])
    assert r.files == [str(tmp_path / n) for n in ("d.jsonl.2.gz", "d.jsonl.1", "d.jsonl")]
    [f] = r.findings
    assert f.evidence["distinct_paths_in_window"] == 12 and r.warnings == []

    whole = gzip.compress("".join(lines(burst)).encode())
    (tmp_path / "cut.gz").write_bytes(whole[: len(whole) - 30])
    r = dn.analyze([str(tmp_path / "cut.gz")])
    assert len(r.warnings) == 1 and "cut.gz" in r.warnings[0]


def test_since_leaves_older_entries_out() -> None:
    entries = [hidden(i, "alice", f"/admin/{i}") for i in range(12)]
    a = dn.Analysis(since=T0 + 6)
    a.read(lines(entries))
    assert (a.before_since, a.entries) == (6, 6)
    assert dn.parse_since("1h", T0) == T0 - 3600
    assert dn.parse_since("2027-01-15T08:00:00Z", 0) == T0
    assert dn.parse_since("2027-01-15T08:00:00", 0) == T0  # no zone: UTC
    with pytest.raises(ValueError, match="--since takes a duration"):
        dn.parse_since("yesterday", T0)


# --- the command ---------------------------------------------------------------------------


def run(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["denials", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_exit_status_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quiet = tmp_path / "quiet.jsonl"
    write(quiet, [allow(i, "r", "alice") for i in range(5)])
    code, out, _ = run(str(quiet), capsys=capsys)
    assert code == 0 and "no findings" in out
    noisy = tmp_path / "noisy.jsonl"
    write(noisy, [hidden(i, "alice", f"/admin/{i}") for i in range(12)])
    code, out, _ = run(str(noisy), "--json", capsys=capsys)
    assert code == 1 and [f["kind"] for f in json.loads(out)["findings"]] == ["probing"]
    assert run(str(noisy), "--probe-paths", "13", capsys=capsys)[0] == 0
    for argv, message in [
        ([str(tmp_path / "missing.jsonl")], "cannot read"),
        ([str(noisy), "--since", "soon"], "--since takes a duration"),
        ([str(noisy), "--window", "0"], "--window must be longer than 0"),
        ([str(noisy), "--probe-paths", "0"], "--probe-paths is a count of at least 1"),
        ([str(noisy), "--rule-refused", "101"], "--rule-refused is a percentage"),
        ([str(noisy), "--policy", str(tmp_path / "none.yaml")], "none.yaml"),
    ]:
        code, out, err = run(*argv, capsys=capsys)
        assert (code, out) == (2, "") and message in err, (argv, err)
    assert "Traceback" not in err


# --- a real gateway under scripted traffic -------------------------------------------------

# The policy and the Basic user of docs/denials.md's example; the log there
# is what this traffic wrote.
GATEWAY_POLICY = ROOT / "docs" / "examples" / "denials.yaml"
PASSWORD = "right-horse-battery"


def basic(user: str, password: str) -> list[tuple[str, str]]:
    return [("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())]


def test_a_gateway_under_scripted_traffic_and_the_report_on_its_log(
    start_gateway: Callable[..., RunningGateway],
    backend: Backend,
    token: Callable[..., str],
    tmp_path: Path,
) -> None:
    log = tmp_path / "decisions.jsonl"
    gw = start_gateway(GATEWAY_POLICY, f"authgate_log={log}")

    def get(path: str, headers: list[tuple[str, str]], source: str | None = None) -> int:
        return send(gw.address, "GET", path, headers, source=source).status

    def bearer(sub: str, *roles: str) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {token(sub=sub, roles=list(roles))}")]

    alice, bob, dave = bearer("alice", "user"), bearer("bob", "billing"), bearer("dave", "billing")
    assert get("/api/profile", alice) == 200
    # alice probes 30 admin paths (hidden: 404), and the one a neighbour rule answers.
    probed = [f"/admin/{name}-{i}" for i, name in enumerate(["users", "keys", "db"] * 10)]
    assert [get(p, alice) for p in probed] == [404] * 30
    assert get("/admin/reports", alice) == 403
    # The misconfigured rule refuses every one of its users.
    assert [get("/billing/invoices", who) for who in (alice, bob, dave)] == [403] * 3
    assert get("/api/profile", bob) == 200
    # A client at 127.0.0.2 cycles 20 passwords for carol, then has the right one.
    guesses = [f"guess-{i:02d}" for i in range(20)]
    assert [get("/reports/q1", basic("carol", g), "127.0.0.2") for g in guesses] == [401] * 20
    assert get("/reports/q1", basic("carol", PASSWORD), "127.0.0.2") == 200
    # Report mode: forwarded, and logged as what enforcing would refuse.
    assert [get("/exports/all.csv", who) for who in (alice, bob, dave)] == [200] * 3

    # Only the allowed requests and the report-mode ones reached the backend.
    assert [s.target for s in backend.seen] == (
        ["/api/profile", "/api/profile", "/reports/q1"] + ["/exports/all.csv"] * 3
    )
    requests = 1 + 30 + 1 + 3 + 1 + 21 + 3
    wait_until(lambda: len(log.read_text().splitlines()) == requests, what="the log lines")
    text = log.read_text()
    assert PASSWORD not in text and not any(g in text for g in guesses)
    entries = [json.loads(line) for line in text.splitlines()]
    refused = [e for e in entries if e["rule"] == "billing"]
    assert {e["condition"] for e in refused} == {"all of(authenticated=true, role biling=false)"}
    tried = [e for e in entries if e["status"] == 401]
    assert {(e["reason"], e["detail"], e["user"]) for e in tried} == {
        ("invalid_credentials", "wrong_password", "carol")
    }
    assert len({e["cred_fp"] for e in tried}) == 20
    assert all(re.fullmatch(r"[0-9a-f]{12}", e["cred_fp"]) for e in tried)
    allowed = [e for e in entries if e["decision"] == "allow"]
    assert not any({"detail", "condition", "cred_fp", "user"} & set(e) for e in allowed)
    assert {(e["subject"], e["detail"]) for e in entries if e["reason"] == "hidden"} == {
        ("alice", "forbidden")
    }

    # The real command on that log: text, then JSON with the policy.
    done = subprocess.run(
        [AUTHGATE, "denials", str(log)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert "5 findings" in done.stdout and "role biling (3 of 3 callers)" in done.stdout
    done = subprocess.run(
        [AUTHGATE, "denials", str(log), "--json", "--policy", str(GATEWAY_POLICY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    got = json.loads(done.stdout)
    assert got["skipped"] == 0 and got["entries"] == requests
    assert_findings(got["findings"], str(GATEWAY_POLICY))

    # The same log rotated: the oldest part compressed, a junk line, files out of order.
    split = text.splitlines(keepends=True)
    (tmp_path / "decisions.jsonl.2.gz").write_bytes(gzip.compress("".join(split[:20]).encode()))
    (tmp_path / "decisions.jsonl.1").write_text("".join(split[20:45]) + "garbage\n")
    (tmp_path / "rotated.jsonl").write_text("".join(split[45:]))
    files = [tmp_path / n for n in ("decisions.jsonl.1", "rotated.jsonl", "decisions.jsonl.2.gz")]
    random.Random(1).shuffle(files)
    done = subprocess.run(
        [AUTHGATE, "denials", *map(str, files), "--json", "--policy", str(GATEWAY_POLICY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    rotated = json.loads(done.stdout)
    assert rotated["skipped"] == 1 and rotated["entries"] == requests
    assert rotated["findings"] == got["findings"]


def assert_findings(findings: list[dict[str, Any]], policy: str) -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for f in findings:
        by_kind.setdefault(f["kind"], []).append(f["evidence"])
    assert sorted(by_kind) == sorted(dn.KINDS)
    [rule] = by_kind[dn.REFUSING_RULE]
    assert (rule["rule"], rule["refused_callers"], rule["allowed_callers"]) == ("billing", 3, 0)
    assert rule["failed"] == [{"leaf": "role biling", "callers": 3}]
    assert rule["subjects"] == {"alice": 1, "bob": 1, "dave": 1}
    [probe] = by_kind[dn.PROBING]
    assert probe["caller"] == {"subject": "alice"}
    # 30 hidden admin paths, /admin/reports and /billing/invoices
    assert probe["distinct_paths_in_window"] == 32
    assert probe["rules"] == {"admin": 30, "admin-reports": 1, "billing": 1}
    [guess] = by_kind[dn.CREDENTIAL_GUESSING]
    assert (guess["address"], guess["distinct_credentials_in_window"]) == ("127.0.0.2", 20)
    assert guess["users"] == {"carol": 20}
    assert guess["allowed_after"]["subject"] == "carol"
    [revealed] = by_kind[dn.HIDING_REVEALED]
    assert (revealed["hidden_rule"], revealed["revealing_rule"]) == ("admin", "admin-reports")
    assert revealed["callers"] == [{"subject": "alice"}]
    [report_mode] = by_kind[dn.REPORT_MODE]
    assert report_mode["rule"] == "exports" and report_mode["would_refuse"] == 3
    assert report_mode["subjects"] == {"alice": 1, "bob": 1, "dave": 1}
    assert report_mode["refuses_most_callers"]["failed"] == [
        {"leaf": "role exporter", "callers": 3}
    ]
