"""`make run`: a demo backend, demo keys, and curl commands for every status.

The backend echoes what reached it (method, path, headers) as JSON, so the
identity headers the gateway adds, and the path it forwards, are visible.
"""

from __future__ import annotations

import json
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from authgate.tools.keys import DEMO_KID, JWKS_NAME, ensure_demo_keys, load_private_key, mint


class EchoHandler(BaseHTTPRequestHandler):
    server_version = "authgate-demo-backend"
    protocol_version = "HTTP/1.1"

    # Under /legacy/ the demo backend makes the auth mistakes old services make,
    # so that the gateway's backend lint has something to find (docs/legacy.md,
    # "Fronting a legacy service").
    MISTAKES: dict[str, tuple[int, list[tuple[str, str]]]] = {
        "/legacy/login-required": (401, []),
        "/legacy/members-only": (403, []),
        "/legacy/slow-down": (403, [("Retry-After", "30")]),
        "/legacy/busy": (503, [("X-RateLimit-Remaining", "0")]),
    }

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        mistake = self.MISTAKES.get(self.path.split("?")[0])
        if mistake is not None:
            status, headers = mistake
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = {
            "backend": "authgate demo backend",
            "method": self.command,
            "path": self.path,
            "headers": {k: v for k, v in self.headers.items()},
            "body_bytes": len(body),
        }
        out = json.dumps(data, indent=2).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: object) -> None:
        pass


def start_backend(host: str = "127.0.0.1", port: int = 9000) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), EchoHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="demo-backend", daemon=True).start()
    return server


IDP_REALM = "/realms/demo"  # where policies/identity-provider.yaml looks


def start_idp(keys_dir: Path, host: str = "127.0.0.1", port: int = 8999) -> ThreadingHTTPServer:
    """A stand-in identity provider for policies/identity-provider.yaml: the demo
    key's JWKS at {issuer}/jwks and an OpenID Connect discovery document at
    {issuer}/.well-known/openid-configuration, where the issuer is
    http://HOST:PORT/realms/demo."""
    issuer = f"http://{host}:{port}{IDP_REALM}"
    jwks = (keys_dir / JWKS_NAME).read_bytes()
    discovery = json.dumps({"issuer": issuer, "jwks_uri": f"{issuer}/jwks"}).encode()

    class Provider(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = {
                f"{IDP_REALM}/jwks": jwks,
                f"{IDP_REALM}/.well-known/openid-configuration": discovery,
            }.get(self.path.partition("?")[0])
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "max-age=300")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Provider)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="demo-idp", daemon=True).start()
    return server


def idp_lines(base: str, issuer: str) -> list[tuple[str, str]]:
    """What to try against policies/identity-provider.yaml with `--idp`."""
    token = (
        f"$(.venv/bin/authgate token --iss {issuer} --typ at+jwt --claim client_id=web --sub dave)"
    )
    return [
        ("200 an RFC 9068 access token from the demo provider",
         f'curl -i -H "Authorization: Bearer {token}" {base}/api/x'),
        ("401 the same token without typ at+jwt",
         f'curl -i -H "Authorization: Bearer $(.venv/bin/authgate token --iss {issuer} '
         f'--claim client_id=web --sub dave)" {base}/api/x'),
    ]  # fmt: skip


def curl_lines(base: str, keys_dir: Path) -> list[tuple[str, str]]:
    """(what it shows, command) for each row of the status table."""
    key = load_private_key(keys_dir / "demo-private.pem")
    user = mint(key, sub="alice", roles=["user"], scopes=["profile:read"], ttl=3600)
    admin = mint(key, sub="root", roles=["admin"], scopes=["reports:write"], ttl=3600)
    expired = mint(key, sub="alice", roles=["user"], ttl=-3600)
    q = shlex.quote

    def bearer(token: str) -> str:
        return q(f"Authorization: Bearer {token}")

    return [
        ("200 public route", f"curl -i {base}/health"),
        ("401 no credentials (challenge, no error)", f"curl -i {base}/api/profile"),
        ("200 with a user token", f"curl -i -H {bearer(user)} {base}/api/profile"),
        (
            '401 expired token (error="invalid_token")',
            f"curl -i -H {bearer(expired)} {base}/api/profile",
        ),
        (
            "400 two Authorization fields",
            f"curl -i -H {bearer(user)} -H {bearer(admin)} {base}/api/profile",
        ),
        ("200 alice reads her own record", f"curl -i -H {bearer(user)} {base}/api/users/alice"),
        ("403 alice reads someone else's", f"curl -i -H {bearer(user)} {base}/api/users/bob"),
        ("403 a user on the admin area", f"curl -i -H {bearer(user)} {base}/api/admin/dashboard"),
        (
            "200 an admin on the admin area",
            f"curl -i -H {bearer(admin)} {base}/api/admin/dashboard",
        ),
        (
            "403 insufficient_scope (token lacks reports:write)",
            f"curl -i -X POST -H {bearer(user)} {base}/api/reports",
        ),
        (
            "404 hidden route, same bytes as an unknown path",
            f"curl -i -H {bearer(user)} {base}/api/secrets/x ; curl -i {base}/no/such/path",
        ),
        ("400 path trick", f"curl -i --path-as-is {base}/api/admin%2Fdashboard"),
        (
            "403 blocked IP (127.0.0.2 is on policies/blocklist.txt)",
            f"curl -i --interface 127.0.0.2 {base}/health",
        ),
        (
            "429 after 5 report writes a minute",
            f"for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' -X POST "
            f"-H {bearer(admin)} {base}/api/reports; done; echo",
        ),
    ]


EXAMPLE = "example.yaml"  # the policy the printed requests are written for


def banner(base: str, keys_dir: Path, policy: Path | None = None, idp: str | None = None) -> str:
    """What the demo prints once it serves: requests to paste, each labelled
    with the answer it gets, when the policy is the example they were written
    for (or the identity-provider policy with the demo provider `idp`);
    otherwise where that policy's own requests are."""
    lines = ["", f"authgate demo: gateway on {base}, demo backend behind it."]
    if idp is not None:
        lines += [f"A demo identity provider serves the demo key at {idp}/jwks.", ""]
        for what, cmd in idp_lines(base, idp):
            lines += [f"# {what}", cmd, ""]
        lines.append("Ctrl-C stops the gateway, the demo backend and the provider.")
        return "\n".join(lines)
    if policy is not None and policy.name != EXAMPLE:
        tests = policy.with_name(policy.stem + ".tests.yaml")
        lines += [
            f"The requests the demo prints are written for policies/{EXAMPLE}; for {policy}",
            f"see its own test cases ({tests}): `.venv/bin/authgate test {policy} -v`, and",
            f"ask the gateway why with `.venv/bin/authgate explain {policy} GET /some/path`.",
            "",
            "Ctrl-C stops the gateway and the demo backend.",
        ]
        return "\n".join(lines)
    lines += [
        f"Tokens below are signed with the demo key in {keys_dir}/ (kid {DEMO_KID}),",
        "valid for an hour; mint more with `.venv/bin/authgate token --sub NAME --role R`.",
        "",
    ]
    for what, cmd in curl_lines(base, keys_dir):
        lines += [f"# {what}", cmd, ""]
    lines.append("Ctrl-C stops the gateway and the demo backend.")
    return "\n".join(lines)


def prepare(policy: Path) -> Path:
    """Create the demo keys beside the policy; return their folder."""
    keys_dir = policy.parent / "keys"
    ensure_demo_keys(keys_dir)
    return keys_dir
