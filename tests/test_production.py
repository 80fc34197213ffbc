"""Running in production, as docs/production.md says: the admin listener,
signals (SIGHUP reload, SIGTERM drain), and `--workers N`.

Real `authgate run` processes in front of the recording backend; a real
identity provider for readiness; real signals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    EXAMPLE,
    POLICIES,
    REQUEST_SECONDS,
    START_SECONDS,
    UNBUFFERED_ENV,
    Answer,
    Backend,
    Seen,
    send,
    wait_until,
)
from test_startup import free_port, wait_for_port

BIN = Path(sys.executable).parent


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=REQUEST_SECONDS) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def status(port: int) -> Any:
    code, body = get(port, "/status")
    assert code == 200
    return json.loads(body)


class Gateway:
    """`authgate run ...` as a subprocess, with its output kept in a file."""

    def __init__(self, tmp: Path, *args: str, name: str = "gw") -> None:
        self.port = free_port()
        self.admin = free_port()
        self.log = tmp / f"{name}.out"
        cmd = [str(BIN / "authgate"), "run", "--listen", f"127.0.0.1:{self.port}"]
        cmd += ["--admin", f"127.0.0.1:{self.admin}", *args]
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, text=True, env=UNBUFFERED_ENV
        )

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, seconds: float = START_SECONDS) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}: {self.output()}")
            try:
                return get(self.admin, "/ready")[0] == 200
            except OSError:
                return False

        wait_until(ready, seconds, every=0.1, what=f"/ready 200 on the admin port {self.admin}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(START_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[Gateway]]:
    running: list[Gateway] = []
    yield running
    for g in running:
        g.stop()


def run(gateways: list[Gateway], tmp: Path, *args: str, name: str = "gw") -> Gateway:
    g = Gateway(tmp, *args, name=name)
    gateways.append(g)
    return g


# --- the admin listener -------------------------------------------------------------------


def test_admin_endpoints_answer_for_one_process(
    gateways: list[Gateway], tmp_path: Path, backend: Backend, token: Any
) -> None:
    g = run(gateways, tmp_path, "--policy", str(EXAMPLE), "--upstream", backend.url)
    g.wait_ready()
    assert get(g.admin, "/live") == (200, b"live\n")
    code, body = get(g.admin, "/ready")
    assert code == 200 and json.loads(body) == {"ready": True, "reasons": []}
    assert send(g.address, "GET", "/api/profile").status == 401
    ok = send(
        g.address, "GET", "/api/profile", [("Authorization", f"Bearer {token(roles=['user'])}")]
    )
    assert ok.status == 200
    st = status(g.admin)
    assert st["policy"] == str(EXAMPLE)
    assert st["store"] == {"kind": "memory"}
    assert st["pid"] == g.proc.pid
    assert st["decisions"] == 2 and st["reload_error"] is None
    assert st["in_flight"] == 0  # answered flows, denied or forwarded, leave the count
    code, metrics = get(g.admin, "/metrics")
    text = metrics.decode()
    assert code == 200
    assert 'authgate_decisions_total{decision="deny",reason="no_credentials"' in text
    assert 'authgate_decisions_total{decision="allow",reason="allowed"' in text
    assert get(g.admin, "/nowhere")[0] == 404
    assert len(backend.seen) == 1  # the 401 reached nothing


def test_ready_is_503_until_the_identity_provider_has_given_keys(
    gateways: list[Gateway], tmp_path: Path, backend: Backend, demo_key: Any
) -> None:
    from authgate.tools.demo import IDP_REALM, start_idp

    idp_port = free_port()
    issuer = f"http://127.0.0.1:{idp_port}{IDP_REALM}"
    policy = tmp_path / "idp.yaml"
    policy.write_text(
        "version: 1\nauthn:\n  jwt:\n    - name: idp\n"
        f"      issuer: {issuer}\n      audience: api\n      algorithms: [RS256]\n"
        f"      jwks_url: {issuer}/jwks\n      jwks_refresh_cooldown: 1s\n"
        "rules:\n  - name: api\n    match: {path: '/api/**'}\n    allow: authenticated\n"
    )
    g = run(gateways, tmp_path, "--policy", str(policy), "--upstream", backend.url)
    wait_for_port(g.admin, g.proc)
    code, body = get(g.admin, "/ready")
    assert code == 503
    assert any(f"no keys yet for issuer {issuer}" in r for r in json.loads(body)["reasons"])
    assert get(g.admin, "/live")[0] == 200  # alive, just not ready
    idp = start_idp(POLICIES / "keys", port=idp_port)
    try:
        # The next scheduled fetch: 1 s backoff, doubling, up to 64 s apart.
        g.wait_ready(seconds=120)
    finally:
        idp.shutdown()
        idp.server_close()


# --- signals -------------------------------------------------------------------------------


def one_route(policy: Path, path: str) -> Path:
    """(Re)write a policy of one public route."""
    policy.write_text(
        f"version: 1\nrules:\n  - {{name: r, match: {{path: {path}}}, allow: anyone}}\n"
    )
    return policy


def test_sighup_reloads_the_policy(
    gateways: list[Gateway], tmp_path: Path, backend: Backend
) -> None:
    policy = one_route(tmp_path / "p.yaml", "/old")
    g = run(
        gateways, tmp_path, "--policy", str(policy), "--upstream", backend.url,
        "--set", "authgate_watch=false",
    )  # fmt: skip
    g.wait_ready()
    assert send(g.address, "GET", "/old").status == 200
    one_route(policy, "/new")
    time.sleep(1.5)
    assert send(g.address, "GET", "/new").status == 404  # not watching: nothing changed
    assert [x.target for x in backend.seen] == ["/old"]  # the 404 reached nothing
    g.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status(g.admin)["reloads"] == 1)
    assert send(g.address, "GET", "/new").status == 200
    assert send(g.address, "GET", "/old").status == 404
    # A broken policy on SIGHUP: the last good one keeps serving, and says why.
    policy.write_text("version: 1\nrules: [{name: x}]\n")
    g.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status(g.admin)["reload_error"])
    assert str(policy) in status(g.admin)["reload_error"]
    assert send(g.address, "GET", "/new").status == 200
    assert g.proc.poll() is None


def test_sigterm_lets_requests_in_flight_finish_and_takes_no_new_ones(
    gateways: list[Gateway], tmp_path: Path, backend: Backend
) -> None:
    # The backend holds /slow until the test has seen the listener closed: the
    # request is in flight for as long as that takes on a busy machine (within
    # the gateway's 25 s grace), never by a fixed sleep that the drain may outlast.
    release = threading.Event()

    def held(seen: Seen) -> Answer | None:
        if seen.target != "/slow":
            return None
        release.wait(20)
        return (200, [], b"slow")

    backend.answer = held
    policy = tmp_path / "open.yaml"
    policy.write_text("version: 1\nrules:\n  - {name: all, match: {path: '/**'}, allow: anyone}\n")
    g = run(gateways, tmp_path, "--policy", str(policy), "--upstream", backend.url)
    g.wait_ready()
    result: dict[str, Any] = {}

    def slow() -> None:
        try:
            result["reply"] = send(g.address, "GET", "/slow")
        except BaseException as e:
            print("SEND FAILED", repr(e))
            raise

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: any(s.target == "/slow" for s in backend.seen))
    g.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(g.address, timeout=REQUEST_SECONDS).close()
        except OSError:
            return True
        return False

    # No new connections once draining (the listener is closed)...
    wait_until(refused, seconds=15, what="the listener closed")
    assert t.is_alive() and g.proc.poll() is None  # ...with /slow still in flight...
    with pytest.raises(OSError):
        socket.create_connection(g.address, timeout=REQUEST_SECONDS).close()
    release.set()
    # ...which gets its answer, and then the gateway exits 0.
    t.join(REQUEST_SECONDS)
    assert result["reply"].status == 200 and result["reply"].body == b"slow"
    assert g.proc.wait(START_SECONDS) == 0
    assert "waiting up to 25 s for requests in flight" in g.output()


# --- several processes ---------------------------------------------------------------------


def test_workers_share_the_address_and_a_dead_one_is_replaced(
    gateways: list[Gateway], tmp_path: Path, backend: Backend
) -> None:
    g = run(
        gateways, tmp_path, "--policy", str(EXAMPLE), "--upstream", backend.url,
        "--workers", "2",
    )  # fmt: skip
    g.wait_ready()
    st = status(g.admin)
    pids = [w["pid"] for w in st["workers"]]
    assert len(set(pids)) == 2 and all(w["running"] for w in st["workers"])
    assert "each counts rate limits on its own" in g.output()
    for _ in range(40):  # new connections: the kernel spreads them over both
        assert send(g.address, "GET", "/api/profile").status == 401

    def both_served() -> bool:
        return all((w["status"] or {}).get("decisions", 0) > 0 for w in status(g.admin)["workers"])

    wait_until(both_served)

    def total() -> int:  # the workers report every second
        return sum((w["status"] or {}).get("decisions", 0) for w in status(g.admin)["workers"])

    wait_until(lambda: total() == 40)
    _, metrics = get(g.admin, "/metrics")  # one endpoint, every worker's counts
    assert (
        'authgate_decisions_total{decision="deny",reason="no_credentials",rule="profile",status="401"}'
        " 40.0" in metrics.decode()
    )
    assert backend.seen == []

    os.kill(pids[0], signal.SIGKILL)
    # Once the kernel has closed the dead worker's socket (connections queued
    # on it are reset), the other worker takes every new connection...
    wait_until(lambda: status(g.admin)["workers"][0]["pid"] != pids[0])
    for _ in range(10):
        assert send(g.address, "GET", "/api/profile").status == 401
    # ...and the supervisor has started a new one.
    wait_until(lambda: status(g.admin)["workers"][0]["restarts"] == 1)
    g.wait_ready()
    new = status(g.admin)["workers"][0]
    assert new["pid"] not in pids and new["last_exit"] == -signal.SIGKILL
    assert g.stop() == 0


def test_sighup_to_the_supervisor_reloads_every_worker(
    gateways: list[Gateway], tmp_path: Path, backend: Backend
) -> None:
    policy = one_route(tmp_path / "p.yaml", "/old")
    g = run(
        gateways, tmp_path, "--policy", str(policy), "--upstream", backend.url,
        "--workers", "2", "--set", "authgate_watch=false",
    )  # fmt: skip
    g.wait_ready()
    one_route(policy, "/new")
    g.proc.send_signal(signal.SIGHUP)

    def all_reloaded() -> bool:
        return all((w["status"] or {}).get("reloads") == 1 for w in status(g.admin)["workers"])

    wait_until(all_reloaded)
    for _ in range(10):  # whichever worker takes the connection
        assert send(g.address, "GET", "/new").status == 200
        assert send(g.address, "GET", "/old").status == 404
    assert {x.target for x in backend.seen} == {"/new"}  # no /old reached the backend
    assert g.stop() == 0


def test_workers_refuse_a_bad_policy_before_serving(tmp_path: Path, backend: Backend) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: a\n    match: {path: /x, methods: GETT}\n")
    port = free_port()
    proc = subprocess.run(
        [
            str(BIN / "authgate"), "run", "--policy", str(bad), "--upstream", backend.url,
            "--listen", f"127.0.0.1:{port}", "--workers", "2",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{bad}:3: rules[0] needs 'allow'" in proc.stderr
    assert "listening at" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers must be a positive number or auto"),
        (["--workers", "two"], "--workers must be a positive number or auto"),
        (["--admin", "nowhere"], "argument --admin: expected HOST:PORT"),
        (["--store", "mysql://x"], "redis://"),
        (["--workers", "2", "--web"], "use it without --workers"),
    ],
)
def test_run_refuses_bad_production_flags(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [
            str(BIN / "authgate"), "run", "--policy", str(EXAMPLE), "--upstream",
            "http://127.0.0.1:9", "--listen", f"127.0.0.1:{free_port()}", *args,
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


# --- the page's commands ------------------------------------------------------------------


def _documented_runs() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "production.md").read_text()
    runs = []
    for block in text.split("```sh\n")[1:]:
        body = block.split("```", 1)[0].replace("\\\n", " ")
        runs += [line.strip() for line in body.splitlines() if " authgate run " in f" {line} "]
    return runs


def test_the_production_page_has_commands() -> None:
    assert len(_documented_runs()) >= 6


@pytest.mark.parametrize("line", _documented_runs())
def test_every_documented_run_command_parses_and_its_flags_are_valid(line: str) -> None:
    """The flags the page shows exist and take what it gives them (the
    behaviour behind each is tested above and in test_production_redis.py and
    test_tls.py)."""
    import shlex

    from authgate.cli import parser
    from authgate.house.admin import parse_address
    from authgate.house.workers import worker_count
    from authgate.runtime.redis_store import parse_store_url

    words = shlex.split(line)  # an environment assignment may come first
    args = parser().parse_args(words[words.index("run") :])
    worker_count(args.workers)
    if args.store != "memory":
        parse_store_url(args.store)
    if args.admin:
        parse_address(args.admin)


def test_the_demo_logs_decisions_and_run_does_not(
    gateways: list[Gateway], tmp_path: Path, backend: Backend
) -> None:
    g = run(gateways, tmp_path, "--policy", str(EXAMPLE), "--upstream", backend.url)
    logged = run(
        gateways, tmp_path, "--policy", str(EXAMPLE), "--upstream", backend.url,
        "--set", "authgate_log=-", name="logged",
    )  # fmt: skip
    g.wait_ready()
    logged.wait_ready()
    assert send(g.address, "GET", "/health").status == 200
    assert send(g.address, "GET", "/api/profile").status == 401
    assert send(logged.address, "GET", "/api/profile").status == 401
    # The positive control first: the logging one has written its line...
    wait_until(lambda: '"reason":"no_credentials"' in logged.output())
    time.sleep(0.5)
    # ...and by then, and half a second more, the other has written none.
    assert '"decision":' not in g.output()
