"""Estimators at (about) the same cost, on the synthetic families of ``quality.py`` and one with
local keys (``local``): the paper's (sorted block diagonal + uniform samples), with
stratified samples, with samples drawn by key norm (``sampling="key_norm"``), with attention sinks
(``sink_keys``), with a band of previous keys (``band_keys``, causal calls), and the local window
that attends to as many keys per row exactly (the yardstick every user asks about).

Cost here is nominal keys per row (block + samples + sinks + band width; the window's width; a
band's exact rows actually cost w rows times each rectangle's keys): the GPU kernel time is
measured separately (``benchmarks/estimator_cost.py``).  Per family, causal or not, averaged over
seeds: ‖O − O*‖/‖V‖, the mean |lse − lse*|, and the normaliser's mean ratio exp(lse − lse*)
over seeds (1 for an unbiased normaliser; an exact window's is below 1: it drops the mass
outside it).

    python benchmarks/estimators.py                  # CPU, reference backend, float64
    python benchmarks/estimators.py --n 4096 --seeds 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path

import numpy as np

import hyperattn
from hyperattn import testing

try:  # run as a script (python benchmarks/estimators.py) or imported from the benchmarks folder
    from quality import FAMILIES
except ImportError:  # pragma: no cover
    from benchmarks.quality import FAMILIES


#: ``quality.py``'s families and one with locality (``hyperattn.testing.local_drift_inputs``):
#: every row's heaviest keys are its neighbours, as in a language model's local heads.  Neighbours
#: there are also near in key space, so the sorted LSH blocks find them: it tells locality in
#: content apart from locality in position (what a band covers).
ESTIMATOR_FAMILIES = {**FAMILIES, "local": testing.local_drift_inputs}


def settings(block: int, samples: int, sinks: int, band: int, causal: bool,
             model_bands: tuple[int, ...] = ()) -> dict[str, dict | int]:
    """name -> HyperAttention parameters, or the width of a local window (an int).  The band
    settings are for causal calls only; ``model_bands``: widths w of the "band w + 64 samples"
    settings that the perplexity benchmark compares (README, Estimators)."""
    chosen = {
        f"paper b{block} s{samples}": dict(block_size=block, sample_size=samples, estimator="paper"),
        f"stratified b{block} s{samples} (default)": dict(block_size=block, sample_size=samples),
        f"sinks {sinks} + b{block} s{samples - sinks}": dict(block_size=block, sample_size=samples - sinks,
                                                            sink_keys=sinks),
        f"sinks {sinks} + b{block} s{samples}": dict(block_size=block, sample_size=samples, sink_keys=sinks),
        f"key_norm b{block} s{samples}": dict(block_size=block, sample_size=samples, sampling="key_norm"),
    }
    if causal:
        chosen[f"estimator='band': band 64 + b{block} s64"] = dict(block_size=block, estimator="band")
        chosen[f"band 64 + b{block} s64 key_norm"] = dict(block_size=block, sample_size=64, band_keys=64,
                                                          sampling="key_norm")
        chosen[f"band {band} + b{block} s{samples - band}"] = dict(block_size=block, sample_size=samples - band,
                                                                   band_keys=band)
        chosen[f"sinks {sinks} + band {band} + b{block} s{samples - band}"] = dict(
            block_size=block, sample_size=samples - band, band_keys=band, sink_keys=sinks)
        for width in model_bands:
            chosen[f"band {width} + b{block} s64"] = dict(block_size=block, sample_size=64, band_keys=width)
    chosen[f"window {block + samples}"] = block + samples
    return chosen


def window_weights(n: int, width: int, causal: bool) -> np.ndarray:
    """[n, n] 0/1: causal, the previous ``width`` keys (itself included); else the ``width`` keys
    centred on the row (clipped at the ends)."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    if causal:
        return ((j <= i) & (j > i - width)).astype(float)
    return (np.abs(i - j) <= width // 2).astype(float)


def measure(args) -> list[dict]:
    rows = []
    for family, make in ESTIMATOR_FAMILIES.items():
        for causal in (False, True):
            results: dict[str, list] = {}
            for seed in range(args.seeds):
                q, k, v = make(np.random.default_rng(1000 * seed + args.n), args.heads, args.n, args.dim)
                want_out, want_lse = testing.exact_attention_f64(q, k, v, causal=causal)
                for name, setting in settings(args.block_size, args.sample_size, args.sinks, args.band,
                                               causal, tuple(args.model_bands)).items():
                    if isinstance(setting, int):
                        weights = np.broadcast_to(window_weights(args.n, setting, causal), (1, args.heads, args.n, args.n))
                        out, lse = testing.weighted_softmax_attention(q, k, v, weights, args.dim ** -0.5)
                    else:
                        out, lse = hyperattn.attention(q, k, v, causal=causal, seed=seed, return_lse=True,
                                                       backend="reference", lsh_num_projs=args.lsh_num_projs,
                                                       min_seq_len=args.min_seq_len, exact_crossover=False, **setting)
                    results.setdefault(name, []).append((
                        np.linalg.norm(out - want_out) / np.linalg.norm(v), np.abs(lse - want_lse).mean(),
                        np.exp(lse - want_lse)))
            for name, runs in results.items():
                row = {"family": family, "causal": causal, "setting": name,
                       "rel_to_v": float(np.mean([r[0] for r in runs])), "lse_abs": float(np.mean([r[1] for r in runs])),
                       "normaliser_ratio": float(np.mean([r[2] for r in runs]))}
                rows.append(row)
                print(f"{family:9s} causal={causal!s:5} {name:38s} ‖ΔO‖/‖V‖ {row['rel_to_v']:.4f}  "
                      f"|Δlse| {row['lse_abs']:.4f}  E[exp Δlse] {row['normaliser_ratio']:.3f}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--sample_size", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=64)
    parser.add_argument("--band", type=int, default=128, help="previous keys of the band settings (causal)")
    parser.add_argument("--model_bands", type=int, nargs="*", default=[256, 384],
                        help="widths of the 'band w + 64 samples' settings (causal), as in the model's table")
    parser.add_argument("--lsh_num_projs", type=int, default=7)
    parser.add_argument("--min_seq_len", type=int, default=512, help="causal leaves below 2x this are exact")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    rows = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (args.out / "estimators.json").write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "commit": commit, "command": "python benchmarks/estimators.py",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
