"""The pure core as tables: decide() on requests, without mitmproxy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authgate.core.decision import Decision, RequestView, judge
from authgate.core.model import Policy
from authgate.core.ratelimit import Limiter
from authgate.policy.load import parse_policy
from authgate.runtime.stores import MemoryStore
from authgate.tools.keys import jwks_for, mint, new_rsa_key

NOW = 1_800_000_000.0
KEY = new_rsa_key()

POLICY = """
version: 1
realm: shop
client_ip:
  trusted_proxies: [10.0.0.0/8]
ip:
  block: [192.0.2.0/24]
authn:
  jwt:
    - name: t
      issuer: https://as.test
      audience: https://api.test
      algorithms: [RS256]
      jwks_file: jwks.json
      roles_claim: realm_access.roles
limits:
  - {name: per-key, key: "header:X-Client", rate: 3/minute}
rules:
  - name: public
    match: {path: "/pub/**"}
    allow: anyone
  - name: read
    match: {path: /r, methods: [GET]}
    allow: {scope: read}
  - name: write
    match: {path: /w}
    allow: {all: [{scope: write}, {role: editor}]}
  - name: team
    match: {path: "/teams/{team}/*"}
    allow: {claim: teams, contains: "{team}"}
  - name: hidden
    match: {path: "/priv/**"}
    allow: {role: admin}
    hide: true
  - name: vhost
    match: {path: /host-only, host: api.test}
    allow: anyone
  - name: not-guests
    match: {path: /members}
    allow: {not: {role: guest}}
default: forbidden
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    folder = tmp_path_factory.mktemp("policy")
    (folder / "jwks.json").write_text(json.dumps(jwks_for(KEY, "k1")))
    return parse_policy(POLICY, str(folder / "p.yaml"), folder)


def tok(**kw: Any) -> str:
    kw.setdefault("sub", "alice")
    kw.setdefault("iss", "https://as.test")
    kw.setdefault("aud", "https://api.test")
    kw.setdefault("kid", "k1")
    kw.setdefault("now", NOW)
    return mint(KEY, **kw)


def req(
    target: str,
    token: str | None = None,
    method: str = "GET",
    peer: str = "198.51.100.7",
    headers: tuple[tuple[str, str], ...] = (),
    host: str | None = "gw.test",  # the policy matches on host: every request names one
) -> RequestView:
    h = headers + ((("authorization", f"Bearer {token}"),) if token else ())
    return RequestView(method, target, h, peer, host)


def run(policy: Policy, r: RequestView, limiter: Limiter | None = None) -> Decision:
    return judge(policy, r, NOW, MemoryStore() if limiter is None else limiter, trace=True)


ROLES = {"realm_access": {"roles": ["editor"]}}

CASES = [
    # (id, request, status, reason, rule)
    ("public", req("/pub/x"), 0, "allowed", "public"),
    ("public-invalid-token", req("/pub/x", "a.b.c"), 401, "invalid_token", "public"),
    ("bad-path", req("/pub/%2e%2e%2fr"), 400, "bad_path", None),
    ("dot-dot-into-read", req("/pub/../r"), 401, "no_credentials", "read"),
    ("no-creds", req("/r"), 401, "no_credentials", "read"),
    ("scope-ok", req("/r", tok(scopes=["read"])), 0, "allowed", "read"),
    ("scope-case-sensitive", req("/r", tok(scopes=["READ"])), 403, "insufficient_scope", "read"),
    ("scope-among-others", req("/r", tok(scopes=["x", "read"])), 0, "allowed", "read"),
    ("method-mismatch", req("/r", tok(scopes=["read"]), "POST"), 403, "no_rule", None),
    ("role-and-scope", req("/w", tok(scopes=["write"], extra=ROLES)), 0, "allowed", "write"),
    ("role-missing", req("/w", tok(scopes=["write"])), 403, "forbidden", "write"),
    ("scope-missing", req("/w", tok(extra=ROLES)), 403, "insufficient_scope", "write"),
    ("expired", req("/r", tok(scopes=["read"], ttl=-10)), 401, "invalid_token", "read"),
    ("team-member", req("/teams/red/x", tok(extra={"teams": ["red"]})), 0, "allowed", "team"),
    ("team-other", req("/teams/blue/x", tok(extra={"teams": ["red"]})), 403, "forbidden", "team"),
    ("team-anon", req("/teams/red/x"), 401, "no_credentials", "team"),
    ("hidden-anon", req("/priv/x"), 404, "hidden", "hidden"),
    ("hidden-bad-token", req("/priv/x", "a.b.c"), 404, "hidden", "hidden"),
    ("hidden-user", req("/priv/x", tok()), 404, "hidden", "hidden"),
    ("hidden-admin", req("/priv/x", tok(extra={"realm_access": {"roles": ["admin"]}})), 0,
     "allowed", "hidden"),
    ("no-rule-forbidden", req("/nothing"), 403, "no_rule", None),
    ("blocked", req("/pub/x", peer="192.0.2.1"), 403, "ip_blocked", None),
    ("blocked-via-trusted-proxy",
     req("/pub/x", peer="10.1.1.1", headers=(("x-forwarded-for", "192.0.2.9"),)), 403,
     "ip_blocked", None),
    ("xff-from-untrusted-ignored",
     req("/pub/x", peer="198.51.100.1", headers=(("x-forwarded-for", "192.0.2.9"),)), 0,
     "allowed", "public"),
    ("mapped-ipv6-blocked", req("/pub/x", peer="::ffff:192.0.2.1"), 403, "ip_blocked", None),
    ("host-match", req("/host-only", host="API.TEST:443"), 0, "allowed", "vhost"),
    ("host-mismatch", req("/host-only", host="other.test"), 403, "no_rule", None),
    ("host-missing", req("/host-only", host=None), 400, "bad_host", None),
    ("host-invalid", req("/host-only", host="api.test other.test"), 400, "bad_host", None),
    ("host-userinfo", req("/host-only", host="x@api.test"), 400, "bad_host", None),
    ("host-twice", req("/h", headers=(("host", "a"), ("host", "b"))), 400, "bad_host", None),
    ("not-guest-anon", req("/members"), 0, "allowed", "not-guests"),
    ("not-guest-guest", req("/members", tok(extra={"realm_access": {"roles": ["guest"]}})), 403,
     "forbidden", "not-guests"),
    ("two-authorization",
     req("/r", tok(scopes=["read"]), headers=(("authorization", "Bearer x"),)), 400,
     "invalid_request", "read"),
    ("bearer-two-words", req("/r", "a b"), 401, "invalid_token", "read"),
    ("scheme-case-insensitive",
     req("/r", headers=(("authorization", f"bEaReR  {tok(scopes=['read'])}"),)), 0, "allowed",
     "read"),
    ("basic-unsupported", req("/r", headers=(("authorization", "Basic Zm9vOmJhcg=="),)), 401,
     "no_credentials", "read"),
]  # fmt: skip


@pytest.mark.parametrize("request_, status, reason, rule", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_decisions(policy: Policy, request_: RequestView, status: int, reason: str,
                   rule: str | None) -> None:  # fmt: skip
    d = run(policy, request_)
    assert (d.status, d.reason, d.rule) == (status, reason, rule), d.trace
    assert d.allowed == (status == 0)


def test_allowed_decision_carries_the_canonical_target_and_identity_headers(policy: Policy) -> None:
    d = run(policy, req("/pub/a/../%7Eb?q=%2F..", tok(scopes=["b", "a"], extra=ROLES)))
    assert d.path is not None and d.path.target == "/pub/~b?q=%2F.."
    assert d.upstream_headers == (
        ("X-Auth-Subject", "alice"),
        ("X-Auth-Roles", "editor"),
        ("X-Auth-Scopes", "a,b"),
        ("X-Auth-Issuer", "https://as.test"),
    )


def test_insufficient_scope_names_the_missing_scope(policy: Policy) -> None:
    d = run(policy, req("/w", tok(extra=ROLES)))
    assert d.challenges == (("Bearer", (("error", "insufficient_scope"), ("scope", "write"))),)


def test_role_denial_has_no_challenge(policy: Policy) -> None:
    assert run(policy, req("/w", tok(scopes=["write"]))).challenges == ()


def test_no_credentials_challenge_has_no_error(policy: Policy) -> None:
    assert run(policy, req("/r")).challenges == (("Bearer", ()),)


def test_header_limit_falls_back_to_the_ip_when_the_header_is_missing(policy: Policy) -> None:
    limiter = MemoryStore()
    with_header = req("/pub/x", headers=(("x-client", "abc"),))
    assert [run(policy, with_header, limiter).status for _ in range(4)] == [0, 0, 0, 429]
    # Leaving the header out does not escape: the IP gets its own bucket of 3.
    bare = req("/pub/x")
    assert [run(policy, bare, limiter).status for _ in range(4)] == [0, 0, 0, 429]
    # Another header value is another bucket.
    other = req("/pub/x", headers=(("x-client", "xyz"),))
    assert run(policy, other, limiter).status == 0


def test_429_headers(policy: Policy) -> None:
    limiter = MemoryStore()
    r = req("/pub/x", headers=(("x-client", "k"),))
    for _ in range(3):
        run(policy, r, limiter)
    d = run(policy, r, limiter)
    assert d.status == 429
    assert d.headers == (
        ("Retry-After", "20"),
        ("RateLimit-Policy", '"per-key";q=3;w=60'),
        ("RateLimit", '"per-key";r=0;t=20'),
    )


def test_consume_false_leaves_the_counters_alone(policy: Policy) -> None:
    limiter = MemoryStore()
    r = req("/pub/x", headers=(("x-client", "k"),))
    for _ in range(10):
        assert judge(policy, r, NOW, limiter, consume=False).status == 0
    assert len(limiter) == 0


def test_denied_requests_do_not_count_against_late_limits(policy: Policy) -> None:
    limiter = MemoryStore()
    for _ in range(5):
        assert run(policy, req("/r", headers=(("x-client", "k"),)), limiter).status == 401
    assert len(limiter) == 0


def test_trace_tells_the_story(policy: Policy) -> None:
    d = run(policy, req("/teams/blue/x", tok(extra={"teams": ["red"]})))
    text = "\n".join(d.trace)
    assert "rule public: path does not match /pub/**" in text
    assert "rule team: matches with {'team': 'blue'}" in text
    assert "claim teams contains '{team}'=false" in text


def test_no_trace_unless_asked(policy: Policy) -> None:
    assert judge(policy, req("/r"), NOW, MemoryStore()).trace == ()


@pytest.mark.parametrize(
    "claims",
    [{"sub": "a\r\nX-Evil: 1"}, {"realm_access": {"roles": ["ad,min"]}}, {"scope": "read\x00"}],
)
def test_claims_that_would_break_headers_are_invalid_tokens(
    policy: Policy, claims: dict[str, Any]
) -> None:
    d = run(policy, req("/pub/x", tok(extra=claims)))
    assert (d.status, d.reason) == (401, "invalid_token")


def test_policy_file_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "bad.txt").write_text("# feed\n192.0.2.0/24\n")
    p = parse_policy(
        "version: 1\nip: {block_files: [lists/bad.txt]}\n"
        "rules: [{name: a, match: {path: /**}, allow: anyone}]\n",
        str(tmp_path / "p.yaml"),
        tmp_path,
    )
    assert run(p, req("/x", peer="192.0.2.200")).reason == "ip_blocked"


TRACE_LINES = [
    # (request, a line the trace must hold)
    (req("/pub/x"), "ip: not on the block list; no allow list"),
    (req("/pub/x", peer="10.1.1.1", headers=(("x-forwarded-for", "198.51.100.9"),)),
     "x-forwarded-for '198.51.100.9' walked right to left past trusted proxies"),
    (req("/pub/x", headers=(("x-forwarded-for", "10.9.9.9"),)),
     "x-forwarded-for '10.9.9.9' ignored: the peer is not a trusted proxy"),
    (req("/pub/x", peer="10.1.1.1", headers=(("x-forwarded-for", "garbage"),)),
     "x-forwarded-for 'garbage' unusable: the trusted peer is the client"),
    (req("/r", tok(kid="k9")),
     "credentials: bearer token eyJhbGciOi… (alg RS256, kid 'k9', iss 'https://as.test')"),
    (req("/w", tok(scopes=["write"])), "    scope write: true (scopes: write)"),
    (req("/w", tok(scopes=["write"])), "    role editor: false (roles: none)"),
]  # fmt: skip


@pytest.mark.parametrize("request_, line", TRACE_LINES)
def test_trace_lines(policy: Policy, request_: RequestView, line: str) -> None:
    assert line in run(policy, request_).trace


def test_trace_never_holds_a_token(policy: Policy) -> None:
    token = tok(scopes=["read"])
    for r in (req("/r", token), req("/r", token + "x"), req("/priv/x", token)):
        assert not any(token[10:] in line for line in run(policy, r).trace)


def test_client_ip_from_rfc7239_forwarded(tmp_path: Path) -> None:
    p = parse_policy(
        "version: 1\nclient_ip: {trusted_proxies: [10.0.0.0/8], header: Forwarded}\n"
        "ip: {block: [192.0.2.0/24]}\nrules: [{name: a, match: {path: /**}, allow: anyone}]\n",
        str(tmp_path / "p.yaml"),
        tmp_path,
    )
    blocked = req("/x", peer="10.0.0.2", headers=(("forwarded", 'for="192.0.2.7:5000"'),))
    assert run(p, blocked).reason == "ip_blocked"
    # X-Forwarded-For is not read when the policy names Forwarded.
    other = req("/x", peer="10.0.0.2", headers=(("x-forwarded-for", "192.0.2.7"),))
    assert (run(p, other).status, run(p, other).client_ip) == (0, "10.0.0.2")
