"""What ``HyperAttention(cuda_graphs=True)`` checks without a GPU: its options, the inputs it
refuses (with the argument, the expectation and what it got), and the call signature a graph is
kept under.  Capture and replay are tested on the GPU (tests/triton/test_module_cuda_graphs.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import hyperattn
from hyperattn.torch.graphs import CallGraphs, call_signature


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "8"])
def test_max_graphs_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
        hyperattn.HyperAttention(64, cuda_graphs=True, max_graphs=bad)
    with pytest.raises(ValueError, match="max_graphs"):
        CallGraphs(bad)


def test_cuda_graphs_must_be_a_bool():
    with pytest.raises(ValueError, match="cuda_graphs must be a bool, got 1"):
        hyperattn.HyperAttention(64, cuda_graphs=1)


def test_cpu_inputs_are_refused_by_name():
    module = hyperattn.HyperAttention(64, cuda_graphs=True)
    q = torch.randn(1, 2, 128, 64)
    with pytest.raises(ValueError, match="query must be a CUDA tensor, got cpu"):
        module(q, q, q)
    assert int(module.calls) == 0 and len(module.graphs) == 0  # nothing ran, nothing kept


def test_the_crossover_is_off_for_graphed_modules_unless_asked():
    """The backends' crossovers are eager-call points; a replay wins below them."""
    assert hyperattn.HyperAttention(64).config.exact_crossover is True
    assert hyperattn.HyperAttention(64, cuda_graphs=True).config.exact_crossover is False
    assert hyperattn.HyperAttention(64, cuda_graphs=True, exact_crossover=True).config.exact_crossover is True
    assert hyperattn.HyperAttention(64, exact_crossover=False).config.exact_crossover is False


def test_the_default_module_keeps_no_graphs_and_says_so():
    assert hyperattn.HyperAttention(64).graphs is None
    assert "cuda_graphs=True, max_graphs=3" in repr(hyperattn.HyperAttention(64, cuda_graphs=True, max_graphs=3))
    assert "cuda_graphs" not in repr(hyperattn.HyperAttention(64))


def test_the_signature_tells_apart_what_a_graph_depends_on():
    """Shapes, strides, dtypes, requires_grad (only while grad is enabled), flags and the
    backends' options: each changes the key; equal calls share it."""
    q = torch.randn(1, 2, 64, 8)
    base = call_signature((q, q, q), ("flags",))
    assert call_signature((q.clone(), q, q), ("flags",)) == base
    assert call_signature((q[..., :4], q, q), ("flags",)) != base  # shape
    assert call_signature((q.transpose(1, 2).contiguous().transpose(1, 2), q, q), ("flags",)) != base  # strides
    assert call_signature((q.double(), q, q), ("flags",)) != base  # dtype
    assert call_signature((q, q, q), ("other",)) != base
    grad = q.clone().requires_grad_()
    assert call_signature((grad, q, q), ("flags",)) != base
    with torch.no_grad():
        assert call_signature((grad, q, q), ("flags",)) != base  # grad mode is part of it
        assert call_signature((grad, q, q), ("flags",)) == call_signature((q, q, q), ("flags",))
    before = hyperattn.configure("reference")
    try:
        hyperattn.configure("reference", backward_chunk_bytes=before.backward_chunk_bytes)
        assert call_signature((q, q, q), ("flags",)) != base  # a configure may change the plan
    finally:
        hyperattn.configure("reference", backward_chunk_bytes=before.backward_chunk_bytes)


def test_the_signature_holds_the_modes_a_call_reads_when_it_runs():
    """Inference mode (its static inputs are inference tensors), deterministic algorithms (the
    backward's path) and the SDPA kernels enabled each get their own graph."""
    q = torch.randn(1, 2, 64, 8)
    with torch.no_grad():
        plain = call_signature((q, q, q), ())
    with torch.inference_mode():
        assert call_signature((q, q, q), ()) != plain
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with torch.no_grad():
            assert call_signature((q, q, q), ()) != plain
    finally:
        torch.use_deterministic_algorithms(before)
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        assert call_signature((q, q, q), ()) != plain


def test_a_copy_of_a_graphed_module_starts_without_graphs():
    """copy.deepcopy (an EMA copy) and pickling work after captures: the graphs stay behind."""
    module = hyperattn.HyperAttention(64, cuda_graphs=True, max_graphs=3)
    module.graphs._captured["signature"] = lambda: None  # stands for a capture: copies nothing of it
    for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert len(other.graphs) == 0 and other.graphs.max_graphs == 3
    assert len(module.graphs) == 1


def test_key_norm_capabilities_need_per_draw_weights():
    from hyperattn.protocol import Capabilities

    with pytest.raises(ValueError, match="per_draw_weights must be True"):
        Capabilities(("numpy",), ("cpu",), ("float64",), samplings=("uniform", "key_norm"))
