"""Where the time goes on the GPU: profiler tables for one HyperAttention step at N=131072."""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import hyperattn

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
q, k, v = (torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
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
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
