"""Sweep the Triton launch configuration on one forward and one forward+backward step."""

import itertools
import sys

import torch
import triton

import hyperattn
from hyperattn_triton import backend

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
q, k, v = (torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64), (4, 8), (2, 3)):
    backend.TUNING.update(block_m=block_m, block_n=block_n, warps=warps, stages=stages)
    row = []
    for causal in (False, True):
        try:
            with torch.no_grad():
                fwd = triton.testing.do_bench(lambda causal=causal: hyperattn.attention(q, k, v, causal=causal, seed=0, backend="triton"), return_mode="median")
            def step(causal=causal):
                hyperattn.attention(q, k, v, causal=causal, seed=0, backend="triton").sum().backward()
            both = triton.testing.do_bench(step, return_mode="median")
            row.append(f"causal={causal}: fwd {fwd:7.2f} ms fwd+bwd {both:7.2f} ms")
        except Exception as error:  # out of shared memory etc.
            row.append(f"causal={causal}: {type(error).__name__}")
    print(f"BM={block_m:3d} BN={block_n:3d} warps={warps} stages={stages} | " + " | ".join(row), flush=True)
