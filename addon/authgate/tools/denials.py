"""`authgate denials`: findings from decision logs.

Reads the lines `authgate_log` writes (plain, gzip-compressed and rotated
files, put in time order by their first entry) and reports, each finding with
its evidence and a suggestion:

- refusing_rule: a rule that refuses (403) most or all of the authenticated
  callers reaching it, with the condition branch that failed for them;
- probing: a caller (the subject, or the address when anonymous) refused on
  many distinct paths within a short window;
- credential_guessing: one address failing with many different credentials
  (told apart by the log's fingerprints) within a short window;
- hiding_revealed: a caller answered 404 by a hidden rule and 401/403 by
  another rule on a path the hidden one covers: the hiding hides nothing;
- report_mode: what the report-mode rules would refuse if enforced, and whom.

One pass over the lines, so a million take seconds: an allowed request's line
(most of a log) is read by a few substring searches for the fields that
matter (time, rule, subject); only denials go through json.loads. Lines that
are not decision entries are counted and skipped.
"""

from __future__ import annotations

import dataclasses
import gc
import gzip
import json
import math
import re
import textwrap
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

from authgate.core.model import Policy
from authgate.core.paths import AmbiguousPath, canonicalize
from authgate.policy.values import parse_duration

REFUSING_RULE = "refusing_rule"
PROBING = "probing"
CREDENTIAL_GUESSING = "credential_guessing"
HIDING_REVEALED = "hiding_revealed"
REPORT_MODE = "report_mode"
KINDS = (REFUSING_RULE, PROBING, CREDENTIAL_GUESSING, HIDING_REVEALED, REPORT_MODE)
_TITLES = {
    REFUSING_RULE: "refusing rule",
    PROBING: "probing",
    CREDENTIAL_GUESSING: "credential guessing",
    HIDING_REVEALED: "hiding revealed",
    REPORT_MODE: "report mode",
}

# A known caller refused by a rule's condition (a hidden rule logs these as
# `hidden` with the reason in `detail`).
_REFUSED_IDENTITY = frozenset({"forbidden", "insufficient_scope"})
# Refusals that count as trying a path: the condition, a hidden rule, no rule.
_PROBE_REASONS = frozenset({"forbidden", "insufficient_scope", "hidden", "no_rule"})
# A credential presented and found wrong (the log fingerprints it).
_FAILED_CREDENTIAL = frozenset({"invalid_token", "invalid_credentials"})
# Answers that tell a caller a path exists: a challenge, or "not you".
_REVEALING = frozenset({401, 403})

EXAMPLES = 5  # examples kept per finding
_COLUMNS = 100  # the text report's width
_CAP = 200  # distinct values kept per caller where only examples are needed
_PATHS_CAP = 10_000  # distinct paths counted per probing caller
_KEYS_CAP = 1_000  # distinct keys counted in one tally (user names tried, ...)
OTHERS = "(others)"  # the tally of the keys past the cap


@dataclass(frozen=True, slots=True)
class Thresholds:
    window: float = 300.0  # seconds: the sliding window of probing and guessing
    probe_paths: int = 10  # distinct paths refused to one caller within the window
    guess_credentials: int = 10  # distinct failed credentials from one address
    rule_callers: int = 3  # authenticated callers a rule must have seen
    rule_refused: float = 90.0  # percent of them refused

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Caller(NamedTuple):
    """Who was refused: the subject when the caller was identified, else the
    address; neither stands for every anonymous caller (see ANONYMOUS)."""

    subject: str | None
    address: str | None

    def __str__(self) -> str:
        if self.subject is not None:
            return self.subject
        return f"address {self.address}" if self.address is not None else "anonymous"

    def as_dict(self) -> dict[str, Any]:
        if self.subject is not None:
            return {"subject": self.subject}
        if self.address is not None:
            return {"address": self.address}
        return {"anonymous": True}


# Anonymous callers all get the same answers, so for hiding they are one
# caller (and an internet's worth of addresses is not kept).
ANONYMOUS = Caller(None, None)


class Entry(NamedTuple):
    """A logged denial or would-deny (allowed lines never become one)."""

    time: float
    address: str | None
    method: str
    path: str
    rule: str | None
    decision: str  # deny | would_deny
    status: int
    reason: str
    subject: str | None
    detail: str = ""
    condition: str = ""
    cred_fp: str = ""
    user: str | None = None

    @property
    def caller(self) -> Caller:
        return Caller(self.subject, None if self.subject is not None else self.address)

    @property
    def why(self) -> str:
        """The reason, or what a hidden rule hid."""
        return self.detail if self.reason == "hidden" and self.detail else self.reason


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class Allowed(NamedTuple):
    """What an allowed request's line tells: all the analysis needs of it."""

    time: float
    address: str | None
    rule: str | None
    subject: str | None


class Event(NamedTuple):
    """A security event of the gateway's watch (`"event":"watch"`, docs/watch.md):
    not a decision, but what the gateway already did about one."""

    kind: str  # the watch's name
    action: str  # ban, throttle, none


def parse(doc: Any) -> Entry | Allowed | Event | None:
    """A parsed line as a denial, an allowed request or a watch event; None
    when it is none of them."""
    if not isinstance(doc, dict):
        return None
    if doc.get("event") == "watch":
        kind, action = _str(doc.get("kind")), _str(doc.get("action"))
        return Event(kind, action) if kind is not None and action is not None else None
    t = doc.get("time")
    decision = doc.get("decision")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        return None
    if decision == "allow":
        address, rule, subject = doc.get("client_ip"), doc.get("rule"), doc.get("subject")
        return Allowed(float(t), _str(address), _str(rule), _str(subject))
    status, reason, path = doc.get("status"), doc.get("reason"), doc.get("path")
    if decision not in ("deny", "would_deny") or not isinstance(reason, str):
        return None
    if isinstance(status, bool) or not isinstance(status, int) or not isinstance(path, str):
        return None
    return Entry(
        float(t),
        _str(doc.get("client_ip")),
        _str(doc.get("method")) or "-",
        path,
        _str(doc.get("rule")),
        decision,
        status,
        reason,
        _str(doc.get("subject")),
        _str(doc.get("detail")) or "",
        _str(doc.get("condition")) or "",
        _str(doc.get("cred_fp")) or "",
        _str(doc.get("user")),
    )


# --- the fast path for allowed lines ----------------------------------------------
# An allowed request's line is read by substring search for the three fields
# that matter (time, rule, subject; the address only while a guesser is
# watched). A quoted key followed by a colon is never inside a JSON string
# (there a quote is escaped), so the first match is the key. Anything else,
# or a value with an escape in it, goes to json.loads.

_ALLOW = '"decision":"allow"'
_TIME = '{"time":'
_RULE = '"rule":"'
_SUBJECT = '"subject":'
_ADDRESS = '"client_ip":"'


# --- reading files ------------------------------------------------------------------


def open_log(path: str) -> IO[str]:
    """A log file as text, gunzipped when it is gzip (by its first bytes, so
    `decisions.jsonl.2.gz` and logrotate's dateext names both work). Raises
    OSError."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - the caller's


def _json_part(line: str) -> str | None:
    """The JSON of a line, also when a log prefix comes first (mitmproxy's
    terminal log with `authgate_log=-`, journald); None if there is none."""
    if line.startswith("{"):
        return line
    i = line.find('{"time":')
    return line[i:] if i >= 0 else None


def first_time(path: str, lines: int = 1000) -> float:
    """The time of a file's first entry (within its first `lines` lines), to
    put files in time order; infinity when none. Raises OSError."""
    try:
        with open_log(path) as f:
            for _, line in zip(range(lines), f, strict=False):
                part = _json_part(line)
                if part is None:
                    continue
                try:
                    doc = json.loads(part)
                except ValueError:
                    continue
                t = doc.get("time") if isinstance(doc, dict) else None
                if isinstance(t, int | float) and not isinstance(t, bool):
                    return float(t)
    except (EOFError, gzip.BadGzipFile, zlib.error):
        pass
    return math.inf


def in_time_order(paths: Sequence[str]) -> list[str]:
    """The files once each, oldest first (by their first entry; rotation
    gives `decisions.jsonl.2.gz`, `.1`, then the live file). Raises OSError."""
    unique = list(dict.fromkeys(str(Path(p)) for p in paths))
    return sorted(unique, key=lambda p: (first_time(p), unique.index(p)))


# --- the analysis -----------------------------------------------------------------------


class Window:
    """The distinct values one key showed within a sliding window of time, and
    the most it ever showed in one window (when, and how many)."""

    __slots__ = ("best", "best_from", "best_to", "counts", "head", "times", "values")

    def __init__(self) -> None:
        # Two lists and a start index: lighter than a deque for the many keys
        # that only ever see a value or two.
        self.times: list[float] = []
        self.values: list[str] = []
        self.head = 0
        self.counts: dict[str, int] = {}
        self.best = 0
        self.best_from = 0.0
        self.best_to = 0.0

    def add(self, t: float, value: str, window: float) -> int:
        times, values, counts = self.times, self.values, self.counts
        times.append(t)
        values.append(value)
        counts[value] = counts.get(value, 0) + 1
        head = self.head
        while times[head] < t - window:
            old = values[head]
            head += 1
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]
        if head > 64 and 2 * head > len(times):
            del times[:head], values[:head]
            head = 0
        self.head = head
        n = len(counts)
        if n > self.best:
            self.best, self.best_from, self.best_to = n, times[head], t
        return n


@dataclass
class _Span:
    first: float = math.inf
    last: float = -math.inf
    count: int = 0

    def see(self, t: float) -> None:
        self.count += 1
        if t < self.first:
            self.first = t
        if t > self.last:
            self.last = t


def _count(counts: dict[str, int], key: str, cap: int = _KEYS_CAP) -> None:
    """Count `key`; past `cap` distinct keys, new ones count as OTHERS."""
    if key not in counts and len(counts) >= cap:
        key = OTHERS
    counts[key] = counts.get(key, 0) + 1


def _top(counts: dict[str, int], n: int | None = None) -> list[tuple[str, int]]:
    """The most counted first (then by name), as Counter.most_common."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _keep(examples: list[str], value: str, n: int = EXAMPLES) -> None:
    if len(examples) < n and value not in examples:
        examples.append(value)


@dataclass
class _Refusals:
    """Known callers a rule's condition refused (enforced, or in report mode)."""

    span: _Span = field(default_factory=_Span)
    subjects: dict[str, int] = field(default_factory=dict)
    conditions: dict[str, set[str]] = field(default_factory=dict)  # condition -> subjects
    examples: list[str] = field(default_factory=list)

    def add(self, e: Entry) -> None:
        assert e.subject is not None
        self.span.see(e.time)
        self.subjects[e.subject] = self.subjects.get(e.subject, 0) + 1  # every one
        if e.condition:
            seen = self.conditions.setdefault(e.condition, set())
            if len(seen) < _PATHS_CAP:
                seen.add(e.subject)
        _keep(self.examples, f"{e.method} {e.path}")


@dataclass
class _Prober:
    window: Window = field(default_factory=Window)
    span: _Span = field(default_factory=_Span)
    paths: set[str] = field(default_factory=set)
    rules: dict[str, int] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)
    addresses: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)


@dataclass
class _Guesser:
    window: Window = field(default_factory=Window)
    span: _Span = field(default_factory=_Span)
    users: dict[str, int] = field(default_factory=dict)
    details: dict[str, int] = field(default_factory=dict)
    rules: dict[str, int] = field(default_factory=dict)
    flagged_at: float | None = None  # when the window first held enough credentials
    allowed_after: tuple[float, str | None, str | None] | None = None  # time, subject, rule


@dataclass
class _WouldDeny:
    span: _Span = field(default_factory=_Span)
    answers: dict[str, int] = field(default_factory=dict)  # "403 forbidden"
    subjects: dict[str, int] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)  # anonymous callers
    examples: list[str] = field(default_factory=list)
    refused: _Refusals = field(default_factory=_Refusals)


@dataclass
class Finding:
    kind: str
    summary: str  # one line
    evidence: dict[str, Any]  # for machines (--json)
    lines: list[tuple[str, str]]  # the evidence for people: (label, text)
    suggestion: str
    weight: float = 0.0  # orders findings of a kind, biggest first

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "summary": self.summary,
            "evidence": self.evidence,
            "suggestion": self.suggestion,
        }


@dataclass
class Report:
    files: list[str]
    thresholds: Thresholds
    lines: int = 0
    entries: int = 0  # decision entries read (allowed and denied)
    allowed: int = 0
    skipped: int = 0  # lines that are not decision entries
    events: dict[str, int] = field(default_factory=dict)  # watch events: "kind action" -> count
    before_since: int = 0
    first: float | None = None
    last: float | None = None
    since: float | None = None
    warnings: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    policy: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "policy": self.policy,
            "lines": self.lines,
            "entries": self.entries,
            "allowed": self.allowed,
            "denied": self.entries - self.allowed,
            "skipped": self.skipped,
            "watch_events": dict(sorted(self.events.items())),
            "before_since": self.before_since,
            "since": _iso(self.since) if self.since is not None else None,
            "from": _iso(self.first) if self.first is not None else None,
            "to": _iso(self.last) if self.last is not None else None,
            "thresholds": self.thresholds.as_dict(),
            "warnings": self.warnings,
            "findings": [f.as_dict() for f in self.findings],
        }

    def text(self) -> str:
        entries = _plural(self.entries, "entry", "entries")
        head = (
            f"authgate denials: {entries} ({self.allowed:,} allowed, "
            f"{self.entries - self.allowed:,} denied or would-deny) in "
            f"{_plural(len(self.files), 'file')}"
        )
        if self.first is not None and self.last is not None:
            head += f", {_between(self.first, self.last)}"
        out = [head]
        if self.events:
            told = ", ".join(f"{k} x{n}" for k, n in sorted(self.events.items()))
            out.append(f"  the watch acted already (docs/watch.md): {told}")
        if self.skipped:
            out.append(f"  {self.skipped:,} lines skipped: not decision entries")
        if self.before_since:
            out.append(f"  {self.before_since:,} entries before --since left out")
        out += [f"  warning: {w}" for w in self.warnings]
        n = len(self.findings)
        out.append(f"{n} finding{'' if n == 1 else 's'}" if n else "no findings")
        for i, f in enumerate(self.findings, 1):
            out.append("")
            out.append(_fill(f"{i}. {_TITLES[f.kind]}: {f.summary}", "", "   "))
            width = max((len(label) for label, _ in f.lines), default=0) + 1
            for label, text in [*f.lines, ("do", f.suggestion)]:
                out.append(_fill(text, f"   {(label + ':').ljust(width)} ", " " * (width + 4)))
        return "\n".join(out) + "\n"


class Analysis:
    """Feed it lines (`read`) or entries (`allow`, `deny`), then `report()`."""

    def __init__(self, thresholds: Thresholds | None = None, since: float | None = None) -> None:
        self.t = thresholds or Thresholds()
        self.since = since
        self.lines = self.entries = self.allowed = self.skipped = self.before_since = 0
        self.events: dict[str, int] = {}  # watch events by "kind action"
        self.first = math.inf
        self.last = -math.inf
        self.allowed_pairs: set[tuple[str, str]] = set()  # (rule, subject) allowed
        self.allowed_requests: dict[str, int] = {}  # rule -> allowed requests
        self.refusals: dict[str, _Refusals] = {}  # enforced, by rule
        self.probers: dict[Caller, _Prober] = {}
        self.guessers: dict[str, _Guesser] = {}  # by address
        self.watching: dict[str, _Guesser] = {}  # flagged addresses: the next allow
        # (rule, method, path) hidden, and (rule, method, path, status) 401/403, by
        # caller, each with the address it first came from
        self.hidden: dict[Caller, dict[tuple[str, str, str], str | None]] = {}
        self.revealing: dict[Caller, dict[tuple[str, str, str, int], str | None]] = {}
        self._sweep_at = -math.inf
        self.would: dict[str, _WouldDeny] = {}  # by rule
        self._by_rule: dict[str, set[str]] = {}  # allowed_subjects(), when reporting

    # --- input --------------------------------------------------------------------

    def read(self, lines: Iterable[str]) -> None:
        # The allowed lines' counts are kept in locals and added in at the end
        # (also when reading stops half way, a compressed file cut short).
        since = self.since
        counted = self.allowed_requests
        pairs = self.allowed_pairs
        n = fast = 0
        first, last = math.inf, -math.inf
        try:
            for line in lines:
                n += 1
                if _ALLOW in line and line.startswith(_TIME):
                    # The fast path, in line: a call per line would cost more.
                    r = line.find(_RULE) + 8
                    s = line.find(_SUBJECT) + 10
                    try:
                        t = float(line[8 : line.find(",", 8)])
                    except ValueError:
                        r = 0
                    if r > 8 and s > 10 and line[s] in '"n' and math.isfinite(t):
                        rule = line[r : line.find('"', r)]
                        subject = None if line[s] == "n" else line[s + 1 : line.find('"', s + 1)]
                        if "\\" not in rule and (subject is None or "\\" not in subject):
                            if since is not None and t < since:
                                self.before_since += 1
                                continue
                            fast += 1
                            if t > last:
                                last = t
                            if t < first:
                                first = t
                            counted[rule] = counted.get(rule, 0) + 1
                            if subject is not None:
                                pairs.add((rule, subject))
                            if self.watching:
                                a = line.find(_ADDRESS) + 13
                                self._allowed_from(line[a : line.find('"', a)], t, subject, rule)
                            continue
                self._slow(line)
        finally:
            self.lines += n
            self.entries += fast
            self.allowed += fast
            self.first = min(self.first, first)
            self.last = max(self.last, last)

    def _slow(self, line: str) -> None:
        """A line the fast path did not read: json.loads."""
        part = _json_part(line)
        if part is None:
            if line.strip():
                self.skipped += 1
            return
        try:
            e = parse(json.loads(part))
        except ValueError:  # JSONDecodeError, and a number too large for float
            e = None
        if isinstance(e, Entry):
            self.deny(e)
        elif isinstance(e, Event):
            key = f"{e.kind} {e.action}"
            self.events[key] = self.events.get(key, 0) + 1
        elif e is not None:
            self.allow(*e)
        else:
            self.skipped += 1

    def _in_range(self, t: float) -> bool:
        if self.since is not None and t < self.since:
            self.before_since += 1
            return False
        self.entries += 1
        if t < self.first:
            self.first = t
        if t > self.last:
            self.last = t
        return True

    def allow(self, t: float, address: str | None, rule: str | None, subject: str | None) -> None:
        """An allowed request (forwarded by its rule)."""
        if not self._in_range(t):
            return
        self.allowed += 1
        if rule is not None:
            self.allowed_requests[rule] = self.allowed_requests.get(rule, 0) + 1
            if subject is not None:
                self.allowed_pairs.add((rule, subject))
        if self.watching and address is not None:
            self._allowed_from(address, t, subject, rule)

    def _allowed_from(self, address: str, t: float, subject: str | None, rule: str | None) -> None:
        """An address allowed: if it was guessing, what it got in the end."""
        guesser = self.watching.pop(address, None)
        if guesser is not None:
            guesser.allowed_after = (t, subject, rule)

    def allowed_subjects(self) -> dict[str, set[str]]:
        """The subjects allowed by each rule."""
        out: dict[str, set[str]] = {}
        for rule, subject in self.allowed_pairs:
            out.setdefault(rule, set()).add(subject)
        return out

    def deny(self, e: Entry) -> None:
        """A denial or a would-deny."""
        if not self._in_range(e.time):
            return
        refused_identity = e.subject is not None and e.why in _REFUSED_IDENTITY
        if e.decision == "would_deny":
            if e.rule is not None:
                self._would_deny(e, refused_identity)
            return
        if refused_identity and e.rule is not None:
            r = self.refusals.get(e.rule)
            if r is None:
                r = self.refusals[e.rule] = _Refusals()
            r.add(e)
        if e.reason in _PROBE_REASONS:
            self._probe(e)
        if e.why in _FAILED_CREDENTIAL and e.cred_fp and e.address is not None:
            self._guess(e)
        if e.rule is not None:
            who = Caller(e.subject, None) if e.subject is not None else ANONYMOUS
            if e.reason == "hidden":
                self._remember(self.hidden, who, (e.rule, e.method, e.path), e.address)
            elif e.status in _REVEALING:
                key = (e.rule, e.method, e.path, e.status)
                self._remember(self.revealing, who, key, e.address)
        if e.time >= self._sweep_at:
            self._sweep(e.time)

    @staticmethod
    def _remember(
        into: dict[Caller, dict[Any, str | None]], caller: Caller, key: Any, address: str | None
    ) -> None:
        """Note a request (up to _CAP distinct ones per caller), with the
        address it first came from."""
        seen = into.get(caller)
        if seen is None:
            seen = into[caller] = {}
        if key not in seen and len(seen) < _CAP:
            seen[key] = address

    def _sweep(self, now: float) -> None:
        """Forget the callers and addresses whose last refusal is older than
        the window and that never reached a threshold: no later window can
        hold what they did, so memory follows the callers active in a window,
        not every address in the log."""
        cutoff = now - self.t.window
        probe, guess = self.t.probe_paths, self.t.guess_credentials
        self.probers = {
            k: p for k, p in self.probers.items() if p.span.last >= cutoff or p.window.best >= probe
        }
        self.guessers = {
            k: g
            for k, g in self.guessers.items()
            if g.span.last >= cutoff or g.window.best >= guess
        }
        self._sweep_at = now + self.t.window

    def _would_deny(self, e: Entry, refused_identity: bool) -> None:
        assert e.rule is not None
        w = self.would.get(e.rule)
        if w is None:
            w = self.would[e.rule] = _WouldDeny()
        w.span.see(e.time)
        _count(w.answers, f"{e.status} {e.reason}")
        if e.subject is not None:
            _count(w.subjects, e.subject)
        else:
            _count(w.addresses, e.address or "-")
        _keep(w.examples, f"{e.method} {e.path} -> {e.status} {e.reason} ({e.caller})")
        if refused_identity:
            w.refused.add(e)

    def _probe(self, e: Entry) -> None:
        caller = e.caller
        p = self.probers.get(caller)
        if p is None:
            p = self.probers[caller] = _Prober()
        p.window.add(e.time, e.path, self.t.window)
        p.span.see(e.time)
        if len(p.paths) < _PATHS_CAP:
            p.paths.add(e.path)
        if e.rule is not None:
            _count(p.rules, e.rule)
        hid = f" ({e.detail})" if e.reason == "hidden" and e.detail else ""
        _count(p.answers, f"{e.status} {e.reason}{hid}")
        if e.address is not None:
            _keep(p.addresses, e.address)
        _keep(p.examples, e.path, 2 * EXAMPLES)

    def _guess(self, e: Entry) -> None:
        assert e.address is not None
        g = self.guessers.get(e.address)
        if g is None:
            g = self.guessers[e.address] = _Guesser()
        n = g.window.add(e.time, e.cred_fp, self.t.window)
        g.span.see(e.time)
        if e.user is not None:
            _count(g.users, e.user)
        if e.detail:
            _count(g.details, e.detail)
        if e.rule is not None:
            _count(g.rules, e.rule)
        if g.flagged_at is None and n >= self.t.guess_credentials:
            g.flagged_at = e.time
            self.watching[e.address] = g

    # --- findings -------------------------------------------------------------------

    def report(self, files: Sequence[str] = (), policy: Policy | None = None) -> Report:
        r = Report(list(files), self.t)
        r.lines, r.entries, r.allowed = self.lines, self.entries, self.allowed
        r.skipped, r.before_since, r.since = self.skipped, self.before_since, self.since
        r.events = dict(self.events)
        if self.entries:
            r.first, r.last = self.first, self.last
        r.policy = policy.file if policy is not None else None
        self._by_rule = self.allowed_subjects()
        for finder in (
            self._refusing_rules,
            self._probing,
            self._guessing,
            self._hiding_revealed,
            self._report_mode,
        ):
            found = finder(policy)
            r.findings += sorted(found, key=lambda f: -f.weight)
        return r

    def _refusing_rules(self, policy: Policy | None) -> list[Finding]:
        out = []
        for name, refused in self.refusals.items():
            allowed = self._by_rule.get(name, set())
            share = _share(refused, allowed, self.t)
            if share is None:
                continue
            callers, only_refused = share
            f = _refusal_finding(name, _at(policy, name), refused, allowed, callers, only_refused)
            f.evidence["allowed_requests"] = self.allowed_requests.get(name, 0)
            out.append(f)
        return out

    def _probing(self, policy: Policy | None) -> list[Finding]:
        out = []
        for caller, p in self.probers.items():
            w = p.window
            if w.best < self.t.probe_paths:
                continue
            many = f"{len(p.paths):,}" + ("+" if len(p.paths) >= _PATHS_CAP else "")
            summary = (
                f"{caller} was refused on {w.best} distinct paths within "
                f"{_duration(w.best_to - w.best_from)}"
            )
            lines = [
                ("burst", f"{w.best} distinct paths refused, {_between(w.best_from, w.best_to)}"),
                (
                    "in all",
                    f"{p.span.count:,} refusals, {many} distinct paths, "
                    f"{_between(p.span.first, p.span.last)}",
                ),
                ("answers", _counts(p.answers)),
                ("rules", _counts(p.rules) or "none (no rule matched)"),
                (
                    "paths",
                    ", ".join(p.examples) + (", ..." if len(p.paths) > len(p.examples) else ""),
                ),
            ]
            if caller.subject is not None:
                lines.insert(0, ("from", ", ".join(p.addresses)))
                suggestion = (
                    f"{caller.subject!r} is a known caller trying paths it may not use. If "
                    "that is not its job, suspend the account or revoke its tokens, and look "
                    "at what it was allowed in the same log (its subject, that time); if it "
                    "is a tool (a crawler, a test), give it its own identity."
                )
            else:
                suggestion = (
                    "An anonymous client trying paths, most likely a scanner. If it keeps on, "
                    "block the address (ip.block) or limit it (a limit with key: ip); with "
                    "`default: not_found` and hidden rules it learns nothing from the 404s."
                )
            out.append(
                Finding(
                    PROBING,
                    summary,
                    {
                        "caller": caller.as_dict(),
                        "addresses": p.addresses,
                        "distinct_paths_in_window": w.best,
                        "window_from": _iso(w.best_from),
                        "window_to": _iso(w.best_to),
                        "refusals": p.span.count,
                        "distinct_paths": len(p.paths),
                        "from": _iso(p.span.first),
                        "to": _iso(p.span.last),
                        "answers": dict(p.answers),
                        "rules": dict(p.rules),
                        "examples": p.examples,
                    },
                    lines,
                    suggestion,
                    weight=w.best,
                )
            )
        return out

    def _guessing(self, policy: Policy | None) -> list[Finding]:
        out = []
        for address, g in self.guessers.items():
            w = g.window
            if w.best < self.t.guess_credentials:
                continue
            summary = (
                f"address {address} failed with {w.best} different credentials within "
                f"{_duration(w.best_to - w.best_from)}"
            )
            lines = [
                ("burst", f"{w.best} different credentials, {_between(w.best_from, w.best_to)}"),
                (
                    "in all",
                    f"{g.span.count:,} failed attempts, {_between(g.span.first, g.span.last)}",
                ),
                ("failures", _counts(g.details) or "-"),
                ("rules", _counts(g.rules) or "-"),
            ]
            if g.users:
                lines.insert(2, ("users tried", _counts(g.users)))
            after = g.allowed_after
            if after is not None:
                who = f" as {after[1]}" if after[1] is not None else ""
                rule = f" by rule {after[2]}" if after[2] is not None else ""
                lines.append(("then", f"allowed{who}{rule} at {_when(after[0])}"))
            named = [n for user, n in g.users.items() if user != OTHERS]
            if len(named) > 1 and max(named) <= 2:
                how = "Password spraying (few passwords each for many user names)"
            elif g.users:
                how = "Password guessing"
            else:
                how = "Credential guessing (tokens or keys)"
            suggestion = (
                f"{how}: limit the rule's requests by address (a limit with key: ip, counted "
                "before any password is checked) or block the address (ip.block)"
            )
            if after is not None:
                suggestion += (
                    "; the address was allowed afterwards"
                    + (f" as {after[1]!r}" if after[1] is not None else "")
                    + ": if that was not the account's owner, treat the account as "
                    "compromised (change its password, revoke its keys)"
                )
            suggestion += "."
            out.append(
                Finding(
                    CREDENTIAL_GUESSING,
                    summary,
                    {
                        "address": address,
                        "distinct_credentials_in_window": w.best,
                        "window_from": _iso(w.best_from),
                        "window_to": _iso(w.best_to),
                        "attempts": g.span.count,
                        "from": _iso(g.span.first),
                        "to": _iso(g.span.last),
                        "users": dict(g.users),
                        "failures": dict(g.details),
                        "rules": dict(g.rules),
                        "allowed_after": None
                        if after is None
                        else {"time": _iso(after[0]), "subject": after[1], "rule": after[2]},
                    },
                    lines,
                    suggestion,
                    weight=w.best,
                )
            )
        return out

    def _hiding_revealed(self, policy: Policy | None) -> list[Finding]:
        # (hidden rule, revealing rule) -> the callers, anonymous addresses, examples
        pairs: dict[tuple[str, str], dict[str, Any]] = {}
        for caller, hidden in self.hidden.items():
            revealing = self.revealing.get(caller)
            if not revealing:
                continue
            for (h_rule, h_method, h_path), h_from in hidden.items():
                for (r_rule, r_method, r_path, status), r_from in revealing.items():
                    if r_rule == h_rule or not _covers(policy, h_rule, h_path, r_path):
                        continue
                    pair = pairs.setdefault(
                        (h_rule, r_rule),
                        {"callers": {}, "statuses": set(), "examples": [], "addresses": []},
                    )
                    pair["callers"][str(caller)] = caller
                    pair["statuses"].add(status)
                    if caller == ANONYMOUS:
                        for address in (h_from, r_from):
                            if address is not None:
                                _keep(pair["addresses"], address)
                    example = f"{r_method} {r_path} -> {status}"
                    if not any(x.startswith(example + " ") for x in pair["examples"]):
                        _keep(pair["examples"], f"{example} (404 for {h_method} {h_path})")
        out = []
        for (h_rule, r_rule), pair in pairs.items():
            callers: dict[str, Caller] = pair["callers"]
            statuses = "/".join(str(s) for s in sorted(pair["statuses"]))
            at_h, at_r = _at(policy, h_rule), _at(policy, r_rule)
            who = [name for name in sorted(callers) if callers[name] != ANONYMOUS]
            if ANONYMOUS in callers.values():
                who.append("anonymous callers (from " + ", ".join(pair["addresses"]) + ")")
            summary = (
                f"rule {r_rule} answered {statuses} on paths that hidden rule {h_rule} covers, "
                f"where {h_rule} answered 404, to the same "
                + ("callers" if len(callers) > 1 or ANONYMOUS in callers.values() else "caller")
            )
            lines = [
                ("hidden", f"rule {h_rule}" + (f" ({at_h})" if at_h else "")),
                ("revealed by", f"rule {r_rule}" + (f" ({at_r})" if at_r else "")),
                (
                    "callers",
                    ", ".join(who[:EXAMPLES]) + (", ..." if len(who) > EXAMPLES else ""),
                ),
                ("examples", "; ".join(pair["examples"])),
            ]
            out.append(
                Finding(
                    HIDING_REVEALED,
                    summary,
                    {
                        "hidden_rule": h_rule,
                        "revealing_rule": r_rule,
                        "statuses": sorted(pair["statuses"]),
                        "callers": [c.as_dict() for _, c in sorted(callers.items())],
                        "anonymous_addresses": pair["addresses"],
                        "examples": pair["examples"],
                    },
                    lines,
                    f"A caller who gets 404 from {h_rule} and {statuses} from {r_rule} learns "
                    f"that the paths {h_rule} hides exist. Hide {r_rule} too (hide: true), or "
                    f"fold it into {h_rule}, so that every denial there is the same 404.",
                    weight=len(callers),
                )
            )
        return out

    def _report_mode(self, policy: Policy | None) -> list[Finding]:
        out = []
        for name, w in self.would.items():
            current = policy.rule_index.get(name) if policy is not None else None
            at = _at(policy, name)
            whom = [f"{s} ({n})" for s, n in _top(w.subjects, EXAMPLES)]
            whom += [f"address {a} ({n})" for a, n in _top(w.addresses, EXAMPLES)]
            callers = len(w.subjects) + len(w.addresses)
            summary = (
                f"enforcing rule {name} would refuse {_plural(w.span.count, 'request')} "
                f"from {_plural(callers, 'caller')}"
            )
            lines = [
                ("rule", name + (f" ({at})" if at else "")),
                (
                    "would refuse",
                    f"{w.span.count:,} requests, {_between(w.span.first, w.span.last)}",
                ),
                ("answers", _counts(w.answers)),
                ("whom", ", ".join(whom) + (", ..." if callers > len(whom) else "")),
                ("examples", "; ".join(w.examples[:3])),
            ]
            evidence: dict[str, Any] = {
                "rule": name,
                "would_refuse": w.span.count,
                "from": _iso(w.span.first),
                "to": _iso(w.span.last),
                "answers": dict(w.answers),
                "subjects": dict(w.subjects),
                "addresses": dict(w.addresses),
                "examples": w.examples,
                "allowed_requests": self.allowed_requests.get(name, 0),
            }
            allowed = self._by_rule.get(name, set())
            share = _share(w.refused, allowed, self.t) if w.refused.subjects else None
            if share is not None:
                callers_n, only = share
                leaves = _failed_leaves(w.refused, only)
                lines.append(("refuses", f"{len(only)} of {callers_n} authenticated callers"))
                if leaves:
                    lines.append(("failed", _leaf_text(leaves, len(only))))
                evidence["refuses_most_callers"] = {
                    "callers": callers_n,
                    "refused": len(only),
                    "failed": [{"leaf": k, "callers": v} for k, v in leaves],
                }
                suggestion = (
                    f"Do not enforce {name} yet: it would refuse {len(only)} of the "
                    f"{callers_n} authenticated callers that reached it, which looks like a "
                    "wrong condition rather than a policy; fix it (`authgate explain` shows "
                    "one caller's check), then watch the would-deny count fall."
                )
            else:
                suggestion = (
                    f"If these callers should be refused, enforce {name} (mode: enforce, or "
                    "drop its mode: report); if not, change its condition first."
                )
            if policy is not None and current is not None and not current.report:
                suggestion = (
                    f"{name} is enforced in {policy.file} now: these requests would be "
                    f"refused today. " + suggestion
                )
            finding = Finding(REPORT_MODE, summary, evidence, lines, suggestion, w.span.count)
            out.append(finding)
        if policy is not None:
            for rule in policy.rules:
                if rule.report and rule.name not in self.would:
                    reached = self.allowed_requests.get(rule.name, 0)
                    if not reached:
                        continue
                    out.append(
                        Finding(
                            REPORT_MODE,
                            f"enforcing rule {rule.name} would refuse nothing in this log",
                            {"rule": rule.name, "would_refuse": 0, "allowed_requests": reached},
                            [
                                ("rule", f"{rule.name} ({policy.file}:{rule.line})"),
                                ("reached", f"{reached:,} requests, every one allowed"),
                            ],
                            f"{rule.name} is ready to enforce, as far as this traffic goes: "
                            "set mode: enforce on it (or drop mode: report).",
                        )
                    )
        return out


# --- helpers ----------------------------------------------------------------------------


def _share(refused: _Refusals, allowed: set[str], t: Thresholds) -> tuple[int, set[str]] | None:
    """(authenticated callers, those refused and never allowed) when the rule
    refuses enough of enough callers, else None."""
    only_refused = set(refused.subjects) - allowed
    callers = len(only_refused) + len(allowed)
    if callers < t.rule_callers or not only_refused:
        return None
    if 100.0 * len(only_refused) / callers < t.rule_refused:
        return None
    return callers, only_refused


def _refusal_finding(
    name: str,
    at: str,
    refused: _Refusals,
    allowed: set[str],
    callers: int,
    only: set[str],
) -> Finding:
    every = not allowed
    summary = (
        f"rule {name} refused every one of the {callers} authenticated callers that reached it"
        if every
        else f"rule {name} refused {len(only)} of the {callers} authenticated callers "
        "that reached it"
    )
    leaves = _failed_leaves(refused, only)
    requests = sum(n for s, n in refused.subjects.items() if s in only)
    lines = [
        ("rule", name + (f" ({at})" if at else "")),
        (
            "refused",
            f"{_plural(len(only), 'caller')}, {requests:,} requests, "
            f"{_between(refused.span.first, refused.span.last)}; "
            f"allowed: {len(allowed) or 'none'}",
        ),
    ]
    if leaves:
        lines.append(("failed", _leaf_text(leaves, len(only))))
    top = sorted(refused.conditions.items(), key=lambda kv: -len(kv[1]))[:3]
    for condition, subjects in top:
        lines.append(("condition", f"{condition}  ({_plural(len(subjects), 'caller')})"))
    shown = [f"{s} ({n})" for s, n in _top(refused.subjects) if s in only][:EXAMPLES]
    lines.append(("callers", ", ".join(shown) + (", ..." if len(only) > len(shown) else "")))
    lines.append(("paths", ", ".join(refused.examples)))
    everyone = [k for k, n in leaves if n == len(only)]
    if everyone:
        branch = " and ".join(f"`{k}`" for k in everyone)
        suggestion = (
            f"{branch} was false for every refused caller: compare the name and value with "
            "what the identity provider really sends (a typo, a renamed role or scope, a "
            "claim not mapped into tokens, `roles_claim` pointing elsewhere). "
        )
    else:
        suggestion = "The callers failed different branches of the condition. "
    if every:
        suggestion += "Nobody passes this rule: it is refusing its own users."
    else:
        suggestion += (
            "If the rule is meant for the few it allows, this is expected (raise "
            "--rule-refused to hear less about it); if not, fix the condition."
        )
    suggestion += " `authgate explain POLICY GET PATH --token ...` shows one caller's check."
    evidence = {
        "rule": name,
        "callers": callers,
        "refused_callers": len(only),
        "allowed_callers": len(allowed),
        "refused_requests": requests,
        "from": _iso(refused.span.first),
        "to": _iso(refused.span.last),
        "failed": [{"leaf": k, "callers": n} for k, n in leaves],
        "conditions": {c: len(s) for c, s in top},
        "subjects": {s: n for s, n in _top(refused.subjects) if s in only},
        "examples": refused.examples,
    }
    return Finding(REFUSING_RULE, summary, evidence, lines, suggestion, weight=len(only))


def _failed_leaves(refused: _Refusals, only: set[str] | None = None) -> list[tuple[str, int]]:
    """Each leaf that failed, with the number of refused callers it failed for,
    most first."""
    by_leaf: dict[str, set[str]] = {}
    for condition, subjects in refused.conditions.items():
        chosen = subjects if only is None else subjects & only
        for leaf in failed_leaves(condition):
            by_leaf.setdefault(leaf, set()).update(chosen)
    return sorted(((k, len(v)) for k, v in by_leaf.items()), key=lambda kv: (-kv[1], kv[0]))


def _leaf_text(leaves: list[tuple[str, int]], refused: int) -> str:
    return ", ".join(f"{k} ({n} of {refused} callers)" for k, n in leaves[:EXAMPLES])


_OPENERS = (("any of(", False), ("all of(", False), ("not(", True))
_LEAF_END = re.compile(r"=(true|false)(?=, |\)|$)")


def failed_leaves(condition: str) -> list[str]:
    """The leaves that made a logged condition false, from the core's
    `describe()` text: `all of(authenticated=true, role biling=false)` gives
    `['role biling']`; under a `not`, the leaves that were true. Text that is
    not such a tree gives what could be read of it."""
    out: list[str] = []
    negated: list[bool] = []  # one per open composite: does it negate?
    i, n = 0, len(condition)
    while i < n:
        if condition.startswith(", ", i):
            i += 2
            continue
        if condition[i] == ")":
            if negated:
                negated.pop()
            i += 1
            continue
        for opener, negates in _OPENERS:
            if condition.startswith(opener, i):
                negated.append(negates)
                i += len(opener)
                break
        else:
            m = _LEAF_END.search(condition, i)
            if m is None:
                break
            value = m.group(1) == "true"
            flipped = sum(negated) % 2 == 1
            if value == flipped:  # false, or true under an odd number of `not`s
                leaf = condition[i : m.start()]
                if leaf not in out:
                    out.append(leaf)
            i = m.end()
    return out


def _covers(policy: Policy | None, hidden_rule: str, hidden_path: str, path: str) -> bool:
    """Does the hidden rule cover `path`? With the policy, by the rule's own
    pattern; without, when `path` is the hidden path or lies beside or under
    it (the hidden path's parent, at least one segment, is a prefix)."""
    rule = policy.rule_index.get(hidden_rule) if policy is not None else None
    if rule is not None:
        try:
            segments = canonicalize(path).segments
        except AmbiguousPath:
            return False
        return rule.pattern.match(segments) is not None
    if path == hidden_path:
        return True
    parent = [s for s in hidden_path.split("/") if s][:-1]
    mine = [s for s in path.split("/") if s]
    return bool(parent) and mine[: len(parent)] == parent


def _at(policy: Policy | None, rule: str) -> str:
    """`file:line` of a rule, '' without a policy, a note when it is not in it."""
    if policy is None:
        return ""
    found = policy.rule_index.get(rule)
    if found is None:
        return f"not in {policy.file}: renamed or removed since"
    return f"{policy.file}:{found.line}" + (", hidden" if found.hide else "")


def _fill(text: str, first: str, then: str) -> str:
    """A paragraph of the text report, paths and names never broken."""
    return textwrap.fill(
        text, _COLUMNS, initial_indent=first, subsequent_indent=then, break_on_hyphens=False
    )


def _plural(n: int, word: str, words: str = "") -> str:
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def _counts(c: dict[str, int]) -> str:
    top = _top(c, EXAMPLES)
    return ", ".join(f"{k} ({n:,})" for k, n in top) + (", ..." if len(c) > len(top) else "")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "a second"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _between(first: float, last: float) -> str:
    """`2025-06-01 10:00:03 UTC to 10:01:10 UTC` (the date once if the same)."""
    a, b = _when(first), _when(last)
    if a == b:
        return a
    return f"{a} to {b[11:] if a[:10] == b[:10] else b}"


# --- the whole run -----------------------------------------------------------------------


def parse_since(text: str, now: float) -> float:
    """`--since`: a duration back from `now` (`30m`, `2h`, `1d`), or an ISO
    8601 time (`2026-11-26T17:50:40Z`; no zone means UTC). Raises ValueError."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since takes a duration (30m, 2h, 1d) or an ISO 8601 time, not {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def analyze(
    paths: Sequence[str],
    thresholds: Thresholds | None = None,
    *,
    since: float | None = None,
    policy: Policy | None = None,
) -> Report:
    """Read the logs in time order and report. Raises OSError for a file that
    cannot be opened; a compressed file cut short is read as far as it goes
    (a warning says so)."""
    ordered = in_time_order(paths)
    a = Analysis(thresholds, since)
    warnings: list[str] = []
    # The objects made here live to the end and form no cycles: the cyclic
    # collector would only walk them again and again (a third of the time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        for path in ordered:
            with open_log(path) as f:
                before = a.lines
                try:
                    a.read(f)
                except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                    warnings.append(f"{path}: read as far as line {a.lines - before:,}: {e}")
    finally:
        if collecting:
            gc.enable()
    report = a.report(ordered, policy)
    report.warnings = warnings
    return report
