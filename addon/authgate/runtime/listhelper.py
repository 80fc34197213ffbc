"""The block-list helper process: started by `authgate run` before it imports
mitmproxy, so that a big block list compiles on another core meanwhile.

What the helper does and how the loader takes its work (or, whatever goes
wrong, compiles the lists itself): `authgate.policy.blocklists`. Here: starting
it, ending it, and handing it to the workers of `--workers N`, which then wait
for this one compile instead of each running their own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from authgate.policy import blocklists, listcache

ENV = "AUTHGATE_LIST_HELPER"  # `off`: no helper process
HANDED = "AUTHGATE_LIST_HELPER_PIPE"  # "FD FOLDER": a supervisor's helper, for its workers
CGROUPS = Path("/sys/fs/cgroup")


def cores() -> float:
    """The cores this process may use: its CPU affinity, or a cgroup's CPU
    quota (a container's or a service's CPU limit) when that is lower."""
    try:
        usable = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        usable = float(os.cpu_count() or 1)
    quota = cpu_quota()
    return usable if quota is None else min(usable, quota)


def cpu_quota(proc: Path = Path("/proc/self/cgroup"), root: Path = CGROUPS) -> float | None:
    """The CPU quota on this process's own cgroup, in cores (cgroup v2's
    `cpu.max`, v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None without one."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        fields = line.split(":", 2)  # ID:CONTROLLERS:PATH
        if len(fields) != 3:
            continue
        controllers, where = fields[1], fields[2].strip().lstrip("/")
        if not controllers:  # v2 (hybrid systems mount it at unified/)
            for f in (root / where / "cpu.max", root / "unified" / where / "cpu.max"):
                words = _read(f).split()
                if len(words) == 2 and words[0] != "max":
                    found.append(_ratio(words[0], words[1]))
        elif "cpu" in controllers.split(","):
            folder = root / "cpu" / where
            quota = _read(folder / "cpu.cfs_quota_us").strip()
            if quota and not quota.startswith("-"):
                found.append(_ratio(quota, _read(folder / "cpu.cfs_period_us").strip()))
    found = [f for f in found if f > 0]
    return min(found) if found else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _ratio(quota: str, period: str) -> float:
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return 0.0  # unreadable: no quota


def start(policy: str) -> None:
    """Start compiling the policy's block lists in a helper process, or, in a
    worker, expect the supervisor's. Does nothing when it is off, with less
    than two cores to use (the helper would only take the gateway's), when the
    policy names no `block_files`, or when no process can be started."""
    handed = os.environ.pop(HANDED, None)  # for this process, not its children
    if handed is not None:
        fd, _, where = handed.partition(" ")
        try:
            os.set_inheritable(int(fd), False)
        except (ValueError, OSError):
            return
        blocklists.expect(int(fd), Path(where))
        return
    if os.environ.get(ENV, "").strip().lower() == "off" or cores() < 2:
        return
    try:
        if b"block_files" not in Path(policy).read_bytes():
            return  # no lists (a key spelled with escapes: the loader compiles them)
    except OSError:
        return  # the loader says why
    folder = listcache.folder()  # the helper makes it, if it has anything to store
    temporary = folder is None
    if folder is None:
        try:
            folder = Path(tempfile.mkdtemp(prefix="authgate-lists-"))  # 0700
        except OSError:
            return
    done, write_end = os.pipe()
    try:
        end = _spawn(policy, folder, write_end)
    except OSError:
        os.close(done)
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
        return
    finally:
        os.close(write_end)

    def cleanup() -> None:
        end()
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)

    blocklists.expect(done, folder, cleanup)
    atexit.register(blocklists.release)  # when the first load never came


def _spawn(policy: str, folder: Path, write_end: int) -> Callable[[], None]:
    """Start the helper (blocklists.work) with the pipe's write end; a function
    that ends it (killed if still running) and reaps it. Raises OSError."""
    gateway = os.getpid()
    if hasattr(os, "fork") and threading.active_count() == 1:
        # A fork: everything the helper runs is imported already (a new
        # interpreter spends ~0.1 s importing it). Only in a process with no
        # other thread, whose locks a fork could copy held.
        pid = os.fork()
        if pid == 0:  # the helper: never returns
            code = 1
            try:
                quiet = os.open(os.devnull, os.O_RDWR)
                for std in (0, 1, 2):
                    os.dup2(quiet, std)
                blocklists.work(policy, folder, write_end, gateway)
                code = 0
            finally:
                os._exit(code)

        def end_fork() -> None:
            try:
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # reaped already

        return end_fork
    # -P: nothing from the working directory on the module path.
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-P",
            "-m",
            blocklists.__name__,
            policy,
            str(folder),
            str(write_end),
            str(gateway),
        ],  # fmt: skip
        pass_fds=(write_end,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def end_process() -> None:
        if process.poll() is None:
            process.kill()
        process.wait()

    return end_process


def for_workers() -> tuple[dict[str, str], tuple[int, ...]]:
    """What a supervisor's workers need to take this process's helper: the
    environment to add and the file descriptor to pass."""
    expected = blocklists.expected()
    if expected is None:
        return {}, ()
    fd, folder = expected
    return {HANDED: f"{fd} {folder}"}, (fd,)
