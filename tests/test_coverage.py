"""`authgate test --coverage`: rules no test reaches and condition branches no
test decides, each at file:line, through the real command line; `--json`;
`--min-coverage` exit codes; and the shipped policies, which stay fully covered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.cli import main
from authgate.core import conditions as c
from authgate.core.identity import Identity
from authgate.tools.coverage import _visit, nodes, outcomes_of, percent
from conftest import POLICIES

ROOT = Path(__file__).resolve().parent.parent
AUTHGATE = Path(sys.executable).parent / "authgate"
SECRET = "coverage-test-secret-of-at-least-32-bytes"

POLICY = """version: 1
authn:
  jwt:
    - name: t
      issuer: https://as.test
      audience: api
      algorithms: [HS256]
      secret_env: COVERAGE_SECRET
rules:
{rules}
tests:
{tests}
"""


def write(tmp_path: Path, rules: str, tests: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(rules=rules.strip("\n"), tests=tests.strip("\n")))
    return path


def authgate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COVERAGE_SECRET=SECRET)
    return subprocess.run(
        [str(AUTHGATE), "test", *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def line_of(path: Path, needle: str) -> int:
    """The line of the first line holding `needle`: where a gap must be reported."""
    lines = path.read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if needle in text)


ADMIN_OR_SUPPORT = """
  - name: admin
    match: {path: "/admin/**"}
    allow:
      any:
        - {role: admin}
        - {role: support}
"""
ADMIN = (
    "  - {name: admin, request: {path: /admin/x}, token: {roles: [admin]}, expect: {status: 200}}"
)
SUPPORT = (
    "  - {name: support, request: {path: /admin/x}, token: {roles: [support]}, "
    "expect: {status: 200}}"
)
NOBODY = (
    "  - {name: user, request: {path: /admin/x}, token: {roles: [user]}, expect: {status: 403}}"
)
ANONYMOUS = "  - {name: anonymous, request: {path: /admin/x}, expect: {status: 401}}"

# (id, rules, tests, gaps as (needle on the reported line, text after file:line: ), percent)
CASES: list[tuple[str, str, str, list[tuple[str, str]], float]] = [
    (
        "any-alternative-never-taken",
        ADMIN_OR_SUPPORT,
        "\n".join([ADMIN, NOBODY]),
        [("role: support", "rule admin, allow.any[1] (role support): never true")],
        83.3,
    ),
    (
        "short-circuit-leaves-later-alternatives-unevaluated",
        ADMIN_OR_SUPPORT,
        ADMIN,
        [
            ("any:", "rule admin, allow (any of): never false"),
            ("role: admin", "rule admin, allow.any[0] (role admin): never false"),
            ("role: support", "rule admin, allow.any[1] (role support): never true"),
            ("role: support", "rule admin, allow.any[1] (role support): never false"),
        ],
        33.3,
    ),
    (
        "every-outcome-decided",
        ADMIN_OR_SUPPORT,
        "\n".join([ADMIN, SUPPORT, ANONYMOUS]),
        [],
        100.0,
    ),
    (
        "not-never-false",
        """
  - name: open
    match: {path: "/admin/**"}
    allow:
      not: {role: banned}
""",
        NOBODY.replace("403", "200"),
        [
            ("not:", "rule open, allow (not): never false"),
            ("not:", "rule open, allow.not (role banned): never true"),
        ],
        50.0,
    ),
    (
        "all-member-never-false",
        """
  - name: admin
    match: {path: "/admin/**"}
    allow:
      all:
        - {role: admin}
        - {scope: admin:write}
""",
        "\n".join(
            [
                ADMIN.replace("roles: [admin]", "roles: [admin], scopes: [admin:write]"),
                ADMIN.replace("200", "403").replace("name: admin", "name: no scope"),
            ]
        ),  # fmt: skip
        [("role: admin", "rule admin, allow.all[0] (role admin): never false")],
        83.3,
    ),
    (
        "claim-with-a-path-parameter-never-false",
        """
  - name: own
    match: {path: "/users/{id}"}
    allow: {claim: sub, equals: "{id}"}
""",
        "  - {name: me, request: {path: /users/al}, token: {sub: al}, expect: {status: 200}}",
        [("claim: sub", "rule own, allow (claim sub equals '{id}'): never false")],
        50.0,
    ),
    (
        "a-rule-no-test-reaches",
        ADMIN_OR_SUPPORT
        + """
  - name: public
    match: {path: /pub}
    allow: anyone
""",
        "\n".join([ADMIN, SUPPORT, ANONYMOUS]),
        [("name: public", "rule public: no test reaches it (1 branch)")],
        85.7,
    ),
    (
        "a-bad-token-stops-before-the-condition",
        ADMIN_OR_SUPPORT,
        "  - {name: expired, request: {path: /admin/x}, token: {roles: [admin], ttl: -1h}, "
        "expect: {status: 401}}",
        [
            ("any:", "rule admin, allow (any of): never true"),
            ("any:", "rule admin, allow (any of): never false"),
            ("role: admin", "rule admin, allow.any[0] (role admin): never true"),
            ("role: admin", "rule admin, allow.any[0] (role admin): never false"),
            ("role: support", "rule admin, allow.any[1] (role support): never true"),
            ("role: support", "rule admin, allow.any[1] (role support): never false"),
        ],
        0.0,
    ),
    (
        "a-hidden-rule's-denial-counts",
        """
  - name: ops
    match: {path: /ops}
    hide: true
    allow: {role: ops}
""",
        "  - {name: hidden, request: {path: /ops}, token: {roles: [user]}, expect: {status: 404}}",
        [("role: ops", "rule ops, allow (role ops): never true")],
        50.0,
    ),
    (
        # issue 23, item 8: the five requests before the 429 went through `anyone`
        "every-request-of-a-repeat-counts",
        """
  - name: login
    match: {path: /login}
    allow: anyone
    limits: [{name: login-ip, key: ip, rate: 5/minute}]
""",
        "  - {name: sixth is refused, request: {path: /login}, repeat: 6, expect: {status: 429}}",
        [],
        100.0,
    ),
]


@pytest.mark.parametrize(
    "rules, tests, gaps, pct", [row[1:] for row in CASES], ids=[row[0] for row in CASES]
)
def test_coverage_names_each_gap_at_its_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rules: str,
    tests: str,
    gaps: list[tuple[str, str]],
    pct: float,
) -> None:
    path = write(tmp_path, rules, tests)
    r = authgate("--coverage", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if ": coverage: " in line)
    assert lines[at].endswith(f"branches covered ({pct:.1f}%)"), lines[at]
    want = sorted(((line_of(path, needle), text) for needle, text in gaps), key=lambda g: g[0])
    assert lines[at + 1 :] == [f"  {path}:{line}: {text}" for line, text in want]

    # The same through the command's entry point in this process (a second
    # process per case would only cost time).
    monkeypatch.setenv("COVERAGE_SECRET", SECRET)
    assert main(["test", "--coverage", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    (one,) = doc["policies"]
    assert one["coverage"]["branches"]["percent"] == pct
    assert [(g["line"], g["file"]) for g in one["coverage"]["gaps"]] == [
        (line, str(path)) for line, _ in want
    ]


def test_json_is_one_document_with_the_tests_and_the_coverage(tmp_path: Path) -> None:
    path = write(tmp_path, ADMIN_OR_SUPPORT, "\n".join([ADMIN, NOBODY.replace("403", "200")]))
    r = authgate("--json", "--coverage", path)
    assert r.returncode == 1  # the second test fails
    doc = json.loads(r.stdout)
    (one,) = doc["policies"]
    assert (one["tests"], one["passed"]) == (2, 1)
    assert one["failures"][0]["test"] == "user"
    assert "expected status 200, got 403" in one["failures"][0]["problems"][0]
    cov = one["coverage"]
    assert cov["rules"] == {"total": 1, "reached": 1}
    assert cov["branches"] == {"total": 6, "covered": 5, "percent": 83.3}
    assert cov["gaps"] == [
        {"kind": "branch", "file": str(path), "line": line_of(path, "role: support"),
         "rule": "admin", "where": "allow.any[1]", "condition": "role support", "never": True},
    ]  # fmt: skip
    assert cov["by_rule"] == [
        {"rule": "admin", "line": line_of(path, "name: admin"), "tests": 2, "evaluated": 2,
         "branches": 6, "covered": 5},
    ]  # fmt: skip
    assert doc["exit"] == 1
    # Without --coverage, the document has the tests only.
    assert "coverage" not in json.loads(authgate("--json", path).stdout)["policies"][0]


@pytest.mark.parametrize(
    "least, code",
    [("83.3", 0), ("83.4", 1), ("0", 0), ("100", 1)],
)
def test_min_coverage_fails_below_the_percentage(tmp_path: Path, least: str, code: int) -> None:
    path = write(tmp_path, ADMIN_OR_SUPPORT, "\n".join([ADMIN, NOBODY]))  # 83.3%
    r = authgate("--min-coverage", least, path)
    assert r.returncode == code, r.stdout + r.stderr
    assert "coverage: 1/1 rules reached, 5/6 branches covered (83.3%)" in r.stdout
    below = f"{path}: branch coverage 83.3% is below --min-coverage {float(least):g}%"
    assert (below in r.stdout) == (code == 1)


@pytest.mark.parametrize("least", ["101", "-1"])
def test_min_coverage_outside_0_to_100_is_an_error(tmp_path: Path, least: str) -> None:
    path = write(tmp_path, ADMIN_OR_SUPPORT, ADMIN)
    r = authgate(f"--min-coverage={least}", path)
    assert r.returncode == 2
    assert "--min-coverage is a percentage from 0 to 100" in r.stderr


def test_a_policy_that_does_not_load_is_an_error_in_the_document(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: []\ndefault: nowhere\n")
    r = authgate("--json", "--coverage", bad)
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["policies"][0]["policy"] == str(bad)
    assert doc["policies"][0]["error"].startswith(f"{bad}:")


def test_the_shipped_policies_are_fully_covered() -> None:
    shipped = sorted(str(p.relative_to(ROOT)) for p in POLICIES.glob("*.yaml")
                     if not p.name.endswith(".tests.yaml"))  # fmt: skip
    r = authgate("--min-coverage", "100", *shipped)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(authgate("--coverage", "--json", *shipped).stdout)
    assert [p["policy"] for p in doc["policies"]] == shipped
    for p in doc["policies"]:
        assert p["coverage"]["rules"]["reached"] == p["coverage"]["rules"]["total"] > 0
        assert p["coverage"]["branches"]["percent"] == 100.0, p["coverage"]["gaps"]


# --- the walk itself -------------------------------------------------------------

ROLES = ("a", "b", "c")
leaves = st.one_of(
    st.sampled_from(ROLES).map(c.HasRole),
    st.sampled_from([c.Anyone(), c.Nobody(), c.Authenticated()]),
)
trees = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, min_size=1, max_size=3).map(lambda k: c.AnyOf(tuple(k))),
        st.lists(kids, min_size=1, max_size=3).map(lambda k: c.AllOf(tuple(k))),
        kids.map(c.Not),
    ),
    max_leaves=8,
)
callers = st.one_of(
    st.none(),
    st.frozensets(st.sampled_from(ROLES)).map(
        lambda roles: Identity("u", "iss", "jwt", roles, frozenset(), {})
    ),
)


@given(trees, callers)
def test_the_walk_agrees_with_holds_and_records_only_possible_outcomes(
    cond: c.Condition, who: Identity | None
) -> None:
    seen: set[tuple[str, bool]] = set()
    assert _visit(cond, who, {}, "allow", seen) == cond.holds(who, {})
    places = dict(nodes(cond))
    assert ("allow", cond.holds(who, {})) in seen
    for where, outcome in seen:
        assert outcome in outcomes_of(places[where])


def test_an_any_stops_at_its_first_true_alternative() -> None:
    cond = c.AnyOf((c.Anyone(), c.HasRole("a")))
    seen: set[tuple[str, bool]] = set()
    _visit(cond, None, {}, "allow", seen)
    assert seen == {("allow", True), ("allow.any[0]", True)}


@pytest.mark.parametrize(
    "covered, total, shown",
    [(0, 0, 100.0), (2, 3, 66.6), (1999, 2000, 99.9), (3, 3, 100.0), (0, 5, 0.0)],
)
def test_percent_rounds_down(covered: int, total: int, shown: float) -> None:
    assert percent(covered, total) == shown
