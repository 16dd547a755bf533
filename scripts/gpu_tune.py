"""Sweep one kernel's launch configuration on a GPU backend (bf16, B=1, H=32): Triton or CuPy.

Each grid point replaces that kernel's launch for the head-dim tier of ``--dim`` in the backend's
launch table (``hyperattn.configure("triton", launches=...)``) and times either whole calls
(``--measure call``: forward calls for "forward", forward+backward steps for "dq" and "dkdv",
causal and not) or the sparse kernels alone on one fixed plan (``--measure kernel``).

    python scripts/gpu_tune.py --show                                  # print the launch table
    python scripts/gpu_tune.py forward [--n 131072] [--dim 64] [--measure call|kernel]
    python scripts/gpu_tune.py dkdv --dim 128 --block_m 16 32 64 --block_n 64 128
    python scripts/gpu_tune.py forward --backend cupy [--block_m 64 128 --block_n 32 64 --warps 4 8]
    python scripts/gpu_tune.py lsh --backend cupy                      # the hashing kernel alone (rows, threads)

On the CuPy backend a launch is (block_m, block_n, warps) (``hyperattn_cupy.launches``); grid
points the kernels cannot take (a warp owns 16 rows of the forward and dQ tiles, 16 keys of the
dK/dV tiles) are skipped.  ``--measure kernel`` is Triton's only.
"""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import torch
import triton

import hyperattn
from hyperattn_triton.launches import Launch, launch_for
from hyperattn_triton.options import TritonOptions

#: The values swept per kernel and field unless given on the command line.
GRIDS = {
    "forward": dict(block_m=(64, 128, 256), block_n=(32, 64, 128), stages=(3, 5), warps=(4, 8), maxnreg=(None, 168, 128)),
    "dq": dict(block_m=(64, 128, 256), block_n=(32, 64, 128), stages=(2, 3, 4), warps=(4, 8), maxnreg=(None,)),
    "dkdv": dict(block_m=(16, 32, 64), block_n=(64, 128, 256), stages=(2, 3), warps=(4, 8), maxnreg=(None,)),
}
FIELDS = ("block_m", "block_n", "stages", "warps", "maxnreg")
#: The CuPy backend's grids: tile kernels (block_m, block_n, warps), the hashing kernel (block, threads).
CUPY_GRIDS = {
    "forward": dict(block_m=(64, 128), block_n=(32, 64, 128), warps=(4, 8)),
    "dq": dict(block_m=(64, 128), block_n=(32, 64, 128), warps=(4, 8)),
    "dkdv": dict(block_m=(16, 32, 64), block_n=(64, 128), warps=(4, 8)),
    "lsh": dict(block=(128, 512, 1024, 4096), threads=(128, 256, 512)),
}


def cupy_launch_fits(kernel: str, fields: dict) -> bool:
    """Whether the CuPy kernels take this grid point (their static_asserts)."""
    if kernel == "lsh":
        return True
    threads = 32 * fields["warps"]
    owned = fields["block_n"] if kernel == "dkdv" else fields["block_m"]
    stepped = fields["block_m"] if kernel == "dkdv" else fields["block_n"]
    return owned % (16 * fields["warps"]) == 0 and stepped % 16 == 0 and stepped <= threads


def call_measures(kernel: str, q, k, v, backend: str = "triton"):
    """(label, fn) timing whole calls that run ``kernel``."""
    def forward(causal):
        with torch.no_grad():
            return triton.testing.do_bench(lambda: hyperattn.attention(q, k, v, causal=causal, seed=0, backend=backend),
                                           return_mode="median")

    def forward_backward(causal):
        def step():
            hyperattn.attention(q, k, v, causal=causal, seed=0, backend=backend).sum().backward()
        return triton.testing.do_bench(step, return_mode="median")

    if kernel == "lsh":
        from hyperattn.registry import backend_status

        cupy_backend = backend_status(backend).backend
        x = cupy_backend.to_native(q.detach())
        projections = cupy_backend.from_host(np.random.default_rng(0).standard_normal((q.shape[-1], 7)).astype(np.float32), x)
        return [("lsh", lambda: triton.testing.do_bench(lambda: cupy_backend.lsh_codes(x, projections),
                                                        return_mode="median"))]
    if kernel == "forward":
        return [("fwd", lambda: forward(False)), ("fwd causal", lambda: forward(True))]
    return [("fwd+bwd", lambda: forward_backward(False)), ("fwd+bwd causal", lambda: forward_backward(True))]


def kernel_measures(kernel: str, q, k, v):
    """(label, fn) timing the sparse kernels alone on the one sparse piece of a non-causal plan."""
    from hyperattn import testing
    from hyperattn.algorithm import SparsePiece
    from hyperattn.config import HyperAttentionConfig
    from hyperattn.registry import backend_status

    backend = backend_status("triton").backend
    scale = q.shape[-1] ** -0.5
    plan = testing.seeded_plan(backend, q, k, causal=False, scale=scale, config=HyperAttentionConfig(), seed=0)
    (piece,) = list(plan.pieces)
    assert isinstance(piece, SparsePiece), "the plan must be one sparse piece (N above the crossover)"
    st = piece.structure
    q, k, v = (x.detach() for x in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.full(q.shape[:3], -math.inf, device=q.device)
    backend.sparse_forward(q, k, v, st, scale, out, lse, overwrite=True)
    dout = torch.randn_like(q)
    delta = backend.row_dot(dout, out)
    grads = [torch.zeros(x.shape, device=q.device) for x in (q, k, v)]

    def fwd():
        backend.sparse_forward(q, k, v, st, scale, out, lse, overwrite=True)

    def bwd():
        backend.sparse_backward(q, k, v, lse, dout, delta, st, scale, *grads)

    fn = fwd if kernel == "forward" else bwd
    label = "fwd" if kernel == "forward" else "bwd"
    return [(label, lambda: triton.testing.do_bench(fn, return_mode="median", warmup=5, rep=30))]


def sweep(backend: str, kernel: str, dim: int, grid: dict, measures, *, launch_for, with_fields,
          fits=lambda fields: True) -> None:
    """Time ``measures`` for each point of ``grid`` ({field: values}) as ``backend``'s launch of
    ``kernel`` at ``dim``'s tier: ``with_fields(table, fields)`` makes the launch table, ``fits``
    skips points the kernels cannot take; the table in force before is restored afterwards."""
    table = hyperattn.configure(backend).launches
    print(f"{kernel} D<={dim} tier now: {launch_for(table, kernel, dim)}", flush=True)
    try:
        for values in itertools.product(*grid.values()):
            fields = dict(zip(grid, values))
            if not fits(fields):
                continue
            hyperattn.configure(backend, launches=with_fields(table, fields))
            row = []
            for label, fn in measures:
                try:
                    row.append(f"{label} {fn():8.3f} ms")
                except Exception as error:  # out of shared memory, a launch the kernel cannot take, etc.
                    row.append(f"{label} {type(error).__name__}: {str(error)[:80]}")
            print(" ".join(f"{name}={value!s:<4}" for name, value in fields.items()), "|", " | ".join(row), flush=True)
    finally:
        hyperattn.configure(backend, launches=table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Sweep one Triton attention kernel's launch configuration "
                                                 "(whole calls or the sparse kernels alone), or print the launch table.")
    parser.add_argument("kernel", nargs="?", choices=tuple(GRIDS) + ("lsh",), help="the kernel whose launch is swept")
    parser.add_argument("--backend", choices=("triton", "cupy"), default="triton")
    parser.add_argument("--show", action="store_true", help="print the default launch table and exit")
    parser.add_argument("--n", type=int, default=131072, help="sequence length")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64, help="head dim: its tier's launch is swept")
    parser.add_argument("--measure", choices=("call", "kernel"), default="call")
    parser.add_argument("--block", nargs="+", type=int, default=None, help="rows per block (cupy lsh)")
    parser.add_argument("--threads", nargs="+", type=int, default=None, help="threads per block (cupy lsh)")
    for name in FIELDS:
        parser.add_argument(f"--{name}", nargs="+", default=None, metavar="V",
                            type=lambda s: None if s.lower() == "none" else int(s), help=f"{name} values to sweep")
    args = parser.parse_args(argv)
    if args.kernel == "lsh" and args.backend != "cupy":
        parser.error("the lsh sweep is the CuPy backend's (--backend cupy)")
    if args.show or args.kernel is None:
        print("\n".join(TritonOptions().launches.lines()))
        return 0
    q, k, v = (torch.randn(1, args.heads, args.n, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    if args.backend == "cupy":
        from hyperattn_cupy.launches import launch_for as cupy_launch_for
        from hyperattn_cupy.launches import replaced

        grid = {name: tuple(getattr(args, name) or values) for name, values in CUPY_GRIDS[args.kernel].items()}
        sweep("cupy", args.kernel, args.dim, grid, call_measures(args.kernel, q, k, v, backend="cupy"),
              launch_for=cupy_launch_for, with_fields=lambda table, fields: replaced(table, args.kernel, args.dim, **fields),
              fits=lambda fields: cupy_launch_fits(args.kernel, fields))
        return 0
    grid = {name: tuple(getattr(args, name) or GRIDS[args.kernel][name]) for name in FIELDS}
    measures = (call_measures if args.measure == "call" else kernel_measures)(args.kernel, q, k, v)
    sweep("triton", args.kernel, args.dim, grid, measures, launch_for=launch_for,
          with_fields=lambda table, fields: table.with_launch(args.kernel, args.dim, Launch(**fields)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
