"""GPU time of the counting sort's and the LSH hashing's kernels per launch configuration, from the
profiler (host time excluded: a sort call's host work would dominate a do_bench of it).

``python scripts/experiments/sort_launches.py`` on the GPU machine; N=131072, H=32, bf16 rows
hashed with 7 projections, sorted as one segment (the non-causal call) and as the 16 rectangles of
a causal level (rows [4096, 8192) of each 8192 block; sorted from chunks presorted once per codes
tensor, which is not in these times).
"""

import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from hyperattn_triton import backend, sorting

SORT_KERNELS = ("chunk_histogram_kernel", "bucket_starts_kernel", "chunk_scatter_kernel", "presorted_scatter_kernel")


def kernel_us(fn, names, calls=5):
    """Mean GPU microseconds per call of ``fn`` in kernels whose name is in ``names``."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {e.key: e.device_time_total for e in prof.key_averages() if e.key in names}
    return {name: times.get(name, 0.0) / calls for name in names}


def main():
    impl = backend.TritonBackend()
    n = 131072
    x = torch.randn(1, 32, n, 64, device="cuda", dtype=torch.bfloat16)
    projections = torch.randn(64, 7, device="cuda", dtype=torch.float32)
    print(torch.cuda.get_device_name())
    if "--lsh" in sys.argv:
        for block, warps in ((128, 2), (128, 1), (64, 1), (64, 2), (32, 1), (256, 2)):
            backend.LSH_LAUNCH["split"].update(block=block, warps=warps)
            us = kernel_us(lambda: impl.lsh_codes(x, projections), ("lsh_codes_kernel",))["lsh_codes_kernel"]
            print(f"lsh split block={block:4d} warps={warps}: {us:7.1f} us", flush=True)
    codes = impl.lsh_codes(x, projections)
    level = np.arange(16) * 8192
    cases = (("one segment", np.array([0]), np.array([n])), ("16 segments", level + 4096, level + 8192))
    names = ("CHUNK", "SCATTER_WARPS", "STARTS_CHUNKS", "STARTS_PART")
    defaults = tuple(getattr(sorting, name) for name in names)
    for setting in ((256, 2, 64, 512), (256, 2, 64, 64), (256, 2, 32, 32), (256, 2, 64, 128), (256, 2, 16, 16),
                    (512, 4, 64, 64)):
        for name, value in zip(names, setting):
            setattr(sorting, name, value)
        for case, starts, ends in cases:
            times = kernel_us(lambda s=starts, e=ends: impl.segment_sort(codes, s, e, code_bits=7), SORT_KERNELS)
            parts = "  ".join(f"{k.split('_')[1]} {v:6.1f}" for k, v in times.items() if v)
            print(f"sort chunk={setting[0]:4d} scatter warps={setting[1]} starts chunks={setting[2]:2d} "
                  f"part={setting[3]:3d} {case:11}: {sum(times.values()):7.1f} us  ({parts})", flush=True)
    for name, value in zip(names, defaults):
        setattr(sorting, name, value)


if __name__ == "__main__":
    main()
