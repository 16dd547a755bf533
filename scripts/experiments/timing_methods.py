"""How the benchmark's timing method moves HyperAttention's and SDPA's times (B=1, H=32, D=64, bf16).

For a few (mode, causal, N) points, times both methods four ways with the harness:
``separate`` (each method's samples in a row) and ``interleaved`` (A, B, A, B, ...), each without
and with the untimed warm-up steps before every sample (``GPU_WARM_SECONDS``).  Every sample is
followed by a clock probe: ``torch.cuda._sleep`` spins a fixed number of SM cycles, so cycles over
its event time is the SM clock at the end of the sample.  Also the fwd+bwd memory peak of the causal
call over 2 and over 10 steps.

    PYTHONPATH=benchmarks python3 scripts/experiments/timing_methods.py
"""

import statistics

import torch

import harness
from harness import make_inputs, make_step, measure_step, measure_steps_interleaved

HEADS, DIM = 32, 64
PROBE_CYCLES = 2_000_000
WARM_SECONDS = harness.GPU_WARM_SECONDS
POINTS = [("fwd", False, 131072), ("fwd", True, 131072), ("fwd+bwd", True, 131072), ("fwd+bwd", True, 1024),
          ("fwd", False, 4096)]


def clock_mhz() -> float:
    """SM clock (MHz) now, from a fixed-cycle spin between two events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(PROBE_CYCLES)
    end.record()
    end.synchronize()
    return PROBE_CYCLES / (start.elapsed_time(end) * 1e3)


def probed(sample, clocks: dict):
    """harness._gpu_sample with a clock probe after each sample, recorded under the step's name."""

    def wrapped(step, run, warm=0):
        seconds = sample(step, run, warm)
        clocks.setdefault(step.__name__, []).append(clock_mhz())
        return seconds

    return wrapped


def main():
    original = harness._gpu_sample
    for mode, causal, n in POINTS:
        q, k, v = make_inputs(1, HEADS, HEADS, n, DIM, "bfloat16", "cuda", requires_grad=mode != "fwd")
        steps = {}
        for method in ("sdpa", "hyper"):
            step = make_step(method, q, k, v, causal=causal, mode=mode, backend="triton")
            step.__name__ = method
            steps[method] = step
        for warm_seconds in (0.0, WARM_SECONDS):
            harness.GPU_WARM_SECONDS = warm_seconds
            for scheme in ("separate", "interleaved"):
                clocks = {}
                harness._gpu_sample = probed(original, clocks)
                if scheme == "separate":
                    times = {name: measure_step(step, "cuda", repeats=5) for name, step in steps.items()}
                else:
                    times = measure_steps_interleaved(steps, repeats=5)
                harness._gpu_sample = original
                mhz = {name: statistics.median(c) for name, c in clocks.items()}
                print(f"{mode:7} causal={causal!s:5} N={n:6}  warm {warm_seconds * 1e3:4.0f} ms  {scheme:11}  "
                      f"sdpa {times['sdpa'] * 1e3:9.3f} ms ({mhz['sdpa']:5.0f} MHz)  "
                      f"hyper {times['hyper'] * 1e3:8.3f} ms ({mhz['hyper']:5.0f} MHz)  "
                      f"ratio {times['sdpa'] / times['hyper']:7.2f}", flush=True)
        harness.GPU_WARM_SECONDS = WARM_SECONDS
        if mode == "fwd+bwd" and n == 131072:
            for count in (2, 10):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                for _ in range(count):
                    steps["hyper"]()
                torch.cuda.synchronize()
                print(f"  hyper peak over {count:2} steps: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
                      flush=True)
        del q, k, v, steps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
