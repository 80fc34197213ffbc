"""`authgate test`: run a policy's test cases through the real `decide()`.

Tokens in test cases are described by their claims. The runner swaps every
issuer's keys for a throwaway key it generates (`with_test_keys`), signs
each token with it, and so tests never need the real signing keys. Each case
gets fresh rate-limit counters; `repeat: N` sends the request N times and
checks the last answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authgate.core import oidc
from authgate.core.clientcert import ClientCert, sf_binary
from authgate.core.decision import Decision, RequestView, judge
from authgate.core.explanation import Explanation, explain
from authgate.core.introspection import Introspected, entry_for, token_digest
from authgate.core.keyset import VerifyKey
from authgate.core.model import Policy
from authgate.core.sealing import Sealer
from authgate.core.tokens import Issuer
from authgate.policy.marks import PolicyError
from authgate.runtime.stores import MemoryStore
from authgate.tools.keys import mint
from authgate.tools.testcases import (
    Case,
    CaseCert,
    CaseSession,
    CaseToken,
    load_beside,
    parse_cases,
)

__all__ = [
    "Outcome",
    "Report",
    "TEST_KID",
    "SigningKey",
    "load_cases",
    "run_case",
    "run_policy",
    "sign",
    "with_test_keys",
]

TEST_KID = "authgate-test"
DEFAULT_SUBJECT = "test-user"
# The algorithm a throwaway key is made for: the first the issuer accepts.
_PREFERENCE = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "ES256K", "EdDSA", "HS256", "HS384", "HS512",
)  # fmt: skip
_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
    "ES256K": ec.SECP256K1(),
}
_FAMILY = {**{a: "RSA" for a in _PREFERENCE[:6]}, **{a: a for a in _CURVES}, "EdDSA": "EdDSA"}
# One throwaway key per family and process: RSA keys take a while to make.
_made: dict[str, tuple[Any, Any]] = {}


def _throwaway(alg: str) -> tuple[Any, Any]:
    """(signing key, verifying key) for `alg`, made once per process."""
    family = _FAMILY.get(alg, "HMAC")
    if family not in _made:
        if family == "RSA":
            private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _made[family] = (private, private.public_key())
        elif family in _CURVES:
            private = ec.generate_private_key(_CURVES[family])
            _made[family] = (private, private.public_key())
        elif family == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
            _made[family] = (private, private.public_key())
        else:
            secret = secrets.token_bytes(64)
            _made[family] = (secret, secret)
    return _made[family]


@dataclass(frozen=True, slots=True)
class SigningKey:
    issuer: Issuer
    alg: str
    private: Any


def with_test_keys(policy: Policy) -> tuple[Policy, dict[str, SigningKey]]:
    """A copy of the policy whose issuers verify only with throwaway keys, and
    those keys by issuer name. Everything else (issuer URL, audience, leeway,
    claims paths, algorithms) stays as the policy says. An issuer that
    introspects gets a state of its own that never calls its provider: the
    runner puts the answer for each opaque token it makes there (`sign`)."""
    issuers: list[Issuer] = []
    signing: dict[str, SigningKey] = {}
    for issuer in policy.issuers:
        own = (
            Introspected(issuer.introspection.config) if issuer.introspection is not None else None
        )
        alg = next((a for a in _PREFERENCE if a in issuer.algorithms), "")
        if not alg:  # every token introspected: no keys at all
            swapped = dataclasses.replace(issuer, introspection=own)
            issuers.append(swapped)
            signing[issuer.name] = SigningKey(swapped, alg, None)
            continue
        private, public = _throwaway(alg)
        swapped = dataclasses.replace(
            issuer,
            keys=(VerifyKey(TEST_KID, public, frozenset({alg})),),
            remote=None,
            introspection=own,
        )
        issuers.append(swapped)
        signing[issuer.name] = SigningKey(swapped, alg, private)
    login = policy.login
    if login is not None:
        # Sessions sealed and opened with a throwaway key, never the real ones.
        login = dataclasses.replace(login, sealer=Sealer([secrets.token_bytes(32)]))
    return dataclasses.replace(policy, issuers=tuple(issuers), login=login), signing


def _put(claims: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set a dotted claim path, merging into objects already there."""
    for step in path[:-1]:
        inner = claims.get(step)
        if not isinstance(inner, dict):
            inner = claims[step] = {}
        claims = inner
    claims[path[-1]] = value


def sign(keys: dict[str, SigningKey], spec: CaseToken, now: float) -> str:
    """A token for the case, signed with the throwaway key of its issuer.

    Defaults: `sub` test-user, `iss` and `aud` the issuer's, `exp` now + ttl.
    `roles` and `scopes` go where the issuer's roles_claim / scope_claim say
    (scopes as one space-separated string); any other claim is as written
    and overrides the defaults. Raises ValueError for an unknown issuer."""
    if not keys:
        raise ValueError("the policy has no JWT issuer to sign a test token for")
    name = spec.issuer if spec.issuer is not None else next(iter(keys))
    if name not in keys:
        raise ValueError(f"the policy has no issuer named {name!r} (has: {', '.join(keys)})")
    key = keys[name]
    claims: dict[str, Any] = {k: v for k, v in spec.claims if k not in ("roles", "scopes")}
    for claim, value in spec.claims:
        if claim == "roles":
            _put(claims, key.issuer.roles_claim, list(value))
        elif claim == "scopes":
            _put(claims, key.issuer.scope_claim, " ".join(value))
    aud = key.issuer.audience[0] if key.issuer.audience else None
    source = key.issuer.introspection
    if source is not None and (spec.opaque or not key.alg):
        # An opaque token, and the answer its issuer would give (RFC 7662 §2.2).
        token = secrets.token_urlsafe(32)
        answer = {"active": True, "sub": DEFAULT_SUBJECT, "iss": key.issuer.issuer,
                  "exp": int(now + spec.ttl), "iat": int(now), "token_type": "Bearer"}  # fmt: skip
        if aud is not None:
            answer["aud"] = aud
        answer.update(claims)
        source.remember(token_digest(token), entry_for(answer, key.issuer, now, source.config), now)
        return token
    if spec.opaque:
        raise ValueError(f"issuer {name!r} does not introspect: its tokens are JWTs")
    sub = claims.pop("sub", DEFAULT_SUBJECT)
    # An issuer that requires a `typ` (RFC 9068 at+jwt) gets its tokens typed so.
    typ = {"typ": key.issuer.typ} if key.issuer.typ else None
    return mint(
        key.private,
        sub=sub,
        ttl=spec.ttl,
        iss=key.issuer.issuer,
        aud=aud,
        kid=TEST_KID,
        alg=key.alg,
        now=now,
        extra=claims,
        headers=typ,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    case: Case
    explanation: Explanation
    problems: tuple[str, ...]  # empty: passed
    # The decisions (with traces) of the requests `repeat:` sent before the last
    # one, the one `explanation` tells about: for coverage.
    earlier: tuple[Decision, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class Report:
    policy: str
    outcomes: tuple[Outcome, ...]
    rules: tuple[str, ...]  # the policy's rule names, in order

    @property
    def failed(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if not o.passed)

    @property
    def uncovered(self) -> tuple[str, ...]:
        """Rules that decided none of the cases."""
        hit = {o.explanation.decision.rule for o in self.outcomes}
        return tuple(r for r in self.rules if r not in hit)


def load_cases(policy: Policy) -> tuple[Case, ...]:
    """The policy's own `tests:` and those of `NAME.tests.yaml` beside it.
    Raises PolicyError."""
    rules = {r.name for r in policy.rules}
    own = parse_cases(*policy.tests_raw, policy.file, rules) if policy.tests_raw else ()
    beside = load_beside(policy.file, rules)
    names = {c.name for c in own}
    for case in beside:
        if case.name in names:
            raise PolicyError(case.file, case.line, f"test {case.name!r} is also in the policy")
    return own + beside


def session_cookie(login: oidc.Login | None, spec: CaseSession, now: float) -> str:
    """The Cookie field value of a session with the case's claims, sealed for
    `login` (from `with_test_keys`). `sub` defaults to test-user; `roles` go
    where roles_claim says, `scopes` are the scopes granted. Raises ValueError
    without a login."""
    if login is None:
        raise ValueError("the policy has no OpenID Connect login (authn.oidc) for a session")
    claims: dict[str, Any] = {k: v for k, v in spec.claims if k not in ("roles", "scopes")}
    granted = login.scopes
    for claim, value in spec.claims:
        if claim == "roles":
            _put(claims, login.issuer.roles_claim, list(value))
        elif claim == "scopes":
            granted = tuple(value)
    claims.setdefault("sub", DEFAULT_SUBJECT)
    claims.setdefault("iss", login.issuer.issuer)
    session = oidc.Session(
        sub=str(claims["sub"]), claims=claims, scopes=granted, login_at=now, seen_at=now,
        access_token="test", access_issued=now, access_expires=None, refresh_token=None,
        id_token=None,
    )  # fmt: skip
    return oidc.cookie_for(login, session)


def _request(
    case: Case, keys: dict[str, SigningKey], now: float, login: oidc.Login | None = None
) -> RequestView:
    headers = [(name.lower(), value) for name, value in case.request.headers]
    if case.session is not None:
        headers.append(("cookie", session_cookie(login, case.session, now)))
    target = case.request.target
    if case.token is not None:
        token = sign(keys, case.token, now)
        issuer = _issuer_of(keys, case.token)
        if case.token.send_as == "cookie":
            if not issuer.cookie:
                raise ValueError(f"issuer {issuer.name!r} reads no cookie (set cookie: NAME)")
            headers.append(("cookie", f"{issuer.cookie}={token}"))
        elif case.token.send_as == "query":
            if not issuer.query_param:
                raise ValueError(f"issuer {issuer.name!r} reads no query parameter")
            target += ("&" if "?" in target else "?") + f"{issuer.query_param}={token}"
        else:
            headers.append(("authorization", f"Bearer {token}"))
    host = case.request.host
    if host is None:
        host = next((v for k, v in headers if k == "host"), None)
    cert = _client_cert(case.client_cert, now) if case.client_cert is not None else None
    return RequestView.build(
        case.request.method, target, headers, case.request.ip, host, client_cert=cert
    )


def _client_cert(spec: CaseCert, now: float) -> ClientCert:
    """The certificate a case describes, valid for a day around `now` (an
    expired one says `problem: expired`: the handshake finds it)."""
    made_up = hashlib.sha256(repr(spec).encode()).hexdigest()
    return ClientCert(
        sha256=spec.sha256 or made_up,
        subject=spec.subject,
        issuer="CN=authgate test CA",
        serial=made_up[:16],
        not_before=now - 86400,
        not_after=now + 86400,
        cn=spec.cn,
        san_dns=spec.san_dns,
        san_uri=spec.san_uri,
        san_email=spec.san_email,
        client_cert=sf_binary(bytes.fromhex(made_up)),
        problem=spec.problem,
    )


def _issuer_of(keys: dict[str, SigningKey], spec: CaseToken) -> Issuer:
    name = spec.issuer if spec.issuer is not None else next(iter(keys))
    return keys[name].issuer


def _check(case: Case, e: Explanation) -> list[str]:
    want, d = case.expect, e.decision
    problems = []
    if e.status != want.status:
        problems.append(f"expected status {want.status}, got {e.status} ({d.reason})")
    if want.check_rule and d.rule != want.rule:
        problems.append(f"expected rule {want.rule!r}, got {d.rule!r}")
    if want.reason is not None and d.reason != want.reason:
        problems.append(f"expected reason {want.reason!r}, got {d.reason!r}")
    if want.headers and e.status == want.status:  # headers of another answer would only add noise
        sent = d.upstream_headers if d.allowed else (e.response.headers if e.response else ())
        where = "forwarded" if d.allowed else "in the answer"
        for name, value in want.headers:
            got = [v for k, v in sent if k.lower() == name.lower()]
            if value is None and got:
                problems.append(f"expected no {name} {where}, got {got[0]!r}")
            elif value is not None and got != [value]:
                problems.append(
                    f"expected {name}: {value!r} {where}, got " + (repr(got[0]) if got else "none")
                )
    return problems


def run_case(policy: Policy, keys: dict[str, SigningKey], case: Case, now: float) -> Outcome:
    """One case against a policy from `with_test_keys`."""
    try:
        request = _request(case, keys, now, policy.login)
    except (ValueError, oidc.LoginRejected) as e:
        empty = RequestView.build(case.request.method, case.request.target, (), case.request.ip)
        what = "seal the session" if case.session is not None else "sign the token"
        why = e.detail if isinstance(e, oidc.LoginRejected) else str(e)
        return Outcome(case, explain(policy, empty, now, MemoryStore()), (f"cannot {what}: {why}",))
    limiter = MemoryStore()
    earlier = tuple(
        judge(policy, request, now, limiter, trace=True) for _ in range(case.repeat - 1)
    )
    told = explain(policy, request, now, limiter)
    return Outcome(case, told, tuple(_check(case, told)), earlier)


def run_policy(policy: Policy, cases: Iterable[Case] | None = None,
               now: float | None = None) -> Report:  # fmt: skip
    """Run the cases (default: `load_cases(policy)`) at `now` (default: the clock)."""
    now = time.time() if now is None else now
    cases = load_cases(policy) if cases is None else tuple(cases)
    testable, keys = with_test_keys(policy)
    outcomes = tuple(run_case(testable, keys, case, now) for case in cases)
    return Report(policy.file, outcomes, tuple(r.name for r in policy.rules))


def format_report(report: Report, verbose: bool = False) -> str:
    """Failures with their explain traces, then one summary line."""
    out: list[str] = []
    for o in report.outcomes:
        if o.passed:
            if verbose:
                out.append(f"ok    {o.case.where}: {o.case.name}")
            continue
        out.append(f"FAIL  {o.case.where}: {o.case.name}")
        out += [f"      {p}" for p in o.problems]
        out += [f"      | {line}".rstrip() for line in o.explanation.lines]
        out.append("")
    n, failed = len(report.outcomes), len(report.failed)
    summary = f"{report.policy}: {n} test{'s' if n != 1 else ''}, {n - failed} passed"
    if failed:
        summary += f", {failed} failed"
    out.append(summary)
    if report.outcomes and report.uncovered:
        out.append(f"{report.policy}: no test reaches rule(s) {', '.join(report.uncovered)}")
    return "\n".join(out) + "\n"
