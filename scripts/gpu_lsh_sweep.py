"""Time the LSH hashing kernel over its launch configurations (N=131072, H=32, D=64, bf16)."""

import itertools

import torch
import triton

from hyperattn_triton import backend

x = torch.randn(1, 32, 131072, 64, device="cuda", dtype=torch.bfloat16)
projections = torch.randn(64, 7, device="cuda")
impl = backend.TritonBackend()
for block, warps in itertools.product((64, 128, 256, 512), (2, 4, 8)):
    backend.LSH_LAUNCH.update(block=block, warps=warps)
    try:
        ms = triton.testing.do_bench(lambda: impl.lsh_codes(x, projections), return_mode="median")
        print(f"lsh block={block:4d} warps={warps}: {ms * 1e3:7.1f} us", flush=True)
    except Exception as error:
        print(f"lsh block={block:4d} warps={warps}: {type(error).__name__}", flush=True)
