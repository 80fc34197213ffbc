"""`authgate test --coverage`: what a policy's tests leave out.

A rule is reached when it decided a test case (it was the first to match).
Each node of a rule's `allow:` tree has two outcomes, true and false (`anyone`
only true, `nobody` only false); a branch is one outcome of one node, and a
test covers it when, in that test, the node was evaluated and came out so.
Evaluation short-circuits as the gateway's does: an `any:` stops at its first
true alternative, an `all:` at its first false member, and the nodes after
that are not evaluated, so not covered. A condition is evaluated only when
the request gets that far (a bad token is answered before it).

The core is not instrumented: for each case whose trace says the condition
was evaluated, this module asks the core again for the rule, path parameters
and identity that case had (`prepare`, then the credential's verifier, as
`decide` does) and walks the tree itself, checking its answer against the
one the trace records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from authgate.core import conditions as c
from authgate.core.decision import Decision, Prepared, RequestView, prepare
from authgate.core.identity import Identity
from authgate.core.model import Policy, Rule
from authgate.runtime.stores import MemoryStore
from authgate.tools.policytests import Report, run_case, with_test_keys
from authgate.tools.testcases import Case

__all__ = [
    "Branch",
    "Coverage",
    "RuleCoverage",
    "as_dict",
    "as_json",
    "format_coverage",
    "measure",
    "nodes",
    "outcomes_of",
    "percent",
]


@dataclass(frozen=True, slots=True)
class Branch:
    where: str  # the node's place in the rule: allow, allow.any[1], allow.all[0].not
    label: str  # what the node says: role admin, any of, ...
    line: int
    outcome: bool
    covered: bool


@dataclass(frozen=True, slots=True)
class RuleCoverage:
    name: str
    line: int
    reached: int  # cases this rule decided
    evaluated: int  # of those, cases that got as far as its condition
    branches: tuple[Branch, ...]

    @property
    def covered(self) -> int:
        return sum(b.covered for b in self.branches)


@dataclass(frozen=True, slots=True)
class Coverage:
    policy: str  # the policy file, where its rules and conditions are written
    rules: tuple[RuleCoverage, ...]

    @property
    def reached(self) -> int:
        return sum(1 for r in self.rules if r.reached)

    @property
    def branches(self) -> int:
        return sum(len(r.branches) for r in self.rules)

    @property
    def covered(self) -> int:
        return sum(r.covered for r in self.rules)

    @property
    def percent(self) -> float:
        return percent(self.covered, self.branches)


def percent(covered: int, total: int) -> float:
    """Covered branches in percent, 100 for none at all. Rounded down to one
    decimal, so that 100.0 means every branch."""
    return 100.0 if total == 0 else math.floor(covered * 1000 / total) / 10


def outcomes_of(cond: c.Condition) -> tuple[bool, ...]:
    """The outcomes a node can have: `anyone` is never false, `nobody` never true."""
    if isinstance(cond, c.Anyone):
        return (True,)
    if isinstance(cond, c.Nobody):
        return (False,)
    return (True, False)


def _kids(cond: c.Condition, where: str) -> Iterator[tuple[str, c.Condition]]:
    """Each child with its place, named as the policy loader names it."""
    if isinstance(cond, c.Not):
        yield f"{where}.not", cond.item
        return
    step = "any" if isinstance(cond, c.AnyOf) else "all"
    for i, kid in enumerate(cond.children()):
        yield f"{where}.{step}[{i}]", kid


def nodes(cond: c.Condition, where: str = "allow") -> Iterator[tuple[str, c.Condition]]:
    """Every node of the tree with its place, in the order written."""
    yield where, cond
    for place, kid in _kids(cond, where):
        yield from nodes(kid, place)


def _visit(
    cond: c.Condition,
    who: Identity | None,
    params: dict[str, str],
    where: str,
    seen: set[tuple[str, bool]],
) -> bool:
    """The node's value, evaluated as `holds` does (short-circuit), recording
    (place, outcome) of every node evaluated on the way."""
    if isinstance(cond, c.AnyOf | c.AllOf):
        stop = isinstance(cond, c.AnyOf)  # any stops at a true one, all at a false one
        value = not stop
        for place, kid in _kids(cond, where):
            if _visit(kid, who, params, place, seen) == stop:
                value = stop
                break
    elif isinstance(cond, c.Not):
        value = not _visit(cond.item, who, params, f"{where}.not", seen)
    else:
        value = cond.holds(who, params)
    seen.add((where, value))
    return value


def _condition_value(d: Decision) -> bool | None:
    """What the trace says the rule's condition came to; None: not evaluated."""
    for line in d.trace:
        if line.startswith("condition: "):
            return line.endswith(" is true")
    return None


def _identity(policy: Policy, p: Prepared, now: float) -> Identity | None:
    """The identity `decide` evaluated the condition with (the condition is
    only evaluated once the credential, if any, has been verified)."""
    if p.presented is None:
        return None
    return policy.verifiers[p.presented.kind].check(p.presented, now).identity


def _seen(
    policy: Policy, request: RequestView, d: Decision, now: float
) -> tuple[str, set[tuple[str, bool]]] | None:
    """(rule, the branches this request covered), or None when it stopped
    before any condition."""
    told = _condition_value(d)
    if told is None:
        return None
    p = prepare(policy, request, now, MemoryStore(), consume=False)
    if not isinstance(p, Prepared) or p.rule.name != d.rule:
        raise RuntimeError(f"coverage: cannot re-trace the decision of {request.target!r}")
    seen: set[tuple[str, bool]] = set()
    value = _visit(p.rule.allow, _identity(policy, p, now), p.params, "allow", seen)
    if value != told:
        # The walk must agree with the gateway, or the report would be wrong.
        raise RuntimeError(f"coverage: the condition of rule {p.rule.name} re-evaluates to "
                           f"{value}, the decision said {told}")  # fmt: skip
    return p.rule.name, seen


def _rule_coverage(rule: Rule, reached: int, evaluated: int,
                   seen: set[tuple[str, bool]]) -> RuleCoverage:  # fmt: skip
    branches = tuple(
        Branch(where, cond.describe(), cond.line or rule.line, outcome, (where, outcome) in seen)
        for where, cond in nodes(rule.allow)
        for outcome in outcomes_of(cond)
    )
    return RuleCoverage(rule.name, rule.line, reached, evaluated, branches)


def measure(policy: Policy, cases: Iterable[Case],
            now: float | None = None) -> tuple[Report, Coverage]:  # fmt: skip
    """Run the cases as `run_policy` does, and measure what they covered."""
    now = time.time() if now is None else now
    testable, keys = with_test_keys(policy)
    outcomes = tuple(run_case(testable, keys, case, now) for case in cases)
    report = Report(policy.file, outcomes, tuple(r.name for r in policy.rules))
    reached: dict[str, int] = {}
    evaluated: dict[str, int] = {}
    seen: dict[str, set[tuple[str, bool]]] = {}
    for o in outcomes:
        rule = o.explanation.decision.rule
        if rule is None:
            continue
        reached[rule] = reached.get(rule, 0) + 1
        # Every request of the case: `repeat: N` sends N, the last one told.
        request = o.explanation.request
        got = [_seen(testable, request, d, now) for d in (*o.earlier, o.explanation.decision)]
        if any(g is not None for g in got):
            evaluated[rule] = evaluated.get(rule, 0) + 1
        for g in got:
            if g is not None:
                seen.setdefault(g[0], set()).update(g[1])
    rules = tuple(
        _rule_coverage(r, reached.get(r.name, 0), evaluated.get(r.name, 0), seen.get(r.name, set()))
        for r in policy.rules
    )
    return report, Coverage(policy.file, rules)


def _gaps(cov: Coverage) -> list[tuple[int, str, dict[str, Any]]]:
    """(line, text, JSON) of each gap, in the order of the file."""
    out: list[tuple[int, str, dict[str, Any]]] = []
    for r in cov.rules:
        if not r.reached:
            n = len(r.branches)
            text = f"rule {r.name}: no test reaches it ({n} branch{'' if n == 1 else 'es'})"
            out.append((r.line, text, {"kind": "rule", "line": r.line, "rule": r.name}))
            continue
        for b in r.branches:
            if b.covered:
                continue
            never = "true" if b.outcome else "false"
            text = f"rule {r.name}, {b.where} ({b.label}): never {never}"
            gap = {"kind": "branch", "line": b.line, "rule": r.name, "where": b.where,
                   "condition": b.label, "never": b.outcome}  # fmt: skip
            out.append((b.line, text, gap))
    out.sort(key=lambda g: g[0])
    return out


def format_coverage(cov: Coverage) -> str:
    """One summary line, then each gap as file:line."""
    head = (
        f"{cov.policy}: coverage: {cov.reached}/{len(cov.rules)} rules reached, "
        f"{cov.covered}/{cov.branches} branches covered ({cov.percent:.1f}%)"
    )
    lines = [head] + [f"  {cov.policy}:{line}: {text}" for line, text, _ in _gaps(cov)]
    return "\n".join(lines) + "\n"


def as_dict(cov: Coverage) -> dict[str, Any]:
    """The coverage of one policy as a JSON-ready object."""
    return {
        "rules": {"total": len(cov.rules), "reached": cov.reached},
        "branches": {"total": cov.branches, "covered": cov.covered, "percent": cov.percent},
        "gaps": [{"file": cov.policy, **gap} for _, _, gap in _gaps(cov)],
        "by_rule": [
            {
                "rule": r.name,
                "line": r.line,
                "tests": r.reached,
                "evaluated": r.evaluated,
                "branches": len(r.branches),
                "covered": r.covered,
            }
            for r in cov.rules
        ],
    }


def as_json(report: Report, cov: Coverage | None) -> dict[str, Any]:
    """One policy's test results, and its coverage if measured, for tools."""
    out: dict[str, Any] = {
        "policy": report.policy,
        "tests": len(report.outcomes),
        "passed": len(report.outcomes) - len(report.failed),
        "failures": [
            {"test": o.case.name, "where": o.case.where, "problems": list(o.problems)}
            for o in report.failed
        ],
    }
    if cov is not None:
        out["coverage"] = as_dict(cov)
    return out
