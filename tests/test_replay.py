"""`authgate replay`: a capture the real gateway wrote (`save_stream_file`, as
`-w` does) in front of the recording backend, and a HAR file, through a policy
and through a changed one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from authgate.cli import main
from authgate.core.model import Policy
from authgate.policy.load import load_policy, parse_policy
from authgate.tools.replay import (
    CaptureError,
    judge_all,
    parse_at,
    read_capture,
    report,
    report_changes,
)
from conftest import EXAMPLE, POLICIES, Backend, RunningGateway, send

Token = Callable[..., str]

# The requests of the capture: (method, target, token kwargs or None, the status the gateway gave)
TRAFFIC: list[tuple[str, str, dict[str, Any] | None, int]] = [
    ("GET", "/health", None, 200),
    ("GET", "/api/profile", None, 401),
    ("GET", "/api/profile", {"sub": "alice", "roles": ["user"]}, 200),
    ("GET", "/api/users/alice?fields=name", {"sub": "alice", "roles": ["user"]}, 200),
    ("GET", "/api/users/bob", {"sub": "alice", "roles": ["user"]}, 403),
    ("GET", "/api/admin/dashboard", {"sub": "alice", "roles": ["user"]}, 403),
    ("GET", "/api/admin/dashboard", {"sub": "root", "roles": ["admin"]}, 200),
    ("GET", "/api/admin/users", {"sub": "root", "roles": ["admin"]}, 200),
    ("POST", "/api/reports", {"sub": "w", "scopes": ["reports:write"]}, 200),
    ("GET", "/api/secrets/db", None, 404),
    ("GET", "/nowhere", None, 404),
    ("GET", "/api/users/a%2Fb", None, 400),
]

# The change under review: the admin area now needs `superadmin`, and the
# profile becomes public.
CHANGED = (
    EXAMPLE.read_text()
    .replace("    allow: {role: admin}\n  - name: reports", "    allow: {role: superadmin}\n"
             "  - name: reports")
    .replace("    match: {path: /api/profile}\n    allow: authenticated",
             "    match: {path: /api/profile}\n    allow: anyone")
)  # fmt: skip


@pytest.fixture
def capture(
    start_gateway: Callable[..., RunningGateway], backend: Backend, token: Token, tmp_path: Path
) -> tuple[Path, list[str]]:
    """The real gateway, recording with save_stream_file; -> (file, tokens sent)."""
    path = tmp_path / "capture.flows"
    gw = start_gateway(EXAMPLE, f"save_stream_file={path}")
    tokens = []
    for method, target, claims, status in TRAFFIC:
        headers = []
        if claims is not None:
            tokens.append(token(**claims))
            headers.append(("Authorization", f"Bearer {tokens[-1]}"))
        body = b"{}" if method == "POST" else b""
        assert send(gw.address, method, target, headers, body).status == status, target
    assert len(backend.seen) == sum(1 for *_, s in TRAFFIC if s == 200)
    gw.stop()
    return path, tokens


@pytest.fixture
def changed(tmp_path: Path, demo_key: Any) -> Path:
    """The changed policy in its own folder, with copies of the files it names."""
    folder = tmp_path / "changed"
    (folder / "keys").mkdir(parents=True)
    shutil.copy(POLICIES / "keys" / "jwks.json", folder / "keys" / "jwks.json")
    shutil.copy(POLICIES / "blocklist.txt", folder / "blocklist.txt")
    path = folder / "example.yaml"
    path.write_text(CHANGED)
    return path


def statuses(policy: Policy, records: Any, at: Any = "capture") -> list[int]:
    return [d.status or 200 for d in judge_all(policy, records, at)]


def test_replay_agrees_with_what_the_gateway_answered(capture: tuple[Path, list[str]]) -> None:
    path, _ = capture
    records = read_capture(path)
    assert [(r.request.method, r.request.target) for r in records][:2] == [
        ("GET", "/health"), ("GET", "/api/profile")]  # fmt: skip
    assert all(r.request.peer == "127.0.0.1" and r.timestamp for r in records)
    assert statuses(load_policy(EXAMPLE), records) == [s for *_, s in TRAFFIC]


def test_the_report_counts_per_status_and_rule(capture: tuple[Path, list[str]]) -> None:
    records = read_capture(capture[0])
    policy = load_policy(EXAMPLE)
    summary = report(records, judge_all(policy, records, "capture"))
    assert summary == {
        "requests": 12,
        "by_status": {"200": 6, "400": 1, "401": 1, "403": 2, "404": 2},
        "by_rule": {
            "health": {"200": 1},
            "profile": {"200": 1, "401": 1},
            "user-record": {"200": 1, "403": 1},
            "admin": {"200": 2, "403": 1},
            "reports": {"200": 1},
            "secrets": {"404": 1},
            "(no rule)": {"400": 1, "404": 1},
        },
        "expired_tokens": 0,
    }


def test_a_policy_change_flips_known_requests(
    capture: tuple[Path, list[str]], changed: Path
) -> None:
    records = read_capture(capture[0])
    old = judge_all(load_policy(EXAMPLE), records, "capture")
    new = judge_all(load_policy(changed), records, "capture")
    changes = [(c.old, c.new, c.requests) for c in report_changes(records, old, new)]
    assert changes == [
        ((200, "admin"), (403, "admin"),
         (("GET /api/admin/dashboard", 1), ("GET /api/admin/users", 1))),
        ((401, "profile"), (200, "profile"), (("GET /api/profile", 1),)),
    ]  # fmt: skip


def test_the_command_line_report_and_diff_never_show_a_token(
    capture: tuple[Path, list[str]], changed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, tokens = capture
    assert main(["replay", str(EXAMPLE), str(path), "--at", "capture"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"{path}: 12 requests judged by {EXAMPLE} as of each request's recorded time"
    )
    assert "  200      6\n" in out and "  admin        200 ×2, 403 ×1\n" in out
    assert (
        main(["replay", str(changed), str(path), "--against", str(EXAMPLE), "--at", "capture"]) == 0
    )
    diff = capsys.readouterr().out
    assert diff == (
        f"{path}: {EXAMPLE} → {changed}, as of each request's recorded time\n"
        "3 of 12 requests would be decided differently\n"
        "\n"
        "200 admin → 403 admin: 2 requests\n"
        "  GET /api/admin/dashboard\n"
        "  GET /api/admin/users\n"
        "\n"
        "401 profile → 200 profile: 1 request\n"
        "  GET /api/profile\n"
    )
    assert main(["replay", str(changed), str(path), "--against", str(EXAMPLE), "--at", "capture",
                 "--format", "json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["requests"] == 12 and [c["count"] for c in data["changes"]] == [2, 1]
    for text in (out, diff):
        assert not any(t[:20] in text for t in tokens)
        assert "fields=name" not in text  # no query strings either


def test_old_tokens_expire_unless_judged_as_of_the_capture(
    capture: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = capture
    records = read_capture(path)
    later = records[0].timestamp + 7200  # type: ignore[operator]
    policy = load_policy(EXAMPLE)
    judged_later = statuses(policy, records, later)
    assert judged_later.count(401) == 8  # every token had expired by then
    assert summary_expired(policy, records, later) == 7
    iso = datetime.fromtimestamp(later, UTC).isoformat()
    assert main(["replay", str(EXAMPLE), str(path), "--at", iso]) == 0
    out = capsys.readouterr().out
    assert "note: 7 requests carried expired tokens; --at capture judges each request as of " \
        "the time it was recorded\n" in out  # fmt: skip


def summary_expired(policy: Policy, records: Any, at: Any) -> int:
    return int(report(records, judge_all(policy, records, at))["expired_tokens"])


def test_replay_never_counts_rate_limits(capture: tuple[Path, list[str]]) -> None:
    records = read_capture(capture[0]) * 50  # 50 report writes in no time at all
    policy = load_policy(EXAMPLE)
    assert 429 not in statuses(policy, records)


# --- HAR -------------------------------------------------------------------------------


def test_har_from_the_same_capture(
    capture: tuple[Path, list[str]], changed: Path, tmp_path: Path
) -> None:
    """The capture exported as HAR by mitmproxy's own savehar addon decides the same."""
    from mitmproxy import io
    from mitmproxy.addons.savehar import SaveHar

    with capture[0].open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    har = tmp_path / "capture.har"
    har.write_text(json.dumps(SaveHar().make_har(flows)))
    records = read_capture(har)
    assert [r.request.target for r in records] == [t for _, t, *_ in TRAFFIC]
    assert statuses(load_policy(EXAMPLE), records) == [s for *_, s in TRAFFIC]
    old = judge_all(load_policy(EXAMPLE), records, "capture")
    new = judge_all(load_policy(changed), records, "capture")
    assert sum(c.count for c in report_changes(records, old, new)) == 3


def test_a_browser_har(tmp_path: Path, token: Token, demo_key: Any) -> None:
    entries = [
        {"startedDateTime": "2026-11-26T17:50:40.123Z",
         "request": {"method": "GET", "url": "https://api.example/api/profile",
                     "headers": [{"name": ":authority", "value": "api.example"},
                                 {"name": "authorization", "value": f"Bearer {token()}"}]}},
        {"startedDateTime": "2026-11-26T17:50:41Z",
         "request": {"method": "GET", "url": "https://api.example/health?x=1", "headers": []}},
    ]  # fmt: skip
    har = tmp_path / "browser.har"
    har.write_text(json.dumps({"log": {"version": "1.2", "entries": entries}}))
    [a, b] = read_capture(har, peer="192.0.2.10")
    assert (a.request.target, a.request.peer, a.request.host) == (
        "/api/profile", "192.0.2.10", "api.example")  # fmt: skip
    assert [k for k, _ in a.request.headers] == ["authorization"]  # pseudo-headers dropped
    assert a.timestamp == datetime(2026, 11, 26, 17, 50, 40, 123000, UTC).timestamp()
    assert (b.request.target, b.request.host) == ("/health?x=1", "api.example")
    assert statuses(load_policy(EXAMPLE), [a, b], None) == [200, 200]


@pytest.mark.parametrize(
    "content, message",
    [(b"not a capture at all", "not a mitmproxy flow file"),
     (b'{"log": {}}', "not a HAR file"),
     (b'{"log": {"entries": [{"request": {"method": "GET"}}]}}', "HAR entry 0 is malformed"),
     (b"{ not json", "not a HAR file")],
)  # fmt: skip
def test_unreadable_captures(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c"
    path.write_bytes(content)
    with pytest.raises(CaptureError, match=message):
        read_capture(path)


def test_capture_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               demo_key: Any) -> None:  # fmt: skip
    assert main(["replay", str(EXAMPLE), str(tmp_path / "missing.flows")]) == 2
    assert "authgate replay: cannot read" in capsys.readouterr().err
    assert main(["replay", str(EXAMPLE), str(EXAMPLE), "--at", "yesterday"]) == 2
    assert "authgate replay: Invalid isoformat string: 'yesterday'" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "nope.yaml"), str(EXAMPLE)]) == 2
    assert "cannot read the policy" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, expected",
    [(None, None), ("capture", "capture"), ("1800000000", 1_800_000_000.0),
     ("2026-11-26T17:50:40Z", 1_795_715_440.0), ("2026-11-26T17:50:40", 1_795_715_440.0),
     ("2026-11-26T18:50:40+01:00", 1_795_715_440.0)],
)  # fmt: skip
def test_parse_at(text: str | None, expected: float | str | None) -> None:
    assert parse_at(text) == expected


def test_a_policy_matching_hosts_reads_the_recorded_host(tmp_path: Path) -> None:
    har = tmp_path / "h.har"
    entries = [{"request": {"method": "GET", "url": f"http://{h}/x", "headers": []}}
               for h in ("a.test", "b.test")]  # fmt: skip
    har.write_text(json.dumps({"log": {"entries": entries}}))
    policy = parse_policy("version: 1\nrules:\n  - {name: a, match: {path: /x, host: a.test}, "
                          "allow: anyone}\n", "p.yaml")  # fmt: skip
    assert statuses(policy, read_capture(har), None) == [200, 404]
