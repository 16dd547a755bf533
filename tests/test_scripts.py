"""The GPU tools in scripts/ import without running anything and answer ``--help`` (CPU only)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parents[1] / "scripts").glob("*.py"))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_scripts():
    assert {p.name for p in SCRIPTS} >= {"gpu_crossover.py", "gpu_micro.py", "gpu_profile.py", "gpu_tune.py"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_and_answers_help(path):
    module = load(path)  # importing runs nothing: the work is in main()
    assert module.__doc__ and callable(module.main)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    assert "usage:" in out.getvalue() and len(out.getvalue().splitlines()) > 2


def test_gpu_tune_prints_the_launch_table(capsys):
    assert load(Path(__file__).parents[1] / "scripts" / "gpu_tune.py").main(["--show"]) == 0
    printed = capsys.readouterr().out
    assert "forward" in printed and "dkdv" in printed and "maxnreg=168" in printed


def test_gpu_distributed_runs_on_two_cpu_processes_and_agrees_with_one(tmp_path):
    """scripts/gpu_distributed.py under torchrun with gloo: the check against the single-device call
    is exact in float64, and every row has its step and exchange times."""
    import json
    import os
    import socket
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "scripts" / "gpu_distributed.py"
    out = tmp_path / "rows.json"
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(script),
         "--cpu", "--seq_lens", "256", "--heads", "4", "--kv_heads", "1", "--dim", "16", "--check", "128",
         "--repeats", "1", "--min_seq_len", "32", "--block_size", "16", "--sample_size", "16", "--json", str(out)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    check = next(json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"check"'))
    assert max(check["relative_errors"].values()) < 1e-12
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    assert all(r["step_ms"] > 0 and r["exchange_ms"] > 0 for r in rows)
