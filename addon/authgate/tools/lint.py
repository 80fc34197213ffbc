"""`authgate check`: warnings about a policy that loads but may not mean what
its author thinks. Every check is exact (no heuristics) and pure: it reads
the compiled Policy, never a request.

Rules are compared as request sets: path patterns segment by segment
(literal, one-segment wildcard `{p}`/`*`, trailing `**`), methods (absent:
all) and host (absent: any).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

from authgate.core import conditions as c
from authgate.core.model import (
    TRUSTED_BY_BACKENDS,
    LimitSpec,
    Policy,
    Rule,
    credentials_in_clear,
    secrets_readable_by_others,
)
from authgate.core.paths import PathPattern

__all__ = [
    "Finding",
    "covers",
    "fill_ins",
    "lint",
    "overlaps",
    "rule_covers",
    "rules_overlap",
]

_PARAM_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
FILL_IN = "FILL-IN"  # what `authgate import openapi` leaves for the user to fill in


@dataclass(frozen=True, slots=True)
class Finding:
    file: str
    line: int | None
    code: str  # stable, for tools: shadowed, anyone-overlaps, ...
    message: str
    severity: str = "warning"  # or "error" (the policy does not load)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.severity}: {self.message} [{self.code}]"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
        }


# --- request sets ------------------------------------------------------------


def _lengths_within(a: PathPattern, b: PathPattern) -> bool:
    """Every segment count `b` accepts, `a` accepts too."""
    na, nb = len(a.parts), len(b.parts)
    if b.rest:
        return a.rest and na <= nb
    return nb == na or (a.rest and na <= nb)


def covers(a: PathPattern, b: PathPattern) -> bool:
    """Every canonical path `b` matches, `a` matches too."""
    if not _lengths_within(a, b):
        return False
    # a's fixed positions all lie within b's fixed ones (na <= nb).
    return all(x is None or x == y for x, y in zip(a.parts, b.parts, strict=False))


def overlaps(a: PathPattern, b: PathPattern) -> bool:
    """Some canonical path matches both."""
    na, nb = len(a.parts), len(b.parts)
    if not (na == nb or (a.rest and na <= nb) or (b.rest and nb <= na)):
        return False
    return all(x is None or y is None or x == y for x, y in zip(a.parts, b.parts, strict=False))


def rule_covers(a: Rule, b: Rule) -> bool:
    """`a` matches every request `b` matches (path, methods and host)."""
    methods = a.methods is None or (b.methods is not None and b.methods <= a.methods)
    host = a.host is None or a.host == b.host
    return methods and host and covers(a.pattern, b.pattern)


def rules_overlap(a: Rule, b: Rule) -> bool:
    """Some request matches both rules' `match`."""
    methods = a.methods is None or b.methods is None or bool(a.methods & b.methods)
    host = a.host is None or b.host is None or a.host == b.host
    return methods and host and overlaps(a.pattern, b.pattern)


def _where(rule: Rule) -> str:
    return f"rule {rule.name!r} (line {rule.line})"


# --- the checks ------------------------------------------------------------------


def _shadowed(policy: Policy) -> tuple[list[Finding], set[str]]:
    out, names = [], set()
    for j, later in enumerate(policy.rules):
        earlier = next((r for r in policy.rules[:j] if rule_covers(r, later)), None)
        if earlier is not None:
            names.add(later.name)
            out.append(
                Finding(
                    policy.file,
                    later.line,
                    "shadowed",
                    f"rule {later.name!r} can never match: {_where(earlier)} comes first "
                    f"and matches every request it would",
                )
            )
    return out, names


def _anyone_overlaps(policy: Policy, shadowed: set[str]) -> list[Finding]:
    out = []
    for i, open_rule in enumerate(policy.rules):
        if not isinstance(open_rule.allow, c.Anyone) or open_rule.name in shadowed:
            continue
        for later in policy.rules[i + 1 :]:
            if isinstance(later.allow, c.Anyone) or not rules_overlap(open_rule, later):
                continue
            out.append(
                Finding(
                    policy.file,
                    open_rule.line,
                    "anyone-overlaps",
                    f"rule {open_rule.name!r} allows anyone on requests that the later, "
                    f"stricter {_where(later)} also covers; first match wins, so "
                    f"{later.name!r} is never asked about them",
                )
            )
    return out


def _parameters(policy: Policy) -> list[Finding]:
    out = []
    for rule in policy.rules:
        unused = sorted(rule.pattern.param_names - c.params_named(rule.allow))
        for name in unused:
            out.append(
                Finding(
                    policy.file,
                    rule.line,
                    "unused-parameter",
                    f"rule {rule.name!r}: path parameter {{{name}}} is not used by the "
                    f"condition; write * if any segment will do",
                )
            )
        # A parameter reference where none is substituted: role and scope
        # values and claim names are compared as written.
        for cond in rule.allow.walk():
            if isinstance(cond, c.HasRole | c.HasScope):
                kind, text = ("role", cond.role) if isinstance(cond, c.HasRole) else (
                    "scope", cond.scope)  # fmt: skip
            elif isinstance(cond, c.Claim):
                kind, text = "claim name", ".".join(cond.path)
            else:
                continue
            for ref in _PARAM_REF.findall(text):
                out.append(
                    Finding(
                        policy.file,
                        rule.line,
                        "parameter-not-substituted",
                        f"rule {rule.name!r}: {kind} {text!r} names {{{ref}}}, but only claim "
                        f"values (equals, in, contains) take path parameters; this compares "
                        f"the literal text",
                    )
                )
    return out


def _hidden(policy: Policy) -> list[Finding]:
    out = []
    for i, rule in enumerate(policy.rules):
        if not rule.hide:
            continue
        if any(not r.hide and r.pattern.text == rule.pattern.text for r in policy.rules[:i]):
            # An earlier rule answers on the very same paths (for other methods,
            # say): their existence is no secret, and hiding keeps the rest 404.
            continue
        if policy.default == "forbidden":
            out.append(
                Finding(
                    policy.file,
                    rule.line,
                    "hidden-distinguishable",
                    f"rule {rule.name!r} is hidden, but with default: forbidden an unknown "
                    f"path gets 403 and its denials 404, which tells its paths exist; use "
                    f"default: not_found",
                )
            )
        for later in policy.rules[i + 1 :]:
            if not later.hide and covers(later.pattern, rule.pattern):
                out.append(
                    Finding(
                        policy.file,
                        rule.line,
                        "hidden-distinguishable",
                        f"rule {rule.name!r} is hidden, but the paths around it belong to "
                        f"{_where(later)} ({later.pattern.text}), which does not answer with "
                        f"the unknown-path 404; a caller who gets that 404 here and another "
                        f"answer next door learns the hidden paths exist",
                    )
                )
                break
    return out


def at_least_as_strict(k: LimitSpec, l_: LimitSpec) -> bool:
    """Every stream of requests that `k` lets through, `l_` lets through too
    (compared in the GCRA terms the limiter counts in)."""
    return l_.rate.emission_ns <= k.rate.emission_ns and l_.rate.tolerance_ns >= k.rate.tolerance_ns


def _same_key(a: LimitSpec, b: LimitSpec) -> bool:
    return a.key == b.key and a.header == b.header


def _limits(policy: Policy, shadowed: set[str]) -> list[Finding]:
    out = []

    def never(spec: LimitSpec, why: str) -> None:
        out.append(
            Finding(
                policy.file, spec.line, "limit-never-triggers",
                f"limit {spec.name!r} ({spec.rate}) can never trigger: {why}",
            )
        )  # fmt: skip

    def dominated(spec: LimitSpec, before: Iterable[LimitSpec]) -> bool:
        for k in before:
            if _same_key(k, spec) and at_least_as_strict(k, spec):
                never(
                    spec,
                    f"every request it counts has passed limit {k.name!r} ({k.rate}, line "
                    f"{k.line}) first, with the same key, and that one is at least as strict",
                )
                return True
        return False

    for i, spec in enumerate(policy.ip_limits):
        dominated(spec, policy.ip_limits[:i])
    for i, spec in enumerate(policy.late_limits):
        dominated(spec, policy.late_limits[:i])
    for rule in policy.rules:
        if rule.name in shadowed:
            continue  # the shadowed warning says it all
        early = [s for s in rule.limits if s.key == "ip" and not rule.hide]
        late = [s for s in rule.limits if not (s.key == "ip" and not rule.hide)]
        for i, spec in enumerate(early):
            dominated(spec, [*policy.ip_limits, *early[:i]])
        for i, spec in enumerate(late):
            if isinstance(rule.allow, c.Nobody):
                never(
                    spec,
                    f"rule {rule.name!r} allows nobody, and "
                    + ("a hidden rule's limits" if rule.hide else "subject and header limits")
                    + " count only allowed requests",
                )
                continue
            before = [*policy.late_limits, *late[:i]]
            if spec.key == "ip":  # a hidden rule's ip limit: global ip limits came first
                before = [*policy.ip_limits, *before]
            dominated(spec, before)
    return out


def _in_clear(policy: Policy, listen: str | None) -> list[Finding]:
    if listen is None:
        return []
    return [
        Finding(
            policy.file,
            line,
            "credentials-in-clear",
            f"{kind} are accepted on the plain-HTTP listener {listen}: anyone on the path "
            f"can read and replay them; listen with TLS",
        )
        for kind, line in credentials_in_clear(policy, listen)
    ]


def _weak_hashes(policy: Policy) -> list[Finding]:
    basic = policy.basic
    if basic is None:
        return []
    return [
        Finding(
            policy.file,
            basic.line or None,
            "weak-password-hash",
            f"user {user!r} in {basic.file} has bcrypt cost {cost:02d}: cheap to guess if the "
            f"file leaks; set the password again with `htpasswd -B -C 10 FILE {user}`",
        )
        for user, cost in basic.weak()
    ]


def _readable_secrets(policy: Policy) -> list[Finding]:
    return [
        Finding(
            policy.file,
            line or None,
            "secret-readable",
            f"the client secret file {file} can be read by other users (mode {mode:03o}): "
            f"anyone on the machine can introspect as the gateway; chmod 600 {file}",
        )
        for file, mode, line in secrets_readable_by_others(policy)
    ]


def _nobody_qualifies(policy: Policy) -> list[Finding]:
    """Rules that want an identity no configured credential can give."""
    out = []
    for rule in policy.rules:
        if rule.accept or isinstance(rule.allow, c.Nobody):
            continue
        params = {name: "" for name in rule.pattern.param_names}
        if not rule.allow.holds(None, params):
            out.append(
                Finding(
                    policy.file,
                    rule.line,
                    "nobody-qualifies",
                    f"rule {rule.name} needs an identity, but the policy configures no "
                    f"credential it accepts (authn): every request to it gets 403",
                )
            )
    return out


def _never_holds(cond: c.Condition) -> str | None:
    """Why `cond` can hold for nobody, found exactly (`nobody`, `not anyone`,
    an `all` holding `nobody` or both X and `not X`, an `any` whose every
    branch never holds), or None."""
    if isinstance(cond, c.Nobody):
        return "it is nobody"
    if isinstance(cond, c.Not) and isinstance(cond.item, c.Anyone):
        return "not anyone"
    if isinstance(cond, c.AllOf):
        for item in cond.items:
            if isinstance(item, c.Not) and item.item in cond.items:
                return f"it needs both {item.item.describe()} and not {item.item.describe()}"
        for item in cond.items:
            if _never_holds(item):
                return f"it needs {item.describe()} (line {item.line}), which never holds"
    if isinstance(cond, c.AnyOf) and all(_never_holds(item) for item in cond.items):
        return "none of its branches can hold"
    return None


def _impossible(policy: Policy) -> list[Finding]:
    """Conditions that hold for nobody, where `nobody` was not written: the
    outermost such condition of each rule."""
    out = []
    for rule in policy.rules:
        todo = [rule.allow]
        while todo:
            cond = todo.pop(0)
            why = None if isinstance(cond, c.Nobody) else _never_holds(cond)
            if why is None:
                todo.extend(cond.children())
                continue
            out.append(
                Finding(
                    policy.file,
                    cond.line or rule.line,
                    "never-holds",
                    f"rule {rule.name!r}: its condition ({cond.describe()} ...) can never "
                    f"hold: {why}; write nobody if that is meant",
                )
            )
    return out


def _host_rules(policy: Policy) -> list[Finding]:
    return [
        Finding(
            policy.file,
            rule.line,
            "host-needs-keep-host-header",
            f"rule {rule.name} matches on host: in reverse mode mitmproxy replaces the "
            f"client's Host, so run the gateway with --set keep_host_header=true "
            f"(authgate run refuses to start without it)",
        )
        for rule in policy.rules
        if rule.host is not None
    ]


def _trusted_headers(policy: Policy) -> list[Finding]:
    """Fields that services commonly take as proven, which this policy lets
    clients send to the backend (`strip_headers.keep`)."""
    kept = [name for name in TRUSTED_BY_BACKENDS if name not in policy.strip_headers]
    return [
        Finding(
            policy.file,
            policy.strip_headers_line or None,
            "forwards-trusted-header",
            f"the backend receives {name} as the client sent it (strip_headers.keep): "
            "a backend that takes it as proven can be told anything; keep it only if "
            "the backend ignores it",
        )
        for name in kept
    ]


def _watch(policy: Policy) -> list[Finding]:
    """Watches that cannot count anything, or that act on the first slip."""
    out = []
    for w in policy.watch:
        where = f"watch {w.name!r}"
        if w.key == "subject" and w.counts == "failed_credentials" and policy.basic is None:
            out.append(
                Finding(
                    policy.file, w.line, "watch-never-counts",
                    f"{where} can never count: of the failed credentials only a Basic one "
                    "names a subject (its user), and the policy has no Basic users; "
                    "count by ip",
                )
            )  # fmt: skip
        elif w.key == "subject" and not policy.verifiers:
            out.append(
                Finding(
                    policy.file, w.line, "watch-never-counts",
                    f"{where} can never count: no credential is configured, so no denial "
                    "has a subject; count by ip",
                )
            )  # fmt: skip
        if w.action != "none" and w.counts != "failed_credentials" and w.threshold <= 2:
            out.append(
                Finding(
                    policy.file, w.line, "watch-hair-trigger",
                    f"{where} acts ({w.acts}) on {w.threshold} {w.counts.replace('_', ' ')}: "
                    "a typo or a stale bookmark is enough; a threshold of 10 or more tells "
                    "probing from a slip",
                )
            )  # fmt: skip
    return out


def fill_ins(file: str, text: str) -> list[Finding]:
    """An error for each line of a policy (or tests) file that still holds a
    FILL-IN placeholder (`authgate import openapi` writes them) in a key or
    value; comments do not count."""
    if FILL_IN not in text:
        return []
    lines: dict[int, str] = {}  # the first placeholder on each line
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, yaml.ScalarToken) and FILL_IN in token.value:
                lines.setdefault(token.start_mark.line + 1, token.value)
    except yaml.YAMLError:
        pass  # the loader reports it
    return [
        Finding(
            file,
            line,
            "fill-in",
            f"{value!r} is a placeholder: put in your value (an issuer, audience, key "
            f"digest, user or test credential)",
            "error",
        )
        for line, value in sorted(lines.items())
    ]


def lint(policy: Policy, listen: str | None = None) -> list[Finding]:
    """Every warning for a loaded policy, in file order.
    `listen`: the gateway's listener address, when known."""
    shadow_findings, shadowed = _shadowed(policy)
    found = [
        *shadow_findings,
        *_anyone_overlaps(policy, shadowed),
        *_parameters(policy),
        *_hidden(policy),
        *_limits(policy, shadowed),
        *_in_clear(policy, listen),
        *_weak_hashes(policy),
        *_readable_secrets(policy),
        *_nobody_qualifies(policy),
        *_impossible(policy),
        *_host_rules(policy),
        *_trusted_headers(policy),
        *_watch(policy),
    ]
    return sorted(found, key=lambda f: (f.line or 0, f.code))
