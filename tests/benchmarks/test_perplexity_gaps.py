"""``benchmarks/perplexity_gaps.py``: issue 18's fractions of the window's and the paper
estimator's gaps, per run and over runs, on made-up runs whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gaps(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import perplexity_gaps

    return perplexity_gaps


def _hyper(label_setting, params, nll):
    base = dict(block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=4096, sink_keys=0, band_keys=0,
                sampling="stratified", backend="auto")
    return dict(method="hyper", label=f"hyper all {label_setting}", layers="all", params={**base, **params},
                nll_per_sample=nll)


def _run(exact, window, paper, band, commit="abc"):
    return dict(commit=commit, card="card", rows=[
        dict(method="sdpa", label="exact", nll_per_sample=exact),
        dict(method="window", window=512, label="exact, last 512 keys", nll_per_sample=window),
        dict(method="window", window=4096, label="exact, last 4096 keys", nll_per_sample=exact),
        _hyper("paper", dict(sampling="uniform"), paper),
        _hyper("band", dict(band_keys=64, sample_size=64), band),
    ])


def test_fractions_of_the_window_and_paper_gaps_per_run(gaps):
    run = _run(exact=[1.0, 2.0], window=[1.006, 2.006], paper=[1.003, 2.003], band=[1.001, 2.0014])
    rows = {r["name"]: r for r in gaps.run_gaps(run, window=512, layers="all")}
    assert rows["paper"]["gap"] == pytest.approx(3.0) and rows["paper"]["of_paper"] == pytest.approx(1.0)
    assert rows["band"]["gap"] == pytest.approx(1.2)
    assert rows["band"]["se"] == pytest.approx(0.2)  # gaps 1.0 and 1.4 mnats: sd 0.283 / sqrt(2)
    assert rows["band"]["of_window"] == pytest.approx(0.2) and rows["band"]["of_paper"] == pytest.approx(0.4)


def test_every_run_must_meet_both_goals(gaps, tmp_path, capsys):
    good = _run(exact=[1.0], window=[1.006], paper=[1.003], band=[1.0012])      # 0.20 / 0.40
    bad = _run(exact=[1.0], window=[1.006], paper=[1.003], band=[1.0025], commit="def")  # 0.42 / 0.83
    runs = {"good": gaps.run_gaps(good, 512, "all"), "bad": gaps.run_gaps(bad, 512, "all")}
    summary = {s["name"]: s for s in gaps.summarize(runs, 1 / 3, 1 / 2)}
    assert not summary["band"]["meets"] and summary["band"]["worst_of_window"] == pytest.approx(2.5 / 6)
    assert gaps.summarize({"good": runs["good"]}, 1 / 3, 1 / 2)[1]["meets"]
    files = []
    for name, run in (("good.json", good), ("bad.json", bad)):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(run))
    assert gaps.main([str(f) for f in files]) == 0
    out = capsys.readouterr().out
    assert "over 2 run(s)" in out and "does not meet" in out


def test_a_missing_window_is_named(gaps):
    run = _run(exact=[1.0], window=[1.006], paper=[1.003], band=[1.001])
    with pytest.raises(SystemExit, match="no exact window of 1024 keys"):
        gaps.run_gaps(run, window=1024, layers="all")
