"""Backend auth lint: the 401/403/429 mistakes legacy backends make.

The gateway never makes these mistakes itself; a backend behind it may. Each
check looks at the backend's answer to a request the gateway allowed. In
`repair` mode only what can be fixed without guessing is fixed: a bare 401
gets the policy's challenge, and a 403 to a request that carried no
credentials becomes the 401 it should have been.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Findings (stable names: they appear in logs, the summary and metrics).
BARE_401 = "401_without_challenge"
FORBIDDEN_WITHOUT_CREDENTIALS = "403_without_credentials"
AUTH_STATUS_FOR_RATE_LIMIT = "401_403_for_rate_limiting"
UNAVAILABLE_FOR_RATE_LIMIT = "503_for_rate_limiting"
FORBIDDEN_WITH_CHALLENGE = "403_with_challenge_not_insufficient_scope"

EXPLAIN = {
    BARE_401: "a 401 must carry a WWW-Authenticate challenge (RFC 9110 §15.5.2)",
    FORBIDDEN_WITHOUT_CREDENTIALS: "the request carried no credentials: that is a 401, not a 403",
    AUTH_STATUS_FOR_RATE_LIMIT: "rate limiting is 429 (RFC 6585), not 401/403",
    UNAVAILABLE_FOR_RATE_LIMIT: "rate limiting is 429 (RFC 6585), not 503",
    FORBIDDEN_WITH_CHALLENGE: "a 403 challenge only makes sense as RFC 6750 insufficient_scope",
}

_RATE_HEADERS = (
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-rate-limit-limit",
    "x-rate-limit-remaining",
)


# The statuses `findings` can find anything in.
STATUSES = frozenset({401, 403, 503})


def findings(status: int, headers: Sequence[tuple[str, str]], had_credentials: bool) -> list[str]:
    """The mistakes in one backend answer. `headers`: (lower-case name, value)."""
    names = {k for k, _ in headers}
    challenges = [v for k, v in headers if k == "www-authenticate"]
    rate_limited = any(h in names for h in _RATE_HEADERS)
    out: list[str] = []
    if status == 401 and not challenges:
        out.append(BARE_401)
    if status == 403 and not had_credentials:
        out.append(FORBIDDEN_WITHOUT_CREDENTIALS)
    if status in (401, 403) and (rate_limited or "retry-after" in names):
        out.append(AUTH_STATUS_FOR_RATE_LIMIT)
    if status == 503 and rate_limited:
        out.append(UNAVAILABLE_FOR_RATE_LIMIT)
    if status == 403 and challenges and not any("insufficient_scope" in c for c in challenges):
        out.append(FORBIDDEN_WITH_CHALLENGE)
    return out


def repairable(found: Sequence[str]) -> list[str]:
    """Which findings `repair` mode fixes (the rest are only reported)."""
    fixable = [f for f in found if f in (BARE_401, FORBIDDEN_WITHOUT_CREDENTIALS)]
    # A 401/403 that is really a rate limit is not fixed into a "proper" 401.
    return [] if AUTH_STATUS_FOR_RATE_LIMIT in found else fixable


@dataclass
class Ledger:
    """Counts per (rule, finding), and which were already logged."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    repaired: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, rule: str, finding: str, repaired: bool) -> bool:
        """Count one; True the first time this (rule, finding) is seen."""
        key = (rule, finding)
        first = key not in self.counts
        self.counts[key] = self.counts.get(key, 0) + 1
        if repaired:
            self.repaired[key] = self.repaired.get(key, 0) + 1
        return first

    def summary(self) -> list[dict[str, object]]:
        return [
            {
                "rule": rule,
                "finding": finding,
                "count": count,
                "repaired": self.repaired.get((rule, finding), 0),
                "why": EXPLAIN[finding],
            }
            for (rule, finding), count in sorted(self.counts.items())
        ]
