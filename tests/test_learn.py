"""`authgate learn`: a capture the real gateway wrote (report mode, so that
everything reached the recording backend, which refuses some requests itself)
with tokens of several users, learnt from through the command line; the
proposal is then checked and replayed. Also a HAR file, and the pure parts
(identifier segments, parameter names) as tables."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.cli import main
from authgate.core.decision import RequestView
from authgate.core.paths import PathPattern, canonicalize
from authgate.policy.load import load_policy
from authgate.tools.learn import Seen as Learned
from authgate.tools.learn import id_kind, param_names, routes
from authgate.tools.replay import Recorded, judge_all, read_capture
from conftest import EXAMPLE, POLICIES, Answer, Backend, Seen, send

Token = Callable[..., str]

ALICE = {"sub": "alice", "roles": ["user"]}
BOB = {"sub": "bob", "roles": ["user"]}
CAROL = {"sub": "carol", "roles": ["user"]}
ROOT = {"sub": "root", "roles": ["admin"]}
WRITER = {"sub": "writer", "scopes": ["reports:write"]}
UUIDS = [str(uuid.UUID(int=n * 7919)) for n in range(1, 4)]
TAGS = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white", "olive",
        "navy", "teal", "maroon"]  # fmt: skip

# (method, target, claims or None): every request sent through the gateway.
TRAFFIC: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/health", None),
    ("GET", "/health", None),
    *[("GET", f"/api/users/{u['sub']}", u) for u in (ALICE, BOB, CAROL) for _ in (1, 2)],
    *[("PUT", f"/api/users/{u['sub']}", u) for u in (ALICE, BOB, CAROL)],
    ("GET", "/api/users/bob", ROOT),  # an admin reads another's record
    ("GET", "/api/users/bob", ALICE),  # the backend refuses this one: 403
    ("GET", "/api/users/me", ALICE),
    ("GET", "/api/users/me", BOB),
    ("GET", "/api/admin/stats", ROOT),
    ("GET", "/api/admin/stats", ROOT),
    *[("GET", f"/api/items/{n}", (ALICE, WRITER, ROOT)[n % 3]) for n in range(1, 13)],
    *[("GET", f"/api/catalog/{u}", None) for u in UUIDS],
    ("GET", f"/api/catalog/{UUIDS[0]}", ALICE),
    *[("GET", f"/api/tags/{t}", None) for t in TAGS],
    ("POST", "/api/reports", WRITER),
    ("POST", "/api/reports", WRITER),
    ("GET", "/login", None),  # the backend redirects: 302 is a success too
    ("GET", "/nowhere", None),  # the backend has no such page: 404
]
FAILED = 2  # the backend's 403 and 404

BASE = """version: 1
authn:
  jwt:
    - name: demo
      issuer: https://issuer.example
      audience: api
      algorithms: [RS256]
      jwks_file: keys/jwks.json
      roles_claim: roles
      scope_claim: scope
rules:
  - name: health
    match: {path: /health, methods: [GET]}
    allow: anyone
"""

# What learning must propose after the base's health rule, in this order:
# (name, path, methods, allow).
LEARNT = [
    ("api-admin-stats", "/api/admin/stats", ["GET"], {"role": "admin"}),
    ("api-catalog-id", "/api/catalog/*", ["GET"], "anyone"),
    ("api-items-id", "/api/items/*", ["GET"], "authenticated"),
    ("api-reports", "/api/reports", ["POST"], {"scope": "reports:write"}),
    ("api-tags-id", "/api/tags/*", ["GET"], "anyone"),
    ("api-users-me", "/api/users/me", ["GET"], {"role": "user"}),
    ("api-users-id-get", "/api/users/{id}", ["GET"],
     {"any": [{"claim": "sub", "equals": "{id}"}, {"role": "admin"}]}),
    ("api-users-id-put", "/api/users/{id}", ["PUT"], {"claim": "sub", "equals": "{id}"}),
    ("login", "/login", ["GET"], "anyone"),
]  # fmt: skip


def answer(seen: Seen) -> Answer | None:
    """The backend's own opinions: alice may not read bob; /login redirects."""
    if seen.target == "/api/users/bob" and seen.header("X-Auth-Subject") == "alice":
        return 403, [], b"not yours"
    if seen.target == "/nowhere":
        return 404, [], b"no such page"
    if seen.target == "/login":
        return 302, [("Location", "/")], b""
    return None


@pytest.fixture
def base(tmp_path: Path, demo_key: Any) -> Path:
    """A base policy in a folder of its own, with the demo keys it names."""
    folder = tmp_path / "base"
    (folder / "keys").mkdir(parents=True)
    shutil.copy(POLICIES / "keys" / "jwks.json", folder / "keys" / "jwks.json")
    path = folder / "base.yaml"
    path.write_text(BASE)
    return path


@pytest.fixture
def capture(start_gateway: Any, backend: Backend, token: Token, tmp_path: Path) -> Path:
    """The real gateway in report mode with save_stream_file, in front of the backend."""
    backend.answer = answer
    path = tmp_path / "capture.flows"
    gw = start_gateway(EXAMPLE, f"save_stream_file={path}", "authgate_mode=report")
    for method, target, claims in TRAFFIC:
        headers = [("Authorization", f"Bearer {token(**claims)}")] if claims else []
        body = b"{}" if method in ("POST", "PUT") else b""
        send(gw.address, method, target, headers, body)
    assert len(backend.seen) == len(TRAFFIC)  # report mode: everything reached it
    gw.stop()
    return path


def learnt_rules(path: Path) -> list[tuple[Any, ...]]:
    doc = yaml.safe_load(path.read_text())
    return [(r["name"], r["match"]["path"], r["match"].get("methods"), r["allow"])
            for r in doc["rules"]]  # fmt: skip


def test_learning_from_a_gateway_capture(
    capture: Path, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "proposed" / "learnt.yaml"
    out.parent.mkdir()
    assert main(["learn", str(capture), "--policy", str(base), "--output", str(out)]) == 0
    summary = capsys.readouterr().err
    assert learnt_rules(out) == [("health", "/health", ["GET"], "anyone"), *LEARNT]
    doc = yaml.safe_load(out.read_text())
    assert doc["mode"] == "report" and doc["authn"]["jwt"][0]["jwks_file"] == (
        "../base/keys/jwks.json")  # fmt: skip
    successes = len(TRAFFIC) - FAILED
    assert summary.splitlines()[0] == (
        f"{capture}: {len(TRAFFIC)} requests: {successes} answered 2xx/3xx by the backend "
        "(learnt from), 2 answered otherwise, 0 unanswered or answered by the gateway itself "
        "(not learnt from)"
    )
    for line in [
        f"identities of those {successes} (verified by the authn of {base}, as of each "
        "request's time): "
        f"{sum(1 for *_, c in TRAFFIC if c) - 1} with valid credentials (5 subjects), "
        f"{sum(1 for *_, c in TRAFFIC if not c) - 1} without",
        "kept from the base: rule health (2 requests)",
        "  /api/catalog/{id} (3 values: UUIDs)",
        "  /api/items/{id} (12 values: numbers)",
        "  /api/tags/{id} (12 values: more than 10 distinct values)",
        "  /api/users/{id} (3 values: callers' subjects)",
        "  api-users-id-get: GET /api/users/{id} (7 requests) -> ownership or role admin",
        "    {id} was the caller's sub in 6 of 7, and the other one had role admin; not role "
        "admin alone: alice (role user), bob (role user), carol (role user) came for their own",
        "  api-users-id-put: PUT /api/users/{id} (3 requests) -> ownership ({id} is the "
        "caller's sub)",
        "  api-admin-stats: GET /api/admin/stats (2 requests) -> role admin",
        "    all 2 had role admin (held by 1 caller in the capture); not ownership: no "
        "parameter in the path",
        "  api-items-id: GET /api/items/{id} (12 requests) -> authenticated",
        "    all 12 carried valid credentials; not a role or scope: none common to all of "
        "alice (role user), root (role admin), writer (scope reports:write); not ownership: "
        "{id} was the caller's sub in 0 of 12",
        "  api-catalog-id: GET /api/catalog/{id} (4 requests) -> anyone",
        "    3 of 4 carried no valid credentials",
        "  api-reports: POST /api/reports (2 requests) -> scope reports:write",
        f"check: the proposal allows all {successes} successful requests (as of their time)",
        f"authgate learn: wrote {out} (mode: report)",
    ]:
        assert line in summary.splitlines(), line

    # It passes `authgate check`, strictly (no warning either).
    assert main(["check", "--strict", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: ok (10 rules, 0 tests)\n"

    # `authgate replay` shows every request the backend accepted as allowed,
    # and refuses the two it did not.
    records = read_capture(capture)
    decisions = judge_all(load_policy(out), records, None)
    for r, d in zip(records, decisions, strict=True):
        ok = r.status is not None and r.status < 400
        assert d.allowed == ok, (r.request.method, r.request.target, d.reason)
    assert main(["replay", str(out), str(capture), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_status"] == {
        "200": successes, "403": 1, "404": 1}  # fmt: skip


def test_the_capture_tells_the_backend_from_the_gateway(
    start_gateway: Any, backend: Backend, token: Token, tmp_path: Path
) -> None:
    """Enforcing, the gateway answers denials itself: those are not successes,
    even a 303 to the login page."""
    path = tmp_path / "enforce.flows"
    gw = start_gateway(POLICIES / "browser-app.yaml", f"save_stream_file={path}")
    browser = [("Accept", "text/html"), ("Sec-Fetch-Mode", "navigate")]
    assert send(gw.address, "GET", "/app/home", browser).status == 303
    assert send(gw.address, "GET", "/nowhere").status == 404
    gw.stop()
    assert backend.seen == []  # the backend saw nothing of either
    assert [r.status for r in read_capture(path)] == [None, None]


def test_a_har_file_and_credentials_that_do_not_verify(
    base: Path, tmp_path: Path, token: Token, capsys: pytest.CaptureFixture[str]
) -> None:
    """A HAR written here: a forged token (another key) that the backend
    accepted counts as no identity; the gateway would answer it 401."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from authgate.tools.keys import mint

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = mint(other, sub="mallory", roles=["admin"])
    good = token(sub="alice", roles=["user"])

    def entry(path: str, status: int, bearer: str | None) -> dict[str, Any]:
        headers = [{"name": "Authorization", "value": f"Bearer {bearer}"}] if bearer else []
        return {"startedDateTime": "2026-12-01T10:00:00Z",
                "request": {"method": "GET", "url": f"https://api.example{path}",
                            "headers": headers},
                "response": {"status": status}}  # fmt: skip

    entries = [entry("/api/news/7", 200, good), entry("/api/news/8", 200, forged),
               entry("/api/news/9", 200, None), entry("/api/profile", 200, good),
               entry("/api/broken", 500, good), entry("/api/slow", 0, good)]  # fmt: skip
    har = tmp_path / "browser.har"
    har.write_text(json.dumps({"log": {"version": "1.2", "entries": entries}}))
    assert [r.status for r in read_capture(har)] == [200, 200, 200, 200, 500, None]
    out = tmp_path / "base" / "learnt.yaml"
    args = ["learn", str(har), "--policy", str(base), "--output", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert learnt_rules(out)[1:] == [
        ("api-news-id", "/api/news/*", ["GET"], "anyone"),
        ("api-profile", "/api/profile", ["GET"], {"role": "user"}),
    ]
    assert (
        "request's time): 2 with valid credentials (1 subject), 1 without, 1 whose credentials "
        "do not verify (bad_signature ×1), counted as no identity"
    ) in err, err
    assert "    2 of 3 carried no valid credentials (1 of them with credentials that do not " \
        "verify)\n" in err  # fmt: skip
    # The gateway verifies a token before any rule: a forged one is 401, even on `anyone`.
    assert "check: the proposal allows 3 of 4 successful requests; the others, as it would " \
        "answer them:\n  401 invalid_token (api-news-id): 1\n" in err  # fmt: skip
    assert yaml.safe_load(out.read_text())["authn"]["jwt"][0]["jwks_file"] == "keys/jwks.json"

    # On standard output, without --output; HAR entries all come from --peer.
    assert main(["learn", str(har), "--policy", str(base), "--peer", "192.0.2.7"]) == 0
    text = capsys.readouterr().out
    assert '  - name: api-news-id\n    match: {path: "/api/news/*", methods: [GET]}\n' in text


def test_more_distinct_values_than_max_literals(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["ada", "bea", "cy", "dot"]
    entries = [{"request": {"method": "GET", "url": f"http://x/shop/{n}", "headers": []},
                "response": {"status": 200}} for n in names]  # fmt: skip
    har = tmp_path / "shop.har"
    har.write_text(json.dumps({"log": {"entries": entries}}))
    assert main(["learn", str(har), "--policy", str(base), "--max-literals", "3"]) == 0
    assert 'path: "/shop/*"' in capsys.readouterr().out
    assert main(["learn", str(har), "--policy", str(base), "--max-literals", "4"]) == 0
    text = capsys.readouterr().out
    assert [n for n in names if f'path: "/shop/{n}"' in text] == names


def test_errors_exit_2(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    har = tmp_path / "failed.har"
    har.write_text(json.dumps({"log": {"entries": [
        {"request": {"method": "GET", "url": "http://x/a", "headers": []},
         "response": {"status": 404}}]}}))  # fmt: skip
    assert main(["learn", str(har), "--policy", str(base)]) == 2
    assert "nothing to learn from" in capsys.readouterr().err
    assert main(["learn", str(tmp_path / "missing.flows"), "--policy", str(base)]) == 2
    assert "authgate learn: cannot read" in capsys.readouterr().err
    assert main(["learn", str(har), "--policy", str(tmp_path / "nope.yaml")]) == 2
    assert "authgate learn: " in capsys.readouterr().err
    assert main(["learn", str(har), "--policy", str(base), "--max-literals", "0"]) == 2
    assert "--max-literals must be at least 1" in capsys.readouterr().err


def test_the_proposal_loads_from_the_folder_it_is_written_to(
    base: Path, tmp_path: Path, token: Token, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Hardening 2, item 11: `authgate learn ... > elsewhere/learnt.yaml` wrote
    the base's file paths relative to the current folder, so the policy did not
    load from where it landed. Standard output gets absolute paths (and says
    so); --output FILE, paths relative to FILE's folder."""
    (base.parent / "blocked.txt").write_text("192.0.2.0/24\n")
    base.write_text(BASE.replace("rules:\n", "ip: {block_files: [blocked.txt]}\nrules:\n"))
    bearer = [{"name": "Authorization", "value": f"Bearer {token(sub='alice', roles=['user'])}"}]
    har = tmp_path / "p.har"
    har.write_text(json.dumps({"log": {"entries": [
        {"request": {"method": "GET", "url": "http://x/api/feed", "headers": bearer},
         "response": {"status": 200}}]}}))  # fmt: skip
    here = tmp_path / "a" / "b"  # not the depth of the base's folder nor the output's
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    base_arg = str(Path("..", "..", "base", "base.yaml"))
    keys, blocked = (base.parent / "keys" / "jwks.json").resolve(), (base.parent / "blocked.txt")

    # `> elsewhere/learnt.yaml`: absolute paths, said in the header.
    assert main(["learn", str(har), "--policy", base_arg]) == 0
    text = capsys.readouterr().out
    redirected = tmp_path / "elsewhere" / "learnt.yaml"
    redirected.parent.mkdir()
    redirected.write_text(text)
    doc = yaml.safe_load(text)
    assert doc["authn"]["jwt"][0]["jwks_file"] == str(keys)
    assert doc["ip"]["block_files"] == [str(blocked.resolve())]
    assert (
        "# Its file paths are absolute (it was written to standard output, so they cannot\n"
        "# be relative to its folder); --output FILE writes them relative to FILE's folder.\n"
    ) in text
    assert load_policy(redirected).rules[-1].name == "api-feed"
    assert main(["check", str(redirected)]) == 0
    capsys.readouterr()

    # --output FILE (given relative to here): relative to FILE's folder.
    (tmp_path / "c").mkdir()
    assert main(["learn", str(har), "--policy", base_arg, "--output", "../../c/learnt.yaml"]) == 0
    written = tmp_path / "c" / "learnt.yaml"
    doc = yaml.safe_load(written.read_text())
    assert doc["authn"]["jwt"][0]["jwks_file"] == str(Path("..", "base", "keys", "jwks.json"))
    assert doc["ip"]["block_files"] == [str(Path("..", "base", "blocked.txt"))]
    assert "absolute" not in written.read_text()
    monkeypatch.chdir(tmp_path)  # loads from anywhere
    assert load_policy(written).rules[-1].name == "api-feed"
    assert main(["check", str(written)]) == 0


# --- the pure parts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "segment, kind",
    [("42", "numbers"), ("007", "numbers"), (UUIDS[0], "UUIDs"),
     ("0f3a9c1e", "hex ids"), ("5f8d0d55b54764421b7156c3", "hex ids"),
     ("aZ3kX9pQ2mN8vB4c", "opaque ids"), ("01HZX3J5K8M2N4P6Q8R0S2T4V6", "opaque ids"),
     ("alice", "callers' subjects"), ("a*b", "values a pattern cannot spell"),
     ("users", None), ("me", None), ("deadbeef", None), ("v2", None),
     ("reports-2024", None), ("index.html", None)],
)  # fmt: skip
def test_identifier_segments(segment: str, kind: str | None) -> None:
    assert id_kind(segment, {"alice"}) == kind


@pytest.mark.parametrize(
    "parts, names",
    [(["users", None], ("id",)),
     (["users", None, "orders", None], ("user_id", "order_id")),
     ([None, None], ("id", "id2")),
     (["api", "v1", None, None], ("v1_id", "id")),
     (["bus", None, "9s", None], ("bus_id", "id"))],
)  # fmt: skip
def test_parameter_names(parts: list[str | None], names: tuple[str, ...]) -> None:
    assert param_names(parts) == names


def test_base_rules_come_first_and_keep_their_requests(
    base: Path, tmp_path: Path, token: Token, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request a base rule matches is that rule's (nothing learnt for it);
    a base rule that would deny what the backend accepted is said."""
    base.write_text(
        BASE + "  - {name: profile, match: {path: /api/profile}, allow: {role: admin}}\n"
    )
    bearer = [{"name": "Authorization", "value": f"Bearer {token(sub='alice', roles=['user'])}"}]
    entries = [{"request": {"method": "GET", "url": f"http://x{p}", "headers": bearer},
                "response": {"status": 200}} for p in ("/api/profile", "/api/feed")]  # fmt: skip
    har = tmp_path / "p.har"
    har.write_text(json.dumps({"log": {"entries": entries}}))
    out = tmp_path / "base" / "learnt.yaml"
    assert main(["learn", str(har), "--policy", str(base), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert [r[0] for r in learnt_rules(out)] == ["health", "profile", "api-feed"]
    assert "kept from the base: rule profile (1 request; it would deny 1 of them)\n" in err
    assert "check: the proposal allows 1 of 2 successful requests; the others, as it would " \
        "answer them:\n  403 forbidden (profile): 1\n" in err  # fmt: skip


def test_a_capture_without_credentials_behind_the_gateway_is_flagged(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Identity headers the gateway added, but no credential: a gateway with
    forward_credentials: false wrote it; the requests count as anonymous."""
    headers = [{"name": "X-Auth-Subject", "value": "alice"}]
    entries = [{"request": {"method": "GET", "url": "http://x/api/me", "headers": headers},
                "response": {"status": 200}}]  # fmt: skip
    har = tmp_path / "stripped.har"
    har.write_text(json.dumps({"log": {"entries": entries}}))
    assert main(["learn", str(har), "--policy", str(base)]) == 0
    captured = capsys.readouterr()
    assert "warning: 1 requests carry the gateway's X-Auth-Subject but no credential" in (
        captured.err)  # fmt: skip
    assert "allow: anyone" in captured.out


SEGMENT = st.one_of(
    st.sampled_from(["api", "users", "me", "orders", "v1", "a.b", "x~y"]),
    st.integers(0, 10**6).map(str),
    st.uuids().map(str),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(SEGMENT, max_size=4), min_size=1, max_size=30), st.integers(1, 4))
def test_every_request_matches_its_own_route_first(paths: list[list[str]], k: int) -> None:
    """Whatever the paths, each request's route is the first whose pattern
    matches it: templating never loses a request nor lets a rule shadow it."""
    seen = []
    for segs in paths:
        path = canonicalize("/" + "/".join(segs))
        view = RequestView.build("GET", path.path, [], "127.0.0.1")
        enc = tuple(s for s in path.path.split("/") if s)
        seen.append(Learned(Recorded(view, None, 200), 0.0, "GET", enc, path.segments, None, ""))
    found = routes(seen, frozenset(), k)
    patterns = [PathPattern.parse(r.template) for r in found]
    for index, route in enumerate(found):
        for s in route.seen:
            first = next(i for i, p in enumerate(patterns) if p.match(s.segments) is not None)
            assert first == index, (s.segments, route.template)
    assert sum(len(r.seen) for r in found) == len(seen)
