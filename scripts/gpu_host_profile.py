"""Host (Python) time of one HyperAttention call at N=131072: where the GPU waits for the CPU."""

import cProfile
import pstats
import sys

import torch

import hyperattn

causal = len(sys.argv) > 1 and sys.argv[1] == "causal"
q, k, v = (torch.randn(1, 32, 131072, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
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
pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
