"""`authgate check` warnings: each with a policy that triggers it and one that doesn't."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from authgate.core.model import LimitSpec, Policy, plain_http
from authgate.core.paths import PathPattern
from authgate.core.ratelimit import Rate
from authgate.policy.load import parse_policy
from authgate.runtime.stores import MemoryStore
from authgate.tools.lint import (
    at_least_as_strict,
    covers,
    fill_ins,
    lint,
    overlaps,
    rule_covers,
)

HTPASSWD = Path(__file__).resolve().parent.parent / "policies" / "users.htpasswd"
BASIC_HEAD = "authn:\n  basic: {htpasswd: HTPASSWD}\n"
QUERY_HEAD = (
    "authn:\n  jwt:\n    - {name: q, issuer: https://i, algorithms: [HS256], "
    "secret_env: AUTHGATE_TEST_SECRET, query_param: t}\n"
)
os.environ.setdefault("AUTHGATE_TEST_SECRET", "x" * 40)


# Bearer tokens, so that rules wanting an identity can get one (see
# test_nobody_qualifies for a policy without authn).
JWT_HEAD = (
    "authn:\n  jwt:\n    - {name: j, issuer: https://i, algorithms: [HS256], "
    "secret_env: AUTHGATE_TEST_SECRET}\n"
)


def policy(body: str, head: str = "") -> Policy:
    tail = JWT_HEAD if "authn:" not in head else ""  # after the rules: lines stay put
    return parse_policy("version: 1\n" + head + "rules:\n" + body + tail, "p.yaml")


def found(p: Policy, listen: str | None = None) -> list[tuple[str, int | None]]:
    """(code, line) of the findings; the deployment reminder for host rules
    has its own test."""
    return [(f.code, f.line) for f in lint(p, listen) if f.code != "host-needs-keep-host-header"]


# --- request sets, exactly ------------------------------------------------------

PATTERNS = [
    # (a, b, a covers b, they overlap)
    ("/a", "/a", True, True),
    ("/a/", "/a", True, True),
    ("/a", "/b", False, False),
    ("/a", "/a/b", False, False),
    ("/{x}", "/a", True, True),
    ("/*", "/{x}", True, True),
    ("/a", "/{x}", False, True),
    ("/a/**", "/a", True, True),
    ("/a/**", "/a/b/c", True, True),
    ("/a/**", "/a/{x}/**", True, True),
    ("/a/{x}/**", "/a/**", False, True),
    ("/a/**", "/b/**", False, False),
    ("/**", "/", True, True),
    ("/", "/**", False, True),
    ("/", "/a", False, False),
    ("/a/*/c", "/a/b/c", True, True),
    ("/a/b/c", "/a/*/c", False, True),
    ("/a/*/c", "/a/*/d", False, False),
    ("/a/b/**", "/a/*/c", False, True),
    ("/a/*/c", "/a/b/**", False, True),
    ("/a/{x}", "/a/**", False, True),
    ("/x/**", "/a/**", False, False),
    ("/{x}/{y}", "/*/*", True, True),
    ("/*/*", "/*", False, False),
    ("/*/**", "/*", True, True),
    ("/%61", "/a", True, True),  # literals compare decoded
]


@pytest.mark.parametrize(
    "a, b, a_covers_b, overlap", PATTERNS, ids=[f"{p[0]} {p[1]}" for p in PATTERNS]
)
def test_patterns(a: str, b: str, a_covers_b: bool, overlap: bool) -> None:
    pa, pb = PathPattern.parse(a), PathPattern.parse(b)
    assert covers(pa, pb) == a_covers_b
    assert overlaps(pa, pb) == overlaps(pb, pa) == overlap


def _segments(pattern: PathPattern, rng: random.Random) -> tuple[str, ...]:
    parts = [p if p is not None else rng.choice(["a", "b", "zz"]) for p in pattern.parts]
    extra = rng.randint(0, 2) if pattern.rest else 0
    return tuple(parts + [rng.choice(["a", "b", "c"]) for _ in range(extra)])


@pytest.mark.parametrize(
    "a, b, a_covers_b, overlap", PATTERNS, ids=[f"{p[0]} {p[1]}" for p in PATTERNS]
)
def test_patterns_agree_with_matching(a: str, b: str, a_covers_b: bool, overlap: bool) -> None:
    """Sampled paths of b: if a covers b, a matches all of them; a path both
    match is a witness of overlap."""
    pa, pb = PathPattern.parse(a), PathPattern.parse(b)
    rng = random.Random(7)
    samples = [_segments(pb, rng) for _ in range(300)] + [_segments(pa, rng) for _ in range(300)]
    matched_b = [s for s in samples if pb.match(s) is not None]
    if a_covers_b:
        assert all(pa.match(s) is not None for s in matched_b)
    else:
        assert not overlap or any(pa.match(s) is None for s in matched_b) or not matched_b
    if any(pa.match(s) is not None and pb.match(s) is not None for s in samples):
        assert overlap


RULES = [
    # (earlier match, later match, earlier covers later)
    ("{path: /a}", "{path: /a, methods: [GET]}", True),
    ("{path: /a, methods: [GET]}", "{path: /a}", False),
    ("{path: /a, methods: [GET, POST]}", "{path: /a, methods: [POST]}", True),
    ("{path: /a, methods: [GET]}", "{path: /a, methods: [GET, POST]}", False),
    ("{path: /a}", "{path: /a, host: x.test}", True),
    ("{path: /a, host: x.test}", "{path: /a}", False),
    ("{path: /a, host: X.test:443}", "{path: /a, host: x.test}", True),
    ("{path: /a, host: y.test}", "{path: /a, host: x.test}", False),
]


@pytest.mark.parametrize("a, b, expected", RULES)
def test_rule_covers(a: str, b: str, expected: bool) -> None:
    p = policy(f"  - {{name: a, match: {a}, allow: nobody}}\n"
               f"  - {{name: b, match: {b}, allow: nobody}}\n")  # fmt: skip
    assert rule_covers(p.rules[0], p.rules[1]) == expected


# --- each warning ------------------------------------------------------------------

WARNINGS = [
    # (id, policy: rules and optionally more, expected (code, line) findings)
    ("shadowed", """\
  - {name: all-api, match: {path: "/api/**"}, allow: authenticated}
  - {name: admin, match: {path: /api/admin}, allow: {role: admin}}
""", [("shadowed", 4)]),
    ("shadowed-by-method-superset", """\
  - {name: rw, match: {path: /r, methods: [GET, POST]}, allow: authenticated}
  - {name: w, match: {path: /r, methods: [POST]}, allow: {role: w}}
""", [("shadowed", 4)]),
    ("not-shadowed-narrower-first", """\
  - {name: admin, match: {path: /api/admin}, allow: {role: admin}}
  - {name: all-api, match: {path: "/api/**"}, allow: authenticated}
""", []),
    ("not-shadowed-other-methods", """\
  - {name: r, match: {path: /r, methods: [GET]}, allow: authenticated}
  - {name: w, match: {path: /r, methods: [POST]}, allow: {role: w}}
""", []),
    ("not-shadowed-other-host", """\
  - {name: a, match: {path: /r, host: a.test}, allow: authenticated}
  - {name: b, match: {path: /r}, allow: authenticated}
""", []),
    ("anyone-before-stricter", """\
  - {name: docs, match: {path: "/api/*/docs"}, allow: anyone}
  - {name: admin, match: {path: "/api/admin/**"}, allow: {role: admin}}
""", [("anyone-overlaps", 3)]),
    ("anyone-before-stricter-that-it-shadows", """\
  - {name: open, match: {path: "/api/**"}, allow: anyone}
  - {name: admin, match: {path: "/api/admin/**"}, allow: {role: admin}}
""", [("anyone-overlaps", 3), ("shadowed", 4)]),
    ("anyone-no-overlap", """\
  - {name: docs, match: {path: "/docs/**"}, allow: anyone}
  - {name: admin, match: {path: "/api/admin/**"}, allow: {role: admin}}
""", []),
    ("anyone-other-methods", """\
  - {name: read, match: {path: "/api/**", methods: [GET]}, allow: anyone}
  - {name: write, match: {path: "/api/**", methods: [POST]}, allow: authenticated}
""", []),
    ("anyone-after-stricter", """\
  - {name: admin, match: {path: "/api/admin/**"}, allow: {role: admin}}
  - {name: open, match: {path: "/api/**"}, allow: anyone}
""", []),
    ("anyone-then-anyone", """\
  - {name: a, match: {path: "/api/*"}, allow: anyone}
  - {name: b, match: {path: "/api/**"}, allow: anyone}
""", []),
    ("unused-parameter", """\
  - {name: u, match: {path: "/users/{id}"}, allow: authenticated}
""", [("unused-parameter", 3)]),
    ("used-parameter", """\
  - {name: u, match: {path: "/users/{id}"}, allow: {claim: sub, equals: "{id}"}}
  - {name: w, match: {path: "/users/*/x"}, allow: authenticated}
""", []),
    ("parameter-in-a-role", """\
  - name: t
    match: {path: "/teams/{team}"}
    allow: {all: [{role: "{team}"}, {claim: t, in: ["{team}"]}]}
""", [("parameter-not-substituted", 3)]),
    ("parameter-in-a-claim-name", """\
  - {name: t, match: {path: "/teams/{team}"}, allow: {claim: "teams.{team}", equals: true}}
""", [("parameter-not-substituted", 3), ("unused-parameter", 3)]),
    ("parameter-in-a-claim-value", """\
  - {name: t, match: {path: "/teams/{team}"}, allow: {claim: "team", equals: "team-{team}"}}
""", []),
    ("hidden-with-default-forbidden", """\
  - {name: ops, match: {path: "/internal/**"}, allow: {role: ops}, hide: true}
default: forbidden
""", [("hidden-distinguishable", 3)]),
    ("hidden-next-to-a-catch-all", """\
  - {name: ops, match: {path: "/api/internal/**"}, allow: {role: ops}, hide: true}
  - {name: api, match: {path: "/api/**"}, allow: authenticated}
""", [("hidden-distinguishable", 3)]),
    ("hidden-done-right", """\
  - {name: ops, match: {path: "/internal/**"}, allow: {role: ops}, hide: true}
  - {name: api, match: {path: "/api/**"}, allow: authenticated}
default: not_found
""", []),
    ("hidden-next-to-another-hidden", """\
  - {name: ops, match: {path: "/api/internal/**"}, allow: {role: ops}, hide: true}
  - {name: api, match: {path: "/api/**"}, allow: authenticated, hide: true}
""", []),
    ("limit-on-a-nobody-rule", """\
  - name: closed
    match: {path: /closed}
    allow: nobody
    limits: [{name: per-sub, key: subject, rate: 5/minute}, {name: per-ip, key: ip, rate: 5/minute}]
""", [("limit-never-triggers", 6)]),
    ("limit-on-a-hidden-nobody-rule", """\
  - name: closed
    match: {path: /closed}
    allow: nobody
    hide: true
    limits: [{name: per-ip, key: ip, rate: 5/minute}]
""", [("limit-never-triggers", 7)]),
    ("limit-looser-than-a-global-one", """\
  - name: search
    match: {path: /search}
    allow: anyone
    limits: [{name: search-ip, key: ip, rate: 100/minute}]
""", [("limit-never-triggers", 6)]),
    ("limit-equal-to-an-earlier-global-one", """\
  - {name: all, match: {path: "/**"}, allow: anyone}
limits:
  - {name: g, key: ip, rate: 60/minute}
  - {name: g2, key: ip, rate: 60/minute}
""", [("limit-never-triggers", 6)]),
    ("limit-stricter-than-a-global-one", """\
  - name: search
    match: {path: /search}
    allow: anyone
    limits: [{name: search-ip, key: ip, rate: 5/minute}]
""", []),
    ("limit-same-rate-other-key", """\
  - name: search
    match: {path: /search}
    allow: authenticated
    limits: [{name: search-sub, key: subject, rate: 100/minute}]
""", []),
    ("limit-longer-period-larger-burst", """\
  - name: search
    match: {path: /search}
    allow: anyone
    limits: [{name: search-hour, key: ip, rate: 3000/hour}]
""", []),
    ("late-limit-after-global-header-limit", """\
  - name: search
    match: {path: /search}
    allow: anyone
    limits: [{name: app-search, key: "header:X-App", rate: 20/second}]
""", [("limit-never-triggers", 6)]),
    ("hidden-rule-ip-limit-after-global-ip", """\
  - name: ops
    match: {path: /ops}
    allow: {role: ops}
    hide: true
    limits: [{name: ops-ip, key: ip, rate: 60/minute}]
""", [("limit-never-triggers", 7)]),
]  # fmt: skip

HEADS = {
    "limit-looser-than-a-global-one": "limits: [{name: g, key: ip, rate: 60/minute}]\n",
    "limit-stricter-than-a-global-one": "limits: [{name: g, key: ip, rate: 60/minute}]\n",
    "limit-same-rate-other-key": "limits: [{name: g, key: ip, rate: 60/minute}]\n",
    "limit-longer-period-larger-burst": "limits: [{name: g, key: ip, rate: 60/minute}]\n",
    "late-limit-after-global-header-limit": (
        "limits: [{name: g, key: 'header:x-app', rate: 10/second}]\n"
    ),
    "hidden-rule-ip-limit-after-global-ip": "limits: [{name: g, key: ip, rate: 60/minute}]\n",
}


@pytest.mark.parametrize("body, expected", [w[1:] for w in WARNINGS], ids=[w[0] for w in WARNINGS])
def test_warnings(
    request: pytest.FixtureRequest, body: str, expected: list[tuple[str, int]]
) -> None:
    name = request.node.callspec.id
    head = HEADS.get(name, "")
    p = policy(body, head)
    shift = head.count("\n")
    assert found(p) == [(code, line + shift) for code, line in expected], lint(p)


def test_messages_say_what_and_where() -> None:
    p = policy(WARNINGS[0][1])
    [f] = lint(p)
    assert str(f) == (
        "p.yaml:4: warning: rule 'admin' can never match: rule 'all-api' (line 3) comes first "
        "and matches every request it would [shadowed]"
    )
    assert f.as_dict() == {"file": "p.yaml", "line": 4, "severity": "warning", "code": "shadowed",
                           "message": f.message}  # fmt: skip


def test_shipped_policies_are_clean(demo_key: object) -> None:
    from authgate.policy.load import load_policy
    from conftest import POLICIES

    for path in sorted(POLICIES.glob("*.yaml")):
        if not path.name.endswith(".tests.yaml"):
            assert lint(load_policy(path), "127.0.0.1:8080") == [], path.name


# --- limits: "never triggers" is exact ---------------------------------------------------


def spec(rate: str) -> LimitSpec:
    return LimitSpec("x", "ip", None, Rate.parse(rate), 1)


@pytest.mark.parametrize(
    "first, later, strict",
    [("60/minute", "100/minute", True), ("60/minute", "60/minute", True),
     ("1/second", "60/minute", True), ("10/second", "600/minute", True),
     ("5/minute", "6/minute", True), ("3/second", "7/second", True),
     ("60/minute", "1/second", False), ("600/minute", "10/second", False),
     ("60/minute", "3000/hour", False), ("60/minute", "59/minute", False),
     ("7/second", "3/second", False)],
)  # fmt: skip
def test_at_least_as_strict_matches_the_limiter(first: str, later: str, strict: bool) -> None:
    """Traffic through `first` then `later`, as decide() checks them: when the
    lint says `later` can never trigger, no traffic makes it; when it says it
    can, the greediest traffic `first` lets through does."""
    a, b = spec(first), spec(later)
    assert at_least_as_strict(a, b) == strict

    def later_triggers(times: list[float]) -> bool:
        limiter = MemoryStore()
        for now in times:
            if limiter.hit("first", "k", a.rate, now).allowed:
                if not limiter.hit("later", "k", b.rate, now).allowed:
                    return True
        return False

    # Greedy: a full burst, then one request each time `first` lets one through.
    greedy = [1000.0] * a.rate.count + [1000.0 + (i + 1) * a.rate.interval for i in range(30_000)]
    assert later_triggers(greedy) != strict
    for seed in range(20):
        rng = random.Random(seed)
        times, now = [], 1000.0
        for _ in range(300):
            now += rng.choice([0.0, 0.001, 0.01, 0.1, 0.5, 1.0, 3.0, 20.0])
            times.append(now)
        assert not (strict and later_triggers(times))


# --- credentials in clear -------------------------------------------------------------


@pytest.mark.parametrize(
    "listen, plain",
    [("127.0.0.1:8080", True), ("http://0.0.0.0:80", True), ("HTTPS://gw.test:443", False),
     ("https://[::1]:8443", False)],
)  # fmt: skip
def test_plain_http(listen: str, plain: bool) -> None:
    assert plain_http(listen) == plain


@pytest.mark.parametrize(
    "head, listen, expected",
    [
        ("", "0.0.0.0:8080", []),  # bearer JWTs in Authorization: nothing to say
        (BASIC_HEAD, "0.0.0.0:8080", [("credentials-in-clear", 3)]),
        (BASIC_HEAD, "127.0.0.1:8080", []),  # loopback: no one on the path
        (BASIC_HEAD, "https://gw.test", []),
        (QUERY_HEAD, "http://gw.test:80", [("credentials-in-clear", 4)]),  # the issuer entry
    ],
)
def test_credentials_in_clear(head: str, listen: str, expected: list[tuple[str, int]]) -> None:
    text = head.replace("HTPASSWD", str(HTPASSWD))
    p = policy("  - {name: a, match: {path: /a}, allow: anyone}\n", text)
    assert found(p, listen) == expected


@pytest.mark.parametrize("listen, expected", [
    ("0.0.0.0:8080", [("credentials-in-clear", 3)]),
    ("http://gw.test", [("credentials-in-clear", 3)]),
    ("https://gw.test", []),
    ("[::1]:8080", []),
    ("localhost:8080", []),
    ("http://127.5.5.5:8080", []),
    ("[2001:db8::1]:8080", [("credentials-in-clear", 3)]),
    (None, []),
])  # fmt: skip
def test_credentials_in_clear_by_listener(
    listen: str | None, expected: list[tuple[str, int]]
) -> None:
    text = BASIC_HEAD.replace("HTPASSWD", str(HTPASSWD))
    p = policy("  - {name: a, match: {path: /a}, allow: authenticated}\n", text)
    assert found(p, listen) == expected
    if expected:
        assert (
            "Basic credentials are accepted on the plain-HTTP listener"
            in lint(p, listen)[0].message
        )


@pytest.mark.parametrize("allow, expected", [
    ("{role: admin}", [("nobody-qualifies", 3)]),
    ("authenticated", [("nobody-qualifies", 3)]),
    ("{not: {role: admin}}", []),  # an anonymous caller has no role: it holds
    ("anyone", []),
    ("nobody", []),  # said on purpose
])  # fmt: skip
def test_nobody_qualifies(allow: str, expected: list[tuple[str, int]]) -> None:
    text = f"version: 1\nrules:\n  - {{name: r, match: {{path: /r}}, allow: {allow}}}\n"
    assert found(parse_policy(text, "p.yaml")) == expected


def test_host_rules_need_keep_host_header() -> None:
    p = policy("  - {name: h, match: {path: /h, host: api.test}, allow: anyone}\n")
    [finding] = lint(p)
    assert finding.code == "host-needs-keep-host-header"
    assert "keep_host_header=true" in finding.message


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ("", []),
        ("strip_headers: {add: [X-Employee]}\n", []),
        (
            "strip_headers:\n  keep: [X-Original-URL, X_Remote_User]\n",
            [("forwards-trusted-header", 2), ("forwards-trusted-header", 2)],
        ),
    ],
)
def test_forwards_trusted_header(head: str, expected: list[tuple[str, int]]) -> None:
    """`check` names each field backends commonly trust that the policy keeps."""
    p = policy("  - {name: r, match: {path: /x}, allow: anyone}\n", head)
    assert found(p) == expected
    names = sorted(f.message.split()[3] for f in lint(p))
    assert names == (["x-original-url", "x-remote-user"] if expected else [])


# --- issue 23: conditions that can never hold, FILL-IN placeholders ----------------------


@pytest.mark.parametrize("allow, expected", [
    ("{all: [{role: admin}, {not: {role: admin}}]}", [("never-holds", 3)]),
    ("{all: [{not: {scope: s}}, authenticated, {scope: s}]}", [("never-holds", 3)]),
    ("{all: [authenticated, nobody]}", [("never-holds", 3)]),
    ("{not: anyone}", [("never-holds", 3)]),
    ("{any: [{all: [{role: a}, {not: {role: a}}]}, nobody]}", [("never-holds", 3)]),
    ("{any: [{role: x}, {all: [{role: a}, {not: {role: a}}]}]}", [("never-holds", 3)]),
    ("{all: [{role: admin}, {not: {role: ops}}]}", []),
    ("{any: [{role: x}, nobody]}", []),  # nobody written: said on purpose
    ("nobody", []),
])  # fmt: skip
def test_never_holds(allow: str, expected: list[tuple[str, int]]) -> None:
    p = policy(f"  - {{name: r, match: {{path: /r}}, allow: {allow}}}\n")
    assert found(p) == expected


def test_never_holds_names_the_contradiction() -> None:
    p = policy(
        "  - {name: r, match: {path: /r}, allow: {all: [{role: admin}, {not: {role: admin}}]}}\n"
    )
    [f] = lint(p)
    assert "can never hold: it needs both role admin and not role admin" in f.message


@pytest.mark.parametrize("text, lines", [
    ("a: 1\n", []),
    ("a: FILL-IN\nb: x\nc: [FILL-IN-audience]\n", [1, 3]),
    ('a: "https://FILL-IN.invalid/x"  # FILL-IN\n', [1]),
    ("# FILL-IN marks what is yours\na: 1  # FILL-IN here\n", []),  # comments do not count
    ("FILL-IN: {roles: [a]}\n", [1]),  # a key too (htpasswd users)
])  # fmt: skip
def test_fill_ins(text: str, lines: list[int]) -> None:
    found_ = fill_ins("p.yaml", text)
    assert [(f.line, f.severity, f.code) for f in found_] == [
        (n, "error", "fill-in") for n in lines
    ]
