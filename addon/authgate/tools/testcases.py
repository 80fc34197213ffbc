"""Policy test cases: the `tests:` list of a policy, or `NAME.tests.yaml` beside it.

Only the format lives here (parsed once into frozen values, every problem a
`PolicyError` at file:line); `policytests` runs the cases through `decide()`.

    tests:
      - name: admin can read the dashboard
        request: {method: GET, path: /api/admin/dashboard, ip: 127.0.0.1}
        token: {sub: root, roles: [admin]}     # optional; omit for anonymous
        expect: {status: 200, rule: admin, headers: {X-Auth-Subject: root}}

`client_cert: {san_dns: [billing.internal]}` describes the certificate the
connection's TLS handshake presented (authn.mtls); `problem: expired` one
that did not verify.
`session:` instead of `token:` sends the session cookie of a login
(`authn.oidc`) whose claims are the ones given.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authgate.core.clientcert import PROBLEMS, normalize_fingerprint
from authgate.core.ipset import parse_ip
from authgate.policy.marks import MarkedDict, MarkedList, PolicyError, load
from authgate.policy.marks import describe_value as _kind
from authgate.policy.values import HEADER_NAME, METHOD, parse_duration

__all__ = [
    "Case",
    "CaseCert",
    "CaseRequest",
    "CaseSession",
    "CaseToken",
    "Expectation",
    "STATUSES",
    "beside",
    "load_beside",
    "parse_cases",
]

# The answers a test can expect: 200 stands for "forwarded to the backend".
STATUSES = frozenset({200, 303, 400, 401, 403, 404, 405, 429, 500, 503})
MAX_REPEAT = 10_000


@dataclass(frozen=True, slots=True)
class CaseRequest:
    method: str
    target: str  # path and optional query, as a client would send it
    headers: tuple[tuple[str, str], ...]  # (name as written, value), in order
    ip: str  # the socket peer the request comes from
    host: str | None


@dataclass(frozen=True, slots=True)
class CaseToken:
    """A token described by its claims; the runner signs it with a throwaway key
    (or, for an opaque token, makes one up and stands in for the issuer's
    introspection answer)."""

    issuer: str | None  # name of the policy's issuer; None: the first one
    ttl: float  # seconds from now to exp; negative for an expired token
    claims: tuple[tuple[str, Any], ...]  # as written; `roles`/`scopes` are placed by the runner
    send_as: str = "header"  # header (Authorization: Bearer), cookie or query
    opaque: bool = False  # an opaque token its (introspecting) issuer answers for


@dataclass(frozen=True, slots=True)
class CaseCert:
    """A client certificate described by its fields: what the TLS handshake
    would have presented (verified, unless `problem` says what was wrong)."""

    subject: str
    cn: tuple[str, ...]
    san_dns: tuple[str, ...]
    san_uri: tuple[str, ...]
    san_email: tuple[str, ...]
    sha256: str | None  # None: made up from the other fields
    problem: str  # "" when it verified


@dataclass(frozen=True, slots=True)
class CaseSession:
    """A session of the policy's OpenID Connect login, described by its claims;
    the runner seals it with a throwaway key."""

    claims: tuple[tuple[str, Any], ...]  # as written; `roles`/`scopes` are placed by the runner


@dataclass(frozen=True, slots=True)
class Expectation:
    status: int  # 200 for forwarded
    rule: str | None
    check_rule: bool  # `rule:` was given (null: no rule may match)
    reason: str | None
    headers: tuple[tuple[str, str | None], ...]  # None: must be absent


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    file: str
    line: int
    request: CaseRequest
    token: CaseToken | None
    expect: Expectation
    repeat: int  # send the request this many times; `expect` is about the last one
    client_cert: CaseCert | None = None
    session: CaseSession | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def beside(policy_file: str | Path) -> Path:
    """`policies/example.yaml` -> `policies/example.tests.yaml`."""
    p = Path(policy_file)
    return p.with_name(p.name.removesuffix(".yaml").removesuffix(".yml") + ".tests.yaml")


def parse_ttl(value: Any) -> float:
    """Seconds from `1h`, `-1h`, `30s`, `90`. Raises ValueError."""
    try:
        return parse_duration(value, signed=True)
    except ValueError:
        raise ValueError(f"ttl must be a duration like 1h, 30s or -1h, not {value!r}") from None


class _Parser:
    def __init__(self, file: str, rules: AbstractSet[str]) -> None:
        self.file = file
        self.rules = rules

    def error(self, line: int, message: str) -> PolicyError:
        return PolicyError(self.file, line, message)

    def mapping(self, value: Any, line: int, where: str) -> MarkedDict:
        if not isinstance(value, MarkedDict):
            raise self.error(line, f"{where} must be a mapping, not {_kind(value)}")
        return value

    def keys(self, d: MarkedDict, allowed: AbstractSet[str], where: str) -> None:
        for key in d:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(
                    d.key_lines[key], f"unknown key {key!r} in {where} (known: {known})"
                )

    def string(self, d: MarkedDict, key: str, where: str) -> str:
        value = d[key]
        if not isinstance(value, str):
            raise self.error(
                d.key_lines[key], f"{where}.{key} must be a string, not {_kind(value)}"
            )
        return value

    def cases(self, value: Any, line: int) -> tuple[Case, ...]:
        if not isinstance(value, MarkedList):
            raise self.error(line, f"tests must be a list, not {_kind(value)}")
        names: set[str] = set()
        out = []
        for item, item_line in zip(value, value.item_lines, strict=False):
            case = self.case(item, item_line)
            if case.name in names:
                raise self.error(case.line, f"duplicate test name {case.name!r}")
            names.add(case.name)
            out.append(case)
        return tuple(out)

    def case(self, value: Any, line: int) -> Case:
        d = self.mapping(value, line, "a test")
        keys = {"name", "request", "token", "client_cert", "session", "expect", "repeat"}
        self.keys(d, keys, "a test")
        for key in ("name", "request", "expect"):
            if key not in d:
                raise self.error(d.line, f"a test needs {key!r}")
        name = self.string(d, "name", "test")
        where = f"test {name!r}"
        request = self.request(d["request"], d.key_lines["request"], f"{where} request")
        token = None
        if d.get("token") is not None:
            token = self.token(d["token"], d.key_lines["token"], f"{where} token")
        cert = None
        if d.get("client_cert") is not None:
            cert = self.cert(d["client_cert"], d.key_lines["client_cert"], f"{where} client_cert")
        session = None
        if d.get("session") is not None:
            if token is not None:
                raise self.error(d.key_lines["session"], f"{where}: a token or a session, not both")
            session = self.session(d["session"], d.key_lines["session"], f"{where} session")
        expect = self.expect(d["expect"], d.key_lines["expect"], f"{where} expect")
        repeat = d.get("repeat", 1)
        if type(repeat) is not int or not 1 <= repeat <= MAX_REPEAT:
            raise self.error(
                d.key_lines.get("repeat", d.line),
                f"{where} repeat must be a whole number from 1 to {MAX_REPEAT}",
            )
        return Case(name, self.file, d.line, request, token, expect, repeat, cert, session)

    def cert(self, value: Any, line: int, where: str) -> CaseCert:
        d = self.mapping(value, line, where)
        lists = ("cn", "san_dns", "san_uri", "san_email")
        self.keys(d, {"subject", "sha256", "problem", *lists}, where)
        values: dict[str, tuple[str, ...]] = {}
        for key in lists:
            items = d.get(key, [])
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise self.error(d.key_lines[key], f"{where}.{key} must be a list of strings")
            values[key] = tuple(items)
        subject = self.string(d, "subject", where) if "subject" in d else "CN=test-client"
        sha256 = None
        if "sha256" in d:
            try:
                sha256 = normalize_fingerprint(self.string(d, "sha256", where))
            except ValueError as e:
                raise self.error(d.key_lines["sha256"], f"{where}: {e}") from None
        problem = self.string(d, "problem", where) if "problem" in d else ""
        if problem and problem not in PROBLEMS:
            raise self.error(
                d.key_lines["problem"],
                f"{where}.problem must be one of {', '.join(PROBLEMS)}, not {problem!r}",
            )
        return CaseCert(subject, sha256=sha256, problem=problem, **values)

    def request(self, value: Any, line: int, where: str) -> CaseRequest:
        d = self.mapping(value, line, where)
        self.keys(d, {"method", "path", "headers", "ip", "host"}, where)
        if "path" not in d:
            raise self.error(d.line, f"{where} needs 'path'")
        method = self.string(d, "method", where) if "method" in d else "GET"
        if not METHOD.match(method):
            raise self.error(d.key_lines["method"], f"method {method!r} must be upper-case")
        target = self.string(d, "path", where)
        ip = self.string(d, "ip", where) if "ip" in d else "127.0.0.1"
        try:
            parse_ip(ip)
        except ValueError as e:
            raise self.error(d.key_lines["ip"], f"{where}.ip: {e}") from None
        host = self.string(d, "host", where) if "host" in d else None
        headers: list[tuple[str, str]] = []
        if "headers" in d:
            h = self.mapping(d["headers"], d.key_lines["headers"], f"{where}.headers")
            for hname, hvalue in h.items():
                hline = h.key_lines[hname]
                if not HEADER_NAME.match(hname):
                    raise self.error(hline, f"{hname!r} is not a header name")
                values = hvalue if isinstance(hvalue, list) else [hvalue]
                for v in values:
                    if not isinstance(v, str):
                        raise self.error(
                            hline,
                            f"header {hname} must be a string or a list of strings, not {_kind(v)}",
                        )
                    headers.append((hname, v))
        return CaseRequest(method, target, tuple(headers), ip, host)

    def token(self, value: Any, line: int, where: str) -> CaseToken:
        d = self.mapping(value, line, where)
        issuer = self.string(d, "issuer", where) if "issuer" in d else None
        ttl = 3600.0
        if "ttl" in d:
            try:
                ttl = parse_ttl(d["ttl"])
            except ValueError as e:
                raise self.error(d.key_lines["ttl"], f"{where}: {e}") from None
        send_as = self.string(d, "send_as", where) if "send_as" in d else "header"
        if send_as not in ("header", "cookie", "query"):
            raise self.error(d.key_lines["send_as"], f"{where} send_as must be header, cookie "
                             f"or query, not {send_as!r}")  # fmt: skip
        opaque = d.get("opaque", False)
        if not isinstance(opaque, bool):
            raise self.error(d.key_lines["opaque"], f"{where} opaque must be true or false")
        claims = self.claims(d, where, skip=("issuer", "ttl", "send_as", "opaque"))
        return CaseToken(issuer, ttl, claims, send_as, opaque)

    def session(self, value: Any, line: int, where: str) -> CaseSession:
        return CaseSession(self.claims(self.mapping(value, line, where), where))

    def claims(
        self, d: MarkedDict, where: str, skip: tuple[str, ...] = ()
    ) -> tuple[tuple[str, Any], ...]:
        """A token's or a session's claims: JSON values; roles and scopes lists
        of strings."""
        claims = []
        for key, claim in d.items():
            if key in skip:
                continue
            problem = _not_json(claim)
            if problem:
                raise self.error(d.key_lines[key], f"{where} claim {key!r}: {problem}")
            if key in ("roles", "scopes") and not (
                isinstance(claim, list) and all(isinstance(x, str) for x in claim)
            ):
                raise self.error(d.key_lines[key], f"{where} {key} must be a list of strings")
            claims.append((key, _plain(claim)))
        return tuple(claims)

    def expect(self, value: Any, line: int, where: str) -> Expectation:
        d = self.mapping(value, line, where)
        self.keys(d, {"status", "rule", "reason", "headers"}, where)
        if "status" not in d:
            raise self.error(d.line, f"{where} needs 'status'")
        status = d["status"]
        if type(status) is not int or status not in STATUSES:
            raise self.error(
                d.key_lines["status"],
                f"{where} status must be one of {', '.join(map(str, sorted(STATUSES)))} "
                f"(200: forwarded), not {status!r}",
            )
        rule = None
        if "rule" in d and d["rule"] is not None:
            rule = self.string(d, "rule", where)
            if rule not in self.rules:
                raise self.error(
                    d.key_lines["rule"], f"{where} names rule {rule!r}, which the policy lacks"
                )
        reason = self.string(d, "reason", where) if "reason" in d else None
        headers: list[tuple[str, str | None]] = []
        if "headers" in d:
            h = self.mapping(d["headers"], d.key_lines["headers"], f"{where}.headers")
            for hname, hvalue in h.items():
                if hvalue is not None and not isinstance(hvalue, str):
                    raise self.error(
                        h.key_lines[hname],
                        f"expected header {hname} must be a string (or null: absent), "
                        f"not {_kind(hvalue)}",
                    )
                headers.append((hname, hvalue))
        return Expectation(status, rule, "rule" in d, reason, tuple(headers))


def _not_json(value: Any) -> str | None:
    """Why a YAML value cannot be a JWT claim, or None."""
    if value is None or isinstance(value, str | bool | int | float):
        return None
    if isinstance(value, list):
        return next((p for p in map(_not_json, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(_not_json, value.values()) if p), None)
    return f"{_kind(value)} is not a JSON value (quote dates and times)"


def _plain(value: Any) -> Any:
    """Marked YAML containers -> plain dicts and lists (claims are JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def parse_cases(value: Any, line: int, file: str, rules: AbstractSet[str]) -> tuple[Case, ...]:
    """The value of a `tests:` key -> cases. Raises PolicyError at file:line.
    `rules` are the policy's rule names (an expectation may only name those)."""
    return _Parser(file, rules).cases(value, line)


def load_beside(policy_file: str | Path, rules: AbstractSet[str]) -> tuple[Case, ...]:
    """The cases in `NAME.tests.yaml` beside the policy; () when there is none."""
    path = beside(policy_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    except OSError as e:
        raise PolicyError(str(path), None, f"cannot read the tests: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(str(path), None, "the tests are not UTF-8 text") from None
    doc = load(text, str(path))
    p = _Parser(str(path), rules)
    top = p.mapping(doc, 1, "a tests file")
    p.keys(top, {"tests"}, "a tests file")
    if "tests" not in top:
        raise p.error(top.line, "a tests file needs 'tests'")
    return p.cases(top["tests"], top.key_lines["tests"])
