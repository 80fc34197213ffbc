"""The pure core, in two phases:

    prepare(policy, request, now, limiter) -> Prepared | Decision
    decide(prepared, now, limiter) -> Decision

`prepare` does everything that needs no verified credential: header fields,
the canonical path, the client IP and its lists and limits, the matching
rule, and finding the credential presented; it answers early (400, 403, 404,
429) or says what slow work the credential needs (a password check, a key
fetch). The caller does that work (the gateway off the event loop, the tools
inline), then `decide` verifies the credential, evaluates the rule and its
remaining limits. `judge` is both in one call, for callers with no slow work
to do. No I/O, no mitmproxy, no clock but the one given: the gateway, explain,
policy tests, replay and the benchmark all run these functions, so what they
report is what the gateway does, report mode included.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from urllib.parse import quote, unquote_plus

from authgate.core import conditions as c
from authgate.core import oidc
from authgate.core.clientcert import ClientCert
from authgate.core.clientip import ClientIP, resolve
from authgate.core.credentials import (
    API_KEY,
    BASIC,
    JWT,
    MTLS,
    OIDC,
    Ambiguous,
    Challenge,
    KeyFetch,
    Presented,
    Work,
    find,
)
from authgate.core.identity import Identity
from authgate.core.ipset import parse_ip
from authgate.core.model import Ban, LimitSpec, Policy, Rule, challenges_for, normalize_host
from authgate.core.negotiation import is_browser_navigation
from authgate.core.oidc import (
    CROSS_SITE,
    LOGGED_OUT,
    LOGIN_COMPLETE,
    LOGIN_FAILED,
    LOGIN_START,
    METHOD_NOT_ALLOWED,
    CodeExchange,
)
from authgate.core.paths import AmbiguousPath, CanonicalPath, PathPattern, canonicalize
from authgate.core.ratelimit import Limiter, Recorder, Store, Verdict
from authgate.core.records import record


@record
class RequestView:
    """What the core needs to know of a request, independent of mitmproxy."""

    method: str
    target: str  # origin-form target as received: path and query
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value), in order
    peer: str  # socket peer IP address
    host: str | None = None  # the Host the client asked for, if known
    authority: str = ""  # an absolute-form target's authority, as received
    # The client certificate the connection's TLS handshake verified, if any.
    client_cert: ClientCert | None = None

    @classmethod
    def build(
        cls,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        peer: str,
        host: str | None = None,
        authority: str = "",
        client_cert: ClientCert | None = None,
    ) -> RequestView:
        """The one way to make a view: header names lower-cased, order kept."""
        fields = tuple((k.lower(), v) for k, v in headers)
        return cls(method.upper(), target, fields, peer, host, authority, client_cert)

    def header_all(self, name: str) -> list[str]:
        # A loop, not a comprehension: on a handful of fields the comprehension's
        # own call (Python 3.11) costs more than the loop.
        found = []
        for k, v in self.headers:
            if k == name:
                found.append(v)
        return found

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@record
class Decision:
    allowed: bool
    status: int  # the status the gateway answers with; 0 when forwarded
    reason: str  # machine-readable cause, for logs and metrics
    rule: str | None = None
    client_ip: str | None = None
    path: CanonicalPath | None = None
    identity: Identity | None = None
    # Bearer challenge parameters after realm, e.g. (("error", "invalid_token"),)
    # WWW-Authenticate challenges: (scheme, parameters after realm), in order
    challenges: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers (429)
    upstream_headers: tuple[tuple[str, str], ...] = ()  # identity headers to forward
    target: str = ""  # the request target to forward (canonical path, query)
    via: str | None = None  # where the credential came from: authorization, cookie, query, ...
    detail: str = ""  # internal explanation: logged, never sent to the client
    trace: tuple[str, ...] = field(default=())
    # A denial's evidence for the decision log (`authgate denials` reads it),
    # set on denial paths only: the rule's condition with each leaf's value
    # when an identity was refused (403), and the credential that failed
    # verification (401), whose keyed fingerprint is logged, never it.
    condition: str = ""
    rejected: Presented | None = field(default=None, repr=False, compare=False)
    # Report mode: a denial that is logged and counted, and the request
    # forwarded as if allowed (to `target`, with `upstream_headers`).
    report: bool = False
    # The subject key (`sub:basic:USER`) that failed Basic credentials named,
    # unproven: what a `watch:` keyed by subject counts a guess against.
    claimed: str = ""
    # Set-Cookie values for the client, on whatever answer it gets (the
    # gateway's, or the backend's): a session issued, refreshed or removed.
    cookies: tuple[str, ...] = ()

    @property
    def forwarded(self) -> bool:
        return self.allowed or self.report

    @property
    def outcome(self) -> str:
        """allow, deny or would_deny (a denial in report mode)."""
        return "allow" if self.allowed else ("would_deny" if self.report else "deny")


# Machine-readable reasons.
BAD_PATH = "bad_path"
BAD_HEADER = "bad_header"
BAD_TARGET = "bad_target"
BAD_HOST = "bad_host"
# Refused in every mode: forwarding them would let the backend read a request
# other than the one judged; the login's own endpoints are the gateway's
# answers, never the backend's.
_LOGIN_REASONS = frozenset(
    {LOGIN_START, LOGIN_COMPLETE, LOGIN_FAILED, LOGGED_OUT, CROSS_SITE, METHOD_NOT_ALLOWED}
)
NEVER_REPORTED = frozenset({BAD_HEADER, BAD_HOST}) | _LOGIN_REASONS
# RFC 9112 §3.2 / RFC 3986 §3.2.2: a reg-name or IPv4 address, or an IP literal,
# and an optional port.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::[0-9]{1,5})?")
IP_BLOCKED = "ip_blocked"
IP_NOT_ALLOWED = "ip_not_allowed"
RATE_LIMITED = "rate_limited"
NO_RULE = "no_rule"
NO_CREDENTIALS = "no_credentials"
INVALID_TOKEN = "invalid_token"
INVALID_REQUEST = "invalid_request"
INVALID_CREDENTIALS = "invalid_credentials"
KEYS_UNAVAILABLE = "keys_unavailable"
INTROSPECTION_UNAVAILABLE = "introspection_unavailable"
LOGIN_REDIRECT = "login_redirect"
PREFLIGHT = "preflight"
FORBIDDEN = "forbidden"
INSUFFICIENT_SCOPE = "insufficient_scope"
HIDDEN = "hidden"
ALLOWED = "allowed"
# A watch's actions (`watch:`): the IP-blocklist 403, and a 429 with Retry-After.
BANNED = "banned"
THROTTLED = "throttled"

# Bans by key (`ip:ADDRESS`, `sub:ISSUER:SUBJECT`): the gateway's table, read only.
Bans = Mapping[str, Ban]
NO_BANS: Bans = MappingProxyType({})


class _Trace:
    """The story of a decision, for `explain` and tests. When off, callers
    test `t.on` first so that no message is even formatted."""

    __slots__ = ("lines", "on")

    def __init__(self, on: bool) -> None:
        self.on = on
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        if self.on:
            self.lines.append(line)

    def done(self) -> tuple[str, ...]:
        return tuple(self.lines) if self.on else ()


# The trace nobody asked for: one for every request (it records nothing).
_NO_TRACE = _Trace(False)


def _limit(
    limiter: Limiter, spec: LimitSpec, key: str, now: float, consume: bool, t: _Trace
) -> Verdict:
    verdict = limiter.hit(spec.limiter_id, key, spec.rate, now, consume)
    if t.on:
        t(
            f"limit {spec.name} ({spec.rate}, key {key}): "
            + (
                "ok, " + str(verdict.remaining) + " left"
                if verdict.allowed
                else f"exceeded, retry after {verdict.retry_after}s"
            )
        )
    return verdict


def _rate_limited(spec: LimitSpec, verdict: Verdict) -> tuple[tuple[str, str], ...]:
    return (
        ("Retry-After", str(verdict.retry_after)),
        ("RateLimit-Policy", f'"{spec.name}";q={spec.rate.count};w={spec.rate.period}'),
        ("RateLimit", f'"{spec.name}";r=0;t={verdict.retry_after}'),
    )


def subject_key(issuer: str, subject: str) -> str:
    """The key of a subject, for limits and watches: `sub:ISSUER:SUBJECT`."""
    return f"sub:{issuer}:{subject}"


def _in_force(policy: Policy, bans: Bans, key: str, now: float) -> Ban | None:
    """The ban on `key` in force at `now`, if any: not ended, and set by a
    watch the policy still has (a reload that removes a watch ends its bans)."""
    ban = bans.get(key)
    if ban is None or ban.until <= now or ban.watch not in policy.watch_names:
        return None
    return ban


def _ban_answer(
    ban: Ban, now: float, t: _Trace, key: str
) -> tuple[int, str, tuple[tuple[str, str], ...]]:
    """(status, reason, headers) of a ban: the IP-blocklist 403, or for a
    throttle 429 with Retry-After the seconds left."""
    left = max(1, math.ceil(ban.until - now))
    if t.on:
        done = "banned" if ban.action == "ban" else "throttled"
        t(f"{key}: {done} by watch {ban.watch} for another {left} s")
    if ban.action == "throttle":
        return 429, THROTTLED, (("Retry-After", str(left)),)
    return 403, BANNED, ()


def _limit_key(spec: LimitSpec, request: RequestView, ip: ClientIP, who: Identity | None) -> str:
    if spec.key == "subject" and who is not None:
        return subject_key(who.issuer, who.subject)
    if spec.key == "header" and spec.header is not None:
        value = request.header(spec.header)
        if value is not None:
            return f"hdr:{value}"
    # ip, or a subject/header limit on a request without one: the client IP,
    # so leaving the header out never escapes the limit.
    return f"ip:{ip.address}"


def _without_param(query: str, name: str) -> str:
    """The query with every `name=...` item removed, the rest kept verbatim."""
    kept = [item for item in query.split("&") if unquote_plus(item.split("=", 1)[0]) != name]
    return "&".join(kept)


def _to_login(rule: Rule, request: RequestView) -> bool:
    """Is this a person's page load that the rule sends to its login page?"""
    return (
        rule.login_url is not None
        and not rule.hide
        and is_browser_navigation(request.method, request.headers)
    )


def _login_location(login_url: str, target: str) -> str:
    separator = "&" if "?" in login_url else "?"
    return f"{login_url}{separator}next={quote(target, safe='')}"


def identity_headers(who: Identity | None) -> tuple[tuple[str, str], ...]:
    return () if who is None else who.headers


def _match(
    policy: Policy, method: str, host: str | None, path: CanonicalPath, t: _Trace
) -> tuple[Rule | None, dict[str, str]]:
    # The router leaves out only rules that cannot match, and keeps file order,
    # so the first candidate that fits is the first rule that fits. Explain
    # tells why each earlier rule did not match, so a trace tries them all.
    rules = policy.rules if t.on else policy.router.candidates(method, path.segments)
    for rule in rules:
        params = rule.pattern.match(path.segments)
        if params is None:
            if t.on:
                t(f"rule {rule.name}: path does not match {rule.pattern.text}")
            continue
        if rule.methods is not None and method not in rule.methods:
            if t.on:
                t(f"rule {rule.name}: method {method} not in {sorted(rule.methods)}")
            continue
        if rule.host is not None and rule.host != host:
            if t.on:
                t(f"rule {rule.name}: host {host!r} is not {rule.host!r}")
            continue
        if t.on:
            t(f"rule {rule.name}: matches" + (f" with {params}" if params else ""))
        return rule, params
    return None, {}


# No control character but HTAB belongs in a field (RFC 9110 §5.5): a backend
# may read a bare CR, a vertical tab or a form feed as a line end, or a fold as
# a new field, and so see headers the gateway never judged. mitmproxy passes
# them through inside values.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _field_problems(headers: tuple[tuple[str, str], ...]) -> tuple[str | None, int]:
    """(the first field whose name or value holds a control character other
    than HTAB, the number of Host fields), in one pass over the fields."""
    hosts = 0
    search = _CONTROL.search
    for name, value in headers:
        # isprintable() is false for every control character (and for HTAB,
        # non-ASCII spaces, obs-text): only those values need the exact test.
        if not (value.isprintable() and name.isprintable()) and (search(value) or search(name)):
            return name, hosts
        if name == "host":
            hosts += 1
    return None, hosts


@dataclass(slots=True)
class Prepared:
    """A request past the first phase: what `decide` needs, and what slow work
    the credential needs first (None: none)."""

    policy: Policy
    request: RequestView
    path: CanonicalPath
    ip: ClientIP
    rule: Rule
    params: dict[str, str]
    presented: Presented | None
    malformed: bool  # Basic credentials that do not decode to user:password
    work: Work | None
    t: _Trace
    bans: Bans = field(default_factory=lambda: NO_BANS)
    step: str | None = None  # a login endpoint: "start", "callback" or "logout"


# The rule a login endpoint's Prepared carries: it never decides anything.
_LOGIN_RULE = Rule("(login)", 0, PathPattern.parse("/**"), None, None, c.Nobody(), False, ())


def _finish(policy: Policy, rule: Rule | None, d: Decision, raw_target: str) -> Decision:
    """Report mode, decided here so that every caller sees it: a denial becomes
    a forwarded would-deny. Never for a forged header field, which would hand
    the backend a field nobody judged. An identity goes along only if proven
    (a 403 has one); an unparsable path is forwarded as received."""
    if d.allowed or d.reason in NEVER_REPORTED or not (rule.report if rule else policy.report):
        return d
    target = d.path.target if d.path is not None else raw_target
    return replace(d, report=True, target=target, upstream_headers=identity_headers(d.identity))


def _client_ip(policy: Policy, request: RequestView) -> str | None:
    """The client's address for a request refused before it is looked at
    (a 400): for the log and the watch, which counts such refusals too."""
    header = policy.client_ip_header
    try:
        ip = resolve(policy.trusted_proxies, request.peer, request.header_all(header), header)
    except ValueError:
        return None  # not an address (a tool's made-up peer): the 400 all the same
    return ip.address


def _early(policy: Policy, request: RequestView, d: Decision, rule: Rule | None = None) -> Decision:
    return _finish(policy, rule, d, request.target)


def prepare(
    policy: Policy,
    request: RequestView,
    now: float,
    limiter: Limiter,
    *,
    consume: bool = True,
    trace: bool = False,
    bans: Bans = NO_BANS,
) -> Prepared | Decision:
    """Phase one: everything up to the credential. Consumes the IP limits
    (unless `consume=False`). Returns an early Decision or a Prepared.
    `bans`: the watch's bans in force (the client's address is looked up
    after the IP lists, a Basic credential's user before its password is
    checked; `decide` looks up a verified subject)."""
    t = _Trace(True) if trace else _NO_TRACE

    # 0. Header fields that could carry a second, forged field; a target with
    # userinfo (RFC 9110 §4.2.4 forbids it).
    forged, hosts = _field_problems(request.headers)
    if forged is not None:
        if t.on:
            t(f"header {forged[:60]!r} holds a control character: rejected")
        return Decision(
            False,
            400,
            BAD_HEADER,
            client_ip=_client_ip(policy, request),
            detail=f"control character in {forged[:60]}",
        )
    bad_host = (
        "more than one Host field"
        if hosts > 1
        else "no Host"
        if policy.uses_host and request.host is None
        else "a Host that is not host[:port]"
        if request.host is not None and not _HOST.fullmatch(request.host)
        else ""
    )
    if bad_host:
        t(f"host: {bad_host}: rejected (RFC 9112 §3.2)")
        ip_text = _client_ip(policy, request)
        return Decision(False, 400, BAD_HOST, client_ip=ip_text, detail=bad_host, trace=t.done())
    if "@" in request.authority:
        t("the target carries userinfo: rejected")
        d = Decision(
            False,
            400,
            BAD_TARGET,
            client_ip=_client_ip(policy, request),
            detail="userinfo in the target",
            trace=t.done(),
        )
        return _early(policy, request, d)

    # 1. The canonical path: the one we judge and the one we forward.
    try:
        path = canonicalize(request.target)
    except AmbiguousPath as e:
        if t.on:
            t(f"path {request.target[:200]!r} rejected: {e}")
        ip_text = _client_ip(policy, request)
        d = Decision(False, 400, BAD_PATH, client_ip=ip_text, detail=str(e), trace=t.done())
        return _early(policy, request, d)
    if t.on:
        t(f"path {request.target[:200]!r} -> {path.path!r}")

    # 2. Client IP and the IP lists.
    header = policy.client_ip_header
    ip = resolve(policy.trusted_proxies, request.peer, request.header_all(header), header)
    if t.on:
        t(f"client ip {ip.address} (from {ip.via}, peer {request.peer})")
        chain = ", ".join(request.header_all(header))
        if chain and ip.via == header:
            t(f"{header} {chain[:200]!r} walked right to left past trusted proxies")
        elif chain and policy.trusted_proxies.contains(*parse_ip(request.peer)):
            t(f"{header} {chain[:200]!r} unusable: the trusted peer is the client")
        elif chain:
            t(f"{header} {chain[:200]!r} ignored: the peer is not a trusted proxy")
    if policy.block.contains(ip.family, ip.value):
        t("ip: on the block list")
        d = Decision(False, 403, IP_BLOCKED, client_ip=ip.address, path=path, trace=t.done())
        return _early(policy, request, d)
    if policy.allow is not None and not policy.allow.contains(ip.family, ip.value):
        t("ip: not on the allow list")
        d = Decision(False, 403, IP_NOT_ALLOWED, client_ip=ip.address, path=path, trace=t.done())
        return _early(policy, request, d)
    if t.on:
        t(
            "ip: not on the block list; "
            + ("no allow list" if policy.allow is None else "on the allow list")
        )
    ip_key = f"ip:{ip.address}"
    if bans and (ban := _in_force(policy, bans, ip_key, now)) is not None:
        # A banned address gets the block list's very 403 on everything.
        status, reason, extra = _ban_answer(ban, now, t, ip_key)
        d = Decision(
            False,
            status,
            reason,
            client_ip=ip.address,
            path=path,
            headers=extra,
            detail=ban.watch,
            trace=t.done(),
        )
        return _early(policy, request, d)

    # 3. Limits keyed by IP, before any signature is checked.
    for spec in policy.ip_limits:
        verdict = _limit(limiter, spec, ip_key, now, consume, t)
        if not verdict.allowed:
            d = Decision(
                False,
                429,
                RATE_LIMITED,
                client_ip=ip.address,
                path=path,
                headers=_rate_limited(spec, verdict),
                detail=spec.name,
                trace=t.done(),
            )
            return _early(policy, request, d)

    # 3b. A policy that requires client certificates (authn.mtls.required):
    # without a valid one, nothing else is judged. After the IP limits, which
    # count anonymous floods; before the rules, so no path answers otherwise.
    if policy.cert_required:
        cert = request.client_cert
        if cert is None or not cert.valid_at(now):
            problem = "" if cert is None else cert.problem or "not valid now"
            if t.on:
                t(
                    "client certificate: required, "
                    + (f"presented but not valid ({problem})" if problem else "none presented")
                )
            d = Decision(
                False,
                401,
                INVALID_CREDENTIALS if problem else NO_CREDENTIALS,
                client_ip=ip.address,
                path=path,
                challenges=policy.cert_required,
                detail=problem or "no client certificate",
                via="tls" if cert is not None else None,
                trace=t.done(),
            )
            return _early(policy, request, d)
        t("client certificate: required, presented and valid")
    # The login's own endpoints (authn.oidc): answered by the gateway.
    login = policy.login
    if login is not None and (step := login.step_for(path.path)) is not None:
        return _login_step(policy, request, path, ip, step, now, t)

    # 4. The first matching rule.
    host = normalize_host(request.host) if request.host is not None else None
    rule, params = _match(policy, request.method, host, path, t)
    if rule is None:
        status = 404 if policy.default == "not_found" else 403
        if t.on:
            t(f"no rule matches: default {policy.default}")
        d = Decision(False, status, NO_RULE, client_ip=ip.address, path=path, trace=t.done())
        return _early(policy, request, d)

    # The rule's own IP limits also come before credentials (not for hidden
    # rules: a 429 there would tell that the path exists).
    for spec in rule.early_limits:
        verdict = _limit(limiter, spec, ip_key, now, consume, t)
        if not verdict.allowed:
            return _denial(
                policy, request, rule, ip, path, None, t,
                429, RATE_LIMITED, headers=_rate_limited(spec, verdict), detail=spec.name,
            )  # fmt: skip

    # CORS preflights carry no credentials (browsers never send them); a rule
    # may let them through to the backend, which answers them itself.
    if (
        rule.preflight_pass
        and request.method == "OPTIONS"
        and request.header("origin") is not None
        and request.header("access-control-request-method") is not None
    ):
        t("CORS preflight: passed to the backend (cors.preflight: pass)")
        return Decision(
            True,
            0,
            PREFLIGHT,
            rule=rule.name,
            client_ip=ip.address,
            path=path,
            target=path.target,
            trace=t.done(),
        )

    # 5. The credential presented (verified in phase two).
    accept = rule.accept
    jwt = JWT in accept
    try:
        presented, malformed = find(
            policy.issuers if jwt else (),
            policy.api_keys if API_KEY in accept else None,
            policy.basic if BASIC in accept else None,
            request.headers,
            path.query,
            cookies=policy.cookie_issuers if jwt else {},
            params=policy.query_issuers if jwt else {},
            client_cert=request.client_cert if MTLS in accept else None,
            login=policy.login if OIDC in accept else None,
        )
    except Ambiguous as e:
        if t.on:
            t(f"credentials: {e}")
        # RFC 6750 §3.1 invalid_request: a Bearer matter; other schemes have no such code.
        bad = (("Bearer", (("error", "invalid_request"),)),) if JWT in accept else ()
        return _denial(
            policy, request, rule, ip, path, None, t,
            400, INVALID_REQUEST, detail=str(e), challenges=bad,
        )  # fmt: skip
    if bans and presented is not None and presented.kind == BASIC:
        # The user a password is tried for: a throttled or banned one is
        # answered before the password is checked (a right guess would
        # otherwise show as an answer other than the throttle's).
        claimed = subject_key(BASIC, presented.value.partition(":")[0])
        if (ban := _in_force(policy, bans, claimed, now)) is not None:
            status, reason, extra = _ban_answer(ban, now, t, claimed)
            return _denial(
                policy, request, rule, ip, path, presented, t,
                status, reason, headers=extra, detail=ban.watch,
            )  # fmt: skip
    return Prepared(
        policy,
        request,
        path,
        ip,
        rule,
        params,
        presented,
        malformed is not None,
        policy.verifiers[presented.kind].slow_work(presented, now) if presented else None,
        t,
        bans,
    )


def _login_step(
    policy: Policy,
    request: RequestView,
    path: CanonicalPath,
    ip: ClientIP,
    step: str,
    now: float,
    t: _Trace,
) -> Prepared | Decision:
    """A login endpoint, up to its slow work: the provider's metadata for
    START and LOGOUT (when not loaded yet), the code exchange for CALLBACK
    (once the callback proved to belong to this browser's login)."""
    login = policy.login
    assert login is not None
    t(f"login endpoint: {step} ({path.path})")
    work: Work | None = None
    if step == "callback":
        if request.method != "GET":  # not even HEAD: it would spend the code
            return _answered(oidc.not_allowed("GET"), ip, path, t)
        cookie_fields = request.header_all("cookie")
        exchange = oidc.callback(login, path.query, cookie_fields, now)
        if isinstance(exchange, oidc.Answer):
            return _answered(exchange, ip, path, t)
        work = exchange
    else:
        remote = login.issuer.remote
        if remote is not None and not remote.loaded and remote.due():
            work = KeyFetch(remote, None, "cold start")
    return Prepared(policy, request, path, ip, _LOGIN_RULE, {}, None, False, work, t, step=step)


def _answered(answer: oidc.Answer, ip: ClientIP, path: CanonicalPath, t: _Trace) -> Decision:
    """A login endpoint's answer as a Decision (never forwarded, in any mode)."""
    headers = answer.headers
    if answer.location is not None:
        headers = (("Location", answer.location), *headers)
    if t.on:
        t.lines.extend(answer.detail.splitlines())
        t(f"answered {answer.status} ({answer.reason})")
    return Decision(
        False,
        answer.status,
        answer.reason,
        client_ip=ip.address,
        path=path,
        identity=answer.identity,
        headers=headers,
        detail=answer.detail,
        trace=t.done(),
        cookies=answer.cookies,
    )


def _login_decide(p: Prepared, now: float) -> Decision:
    """A login endpoint, after its slow work."""
    login = p.policy.login
    assert login is not None and p.step is not None
    request = p.request
    if p.step == "callback":
        assert isinstance(p.work, CodeExchange)
        answer = oidc.finish(p.work, now)
    elif p.step == "start":
        if request.method not in ("GET", "HEAD"):
            answer = oidc.not_allowed("GET")
        else:
            answer = oidc.start(login, p.path.query, now)
    else:
        answer = oidc.logout(login, request.method, request.headers, now)
    return _answered(answer, p.ip, p.path, p.t)


def _denial(
    policy: Policy,
    request: RequestView,
    rule: Rule,
    ip: ClientIP,
    path: CanonicalPath,
    presented: Presented | None,
    t: _Trace,
    status: int,
    reason: str,
    *,
    identity: Identity | None = None,
    challenges: tuple[Challenge, ...] = (),
    headers: tuple[tuple[str, str], ...] = (),
    detail: str = "",
    claimed: str = "",
    condition: str = "",
    failed: bool = False,
    cookies: tuple[str, ...] = (),
) -> Decision:
    """A denial by a rule: a hidden rule answers as an unknown path. `failed`:
    the credential presented failed verification (the log fingerprints it).
    The identity, condition and credential are the log's, never the answer's."""
    rejected = presented if failed else None
    if rule.hide:
        if t.on:
            t(f"denied ({reason}); the rule is hidden: answering as an unknown path")
        d = Decision(
            False,
            404,
            HIDDEN,
            rule=rule.name,
            client_ip=ip.address,
            path=path,
            identity=identity,
            detail=reason,
            trace=t.done(),
            claimed=claimed,
            condition=condition,
            rejected=rejected,
        )
    else:
        d = Decision(
            False,
            status,
            reason,
            rule=rule.name,
            client_ip=ip.address,
            path=path,
            identity=identity,
            challenges=challenges,
            headers=headers,
            detail=detail,
            via=presented.via if presented is not None else None,
            trace=t.done(),
            claimed=claimed,
            condition=condition,
            rejected=rejected,
            cookies=cookies,
        )
    return _finish(policy, rule, d, request.target)


def decide(prepared: Prepared, now: float, limiter: Limiter, *, consume: bool = True) -> Decision:
    """Phase two: verify the credential, evaluate the rule, its late limits."""
    p = prepared
    if p.step is not None:
        return _login_decide(p, now)
    policy, request, rule, params, path, ip, t = (
        p.policy, p.request, p.rule, p.params, p.path, p.ip, p.t,
    )  # fmt: skip
    presented = p.presented

    # A denial by this rule, for this request (see _denial).
    deny = functools.partial(_denial, policy, request, rule, ip, path, presented, t)

    who: Identity | None = None
    set_cookies: tuple[str, ...] = ()
    forward: tuple[tuple[str, str], ...] = ()
    note = ""  # what became of a session that goes on (refreshed, resealed)
    if p.malformed:
        t("credentials: Basic credentials that do not decode to user:password")
        return deny(
            401,
            INVALID_CREDENTIALS,
            challenges=rule.challenges,
            detail="malformed Basic credentials",
        )
    if presented is None:
        if t.on:
            auth = request.header("authorization")
            scheme = auth.strip().partition(" ")[0][:20] if auth else ""
            t(
                f"credentials: {scheme!r} is not a scheme this rule accepts, treated as none"
                if scheme
                else "credentials: none the rule accepts"
            )
    else:
        verifier = policy.verifiers[presented.kind]
        if t.on:
            t(f"credentials: {verifier.describe(presented)}")
        outcome = verifier.check(presented, now)
        set_cookies, forward = outcome.cookies, outcome.forward
        note = outcome.detail if outcome.identity is not None else ""
        if outcome.unavailable is not None:
            if t.on:
                t(f"credentials: cannot verify, {outcome.detail}")
            retry = str(outcome.unavailable.retry_after)
            why = outcome.unavailable.code  # keys_unavailable, provider_unavailable
            return deny(503, why, headers=(("Retry-After", retry),), detail=outcome.detail)
        if outcome.failed is not None:
            if t.on:
                t(f"credentials: {verifier.label} rejected: {outcome.reason} ({outcome.detail})")
            if presented.via == "cookie" and _to_login(rule, request):
                # An expired or bad session cookie on a page load: back to
                # sign-in, as for no cookie at all (a person cannot fix a cookie).
                t("a browser navigation with a failed session cookie: redirect to the login page")
                assert rule.login_url is not None
                location = _login_location(rule.login_url, path.target)
                return deny(
                    303,
                    LOGIN_REDIRECT,
                    headers=(("Location", location),),
                    detail=outcome.code,
                    cookies=set_cookies,
                )
            if outcome.failed == JWT:
                bearer = (("error", "invalid_token"), ("error_description", outcome.reason))
                return deny(
                    401,
                    INVALID_TOKEN,
                    detail=outcome.code,
                    challenges=challenges_for(policy, rule, bearer),
                    failed=True,
                )
            basic = presented.kind == BASIC
            return deny(
                401,
                INVALID_CREDENTIALS,
                detail=outcome.code,
                challenges=rule.challenges,
                claimed=subject_key(BASIC, presented.value.partition(":")[0]) if basic else "",
                failed=True,
                cookies=set_cookies,
            )
        who = outcome.identity
        assert who is not None
        if t.on:
            where = (
                ""
                if presented.via in ("authorization", API_KEY, "tls")
                else f" (from the {presented.via})"
            )
            t(f"credentials: {verifier.label} for {who.subject!r} from {who.issuer}{where}")
        bans = p.bans
        if bans:
            key = subject_key(who.issuer, who.subject)
            if (ban := _in_force(policy, bans, key, now)) is not None:
                status, reason, extra = _ban_answer(ban, now, t, key)
                return deny(status, reason, identity=who, headers=extra, detail=ban.watch)
    if not rule.allow.holds(who, params):
        if t.on:
            t(f"condition: {describe(rule.allow, who, params)} is false")
            t.lines.extend(c.condition_tree(rule.allow, who, params))
        if who is None:
            if _to_login(rule, request):
                t("a browser navigation without credentials: redirect to the login page")
                assert rule.login_url is not None
                location = _login_location(rule.login_url, path.target)
                return deny(303, LOGIN_REDIRECT, headers=(("Location", location),))
            if not rule.accept:
                # No credentials could help (the rule accepts no kind that is
                # configured), and a 401 without a challenge would be wrong.
                t("no credential kind is accepted here: nobody can qualify")
                return deny(403, FORBIDDEN)
            return deny(401, NO_CREDENTIALS, challenges=rule.challenges)
        # Which branch failed, for the log (computed only when refusing).
        failing = describe(rule.allow, who, params)
        missing = c.missing_scopes(rule.allow, who, params)
        if missing and who.method == JWT:
            bearer = (("error", "insufficient_scope"), ("scope", " ".join(missing)))
            return deny(
                403,
                INSUFFICIENT_SCOPE,
                identity=who,
                detail=" ".join(missing),
                challenges=(("Bearer", bearer),),
                condition=failing,
            )
        return deny(403, FORBIDDEN, identity=who, condition=failing, cookies=set_cookies)
    if t.on:
        t(f"condition: {describe(rule.allow, who, params)} is true")
        t.lines.extend(c.condition_tree(rule.allow, who, params))
    via = presented.via if presented is not None else None
    target = path.target
    if via == "query" and presented is not None:
        name = next(i.query_param for i in presented.issuers if i.query_param)
        query = _without_param(path.query, name)
        target = f"{path.path}?{query}" if query else path.path

    # 6. Limits keyed by subject or header (and every limit of a hidden rule).
    for spec in rule.late_limits:
        verdict = _limit(limiter, spec, _limit_key(spec, request, ip, who), now, consume, t)
        if not verdict.allowed:
            d = Decision(
                False,
                429,
                RATE_LIMITED,
                rule=rule.name,
                client_ip=ip.address,
                path=path,
                identity=who,
                headers=_rate_limited(spec, verdict),
                detail=spec.name,
                trace=t.done(),
                cookies=set_cookies,
            )
            return _finish(policy, rule, d, request.target)

    # 7. Forward.
    t("allowed: forwarding")
    return Decision(
        True,
        0,
        ALLOWED,
        rule=rule.name,
        client_ip=ip.address,
        path=path,
        identity=who,
        upstream_headers=identity_headers(who) + forward,
        target=target,
        via=via,
        detail=note,
        trace=t.done(),
        cookies=set_cookies,
    )


def _both(
    policy: Policy,
    request: RequestView,
    now: float,
    limiter: Limiter,
    trace: bool,
    bans: Bans = NO_BANS,
) -> Decision:
    prepared = prepare(policy, request, now, limiter, trace=trace, bans=bans)
    if isinstance(prepared, Decision):
        return prepared
    return decide(prepared, now, limiter)


def judge(
    policy: Policy,
    request: RequestView,
    now: float,
    store: Store,
    *,
    consume: bool = True,
    trace: bool = False,
    bans: Bans = NO_BANS,
) -> Decision:
    """Both phases in one call, for callers whose slow work is done inline
    (a password check blocks; remote keys were fetched beforehand).

    Rate limits are counted as the gateway counts them: the request is judged
    noting every limit it is counted against, the store judges them all at
    once (nothing counted if one refuses), and only if one refuses, or a trace
    is wanted, is the request judged again with the store's verdicts."""
    seen = Recorder()
    d = _both(policy, request, now, seen, False, bans)
    if not seen.hits:
        return _both(policy, request, now, seen, True, bans) if trace else d
    verdicts = store.hit_all(seen.hits, now, consume)
    if not trace and all(v.allowed for v in verdicts):
        return d
    return _both(policy, request, now, Recorder.told(seen.hits, verdicts), trace, bans)


def describe(cond: c.Condition, who: Identity | None, params: dict[str, str]) -> str:
    """The condition tree with each leaf's value, e.g. `any of(role admin=false, ...)`."""
    kids = cond.children()
    if not kids:
        return f"{cond.describe()}={'true' if cond.holds(who, params) else 'false'}"
    return f"{cond.describe()}({', '.join(describe(k, who, params) for k in kids)})"
