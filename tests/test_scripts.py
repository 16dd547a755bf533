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
