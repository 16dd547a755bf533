"""The sparse kernels of one N=131072 non-causal plan, for Nsight Compute (B=1, H=32, D=64, bf16).

Run under ncu on the GPU machine (the warm-up launches compile; the last ones are profiled):

    ncu --clock-control none --kernel-name regex:attention_ --launch-skip 10 --launch-count 5 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
        --section LaunchStats --section MemoryWorkloadAnalysis python3 scripts/experiments/ncu_kernels.py

Launch order per round: forward (production), forward (the register-capped narrow-step launch of
register_caps.py), dQ, block dK/dV, sample-slot dK/dV; two rounds of warm-up first.
"""

import torch

from hyperattn.algorithm import draw_projections, plan_attention
from hyperattn.api import make_rng
from hyperattn.config import HyperAttentionConfig
from hyperattn_triton import backend
from hyperattn_triton.backend import Launch

CAPPED = Launch(128, 32, 5, 4, 168)


def main():
    n, heads, dim, scale = 131072, 32, 64, 0.125
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    impl = backend.TritonBackend()
    rng = make_rng(0)
    plan = plan_attention(impl, q, k, causal=False, scale=scale, config=HyperAttentionConfig(),
                          projections=draw_projections(rng, dim, 7), rng=rng)
    (piece,) = list(plan.pieces)
    st = piece.structure
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="cuda")
    production = backend.forward_launch
    for _ in range(3):
        impl.sparse_forward(q, k, v, st, scale, out, lse, fresh=True)
        backend.forward_launch = lambda d, dv: CAPPED
        impl.sparse_forward(q, k, v, st, scale, out, lse, fresh=True)
        backend.forward_launch = production
        delta = impl.row_dot(dout, out)
        grads = tuple(torch.empty(x.shape, device="cuda") for x in (q, k, v))
        impl.sparse_backward(q, k, v, lse, dout, delta, st, scale, *grads, fresh=True)
    torch.cuda.synchronize()
    print("done")


if __name__ == "__main__":
    main()
