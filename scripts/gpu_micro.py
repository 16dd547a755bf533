"""Micro-benchmarks of the structure kernels at N=131072, H=32, D=64, bf16 (one GPU):
LSH hashing launch variants (and their agreement with float64 codes), counting sort against
torch's sort, and the fused delta against the per-head torch version."""

import itertools

import numpy as np
import torch
import triton

from hyperattn_triton import backend, sorting

impl = backend.TritonBackend()
x = torch.randn(1, 32, 131072, 64, device="cuda", dtype=torch.bfloat16)
projections = torch.randn(64, 7, device="cuda", dtype=torch.float64)


def bench(fn):
    return triton.testing.do_bench(fn, return_mode="median") * 1e3


exact = torch.einsum("bhnd,dr->bhnr", x.double(), projections) > 0
bits = (exact.long() << torch.arange(7, device="cuda")).sum(-1)
want = bits ^ (bits >> 1) ^ (bits >> 2) ^ (bits >> 3) ^ (bits >> 4) ^ (bits >> 5) ^ (bits >> 6)
for terms, block, warps in itertools.product((3, 2, 0), (64, 128, 256), (2, 4, 8)):
    mode = "split" if terms else "reduce"  # terms=0: bf16 rows through the fp32 multiply-and-reduce passes
    saved = {name: dict(launch) for name, launch in backend.LSH_LAUNCH.items()}
    backend.LSH_LAUNCH["split"]["terms"] = terms
    backend.LSH_LAUNCH[mode].update(block=block, warps=warps)
    try:
        codes = impl.lsh_codes(x, projections.float())
        agree = (codes.long() == want).double().mean().item()
        print(f"lsh {mode} terms={terms} block={block:4d} warps={warps}: "
              f"{bench(lambda: impl.lsh_codes(x, projections.float())):7.1f} us  agree with fp64 {agree:.6f}", flush=True)
    except Exception as error:
        print(f"lsh {mode} terms={terms} block={block} warps={warps}: {type(error).__name__} {error}"[:200], flush=True)
    backend.LSH_LAUNCH.update(saved)

codes = torch.randint(0, 128, (1, 32, 131072), device="cuda", dtype=torch.int32)
default_chunk = sorting.CHUNK
level = np.arange(16) * 8192
# timings include the host work of each call (tables, copies, launches): see the profiler for kernels
for name, starts, ends in (("one segment", np.array([0]), np.array([131072])),
                           ("16 segments", level + 4096, level + 8192)):
    for chunk in (512, 1024, 2048):
        sorting.CHUNK = chunk
        t = bench(lambda s=starts, e=ends: impl.segment_sort(codes, s, e, code_bits=7))
        print(f"counting sort {name} chunk={chunk}: {t:7.1f} us", flush=True)
    t = bench(lambda s=starts, e=ends: impl.segment_sort(codes, s, e, code_bits=12))
    print(f"torch sort    {name}: {t:7.1f} us", flush=True)
sorting.CHUNK = default_chunk

out, dout = torch.randn_like(x), torch.randn_like(x)
for block in (32, 64, 128):
    backend.ROW_DOT_BLOCK = block
    print(f"row_dot block={block}: {bench(lambda: impl.row_dot(dout, out)):7.1f} us", flush=True)
per_head = lambda: torch.stack([(dout[:, h].float() * out[:, h].float()).sum(-1) for h in range(32)], 1)
print(f"per-head torch delta: {bench(per_head):7.1f} us", flush=True)
