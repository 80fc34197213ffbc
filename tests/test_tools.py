"""The policy tools on the command line: what they print and their exit codes
(0 fine, 1 warnings with --strict or failed tests, 2 errors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from authgate.cli import main
from authgate.tools.commands import policy_files
from authgate.tools.keys import mint
from conftest import EXAMPLE, POLICIES

CLEAN = """version: 1
rules:
  - {name: health, match: {path: /health}, allow: anyone}
tests:
  - {name: up, request: {path: /health}, expect: {status: 200, rule: health}}
"""
WARNS = """version: 1
rules:
  - {name: api, match: {path: "/api/**"}, allow: anyone}
  - {name: admin, match: {path: "/api/admin"}, allow: nobody}
"""
BROKEN = """version: 1
rules:
  - {name: a, match: {path: /a, methods: GET}, allow: anyone}
"""
FAILING = CLEAN.replace("expect: {status: 200, rule: health}", "expect: {status: 401}")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, text in [("clean", CLEAN), ("warns", WARNS), ("broken", BROKEN),
                       ("failing", FAILING)]:  # fmt: skip
        (tmp_path / f"{name}.yaml").write_text(text)
        out[name] = str(tmp_path / f"{name}.yaml")
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "paths, expected",
    [(["a.yaml", "a.tests.yaml", "b.yaml"], ["a.yaml", "b.yaml"]),
     (["p/x.tests.yaml"], ["p/x.yaml"]), (["a.yaml", "a.yaml"], ["a.yaml"])],
)  # fmt: skip
def test_policy_files(paths: list[str], expected: list[str]) -> None:
    assert policy_files(paths) == expected


# --- check ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, strict, code",
    [("clean", False, 0), ("clean", True, 0), ("warns", False, 0), ("warns", True, 1),
     ("broken", False, 2), ("broken", True, 2)],
)  # fmt: skip
def test_check_exit_codes(capsys: pytest.CaptureFixture[str], files: dict[str, str], name: str,
                          strict: bool, code: int) -> None:  # fmt: skip
    assert run(capsys, "check", files[name], *(["--strict"] if strict else []))[0] == code


def test_check_output(capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
    code, out, _ = run(capsys, "check", files["clean"], files["warns"], files["broken"])
    assert code == 2
    assert out.splitlines() == [
        f"{files['warns']}:3: warning: rule 'api' allows anyone on requests that the later, "
        "stricter rule 'admin' (line 4) also covers; first match wins, so 'admin' is never asked "
        "about them [anyone-overlaps]",
        f"{files['warns']}:4: warning: rule 'admin' can never match: rule 'api' (line 3) comes "
        "first and matches every request it would [shadowed]",
        f"{files['broken']}:3: error: rule 'a' match.methods must be a list, not str 'GET' "
        "[invalid]",
        f"{files['clean']}: ok (1 rule, 1 test)",
        f"{files['warns']}: 2 warnings (2 rules, 0 tests)",
        f"{files['broken']}: does not load",
    ]


def test_check_reports_every_broken_rule(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\nrules:\n"
        "  - {name: a, match: {path: /a, methods: GET}, allow: anyone}\n"
        "  - {name: b, match: {path: /b}, allow: anyone}\n"
        "  - {name: c, match: {path: /c}, allow: {role: 5}}\n"
        "  - {name: b, match: {path: /d}, allow: anyone}\n"
    )
    code, out, _ = run(capsys, "check", str(tmp_path / "p.yaml"))
    assert code == 2
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert [e.split(":")[1] for e in errors] == ["3", "5", "6"], out


def test_check_reports_every_broken_section_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Not only rules: a problem in client_ip, ip, an issuer, api_keys, a
    limit, default or mode does not hide the others; each has its line."""
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"  # 1
        "client_ip: {header: X-Real-IP}\n"  # 2
        "ip: {block: [10.0.0.0/33]}\n"  # 3
        "authn:\n"  # 4
        "  jwt:\n"  # 5
        "    - {name: idp, issuer: https://idp.example, audience: api}\n"  # 6
        "  api_keys: {header: X-Key, keys: [{name: k, sha256: nothex}]}\n"  # 7
        "limits: [{name: l, key: ip, rate: 5/fortnight}]\n"  # 8
        "rules:\n"  # 9
        "  - {name: a, match: {path: /a}, allow: {role: 5}}\n"  # 10
        "  - {name: b, match: {path: /b}, accept: [jwt], allow: authenticated}\n"  # 11
        "default: nowhere\n"  # 12
        "mode: loud\n"  # 13
    )
    code, out, _ = run(capsys, "check", str(tmp_path / "p.yaml"))
    assert code == 2
    errors = [line for line in out.splitlines() if ": error: " in line]
    lines = [int(e.split(":")[1]) for e in errors]
    # Line 11 accepts jwt, which the file configures (wrongly, on line 6): no
    # second report of that one problem.
    assert lines == [2, 3, 6, 7, 8, 10, 12, 13], out


def test_check_json(capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
    code, out, _ = run(capsys, "check", "--format", "json", "--strict", files["warns"])
    data = json.loads(out)
    assert code == data["exit"] == 1
    assert (data["errors"], data["warnings"]) == (0, 2)
    assert [(f["line"], f["severity"], f["code"]) for f in data["findings"]] == [
        (3, "warning", "anyone-overlaps"), (4, "warning", "shadowed")]  # fmt: skip


def test_check_reports_errors_in_the_tests_beside_a_policy(
    capsys: pytest.CaptureFixture[str], files: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "clean.tests.yaml").write_text("tests:\n  - {name: x}\n")
    code, out, _ = run(capsys, "check", str(tmp_path / "clean.tests.yaml"))
    assert code == 2
    assert out.splitlines()[0] == (
        f"{tmp_path / 'clean.tests.yaml'}:2: error: a test needs 'request' [invalid]"
    )


def test_a_condition_naming_a_missing_parameter_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\nrules:\n  - name: u\n    match: {path: /users}\n"
        "    allow: {claim: sub, equals: '{id}'}\n")  # fmt: skip
    code, out, _ = run(capsys, "check", str(tmp_path / "p.yaml"))
    assert code == 2
    assert (
        "p.yaml:5: error: rule 'u' uses path parameter(s) id that '/users' does not define" in out
    )


def test_check_the_shipped_policies(capsys: pytest.CaptureFixture[str], demo_key: Any) -> None:
    code, out, _ = run(capsys, "check", "--strict", "--listen", "127.0.0.1:8080",
                       *sorted(str(p) for p in POLICIES.glob("*.yaml")))  # fmt: skip
    assert code == 0, out
    assert f"{EXAMPLE}: ok (7 rules, 22 tests)\n" in out


# --- test ------------------------------------------------------------------------------


def test_test_exit_codes(capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
    code, out, _ = run(capsys, "test", files["clean"])
    assert (code, out) == (0, f"{files['clean']}: 1 test, 1 passed\n")
    code, out, _ = run(capsys, "test", files["clean"], files["failing"])
    assert code == 1
    assert f"FAIL  {files['failing']}:5: up\n      expected status 401, got 200 (allowed)\n" in out
    assert out.endswith(f"{files['failing']}: 1 test, 0 passed, 1 failed\n")
    code, _, err = run(capsys, "test", files["broken"], files["clean"])
    assert code == 2
    assert err == f"authgate test: {files['broken']}:3: rule 'a' match.methods must be a list, " \
        "not str 'GET'\n"  # fmt: skip


def test_test_strict_wants_every_rule_tested(
    capsys: pytest.CaptureFixture[str], files: dict[str, str]
) -> None:
    # warns.yaml has no tests: fine, unless --strict.
    assert run(capsys, "test", files["warns"])[0] == 0
    code, out, _ = run(capsys, "test", "--strict", files["warns"])
    assert (code, out) == (1, f"{files['warns']}: 0 tests, 0 passed\n"
                              f"{files['warns']}: --strict: the policy has no tests\n")  # fmt: skip
    assert run(capsys, "test", "--strict", files["clean"])[0] == 0


def test_test_the_shipped_policies(capsys: pytest.CaptureFixture[str], demo_key: Any) -> None:
    """What `authgate test policies/*.yaml` does: the shell glob includes the
    NAME.tests.yaml files; each stands for its policy."""
    code, out, _ = run(capsys, "test", "--strict", *sorted(str(p) for p in POLICIES.glob("*.yaml")))
    assert code == 0, out
    policies = [p for p in POLICIES.glob("*.yaml") if not p.name.endswith(".tests.yaml")]
    assert len(out.splitlines()) == len(policies)
    assert f"{EXAMPLE}: 22 tests, 22 passed\n" in out


def test_test_needs_no_real_key(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                demo_key: Any) -> None:  # fmt: skip
    """The policy's key files are read at load; the tests never sign with them."""
    shutil.copytree(POLICIES, tmp_path / "policies")
    (tmp_path / "policies" / "keys" / "demo-private.pem").unlink()
    assert run(capsys, "test", str(tmp_path / "policies" / "example.yaml"))[0] == 0


# --- explain ---------------------------------------------------------------------------


def test_explain(capsys: pytest.CaptureFixture[str], demo_key: Any) -> None:
    token = mint(demo_key, sub="alice", roles=["user"], now=1_795_715_440.0)
    code, out, _ = run(capsys, "explain", str(EXAMPLE), "GET", "/api/admin/dashboard",
                       "--token", token, "-H", "Accept: application/json",
                       "--at", "2026-11-26T17:50:40Z")  # fmt: skip
    assert code == 0
    assert out.startswith(
        "GET /api/admin/dashboard\n"
        "  accept: application/json\n"
        "  authorization: Bearer eyJhbGciOi…\n"
        "  (judged as of 2026-11-26 17:50:40 UTC; rate limits are read, not counted)\n"
    )  # fmt: skip
    assert "    role admin: false (roles: user)\n" in out
    assert "\n=> 403 Forbidden   (reason forbidden, rule admin)\n" in out
    assert "Date: Thu, 26 Nov 2026 17:50:40 GMT" in out
    assert token[10:] not in out


def test_explain_from_behind_a_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", str(POLICIES / "behind-a-proxy.yaml"), "GET", "/x",
                       "--ip", "203.0.113.9", "--peer", "10.0.0.7")  # fmt: skip
    assert code == 0
    assert "  client ip 203.0.113.9 (from x-forwarded-for, peer 10.0.0.7)\n" in out
    assert "  ip: on the block list\n" in out


@pytest.mark.parametrize(
    "argv, message",
    [(["-H", "nonsense"], "authgate explain: header 'nonsense' must look like 'Name: value'"),
     (["--ip", "300.1.1.1"], "authgate explain: not an IP address: '300.1.1.1'"),
     (["--at", "capture"], "authgate explain: 'capture' is for replay"),
     (["--at", "soon"], "authgate explain: Invalid isoformat string")],
)  # fmt: skip
def test_explain_errors_exit_2(capsys: pytest.CaptureFixture[str], demo_key: Any, argv: list[str],
                               message: str) -> None:  # fmt: skip
    code, _, err = run(capsys, "explain", str(EXAMPLE), "GET", "/", *argv)
    assert code == 2 and err.startswith(message)


def test_explain_a_broken_policy(capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
    code, _, err = run(capsys, "explain", files["broken"], "GET", "/a")
    assert (code, err) == (2, f"authgate explain: {files['broken']}:3: rule 'a' match.methods "
                              "must be a list, not str 'GET'\n")  # fmt: skip


# --- issue 23: what a new user still trips on --------------------------------------------


def test_check_fails_on_a_fill_in_left_anywhere(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`authgate import openapi` marks what is the user's with FILL-IN; a policy
    that loads with one left (an issuer, a test credential) must not pass."""
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "# FILL-IN in a comment is no placeholder\n"
        "rules:\n"
        '  - {name: a, match: {path: /a}, allow: {claim: iss, equals: "https://FILL-IN.invalid/x"}}\n'
        "  - {name: b, match: {path: /b}, allow: anyone}  # FILL IN: nothing\n"
    )
    (tmp_path / "p.tests.yaml").write_text(
        "tests:\n"
        "  - name: b\n"
        "    request: {path: /b, headers: {X-Key: FILL-IN-test-key}}\n"
        "    expect: {status: 200}\n"
    )
    code, out, _ = run(capsys, "check", str(tmp_path / "p.yaml"))
    assert code == 2, out
    assert f"{tmp_path / 'p.yaml'}:4: error: 'https://FILL-IN.invalid/x' is a placeholder" in out
    assert f"{tmp_path / 'p.tests.yaml'}:3: error: 'FILL-IN-test-key' is a placeholder" in out
    assert ":2:" not in out and ":5:" not in out
    assert out.endswith(f"{tmp_path / 'p.yaml'}: 2 FILL-IN left (2 rules, 1 test)\n")
    json_code, json_out, _ = run(capsys, "check", "--format", "json", str(tmp_path / "p.yaml"))
    assert (json_code, json.loads(json_out)["errors"]) == (2, 2)
