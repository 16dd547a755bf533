"""Helpers the tests of every subject share: seeded inputs."""

from __future__ import annotations

import numpy as np


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
