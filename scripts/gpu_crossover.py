"""Where HyperAttention starts to beat exact attention (SDPA, cuDNN) on this GPU.

Times both (bf16, B=1) with the Triton backend's crossover switched off
(``hyperattn.configure("triton", exact_below=(0, 0))``), forward and forward+backward, causal and
not, per head dim, and prints the speed-ups, then the crossover table: per (head-dim tier, mode),
the smallest N from which every larger N measured wins, as keys (non-causal) and rows (causal).
That table is ``GPU_CROSSOVER`` in ``hyperattn_triton/options.py``.

    python scripts/gpu_crossover.py [N ...] [--heads 32] [--dims 64 128]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

import hyperattn

SIZES = (4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152)


def time_ms(fn, q, k, v, causal: bool, mode: str) -> float:
    if mode == "fwd":
        with torch.no_grad():
            return triton.testing.do_bench(lambda: fn(q, k, v, causal), return_mode="median")
    return triton.testing.do_bench(lambda: fn(q, k, v, causal).sum().backward(), return_mode="median")


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def hyper(q, k, v, causal):
    return hyperattn.attention(q, k, v, causal=causal, backend="triton")


def crossover(speedups: dict[int, float]) -> int:
    """The smallest N from which every larger measured N is faster than SDPA (past the largest
    if none is)."""
    sizes = sorted(speedups)
    below = sizes[-1] * 2
    for n in reversed(sizes):
        if speedups[n] <= 1.0:
            break
        below = n
    return below


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Speed-up of the Triton backend's HyperAttention over exact "
                                                 "attention (SDPA) by N, with the exact crossover off, and the "
                                                 "crossover table it implies.")
    parser.add_argument("sizes", nargs="*", type=int, default=list(SIZES), help="sequence lengths N")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims (one tier each)")
    args = parser.parse_args(argv)
    from hyperattn_triton.launches import tier_name

    print(f"{torch.cuda.get_device_name()}, bf16, B=1, H={args.heads}", flush=True)
    table = {}
    with hyperattn_options(exact_below=(0, 0)):
        for dim in args.dims:
            for mode in ("fwd", "fwd+bwd"):
                below = []
                for causal in (False, True):
                    speedups = {}
                    for n in args.sizes:
                        q, k, v = (torch.randn(1, args.heads, n, dim, device="cuda", dtype=torch.bfloat16,
                                               requires_grad=mode != "fwd") for _ in range(3))
                        speedups[n] = time_ms(sdpa, q, k, v, causal, mode) / time_ms(hyper, q, k, v, causal, mode)
                        del q, k, v
                    print(f"D={dim:<4} causal={causal!s:5} {mode:7} | "
                          + "  ".join(f"{n}: {s:5.2f}x" for n, s in speedups.items()), flush=True)
                    below.append(crossover(speedups))
                table[(tier_name(dim), mode)] = tuple(below)
    print("GPU_CROSSOVER (keys, rows):")
    for key, value in table.items():
        print(f"    {key!r}: {value!r},")
    return 0


class hyperattn_options:
    """The Triton backend's options changed for a block, restored after it."""

    def __init__(self, **changes):
        self.changes = changes

    def __enter__(self):
        self.previous = hyperattn.configure("triton")
        hyperattn.configure("triton", **self.changes)

    def __exit__(self, *exc):
        hyperattn.configure("triton", exact_below=self.previous.exact_below, crossover=self.previous.crossover)


if __name__ == "__main__":
    raise SystemExit(main())
