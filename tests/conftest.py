"""Shared fixtures: seeded inputs, the backends to cross-validate, and the `gpu` marker."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hyperattn.registry import backend_status

try:  # without a GPU the Triton kernels run in Triton's interpreter (set before they are compiled)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def reference():
    status = backend_status("reference")
    assert status.available, status.reason
    return status.backend


def make_inputs(shape, *, seed=0, dtype=np.float64, kv_heads=None, n_k=None, v_dim=None):
    """Gaussian q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] as NumPy arrays."""
    batch, q_heads, n_q, dim = shape
    kv_heads = q_heads if kv_heads is None else kv_heads
    n_k = n_q if n_k is None else n_k
    v_dim = dim if v_dim is None else v_dim
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_heads, n_q, dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_heads, n_k, dim)).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, n_k, v_dim)).astype(dtype)
    return q, k, v
