"""Shared fixtures: seeded inputs, the backends to cross-validate, and the `gpu` marker."""

from __future__ import annotations

import os

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


@pytest.fixture
def backend_options():
    """``set_options(name, **changes)``: ``hyperattn.configure`` for one test, undone afterwards."""
    import hyperattn

    saved = {}

    def set_options(name, **changes):
        if name not in saved:
            saved[name] = hyperattn.configure(name)
        return hyperattn.configure(name, **changes)

    yield set_options
    for name, options in saved.items():
        backend_status(name).backend.options = options
