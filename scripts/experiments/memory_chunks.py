"""Where the fwd+bwd memory peak and time go at N=131072 (benchmarks/results/experiments_*).

``python scripts/experiments/memory_chunks.py`` on the GPU machine prints
(A) for the benchmark's fwd+bwd step (back-to-back, as ``benchmarks/single_layer.py`` times it):
    CUDA memory allocated before each backend call of the backward and the peak inside it, and the
    large live tensors at the worst call;
(B) time and peak of the step for backward head-chunk sizes (``BACKWARD_CHUNK_BYTES``) and fused
    exact-backward chunk sizes (``FUSED_BACKWARD_CHUNK_BYTES``);
(C) profiler tables (GPU time by kernel) of the causal step at the default chunk and unchunked.
"""

import gc
import sys

import torch

from benchmarks.harness import make_inputs, make_step, measure_step
from hyperattn import algorithm
from hyperattn_triton import backend as triton_backend
from hyperattn_triton import tiles

N = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
GiB = 2**30


def fresh_step(causal):
    gc.collect()
    torch.cuda.empty_cache()
    q, k, v = make_inputs(1, 32, 32, N, 64, "bfloat16", "cuda", requires_grad=True)
    return make_step("hyper", q, k, v, causal=causal, mode="fwd+bwd", backend="triton")


def peak_of(step, repeats=3):
    seconds = measure_step(step, "cuda", repeats=repeats)
    return seconds * 1e3, torch.cuda.max_memory_allocated() / GiB


def live_tensors(min_bytes=32 << 20):
    found = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.is_cuda:
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = (storage.nbytes(), tuple(obj.shape), str(obj.dtype))
        except Exception:
            pass
    return sorted((v for v in found.values() if v[0] >= min_bytes), reverse=True)


def instrumented(causal):
    """(A): memory at each backend call of the second step's backward."""
    step = fresh_step(causal)
    step()
    torch.cuda.synchronize()
    log = []
    names = ("exact_forward", "sparse_forward", "exact_backward", "sparse_backward", "row_dot")
    originals = {name: getattr(triton_backend.TritonBackend, name) for name in names}

    def wrap(name, fn):
        def call(self, *args, **kwargs):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            live = live_tensors() if name.endswith("backward") else None
            result = fn(self, *args, **kwargs)
            torch.cuda.synchronize()
            log.append((name, before / GiB, torch.cuda.max_memory_allocated() / GiB, live))
            return result
        return call

    for name, fn in originals.items():
        setattr(triton_backend.TritonBackend, name, wrap(name, fn))
    try:
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
    finally:
        for name, fn in originals.items():
            setattr(triton_backend.TritonBackend, name, fn)
    print(f"=== (A) causal={causal}: memory per backend call (GiB)")
    worst = max(log, key=lambda e: e[2])
    for name, before, peak, _ in log:
        print(f"  {name:16s} before {before:6.2f}  peak inside {peak:6.2f}")
    print(f"  worst: {worst[0]} peak {worst[2]:.2f}; live tensors >= 32 MiB found by gc there:")
    for nbytes, shape, dtype in worst[3] or []:
        print(f"    {nbytes / 2**20:8.0f} MiB {dtype:16s} {shape}")
    del step


for causal in (True,):
    instrumented(causal)

print("=== (B) time and peak of the fwd+bwd step by chunk sizes")
default_chunk, default_fused = algorithm.BACKWARD_CHUNK_BYTES, triton_backend.FUSED_BACKWARD_CHUNK_BYTES
default_rows = tiles.SAMPLE_ROW_CHUNK
for causal in (False, True):
    for chunk, fused, rows in ((1 << 40, 256 << 20, 4096), (1 << 30, 256 << 20, 4096), (768 << 20, 256 << 20, 4096),
                               (512 << 20, 256 << 20, 4096), (1 << 30, 256 << 20, 2048), (768 << 20, 256 << 20, 2048),
                               (512 << 20, 256 << 20, 2048), (1 << 30, 128 << 20, 2048), (768 << 20, 128 << 20, 2048)):
        if not causal and fused != 256 << 20:
            continue
        algorithm.BACKWARD_CHUNK_BYTES, triton_backend.FUSED_BACKWARD_CHUNK_BYTES = chunk, fused
        tiles.SAMPLE_ROW_CHUNK = rows
        step = fresh_step(causal)
        torch.cuda.reset_peak_memory_stats()
        ms, peak = peak_of(step)
        print(f"  causal={causal!s:5} head chunk {chunk / GiB:8.2f} GiB  fused chunk {fused >> 20:4d} MiB  "
              f"sample row chunk {rows:5d}: {ms:7.2f} ms  peak {peak:5.2f} GiB", flush=True)
        del step
algorithm.BACKWARD_CHUNK_BYTES, triton_backend.FUSED_BACKWARD_CHUNK_BYTES = default_chunk, default_fused
tiles.SAMPLE_ROW_CHUNK = default_rows

print("=== (C) GPU time by kernel, causal fwd+bwd")
for chunk in (default_chunk, 1 << 40):
    algorithm.BACKWARD_CHUNK_BYTES = chunk
    step = fresh_step(True)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"--- head chunk {chunk / GiB:.2f} GiB")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))
    del step
algorithm.BACKWARD_CHUNK_BYTES = default_chunk
