"""`make bench-instructions`: instructions per request under callgrind."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from authgate.tools import bench_instructions as bi

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 4181974513\n", 4181974513),
        ("events: Ir\ntotals: 12\n", 12),
        ("events: Ir\n", 0),  # an empty dump (counting never switched on)
        ("", 0),
    ],
)
def test_parse_summary(text: str, want: int) -> None:
    assert bi.parse_summary(text) == want


def test_report_states_the_goals_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    bi.report(
        {
            "lean master": 4_200_000,
            "lean master, cached dispatch": 2_940_000,
            "authgate, example policy, allow (200)": 3_234_000,
        }
    )
    out = capsys.readouterr().out
    assert "mitmproxy's hook dispatch: 30% of the lean master's instructions" in out
    assert "authgate's own cost on an allowed request: +10.0% over the same master (x0.91" in out
    assert "authgate run / the lean master as shipped: x1.30" in out


@pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="valgrind is not installed")
def test_counts_a_server_under_callgrind() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "authgate.tools.bench_instructions",
            "--requests",
            "3",
            "--only",
            "cached dispatch",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # valgrind starts mitmproxy slowly, more so on a busy machine
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"^  lean master, cached dispatch\s+([\d,]+)$", out.stdout, re.M)
    assert m is not None, out.stdout
    # A forwarded request costs mitmproxy about a million instructions or more.
    assert int(m.group(1).replace(",", "")) > 500_000
