"""The benchmark suite itself: asv must discover and check it (a helper named ``time_*`` in
benchmarks/ is taken for a benchmark and breaks ``asv run``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_asv_suite_passes_asv_check():
    pytest.importorskip("asv")
    result = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "No problems found" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


@pytest.fixture
def harness(monkeypatch):
    """benchmarks/harness.py (benchmarks/ is not a package)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import harness

    return harness


def test_interleaved_timing_alternates_methods_and_takes_medians(harness, monkeypatch):
    """measure_steps_interleaved samples A, B, A, B, ... (each with its own steps per sample, and
    untimed warm-up steps before it when its steps are short) and returns each method's median; the
    CUDA parts are replaced by a fake clock."""
    order = []
    fake_seconds = {"a": iter([5.0, 1.0, 3.0, 9.0, 2.0]), "b": iter([4.0, 4.0, 8.0, 6.0, 7.0])}
    steps = {"a": lambda: "a", "b": lambda: "b"}
    # a's steps take 0.25 s: two warm-up steps fill GPU_WARM_SECONDS; b's 1 s ones need none
    monkeypatch.setattr(harness, "GPU_WARM_SECONDS", 0.5)
    monkeypatch.setattr(harness, "INTERLEAVE_BELOW_SECONDS", 10.0)
    monkeypatch.setattr(harness, "_steps_per_sample",
                        lambda step, device, warmup: (2, 0.25) if step() == "a" else (3, 1.0))

    def sample(step, run, warm):
        name = step()
        order.append((name, run, warm))
        return next(fake_seconds[name])

    monkeypatch.setattr(harness, "_gpu_sample", sample)
    medians = harness.measure_steps_interleaved(steps, repeats=5)
    assert order == [("a", 2, 2), ("b", 3, 0)] * 5
    assert medians == {"a": 3.0, "b": 6.0}


def test_methods_with_long_steps_are_timed_one_after_the_other(harness, monkeypatch):
    """A step longer than INTERLEAVE_BELOW_SECONDS (SDPA at large N) would lower the GPU clock for
    the other method's samples: then each method's samples run in a row."""
    order = []
    monkeypatch.setattr(harness, "_steps_per_sample",
                        lambda step, device, warmup: (1, 0.5) if step() == "a" else (4, 0.005))
    monkeypatch.setattr(harness, "_gpu_sample", lambda step, run, warm: order.append(step()) or 1.0)
    harness.measure_steps_interleaved({"a": lambda: "a", "b": lambda: "b"}, repeats=3)
    assert order == ["a"] * 10 + ["b"] * 10  # 10: b's short samples ask for more


def test_single_layer_reports_single_call_latency_on_the_cpu(harness, tmp_path):
    """``single_layer.py --latency`` on the CPU: a lone call's latency per method and its speed-up
    beside the loop figures, no CUDA-graph figures (there is no GPU), and the JSON and table written."""
    import json

    import single_layer

    single_layer.main(["--device", "cpu", "--dtype", "float32", "--backend", "reference", "--seq_lens", "512",
                       "--heads", "2", "--dim", "16", "--min_seq_len", "128", "--block_size", "32",
                       "--sample_size", "32", "--repeats", "1", "--latency", "--out", str(tmp_path), "--tag", "t"])
    row = json.loads((tmp_path / "t.json").read_text())["rows"][0]
    for method in ("sdpa", "hyper"):
        assert row[method]["single_ms"] > 0 and "graph_ms" not in row[method]
    assert row["single_speedup"] == row["sdpa"]["single_ms"] / row["hyper"]["single_ms"]
    assert row["graph_speedup"] is None
    assert (tmp_path / "t.png").exists()


def test_estimators_benchmark_writes_every_family_setting_and_mode(monkeypatch, tmp_path):
    """benchmarks/estimators.py on a small N: one row per family x causal x setting, the exact
    window's normaliser below the true one, HyperAttention's errors finite."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import estimators

    estimators.main(["--n", "256", "--seeds", "1", "--heads", "1", "--dim", "16", "--block_size", "32",
                     "--sample_size", "32", "--sinks", "8", "--band", "16", "--min_seq_len", "64",
                     "--model_bands", "24", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "estimators.json").read_text())["rows"]
    assert len(rows) == 5 * (6 + 11)  # families x (non-causal settings + causal ones: the bands' five more)
    assert "band 24 + b32 s64" in {row["setting"] for row in rows if row["causal"]}
    assert {row["family"] for row in rows} == {"gaussian", "clustered", "sinks", "copy", "local"}
    assert {row["setting"] for row in rows if not row["causal"]} == {
        "paper b32 s32", "stratified b32 s32 (default)", "sinks 8 + b32 s24", "sinks 8 + b32 s32", "key_norm b32 s32",
        "window 64"}
    assert "estimator='band': band 64 + b32 s64" in {row["setting"] for row in rows if row["causal"]}
    assert all(np.isfinite(row["rel_to_v"]) for row in rows)
    assert all(row["normaliser_ratio"] < 1 for row in rows if row["setting"].startswith("window"))


def test_estimator_cost_parses_settings_and_refuses_without_a_gpu(monkeypatch):
    """benchmarks/estimator_cost.py: settings as perplexity.py takes them, a clear error for an
    unknown name, and without CUDA a clear refusal (it times GPU kernels)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import estimator_cost

    assert estimator_cost.parse_setting("band_keys=128, sample_size=128") == {"band_keys": 128, "sample_size": 128}
    assert estimator_cost.parse_setting("") == {}
    with pytest.raises(SystemExit, match="expected name=value"):
        estimator_cost.parse_setting("bands=3")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            estimator_cost.main(["--settings", ""])
