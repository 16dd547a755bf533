"""Where HyperAttention starts to beat exact attention (SDPA, cuDNN) on this GPU.

Times both (bf16, B=1) with the Triton backend's crossover switched off
(``hyperattn.configure("triton", exact_below=(0, 0))``), forward and forward+backward, causal and
not, and prints the speed-ups.  The smallest N from which every larger N wins sets the default
``exact_below`` of ``hyperattn_triton.options.TritonOptions`` (``GPU_EXACT_BELOW``).

    python scripts/gpu_crossover.py [N ...] [--heads 32] [--dim 64]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

import hyperattn

SIZES = (4096, 8192, 12288, 16384, 24576, 32768, 49152)


def time_ms(fn, q, k, v, causal: bool, mode: str) -> float:
    if mode == "fwd":
        with torch.no_grad():
            return triton.testing.do_bench(lambda: fn(q, k, v, causal), return_mode="median")
    return triton.testing.do_bench(lambda: fn(q, k, v, causal).sum().backward(), return_mode="median")


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def hyper(q, k, v, causal):
    return hyperattn.attention(q, k, v, causal=causal, backend="triton")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Speed-up of the Triton backend's HyperAttention over exact "
                                                 "attention (SDPA) by N, with the exact crossover off.")
    parser.add_argument("sizes", nargs="*", type=int, default=list(SIZES), help="sequence lengths N")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    previous = hyperattn.configure("triton")
    print(f"current exact_below: {previous.exact_below}", flush=True)
    hyperattn.configure("triton", exact_below=(0, 0))
    try:
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                row = []
                for n in args.sizes:
                    q, k, v = (torch.randn(1, args.heads, n, args.dim, device="cuda", dtype=torch.bfloat16,
                                           requires_grad=mode != "fwd") for _ in range(3))
                    ratio = time_ms(sdpa, q, k, v, causal, mode) / time_ms(hyper, q, k, v, causal, mode)
                    row.append(f"{n}: {ratio:5.2f}x")
                print(f"causal={causal!s:5} {mode:7} | " + "  ".join(row), flush=True)
    finally:
        hyperattn.configure("triton", exact_below=previous.exact_below)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
