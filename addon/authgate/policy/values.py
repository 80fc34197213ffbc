"""Values a policy and its test cases share the spelling of: durations,
method names and header names (parsed from YAML or the command line)."""

from __future__ import annotations

import re
from typing import Any

METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*\Z")
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # an RFC 9110 token
_DURATION = re.compile(r"^\s*(-)?\s*(\d+)\s*(s|m|h|d)?\s*\Z")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, *, signed: bool = False) -> float:
    """Seconds from `30`, `30s`, `5m`, `1h` or `1d` (and `-1h` when `signed`).
    Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool) and (signed or value >= 0):
        return float(value)
    m = _DURATION.match(value) if isinstance(value, str) else None
    if not m or (m.group(1) and not signed):
        example = "30s, 5m, 1h or -1h" if signed else "30s, 5m or 1h"
        raise ValueError(f"expected a duration like {example}, not {value!r}")
    seconds = float(int(m.group(2)) * _UNITS[m.group(3)])
    return -seconds if m.group(1) else seconds
