"""The rule index (core/routing.py): first match through the index is the
first match of a scan of every rule, in file order, on any policy."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate.core.decision import RequestView, _match, _Trace, judge
from authgate.core.model import Policy, Rule
from authgate.core.paths import canonicalize
from authgate.policy.load import parse_policy
from authgate.runtime.stores import MemoryStore

P = pytest.param


def policy_of(rules: list[tuple[str, str | None, str | None]]) -> Policy:
    """A policy of (path, methods as "GET,POST" or None, host or None) rules
    named r0, r1, ..., each open to anyone."""
    lines = ["version: 1", "rules:"]
    for n, (path, methods, host) in enumerate(rules):
        match = f'path: "{path}"'
        if methods is not None:
            match += f", methods: [{methods}]"
        if host is not None:
            match += f", host: {host}"
        lines.append(f"  - {{name: r{n}, match: {{{match}}}, allow: anyone}}")
    return parse_policy("\n".join(lines) + "\n")


def linear(policy: Policy, method: str, host: str | None, target: str) -> str | None:
    """The plain first-match scan the index must agree with."""
    segments = canonicalize(target).segments
    for rule in policy.rules:
        if rule.pattern.match(segments) is None:
            continue
        if rule.methods is not None and method not in rule.methods:
            continue
        if rule.host is not None and rule.host != host:
            continue
        return rule.name
    return None


def indexed(policy: Policy, method: str, host: str | None, target: str) -> str | None:
    rule, _ = _match(policy, method, host, canonicalize(target), _Trace(False))
    return rule.name if rule is not None else None


def names(rules: object) -> list[str]:
    assert isinstance(rules, (list, tuple))
    return [r.name for r in rules if isinstance(r, Rule)]


# --- candidates: the rules whose pattern and methods fit, in file order ------------

TABLE = policy_of(
    [
        ("/a/**", None, None),  # r0
        ("/{x}/b", "GET", None),  # r1
        ("/a/b", None, None),  # r2
        ("/a/*", "POST,PUT", None),  # r3
        ("/a/b", None, "x.example"),  # r4
        ("/**", "DELETE", None),  # r5
        ("/", None, None),  # r6
        ("/c/{id}/d/**", None, None),  # r7
        ("/c/e/d", "GET", None),  # r8
    ]
)

# (method, target, candidates in order)
CANDIDATES = [
    P("GET", "/a/b", ["r0", "r1", "r2", "r4"], id="rest-wild-literal-merged-in-order"),
    P("POST", "/a/b", ["r0", "r2", "r3", "r4"], id="method-bound-wild-rule"),
    P("DELETE", "/a/b", ["r0", "r2", "r4", "r5"], id="root-rest-for-its-method"),
    P("PATCH", "/a/b", ["r0", "r2", "r4"], id="unnamed-method-only-any-method-rules"),
    P("GET", "/a", ["r0"], id="rest-covers-bare-prefix"),
    P("GET", "/a/b/c", ["r0"], id="rest-covers-deeper"),
    P("GET", "/z/b", ["r1"], id="param-edge"),
    P("GET", "/", ["r6"], id="root"),
    P("DELETE", "/", ["r5", "r6"], id="root-rest-covers-root"),
    P("GET", "/c/e/d", ["r7", "r8"], id="param-then-rest-and-literal"),
    P("GET", "/c/9/d/x/y", ["r7"], id="param-then-rest-deeper"),
    P("GET", "/c/9", [], id="too-short"),
    P("GET", "/nothing/here", [], id="no-rule"),
    P("get", "/z/b", [], id="methods-compare-exactly"),
]


@pytest.mark.parametrize("method,target,expected", CANDIDATES)
def test_candidates(method: str, target: str, expected: list[str]) -> None:
    segments = canonicalize(target).segments
    assert names(TABLE.router.candidates(method, segments)) == expected


# --- the first match: the index's answer is the scan's -----------------------------

# (rules, method, host, target, first match)
FIRST = [
    P([("/a/{id}", None, None), ("/a/b", None, None)], "GET", None, "/a/b", "r0",
      id="earlier-param-beats-later-literal"),
    P([("/a/b", "POST", None), ("/a/{id}", None, None)], "GET", None, "/a/b", "r1",
      id="method-skips-to-later-rule"),
    P([("/a/b", None, "x.example"), ("/a/**", None, None)], "GET", "y.example", "/a/b", "r1",
      id="host-skips-to-later-rule"),
    P([("/a/b", None, "x.example"), ("/a/**", None, None)], "GET", "x.example", "/a/b", "r0",
      id="host-matches"),
    P([("/a/b", None, "x.example")], "GET", None, "/a/b", None, id="host-rule-without-host"),
    P([("/a", None, None)], "GET", None, "/a/", "r0", id="trailing-slash-not-significant"),
    P([("/a/*", None, None), ("/a/**", None, None)], "GET", None, "/a", "r1",
      id="star-needs-a-segment-rest-does-not"),
    P([("/x/**", None, None), ("/**", None, None)], "GET", None, "/y", "r1", id="catch-all"),
    P([("/jos%C3%A9", None, None)], "GET", None, "/jos%c3%a9", "r0", id="decoded-literal"),
    P([("/a", "GET", None)], "HEAD", None, "/a", None, id="head-not-implied"),
]  # fmt: skip


@pytest.mark.parametrize("rules,method,host,target,expected", FIRST)
def test_first_match(
    rules: list[tuple[str, str | None, str | None]],
    method: str,
    host: str | None,
    target: str,
    expected: str | None,
) -> None:
    policy = policy_of(rules)
    assert linear(policy, method, host, target) == expected
    assert indexed(policy, method, host, target) == expected


def test_judge_uses_the_index_and_explain_still_lists_every_rule() -> None:
    policy = policy_of([("/a/{id}", "POST", None), ("/b", None, None), ("/a/**", None, None)])
    request = RequestView.build("GET", "/a/1", (), "127.0.0.1")
    assert judge(policy, request, 0.0, MemoryStore()).rule == "r2"
    traced = judge(policy, request, 0.0, MemoryStore(), trace=True)
    assert traced.rule == "r2"
    assert [line for line in traced.trace if line.startswith("rule ")] == [
        "rule r0: method GET not in ['POST']",
        "rule r1: path does not match /b",
        "rule r2: matches",
    ]


def test_the_router_is_rebuilt_with_the_policy() -> None:
    import dataclasses

    policy = policy_of([("/a", None, None)])
    other = dataclasses.replace(policy, rules=policy_of([("/b", None, None)]).rules)
    assert indexed(other, "GET", None, "/b") == "r0"
    assert indexed(other, "GET", None, "/a") is None


# --- property: random policies, random requests -------------------------------------

# "%C3%A9" is "é": patterns and paths compare decoded.
LITERALS = ["a", "b", "c", "%C3%A9"]
METHODS = ["GET", "POST", "PUT", "DELETE"]
HOSTS = ["x.example", "y.example"]

segment = st.one_of(
    st.sampled_from(LITERALS),
    st.just("*"),
    st.sampled_from(["{p}", "{q}"]),
)


@st.composite
def pattern(draw: st.DrawFn) -> str:
    parts = draw(st.lists(segment, max_size=4))
    # Parameter names must not repeat within a pattern.
    seen: set[str] = set()
    for i, part in enumerate(parts):
        if part.startswith("{"):
            parts[i] = f"{{{part[1:-1]}{i}}}" if part in seen else part
            seen.add(part)
    if draw(st.booleans()):
        parts.append("**")
    text = "/" + "/".join(parts)
    return text + "/" if parts and parts[-1] != "**" and draw(st.booleans()) else text


rule = st.tuples(
    pattern(),
    st.one_of(
        st.none(),
        st.lists(st.sampled_from(METHODS), min_size=1, max_size=3, unique=True).map(",".join),
    ),
    st.one_of(st.none(), st.sampled_from(HOSTS)),
)

request = st.tuples(
    st.sampled_from([*METHODS, "PATCH", "get"]),
    st.one_of(st.none(), st.sampled_from([*HOSTS, "z.example"])),
    st.lists(st.sampled_from([*LITERALS, "%c3%a9", "d"]), max_size=6).map(
        lambda s: "/" + "/".join(s)
    ),
)


@settings(
    max_examples=400,
    deadline=None,
    database=None,  # nothing written to the work tree
    suppress_health_check=[HealthCheck.too_slow],
)
@given(rules=st.lists(rule, min_size=1, max_size=14), requests=st.lists(request, max_size=20))
def test_index_agrees_with_the_linear_scan(
    rules: list[tuple[str, str | None, str | None]],
    requests: list[tuple[str, str | None, str]],
) -> None:
    policy = policy_of(rules)
    for method, host, target in requests:
        segments = canonicalize(target).segments
        # Every rule that can match is a candidate, and candidates keep file order.
        fits = [
            r.name
            for r in policy.rules
            if r.pattern.match(segments) is not None and (r.methods is None or method in r.methods)
        ]
        got = names(policy.router.candidates(method, segments))
        assert set(fits) <= set(got)
        assert got == sorted(got, key=lambda name: int(name[1:]))
        assert indexed(policy, method, host, target) == linear(policy, method, host, target)
