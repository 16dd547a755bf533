"""Where the time goes in one HyperAttention step (bf16, B=1, H=32, D=64) on the Triton backend.

    python scripts/gpu_profile.py [--n 131072]            # GPU: torch profiler tables, fwd and fwd+bwd
    python scripts/gpu_profile.py host [--causal]         # host: cProfile of the Python side of forward calls
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

import hyperattn


def inputs(n: int, heads: int, dim: int, requires_grad: bool):
    return [torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
            for _ in range(3)]


def gpu_tables(n: int, heads: int, dim: int, rows: int) -> None:
    """Wall time and the profiler's kernel table per (causal, fwd / fwd+bwd)."""
    q, k, v = inputs(n, heads, dim, requires_grad=True)
    for causal in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            def step(causal=causal, mode=mode):
                out = hyperattn.attention(q, k, v, causal=causal, seed=0, backend="triton")
                if mode == "fwd+bwd":
                    out.backward(torch.ones_like(out))
            ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
            with ctx:
                step()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / 3
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
            print(f"=== causal={causal} {mode}: wall {wall * 1e3:.1f} ms")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def host_profile(n: int, heads: int, dim: int, causal: bool, rows: int) -> None:
    """cProfile of five forward calls after three warm-up calls: where the GPU waits for the CPU."""
    q, k, v = inputs(n, heads, dim, requires_grad=False)
    with torch.no_grad():
        for _ in range(3):
            hyperattn.attention(q, k, v, causal=causal, backend="triton")
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            hyperattn.attention(q, k, v, causal=causal, backend="triton")
        torch.cuda.synchronize()
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Profile one HyperAttention step on the Triton backend: GPU "
                                                 "kernel tables, or the host's Python time.")
    parser.add_argument("what", nargs="?", choices=("gpu", "host"), default="gpu")
    parser.add_argument("--n", type=int, default=131072, help="sequence length")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true", help="host: profile causal calls")
    parser.add_argument("--rows", type=int, default=None, help="rows of each table")
    args = parser.parse_args(argv)
    if args.what == "gpu":
        gpu_tables(args.n, args.heads, args.dim, args.rows or 12)
    else:
        host_profile(args.n, args.heads, args.dim, args.causal, args.rows or 22)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
