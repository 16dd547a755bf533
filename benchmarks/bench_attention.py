"""asv suite: HyperAttention per backend against PyTorch SDPA, forward and forward+backward.

Device synchronisation happens inside every timed call; JIT compilation and autotuning are
warmed up in ``setup``.  Lengths above 16384 run only with HYPERATTN_BENCH_LARGE=1.
Unavailable backends are skipped (asv shows them as n/a) with the reason in the log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from harness import make_inputs, make_step, synchronize  # noqa: E402

LARGE = os.environ.get("HYPERATTN_BENCH_LARGE") == "1"
LENGTHS = [4096, 16384] + ([32768, 131072] if LARGE else [])
METHODS = ["reference", "triton", "cupy", "sdpa"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
HEADS = 32 if DEVICE == "cuda" else 8


def _skip_unless_runnable(method: str) -> None:
    """Raise NotImplementedError (asv's skip) when the backend cannot run on this machine."""
    if method == "sdpa":
        return
    try:
        from hyperattn.dispatch import resolve_backend
        from hyperattn.validate import validate_inputs
    except ImportError:  # commits before the pipeline split (asv runs this suite on old commits too)
        from hyperattn.api import resolve_backend, validate_inputs
    probe = torch.zeros(1, 1, 8, 64, device=DEVICE, dtype=getattr(torch, DTYPE))
    try:
        resolve_backend(method, validate_inputs(probe, probe, probe, causal=False))
    except ValueError as error:  # the backend's reasons, as dispatch gives them
        raise NotImplementedError(f"{method}: {error}") from error


class _Attention:
    params = (METHODS, LENGTHS, [False, True])
    param_names = ["method", "seq_len", "causal"]
    mode = "fwd"
    timeout = 600

    def setup(self, method, seq_len, causal):
        _skip_unless_runnable(method)
        requires_grad = self.mode != "fwd"
        self.q, self.k, self.v = make_inputs(1, HEADS, HEADS, seq_len, 64, DTYPE, DEVICE, requires_grad=requires_grad)
        name = "sdpa" if method == "sdpa" else "hyper"
        self.step = make_step(name, self.q, self.k, self.v, causal=causal, mode=self.mode, backend=method)
        self.step()  # warm-up: JIT, autotune, allocator
        synchronize(DEVICE)

    def _timed(self):
        self.step()
        synchronize(DEVICE)


class TimeForward(_Attention):
    mode = "fwd"

    def time_attention(self, method, seq_len, causal):
        self._timed()


class TimeForwardBackward(_Attention):
    mode = "fwd+bwd"

    def time_attention(self, method, seq_len, causal):
        self._timed()


class TrackQuality(_Attention):
    """‖O − O*‖ / ‖V‖ against SDPA on the same inputs (exact for 'sdpa', so 0)."""

    unit = "relative error"

    def track_error_vs_values(self, method, seq_len, causal):
        from harness import sdpa

        with torch.no_grad():
            out = self.step()
            exact = sdpa(self.q, self.k, self.v, causal)
        return float((out.float() - exact.float()).norm() / self.v.float().norm())


class TrackPeakMemory(_Attention):
    """Peak GPU memory of one forward+backward step (GPU only)."""

    mode = "fwd+bwd"
    unit = "GiB"

    def setup(self, method, seq_len, causal):
        if DEVICE != "cuda":
            raise NotImplementedError("peak GPU memory needs a GPU")
        super().setup(method, seq_len, causal)

    def track_peak_memory(self, method, seq_len, causal):
        torch.cuda.reset_peak_memory_stats()
        self._timed()
        return torch.cuda.max_memory_allocated() / 2**30
