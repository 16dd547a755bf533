"""Kernel tables of HyperAttention's fwd+bwd steps at one head dim (B=1, H=32, bf16, N=131072):
where the time of a wider head goes.

    PYTHONPATH=benchmarks python3 scripts/experiments/profile_dim.py 128
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from harness import make_inputs, make_step

dim = int(sys.argv[1]) if len(sys.argv) > 1 else 64
n = int(sys.argv[2]) if len(sys.argv) > 2 else 131072
q, k, v = make_inputs(1, 32, 32, n, dim, "bfloat16", "cuda", requires_grad=True)
for causal in (False, True):
    step = make_step("hyperattn", q, k, v, causal=causal, mode="fwd+bwd", backend="triton")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"D={dim} N={n} fwd+bwd causal={causal}: CUDA time per step, 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
