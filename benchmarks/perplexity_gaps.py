"""Issue 18's judgement of estimators over one or more perplexity runs (``perplexity.py`` JSONs).

For each HyperAttention setting with ``--layers`` patched: its NLL gap to exact attention (mnats,
± the standard error of the paired per-sequence gap), as a fraction of the equal-cost local
window's gap and of the paper estimator's gap (block 256 + 256 uniform samples, same layers) in
the same run; then, over the runs, the worst fraction of each setting and whether every run meets
the goals (at most ``--of_window`` of the window's gap and ``--of_paper`` of the paper's).  A model
retrained per run differs from run to run, so only fractions within a run are compared.

    python benchmarks/perplexity_gaps.py benchmarks/results/perplexity_lm32k_32768*.json [--window 512]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

#: the paper estimator's parameters (``estimator="paper"``), found among a run's rows by these
PAPER = dict(block_size=256, sample_size=256, sink_keys=0, band_keys=0, sampling="uniform")


def paired_gap(row: dict, exact: dict) -> tuple[float, float]:
    """(mean, standard error) in mnats of ``row``'s per-sequence NLL minus ``exact``'s."""
    gaps = [a - b for a, b in zip(row["nll_per_sample"], exact["nll_per_sample"], strict=True)]
    mean = sum(gaps) / len(gaps)
    if len(gaps) < 2:
        return mean * 1e3, math.nan
    variance = sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)
    return mean * 1e3, math.sqrt(variance / len(gaps)) * 1e3


def setting_name(row: dict) -> str:
    """A HyperAttention row's label without its layers (the same setting across runs)."""
    return row["label"].replace(f"hyper {row['layers']} ", "", 1)


def run_gaps(result: dict, window: int, layers: str) -> list[dict]:
    """One run's HyperAttention rows with ``layers`` patched: name, gap, se, of_window, of_paper
    (None where the run has no paper row)."""
    rows = result["rows"]
    exact = next(r for r in rows if r["method"] == "sdpa")
    windows = [r for r in rows if r["method"] == "window" and r.get("window") == window]
    if not windows:
        raise SystemExit(f"{result.get('tag', 'a run')}: no exact window of {window} keys "
                         f"(windows: {sorted(r['window'] for r in rows if r['method'] == 'window')})")
    window_gap = paired_gap(windows[0], exact)[0]
    hyper = [r for r in rows if r["method"] == "hyper" and r["layers"] == layers]
    paper = next((r for r in hyper if all(r["params"].get(k) == v for k, v in PAPER.items())), None)
    paper_gap = None if paper is None else paired_gap(paper, exact)[0]
    out = []
    for row in hyper:
        gap, se = paired_gap(row, exact)
        out.append(dict(name=setting_name(row), gap=gap, se=se, of_window=gap / window_gap,
                        of_paper=None if paper_gap is None else gap / paper_gap))
    return out


def summarize(runs: dict[str, list[dict]], of_window: float, of_paper: float) -> list[dict]:
    """Per setting present in every run: the worst fractions and whether every run meets both goals."""
    names = [row["name"] for row in next(iter(runs.values()))]
    summary = []
    for name in names:
        found = [next((r for r in rows if r["name"] == name), None) for rows in runs.values()]
        if any(r is None for r in found):
            continue
        worst_window = max(r["of_window"] for r in found)
        papers = [r["of_paper"] for r in found if r["of_paper"] is not None]
        worst_paper = max(papers) if len(papers) == len(found) else None
        meets = worst_window <= of_window and worst_paper is not None and worst_paper <= of_paper
        summary.append(dict(name=name, worst_of_window=worst_window, worst_of_paper=worst_paper, meets=meets))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="perplexity.py JSON files, one per run")
    parser.add_argument("--window", type=int, default=512, help="the equal-cost local window (keys)")
    parser.add_argument("--layers", default="all", help="the patched layers compared (a --layers value of the runs)")
    parser.add_argument("--of_window", type=float, default=1 / 3, help="goal: at most this of the window's gap")
    parser.add_argument("--of_paper", type=float, default=1 / 2, help="goal: at most this of the paper's gap")
    args = parser.parse_args(argv)
    runs = {}
    for path in args.results:
        result = json.loads(path.read_text())
        runs[f"{path.name} ({result.get('commit', '?')})"] = rows = run_gaps(result, args.window, args.layers)
        print(f"{path.name}: commit {result.get('commit', '?')}, {result.get('card', '?')}, layers {args.layers}")
        for r in rows:
            paper = "   -" if r["of_paper"] is None else f"{r['of_paper']:.2f}"
            print(f"  {r['name']:45s} {r['gap']:+7.2f} ± {r['se']:.2f} mnats  of window {r['of_window']:.2f}"
                  f"  of paper {paper}")
    print(f"over {len(runs)} run(s), goals: <= {args.of_window:.2f} of the window's gap, <= {args.of_paper:.2f} of "
          f"the paper's")
    for s in summarize(runs, args.of_window, args.of_paper):
        paper = "   -" if s["worst_of_paper"] is None else f"{s['worst_of_paper']:.2f}"
        print(f"  {s['name']:45s} worst of window {s['worst_of_window']:.2f}  worst of paper {paper}"
              f"  {'meets' if s['meets'] else 'does not meet'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
