"""Peak GPU memory of HyperAttention's causal fwd+bwd step at N=131072 (B=1, H=32, D=64, bf16) over
2 and over 10 back-to-back steps, above what was allocated before the inputs (as the benchmark
measures it): the two agree once no step leaves tensors in reference cycles.

    PYTHONPATH=benchmarks python3 scripts/experiments/memory_steps.py
"""

import gc

import torch

from harness import make_inputs, make_step


def main():
    for count in (2, 10):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        q, k, v = make_inputs(1, 32, 32, 131072, 64, "bfloat16", "cuda", requires_grad=True)
        step = make_step("hyper", q, k, v, causal=True, mode="fwd+bwd", backend="triton")
        for _ in range(count):
            step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - baseline) / 2**30
        print(f"causal fwd+bwd N=131072, {count:2} steps: peak {peak:.2f} GiB above the baseline", flush=True)
        del q, k, v, step


if __name__ == "__main__":
    main()
