"""Host cost of the building blocks of one call on the GPU machine (no GPU work to wait for)."""

import time

import numpy as np
import torch
import triton
import triton.language as tl

from hyperattn._arrays import host_to_device
from hyperattn_triton import tiles


@triton.jit
def tiny_kernel(X, a, b, c, d, e, f, g, h, i, j, k, l_, m, n, o, p, q, r, s, t, u, v, w, x, y, z, aa, bb, cc, dd,
                BLOCK: tl.constexpr, FLAG: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))


def per_call(fn, calls=300):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / calls


x = torch.zeros(1024, device="cuda")
big = torch.zeros(1 << 20, device="cuda")
host = np.arange(7 * 1024, dtype=np.int64)
args = list(range(1, 30))
q = torch.randn(1, 32, 4096, 64, device="cuda", dtype=torch.bfloat16)
print(f"torch add_ small        {per_call(lambda: x.add_(1)):7.1f} us")
print(f"torch.empty 4 MB        {per_call(lambda: torch.empty(1 << 20, device='cuda')):7.1f} us")
print(f"torch cumsum 1M         {per_call(lambda: torch.cumsum(big, 0)):7.1f} us")
print(f"host_to_device 56 KB    {per_call(lambda: host_to_device(host, x)):7.1f} us")
print(f"triton launch 30 args   {per_call(lambda: tiny_kernel[(1,)](x, *args, 1, BLOCK=128, FLAG=True)):7.1f} us")
print(f"numpy split_ranges      {per_call(lambda: tiles.split_ranges(np.arange(512) * 256, np.arange(1, 513) * 256, 128)):7.1f} us")
print(f"cuda Event record       {per_call(lambda: torch.cuda.Event().record()):7.1f} us")
print(f"SDPA 4k bf16            {per_call(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), 50):7.1f} us")
t0 = time.perf_counter()
for _ in range(10**6):
    pass
print(f"python empty loop iter  {(time.perf_counter() - t0):7.3f} us")
