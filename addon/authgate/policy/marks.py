"""YAML with line numbers, so every policy error can name file and line.

Mappings load as `MarkedDict` (the line of each key), sequences as
`MarkedList` (the line of each item). Duplicate keys are an error, not a
silent overwrite.
"""

from __future__ import annotations

from typing import Any

import yaml


class PolicyError(ValueError):
    """A policy problem, located at file:line."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        # Further problems found in the same load (each rule is checked even
        # when an earlier one is wrong), for `authgate check` to list them all.
        self.more: tuple[PolicyError, ...] = ()
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")

    def all(self) -> tuple[PolicyError, ...]:
        return (self, *self.more)


class MarkedDict(dict[str, Any]):
    line: int = 0
    key_lines: dict[str, int]


class MarkedList(list[Any]):
    line: int = 0
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    pass


# libyaml's parser when PyYAML has it: ten times faster on a 1,000-rule policy,
# with the same safe constructors, resolver and marks. Its error messages are
# worded differently, so a policy it refuses is parsed again by _Loader.
class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> MarkedDict:
    loader.flatten_mapping(node)
    out = MarkedDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is not a string", key_node.start_mark
            )
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> MarkedList:
    out = MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


for _loader in (_Loader, _FastLoader):
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def describe_value(value: Any) -> str:
    """A YAML value as an error message names it ("a list", "str 'GET'")."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()} (quote it if you meant a string)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


def load(text: str, file: str) -> Any:
    """Parse YAML text; raise PolicyError with the line of any syntax error."""
    try:
        return yaml.load(text, Loader=_FastLoader)  # noqa: TID251 - a SafeLoader subclass
    except yaml.YAMLError:
        pass  # the message as the pure-Python parser words it, below
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: TID251 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        message = f"YAML: {e.problem or e.context}"
        if (e.problem or "").startswith("expected <block end>"):
            message += (
                " (usually indentation: this line is indented more or less than the "
                "keys it belongs with; line them up, with spaces)"
            )
        raise PolicyError(file, line, message) from None
    except yaml.YAMLError as e:
        raise PolicyError(file, None, f"YAML: {e}") from None
