"""`authgate learn`: a starting policy proposed from recorded traffic.

Reads what `authgate replay` reads (a mitmproxy flow file or HAR, with the
same reader) and a base policy that supplies `authn` and any rules to keep.
From the requests the backend answered 2xx or 3xx it proposes one rule per
route and method set, with the tightest condition of this ladder that every
one of those requests met (so every request seen succeeding stays allowed):

    {claim: sub, equals: "{id}"}   ownership: the parameter was the caller's sub each time
    {role: R} or {scope: S}        every caller had it (the rarest such grant in the capture)
    {any: [ownership, {role: R}]}  ownership, or a grant every other caller had
    authenticated                  every request carried credentials that verify
    anyone                         some request carried none (or some that do not verify)

Identities come from the core, not from the capture's identity headers: each
request is judged by the base's `authn` behind a probe rule that lets anyone
in, so a credential is verified exactly as the gateway verifies it, as of the
request's recorded time. A credential that does not verify is no identity.

Templating (see `id_kind`): a segment becomes a parameter when it looks like an
identifier (digits, a UUID, hex of 8+ characters with a digit, a letters-and-
digits token of 16+ characters), equals the subject of a caller seen in the
capture, or sits among more than `max_literals` distinct sibling values.

The proposal is written in `mode: report`, checked before it is written (it
must load, and allow every successful request it learnt from), and explained
on stderr: how many requests support each rule, and why not a stronger one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from authgate.core import conditions as c
from authgate.core.decision import (
    INTROSPECTION_UNAVAILABLE,
    INVALID_REQUEST,
    KEYS_UNAVAILABLE,
    judge,
)
from authgate.core.identity import Identity
from authgate.core.ipset import IPSet
from authgate.core.model import Policy, Rule
from authgate.core.paths import AmbiguousPath, PathPattern, canonicalize
from authgate.policy.load import parse_policy
from authgate.policy.marks import PolicyError
from authgate.runtime.stores import MemoryStore
from authgate.tools.replay import CaptureError, Recorded, read_capture

__all__ = ["MAX_LITERALS", "Learnt", "id_kind", "learn", "main"]

MAX_LITERALS = 10  # more distinct sibling values than this: a parameter
PARAM = "\x00"  # the trie key of a parameter: no canonical segment holds NUL

_DIGITS = re.compile(r"^[0-9]+\Z")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
_HEX = re.compile(r"^(?=.*[0-9])[0-9a-fA-F]{8,}\Z")
_TOKEN = re.compile(r"^(?=.*[0-9])(?=.*[A-Za-z])[A-Za-z0-9_-]{16,}\Z")


def id_kind(segment: str, subjects: AbstractSet[str] = frozenset()) -> str | None:
    """Why a (decoded) path segment is an identifier, or None if it reads as
    a name. A segment a pattern literal cannot spell (`*`) is one too."""
    if _DIGITS.match(segment):
        return "numbers"
    if _UUID.match(segment):
        return "UUIDs"
    if _HEX.match(segment):
        return "hex ids"
    if _TOKEN.match(segment):
        return "opaque ids"
    if segment in subjects:
        return "callers' subjects"
    if "*" in segment:
        return "values a pattern cannot spell"
    return None


# --- what was seen ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the backend answered 2xx/3xx, as learning needs it."""

    record: Recorded
    when: float
    method: str
    encoded: tuple[str, ...]  # the canonical path's segments, as the backend got them
    segments: tuple[str, ...]  # decoded, as patterns match them
    who: Identity | None
    rejected: str  # why its credential did not verify; "" if it did or there was none


@dataclass(slots=True)
class Identities:
    """How the capture's credentials fared against the base's authn."""

    valid: int = 0
    none: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by code (expired, ...)
    # Distinct callers (issuer, subject) holding each role and scope, for rarity.
    holders: dict[tuple[str, str], set[tuple[str, str]]] = field(default_factory=dict)
    subjects: set[str] = field(default_factory=set)
    gateway_headers: int = 0  # X-Auth-Subject with no credential: a stripped capture


def _probe(base: Policy) -> Policy:
    """The base's authn behind one rule that lets anyone in, and nothing else
    that could answer first (IP lists, limits): judging a request with it
    verifies whatever credential it carries, the way the gateway does."""
    rule = Rule(
        name="(learn)",
        line=0,
        pattern=PathPattern.parse("/**"),
        methods=None,
        host=None,
        allow=c.Anyone(),
        hide=False,
        limits=(),
        accept=frozenset(base.verifiers),
    )
    return dataclasses.replace(
        base, rules=(rule,), limits=(), block=IPSet.empty(), allow=None, mode="enforce",
        mode_override="",
    )  # fmt: skip


def _grants(who: Identity) -> set[tuple[str, str]]:
    return {("role", r) for r in who.roles} | {("scope", s) for s in who.scopes}


def verify(base: Policy, records: Sequence[Recorded]) -> tuple[list[Seen], Identities, int]:
    """The successful requests with their callers; -> (seen, identities, the
    number of successful requests whose path the gateway refuses)."""
    probe = _probe(base)
    limiter = MemoryStore()
    now = time.time()
    ids = Identities()
    seen: list[Seen] = []
    refused = 0
    for r in records:
        if r.status is None or not 200 <= r.status < 400:
            continue
        try:
            path = canonicalize(r.request.target)
        except AmbiguousPath:
            refused += 1
            continue
        when = r.timestamp if r.timestamp is not None else now
        d = judge(probe, r.request, when, limiter, consume=False)
        rejected = ""
        if not d.allowed:
            # A credential that failed (401), one presented twice (400), an
            # issuer whose keys cannot be had or an opaque token nobody was
            # asked about (503): no identity.
            rejected = {
                INVALID_REQUEST: "sent two ways",
                KEYS_UNAVAILABLE: "no keys",
                INTROSPECTION_UNAVAILABLE: "not introspected",
            }.get(d.reason, d.detail or d.reason)
            ids.rejected[rejected] += 1
        who = d.identity if d.allowed else None
        if who is None:
            ids.none += 1 if not rejected else 0
            if r.request.header("x-auth-subject") is not None and not rejected:
                ids.gateway_headers += 1
        else:
            ids.valid += 1
            ids.subjects.add(who.subject)
            for g in _grants(who):
                ids.holders.setdefault(g, set()).add((who.issuer, who.subject))
        encoded = tuple(s for s in path.path.split("/") if s)
        seen.append(Seen(r, when, r.request.method, encoded, path.segments, who, rejected))
    return seen, ids, refused


# --- routes ----------------------------------------------------------------------


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)  # by decoded literal, or PARAM
    spelled: dict[str, str] = field(default_factory=dict)  # decoded literal -> encoded
    seen: list[Seen] = field(default_factory=list)  # requests whose path ends here
    why: str = ""  # why the PARAM child is a parameter
    values: int = 0  # how many distinct values it took


def _merge(into: _Node, other: _Node) -> None:
    into.seen.extend(other.seen)
    into.spelled.update(other.spelled)
    for key, child in other.children.items():
        if key in into.children:
            _merge(into.children[key], child)
        else:
            into.children[key] = child


def _template(node: _Node, subjects: AbstractSet[str], max_literals: int) -> None:
    """Top down: merge this node's identifier children into one parameter
    child (so the next level sees their subtrees as one), then recurse."""
    kinds = {key: id_kind(key, subjects) for key in node.children}
    ids = [key for key, kind in kinds.items() if kind]
    if len(kinds) > max_literals:
        why = (
            ", ".join(sorted({k for k in kinds.values() if k}))
            if len(ids) == len(kinds)
            else f"more than {max_literals} distinct values"
        )
        ids = list(kinds)
    else:
        why = ", ".join(sorted({k for k in kinds.values() if k}))
    if ids:
        param = _Node()
        for key in ids:
            _merge(param, node.children.pop(key))
            node.spelled.pop(key, None)
        node.children[PARAM] = param
        node.why, node.values = why, len(ids)
    for child in node.children.values():
        _template(child, subjects, max_literals)


@dataclass(frozen=True, slots=True)
class Route:
    parts: tuple[str | None, ...]  # encoded literal, or None for a parameter
    names: tuple[str, ...]  # the parameters' names, in order
    why: tuple[tuple[str, int], ...]  # per parameter: (why, distinct values)
    seen: tuple[Seen, ...]

    @property
    def template(self) -> str:
        names = iter(self.names)
        return "/" + "/".join(p if p is not None else "{" + next(names) + "}" for p in self.parts)

    @property
    def params(self) -> list[tuple[int, str]]:
        """(segment index, name) of each parameter."""
        index = [i for i, p in enumerate(self.parts) if p is None]
        return list(zip(index, self.names, strict=True))


def param_names(parts: Sequence[str | None]) -> tuple[str, ...]:
    """`id` for a route's only parameter; with several, each after the
    literal before it (`/users/{user_id}/orders/{order_id}`), unique."""
    alone = sum(1 for p in parts if p is None) == 1
    names: list[str] = []
    for i, p in enumerate(parts):
        if p is not None:
            continue
        before = parts[i - 1] if i else None
        stem = re.sub(r"[^a-z0-9]+", "_", (before or "").lower()).strip("_")
        if len(stem) > 3 and stem.endswith("s"):
            stem = stem[:-1]  # users -> user_id; a guess, and only a name
        base = "id" if alone or not stem or stem[0].isdigit() else f"{stem}_id"
        name, n = base, 2
        while name in names:
            name, n = f"{base}{n}", n + 1
        names.append(name)
    return tuple(names)


def routes(seen: Iterable[Seen], subjects: AbstractSet[str], max_literals: int) -> list[Route]:
    """The routes seen, templated, in an order where no rule shadows a later
    one: at each level, literal segments (sorted) before the parameter."""
    root = _Node()
    for s in seen:
        node = root
        for enc, dec in zip(s.encoded, s.segments, strict=True):
            node.spelled.setdefault(dec, enc)
            node = node.children.setdefault(dec, _Node())
        node.seen.append(s)
    _template(root, subjects, max_literals)
    out: list[Route] = []

    def walk(node: _Node, parts: list[str | None], why: list[tuple[str, int]]) -> None:
        if node.seen:
            out.append(Route(tuple(parts), param_names(parts), tuple(why), tuple(node.seen)))
        for key in sorted(k for k in node.children if k != PARAM):
            walk(node.children[key], [*parts, node.spelled[key]], why)
        if PARAM in node.children:
            walk(node.children[PARAM], [*parts, None], [*why, (node.why, node.values)])

    walk(root, [], [])
    return out


# --- conditions -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inferred:
    allow: Any  # the `allow:` value, as YAML data
    shown: str  # the condition in words
    why: str  # what supports it, and why not a stronger one


def _owner(s: Seen, index: int) -> bool:
    return s.who is not None and s.who.claims.get("sub") == s.segments[index]


def _grant_text(g: tuple[str, str]) -> str:
    return f"{g[0]} {g[1]}"


def _rarest(common: AbstractSet[tuple[str, str]], ids: Identities) -> tuple[str, str]:
    """The common grant the fewest callers in the capture hold: the one that
    says most about who may come here (roles before scopes on a tie)."""
    return min(common, key=lambda g: (len(ids.holders.get(g, ())), g[0] != "role", g[1]))


def _common(whos: Iterable[Identity]) -> set[tuple[str, str]]:
    sets = [_grants(w) for w in whos]
    return set.intersection(*sets) if sets else set()


def _callers(whos: Iterable[Identity], most: int = 4) -> str:
    """`alice (role user), writer (scope reports:write)`: who came, with what."""
    by: dict[str, set[tuple[str, str]]] = {}
    for w in whos:
        by.setdefault(w.subject, set()).update(_grants(w))
    shown = [
        f"{sub} ({', '.join(_grant_text(g) for g in sorted(gs)) or 'no roles or scopes'})"
        for sub, gs in sorted(by.items())[:most]
    ]
    return ", ".join(shown) + (f" and {len(by) - most} more" if len(by) > most else "")


def _all(n: int) -> str:
    return "the one request" if n == 1 else f"all {n}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def infer(seen: Sequence[Seen], params: Sequence[tuple[int, str]], ids: Identities) -> Inferred:
    """The tightest condition of the ladder (module docstring) that every
    request in `seen` meets."""
    n = len(seen)
    anonymous = [s for s in seen if s.who is None]
    if anonymous:
        bad = sum(1 for s in anonymous if s.rejected)
        note = f" ({bad} of them with credentials that do not verify)" if bad else ""
        return Inferred("anyone", "anyone", f"{len(anonymous)} of {n} carried no valid "
                        f"credentials{note}")  # fmt: skip
    whos = [s.who for s in seen if s.who is not None]
    owned = {name: sum(1 for s in seen if _owner(s, i)) for i, name in params}
    for _, name in params:
        if owned[name] == n:
            allow = {"claim": "sub", "equals": f"{{{name}}}"}
            return Inferred(allow, f"ownership ({{{name}}} is the caller's sub)",
                            f"{{{name}}} was the caller's sub in {_all(n)}")  # fmt: skip
    not_owner = (
        "not ownership: "
        + ", ".join(
            f"{{{name}}} was the caller's sub in {owned[name]} of {n}" for _, name in params
        )  # fmt: skip
        if params
        else "not ownership: no parameter in the path"
    )
    common = _common(whos)
    if common:
        g = _rarest(common, ids)
        also = sorted(common - {g})
        holders = len(ids.holders.get(g, ()))
        why = (f"{_all(n)} had {_grant_text(g)} (held by {_plural(holders, 'caller')} in the "
               "capture)")  # fmt: skip
        if also:
            why += f"; all also had {', '.join(_grant_text(x) for x in also)}"
        return Inferred({g[0]: g[1]}, _grant_text(g), f"{why}; {not_owner}")
    best = max(params, key=lambda p: owned[p[1]], default=None)
    if best is not None and owned[best[1]]:
        index, name = best
        others = [s.who for s in seen if s.who is not None and not _owner(s, index)]
        rest = _common(others)
        if rest:
            g = _rarest(rest, ids)
            either: Any = {"any": [{"claim": "sub", "equals": f"{{{name}}}"}, {g[0]: g[1]}]}
            why = (
                f"{{{name}}} was the caller's sub in {owned[name]} of {n}, and "
                + ("the other one" if len(others) == 1 else f"the other {len(others)} all")
                + f" had {_grant_text(g)}; not {_grant_text(g)} alone: "
                f"{_callers(s.who for s in seen if s.who is not None and _owner(s, index))} "
                "came for their own"
            )
            return Inferred(either, f"ownership or {_grant_text(g)}", why)
    why = (f"{_all(n)} carried valid credentials; not a role or scope: none common to all of "
           f"{_callers(whos)}; {not_owner}")  # fmt: skip
    return Inferred("authenticated", "authenticated", why)


# --- the proposal ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Learnt:
    name: str
    route: Route
    methods: tuple[str, ...]
    inferred: Inferred
    requests: int

    @property
    def path(self) -> str:
        """The pattern: a parameter the condition does not name is `*` (as
        `authgate check` asks: `unused-parameter`)."""
        used = _names(self.inferred.allow)
        names = iter(self.route.names)
        out = []
        for p in self.route.parts:
            if p is not None:
                out.append(p)
                continue
            name = next(names)
            out.append(f"{{{name}}}" if name in used else "*")
        return "/" + "/".join(out)


def _names(allow: Any) -> frozenset[str]:
    """The path parameters an `allow:` value this module writes names."""
    return frozenset(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", json.dumps(allow)))


def _rule_name(route: Route, taken: set[str], methods: Sequence[str] | None) -> str:
    names = iter(route.names)
    words = [p if p is not None else next(names) for p in route.parts]
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(words).lower()).strip("-") or "root"
    if methods is not None:
        slug += "-" + "-".join(m.lower() for m in methods)
    name, n = slug, 2
    while name in taken:
        name, n = f"{slug}-{n}", n + 1
    taken.add(name)
    return name


def propose(route_list: Sequence[Route], ids: Identities, taken: set[str]) -> list[Learnt]:
    """One rule per route and set of methods sharing a condition."""
    out: list[Learnt] = []
    for route in route_list:
        by_method: dict[str, list[Seen]] = {}
        for s in route.seen:
            by_method.setdefault(s.method, []).append(s)
        groups: dict[str, list[str]] = {}
        for method in sorted(by_method):
            allow = infer(by_method[method], route.params, ids).allow
            groups.setdefault(json.dumps(allow, sort_keys=True), []).append(method)
        for methods in groups.values():
            requests = [s for m in methods for s in by_method[m]]
            inferred = infer(requests, route.params, ids)
            split = methods if len(groups) > 1 else None
            name = _rule_name(route, taken, split)
            out.append(Learnt(name, route, tuple(methods), inferred, len(requests)))
    return out


def _flow(value: Any) -> str:
    """A YAML flow value: strings quoted as JSON (valid YAML) unless plain words."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, str) and value in ("anyone", "authenticated", "sub"):
        return value
    return json.dumps(value, ensure_ascii=False)


_PATH_KEYS = ("jwks_file", "public_key_file")


def _moved(doc: dict[str, Any], base_dir: Path, out_dir: Path | None) -> bool:
    """Relative file paths of the base, rewritten for the output's folder, or
    made absolute when there is none (standard output: the policy may land in
    any folder). Whether there was one to rewrite."""
    moved = False

    def fix(text: Any) -> Any:
        nonlocal moved
        if not isinstance(text, str) or Path(text).is_absolute():
            return text
        moved = True
        where = (base_dir / text).resolve()
        return str(where) if out_dir is None else os.path.relpath(where, out_dir.resolve())

    authn: dict[str, Any] = doc["authn"] if isinstance(doc.get("authn"), dict) else {}
    for issuer in authn.get("jwt") or []:
        for key in _PATH_KEYS:
            if isinstance(issuer, dict) and key in issuer:
                issuer[key] = fix(issuer[key])
    basic = authn.get("basic")
    if isinstance(basic, dict) and "htpasswd" in basic:
        basic["htpasswd"] = fix(basic["htpasswd"])
    ip = doc.get("ip")
    if isinstance(ip, dict) and isinstance(ip.get("block_files"), list):
        ip["block_files"] = [fix(f) for f in ip["block_files"]]
    return moved


def _yaml_flow(value: Any) -> str:
    """A value of a base rule on one line, as the base's author likely wrote it."""
    text = yaml.safe_dump(
        value, default_flow_style=True, allow_unicode=True, width=1 << 20, sort_keys=False
    )
    return text.removesuffix("\n").removesuffix("\n...")


def render(base_doc: dict[str, Any], base_dir: Path, out_dir: Path | None,
           learnt: Sequence[Learnt], header: Sequence[str]) -> str:  # fmt: skip
    """The proposed policy: the base (its comments are not kept) with mode:
    report, its rules first, then the learnt ones, each with its evidence.
    File paths are relative to `out_dir`, or absolute when it is None."""
    doc = {k: v for k, v in base_doc.items() if k not in ("rules", "tests", "mode")}
    if _moved(doc, base_dir, out_dir) and out_dir is None:
        header = [
            *header,
            "Its file paths are absolute (it was written to standard output, so they cannot",
            "be relative to its folder); --output FILE writes them relative to FILE's folder.",
        ]
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=None)
    text += "mode: report                        # decide and log, forward everything\n"
    text += "rules:\n"
    for rule in base_doc.get("rules") or []:
        items = list(rule.items()) if isinstance(rule, dict) else []
        for i, (key, value) in enumerate(items):
            text += f"  {'-' if i == 0 else ' '} {key}: {_yaml_flow(value)}\n"
    for r in learnt:
        text += (
            f"  # {' '.join(r.methods)} {r.route.template}: {_plural(r.requests, 'request')}; "
            f"{r.inferred.why}\n"
            f"  - name: {r.name}\n"
            f"    match: {{path: {json.dumps(r.path)}, methods: [{', '.join(r.methods)}]}}\n"
            f"    allow: {_flow(r.inferred.allow)}\n"
        )
    return text


# --- the command ---------------------------------------------------------------


class LearnError(ValueError):
    """Nothing sensible can be proposed."""


@dataclass(frozen=True, slots=True)
class Proposal:
    text: str
    summary: list[str]
    learnt: list[Learnt]


def learn(base: Policy, base_file: Path, records: Sequence[Recorded], capture: str,
          output: Path | None, max_literals: int = MAX_LITERALS) -> Proposal:  # fmt: skip
    """The proposal for these records on top of `base` (read from `base_file`,
    its keys fetched). Raises LearnError."""
    seen, ids, refused = verify(base, records)
    if not seen:
        raise LearnError(f"{capture}: no request was answered 2xx/3xx by the backend; "
                         "nothing to learn from")  # fmt: skip
    # Requests a rule of the base matches are that rule's: learning from them
    # would only add rules the base's shadow.
    limiter = MemoryStore()
    kept: Counter[str] = Counter()
    kept_denies: Counter[str] = Counter()
    rest: list[Seen] = []
    for s in seen:
        d = judge(base, s.record.request, s.when, limiter, consume=False)
        if d.rule is not None:
            kept[d.rule] += 1
            if not d.allowed:
                kept_denies[d.rule] += 1
        else:
            rest.append(s)
    route_list = routes(rest, ids.subjects, max_literals)
    learnt = propose(route_list, ids, {r.name for r in base.rules})

    base_doc = yaml.safe_load(base_file.read_text(encoding="utf-8")) or {}
    out_dir = output.parent if output is not None else None  # None: paths absolute
    header = [
        f"Proposed by `authgate learn` from {capture} on top of {base_file}:",
        f"{_plural(len(learnt), 'learnt rule')} after the base's own. Review it, replay it",
        f"(`authgate replay {output or 'THIS'} {capture} --at capture`), then enforce it.",
    ]
    text = render(base_doc, base_file.parent, out_dir, learnt, header)
    summary = _summary(capture, records, seen, ids, refused, base, base_file, kept, kept_denies,
                       route_list, learnt, max_literals)  # fmt: skip
    summary += _self_check(text, output, out_dir or Path.cwd(), base, seen)
    return Proposal(text, summary, learnt)


def _self_check(text: str, output: Path | None, out_dir: Path, base: Policy,
                seen: Sequence[Seen]) -> list[str]:  # fmt: skip
    """Load the proposal as the gateway would and judge what it learnt from."""
    try:
        policy = parse_policy(text, str(output or "<stdout>"), out_dir)
    except PolicyError as e:
        raise LearnError(f"the proposal does not load ({e}); please report this") from None
    # The base's credential sources, keys already fetched.
    policy = dataclasses.replace(policy, issuers=base.issuers, api_keys=base.api_keys,
                                 basic=base.basic)  # fmt: skip
    limiter = MemoryStore()
    denied: Counter[str] = Counter()
    for s in seen:
        d = judge(policy, s.record.request, s.when, limiter, consume=False)
        if not d.allowed:
            denied[f"{d.status} {d.reason} ({d.rule or 'no rule'})"] += 1
    n = len(seen)
    if not denied:
        return [f"check: the proposal allows all {n} successful requests (as of their time)"]
    lines = [f"check: the proposal allows {n - sum(denied.values())} of {n} successful requests; "
             "the others, as it would answer them:"]  # fmt: skip
    lines += [f"  {why}: {count}" for why, count in denied.most_common()]
    return lines


def _summary(capture: str, records: Sequence[Recorded], seen: Sequence[Seen], ids: Identities,
             refused: int, base: Policy, base_file: Path, kept: Counter[str],
             kept_denies: Counter[str], route_list: Sequence[Route], learnt: Sequence[Learnt],
             max_literals: int) -> list[str]:  # fmt: skip
    by_gateway = sum(1 for r in records if r.status is None)
    failed = len(records) - by_gateway - len(seen) - refused
    out = [
        f"{capture}: {_plural(len(records), 'request')}: {len(seen)} answered 2xx/3xx by the "
        f"backend (learnt from), {failed} answered otherwise, {by_gateway} unanswered or "
        "answered by the gateway itself (not learnt from)"
    ]
    if refused:
        out.append(f"{_plural(refused, 'successful request')} with a path the gateway refuses "
                   "(400): not learnt from")  # fmt: skip
    rejected = sum(ids.rejected.values())
    line = (
        f"identities of those {len(seen)} (verified by the authn of {base_file}, as of each "
        "request's time): "
        f"{ids.valid} with valid credentials ({_plural(len(ids.subjects), 'subject')}), "
        f"{ids.none} without"
    )
    if rejected:
        codes = ", ".join(f"{code} ×{n}" for code, n in ids.rejected.most_common())
        line += f", {rejected} whose credentials do not verify ({codes}), counted as no identity"
    out.append(line)
    if ids.gateway_headers:
        out.append(
            f"warning: {ids.gateway_headers} requests carry the gateway's X-Auth-Subject but no "
            "credential (a gateway with forward_credentials: false?); they count as anonymous. "
            "Capture in front of such a gateway instead"
        )
    for rule in base.rules:
        if kept[rule.name]:
            denies = kept_denies[rule.name]
            note = f"; it would deny {denies} of them" if denies else ""
            out.append(f"kept from the base: rule {rule.name} "
                       f"({_plural(kept[rule.name], 'request')}{note})")  # fmt: skip
    templated = [
        f"{r.template} ({'; '.join(f'{n} values: {why}' for why, n in r.why)})"
        for r in route_list
        if r.why
    ]
    if templated:
        out.append(f"templated (identifiers, or more than {max_literals} distinct values):")
        out += [f"  {t}" for t in templated]
    out.append(f"learnt {_plural(len(learnt), 'rule')}:")
    for r in learnt:
        out.append(f"  {r.name}: {' '.join(r.methods)} {r.route.template} "
                   f"({_plural(r.requests, 'request')}) -> {r.inferred.shown}")  # fmt: skip
        out.append(f"    {r.inferred.why}")
    return out


def main(base: Policy, args: argparse.Namespace) -> int:
    """`authgate learn CAPTURE --policy BASE [--output FILE]`; base loaded and
    its keys fetched by the caller. 0 written, 2 errors."""
    output = Path(args.output) if args.output else None
    try:
        if args.max_literals < 1:
            raise LearnError("--max-literals must be at least 1")
        records = read_capture(args.capture, args.peer)
        proposal = learn(base, Path(args.policy), records, args.capture, output,
                         args.max_literals)  # fmt: skip
    except (CaptureError, LearnError) as e:
        print(f"authgate learn: {e}", file=sys.stderr)
        return 2
    print("\n".join(proposal.summary), file=sys.stderr)
    if output is None:
        sys.stdout.write(proposal.text)
        return 0
    try:
        output.write_text(proposal.text, encoding="utf-8")
    except OSError as e:
        print(f"authgate learn: cannot write {output}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"authgate learn: wrote {output} (mode: report)", file=sys.stderr)
    return 0
