"""Approximation quality: HyperAttention against exact attention, and what our fixes buy.

For several input families (Gaussian, clustered keys, attention sinks, long-range copy) it
measures, averaged over seeds, the error of the non-causal output relative to ‖O*‖ and to ‖V‖,
and the mean log-sum-exp error, over N and over each parameter (block, samples, projections).
Each point is computed twice on the same draws: as hyperattn computes it ("fixed") and with the
original code's settings ("original": buckets sorted by gray(c) instead of the Gray rank, and
sampled keys inside the query's own block not masked, so counted twice).

    python benchmarks/quality.py                      # CPU, reference backend, float64
    python benchmarks/quality.py --seq_lens 4096 16384 --seeds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import subprocess
from pathlib import Path

import numpy as np

import hyperattn
from hyperattn.algorithm import Plan, SparsePiece, run_forward, seed_projections, sparse_structure
from hyperattn.config import HyperAttentionConfig
from hyperattn.protocol import Segments
from hyperattn.registry import backend_status


# --------------------------------------------------------------------------- input families
def gaussian(rng, heads, n, dim):
    return tuple(rng.standard_normal((1, heads, n, dim)) for _ in range(3))


def clustered(rng, heads, n, dim, clusters=16, spread=0.4):
    """Queries and keys near one of a few centres: attention concentrates inside a cluster."""
    centres = rng.standard_normal((heads, clusters, dim))
    q = centres[np.arange(heads)[:, None], rng.integers(0, clusters, (heads, n))] + spread * rng.standard_normal((heads, n, dim))
    k = centres[np.arange(heads)[:, None], rng.integers(0, clusters, (heads, n))] + spread * rng.standard_normal((heads, n, dim))
    return q[None], k[None], rng.standard_normal((1, heads, n, dim))


def attention_sinks(rng, heads, n, dim, sinks=4, strength=3.0):
    """A few keys every query attends to heavily (like the first tokens of a language model)."""
    q, k, v = gaussian(rng, heads, n, dim)
    mean_direction = q.mean(axis=2, keepdims=True)
    mean_direction /= np.linalg.norm(mean_direction, axis=-1, keepdims=True)
    k[:, :, :sinks] = strength * np.sqrt(dim) * mean_direction + 0.1 * k[:, :, :sinks]
    return q, k, v


def long_range_copy(rng, heads, n, dim, strength=1.5):
    """Each query matches one far-away key (a copy / induction pattern)."""
    q, k, v = gaussian(rng, heads, n, dim)
    partner = (np.arange(n) + n // 2) % n
    k[:, :, partner] = strength * q + 0.3 * k[:, :, partner]
    return q, k, v


FAMILIES = {"gaussian": gaussian, "clustered": clustered, "sinks": attention_sinks, "copy": long_range_copy}


# ------------------------------------------------------------------------------- the method
def gray(c):
    return c ^ (c >> 1)


def plan_variant(backend, q, k, config: HyperAttentionConfig, seed: int, original: bool) -> Plan:
    """The non-causal plan of ``attention(..., seed=seed)``, or the original code's variant of it."""
    projections = seed_projections(seed, q.shape[-1], config.lsh_num_projs)
    q_codes, k_codes = (backend.lsh_codes(x, projections) for x in (q, k))
    if original:  # our codes are Gray ranks r = gray^-1(c); the original sorts by gray(c) = gray(gray(r))
        q_codes, k_codes = gray(gray(q_codes)), gray(gray(k_codes))
    segments = Segments.from_ranges([(0, q.shape[2], 0, k.shape[2])])
    structure = sparse_structure(backend, q, k, q_codes, k_codes, segments, config, seed)
    if original:  # shift every key's block out of range: no sample is ever masked
        structure = dataclasses.replace(structure, k_rank=structure.k_rank + k.shape[2] + config.block_size)
    return Plan((SparsePiece(structure),), q.shape[-1] ** -0.5)


def errors(backend, q, k, v, exact_out, exact_lse, config, seed, original):
    out, lse = run_forward(backend, plan_variant(backend, q, k, config, seed, original), q, k, v)
    difference = np.linalg.norm(out - exact_out)
    return {
        "rel_to_out": float(difference / np.linalg.norm(exact_out)),
        "rel_to_v": float(difference / np.linalg.norm(v)),
        "lse_abs": float(np.mean(np.abs(lse - exact_lse))),
    }


def sweep(args) -> list[dict]:
    backend = backend_status("reference").backend
    # the paper's uniform draws in both variants: what is measured is the fixes, not the sampling
    base = HyperAttentionConfig(args.block_size, args.sample_size, args.lsh_num_projs, min_seq_len=1, sampling="uniform")
    grid = [("seq_len", n, base) for n in args.seq_lens]
    grid += [("block_size", b, dataclasses.replace(base, block_size=b)) for b in (64, 128, 256, 512)]
    grid += [("sample_size", m, dataclasses.replace(base, sample_size=m)) for m in (0, 64, 256, 1024)]
    grid += [("lsh_num_projs", r, dataclasses.replace(base, lsh_num_projs=r)) for r in (1, 3, 5, 7, 9)]
    points = []
    for family, make in FAMILIES.items():
        for axis, value, config in grid:
            n = value if axis == "seq_len" else args.sweep_len
            totals = {"fixed": [], "original": []}
            for seed in range(args.seeds):
                q, k, v = make(np.random.default_rng(1000 * seed + n), args.heads, n, args.dim)
                exact_out, exact_lse = hyperattn.exact_attention(q, k, v, return_lse=True)
                for variant in totals:
                    totals[variant].append(errors(backend, q, k, v, exact_out, exact_lse, config, seed, variant == "original"))
            for variant, runs in totals.items():
                point = {"family": family, "axis": axis, "value": value, "variant": variant, "seq_len": n}
                point.update({key: float(np.mean([r[key] for r in runs])) for key in runs[0]})
                points.append(point)
            fixed, original = (p for p in points[-2:])
            print(
                f"{family:9s} {axis:13s} {value:>6}  ‖ΔO‖/‖V‖ fixed {fixed['rel_to_v']:.4f}  original {original['rel_to_v']:.4f}"
                f"   ‖ΔO‖/‖O*‖ fixed {fixed['rel_to_out']:.3f}  original {original['rel_to_out']:.3f}",
                flush=True,
            )
    return points


def plot(points, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = ["seq_len", "block_size", "sample_size", "lsh_num_projs"]
    fig, axes = plt.subplots(len(FAMILIES), len(axes_names), figsize=(16, 3.2 * len(FAMILIES)), squeeze=False)
    for row, family in enumerate(FAMILIES):
        for col, axis in enumerate(axes_names):
            ax = axes[row][col]
            for variant, style in (("fixed", "-o"), ("original", "--x")):
                chosen = [p for p in points if p["family"] == family and p["axis"] == axis and p["variant"] == variant]
                ax.plot([p["value"] for p in chosen], [p["rel_to_v"] for p in chosen], style, label=variant)
            if axis in ("seq_len", "block_size"):
                ax.set_xscale("log", base=2)
            ax.set_title(f"{family}: vs {axis}" + ("" if axis == "seq_len" else f" (N={args.sweep_len})"), fontsize=9)
            ax.set_ylabel("‖O − O*‖ / ‖V‖", fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"HyperAttention error, non-causal, H={args.heads}, D={args.dim}, mean of {args.seeds} seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--sweep_len", type=int, default=4096, help="N of the parameter sweeps")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--sample_size", type=int, default=256)
    parser.add_argument("--lsh_num_projs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    points = sweep(args)
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (args.out / "quality.json").write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "commit": commit,
        "command": "python benchmarks/quality.py", "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "points": points,
    }, indent=1))
    plot(points, args.out / "quality.png", args)


if __name__ == "__main__":
    main()
