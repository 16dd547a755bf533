"""The CuPy backend without a GPU: it reports itself unavailable with its reason, an explicit
``backend="cupy"`` says why, and its options are validated (naming the field)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("hyperattn_cupy")

import hyperattn  # noqa: E402
from hyperattn.registry import backend_status  # noqa: E402


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_has_gpu(), reason="a GPU is here")
def test_without_a_gpu_the_backend_is_unavailable_and_says_why():
    status = backend_status("cupy")
    assert status.available and not status.runs_here  # installed, but it cannot run here
    reason = status.backend.unavailable_reason()
    assert "GPU" in reason
    q = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="backend 'cupy' cannot run these inputs") as error:
        hyperattn.attention(q, q, q, backend="cupy")
    assert reason in str(error.value) and "numpy" in str(error.value)


def test_auto_never_picks_an_unavailable_cupy():
    q = np.random.default_rng(0).standard_normal((1, 1, 8, 8))
    hyperattn.attention(q, q, q, backend="auto")  # the reference runs it


def test_options_are_validated_and_name_the_field():
    from hyperattn_cupy.launches import DEFAULT_LAUNCHES
    from hyperattn_cupy.options import CupyOptions

    with pytest.raises(ValueError, match="sample_row_chunk"):
        CupyOptions(sample_row_chunk=0)
    with pytest.raises(ValueError, match="missing"):
        CupyOptions(launches={k: v for k, v in DEFAULT_LAUNCHES.items() if k != "forward"})
    with pytest.raises(TypeError, match="forward"):
        CupyOptions(launches={**DEFAULT_LAUNCHES, "forward": (64, 64)})
    with pytest.raises(ValueError, match="CupyOptions.fused_kernels"):
        CupyOptions(fused_kernels=("math",))
    with pytest.raises(ValueError, match="CupyOptions.sdpa_order"):
        CupyOptions(sdpa_order=())
    with pytest.raises(ValueError, match="fused_backward_chunk_bytes"):
        CupyOptions(fused_backward_chunk_bytes=0)
    hash(CupyOptions())


def test_whole_exact_calls_go_to_sdpa_only_for_torch_cuda_tensors():
    """``fused_attention`` is None for cupy / NumPy arrays, CPU tensors, GQA and causal Nq != Nk:
    then the plan's exact piece runs in the backend's kernels."""
    torch = pytest.importorskip("torch")
    from hyperattn_cupy.backend import CupyBackend

    backend = CupyBackend()
    x = np.zeros((1, 2, 8, 8), np.float32)
    assert backend.fused_attention(x, x, x, causal=False, scale=1.0) is None
    t = torch.zeros(1, 2, 8, 8)
    assert backend.fused_attention(t, t, t, causal=True, scale=1.0) is None  # not on a GPU


def test_deterministic_backward_is_refused_with_its_reason():
    torch = pytest.importorskip("torch")
    from hyperattn_cupy.backend import CupyBackend

    from hyperattn.protocol import Problem

    problem = Problem("torch", "cuda:0", "bfloat16", 1, 2, 2, 64, 64, 64, 64, True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert "deterministic" in CupyBackend().unsupported_reason(problem)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert CupyBackend().unsupported_reason(problem) is None


def test_launch_table_lookup_and_padding():
    from hyperattn_cupy.launches import DEFAULT_LAUNCHES, launch_for, padded_dim, replaced

    assert [padded_dim(d) for d in (1, 16, 40, 64, 65, 256)] == [16, 16, 64, 64, 128, 256]
    assert launch_for(DEFAULT_LAUNCHES, "forward", 40, 128) == DEFAULT_LAUNCHES["forward"].d128
    with pytest.raises(ValueError, match="257"):
        launch_for(DEFAULT_LAUNCHES, "forward", 257)
    changed = replaced(DEFAULT_LAUNCHES, "forward", 64, block_n=32)
    assert changed["forward"].d64.block_n == 32 and changed["forward"].d128 == DEFAULT_LAUNCHES["forward"].d128


def test_more_positions_than_int32_indices_are_refused():
    from hyperattn_cupy.backend import MAX_POSITIONS, CupyBackend

    from hyperattn.protocol import Problem

    long_keys = Problem("torch", "cuda:0", "bfloat16", 1, 1, 1, 64, MAX_POSITIONS + 1, 16, 16, False)
    assert "int32" in CupyBackend().unsupported_reason(long_keys)
    grid = Problem("torch", "cuda:0", "bfloat16", 4, 20000, 20000, 64, 64, 16, 16, False)
    assert "grid" in CupyBackend().unsupported_reason(grid)


def test_a_call_inside_a_cuda_graph_capture_is_refused_with_its_reason(monkeypatch):
    """CuPy's memory pool is not the graph's: under a capture (torch's or CuPy's) dispatch names the
    reason and a call already dispatched stops at its scope, before any allocation; with nothing
    capturing (here: no GPU at all) neither refuses."""
    from hyperattn_cupy import arrays, backend

    from hyperattn.protocol import Problem

    problem = Problem("torch", "cuda:0", "bfloat16", 1, 2, 2, 64, 64, 64, 64, False)
    assert arrays.capture_in_progress() is None
    assert backend.CupyBackend().unsupported_reason(problem) is None
    monkeypatch.setattr(arrays, "capture_in_progress", lambda: "torch")
    reason = backend.CupyBackend().unsupported_reason(problem)
    assert "CUDA graph is being captured (torch)" in reason and "backend='triton'" in reason
    with pytest.raises(RuntimeError, match="cannot run this call: a CUDA graph is being captured"):
        backend.CupyBackend().call_scope(np.zeros(1))
