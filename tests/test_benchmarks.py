"""The benchmark suite itself: asv must discover and check it (a helper named ``time_*`` in
benchmarks/ is taken for a benchmark and breaks ``asv run``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_asv_suite_passes_asv_check():
    pytest.importorskip("asv")
    result = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "No problems found" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
