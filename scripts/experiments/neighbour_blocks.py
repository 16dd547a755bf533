"""Experiment (issue 18): does a query block that also sees its sorted neighbours' key blocks beat
the plain block diagonal at the same keys per row?  Dense float64 weights built from the reference
backend's plans (the same LSH orders and samples), on benchmarks/quality.py's families.

    python scripts/experiments/neighbour_blocks.py            # N = 4096, 3 seeds
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from quality import FAMILIES  # noqa: E402

from hyperattn import testing  # noqa: E402
from hyperattn.algorithm import ExactPiece  # noqa: E402
from hyperattn.config import HyperAttentionConfig  # noqa: E402
from hyperattn.protocol import query_block_bounds  # noqa: E402
from hyperattn.registry import backend_status  # noqa: E402

REFERENCE = backend_status("reference").backend


def weights_with_neighbours(plan, batch, q_heads, n_q, n_k, reach: int) -> np.ndarray:
    """plan_weights, but query block c sees key blocks [c - reach, c + reach] of its segment
    exactly; samples inside them are dropped (the others keep weight n/m: still unbiased)."""
    weights = np.zeros((batch, q_heads, n_q, n_k))
    for piece in plan.pieces:
        if isinstance(piece, ExactPiece):
            for qs, qe, ks, ke in piece.segments.table.tolist():
                weights[:, :, qs:qe, ks:ke] += testing.causal_mask(qe - qs, ke - ks) if piece.causal else True
            continue
        st = piece.structure
        q_order, k_order, k_rank = (np.asarray(x).astype(np.int64) for x in (st.q_order, st.k_order, st.k_rank))
        samples = None if st.samples is None else np.asarray(st.samples).astype(np.int64)
        group = q_heads // k_order.shape[1]
        bs = st.block_size
        for s, (qs, qe, ks, ke) in enumerate(st.segments.table.tolist()):
            nq, nk = qe - qs, ke - ks
            n_blocks = -(-nk // bs)
            bounds = query_block_bounds(np.arange(n_blocks + 1), bs, nq, nk)
            for b in range(batch):
                for h in range(q_heads):
                    hk = h // group
                    for blk in range(n_blocks):
                        rows = q_order[b, h, qs + bounds[blk]: qs + bounds[blk + 1]]
                        lo, hi = max(0, blk - reach), min(n_blocks, blk + reach + 1)
                        keys = k_order[b, hk, ks + lo * bs: ks + min(hi * bs, nk)]
                        weights[b, h, rows[:, None], keys[None, :]] += 1.0
                        if samples is None:
                            continue
                        drawn = samples[b, hk, s]
                        key_block = k_rank[b, hk, drawn] // bs
                        for key in drawn[(key_block < lo) | (key_block >= hi)]:
                            weights[b, h, rows, key] += nk / len(drawn)
    return weights


def main(n=4096, seeds=3, heads=2, dim=64):
    settings = {  # name: (block, samples, reach); keys per row about 512
        "b256 s256 (default)": (256, 256, 0),
        "b128 s384": (128, 384, 0),
        "b128 +neighbours (384) s128": (128, 128, 1),
        "b64 +neighbours (192) s320": (64, 320, 1),
        "b64 +2 neighbours (320) s192": (64, 192, 2),
    }
    for family, make in FAMILIES.items():
        for causal in (False, True):
            errors = {name: [] for name in settings}
            for seed in range(seeds):
                q, k, v = make(np.random.default_rng(1000 * seed + n), heads, n, dim)
                want, _ = testing.exact_attention_f64(q, k, v, causal=causal)
                for name, (block, samples, reach) in settings.items():
                    config = HyperAttentionConfig(block_size=block, sample_size=samples, lsh_num_projs=7,
                                                  min_seq_len=512, exact_crossover=False)
                    plan = testing.seeded_plan(REFERENCE, q, k, causal=causal, scale=dim**-0.5, config=config,
                                               seed=seed)
                    w = weights_with_neighbours(plan, 1, heads, n, n, reach)
                    out, _ = testing.weighted_softmax_attention(q, k, v, w, dim**-0.5)
                    errors[name].append(np.linalg.norm(out - want) / np.linalg.norm(v))
            print(family, "causal" if causal else "non-causal",
                  "  ".join(f"{name}: {np.mean(e):.4f}" for name, e in errors.items()), flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
