"""Micro-benchmarks of the Triton backend's structure kernels (bf16, B=1, H=32, D=64, one GPU).

* ``lsh``: hashing launch variants (split terms, rows per program, warps) and their agreement
  with float64 codes;
* ``sort``: the counting sort by chunk size against torch's sort (one segment, a causal level);
* ``row_dot``: the fused delta by rows per program against a per-head torch version.

Each variant is set through ``hyperattn.configure("triton", ...)`` (launch table, sort chunk)
and the previous options are restored afterwards.

    python scripts/gpu_micro.py [lsh|sort|row_dot|all] [--n 131072]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
import triton

import hyperattn
from hyperattn.registry import backend_status
from hyperattn_triton.launches import RowLaunch, launch_for

DIM = 64


def bench(fn) -> float:
    """Median microseconds of ``fn``."""
    return triton.testing.do_bench(fn, return_mode="median") * 1e3


def lsh(backend, n: int, heads: int) -> None:
    x = torch.randn(1, heads, n, DIM, device="cuda", dtype=torch.bfloat16)
    projections = torch.randn(DIM, 7, device="cuda", dtype=torch.float64)
    exact = torch.einsum("bhnd,dr->bhnr", x.double(), projections) > 0
    bits = (exact.long() << torch.arange(7, device="cuda")).sum(-1)
    want = bits ^ (bits >> 1) ^ (bits >> 2) ^ (bits >> 3) ^ (bits >> 4) ^ (bits >> 5) ^ (bits >> 6)
    table = hyperattn.configure("triton").launches
    print(f"lsh now: split {launch_for(table, 'lsh_split', DIM)}, reduce {launch_for(table, 'lsh_reduce', DIM)}")
    for terms, block, warps in itertools.product((3, 2, 0), (64, 128, 256), (2, 4, 8)):
        # terms=0: bf16 rows through the fp32 multiply-and-reduce passes
        if terms:
            variant = table.with_launch("lsh_split", DIM, RowLaunch(block, warps, terms))
        else:
            variant = table.changed("lsh_split", DIM, terms=0).with_launch("lsh_reduce", DIM, RowLaunch(block, warps))
        hyperattn.configure("triton", launches=variant)
        mode = "split" if terms else "reduce"
        try:
            codes = backend.lsh_codes(x, projections.float())
            agree = (codes.long() == want).double().mean().item()
            print(f"lsh {mode} terms={terms} block={block:4d} warps={warps}: "
                  f"{bench(lambda: backend.lsh_codes(x, projections.float())):7.1f} us  agree with fp64 {agree:.6f}",
                  flush=True)
        except Exception as error:
            print(f"lsh {mode} terms={terms} block={block} warps={warps}: {type(error).__name__} {error}"[:200],
                  flush=True)


def sort(backend, n: int, heads: int) -> None:
    codes = torch.randint(0, 128, (1, heads, n), device="cuda", dtype=torch.int32)
    level = np.arange(16) * (n // 16)
    print(f"sort chunk now: {hyperattn.configure('triton').sort_chunk}")
    # timings include the host work of each call (tables, copies, launches): see the profiler for kernels
    for name, starts, ends in (("one segment", np.array([0]), np.array([n])),
                               ("16 segments", level + n // 32, level + n // 16)):
        for chunk in (256, 512, 1024, 2048):
            hyperattn.configure("triton", sort_chunk=chunk)
            t = bench(lambda s=starts, e=ends: backend.segment_sort(codes, s, e, code_bits=7))
            print(f"counting sort {name} chunk={chunk}: {t:7.1f} us", flush=True)
        t = bench(lambda s=starts, e=ends: backend.segment_sort(codes, s, e, code_bits=12))
        print(f"torch sort    {name}: {t:7.1f} us", flush=True)


def row_dot(backend, n: int, heads: int) -> None:
    out, dout = (torch.randn(1, heads, n, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    table = hyperattn.configure("triton").launches
    print(f"row_dot now: {launch_for(table, 'row_dot', DIM)}")
    for block in (32, 64, 128):
        hyperattn.configure("triton", launches=table.changed("row_dot", DIM, block=block))
        print(f"row_dot block={block}: {bench(lambda: backend.row_dot(dout, out)):7.1f} us", flush=True)
    per_head = lambda: torch.stack([(dout[:, h].float() * out[:, h].float()).sum(-1) for h in range(heads)], 1)
    print(f"per-head torch delta: {bench(per_head):7.1f} us", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Micro-benchmarks of the Triton backend's hashing, counting sort "
                                                 "and delta kernels by launch variant.")
    parser.add_argument("what", nargs="?", choices=("lsh", "sort", "row_dot", "all"), default="all")
    parser.add_argument("--n", type=int, default=131072, help="sequence length")
    parser.add_argument("--heads", type=int, default=32)
    args = parser.parse_args(argv)
    backend = backend_status("triton").backend
    previous = hyperattn.configure("triton")
    try:
        for name, fn in (("lsh", lsh), ("sort", sort), ("row_dot", row_dot)):
            if args.what in (name, "all"):
                fn(backend, args.n, args.heads)
                hyperattn.configure("triton", launches=previous.launches, sort_chunk=previous.sort_chunk)
    finally:
        hyperattn.configure("triton", launches=previous.launches, sort_chunk=previous.sort_chunk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
