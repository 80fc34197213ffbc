"""`authgate replay`: recorded traffic through a policy, without a backend.

Reads a mitmproxy flow file (`-w` / `save_stream_file`) or a HAR file, turns
each request into a RequestView and judges it with `decide()`. Rate-limit
counters are read, never counted (`consume=False`): a capture replayed in a
second would otherwise trip every limit. The report names methods, paths
(without the query), statuses and rules; never a token.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from authgate.core.decision import INVALID_TOKEN, Decision, RequestView, judge
from authgate.core.ipset import parse_ip
from authgate.core.model import Policy
from authgate.runtime.stores import MemoryStore

__all__ = [
    "CaptureError",
    "Change",
    "Recorded",
    "judge_all",
    "parse_at",
    "read_capture",
    "report",
    "report_changes",
]

EXPIRED = "expired"  # the code of a token rejected for its exp


class CaptureError(ValueError):
    """The capture cannot be read."""


@dataclass(frozen=True, slots=True)
class Recorded:
    request: RequestView
    timestamp: float | None  # when it was sent, if the capture says
    # The backend's answer, if the capture holds one: None when there was no
    # response or the gateway answered itself (a denial, a 500).
    status: int | None = None


def _view(method: str, target: str, headers: list[tuple[str, str]], peer: str,
          host: str | None) -> RequestView:  # fmt: skip
    """HTTP/2 pseudo-headers (`:authority`, ...) are not fields the gateway sees."""
    fields = [(k, v) for k, v in headers if not k.startswith(":")]
    return RequestView.build(method, target, fields, peer, host)


def read_flows(path: Path, peer: str) -> list[Recorded]:
    """HTTP requests from a mitmproxy flow file, in order."""
    from mitmproxy import exceptions, http, io

    from authgate.proxy.addon import METADATA_KEY

    out = []
    try:
        with path.open("rb") as f:
            for flow in io.FlowReader(f).stream():
                if not isinstance(flow, http.HTTPFlow):
                    continue
                req = flow.request
                address = flow.client_conn.peername
                # The gateway's own answers are marked in the flow's metadata
                # (the save addon keeps it): not forwarded means not the backend's.
                entry = flow.metadata.get(METADATA_KEY)
                by_gateway = isinstance(entry, dict) and not entry.get("forwarded")
                status = flow.response.status_code if flow.response is not None else None
                out.append(
                    Recorded(
                        _view(
                            req.method,
                            req.path,
                            list(req.headers.items(multi=True)),
                            address[0] if address else peer,
                            req.host_header,
                        ),  # fmt: skip
                        req.timestamp_start,
                        None if by_gateway else status,
                    )
                )
    except exceptions.FlowReadException as e:
        raise CaptureError(f"{path}: not a mitmproxy flow file ({e})") from None
    return out


def read_har(path: Path, peer: str) -> list[Recorded]:
    """Requests from a HAR 1.2 file. HAR does not record the client's address:
    every request comes from `peer`."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["log"]["entries"]
    except (ValueError, KeyError, TypeError) as e:
        raise CaptureError(f"{path}: not a HAR file ({e})") from None
    out = []
    for i, entry in enumerate(entries):
        try:
            req = entry["request"]
            url = urlsplit(req["url"])
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            headers = [(str(h["name"]), str(h["value"])) for h in req.get("headers", [])]
            started = entry.get("startedDateTime")
            stamp = datetime.fromisoformat(started).timestamp() if started else None
            host = next((v for k, v in headers if k.lower() in ("host", ":authority")), None)
            response = entry.get("response")
            # HAR writes status 0 for a request that got no answer.
            status = int(response.get("status") or 0) if isinstance(response, dict) else 0
            out.append(Recorded(_view(req["method"], target, headers, peer,
                                      host or url.netloc or None), stamp,
                                status or None))  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CaptureError(f"{path}: HAR entry {i} is malformed ({e})") from None
    return out


def read_capture(path: str | Path, peer: str = "127.0.0.1") -> list[Recorded]:
    """A flow file or a HAR file (told apart by content). Raises CaptureError."""
    p = Path(path)
    try:
        parse_ip(peer)
        with p.open("rb") as f:
            start = f.read(64).lstrip()
    except OSError as e:
        raise CaptureError(f"cannot read {p}: {e.strerror}") from None
    except ValueError as e:
        raise CaptureError(f"--peer: {e}") from None
    return read_har(p, peer) if start.startswith(b"{") else read_flows(p, peer)


def parse_at(text: str | None) -> float | str | None:
    """`--at`: None (now), "capture" (each request's own time), an ISO 8601
    time (`2026-11-26T17:50:40Z`; no zone means UTC) or seconds since the
    epoch. Raises ValueError."""
    if text is None or text == "capture":
        return text
    try:
        return float(text)
    except ValueError:
        pass
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def judge_all(
    policy: Policy, records: Sequence[Recorded], at: float | str | None
) -> list[Decision]:
    """Decide every request; `at` as from `parse_at`. Counters are not consumed."""
    now = time.time()
    limiter = MemoryStore()
    out = []
    for r in records:
        when = now if at is None else at
        if when == "capture":
            when = r.timestamp if r.timestamp is not None else now
        assert isinstance(when, float | int)
        out.append(judge(policy, r.request, float(when), limiter, consume=False))
    return out


def _shown(r: Recorded, d: Decision) -> str:
    """`GET /path`: the canonical path when there is one, never the query."""
    path = d.path.path if d.path is not None else r.request.target.split("?", 1)[0]
    return f"{r.request.method} {path[:120]}"


def _status(d: Decision) -> int:
    return d.status or 200


def _rule(d: Decision) -> str:
    return d.rule if d.rule is not None else "(no rule)"


def _expired_note(decisions: Sequence[Decision]) -> list[str]:
    n = sum(1 for d in decisions if d.reason == INVALID_TOKEN and d.detail == EXPIRED)
    if not n:
        return []
    return [
        f"note: {n} request{'s' if n != 1 else ''} carried expired tokens; "
        "--at capture judges each request as of the time it was recorded"
    ]


def report(records: Sequence[Recorded], decisions: Sequence[Decision]) -> dict[str, Any]:
    """Counts per status and per rule."""
    by_status = Counter(_status(d) for d in decisions)
    by_rule: dict[str, Counter[int]] = defaultdict(Counter)
    for d in decisions:
        by_rule[_rule(d)][_status(d)] += 1
    return {
        "requests": len(decisions),
        "by_status": {str(s): n for s, n in sorted(by_status.items())},
        "by_rule": {r: {str(s): n for s, n in sorted(c.items())} for r, c in by_rule.items()},
        "expired_tokens": sum(
            1 for d in decisions if d.reason == INVALID_TOKEN and d.detail == EXPIRED
        ),
    }


def format_report(summary: dict[str, Any], decisions: Sequence[Decision]) -> str:
    lines = ["by status:"]
    lines += [f"  {s}  {n:>5}" for s, n in summary["by_status"].items()]
    lines.append("by rule:")
    width = max((len(r) for r in summary["by_rule"]), default=0)
    for rule, counts in summary["by_rule"].items():
        shown = ", ".join(f"{s} ×{n}" for s, n in counts.items())
        lines.append(f"  {rule:<{width}}  {shown}")
    lines += _expired_note(decisions)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Change:
    old: tuple[int, str]  # (status, rule)
    new: tuple[int, str]
    requests: tuple[tuple[str, int], ...]  # ("GET /path", how many), most first

    @property
    def count(self) -> int:
        return sum(n for _, n in self.requests)


def report_changes(records: Sequence[Recorded], old: Sequence[Decision],
                   new: Sequence[Decision]) -> list[Change]:  # fmt: skip
    """The requests whose status or rule differ, grouped by old -> new."""
    groups: dict[tuple[tuple[int, str], tuple[int, str]], Counter[str]] = defaultdict(Counter)
    for r, a, b in zip(records, old, new, strict=True):
        was, now = (_status(a), _rule(a)), (_status(b), _rule(b))
        if was != now:
            groups[(was, now)][_shown(r, b)] += 1
    changes = [Change(k[0], k[1], tuple(v.most_common())) for k, v in groups.items()]
    return sorted(changes, key=lambda ch: (-ch.count, ch.old, ch.new))


def format_changes(changes: Sequence[Change], total: int, new: Sequence[Decision]) -> str:
    n = sum(ch.count for ch in changes)
    lines = [f"{n} of {total} request{'s' if total != 1 else ''} would be decided differently"]
    for ch in changes:
        lines.append("")
        lines.append(
            f"{ch.old[0]} {ch.old[1]} → {ch.new[0]} {ch.new[1]}: "
            f"{ch.count} request{'s' if ch.count != 1 else ''}"
        )
        for shown, count in ch.requests:
            lines.append(f"  {shown}" + (f"  ×{count}" if count > 1 else ""))
    lines += _expired_note(new)
    return "\n".join(lines) + "\n"


def changes_as_dict(changes: Sequence[Change]) -> list[dict[str, Any]]:
    return [
        {
            "old": {"status": ch.old[0], "rule": ch.old[1]},
            "new": {"status": ch.new[0], "rule": ch.new[1]},
            "count": ch.count,
            "requests": [{"request": s, "count": n} for s, n in ch.requests],
        }
        for ch in changes
    ]
