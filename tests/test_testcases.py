"""The policy test-case format: parsing, defaults, and every problem at file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from authgate.policy.load import parse_policy
from authgate.policy.marks import PolicyError
from authgate.tools.policytests import load_cases
from authgate.tools.testcases import Case, beside, load_beside, parse_ttl

HEAD = """version: 1
rules:
  - {name: a, match: {path: /a}, allow: anyone}
  - {name: b, match: {path: "/b/{id}"}, allow: {claim: sub, equals: "{id}"}}
"""


def cases(tests: str) -> tuple[Case, ...]:
    return load_cases(parse_policy(HEAD + tests, "p.yaml"))


def test_a_full_case() -> None:
    [c] = cases(
        "tests:\n"
        "  - name: admin reads\n"
        "    request: {method: POST, path: '/b/x?q=1', ip: '::1', host: api.test,\n"
        "              headers: {Accept: application/json, X-Two: [one, two]}}\n"
        "    token: {sub: root, roles: [admin], scopes: [r, w], ttl: -1h, issuer: main,\n"
        "            tenant: {id: 7}}\n"
        "    repeat: 3\n"
        "    expect: {status: 403, rule: b, reason: forbidden,\n"
        "             headers: {X-Auth-Subject: root, WWW-Authenticate: null}}\n"
    )
    assert (c.name, c.file, c.line, c.repeat) == ("admin reads", "p.yaml", 6, 3)
    r = c.request
    assert (r.method, r.target, r.ip, r.host) == ("POST", "/b/x?q=1", "::1", "api.test")
    assert r.headers == (("Accept", "application/json"), ("X-Two", "one"), ("X-Two", "two"))
    assert c.token is not None
    assert (c.token.issuer, c.token.ttl) == ("main", -3600.0)
    assert dict(c.token.claims) == {
        "sub": "root", "roles": ["admin"], "scopes": ["r", "w"], "tenant": {"id": 7}}  # fmt: skip
    assert type(dict(c.token.claims)["tenant"]) is dict  # plain JSON, not YAML marks
    e = c.expect
    assert (e.status, e.rule, e.check_rule, e.reason) == (403, "b", True, "forbidden")
    assert e.headers == (("X-Auth-Subject", "root"), ("WWW-Authenticate", None))
    assert c.where == "p.yaml:6"


def test_defaults() -> None:
    [c] = cases("tests:\n  - {name: t, request: {path: /a}, expect: {status: 200}}\n")
    assert (c.request.method, c.request.ip, c.request.host, c.request.headers) == (
        "GET", "127.0.0.1", None, ())  # fmt: skip
    assert (c.token, c.repeat, c.expect.check_rule, c.expect.reason) == (None, 1, False, None)


def test_rule_null_means_no_rule_may_match() -> None:
    [c] = cases("tests:\n  - {name: t, request: {path: /x}, expect: {status: 404, rule: null}}\n")
    assert (c.expect.rule, c.expect.check_rule) == (None, True)


def test_a_policy_without_tests_has_none() -> None:
    assert load_cases(parse_policy(HEAD, "p.yaml")) == ()


ERRORS = [
    # (tests section, line, message)
    ("tests: {a: 1}\n", 5, "tests must be a list, not a mapping"),
    ("tests:\n  - just text\n", 6, "a test must be a mapping, not str 'just text'"),
    ("tests:\n  - {request: {path: /a}, expect: {status: 200}}\n", 6, "a test needs 'name'"),
    ("tests:\n  - {name: t, expect: {status: 200}}\n", 6, "a test needs 'request'"),
    ("tests:\n  - {name: t, request: {path: /a}}\n", 6, "a test needs 'expect'"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    expect: {status: 200}\n    extra: 1\n",
     9, "unknown key 'extra' in a test"),
    ("tests:\n  - {name: t, request: {path: /a}, expect: {status: 200}}\n"
     "  - {name: t, request: {path: /a}, expect: {status: 200}}\n", 7, "duplicate test name 't'"),
    ("tests:\n  - name: t\n    request: {}\n    expect: {status: 200}\n", 7,
     "test 't' request needs 'path'"),
    ("tests:\n  - name: t\n    request: {path: /a, method: get}\n    expect: {status: 200}\n", 7,
     "method 'get' must be upper-case"),
    ("tests:\n  - name: t\n    request: {path: /a, ip: 10.0.0.300}\n    expect: {status: 200}\n",
     7, "not an IP address"),
    ("tests:\n  - name: t\n    request: {path: /a, headers: {Bad Name: x}}\n"
     "    expect: {status: 200}\n", 7, "'Bad Name' is not a header name"),
    ("tests:\n  - name: t\n    request: {path: /a, headers: {X-N: 5}}\n"
     "    expect: {status: 200}\n", 7, "header X-N must be a string or a list of strings"),
    ("tests:\n  - name: t\n    request: {path: /a, port: 1}\n    expect: {status: 200}\n", 7,
     "unknown key 'port'"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    token: {ttl: soon}\n"
     "    expect: {status: 200}\n", 8, "ttl must be a duration like 1h"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    token: {roles: admin}\n"
     "    expect: {status: 200}\n", 8, "roles must be a list of strings"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    token: {born: 2001-01-01}\n"
     "    expect: {status: 200}\n", 8, "is not a JSON value (quote dates and times)"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    token: [sub]\n"
     "    expect: {status: 200}\n", 8, "test 't' token must be a mapping"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    expect: {rule: a}\n", 8,
     "test 't' expect needs 'status'"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    expect: {status: 0}\n", 8,
     "status must be one of 200, 303, 400, 401, 403, 404, 405, 429, 500, 503 (200: forwarded), "
     "not 0"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    expect: {status: '200'}\n", 8,
     "status must be one of"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    expect: {status: 200, rule: c}\n", 8,
     "names rule 'c', which the policy lacks"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    expect: {status: 200, headers: {X: 1}}\n",
     8, "expected header X must be a string (or null: absent)"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    repeat: 0\n    expect: {status: 200}\n",
     8, "repeat must be a whole number from 1 to 10000"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    token: {sub: a}\n    session: {sub: a}\n"
     "    expect: {status: 200}\n", 9, "a token or a session, not both"),
    ("tests:\n  - name: t\n    request: {path: /a}\n    session: {roles: admin}\n"
     "    expect: {status: 200}\n", 8, "test 't' session roles must be a list of strings"),
]  # fmt: skip


@pytest.mark.parametrize("tests, line, message", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_problems_name_file_and_line(tests: str, line: int, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        cases(tests)
    assert (info.value.file, info.value.line) == ("p.yaml", line), info.value
    assert message in info.value.message


@pytest.mark.parametrize(
    "text, seconds",
    [("1h", 3600.0), ("-1h", -3600.0), ("30s", 30.0), ("- 5m", -300.0), ("90", 90.0),
     (90, 90.0), (-10, -10.0), ("2d", 172800.0)],
)  # fmt: skip
def test_ttl(text: str | int, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "1 hour", "h", "1.5h", True, None, "--1h"])
def test_bad_ttl(text: object) -> None:
    with pytest.raises(ValueError, match="ttl must be a duration"):
        parse_ttl(text)


@pytest.mark.parametrize(
    "policy, tests",
    [("policies/example.yaml", "policies/example.tests.yaml"), ("p.yml", "p.tests.yaml"),
     ("/x/y.z.yaml", "/x/y.z.tests.yaml")],
)  # fmt: skip
def test_beside(policy: str, tests: str) -> None:
    assert beside(policy) == Path(tests)


def test_load_beside(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    assert load_beside(policy, {"a"}) == ()  # none there: no cases
    (tmp_path / "p.tests.yaml").write_text(
        "# tests\ntests:\n  - {name: t, request: {path: /a}, expect: {status: 200, rule: a}}\n"
    )
    [c] = load_beside(policy, {"a"})
    assert (c.file, c.line, c.expect.rule) == (str(tmp_path / "p.tests.yaml"), 3, "a")


@pytest.mark.parametrize(
    "text, line, message",
    [("tests: []\nmore: 1\n", 2, "unknown key 'more' in a tests file"),
     ("other: 1\n", 1, "unknown key 'other'"),
     ("{}\n", 1, "a tests file needs 'tests'"),
     ("- a\n", 1, "a tests file must be a mapping"),
     ("tests: [\n", 2, "YAML:"),
     ("tests:\n  - {name: t, request: {path: /a}, expect: {status: 200, rule: zz}}\n", 2,
      "names rule 'zz'")],
)  # fmt: skip
def test_load_beside_problems(tmp_path: Path, text: str, line: int, message: str) -> None:
    (tmp_path / "p.tests.yaml").write_text(text)
    with pytest.raises(PolicyError) as info:
        load_beside(tmp_path / "p.yaml", {"a"})
    assert (info.value.file, info.value.line) == (str(tmp_path / "p.tests.yaml"), line)
    assert message in info.value.message
