"""Sweep the Triton launch configurations at N=131072 (bf16, H=32, D=64 unless given).

    python scripts/gpu_tune.py fwd [N]   # forward tiles: block_m, fwd_block_n, warps, fwd_stages
    python scripts/gpu_tune.py bwd [N]   # dK/dV tiles: kv_block_n, kv_block_m, kv_warps, kv_stages
    python scripts/gpu_tune.py {forward,dq,key} N 128   # 64 < D <= 128: backend.WIDE_HEAD_LAUNCHES
"""

import itertools
import sys

import torch
import triton

import hyperattn
from hyperattn_triton import backend

what = sys.argv[1] if len(sys.argv) > 1 else "fwd"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 131072
dim = int(sys.argv[3]) if len(sys.argv) > 3 else 64
q, k, v = (torch.randn(1, 32, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))


def forward(causal):
    with torch.no_grad():
        return triton.testing.do_bench(lambda: hyperattn.attention(q, k, v, causal=causal, seed=0, backend="triton"),
                                       return_mode="median")


def forward_backward(causal):
    def step():
        hyperattn.attention(q, k, v, causal=causal, seed=0, backend="triton").sum().backward()
    return triton.testing.do_bench(step, return_mode="median")


def report(keys, values, measures):
    row = []
    for label, fn, causal in measures:
        try:
            row.append(f"{label} {fn(causal):7.2f} ms")
        except Exception as error:  # out of shared memory etc.
            row.append(f"{label} {type(error).__name__}")
    print(" ".join(f"{key}={value:<3}" for key, value in zip(keys, values)), "|", " | ".join(row), flush=True)


if what in backend.WIDE_HEAD_LAUNCHES:  # one launch of the 64 < D <= 128 tier
    assert 64 < dim <= 128, "the wide-head launches serve 64 < D <= 128"
    forward_only = what == "forward"
    rows = (64, 128) if what != "key" else (16, 32, 64)
    columns = (32, 64) if what != "key" else (64, 128)
    keys = ("block_m", "block_n", "stages", "warps")  # Launch's field order
    measures = ((("fwd", forward, False), ("fwd causal", forward, True)) if forward_only else
                (("fwd+bwd", forward_backward, False), ("fwd+bwd causal", forward_backward, True)))
    default = backend.WIDE_HEAD_LAUNCHES[what]
    for values in itertools.product(rows, columns, (2, 3), (4, 8)):
        backend.WIDE_HEAD_LAUNCHES[what] = backend.Launch(*values)
        report(keys, values, measures)
    backend.WIDE_HEAD_LAUNCHES[what] = default
    sys.exit()
if what == "fwd":
    keys, grid = ("block_m", "fwd_block_n", "warps", "fwd_stages"), itertools.product((64, 128), (32, 64, 128), (4, 8), (3, 5))
    measures = (("fwd", forward, False), ("fwd causal", forward, True))
else:
    keys, grid = ("kv_block_n", "kv_block_m", "kv_warps", "kv_stages"), itertools.product((64, 128), (32, 64), (4, 8), (2, 3))
    measures = (("fwd+bwd", forward_backward, False), ("fwd+bwd causal", forward_backward, True))
default = dict(backend.TUNING)
for values in grid:
    backend.TUNING.update(default)
    backend.TUNING.update(zip(keys, values))
    report(keys, values, measures)
backend.TUNING.update(default)
