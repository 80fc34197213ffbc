"""The policy test runner: throwaway keys, signed test tokens, expectations,
and the tests every policy under policies/ ships with."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authgate.core.decision import RequestView, judge
from authgate.core.model import Policy
from authgate.policy.load import load_policy, parse_policy
from authgate.policy.marks import PolicyError
from authgate.runtime.stores import MemoryStore
from authgate.tools.keys import jwks_for, mint, new_rsa_key
from authgate.tools.policytests import (
    TEST_KID,
    format_report,
    load_cases,
    run_policy,
    sign,
    with_test_keys,
)
from authgate.tools.testcases import CaseToken
from conftest import POLICIES

NOW = 1_800_000_000.0
REAL_KEY = new_rsa_key()

POLICY = """version: 1
authn:
  jwt:
    - name: main
      issuer: https://as.test
      audience: [api, other]
      algorithms: [RS256]
      jwks_file: jwks.json
      roles_claim: realm.roles
      scope_claim: scp
limits:
  - {name: per-ip, key: ip, rate: 3/minute}
rules:
  - name: public
    match: {path: /pub}
    allow: anyone
  - name: admin
    match: {path: "/admin/**"}
    allow: {role: admin}
  - name: write
    match: {path: /w, methods: [POST]}
    allow: {scope: write}
"""


def write(tmp_path: Path, text: str = POLICY, name: str = "p.yaml") -> Path:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_for(REAL_KEY, "real")))
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return load_policy(write(tmp_path))


def ask(p: Policy, token: str) -> tuple[int, str]:
    r = RequestView("GET", "/admin/x", (("authorization", f"Bearer {token}"),), "127.0.0.1")
    d = judge(p, r, NOW, MemoryStore())
    return d.status, d.reason


# --- throwaway keys --------------------------------------------------------------


def test_the_test_copy_trusts_only_the_throwaway_key(policy: Policy) -> None:
    testable, keys = with_test_keys(policy)
    real = mint(REAL_KEY, sub="a", roles=[], iss="https://as.test", aud="api", kid="real",
                now=NOW, extra={"realm": {"roles": ["admin"]}})  # fmt: skip
    fake = sign(keys, CaseToken(None, 3600, (("roles", ["admin"]),)), NOW)
    assert ask(policy, real) == (0, "allowed")
    assert ask(policy, fake) == (401, "invalid_token")  # the real policy is untouched
    assert ask(testable, real) == (401, "invalid_token")
    assert ask(testable, fake) == (0, "allowed")
    # Everything but the keys is as loaded, derived fields included.
    assert [i.keys[0].kid for i in testable.issuers] == [TEST_KID]
    assert (testable.rules, testable.limits, testable.ip_limits, testable.late_limits) == (
        policy.rules, policy.limits, policy.ip_limits, policy.late_limits)  # fmt: skip
    assert testable.issuers[0].audience == policy.issuers[0].audience
    assert testable.token_cache is not policy.token_cache


def _public_pem(private: Any) -> bytes:
    return bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip


@pytest.mark.parametrize(
    "algorithms, real_key, key_type, alg",
    [("[RS256, ES256]", lambda: REAL_KEY, rsa.RSAPublicKey, "RS256"),
     ("[PS384]", lambda: REAL_KEY, rsa.RSAPublicKey, "PS384"),
     ("[ES384]", lambda: ec.generate_private_key(ec.SECP384R1()), ec.EllipticCurvePublicKey,
      "ES384"),
     ("[EdDSA]", ed25519.Ed25519PrivateKey.generate, ed25519.Ed25519PublicKey, "EdDSA"),
     ("[HS512, HS256]", None, bytes, "HS256")],
)  # fmt: skip
def test_a_throwaway_key_for_each_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithms: str,
    real_key: Callable[[], Any] | None, key_type: type, alg: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("AUTHGATE_TEST_SECRET", "s" * 32)
    if real_key is None:
        source = "secret_env: AUTHGATE_TEST_SECRET"
    else:
        source = "public_key_file: pub.pem"
        (tmp_path / "pub.pem").write_bytes(_public_pem(real_key()))
    text = POLICY.replace("algorithms: [RS256]", f"algorithms: {algorithms}").replace(
        "jwks_file: jwks.json", source)  # fmt: skip
    testable, keys = with_test_keys(load_policy(write(tmp_path, text)))
    assert isinstance(testable.issuers[0].keys[0].key, key_type)
    token = sign(keys, CaseToken(None, 60, (("roles", ["admin"]),)), NOW)
    assert jwt.get_unverified_header(token)["alg"] == alg
    assert ask(testable, token) == (0, "allowed")


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


@pytest.mark.parametrize(
    "written, expected",
    [((), {"sub": "test-user", "iss": "https://as.test", "aud": "api"}),
     ((("roles", ["a", "b"]),), {"realm": {"roles": ["a", "b"]}}),
     ((("roles", ["a"]), ("realm", {"other": 1})), {"realm": {"other": 1, "roles": ["a"]}}),
     ((("scopes", ["r", "w"]),), {"scp": "r w"}),
     ((("sub", "root"), ("aud", "elsewhere"), ("iss", "x")),
      {"sub": "root", "aud": "elsewhere", "iss": "x"}),
     ((("exp", 5),), {"exp": 5}),
     ((("email_verified", True),), {"email_verified": True})],
)  # fmt: skip
def test_sign_places_claims(policy: Policy, written: tuple[tuple[str, Any], ...],
                            expected: dict[str, Any]) -> None:  # fmt: skip
    _, keys = with_test_keys(policy)
    claims = claims_of(sign(keys, CaseToken(None, 60, written), NOW))
    assert {k: claims[k] for k in expected} == expected
    if "exp" not in expected:
        assert claims["exp"] == NOW + 60


def test_sign_problems(policy: Policy, tmp_path: Path) -> None:
    _, keys = with_test_keys(policy)
    with pytest.raises(ValueError, match="no issuer named 'nope' \\(has: main\\)"):
        sign(keys, CaseToken("nope", 60, ()), NOW)
    with pytest.raises(ValueError, match="no JWT issuer"):
        sign({}, CaseToken(None, 60, ()), NOW)


# --- running cases -----------------------------------------------------------------

CASES = """
tests:
  - name: pass-status
    request: {path: /pub}
    expect: {status: 200, rule: public, headers: {X-Auth-Subject: null}}
  - name: pass-identity
    request: {path: /admin/x}
    token: {sub: root, roles: [admin]}
    expect: {status: 200, rule: admin, reason: allowed, headers: {X-Auth-Subject: root}}
  - name: pass-answer-header
    request: {method: POST, path: /w}
    token: {scopes: [read]}
    expect:
      status: 403
      headers: {WWW-Authenticate: 'Bearer realm="api", error="insufficient_scope", scope="write"'}
  - name: pass-repeat
    request: {path: /pub}
    repeat: 4
    expect: {status: 429, rule: null}
  - name: pass-expired
    request: {path: /admin/x}
    token: {roles: [admin], ttl: -1h}
    expect: {status: 401, reason: invalid_token}
  - name: fail-status
    request: {path: /admin/x}
    expect: {status: 200}
  - name: fail-rule
    request: {path: /pub}
    expect: {status: 200, rule: admin}
  - name: fail-rule-null
    request: {path: /pub}
    expect: {status: 200, rule: null}
  - name: fail-reason
    request: {path: /admin/x}
    expect: {status: 401, reason: invalid_token}
  - name: fail-header-value
    request: {path: /admin/x}
    token: {sub: root, roles: [admin]}
    expect: {status: 200, headers: {X-Auth-Subject: bob}}
  - name: fail-header-absent
    request: {path: /admin/x}
    token: {sub: root, roles: [admin]}
    expect: {status: 200, headers: {X-Auth-Roles: null}}
  - name: fail-header-missing
    request: {path: /admin/x}
    expect: {status: 401, headers: {Retry-After: "1"}}
  - name: fail-repeat-one-short
    request: {path: /pub}
    repeat: 3
    expect: {status: 429}
  - name: fail-issuer
    request: {path: /admin/x}
    token: {issuer: other}
    expect: {status: 200}
  - name: fail-session
    request: {path: /admin/x}
    session: {sub: root, roles: [admin]}
    expect: {status: 200}
"""

PROBLEMS = {
    "fail-status": ["expected status 200, got 401 (no_credentials)"],
    "fail-rule": ["expected rule 'admin', got 'public'"],
    "fail-rule-null": ["expected rule None, got 'public'"],
    "fail-reason": ["expected reason 'invalid_token', got 'no_credentials'"],
    "fail-header-value": ["expected X-Auth-Subject: 'bob' forwarded, got 'root'"],
    "fail-header-absent": ["expected no X-Auth-Roles forwarded, got 'admin'"],
    "fail-header-missing": ["expected Retry-After: '1' in the answer, got none"],
    "fail-repeat-one-short": ["expected status 429, got 200 (allowed)"],
    "fail-issuer": ["cannot sign the token: the policy has no issuer named 'other' (has: main)"],
    "fail-session": [
        "cannot seal the session: the policy has no OpenID Connect login (authn.oidc) for a session"
    ],
}


def test_passing_and_failing_cases(tmp_path: Path) -> None:
    report = run_policy(load_policy(write(tmp_path, POLICY + CASES)), now=NOW)
    got = {o.case.name: list(o.problems) for o in report.outcomes}
    assert {k: v for k, v in got.items() if k.startswith("pass-")} == {
        k: [] for k in got if k.startswith("pass-")}  # fmt: skip
    assert {k: v for k, v in got.items() if k.startswith("fail-")} == PROBLEMS
    assert report.uncovered == ()


def test_the_report_shows_each_failure_with_its_trace_and_no_token(tmp_path: Path) -> None:
    report = run_policy(load_policy(write(tmp_path, POLICY + CASES)), now=NOW)
    text = format_report(report)
    failed = [o for o in report.failed if o.case.name == "fail-header-value"][0]
    token = dict(failed.explanation.request.headers)["authorization"].split()[1]
    assert token not in text and token[:10] + "…" in text
    assert f"FAIL  {tmp_path / 'p.yaml'}:" in text
    assert "      expected X-Auth-Subject: 'bob' forwarded, got 'root'\n" in text
    assert "      |   rule admin: matches\n" in text
    assert "      | => forwarded to the backend (rule admin): GET /admin/x\n" in text
    assert "ok    " not in text  # passing ones only with verbose
    assert text.endswith(f"{tmp_path / 'p.yaml'}: 15 tests, 5 passed, 10 failed\n")
    assert "ok    " in format_report(report, verbose=True)


def test_uncovered_rules_are_reported(tmp_path: Path) -> None:
    tests = "tests:\n  - {name: t, request: {path: /pub}, expect: {status: 200}}\n"
    report = run_policy(load_policy(write(tmp_path, POLICY + tests)), now=NOW)
    assert report.uncovered == ("admin", "write")
    assert f"{tmp_path / 'p.yaml'}: no test reaches rule(s) admin, write\n" in format_report(report)


def test_cases_in_the_file_and_beside_it(tmp_path: Path) -> None:
    inline = "tests:\n  - {name: a, request: {path: /pub}, expect: {status: 200}}\n"
    policy = load_policy(write(tmp_path, POLICY + inline))
    (tmp_path / "p.tests.yaml").write_text(
        "tests:\n  - {name: b, request: {path: /admin/x}, expect: {status: 401}}\n")  # fmt: skip
    assert [c.name for c in load_cases(policy)] == ["a", "b"]
    (tmp_path / "p.tests.yaml").write_text(
        "tests:\n  - {name: a, request: {path: /admin/x}, expect: {status: 401}}\n")  # fmt: skip
    with pytest.raises(PolicyError, match="p.tests.yaml:2: test 'a' is also in the policy"):
        load_cases(policy)


def test_a_bad_tests_section_is_the_tools_business_not_the_gateways(tmp_path: Path) -> None:
    # The loader keeps `tests:` as read; the tools (check, test) parse it.
    write(tmp_path)
    policy = parse_policy(POLICY + "tests: 5\n", "p.yaml", tmp_path)
    with pytest.raises(PolicyError, match=r"p.yaml:\d+: tests must be a list"):
        load_cases(policy)


# --- the repository's policies -------------------------------------------------------

REPO_POLICIES = sorted(p for p in POLICIES.glob("*.yaml") if not p.name.endswith(".tests.yaml"))


@pytest.mark.parametrize("path", REPO_POLICIES, ids=lambda p: p.name)
def test_every_shipped_policy_passes_its_tests_and_covers_each_rule(
    path: Path, demo_key: Any
) -> None:
    report = run_policy(load_policy(path))
    assert report.outcomes, f"{path.name} ships no tests"
    assert report.failed == (), format_report(report)
    assert report.uncovered == ()


def test_every_shipped_policy_has_its_tests_beside_it() -> None:
    for path in REPO_POLICIES:
        assert (path.parent / f"{path.stem}.tests.yaml").is_file(), path.name


def test_the_runner_never_needs_the_real_key(tmp_path: Path) -> None:
    # The JWKS on disk is only read at load; the tests sign with their own key.
    path = write(tmp_path, POLICY + CASES)
    policy = load_policy(path)
    os.remove(tmp_path / "jwks.json")
    assert len(run_policy(policy, now=NOW).failed) == len(PROBLEMS)
