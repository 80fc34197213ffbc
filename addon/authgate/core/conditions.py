"""Access conditions: the `allow:` part of a rule, compiled to a small tree.

A condition is evaluated against the caller's identity (None when the
request carried no credentials) and the path parameters of the match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from authgate.core.identity import Identity

_TEMPLATE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Template:
    """A condition value that may name path parameters: `"{id}"`, `"team-{t}"`."""

    raw: Any
    parts: tuple[tuple[bool, str], ...]  # (is_param, text); empty for non-strings

    @classmethod
    def parse(cls, raw: Any) -> Template:
        if not isinstance(raw, str) or "{" not in raw:
            return cls(raw, ())
        parts: list[tuple[bool, str]] = []
        pos = 0
        for m in _TEMPLATE_PARAM.finditer(raw):
            if m.start() > pos:
                parts.append((False, raw[pos : m.start()]))
            parts.append((True, m.group(1)))
            pos = m.end()
        if pos < len(raw):
            parts.append((False, raw[pos:]))
        if any(not p and ("{" in t or "}" in t) for p, t in parts):
            raise ValueError(f"bad parameter reference in {raw!r}")
        return cls(raw, tuple(parts))

    @property
    def params(self) -> frozenset[str]:
        return frozenset(t for is_param, t in self.parts if is_param)

    def value(self, params: dict[str, str]) -> Any:
        if not self.parts:
            return self.raw
        return "".join(params[t] if is_param else t for is_param, t in self.parts)


def claim_at(claims: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a dotted claim path, or None if any step is missing."""
    value: Any = claims
    for step in path:
        if not isinstance(value, dict) or step not in value:
            return None
        value = value[step]
    return value


def _same(a: Any, b: Any) -> bool:
    # JSON true must not equal 1, and 1 must not equal "1".
    return type(a) is type(b) and a == b


@dataclass(frozen=True, slots=True)
class Condition:
    """Base of the condition tree."""

    # The policy line it was written on, for the tools (coverage); 0 when
    # built in code. Not part of its meaning: equal conditions stay equal.
    line: int = field(default=0, kw_only=True, compare=False, repr=False)

    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        raise NotImplementedError

    def children(self) -> tuple[Condition, ...]:
        return ()

    def describe(self) -> str:
        raise NotImplementedError

    def walk(self) -> list[Condition]:
        out: list[Condition] = [self]
        for c in self.children():
            out.extend(c.walk())
        return out


@dataclass(frozen=True, slots=True)
class Anyone(Condition):
    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        return True

    def describe(self) -> str:
        return "anyone"


@dataclass(frozen=True, slots=True)
class Authenticated(Condition):
    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        return who is not None

    def describe(self) -> str:
        return "authenticated"


@dataclass(frozen=True, slots=True)
class Nobody(Condition):
    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        return False

    def describe(self) -> str:
        return "nobody"


@dataclass(frozen=True, slots=True)
class HasRole(Condition):
    role: str

    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        return who is not None and self.role in who.roles

    def describe(self) -> str:
        return f"role {self.role}"


@dataclass(frozen=True, slots=True)
class HasScope(Condition):
    scope: str

    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        return who is not None and self.scope in who.scopes

    def describe(self) -> str:
        return f"scope {self.scope}"


@dataclass(frozen=True, slots=True)
class Claim(Condition):
    path: tuple[str, ...]
    op: str  # equals | in | contains
    value: Template | tuple[Template, ...]

    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        if who is None:
            return False
        actual = claim_at(who.claims, self.path)
        if actual is None:
            return False
        if self.op == "equals":
            assert isinstance(self.value, Template)
            return _same(actual, self.value.value(params))
        if self.op == "in":
            assert isinstance(self.value, tuple)
            return any(_same(actual, t.value(params)) for t in self.value)
        # contains: the claim is a list holding the value
        assert isinstance(self.value, Template)
        wanted = self.value.value(params)
        return isinstance(actual, list) and any(_same(item, wanted) for item in actual)

    @property
    def params(self) -> frozenset[str]:
        values = self.value if isinstance(self.value, tuple) else (self.value,)
        return frozenset().union(*(t.params for t in values))

    def describe(self) -> str:
        values = self.value if isinstance(self.value, tuple) else (self.value,)
        shown = ", ".join(repr(t.raw) for t in values)
        return f"claim {'.'.join(self.path)} {self.op} {shown}"


@dataclass(frozen=True, slots=True)
class AnyOf(Condition):
    items: tuple[Condition, ...]

    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        return any(c.holds(who, params) for c in self.items)

    def children(self) -> tuple[Condition, ...]:
        return self.items

    def describe(self) -> str:
        return "any of"


@dataclass(frozen=True, slots=True)
class AllOf(Condition):
    items: tuple[Condition, ...]

    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        return all(c.holds(who, params) for c in self.items)

    def children(self) -> tuple[Condition, ...]:
        return self.items

    def describe(self) -> str:
        return "all of"


@dataclass(frozen=True, slots=True)
class Not(Condition):
    item: Condition

    def holds(self, who: Identity | None, params: dict[str, str]) -> bool:
        return not self.item.holds(who, params)

    def children(self) -> tuple[Condition, ...]:
        return (self.item,)

    def describe(self) -> str:
        return "not"


def params_named(cond: Condition) -> frozenset[str]:
    names: set[str] = set()
    for c in cond.walk():
        if isinstance(c, Claim):
            names |= c.params
    return frozenset(names)


def _wanted_scopes(cond: Condition, negated: bool = False) -> frozenset[str]:
    """Scopes the condition asks for (not those it forbids under a `not`)."""
    if isinstance(cond, HasScope):
        return frozenset() if negated else frozenset({cond.scope})
    inner = negated != isinstance(cond, Not)
    return frozenset().union(*(_wanted_scopes(k, inner) for k in cond.children()))


def missing_scopes(cond: Condition, who: Identity, params: dict[str, str]) -> tuple[str, ...]:
    """Scopes which, added to this token, would make the condition hold.

    Empty when more scope would not help (then the denial is a plain 403).
    """
    wanted = _wanted_scopes(cond)
    if not wanted or wanted <= who.scopes:
        return ()
    richer = who.with_scopes(who.scopes | wanted)
    if not cond.holds(richer, params):
        return ()
    return tuple(sorted(wanted - who.scopes))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _leaf_detail(cond: Condition, who: Identity | None, params: dict[str, str]) -> str:
    """What the caller had, for a leaf of the tree (empty when nothing helps)."""
    if isinstance(cond, Anyone | Nobody):
        return ""
    if who is None:
        return " (no credentials)"
    if isinstance(cond, HasRole):
        return f" (roles: {', '.join(sorted(who.roles)) or 'none'})"
    if isinstance(cond, HasScope):
        return f" (scopes: {', '.join(sorted(who.scopes)) or 'none'})"
    if isinstance(cond, Claim):
        name = ".".join(cond.path)
        actual = claim_at(who.claims, cond.path)
        values = cond.value if isinstance(cond.value, tuple) else (cond.value,)
        wanted = ", ".join(_short(t.value(params)) for t in values if t.params)
        shown = "absent" if actual is None else _short(actual)
        return f" ({'wanted ' + wanted + ', ' if wanted else ''}{name} is {shown})"
    return ""


def condition_tree(
    cond: Condition, who: Identity | None, params: dict[str, str], depth: int = 1
) -> list[str]:
    """The condition as an indented tree, each node with its value and each
    leaf with what the caller had, e.g. `  role admin: false (roles: user)`."""
    value = "true" if cond.holds(who, params) else "false"
    kids = cond.children()
    line = "  " * depth + f"{cond.describe()}: {value}"
    if not kids:
        return [line + _leaf_detail(cond, who, params)]
    out = [line]
    for k in kids:
        out.extend(condition_tree(k, who, params, depth + 1))
    return out
