"""The watch (`watch:`): what a denial counts toward, and the sliding window
that counts it. Pure: the gateway's house feeds denials in and keeps the
windows (in memory, or in Redis by a script that does what `Window` does).

A watch counts, per key (a client address, `ip:ADDRESS`, or a subject,
`sub:ISSUER:SUBJECT`), one of:

- `denials`: every refusal the client could have avoided, a 4xx but a 429
  (a rate limit already answers those) and but the watch's own answers;
- `denied_paths`: the distinct paths among those (a user trying 30 admin
  paths counts 30, one path tried 30 times counts 1);
- `failed_credentials`: tokens, keys and passwords that failed (401
  `invalid_token` or `invalid_credentials`). By subject, the user a Basic
  credential names, unproven: it is the account being guessed at.

Allowed requests never count, and a denial counts by subject only when the
subject is proven (or, for failed credentials, named).

The window is exact and bounded: a key keeps the members it has seen (a
fresh id per denial, or the path) with the time each was last seen, drops
those older than the window, and when the count reaches the threshold the
event is due and the window starts again empty. So a key never holds more
than `threshold - 1` members between denials, and "reached the threshold"
means: `threshold` members seen within the last `window` seconds, since the
key's previous event.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from authgate.core.decision import (
    BANNED,
    HIDDEN,
    INVALID_CREDENTIALS,
    INVALID_TOKEN,
    KEYS_UNAVAILABLE,
    LOGIN_REDIRECT,
    PREFLIGHT,
    RATE_LIMITED,
    THROTTLED,
    Decision,
    subject_key,
)
from authgate.core.model import Ban, Policy, WatchSpec

# Refusals that never count: limits (429), the watch's own answers, the
# gateway's own trouble, a browser sent to sign in.
NOT_COUNTED = frozenset(
    {RATE_LIMITED, BANNED, THROTTLED, KEYS_UNAVAILABLE, LOGIN_REDIRECT, PREFLIGHT}
)
FAILED_CREDENTIALS = frozenset({INVALID_CREDENTIALS, INVALID_TOKEN})
MAX_PATH = 200  # characters of a path kept as a member


@dataclass(slots=True)
class Window:
    """One key's members within the window, oldest first, each with the
    time it was last seen."""

    seen: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def add(self, member: str, now: float, window: float, threshold: int) -> int:
        """Count `member` at `now` (times do not go back): the number of
        members seen in (now - window, now], this one included. When that
        reaches `threshold`, the window is emptied (the event is due)."""
        seen = self.seen
        cutoff = now - window
        while seen:
            _, at = next(iter(seen.items()))
            if at > cutoff:
                break
            seen.popitem(last=False)
        seen[member] = now
        seen.move_to_end(member)
        count = len(seen)
        if count >= threshold:
            seen.clear()
        return count


@dataclass(frozen=True, slots=True)
class Observation:
    """A denial, as one watch counts it: against `key`, the `member` seen."""

    spec: WatchSpec
    key: str
    member: str


def observations(
    policy: Policy, d: Decision, raw_path: str, unique: Callable[[], str]
) -> tuple[Observation, ...]:
    """What each of the policy's watches counts for this decision (nothing
    for an allowed request). `unique` makes a fresh member (a denial, a
    failed credential); `raw_path` stands in for a path that did not parse."""
    if d.allowed or not policy.watch:
        return ()
    reason = d.detail if d.reason == HIDDEN else d.reason
    if reason in NOT_COUNTED or not 400 <= d.status < 500:
        return ()
    failed = reason in FAILED_CREDENTIALS
    out: list[Observation] = []
    for spec in policy.watch:
        if spec.counts == "failed_credentials" and not failed:
            continue
        if spec.key == "ip":
            key = f"ip:{d.client_ip}" if d.client_ip else ""
        elif d.identity is not None:
            key = subject_key(d.identity.issuer, d.identity.subject)
        else:
            key = d.claimed if spec.counts == "failed_credentials" else ""
        if not key:
            continue
        if spec.counts == "denied_paths":
            member = d.path.path if d.path is not None else raw_path.split("?", 1)[0]
            member = member[:MAX_PATH]
        else:
            member = unique()
        out.append(Observation(spec, key, member))
    return tuple(out)


def stronger(old: Ban | None, new: Ban) -> Ban:
    """The ban to keep on a key when a watch sets `new`: the old one if it
    lasts at least as long and is at least as strong (a ban's 403 is stronger
    than a throttle's 429), else the new one. A ban is never shortened or
    softened by a later, lesser one."""
    if old is not None and old.until >= new.until and (old.action == "ban" or new.action != "ban"):
        return old
    return new
