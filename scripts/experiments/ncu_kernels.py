"""The sparse kernels of one N=131072 non-causal plan, for Nsight Compute (B=1, H=32, D=64, bf16).

Run under ncu on the GPU machine (the warm-up launches compile; the last ones are profiled):

    ncu --clock-control none --kernel-name regex:attention_ --launch-skip 10 --launch-count 5 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
        --section LaunchStats --section MemoryWorkloadAnalysis python3 scripts/experiments/ncu_kernels.py

Launch order per round: forward (production), forward (the register-capped narrow-step launch of
register_caps.py, which is the production launch itself from 17dec94 on), dQ, block dK/dV,
sample-slot dK/dV; two rounds of warm-up first.
"""

import torch
from noncausal_plan import SCALE, noncausal_plan

from hyperattn_triton import backend
from hyperattn_triton.backend import Launch

CAPPED = Launch(128, 32, 5, 4, 168)


def main():
    impl, q, k, v, dout, st = noncausal_plan()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="cuda")
    production = backend.forward_launch
    for _ in range(3):
        impl.sparse_forward(q, k, v, st, SCALE, out, lse, fresh=True)
        backend.forward_launch = lambda d, dv: CAPPED
        impl.sparse_forward(q, k, v, st, SCALE, out, lse, fresh=True)
        backend.forward_launch = production
        delta = impl.row_dot(dout, out)
        grads = tuple(torch.empty(x.shape, device="cuda") for x in (q, k, v))
        impl.sparse_backward(q, k, v, lse, dout, delta, st, SCALE, *grads, fresh=True)
    torch.cuda.synchronize()
    print("done")


if __name__ == "__main__":
    main()
