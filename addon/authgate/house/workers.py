"""`--workers N` (`authgate run`, `authgate serve`): N processes on one
address, and a supervisor that keeps them running.

Each door serves on one event loop, so one process uses one core. Each
worker is a whole `authgate run` or `authgate serve` (its own policy,
watcher and reload), and all of them bind the same HOST:PORT with
SO_REUSEPORT: the kernel spreads new connections over them, and a worker
that stops listening (draining on SIGTERM, or dead) gets none
(`authgate.proxy.workers.share_port` for mitmproxy's listeners).

The supervisor (this process):
- starts the workers, restarts one that dies (backoff from 0.5 s doubling to
  30 s, reset once it has run a minute), and exits 2 if the workers refuse
  to start (a bad policy or options: each says why on stderr) before any
  of them served;
- forwards SIGHUP (reload) and SIGTERM/SIGINT (drain and stop) to every
  worker, waits for them, and exits;
- serves the admin listener for all (`--admin`): /metrics adds up every
  worker's metrics (prometheus-client's multiprocess mode, in a private
  directory), /status lists the workers, /ready is 200 when all are ready,
  /bans lists every worker's bans and DELETE /bans/KEY has each of them
  lift it (within a second: through a file they read).

Workers learn their part from the environment: AUTHGATE_WORKER (index),
AUTHGATE_STATUS_FILE (where the gateway writes its status every second),
AUTHGATE_LIFTS_FILE (the keys whose bans to lift, one a line, appended),
AUTHGATE_SHARE_PORT=1, PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from authgate.house.admin import AdminServer, Readiness
from authgate.runtime import listhelper

STATUS_STALE_SECONDS = 5.0  # a worker whose status is older is not ready
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 0.5, 30.0, 60.0


def worker_count(text: str) -> int:
    """`--workers`: a positive number, or auto (the cores this process may use)."""
    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--workers must be a positive number or auto, not {text!r}")
    return int(text)


@dataclass
class _Worker:
    index: int
    status_file: Path
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    served: bool = False  # reported a status at least once
    restarts: int = 0
    last_exit: int | None = None


@dataclass
class Supervisor:
    argv: Sequence[str]  # the worker's arguments (no --workers/--admin)
    count: int
    admin: str | None = None
    on_ready: str | None = None
    memory_store: bool = True  # limits per worker: say so
    workers: list[_Worker] = field(default_factory=list)
    command: str = "run"  # the worker: `authgate run` or `authgate serve`

    def run(self) -> int:
        root = Path(tempfile.mkdtemp(prefix="authgate-workers-"))
        metrics_dir = root / "metrics"
        metrics_dir.mkdir()
        self._metrics_dir = metrics_dir
        self._lifts = root / "lifts"
        self._lifts.touch()
        self.workers = [_Worker(i, root / f"worker-{i}.json") for i in range(self.count)]
        stop: list[int] = []

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if signum == signal.SIGHUP:
                self._send(signal.SIGHUP)
            else:
                stop.append(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        server = None
        try:
            if self.admin:
                server = AdminServer(
                    self.admin, self.status, self.ready, self.metrics, self.bans, self.lift
                )
                print(
                    f"authgate: admin on http://{self.admin} (/live /ready /metrics /status /bans)",
                    file=sys.stderr,
                    flush=True,
                )
            for w in self.workers:
                self._start(w, metrics_dir)
            if self.count > 1 and self.memory_store:
                print(
                    f"authgate: {self.count} workers; with the memory store each counts "
                    "rate limits on its own (a limit allows up to N times its rate): "
                    "use --store redis://... for exact limits",
                    file=sys.stderr,
                    flush=True,
                )
            told_ready = False
            while not stop:
                code = self._tend(metrics_dir)
                if code is not None:
                    return code
                if not told_ready and self.ready().ready:
                    told_ready = True
                    if self.on_ready:
                        print(self.on_ready, flush=True)
                time.sleep(0.1)
            # SIGINT to the workers is "now"; SIGTERM is "drain, then stop".
            self._send(signal.SIGINT if stop[0] == signal.SIGINT else signal.SIGTERM)
            self._wait_all(timeout=40.0)
            return 0
        finally:
            if server is not None:
                server.stop()
            for w in self.workers:
                if w.process is not None and w.process.poll() is None:
                    w.process.kill()
            shutil.rmtree(root, ignore_errors=True)

    def _start(self, w: _Worker, metrics_dir: Path) -> None:
        env = dict(os.environ)
        env.update(
            AUTHGATE_WORKER=str(w.index),
            AUTHGATE_STATUS_FILE=str(w.status_file),
            AUTHGATE_LIFTS_FILE=str(self._lifts),
            AUTHGATE_SHARE_PORT="1",
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        )
        # The block-list helper `authgate run` started: the workers take its
        # work rather than each compiling the same lists (listhelper.py).
        helper_env, helper_fds = listhelper.for_workers()
        env.update(helper_env)
        w.status_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "authgate.cli", self.command, *self.argv]
        w.process = subprocess.Popen(cmd, env=env, pass_fds=helper_fds)  # noqa: S603 - our own interpreter and module
        w.started = time.monotonic()

    def _tend(self, metrics_dir: Path) -> int | None:
        """Restart dead workers; an exit code when the supervisor must stop."""
        now = time.monotonic()
        for w in self.workers:
            if not w.served and w.status_file.exists():
                w.served = True
            p = w.process
            if p is not None and p.poll() is not None:
                w.last_exit = p.returncode
                w.process = None
                self._mark_dead(p.pid)
                if not w.served and not any(x.served for x in self.workers):
                    # Refused at start (bad policy, port taken): each worker
                    # said why; restarting would only say it again.
                    self._send(signal.SIGTERM)
                    self._wait_all(timeout=10.0)
                    return p.returncode or 2
                if now - w.started > HEALTHY_AFTER:
                    w.failures = 0
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**w.failures)
                w.failures += 1
                w.restart_at = now + delay
                print(
                    f"authgate: worker {w.index} (pid {p.pid}) exited with {p.returncode}; "
                    f"restarting in {delay:g} s",
                    file=sys.stderr,
                    flush=True,
                )
            if w.process is None and now >= w.restart_at:
                w.restarts += 1
                self._start(w, metrics_dir)
        return None

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self._metrics_dir))

    def _send(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.process is not None and w.process.poll() is None:
                w.process.send_signal(sig)

    def _wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.process is None:
                continue
            try:
                w.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()

    # --- what the admin listener reads -------------------------------------

    def _statuses(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for w in self.workers:
            entry: dict[str, Any] = {
                "worker": w.index,
                "pid": w.process.pid if w.process is not None else None,
                "running": w.process is not None and w.process.poll() is None,
                "restarts": max(0, w.restarts),
                "last_exit": w.last_exit,
            }
            try:
                st = w.status_file.stat()
                entry["status"] = json.loads(w.status_file.read_text())
                entry["status_age"] = round(time.time() - st.st_mtime, 1)
            except (OSError, ValueError):
                entry["status"] = None
            out.append(entry)
        return out

    def status(self) -> dict[str, Any]:
        workers = self._statuses()
        first = next((w["status"] for w in workers if w["status"]), None) or {}
        return {
            "pid": os.getpid(),
            "workers": workers,
            "policy": first.get("policy"),
            "store": first.get("store"),
            "ready": self.ready().ready,
        }

    def ready(self) -> Readiness:
        reasons: list[str] = []
        for w in self._statuses():
            st = w["status"]
            if not w["running"]:
                reasons.append(f"worker {w['worker']} is not running")
            elif st is None:
                reasons.append(f"worker {w['worker']} is starting")
            elif w.get("status_age", 0) > STATUS_STALE_SECONDS:
                reasons.append(f"worker {w['worker']} has not reported for {w['status_age']} s")
            elif not st.get("ready"):
                why = "; ".join(st.get("not_ready") or ["not ready"])
                reasons.append(f"worker {w['worker']}: {why}")
        return Readiness(not reasons, tuple(reasons))

    def bans(self) -> list[dict[str, Any]]:
        """Every worker's bans in force (from their status), one per key:
        with the memory store each worker has its own, on Redis all the same."""
        found: dict[str, dict[str, Any]] = {}
        for w in self._statuses():
            for ban in (w["status"] or {}).get("bans") or []:
                known = found.get(ban["key"])
                if known is None or ban["until"] > known["until"]:
                    found[ban["key"]] = ban
        return [found[k] for k in sorted(found)]

    def lift(self, key: str) -> str | None:
        """Have every worker lift the ban on `key` (each reads the file within
        a second); the key, or None when no worker has a ban on it."""
        from authgate.house.gatehouse import ban_key

        key = ban_key(key)
        if not any(b["key"] == key for b in self.bans()):
            return None
        with self._lifts.open("a") as f:
            f.write(json.dumps(key) + "\n")
        return key

    def metrics(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self._metrics_dir))
        return generate_latest(registry)


def write_status(path: str, status: dict[str, Any]) -> None:
    """A worker's status, replaced in one rename (the supervisor never reads half)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)
