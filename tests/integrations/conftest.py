"""Fixtures of the integration tests (tiny transformers models on the CPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a busy 2-core machine are ~100x slower with two OpenMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
