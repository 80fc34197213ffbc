"""`record`: the values made for every request, immutable to the type checker.

A `@dataclass(frozen=True)` sets each field in its `__init__` through
`object.__setattr__`, around its own `__setattr__` that refuses: that costs
about 0.1 us a field, and a request makes nine such values (the view, its
path, client address, credential, rate-limit hit and verdict, the
verification's outcome, the decision: some 50 fields, 2.5 us for `Decision`
alone against 0.5 us for a plain slotted one). `record` is a slotted
dataclass that mypy holds to frozen (PEP 681 `frozen_default`: an assignment
to a field is a type error, and `make lint` runs mypy), hashable as a frozen
one is, but built at run time without the frozen `__init__`. For the kinds
of value a request makes; a few of their instances are shared all the same
(`ratelimit.ALLOWED`, a peer's `ClientIP` kept by `clientip.peer_ip`), which
only the type check keeps unchanged. The policy and what it holds stay
`frozen=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def record(cls: type[_T]) -> type[_T]:
    made: Any = dataclass(slots=True, unsafe_hash=True)(cls)
    return made  # type: ignore[no-any-return]
