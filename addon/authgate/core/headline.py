"""A decision in a few words, for the first thing people read: mitmweb's
Comment column is 150 px wide (about 20 characters), so a flow's comment
starts with the reason: `401 expired`, `403 sub≠{id} (user-record)`,
`404 hidden (secrets)`, `429 reports 5/min` or `200 profile` (200: forwarded;
the Status column shows the backend's answer).

Pure: a Decision (and the policy it was made under) in, one line out.
"""

from __future__ import annotations

from authgate.core import conditions as c
from authgate.core.decision import (
    BAD_HEADER,
    BAD_HOST,
    BAD_PATH,
    BAD_TARGET,
    BANNED,
    FORBIDDEN,
    HIDDEN,
    INSUFFICIENT_SCOPE,
    INTROSPECTION_UNAVAILABLE,
    INVALID_CREDENTIALS,
    INVALID_REQUEST,
    INVALID_TOKEN,
    IP_BLOCKED,
    IP_NOT_ALLOWED,
    KEYS_UNAVAILABLE,
    LOGIN_REDIRECT,
    NO_CREDENTIALS,
    NO_RULE,
    PREFLIGHT,
    RATE_LIMITED,
    THROTTLED,
    Decision,
)
from authgate.core.identity import Identity
from authgate.core.model import Policy
from authgate.core.oidc import (
    CROSS_SITE,
    LOGGED_OUT,
    LOGIN_COMPLETE,
    LOGIN_FAILED,
    LOGIN_START,
    METHOD_NOT_ALLOWED,
    PROVIDER_UNAVAILABLE,
)

# Reasons told in words; the others are the reason with spaces.
_WORDS = {
    BAD_PATH: "bad path",
    BAD_HEADER: "bad header",
    BAD_HOST: "bad host",
    BAD_TARGET: "bad target",
    IP_BLOCKED: "IP blocked",
    IP_NOT_ALLOWED: "IP not allowed",
    NO_RULE: "no rule",
    NO_CREDENTIALS: "no credentials",
    KEYS_UNAVAILABLE: "keys unavailable",
    INTROSPECTION_UNAVAILABLE: "introspection unavailable",
    LOGIN_REDIRECT: "to login",
    LOGIN_START: "login: to the provider",
    LOGIN_COMPLETE: "login: session issued",
    LOGIN_FAILED: "login failed",
    PROVIDER_UNAVAILABLE: "provider unavailable",
    LOGGED_OUT: "logout",
    CROSS_SITE: "cross-site logout",
    METHOD_NOT_ALLOWED: "method not allowed",
}
_PERIODS = {1: "s", 60: "min", 3600: "h", 86400: "day"}
MAX_WHY = 60  # the headline is one short line; the Comment tab has the rest


def headline(d: Decision, policy: Policy | None = None) -> str:
    """`STATUS [RULE][: WHY]`: the status the client got (200: forwarded), the
    rule, and the decisive reason in a few words. Report mode's would-be
    denials start with `would `. `policy` names the failing condition of a
    403 (without it: `forbidden`)."""
    if d.allowed:
        shown = "200" + (f" {d.rule}" if d.rule else "")
        return shown + (" (preflight)" if d.reason == PREFLIGHT else "")
    why = _why(d, policy)
    if len(why) > MAX_WHY:
        why = why[: MAX_WHY - 1] + "…"
    if d.status == 401 or not d.rule:
        head = f"{d.status} {why}"  # who is asking decides, not the rule: `401 expired`
    elif d.reason == RATE_LIMITED:
        head = f"{d.status} {d.rule} {_rate(d, named=False)}"  # `429 reports 5/min`
    else:
        # The reason first: mitmweb's Comment cell shows about 20 characters.
        head = f"{d.status} {why} ({d.rule})"  # `403 sub≠{id} (user-record)`
    return f"would {head}" if d.report else head


def failed(status: int, reason: str) -> str:
    """The headline of an answer the gateway gave without a decision (500, 503)."""
    return f"{status} {reason.replace('_', ' ')}"


def _why(d: Decision, policy: Policy | None) -> str:
    reason = d.reason
    if reason in (INVALID_TOKEN, INVALID_CREDENTIALS) and d.detail:
        return d.detail.replace("_", " ")  # expired, bad signature, wrong password
    if reason == RATE_LIMITED:
        return _rate(d)
    if reason == INSUFFICIENT_SCOPE:
        return f"no scope {d.detail}"
    if reason == HIDDEN:
        return "hidden"  # what it hid (forbidden, 401...) is on the line below
    if reason in (BANNED, THROTTLED):
        return f"{reason} by {d.detail}" if d.detail else reason  # `403 banned by probing`
    if reason in (IP_BLOCKED, IP_NOT_ALLOWED) and d.client_ip:
        return f"{_WORDS[reason]} {d.client_ip}"
    if reason == FORBIDDEN and policy is not None and d.rule and d.path is not None:
        rule = policy.rule_index.get(d.rule)
        params = rule.pattern.match(d.path.segments) if rule is not None else None
        if rule is not None and params is not None:
            return why_not(rule.allow, d.identity, params)
    words = _WORDS.get(reason, reason.replace("_", " "))
    if reason in (BAD_PATH, BAD_HEADER, BAD_HOST, BAD_TARGET, INVALID_REQUEST) and d.detail:
        return f"{words}: {d.detail}" if reason != INVALID_REQUEST else d.detail
    return words


def _rate(d: Decision, named: bool = True) -> str:
    """`per-ip 5/min` (`5/min` unnamed), from the RateLimit-Policy header the
    429 carries."""
    for name, value in d.headers:
        if name == "RateLimit-Policy":
            fields = dict(p.partition("=")[::2] for p in value.split(";")[1:])
            count, period = fields.get("q", "?"), int(fields.get("w", "0") or 0)
            unit = _PERIODS.get(period, f"{period}s")
            return f"{d.detail} {count}/{unit}" if d.detail and named else f"{count}/{unit}"
    return d.detail or "rate limited"


def why_not(cond: c.Condition, who: Identity | None, params: dict[str, str]) -> str:
    """The part of a condition that failed, tersely: `role admin`, `sub≠{id}`,
    `scope write`, alternatives joined by ` / `."""
    if cond.holds(who, params):
        return "holds"
    if isinstance(cond, c.AllOf):
        first = next(k for k in cond.items if not k.holds(who, params))
        return why_not(first, who, params)
    if isinstance(cond, c.AnyOf):
        return " / ".join(why_not(k, who, params) for k in cond.items)
    if isinstance(cond, c.Not):
        return f"not {cond.item.describe()}"
    if isinstance(cond, c.HasRole):
        return f"role {cond.role}"
    if isinstance(cond, c.HasScope):
        return f"scope {cond.scope}"
    if isinstance(cond, c.Claim):
        name = ".".join(cond.path)
        if isinstance(cond.value, tuple):
            return f"{name}∉{{{', '.join(str(t.raw) for t in cond.value)}}}"
        sign = "∌" if cond.op == "contains" else "≠"
        return f"{name}{sign}{cond.value.raw}"
    if isinstance(cond, c.Authenticated):
        return "authenticated"
    return cond.describe()
