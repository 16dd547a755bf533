"""The kernels compile for sm_90 (Hopper) without a GPU, and the production launches do not spill
registers beyond what was measured to pay off: ``sm90.py`` in a subprocess without the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SM90 = Path(__file__).with_name("sm90.py")


def run_sm90(what: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SM90), what], capture_output=True, text=True, timeout=timeout, env=env)


def test_production_launches_do_not_spill_on_sm90():
    """The forward's launch at D = 64 and 128 and the backward's at D = 128 compile for sm_90
    without spilling registers to local memory, but for at most 128 B of the D = 128 dK/dV launch,
    faster so than the launches that do not spill (D = 64's launches spill far more at D = 128)."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("Triton's cuobjdump is not installed")
    result = run_sm90("spill", timeout=900)
    assert result.returncode == 0 and "no spills" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_kernels_compile_for_sm90_without_a_gpu():
    result = run_sm90("compile", timeout=600)
    assert result.returncode == 0 and "compiled for sm_90" in result.stdout, result.stderr[-3000:]
