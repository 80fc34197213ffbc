"""The rule index: which rules can match a request, without trying them all.

First match wins, in file order (docs/policy.md). Trying every rule's pattern
makes a request's cost grow with the policy; `Router` is built once at load
and answers with the rules whose path pattern and method match, in file
order. The caller still checks each candidate in full (pattern, method,
host), so the first candidate that fits is exactly the rule a scan of every
rule would pick: the index only leaves out rules that cannot match.

The index is a trie over pattern segments: a literal segment is an edge
keyed by its text, `{name}` and `*` share one wildcard edge, and a rule sits
at the node where its pattern ends, as an exact end or, for a final `**`,
as a rest that covers that node and everything below it. At each of those
places its rules are split by method, so a method no rule there names only
meets the rules that take any method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from authgate.core.model import Rule


@dataclass(frozen=True, slots=True)
class _Bucket:
    """Rules in file order, with their positions in the policy (for merging)."""

    order: tuple[int, ...]
    rules: tuple[Rule, ...]


_EMPTY = _Bucket((), ())


@dataclass(frozen=True, slots=True)
class _Place:
    """The rules that sit at one place of the trie, split by method."""

    by_method: dict[str, _Bucket]  # every method any of these rules names
    other: _Bucket  # the rules that take any method: for every other method

    @classmethod
    def build(cls, entries: list[tuple[int, Rule]]) -> _Place:
        named = {m for _, rule in entries if rule.methods is not None for m in rule.methods}
        by_method = {
            m: _bucket([(i, r) for i, r in entries if r.methods is None or m in r.methods])
            for m in sorted(named)
        }
        return cls(by_method, _bucket([(i, r) for i, r in entries if r.methods is None]))

    def get(self, method: str) -> _Bucket:
        return self.by_method.get(method, self.other)


def _bucket(entries: list[tuple[int, Rule]]) -> _Bucket:
    if not entries:
        return _EMPTY
    return _Bucket(tuple(i for i, _ in entries), tuple(r for _, r in entries))


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    wild: _Node | None = None  # `{name}` or `*`: any one segment
    end_entries: list[tuple[int, Rule]] = field(default_factory=list)
    rest_entries: list[tuple[int, Rule]] = field(default_factory=list)
    # Frozen from the entries once every rule is in (None: no rule here).
    end: _Place | None = None
    rest: _Place | None = None

    def freeze(self) -> None:
        if self.end_entries:
            self.end = _Place.build(self.end_entries)
        if self.rest_entries:
            self.rest = _Place.build(self.rest_entries)
        self.end_entries, self.rest_entries = [], []
        for child in self.literal.values():
            child.freeze()
        if self.wild is not None:
            self.wild.freeze()


class Router:
    """Candidate rules for a method and canonical path segments, in file order."""

    __slots__ = ("_root",)

    def __init__(self, rules: Sequence[Rule]) -> None:
        root = _Node()
        for index, rule in enumerate(rules):
            node = root
            for part in rule.pattern.parts:
                if part is None:
                    if node.wild is None:
                        node.wild = _Node()
                    node = node.wild
                else:
                    node = node.literal.setdefault(part, _Node())
            entries = node.rest_entries if rule.pattern.rest else node.end_entries
            entries.append((index, rule))
        root.freeze()
        self._root = root

    def candidates(self, method: str, segments: tuple[str, ...]) -> Sequence[Rule]:
        """Every rule whose pattern matches `segments` and whose methods admit
        `method`, in file order (the host is left to the caller)."""
        found: list[_Bucket] = []
        active = [self._root]
        last = len(segments)
        for depth in range(last + 1):
            following: list[_Node] = []
            for node in active:
                # A final `**` here covers this depth and any deeper one.
                if node.rest is not None:
                    bucket = node.rest.get(method)
                    if bucket.rules:
                        found.append(bucket)
                if depth == last:
                    if node.end is not None:
                        bucket = node.end.get(method)
                        if bucket.rules:
                            found.append(bucket)
                    continue
                child = node.literal.get(segments[depth])
                if child is not None:
                    following.append(child)
                if node.wild is not None:
                    following.append(node.wild)
            if not following:
                break
            active = following
        if not found:
            return ()
        if len(found) == 1:
            return found[0].rules
        # Each rule sits at one place only, so positions never repeat.
        pairs = sorted(
            (pair for b in found for pair in zip(b.order, b.rules, strict=True)), key=_position
        )
        return [rule for _, rule in pairs]


def _position(pair: tuple[int, Rule]) -> int:
    return pair[0]
