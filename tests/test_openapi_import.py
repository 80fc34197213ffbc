"""`authgate import openapi`: through the command line, then `authgate check`
and `authgate test` on what it wrote, with the FILL-IN placeholders filled
the way a user would (a JWKS file, an API key digest, an htpasswd file)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from authgate.core.credentials import hash_key
from authgate.tools.openapi import convert, pointer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "openapi"
AUTHGATE = str(Path(sys.executable).with_name("authgate"))
DEMO_JWKS = ROOT / "policies" / "keys" / "jwks.json"
TEST_KEY = "openapi-import-test-key"
PASSWORD = "pass:word"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUTHGATE, *args], capture_output=True, text=True, timeout=60)


def fill_in(policy: Path) -> None:
    """Do what the policy's FILL-IN comments ask: key files, a key digest, users."""
    text = policy.read_text()
    for line in text.splitlines():
        if "jwks_file:" in line:
            target = policy.parent / line.split("jwks_file:")[1].split()[0]
            target.parent.mkdir(exist_ok=True)
            shutil.copy(DEMO_JWKS, target)
        if "htpasswd:" in line:
            name = line.split("htpasswd:")[1].split()[0]
            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
            (policy.parent / name).write_text(f"tester:{hashed}\n")
    text = text.replace("sha256: FILL-IN", f"sha256: {hash_key(TEST_KEY)}")
    # issuer and audience, as docs/tools.md's `sed` does (`check` fails on any FILL-IN)
    text = text.replace("https://FILL-IN.invalid/", "https://idp.example/")
    text = text.replace("FILL-IN-audience", "api")
    text = text.replace("{name: FILL-IN", "{name: tester").replace(
        "FILL-IN: {roles", "tester: {roles"
    )
    policy.write_text(text)
    basic = base64.b64encode(f"tester:{PASSWORD}".encode()).decode()
    tests = policy.with_name(policy.name.removesuffix(".yaml") + ".tests.yaml")
    for cases in (policy, tests) if tests.exists() else (policy,):  # or inline `tests:`
        cases.write_text(
            cases.read_text()
            .replace("FILL-IN-test-key", TEST_KEY)
            .replace("FILL-IN-base64-of-user:password", basic)
        )


def imported(tmp_path: Path, name: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path / (name.split(".")[0] + ".yaml")
    done = run("import", "openapi", str(DATA / name), "--output", str(out))
    return out, done


@pytest.mark.parametrize(
    "name,code",
    [("bookshop-3.0.yaml", 0), ("library-3.1.json", 0), ("unmappable-3.0.yaml", 1)],
)
def test_output_checks_and_its_tests_pass_once_filled_in(
    tmp_path: Path, name: str, code: int
) -> None:
    policy, done = imported(tmp_path, name)
    assert done.returncode == code, done.stderr
    # Before: `check` names the missing key material, file and line.
    before = run("check", str(policy))
    assert before.returncode == 2
    assert f"{policy}:" in before.stdout and "cannot read" in before.stdout
    fill_in(policy)
    checked = run("check", str(policy))
    assert checked.returncode == 0, checked.stdout
    tested = run("test", "--strict", str(policy))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = yaml.safe_load(policy.read_text())["rules"]
    cases = yaml.safe_load(policy.with_name(policy.stem + ".tests.yaml").read_text())["tests"]
    # One allowed and one denied test per operation that can be allowed at all.
    for rule in rules:
        mine = [c for c in cases if c["name"].startswith(rule["name"] + ":")]
        statuses = sorted(c["expect"]["status"] for c in mine)
        if rule.get("hide"):  # the closing rule of a literal path: other methods are 404
            assert rule["allow"] == "nobody" and statuses == [404]
        elif rule["allow"] == "nobody":
            assert statuses == [401]
        else:
            assert len(statuses) == 2 and statuses[0] == 200 and statuses[1] in (401, 403, 404)
    assert f"{len(cases)} tests, {len(cases)} passed" in tested.stdout


def test_stdout_holds_the_policy_with_its_tests(tmp_path: Path) -> None:
    done = run("import", "openapi", str(DATA / "library-3.1.json"))
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load(done.stdout)
    assert doc["default"] == "not_found" and doc["tests"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(done.stdout)
    fill_in(policy)
    tested = run("test", str(policy))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_3_1_document(tmp_path: Path) -> None:
    policy, done = imported(tmp_path, "library-3.1.json")
    text = policy.read_text()
    # servers with a variable: its default is the base path
    assert "path: /api/catalogue" in text
    # openIdConnectUrl gives the issuer and discovery; nothing to fill in but the audience
    assert (
        'issuer: "https://login.library.example/realms/lib"' in text and "discovery: true" in text
    )
    # webhooks are not routes; the path item $ref is followed
    assert "webhooks (loanDue)" in text and "name: myLoans" in text
    # 3.1: values of a non-OAuth scheme are roles
    assert "allow: {role: librarian}" in text
    rules = [r["name"] for r in yaml.safe_load(text)["rules"]]
    # the literal /members/me/loans comes before the templated /members/{memberId}/loans
    assert rules.index("myLoans") < rules.index("listLoans")


def test_unmappable_is_reported_with_its_location_and_stays_denied(tmp_path: Path) -> None:
    policy, done = imported(tmp_path, "unmappable-3.0.yaml")
    assert done.returncode == 1
    spec = str(DATA / "unmappable-3.0.yaml")
    err = done.stderr
    assert (
        f"{spec}#/paths/~1session/get/security/0: apiKey 'cookieSession' is sent in the cookie"
        in err
    )
    assert f"{spec}#/paths/~1both/get/security/0: requires bearer AND clientKey together" in err
    assert f"{spec}#/paths/~1query/get/security/1: apiKey 'queryKey' is sent in the query" in err
    assert f"{spec}#/paths/~1files~1{{name}}.json/get: segment" in err
    fill_in(policy)
    # The explain trace of a request with a valid token to the AND operation: denied.
    key = str(ROOT / "policies/keys/demo-private.pem")
    iss, aud = "https://idp.example/bearer", "api"  # as fill_in set them
    token = run("token", "--key", key, "--sub", "u", "--iss", iss, "--aud", aud).stdout.strip()
    told = run("explain", str(policy), "GET", "/both", "--token", token)
    assert told.returncode == 0, told.stderr
    assert "rule needsBoth: matches" in told.stdout
    assert "=> 403" in told.stdout
    # while the same token is enough where a bearer token is all the document asks
    ok = run("explain", str(policy), "GET", "/token", "--token", token)
    assert "=> forwarded to the backend (rule withToken)" in ok.stdout, ok.stdout
    # the path that authgate patterns cannot express has no rule: 404
    gone = run("explain", str(policy), "GET", "/files/a.json")
    assert "=> 404" in gone.stdout


def test_unreadable_document_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("openapi: 3.0.0\npaths: [unclosed\n")
    done = run("import", "openapi", str(bad))
    assert done.returncode == 2 and f"{bad}:" in done.stderr and "Traceback" not in done.stderr
    swagger = tmp_path / "swagger.json"
    swagger.write_text(json.dumps({"swagger": "2.0", "paths": {}}))
    done = run("import", "openapi", str(swagger))
    assert done.returncode == 2 and "not an OpenAPI 3.0 or 3.1 document" in done.stderr
    done = run("import", "openapi", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2 and "cannot read" in done.stderr


# --- the mapping of security requirements, as a table ------------------------------

SCHEMES = {
    "oauth": {"type": "oauth2", "flows": {"implicit": {"authorizationUrl": "https://a/x"}}},
    "oidc": {"type": "openIdConnect",
             "openIdConnectUrl": "https://idp.example/.well-known/openid-configuration"},
    "bearer": {"type": "http", "scheme": "bearer"},
    "basic": {"type": "http", "scheme": "basic"},
    "key": {"type": "apiKey", "in": "header", "name": "X-Key"},
    "key2": {"type": "apiKey", "in": "header", "name": "X-Other"},
    "cookie": {"type": "apiKey", "in": "cookie", "name": "s"},
    "digest": {"type": "http", "scheme": "digest"},
    "mtls": {"type": "mutualTLS"},
}  # fmt: skip
OAUTH_ISS = "https://FILL-IN.invalid/oauth"


def one_operation(security: Any, global_security: Any = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": "op", "responses": {}}
    if security is not None:
        op["security"] = security
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {"/x": {"get": op}},
        "components": {"securitySchemes": SCHEMES},
    }
    if global_security is not None:
        doc["security"] = global_security
    return doc


def rule_of(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    result = convert(doc)
    policy = yaml.safe_load(result.policy)
    (rule,) = policy["rules"]
    return rule, [p.pointer for p in result.problems]


@pytest.mark.parametrize(
    "security,global_security,allow,accept",
    [
        ([], [{"oauth": ["a"]}], "anyone", None),  # security: [] overrides the global one
        (None, [{"oauth": ["a"]}], {"scope": "a"}, ["jwt"]),  # the global one applies
        ([{"oauth": ["a"]}], [{"bearer": []}], {"scope": "a"}, ["jwt"]),  # per operation wins
        ([{}, {"oauth": ["a"]}], None, "anyone", None),  # an empty requirement: optional
        (None, None, "anyone", None),  # nothing declared anywhere
        ([{"oauth": ["a", "b"]}], None, {"all": [{"scope": "a"}, {"scope": "b"}]}, ["jwt"]),
        ([{"oauth": []}], None, "authenticated", ["jwt"]),
        ([{"oidc": ["openid"]}], None, {"scope": "openid"}, ["jwt"]),
        ([{"bearer": []}], None, "authenticated", ["jwt"]),
        ([{"bearer": ["admin"]}], None, {"role": "admin"}, ["jwt"]),  # 3.1: roles
        ([{"basic": []}], None, "authenticated", ["basic"]),
        ([{"key": ["ops"]}], None, {"role": "ops"}, ["api_key"]),
        ([{"key": []}, {"basic": []}], None, "authenticated", ["api_key", "basic"]),
        (
            [{"oauth": ["a"]}, {"oauth": ["b"]}],
            None,
            {"any": [{"scope": "a"}, {"scope": "b"}]},
            ["jwt"],
        ),
        (
            [{"oauth": ["a"]}, {"key": []}],
            None,
            {"any": [
                {"all": [{"claim": "iss", "equals": OAUTH_ISS}, {"scope": "a"}]},
                {"not": {"claim": "iss", "in": [OAUTH_ISS]}},
            ]},
            ["jwt", "api_key"],
        ),
        (
            [{"oauth": ["a"]}, {"bearer": []}],
            None,
            {"any": [
                {"all": [{"claim": "iss", "equals": OAUTH_ISS}, {"scope": "a"}]},
                {"claim": "iss", "equals": "https://FILL-IN.invalid/bearer"},
            ]},
            ["jwt"],
        ),
    ],
)  # fmt: skip
def test_security_mapping(security: Any, global_security: Any, allow: Any, accept: Any) -> None:
    rule, problems = rule_of(one_operation(security, global_security))
    assert problems == []
    assert rule["allow"] == allow
    assert rule.get("accept") == accept
    assert rule["match"] == {"path": "/x", "methods": ["GET"]}


@pytest.mark.parametrize(
    "security,where",
    [
        ([{"cookie": []}], "/security/0"),
        ([{"oauth": ["a"]}, {"digest": []}], "/security/1"),
        ([{"mtls": []}], "/security/0"),
        ([{"bearer": [], "key": []}], "/security/0"),  # AND of two schemes
        ([{"oauth": ["a"], "bearer": []}], "/security/0"),  # AND of two issuers
        ([{"undefined": []}], "/security/0"),
        ([{"key": []}, {"key2": []}], "/security/1"),  # a second API-key header
        ([{"key": ["a"]}, {"basic": ["b"]}], "/security"),  # kinds a condition cannot tell apart
    ],
)
def test_unmappable_requirement_is_denied_at_its_pointer(security: Any, where: str) -> None:
    rule, problems = rule_of(one_operation(security))
    assert rule["allow"] == "nobody" and "accept" not in rule
    assert problems == [pointer("paths", "/x", "get") + where]


@pytest.mark.parametrize(
    "servers,pattern,problems",
    [
        ([{"url": "https://h.example/v1/"}, {"url": "/v1"}], "/v1/x", 0),
        ([{"url": "https://h.example"}], "/x", 0),
        ([{"url": "/{v}", "variables": {"v": {"default": "v2"}}}], "/v2/x", 0),
        ([{"url": "/v1"}, {"url": "/v2"}], "/v1/x", 1),  # several bases: the first, reported
    ],
)
def test_servers_base_path(servers: Any, pattern: str, problems: int) -> None:
    doc = one_operation([])
    doc["servers"] = servers
    result = convert(doc)
    (rule,) = yaml.safe_load(result.policy)["rules"]
    assert rule["match"]["path"] == pattern
    assert len(result.problems) == problems


def test_literal_paths_come_before_templated_ones() -> None:
    doc = one_operation([])
    doc["paths"] = {
        "/a/{id}": {"get": {"operationId": "byId", "security": []}},
        "/b": {"get": {"operationId": "b", "security": []}},
        "/a/new": {"get": {"operationId": "new", "security": [{"bearer": []}]}},
        "/{x}/list": {"get": {"operationId": "list", "security": []}},
    }
    rules = yaml.safe_load(convert(doc).policy)["rules"]
    # Each path that a more templated rule below also matches is closed after
    # its own rules (other methods: the unknown-path 404).
    assert [r["name"] for r in rules] == [
        "new", "/a/new other methods", "byId", "b", "/a/* other methods", "list",
    ]  # fmt: skip
    assert rules[2]["match"]["path"] == "/a/*"
    assert all(r["hide"] and r["allow"] == "nobody" for r in rules if "other" in r["name"])


def test_an_undeclared_method_on_a_literal_path_is_404_not_the_templated_rule(
    tmp_path: Path,
) -> None:
    """DELETE /v1/books/featured: the document declares only GET there, and
    /v1/books/{bookId} declares DELETE; the request must not reach deleteBook."""
    policy = tmp_path / "bookshop.yaml"
    assert run("import", "openapi", str(DATA / "bookshop-3.0.yaml"), "--output", str(policy))
    fill_in(policy)
    featured = run("explain", str(policy), "DELETE", "/v1/books/featured").stdout
    assert "=> 404" in featured and "other methods: matches" in featured
    assert "deleteBook: matches" not in featured
    other = run("explain", str(policy), "DELETE", "/v1/books/42").stdout
    assert "deleteBook: matches" in other and "=> 401" in other
