"""GPU time of the counting sort's and the LSH hashing's kernels per launch configuration, from the
profiler (host time excluded: a sort call's host work would dominate a do_bench of it).

``python scripts/experiments/sort_launches.py`` on the GPU machine; N=131072, H=32, bf16 rows
hashed with 7 projections, sorted as one segment (the non-causal call) and as the 16 rectangles of
a causal level (rows [4096, 8192) of each 8192 block).
"""

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from hyperattn_triton import backend, sorting

SORT_KERNELS = ("chunk_histogram_kernel", "bucket_starts_kernel", "chunk_scatter_kernel")


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
    for block, warps in ((128, 4), (256, 2), (256, 4), (128, 2), (512, 4)):
        backend.LSH_LAUNCH["split"].update(block=block, warps=warps)
        us = kernel_us(lambda: impl.lsh_codes(x, projections), ("lsh_codes_kernel",))["lsh_codes_kernel"]
        print(f"lsh split block={block:4d} warps={warps}: {us:7.1f} us", flush=True)
    codes = impl.lsh_codes(x, projections)
    level = np.arange(16) * 8192
    cases = (("one segment", np.array([0]), np.array([n])), ("16 segments", level + 4096, level + 8192))
    defaults = (sorting.CHUNK, sorting.SCATTER_WARPS, sorting.STARTS_CHUNKS)
    for chunk, warps, starts_chunks in ((512, 4, 16), (512, 4, 64), (512, 2, 64), (512, 8, 64), (256, 4, 64),
                                        (256, 2, 64), (1024, 8, 64)):
        sorting.CHUNK, sorting.SCATTER_WARPS, sorting.STARTS_CHUNKS = chunk, warps, starts_chunks
        for name, starts, ends in cases:
            times = kernel_us(lambda s=starts, e=ends: impl.segment_sort(codes, s, e, code_bits=7), SORT_KERNELS)
            parts = "  ".join(f"{k.split('_')[1]} {v:6.1f}" for k, v in times.items())
            print(f"sort chunk={chunk:4d} scatter warps={warps} starts chunks={starts_chunks:2d} {name:11}: "
                  f"{sum(times.values()):7.1f} us  ({parts})", flush=True)
    sorting.CHUNK, sorting.SCATTER_WARPS, sorting.STARTS_CHUNKS = defaults


if __name__ == "__main__":
    main()
