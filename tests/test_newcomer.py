"""What a new user meets first, as real commands: the tools on the shipped
policies right after set-up, refusals that name the fix, the docs naming only
files that exist, and the demo, token and explain options the docs show."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from authgate.tools.demo import banner

ROOT = Path(__file__).resolve().parent.parent
AUTHGATE = [sys.executable, "-m", "authgate.cli"]


def authgate(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AUTHGATE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A copy of the shipped policies without the demo keys, as a fresh clone has."""
    shutil.copytree(ROOT / "policies", tmp_path / "policies", ignore=shutil.ignore_patterns("keys"))
    assert not (tmp_path / "policies" / "keys").exists()
    return tmp_path


# --- the tools right after set-up ------------------------------------------------


def test_demo_keys_then_every_tool_works_on_the_example(fresh: Path) -> None:
    # `make install` (which `make test` and `make run` both run) makes the keys.
    makefile = (ROOT / "Makefile").read_text()
    assert "install: $(STAMP) policies/keys/jwks.json" in makefile
    assert "authgate demo-keys policies/keys" in makefile
    made = authgate("demo-keys", "policies/keys", cwd=fresh)
    assert made.returncode == 0, made.stderr
    assert (fresh / "policies/keys/jwks.json").is_file()
    assert (fresh / "policies/keys/demo-private.pem").is_file()
    for args in (
        ("check", "policies/example.yaml"),
        ("test", "policies/example.yaml"),
        ("explain", "policies/example.yaml", "GET", "/health"),
    ):
        r = authgate(*args, cwd=fresh)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    token = authgate("token", "--sub", "alice", "--role", "user", cwd=fresh)
    assert token.returncode == 0 and token.stdout.count(".") == 2, token.stderr


def test_demo_keys_are_kept_once_made(fresh: Path) -> None:
    authgate("demo-keys", "policies/keys", cwd=fresh)
    first = (fresh / "policies/keys/jwks.json").read_bytes()
    authgate("demo-keys", "policies/keys", cwd=fresh)
    assert (fresh / "policies/keys/jwks.json").read_bytes() == first


# --- refusals that name the fix --------------------------------------------------


def test_run_without_a_policy_refuses_naming_the_option() -> None:
    r = authgate("run", "--upstream", "http://127.0.0.1:9")
    assert r.returncode == 2
    assert "--policy" in r.stderr
    assert "policies/example.yaml" not in r.stdout + r.stderr  # no demo default


def test_an_upstream_without_a_scheme_is_refused_with_the_fix() -> None:
    r = authgate("run", "--policy", "policies/example.yaml", "--upstream", "127.0.0.1:9000")
    assert r.returncode == 2
    assert "--upstream http://127.0.0.1:9000" in r.stderr


# --- the demo prints what fits the policy it serves --------------------------------


def test_the_demo_banner_fits_the_example(tmp_path: Path) -> None:
    keys = ROOT / "policies" / "keys"
    text = banner("http://127.0.0.1:8080", keys, ROOT / "policies" / "example.yaml")
    assert "curl" in text and "/api/admin" in text


def test_the_demo_banner_prints_no_example_requests_for_another_policy() -> None:
    keys = ROOT / "policies" / "keys"
    text = banner("http://127.0.0.1:8080", keys, ROOT / "policies" / "api-keys.yaml")
    assert "curl" not in text
    assert "api-keys.tests.yaml" in text and "authgate test" in text


# --- htpasswd as `htpasswd -B` writes it --------------------------------------------


def test_an_htpasswd_of_cost_05_loads_and_check_warns(tmp_path: Path) -> None:
    import bcrypt

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(5)).decode().replace("$2b$", "$2y$", 1)
    (tmp_path / "users.htpasswd").write_text(f"alice:{hashed}\n")
    (tmp_path / "p.yaml").write_text(
        "version: 1\nrealm: api\nauthn:\n  basic:\n    htpasswd: users.htpasswd\n"
        "rules:\n  - {name: a, match: {path: /a}, allow: authenticated}\n"
    )
    r = authgate("check", str(tmp_path / "p.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr  # loads: a warning, not an error
    assert "weak-password-hash" in r.stdout
    assert authgate("check", "--strict", str(tmp_path / "p.yaml")).returncode == 1
    assert "htpasswd -B -C 10 FILE alice" in r.stdout


def test_an_apr1_entry_names_its_line_and_the_command_that_replaces_it(tmp_path: Path) -> None:
    (tmp_path / "users.htpasswd").write_text(
        "# legacy\nbob:$apr1$JxSX5TkP$fJOXOsAvW.0x4jr0U8V7a0\n"
    )
    (tmp_path / "p.yaml").write_text(
        "version: 1\nrealm: api\nauthn:\n  basic:\n    htpasswd: users.htpasswd\n"
        "rules:\n  - {name: a, match: {path: /a}, allow: authenticated}\n"
    )
    r = authgate("check", str(tmp_path / "p.yaml"))
    assert r.returncode == 2
    assert "users.htpasswd:2:" in r.stderr + r.stdout
    assert "htpasswd -B -C 10 FILE bob" in r.stderr + r.stdout


# --- token and explain options ------------------------------------------------------


def test_token_typ_sets_the_header() -> None:
    r = authgate("token", "--sub", "alice", "--typ", "at+jwt")
    assert r.returncode == 0, r.stderr
    head = r.stdout.strip().split(".")[0]
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    assert header["typ"] == "at+jwt"


def test_explain_json_is_one_object() -> None:
    r = authgate("explain", "policies/example.yaml", "GET", "/api/profile", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["status"], d["outcome"], d["reason"], d["rule"]) == (
        401,
        "deny",
        "no_credentials",
        "profile",
    )
    assert d["response_headers"]["WWW-Authenticate"] == 'Bearer realm="api"'
    assert d["trace"]


def test_explain_shows_what_report_mode_does(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\nrealm: api\nmode: report\n"
        "rules:\n  - {name: a, match: {path: /a}, allow: nobody}\n"
    )
    r = authgate("explain", str(tmp_path / "p.yaml"), "GET", "/a")
    assert r.returncode == 0, r.stderr
    assert "=> would deny: 403 Forbidden" in r.stdout
    assert "forwarded to the backend instead: GET /a" in r.stdout
    d = json.loads(authgate("explain", str(tmp_path / "p.yaml"), "GET", "/a", "--json").stdout)
    assert (d["outcome"], d["forwarded_target"]) == ("would_deny", "/a")


def test_explain_shows_expiry_as_a_time_people_read() -> None:
    token = authgate("token", "--sub", "alice", "--ttl=-2h").stdout.strip()
    r = authgate("explain", "policies/example.yaml", "GET", "/api/profile", "--token", token)
    assert re.search(r"expired \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(2 h \d+ min ago\)", r.stdout), (
        r.stdout
    )


@pytest.fixture
def jwks_server() -> Iterator[str]:
    body = (ROOT / "policies" / "keys" / "jwks.json").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    server.shutdown()
    server.server_close()


def test_the_tools_fetch_keys_from_a_jwks_url(tmp_path: Path, jwks_server: str) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\nrealm: api\nauthn:\n  jwt:\n    - name: idp\n      issuer: https://issuer.example\n"
        f"      audience: api\n      algorithms: [RS256]\n      jwks_url: {jwks_server}\n"
        "rules:\n  - {name: a, match: {path: /a}, allow: authenticated}\n"
    )
    token = authgate("token", "--sub", "alice").stdout.strip()
    r = authgate("explain", str(tmp_path / "p.yaml"), "GET", "/a", "--token", token, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == 200


def test_the_tools_say_when_they_cannot_fetch_keys(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\nrealm: api\nauthn:\n  jwt:\n    - name: idp\n      issuer: https://issuer.example\n"
        "      audience: api\n      algorithms: [RS256]\n      jwks_url: http://127.0.0.1:9/jwks\n"
        "rules:\n  - {name: a, match: {path: /a}, allow: authenticated}\n"
    )
    token = authgate("token", "--sub", "alice").stdout.strip()
    r = authgate("explain", str(tmp_path / "p.yaml"), "GET", "/a", "--token", token)
    assert "cannot fetch the keys of https://issuer.example" in r.stderr
    assert "503" in r.stdout


# --- the docs name only files that exist -------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
NAMED = re.compile(
    r"(?<![\w./-])((?:policies|docs|tests|addon)/[\w./-]+\.(?:yaml|md|py|txt|jsonl|json))"
)
# Files the docs tell the reader to create, or that commands create.
MADE_BY_THE_READER = {
    "policies/my-policy.yaml",
    "policies/my-policy.tests.yaml",
    "policies/my-base.yaml",
    # written by the documented `authgate learn` and `authgate import openapi`
    "policies/learnt.yaml",
    "policies/bookshop.yaml",
    "policies/bookshop.tests.yaml",
}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_the_docs_name_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (doc.parent / target).exists():
            missing.append(target)
    for named in NAMED.findall(text):
        named = named.rstrip(".")
        if named in MADE_BY_THE_READER or named.startswith("policies/keys/"):
            continue
        if not (ROOT / named).exists():
            missing.append(named)
    assert missing == []


# --- every shipped policy can be tried: the demo identity provider -------------------------


def test_the_demo_provider_serves_identity_provider_yaml_end_to_end(
    start_gateway: Any, backend: Any, tmp_path: Path
) -> None:
    from authgate.tools.demo import IDP_REALM, start_idp
    from conftest import send

    provider = start_idp(ROOT / "policies" / "keys", "127.0.0.1", 0)
    try:
        port = provider.server_address[1]
        issuer = f"http://127.0.0.1:{port}{IDP_REALM}"
        text = (ROOT / "policies" / "identity-provider.yaml").read_text()
        policy = tmp_path / "identity-provider.yaml"  # it reads no file beside it
        policy.write_text(text.replace("127.0.0.1:8999", f"127.0.0.1:{port}"))
        gw = start_gateway(policy)
        mint = ["token", "--iss", issuer, "--claim", "client_id=web", "--sub", "dave"]
        good = authgate(*mint, "--typ", "at+jwt").stdout.strip()
        plain = authgate(*mint).stdout.strip()
        ok = send(gw.address, "GET", "/api/x", [("Authorization", f"Bearer {good}")])
        assert ok.status == 200
        assert backend.seen[0].header("X-Auth-Subject") == "dave"
        no_typ = send(gw.address, "GET", "/api/x", [("Authorization", f"Bearer {plain}")])
        assert no_typ.status == 401 and "invalid_token" in (no_typ.header("WWW-Authenticate") or "")
    finally:
        provider.shutdown()
        provider.server_close()


def test_the_demo_banner_with_the_provider_shows_its_tokens() -> None:
    text = banner(
        "http://127.0.0.1:8080",
        ROOT / "policies" / "keys",
        ROOT / "policies" / "identity-provider.yaml",
        "http://127.0.0.1:8999/realms/demo",
    )
    assert "--typ at+jwt --claim client_id=web" in text
    assert "http://127.0.0.1:8999/realms/demo/jwks" in text


# --- issue 23: what a new user still trips on ----------------------------------------


def test_token_finds_the_demo_key_from_any_folder(tmp_path: Path) -> None:
    r = authgate("token", "--sub", "alice", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count(".") == 2, r.stderr


def test_token_without_a_demo_key_names_the_fix(tmp_path: Path) -> None:
    # The project's key is not found when authgate seems installed elsewhere.
    code = (
        "import sys, authgate.tools.keys as k; k.__file__ = '/nowhere/a/b/c/keys.py'; "
        "from authgate.cli import main; sys.exit(main(['token', '--sub', 'alice']))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (2, "")
    assert "authgate demo-keys" in r.stderr and "--key FILE" in r.stderr


@pytest.mark.parametrize("ttl", ["-1h", "-30m"])
def test_token_ttl_takes_a_negative_value_as_written(ttl: str) -> None:
    r = authgate("token", "--sub", "alice", "--ttl", ttl, "--role", "user")
    assert r.returncode == 0, r.stderr
    body = r.stdout.strip().split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert claims["exp"] < claims["iat"] + 120 and claims["roles"] == ["user"]
    assert "expected one argument" in authgate("token", "--sub", "a", "--ttl", "--role", "x").stderr


def test_help_is_for_users_and_version_names_mitmproxy() -> None:
    from importlib.metadata import version

    top = authgate("--help").stdout
    assert "dispatch" not in top and "An auth gateway" in top
    v = authgate("--version")
    assert v.returncode == 0
    assert v.stdout == f"authgate {version('authgate')} (mitmproxy {version('mitmproxy')})\n"
    for command, line in [("token", "Mint a signed JWT"), ("check", "Validate policies"),
                          ("demo", "The gateway and a demo backend")]:  # fmt: skip
        assert line in authgate(command, "--help").stdout, command
    assert "(default: 127.0.0.1:9000)" in " ".join(authgate("demo", "--help").stdout.split())


def test_a_second_demo_names_the_port_and_how_to_move(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = authgate("demo", "--listen", f"127.0.0.1:{port}", "--backend", "127.0.0.1:0")
    assert r.returncode == 2
    assert f"127.0.0.1:{port} (the gateway) is already in use" in r.stderr
    assert re.search(
        r'make run ARGS="--listen 127\.0\.0\.1:\d+ --backend 127\.0\.0\.1:\d+"', r.stderr
    )


def test_files_the_docs_make_in_the_repository_are_ignored() -> None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "capture.flows", ".venv312"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.stdout.split() == ["capture.flows", ".venv312"]
