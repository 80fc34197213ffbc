"""Policy loading: compiled values, and a PolicyError naming file and line for every mistake.

Broken policies mark the line the error must name with `# <-`.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authgate.core import conditions as c
from authgate.core.model import LimitSpec, Policy, normalize_host
from authgate.core.ratelimit import Rate
from authgate.policy.load import load_policy, parse_policy
from authgate.policy.marks import PolicyError
from authgate.policy.values import parse_duration
from authgate.tools import keys

REPO = Path(__file__).resolve().parents[1]
RSA_KEY = keys.new_rsa_key()
EC_KEY = ec.generate_private_key(ec.SECP256R1())
SECRET = "0123456789abcdef0123456789abcdef"  # 32 bytes
MARK = "# <-"


def _ec_jwks() -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    jwk.update({"kid": "e1", "use": "sig", "alg": "ES256"})
    return {"keys": [jwk]}


def _files(folder: Path) -> None:
    """Key files and block lists the policies below refer to, relative to `folder`."""
    (folder / "keys").mkdir()
    (folder / "lists").mkdir()
    (folder / "keys" / "jwks.json").write_text(json.dumps(keys.jwks_for(RSA_KEY, "k1")))
    (folder / "keys" / "ec-only.json").write_text(json.dumps(_ec_jwks()))
    (folder / "keys" / "garbage.json").write_text("{not json")
    (folder / "keys" / "not-jwks.json").write_text('{"kty": "RSA"}')
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY)) | {"kid": "p"}
    (folder / "keys" / "private.json").write_text(json.dumps({"keys": [private]}))
    alg_none = keys.jwks_for(RSA_KEY, "k1")
    alg_none["keys"][0]["alg"] = "none"
    (folder / "keys" / "alg-none.json").write_text(json.dumps(alg_none))
    (folder / "keys" / "pub.pem").write_bytes(
        RSA_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (folder / "keys" / "not.pem").write_text("hello\n")
    (folder / "lists" / "block.txt").write_text("# comment\n198.51.100.0/24\n\n192.0.2.66  # x\n")


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _files(tmp_path)
    monkeypatch.setenv("AUTHGATE_TEST_SECRET", SECRET)
    monkeypatch.setenv("AUTHGATE_TEST_SHORT", SECRET[:31])
    monkeypatch.delenv("AUTHGATE_TEST_UNSET", raising=False)
    return tmp_path


def write(folder: Path, text: str, name: str = "policy.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def marked_line(path: Path) -> int:
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if MARK in line]
    assert len(lines) == 1, f"exactly one {MARK!r} marker expected, found {lines}"
    return lines[0]


# --- a valid policy ---------------------------------------------------------------

FULL = """
version: 1
realm: my-api
client_ip:
  trusted_proxies: [10.0.0.0/8, "::1"]
ip:
  block: [203.0.113.0/24, "2001:db8::/32"]
  block_files: [lists/block.txt]
  allow: [0.0.0.0/1, "2001:db8:1::/48"]
authn:
  jwt:
    - name: main
      issuer: https://as.test
      audience: [https://api.test, other]
      algorithms: [RS256, ES256]
      jwks_file: keys/jwks.json
      leeway: 2m
      roles_claim: realm_access.roles
      scope_claim: scp
      require_exp: false
    - name: hmac
      issuer: https://hs.test
      audience: api
      algorithms: [HS256, HS512]
      secret_env: AUTHGATE_TEST_SECRET
    - name: pem
      issuer: https://pem.test
      algorithms: [PS256]
      public_key_file: keys/pub.pem
limits:
  - {name: per-ip, key: ip, rate: 600/minute}
  - {name: per-sub, key: subject, rate: 10 per second}
  - {name: per-key, key: "header: X-Api-Key", rate: 5/hours}
rules:
  - name: health
    match: {path: /health, methods: [GET, HEAD]}
    allow: anyone
  - name: user
    match: {path: "/users/{id}", host: "API.Example:443"}
    allow:
      any:
        - {claim: sub, equals: "{id}"}
        - {role: admin}
        - all: [{scope: "users:read"}, {not: {scope: banned}}]
    hide: true
    limits: [{name: user-writes, key: subject, rate: 5/minute}, {name: u-ip, key: ip, rate: 1/day}]
  - name: tenant
    match: {path: "/t/{t}/**"}
    allow: {claim: org.tenants, contains: "team-{t}"}
  - name: levels
    match: {path: /levels, methods: [POST]}
    allow: {claim: level, in: [1, "2", true]}
default: forbidden
forward_credentials: false
"""


def test_full_policy_compiles(folder: Path) -> None:
    path = write(folder, FULL)
    p = load_policy(path)
    assert isinstance(p, Policy)
    assert p.file == str(path)
    assert p.realm == "my-api"
    assert p.default == "forbidden"
    assert p.forward_credentials is False
    assert p.uses_host is True
    assert p.files == (
        str(path),
        str(folder / "lists" / "block.txt"),
        str(folder / "keys" / "jwks.json"),
        str(folder / "keys" / "pub.pem"),
    )
    # IP sets
    assert "10.200.0.1" in p.trusted_proxies and "::1" in p.trusted_proxies
    assert "11.0.0.1" not in p.trusted_proxies
    for address in ("203.0.113.9", "2001:db8::1", "198.51.100.255", "192.0.2.66"):
        assert address in p.block, address
    for address in ("203.0.114.1", "192.0.2.67", "2001:db9::1"):
        assert address not in p.block, address
    assert p.block.entries == 4
    assert p.allow is not None
    assert "127.0.0.1" in p.allow and "2001:db8:1::5" in p.allow
    assert "128.0.0.1" not in p.allow and "2001:db8:2::5" not in p.allow
    # issuers
    main, hmac_issuer, pem = p.issuers
    assert (main.name, main.issuer, main.audience) == ("main", "https://as.test",
                                                       ("https://api.test", "other"))  # fmt: skip
    assert main.algorithms == frozenset({"RS256", "ES256"})
    assert [(k.kid, k.algorithms) for k in main.keys] == [("k1", frozenset({"RS256"}))]
    assert main.keys[0].key.public_numbers() == RSA_KEY.public_key().public_numbers()
    assert main.leeway == 120.0
    assert main.roles_claim == ("realm_access", "roles")
    assert main.scope_claim == ("scp",)
    assert main.require_exp is False
    assert (hmac_issuer.name, hmac_issuer.issuer, hmac_issuer.audience) == (
        "hmac", "https://hs.test", ("api",))  # fmt: skip
    assert hmac_issuer.algorithms == frozenset({"HS256", "HS512"})
    assert [(k.kid, k.key, k.algorithms) for k in hmac_issuer.keys] == [
        (None, SECRET.encode(), frozenset({"HS256", "HS512"}))
    ]
    assert hmac_issuer.leeway == 0.0
    assert hmac_issuer.roles_claim == ("roles",)
    assert hmac_issuer.scope_claim == ("scope",)
    assert hmac_issuer.require_exp is True
    assert pem.audience == ()
    assert [(k.kid, k.algorithms) for k in pem.keys] == [(None, frozenset({"PS256"}))]
    # limits
    assert p.limits == (
        LimitSpec("per-ip", "ip", None, Rate(600, 60), 30),
        LimitSpec("per-sub", "subject", None, Rate(10, 1), 31),
        LimitSpec("per-key", "header", "x-api-key", Rate(5, 3600), 32),
    )
    assert [lim.name for lim in p.ip_limits] == ["per-ip"]
    assert [lim.name for lim in p.late_limits] == ["per-sub", "per-key"]
    assert p.limits[2].limiter_id == "per-key|header:x-api-key|5/hour"
    # rules
    health, user, tenant, levels = p.rules
    assert [r.name for r in p.rules] == ["health", "user", "tenant", "levels"]
    assert [r.line for r in p.rules] == [34, 37, 46, 49]
    assert health.methods == frozenset({"GET", "HEAD"})
    assert health.host is None
    assert health.allow == c.Anyone()
    assert health.hide is False
    assert health.limits == ()
    assert health.pattern.text == "/health"
    assert user.methods is None
    assert user.host == "api.example"
    assert user.hide is True
    assert user.allow == c.AnyOf((
        c.Claim(("sub",), "equals", c.Template("{id}", ((True, "id"),))),
        c.HasRole("admin"),
        c.AllOf((c.HasScope("users:read"), c.Not(c.HasScope("banned")))),
    ))  # fmt: skip
    assert user.limits == (
        LimitSpec("user-writes", "subject", None, Rate(5, 60), 45),
        LimitSpec("u-ip", "ip", None, Rate(1, 86400), 45),
    )
    assert user.pattern.param_names == frozenset({"id"})
    assert tenant.allow == c.Claim(
        ("org", "tenants"), "contains", c.Template("team-{t}", ((False, "team-"), (True, "t")))
    )
    assert tenant.pattern.rest is True
    assert levels.methods == frozenset({"POST"})
    assert levels.allow == c.Claim(
        ("level",), "in", (c.Template(1, ()), c.Template("2", ()), c.Template(True, ()))
    )


def test_minimal_policy_defaults(folder: Path) -> None:
    path = write(folder, "version: 1\nrules: []\n")
    p = load_policy(path)
    assert p.realm == "api"
    assert p.default == "not_found"
    assert p.forward_credentials is True
    assert p.allow is None
    assert not p.block and p.block.entries == 0
    assert not p.trusted_proxies
    assert p.issuers == ()
    assert p.limits == ()
    assert p.rules == ()
    assert p.uses_host is False
    assert p.files == (str(path),)


@pytest.mark.parametrize(
    ("allow", "expected"),
    [
        pytest.param("anyone", c.Anyone(), id="anyone"),
        pytest.param("authenticated", c.Authenticated(), id="authenticated"),
        pytest.param("nobody", c.Nobody(), id="nobody"),
        pytest.param("{role: admin}", c.HasRole("admin"), id="role"),
        pytest.param("{scope: 'a:b'}", c.HasScope("a:b"), id="scope"),
        pytest.param(
            "{claim: a.b, equals: 1}", c.Claim(("a", "b"), "equals", c.Template(1, ())),
            id="claim-equals-int",
        ),
        pytest.param(
            "{claim: a, equals: '1'}", c.Claim(("a",), "equals", c.Template("1", ())),
            id="claim-equals-quoted-string",
        ),
        pytest.param(
            "{claim: a, equals: true}", c.Claim(("a",), "equals", c.Template(True, ())),
            id="claim-equals-bool",
        ),
        pytest.param(
            "{claim: a, in: [x, '{id}']}",
            c.Claim(("a",), "in", (c.Template("x", ()), c.Template("{id}", ((True, "id"),)))),
            id="claim-in",
        ),
        pytest.param(
            "{claim: g, contains: '{id}'}",
            c.Claim(("g",), "contains", c.Template("{id}", ((True, "id"),))),
            id="claim-contains",
        ),
        pytest.param("{not: nobody}", c.Not(c.Nobody()), id="not"),
        pytest.param(
            "{any: [anyone, {role: r}]}", c.AnyOf((c.Anyone(), c.HasRole("r"))), id="any"
        ),
        pytest.param("{all: [authenticated]}", c.AllOf((c.Authenticated(),)), id="all"),
    ],
)  # fmt: skip
def test_condition_forms(folder: Path, allow: str, expected: c.Condition) -> None:
    path = write(folder, f"""
        version: 1
        authn:
          api_keys: {{keys: []}}
        rules:
          - name: r
            match: {{path: "/x/{{id}}"}}
            allow: {allow}
    """)  # fmt: skip
    assert load_policy(path).rules[0].allow == expected


# --- broken policies --------------------------------------------------------------

RULE = """
rules:
  - {name: r, match: {path: /}, allow: anyone}
"""


def issuer(*lines: str, mark: str = "") -> str:
    """An authn section with one issuer; `lines` replace or add keys of the entry."""
    entry = {
        "name": "a",
        "issuer": "https://as.test",
        "algorithms": "[RS256]",
        "jwks_file": "keys/jwks.json",
    }
    for line in lines:
        key, _, value = line.partition(":")
        if value.strip() == "DELETE":
            entry.pop(key)
        else:
            entry[key] = value.strip()
    body = "\n".join(f"      {k}: {v}" for k, v in entry.items())
    body = body.replace("      ", "    - ", 1)
    if mark:
        body = "\n".join(
            line + ("  " + MARK if line.strip(" -").startswith(mark + ":") else "")
            for line in body.splitlines()
        )
    return "version: 1\nauthn:\n  jwt:\n" + body + "\n" + RULE


BROKEN = [
    # unknown keys
    ("unknown-top-level-key", "version: 1\ncolour: red  # <-\nrules: []\n",
     "unknown key 'colour' in the policy (known: "),
    ("unknown-key-in-rule", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: anyone
            colour: red  # <-
     """, "unknown key 'colour' in rules[0]"),
    ("unknown-key-in-match", """
        version: 1
        rules:
          - name: r
            match: {path: /, verb: GET}  # <-
            allow: anyone
     """, "unknown key 'verb' in rule 'r' match"),
    ("unknown-key-in-jwt-entry", issuer("audiences: api", mark="audiences"),
     "unknown key 'audiences' in authn.jwt[0]"),
    ("unknown-key-in-authn", "version: 1\nauthn:\n  passwords: []  # <-\nrules: []\n",
     "unknown key 'passwords' in authn"),
    ("unknown-key-in-ip", "version: 1\nip:\n  deny: [192.0.2.1]  # <-\nrules: []\n",
     "unknown key 'deny' in ip"),
    ("unknown-key-in-client-ip", "version: 1\nclient_ip:\n  trusted: []  # <-\nrules: []\n",
     "unknown key 'trusted' in client_ip"),
    ("unknown-key-in-limit",
     "version: 1\nlimits:\n  - {name: a, key: ip, rate: 1/second, burst: 5}  # <-\nrules: []\n",
     "unknown key 'burst' in the policy.limits[0]"),
    ("unknown-key-in-condition", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: {role: admin, extra: 1}  # <-
     """, "unknown key 'extra' in rule 'r' allow"),
    # wrong types
    ("rules-not-a-list", "version: 1\nrules: {name: r}  # <-\n",
     "the policy.rules must be a list, not a mapping"),
    ("rules-a-string", "version: 1\nrules: none  # <-\n",
     "the policy.rules must be a list, not str 'none'"),
    ("methods-a-string", """
        version: 1
        rules:
          - name: r
            match: {path: /, methods: GET}  # <-
            allow: anyone
     """, "rule 'r' match.methods must be a list, not str 'GET'"),
    ("hide-quoted-yes", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: anyone
            hide: "yes"  # <-
     """, "rule 'r'.hide must be true or false, not str 'yes'"),
    ("hide-number", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: anyone
            hide: 1  # <-
     """, "rule 'r'.hide must be true or false, not int 1"),
    ("realm-with-quote", "version: 1\nrealm: 'my \"api\"'  # <-\nrules: []\n",
     "realm must be printable ASCII without '\"' or '\\'"),
    ("realm-with-backslash", "version: 1\nrealm: 'a\\b'  # <-\nrules: []\n",
     "realm must be printable ASCII"),
    ("realm-empty", "version: 1\nrealm: ''  # <-\nrules: []\n", "realm must be printable ASCII"),
    ("realm-non-ascii", "version: 1\nrealm: 'caf\u00e9'  # <-\nrules: []\n",
     "realm must be printable ASCII"),
    ("realm-a-number", "version: 1\nrealm: 5  # <-\nrules: []\n",
     "the policy.realm must be a string, not int 5"),
    ("forward-credentials-string", "version: 1\nforward_credentials: 'no'  # <-\nrules: []\n",
     "the policy.forward_credentials must be true or false, not str 'no'"),
    ("default-unknown", "version: 1\nrules: []\ndefault: allow  # <-\n",
     "default must be not_found or forbidden"),
    ("rule-not-a-mapping", "version: 1\nrules:\n  - just-a-string  # <-\n",
     "rules[0] must be a mapping, not str 'just-a-string'"),
    ("rule-name-not-a-string", "version: 1\nrules:\n"
     "  - {name: 5, match: {path: /}, allow: anyone}  # <-\n",
     "rules[0].name must be a string, not int 5"),
    ("match-not-a-mapping", "version: 1\nrules:\n"
     "  - {name: r, match: /x, allow: anyone}  # <-\n",
     "rule 'r'.match must be a mapping, not str '/x'"),
    ("ip-block-item-not-string", "version: 1\nip:\n  block:\n    - 10.0.0.0/8\n    - 5  # <-\n"
     "rules: []\n", "ip.block items must be strings, not int 5"),
    ("bool-key-value", "version: 1\nip:\n  block: [yes]  # <-\nrules: []\n",
     "ip.block items must be strings, not the boolean true (quote it"),
    ("policy-a-list", "- version: 1  # <-\n", "the policy must be a mapping, not a list"),
    ("policy-empty", "# <- nothing but a comment\n", "the policy is empty"),
    # required keys
    ("missing-rules", "version: 1  # <-\nrealm: api\n", "the policy needs 'rules'"),
    ("missing-version", "rules: []  # <-\n", "the policy needs 'version'"),
    ("rule-missing-allow", """
        version: 1
        rules:
          - name: r  # <-
            match: {path: /}
     """, "rules[0] needs 'allow'"),
    ("match-missing-path", """
        version: 1
        rules:
          - name: r
            match: {methods: [GET]}  # <-
            allow: anyone
     """, "rule 'r' match needs 'path'"),
    ("limit-missing-rate", "version: 1\nlimits:\n  - {name: a, key: ip}  # <-\nrules: []\n",
     "the policy.limits[0] needs 'rate'"),
    # version
    ("version-2", "version: 2  # <-\nrules: []\n", "version must be 1, not 2"),
    ("version-string", "version: '1'  # <-\nrules: []\n", "version must be 1, not '1'"),
    ("version-true", "version: true  # <-\nrules: []\n", "version must be 1, not True"),
    ("version-float", "version: 1.0  # <-\nrules: []\n", "version must be 1, not 1.0"),
    # IP lists
    ("ip-block-bad-address", """
        version: 1
        ip:
          block:
            - 10.0.0.0/8
            - 10.0.0.300  # <-
        rules: []
     """, "ip.block: not an IP address: '10.0.0.300'"),
    ("ip-block-host-bits", """
        version: 1
        ip:
          block:
            - 10.0.0.1/8  # <-
        rules: []
     """, "ip.block: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"),
    ("ip-block-v6-host-bits", """
        version: 1
        ip:
          block: ["2001:db8::1/32"]  # <-
        rules: []
     """, "has host bits set (did you mean 2001:db8::/32?)"),
    ("ip-block-prefix-too-long", "version: 1\nip:\n  block: [192.0.2.0/33]  # <-\nrules: []\n",
     "ip.block: prefix length /33 too long in '192.0.2.0/33'"),
    ("ip-block-bad-prefix", "version: 1\nip:\n  block: [192.0.2.0/x]  # <-\nrules: []\n",
     "ip.block: bad prefix length in '192.0.2.0/x'"),
    ("ip-allow-bad", "version: 1\nip:\n  allow: [nope]  # <-\nrules: []\n",
     "ip.allow: not an IP address: 'nope'"),
    ("trusted-proxies-bad", "version: 1\nclient_ip:\n  trusted_proxies: [1.2.3.4/40]  # <-\n"
     "rules: []\n", "client_ip.trusted_proxies: prefix length /40 too long"),
    ("block-file-missing", "version: 1\nip:\n  block_files: [lists/nope.txt]  # <-\nrules: []\n",
     "cannot read block file "),
    # limits
    ("bad-rate-unit", "version: 1\nlimits:\n  - name: a\n    key: ip\n"
     "    rate: 10/fortnight  # <-\nrules: []\n", "bad rate '10/fortnight'"),
    ("bad-rate-zero", "version: 1\nlimits:\n  - {name: a, key: ip, rate: 0/minute}  # <-\n"
     "rules: []\n", "bad rate '0/minute'"),
    ("bad-rate-two", "version: 1\nlimits:\n  - {name: a, key: ip, rate: '1/second, 5/minute'}"
     "  # <-\nrules: []\n", "bad rate"),
    ("bad-rate-number", "version: 1\nlimits:\n  - {name: a, key: ip, rate: 10}  # <-\n"
     "rules: []\n", "the policy.limits[0].rate must be a string, not int 10"),
    ("bad-limit-key", "version: 1\nlimits:\n  - name: a\n    key: cookie  # <-\n"
     "    rate: 1/second\nrules: []\n",
     "limit key must be ip, subject or header:NAME, not 'cookie'"),
    ("bad-limit-key-empty-header", "version: 1\nlimits:\n"
     "  - {name: a, key: 'header:', rate: 1/second}  # <-\nrules: []\n", "limit key must be"),
    ("bad-limit-key-header-space", "version: 1\nlimits:\n"
     "  - {name: a, key: 'header:X Y', rate: 1/second}  # <-\nrules: []\n", "limit key must be"),
    ("duplicate-limit-names", """
        version: 1
        limits:
          - name: a
            key: ip
            rate: 1/second
          - key: subject
            name: a  # <-
            rate: 1/second
        rules: []
     """, "duplicate limit name 'a'"),
    ("duplicate-limit-names-global-and-rule", """
        version: 1
        limits:
          - {name: a, key: ip, rate: 1/second}
        rules:
          - name: r
            match: {path: /}
            allow: anyone
            limits:
              - {name: a, key: subject, rate: 1/second}  # <-
     """, "duplicate limit name 'a'"),
    # rules
    ("duplicate-rule-names", """
        version: 1
        rules:
          - name: r
            match: {path: /a}
            allow: anyone
          - match: {path: /b}
            name: r  # <-
            allow: anyone
     """, "duplicate rule name 'r'"),
    ("lower-case-method", """
        version: 1
        rules:
          - name: r
            match:
              path: /
              methods:
                - GET
                - post  # <-
            allow: anyone
     """, "method 'post' must be an upper-case HTTP method"),
    ("method-with-space", """
        version: 1
        rules:
          - name: r
            match: {path: /, methods: ['GET POST']}  # <-
            allow: anyone
     """, "method 'GET POST' must be an upper-case HTTP method"),
    ("methods-empty", """
        version: 1
        rules:
          - name: r
            match: {path: /, methods: []}  # <-
            allow: anyone
     """, "methods must not be empty"),
    ("path-relative", """
        version: 1
        rules:
          - name: r
            match: {path: api}  # <-
            allow: anyone
     """, "path pattern 'api' must start with '/'"),
    ("path-double-star-not-last", """
        version: 1
        rules:
          - name: r
            match: {path: /a/**/b}  # <-
            allow: anyone
     """, "'**' must be the last segment of '/a/**/b'"),
    ("path-param-twice", """
        version: 1
        rules:
          - name: r
            match: {path: "/a/{id}/{id}"}  # <-
            allow: anyone
     """, "parameter {id} appears twice"),
    # conditions
    ("unknown-condition", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: everyone  # <-
     """, "unknown condition 'everyone'"),
    ("condition-names-missing-path-parameter", """
        version: 1
        rules:
          - name: r
            match: {path: "/users/{id}"}
            allow: {claim: sub, equals: "{user}"}  # <-
     """, "rule 'r' uses path parameter(s) user that '/users/{id}' does not define"),
    ("nested-condition-names-missing-parameter", """
        version: 1
        rules:
          - name: r
            match: {path: "/users/{id}"}
            allow:  # <-
              any:
                - {claim: sub, equals: "{id}"}
                - {claim: tenant, in: ["{tenant}"]}
     """, "uses path parameter(s) tenant that"),
    ("claim-two-operators", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: {claim: sub, equals: a, in: [a]}  # <-
     """, "rule 'r' allow needs exactly one of equals, in, contains"),
    ("claim-no-operator", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow:
              claim: sub  # <-
     """, "needs exactly one of equals, in, contains"),
    ("two-condition-kinds", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: {role: a, scope: b}  # <-
     """, "rule 'r' allow needs exactly one of role, scope, claim, any, all, not"),
    ("empty-any", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: {any: []}  # <-
     """, "rule 'r' allow.any needs at least one condition"),
    ("empty-all", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow:
              all: []  # <-
     """, "rule 'r' allow.all needs at least one condition"),
    ("any-not-a-list", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: {any: anyone}  # <-
     """, "rule 'r' allow.any must be a list, not str 'anyone'"),
    ("claim-in-not-a-list", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: {claim: tenant, in: t1}  # <-
     """, "'in' needs a non-empty list"),
    ("claim-bad-template", """
        version: 1
        rules:
          - name: r
            match: {path: "/u/{id}"}
            allow: {claim: sub, equals: "{id"}  # <-
     """, "bad parameter reference in '{id'"),
    ("nested-unknown-condition", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow:
              any:
                - {role: admin}
                - bogus  # <-
     """, "unknown condition 'bogus'"),
    ("role-not-a-string", """
        version: 1
        rules:
          - name: r
            match: {path: /}
            allow: {role: [a]}  # <-
     """, "rule 'r' allow.role must be a string, not a list"),
    # issuers
    ("issuer-missing-issuer", issuer("issuer: DELETE", mark="name"),
     "authn.jwt[0] needs 'issuer'"),
    ("jwks-unreadable", issuer("jwks_file: keys/missing.json", mark="jwks_file"),
     "cannot read JWKS file "),
    ("jwks-no-usable-key", issuer("jwks_file: keys/ec-only.json", mark="jwks_file"),
     "JWKS file 'keys/ec-only.json' has no key usable with ['RS256']"),
    ("jwks-not-json", issuer("jwks_file: keys/garbage.json", mark="jwks_file"),
     "JWKS file 'keys/garbage.json': not JSON"),
    ("jwks-not-a-jwks", issuer("jwks_file: keys/not-jwks.json", mark="jwks_file"),
     "JWKS file 'keys/not-jwks.json': not a JWKS"),
    ("jwks-private-key", issuer("jwks_file: keys/private.json", mark="jwks_file"),
     "is a private key"),
    ("jwks-key-with-alg-none", issuer("jwks_file: keys/alg-none.json", mark="jwks_file"),
     "JWKS file 'keys/alg-none.json'"),
    ("public-key-not-pem", issuer("jwks_file: DELETE", "public_key_file: keys/not.pem",
                                  mark="public_key_file"),
     "public key file 'keys/not.pem': not a PEM public key"),
    ("public-key-wrong-family", issuer("jwks_file: DELETE", "public_key_file: keys/pub.pem",
                                       "algorithms: [ES256]", mark="public_key_file"),
     "public key file 'keys/pub.pem': the key fits none of the algorithms ['ES256']"),
    ("secret-env-unset", issuer("jwks_file: DELETE", "algorithms: [HS256]",
                                "secret_env: AUTHGATE_TEST_UNSET", mark="secret_env"),
     "environment variable AUTHGATE_TEST_UNSET is not set"),
    ("secret-env-too-short", issuer("jwks_file: DELETE", "algorithms: [HS256]",
                                    "secret_env: AUTHGATE_TEST_SHORT", mark="secret_env"),
     "the secret in AUTHGATE_TEST_SHORT is shorter than 32 bytes"),
    ("secret-env-with-rs256", issuer("jwks_file: DELETE", "secret_env: AUTHGATE_TEST_SECRET",
                                     mark="secret_env"),
     "secret_env is for HS256/HS384/HS512 only"),
    ("mixing-hs256-and-rs256", issuer("algorithms: [HS256, RS256]", mark="algorithms"),
     "do not mix HMAC (HS*) and public-key algorithms in one issuer"),
    ("algorithm-none", """
        version: 1
        authn:
          jwt:
            - name: a
              issuer: https://as.test
              algorithms:
                - RS256
                - none  # <-
              jwks_file: keys/jwks.json
        rules: []
     """, "algorithm 'none' is not supported (supported: "),
    ("algorithm-lower-case", issuer("algorithms: [rs256]", mark="algorithms"),
     "algorithm 'rs256' is not supported"),
    ("algorithms-empty", issuer("algorithms: []", mark="algorithms"),
     "algorithms must name at least one algorithm"),
    ("algorithms-missing", issuer("algorithms: DELETE", mark="name"),
     "authn.jwt[0] needs 'algorithms'"),
    ("two-key-sources", issuer("secret_env: AUTHGATE_TEST_SECRET", mark="name"),
     "authn.jwt[0] needs exactly one of jwks_file, public_key_file, secret_env"),
    ("no-key-source", issuer("jwks_file: DELETE", mark="name"),
     "authn.jwt[0] needs exactly one of jwks_file, public_key_file, secret_env"),
    ("audience-a-number", issuer("audience: 5", mark="audience"),
     "audience must be a string or a list of strings"),
    ("audience-empty-list", issuer("audience: []", mark="audience"),
     "audience must be a string or a list of strings"),
    ("audience-list-with-number", issuer("audience: [api, 5]", mark="audience"),
     "audience must be a string or a list of strings"),
    ("bad-leeway", issuer("leeway: soon", mark="leeway"),
     "authn.jwt[0].leeway: expected a duration like 30s, 5m or 1h, not 'soon'"),
    ("negative-leeway", issuer("leeway: -5", mark="leeway"), "expected a duration"),
    ("require-exp-string", issuer("require_exp: 'no'", mark="require_exp"),
     "authn.jwt[0].require_exp must be true or false, not str 'no'"),
    ("jwt-not-a-list", "version: 1\nauthn:\n  jwt: {name: a}  # <-\nrules: []\n",
     "authn.jwt must be a list, not a mapping"),
    ("duplicate-issuer-names", """
        version: 1
        authn:
          jwt:
            - {name: a, issuer: "https://a", algorithms: [RS256], jwks_file: keys/jwks.json}
            - name: a  # <-
              issuer: "https://b"
              algorithms: [RS256]
              jwks_file: keys/jwks.json
        rules: []
     """, "duplicate issuer name 'a'"),
    ("duplicate-issuer-urls", """
        version: 1
        authn:
          jwt:
            - {name: a, issuer: "https://a", algorithms: [RS256], jwks_file: keys/jwks.json}
            - name: b  # <-
              issuer: "https://a"
              algorithms: [RS256]
              jwks_file: keys/jwks.json
        rules: []
     """, "duplicate issuer URL 'https://a'"),
    # YAML itself
    ("duplicate-yaml-key", "version: 1\nrealm: a\nrealm: b  # <-\nrules: []\n",
     "YAML: duplicate key 'realm'"),
    ("duplicate-yaml-key-in-rule", """
        version: 1
        rules:
          - name: r
            match: {path: /a}
            allow: anyone
            match: {path: /b}  # <-
     """, "YAML: duplicate key 'match'"),
    ("duplicate-yaml-key-in-flow-mapping",
     "version: 1\nrules:\n  - {name: r, match: {path: /a, path: /b}, allow: anyone}  # <-\n",
     "YAML: duplicate key 'path'"),
    ("yaml-syntax-error", "version: 1\nrealm: a: b  # <-\nrules: []\n",
     "YAML: mapping values are not allowed here"),
    ("yaml-unclosed-flow-mapping", """
        version: 1
        rules:
          - name: r
            match: {path: /
            allow: anyone  # <-
     """, "YAML: expected ',' or '}', but got ':'"),
    ("yaml-tab-indent", "version: 1\n\trules: []  # <-\n",
     "YAML: found character '\\t' that cannot start any token"),
    ("yaml-non-string-key", "version: 1\n1: a  # <-\nrules: []\n", "YAML: key 1 is not a string"),
    ("yaml-bad-indentation-says-so", """
        version: 1
        rules:
          - name: r
            match: {path: /a}
          allow: anyone  # <-
     """, "found '?' (usually indentation: this line is indented more or less than"),
    # issue 23, item 5: `{user}` unquoted is YAML for the mapping {'user': None}
    ("unquoted-path-parameter-in-equals", """
        version: 1
        rules:
          - name: notes
            match: {path: "/notes/{user}"}
            allow: {claim: sub, equals: {user}}  # <-
     """, 'quote the path parameter: equals: "{user}"'),
    ("unquoted-path-parameter-in-contains", """
        version: 1
        rules:
          - name: notes
            match: {path: "/notes/{user}"}
            allow:
              claim: groups
              contains: {user}  # <-
     """, 'quote the path parameter: contains: "{user}"'),
    ("unquoted-path-parameter-in-in", """
        version: 1
        rules:
          - name: notes
            match: {path: "/notes/{user}"}
            allow: {claim: sub, in: [{user}, admin]}  # <-
     """, 'quote the path parameter: in: ["{user}"]'),
    ("a-mapping-as-claim-value", """
        version: 1
        rules:
          - name: r
            match: {path: /a}
            allow: {claim: sub, equals: {a: 1}}  # <-
     """, "equals: a mapping where a value belongs"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "fragment"), [pytest.param(*b[1:], id=b[0]) for b in BROKEN])
def test_broken_policy(folder: Path, text: str, fragment: str) -> None:
    path = write(folder, text)
    line = marked_line(path)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    e = info.value
    assert (e.file, e.line) == (str(path), line), e.message
    assert fragment in e.message
    assert str(e) == f"{path}:{line}: {e.message}"


def test_broken_policy_via_parse_policy(folder: Path) -> None:
    """parse_policy names the file it was given, and resolves paths against base."""
    text = issuer("jwks_file: keys/ec-only.json")
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "inline.yaml", folder)
    assert (info.value.file, info.value.line) == ("inline.yaml", 7)
    assert "has no key usable" in info.value.message


# --- block files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        pytest.param("192.0.2.0/24\n# c\n\n10.0.0.1/8\n", 4, "has host bits set",
                     id="host-bits"),
        pytest.param("192.0.2.1\nnot-an-ip  # comment\n", 2, "not an IP address: 'not-an-ip'",
                     id="not-an-address"),
        pytest.param("\n\n\n2001:db8::/129\n", 4, "prefix length /129 too long",
                     id="v6-prefix-too-long"),
        pytest.param("1.2.3.4/24/8\n", 1, "bad prefix length", id="two-slashes"),
    ],
)  # fmt: skip
def test_bad_entry_in_block_file_names_that_file(
    folder: Path, content: str, line: int, fragment: str
) -> None:
    block = folder / "lists" / "bad.txt"
    block.write_text(content)
    path = write(folder, "version: 1\nip:\n  block_files: [lists/block.txt, lists/bad.txt]\n"
                         "rules: []\n")  # fmt: skip
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert (info.value.file, info.value.line) == (str(block), line)
    assert fragment in info.value.message
    assert str(info.value).startswith(f"{block}:{line}: ")


def test_block_file_not_utf8(folder: Path) -> None:
    block = folder / "lists" / "bin.txt"
    block.write_bytes(b"192.0.2.1\n\xff\xfe\n")
    path = write(folder, "version: 1\nip:\n  block_files: [lists/bin.txt]\nrules: []\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert (info.value.file, info.value.line, info.value.message) == (
        str(block), None, "not UTF-8 text")  # fmt: skip


def test_missing_block_file_names_the_resolved_path(folder: Path) -> None:
    path = write(folder, "version: 1\nip:\n  block_files: [lists/nope.txt]\nrules: []\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.line == 3
    assert info.value.message.startswith(
        f"cannot read block file {str(folder / 'lists' / 'nope.txt')!r}: "
    )


# --- paths resolve against the policy's folder ------------------------------------


def test_relative_paths_resolve_against_policy_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(folder, """
        version: 1
        ip:
          block_files: [lists/block.txt]
        authn:
          jwt:
            - {name: a, issuer: "https://a.test", algorithms: [RS256], jwks_file: keys/jwks.json}
        rules: []
    """)  # fmt: skip
    p = load_policy(Path("..") / path.name)
    assert "198.51.100.7" in p.block
    assert p.issuers[0].keys[0].kid == "k1"
    assert p.files == (
        str(Path("..") / path.name),
        str(Path("..") / "lists" / "block.txt"),
        str(Path("..") / "keys" / "jwks.json"),
    )


def test_absolute_paths_are_used_as_given(folder: Path, tmp_path_factory: Any) -> None:
    other = tmp_path_factory.mktemp("policy-elsewhere")
    jwks = folder / "keys" / "jwks.json"
    path = write(other, f"""
        version: 1
        authn:
          jwt:
            - {{name: a, issuer: "https://a.test", algorithms: [RS256], jwks_file: "{jwks}"}}
        rules: []
    """)  # fmt: skip
    p = load_policy(path)
    assert p.files == (str(path), str(jwks))


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "nope.yaml")
    assert (info.value.file, info.value.line) == (str(tmp_path / "nope.yaml"), None)
    assert info.value.message.startswith("cannot read the policy: ")


def test_policy_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"version: 1\nrealm: \xff\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert (info.value.file, info.value.line, info.value.message) == (
        str(path), None, "the policy is not UTF-8 text")  # fmt: skip


# --- the repository's own policies ------------------------------------------------


REPO_POLICIES = sorted(
    p for p in (REPO / "policies").glob("*.yaml") if not p.name.endswith(".tests.yaml")
)


@pytest.mark.parametrize("path", REPO_POLICIES, ids=lambda p: p.name)
def test_repo_policies_load(path: Path) -> None:
    keys.ensure_demo_keys(REPO / "policies" / "keys")
    p = load_policy(path)
    assert p.rules
    assert p.files[0] == str(path)


def test_repo_has_policies() -> None:
    assert (REPO / "policies" / "example.yaml").is_file()


def test_example_policy_values() -> None:
    keys.ensure_demo_keys(REPO / "policies" / "keys")
    p = load_policy(REPO / "policies" / "example.yaml")
    assert p.realm == "api"
    assert [r.name for r in p.rules] == [
        "health", "profile", "user-record", "secrets", "admin", "reports", "legacy"]  # fmt: skip
    assert [r.hide for r in p.rules] == [False, False, False, True, False, False, False]
    assert p.issuers[0].issuer == keys.DEMO_ISSUER
    assert p.issuers[0].audience == (keys.DEMO_AUDIENCE,)
    assert p.issuers[0].leeway == 30.0
    assert [k.kid for k in p.issuers[0].keys] == [keys.DEMO_KID]
    assert "127.0.0.2" in p.block and "203.0.113.1" in p.block
    assert p.rules[5].allow == c.HasScope("reports:write")
    assert p.rules[5].limits[0].rate == Rate(5, 60)


# --- small helpers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param(0, 0.0, id="zero"),
        pytest.param(30, 30.0, id="int"),
        pytest.param("30", 30.0, id="string-no-unit"),
        pytest.param("30s", 30.0, id="seconds"),
        pytest.param(" 5 m ", 300.0, id="minutes-spaces"),
        pytest.param("1h", 3600.0, id="hour"),
        pytest.param("2d", 172800.0, id="days"),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(-1, id="negative"),
        pytest.param(True, id="bool"),
        pytest.param(1.5, id="float"),
        pytest.param("1.5s", id="decimal-string"),
        pytest.param("5w", id="weeks"),
        pytest.param("s", id="unit-only"),
        pytest.param(None, id="null"),
    ],
)
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        pytest.param("API.Example.com", "api.example.com", id="case"),
        pytest.param("api.example.com.", "api.example.com", id="trailing-dot"),
        pytest.param("api.example.com:443", "api.example.com", id="port-443"),
        pytest.param("api.example.com:80", "api.example.com", id="port-80"),
        pytest.param("api.example.com:8080", "api.example.com:8080", id="other-port"),
        pytest.param(" API.test ", "api.test", id="spaces"),
        pytest.param("api.example.com.:443", "api.example.com", id="trailing-dot-and-port"),
        pytest.param("API.Example.com.:80", "api.example.com", id="trailing-dot-and-port-80"),
    ],
)
def test_normalize_host(host: str, normal: str) -> None:
    assert normalize_host(host) == normal


def test_a_huge_rate_loads_and_too_huge_names_the_bound(folder: Path) -> None:
    """Hardening 2, item 12: `rate: 1000000000/minute` was refused with
    'expected N/second, N/minute, N/hour or N/day', which it is."""
    limits = "version: 1\nlimits:\n  - {name: a, key: ip, rate: %s}  # <-\nrules: []\n"
    policy = load_policy(write(folder, limits % "1000000000/minute"))
    assert policy.limits[0].rate == Rate(1_000_000_000, 60)
    path = write(folder, limits % "60000000001/minute")
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(e.value) == (
        f"{path}:{marked_line(path)}: bad rate '60000000001/minute': at most "
        "60000000000/minute (one request a nanosecond)"
    )
