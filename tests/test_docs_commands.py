"""The docs' commands, run as written. Every `$ authgate check|test|explain|denials ...`
line in a ```text block of the README or docs/ whose files exist in the
repository is run (bash, with the venv's `authgate` on PATH), and what it
prints must be what the docs show, but for times and dates; every offline
`authgate` line in a ```sh block (token, hash-key, check, ...) must succeed.
(The demo's printed curl commands are run by tests/test_startup.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```text\n(.*?)```", re.S)
RUNNABLE = re.compile(r"^\$ (authgate (?:check|test|explain|denials) .*)$")
# What changes from run to run: clock times and dates.
VARYING = [
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"), "<time>"),
    (re.compile(r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT"), "<date>"),
]


def _sessions() -> list[tuple[str, str, list[str]]]:
    """(where, command, the output the docs show) for each runnable line."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in BLOCK.findall(text):
            lines = block.splitlines()
            for i, line in enumerate(lines):
                m = RUNNABLE.match(line)
                if not m:
                    continue
                command = m.group(1).split("  #")[0].strip()
                files = [w for w in command.split() if w.startswith("policies/")]
                if not all((ROOT / f).exists() for f in files):
                    continue  # a file the reader makes first (my-policy.yaml)
                shown = []
                for later in lines[i + 1 :]:
                    if later.startswith("$ "):
                        break
                    shown.append(later)
                while shown and not shown[-1].strip():
                    shown.pop()
                out.append((f"{doc.name}: {command[:60]}", command, shown))
    return out


def _normal(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        for pattern, stand_in in VARYING:
            line = pattern.sub(stand_in, line)
        out.append(line.rstrip())
    return out


SESSIONS = _sessions()


def test_the_docs_have_sessions_to_run() -> None:
    assert len(SESSIONS) >= 3


@pytest.mark.parametrize("where, command, shown", SESSIONS, ids=[s[0] for s in SESSIONS])
def test_a_documented_session_prints_what_the_docs_show(
    where: str, command: str, shown: list[str]
) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.stderr == "", r.stderr
    printed = r.stdout.rstrip("\n").splitlines()
    assert _normal(printed) == _normal(shown)


SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)
# Offline commands a reader pastes from a ```sh block: run as written.
OFFLINE = re.compile(r"^(?:\.venv/bin/)?authgate (?:token|hash-key|check|test|explain|demo-keys)\b")


def _offline_lines() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for block in SH_BLOCK.findall(doc.read_text(encoding="utf-8")):
            for line in block.splitlines():
                if OFFLINE.match(line):
                    out.append((doc.name, line))
    return out


OFFLINE_LINES = _offline_lines()


def test_the_docs_have_offline_commands_to_paste() -> None:
    assert len(OFFLINE_LINES) >= 2


@pytest.mark.parametrize(
    "where, line", OFFLINE_LINES, ids=[f"{d}: {c[:50]}" for d, c in OFFLINE_LINES]
)
def test_a_pasted_offline_command_works(where: str, line: str) -> None:
    r = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (line, r.stderr)
    if " token " in line:
        assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+\n", r.stdout), r.stdout
