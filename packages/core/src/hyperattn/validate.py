"""Input validation: every check names the argument, the expected and the actual value."""

from __future__ import annotations

import math
import numbers
import secrets
import sys

import numpy as np
from array_api_compat import is_torch_array

from . import _arrays, sampling
from .config import check_bool
from .protocol import Problem


def validate_inputs(q, k, v, *, causal: bool) -> Problem:
    """Check q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv]; raise naming what is wrong."""
    problem = _valid_torch_problem(q, k, v, causal)
    return problem if problem is not None else _validate_fully(q, k, v, causal=causal)


def _valid_torch_problem(q, k, v, causal) -> Problem | None:
    """The Problem of three plain torch tensors that pass every check, else None (the full checks
    then run and name what is wrong).  Short calls are host-bound: this path costs a third."""
    torch = sys.modules.get("torch")
    if torch is None or not (type(q) is type(k) is type(v) is torch.Tensor) or type(causal) is not bool:
        return None
    dtype = q.dtype
    if not (dtype is k.dtype is v.dtype and dtype.is_floating_point and q.device == k.device == v.device):
        return None
    if not (q.dim() == k.dim() == v.dim() == 4 and q.numel() and k.numel() and v.numel()):
        return None
    if not _shapes_agree(q.shape, k.shape, v.shape):
        return None
    (batch, q_heads, n_q, head_dim), (_, kv_heads, n_k, _), (_, _, _, v_head_dim) = q.shape, k.shape, v.shape
    name = _arrays.dtype_name(q)
    if name not in _arrays.FLOAT_DTYPES or (causal and n_q > n_k):
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return Problem("torch", str(q.device), name, batch, q_heads, kv_heads, n_q, n_k, head_dim, v_head_dim, grad)


def _validate_fully(q, k, v, *, causal: bool) -> Problem:
    arrays = {"q": q, "k": k, "v": v}
    kinds = {name: _arrays.array_type(x) for name, x in arrays.items()}
    for name, kind in kinds.items():
        if kind is None:
            raise TypeError(
                f"{name} must be a numpy.ndarray, torch.Tensor or cupy.ndarray, got {type(arrays[name]).__name__}")
    if len(set(kinds.values())) > 1:
        raise TypeError(f"q, k and v must be arrays of one type, got {kinds}")
    devices = {name: _arrays.device_name(x, kinds[name]) for name, x in arrays.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"q, k and v must be on one device, got {devices}")
    dtypes = {name: _arrays.dtype_name(x) for name, x in arrays.items()}
    for name, dtype in dtypes.items():
        if dtype not in _arrays.FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype {_arrays.FLOAT_DTYPES}, got {dtype}")
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"q, k and v must have one dtype, got {dtypes}")
    shape_of = {name: tuple(x.shape) for name, x in arrays.items()}
    for name, shape in shape_of.items():
        if len(shape) != 4 or 0 in shape:
            layout = {"q": "[B, Hq, Nq, D]", "k": "[B, Hk, Nk, D]", "v": "[B, Hk, Nk, Dv]"}[name]
            problem = "have 4 dimensions" if len(shape) != 4 else "not be empty:"
            raise ValueError(f"{name} must {problem} {layout}, got shape {shape}")
    if not _shapes_agree(*shape_of.values()):
        _raise_shape_mismatch(shape_of)  # the message is built only then
    (batch, q_heads, n_q, head_dim), (_, kv_heads, n_k, _), (_, _, _, v_head_dim) = shape_of.values()
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if causal and n_q > n_k:
        raise ValueError(
            f"causal=True needs Nq <= Nk (the mask is aligned bottom-right), got Nq={n_q}, Nk={n_k}"
        )
    return Problem(
        kinds["q"], devices["q"], dtypes["q"], batch, q_heads, kv_heads, n_q, n_k, head_dim, v_head_dim,
        kinds["q"] == "torch" and _arrays.requires_grad(q, k, v),
    )


def _shapes_agree(q_shape, k_shape, v_shape) -> bool:
    """One batch size, k and v with the same heads and length, q and k with the same head dim, and
    query heads a multiple of the KV heads (shapes of 4 dimensions)."""
    (batch, q_heads, _, head_dim), (kb, kv_heads, n_k, kd), (vb, vh, vn, _) = q_shape, k_shape, v_shape
    return batch == kb == vb and kv_heads == vh and n_k == vn and kd == head_dim and q_heads % kv_heads == 0


def _raise_shape_mismatch(shape_of: dict) -> None:
    """The ValueError naming the first inconsistency between the q, k and v shapes."""
    (batch, q_heads, n_q, head_dim), (kb, kv_heads, n_k, kd), (vb, vh, vn, v_head_dim) = shape_of.values()
    shapes = f"q {shape_of['q']}, k {shape_of['k']}, v {shape_of['v']}"
    if not batch == kb == vb:
        raise ValueError(f"q, k and v must have one batch size B, got {shapes}")
    if kv_heads != vh:
        raise ValueError(f"k and v must have the same number of heads Hk, got {shapes}")
    if n_k != vn:
        raise ValueError(f"k and v must have the same length Nk, got {shapes}")
    if kd != head_dim:
        raise ValueError(f"q and k must have the same head dim D, got {shapes}")
    if q_heads % kv_heads:
        raise ValueError(
            f"the number of query heads Hq must be a multiple of the KV heads Hk (GQA), got Hq={q_heads}, Hk={kv_heads}"
        )


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` by default, else a finite positive number."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")
    return float(scale)


def check_seed(seed) -> None:
    """An int seed must be in [0, 2**63) (what an int64 holds)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < sampling.SEED_LIMIT):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")


def check_projections(projections, head_dim: int, num_projs: int) -> None:
    """Given LSH projections must be a float array [head_dim, num_projs]."""
    if projections is None:
        return
    shape = tuple(getattr(projections, "shape", ()))
    dtype = str(getattr(projections, "dtype", type(projections).__name__))
    if shape != (head_dim, num_projs) or "float" not in dtype:
        raise ValueError(f"projections must be a float array of shape (D, lsh_num_projs) = ({head_dim}, {num_projs}), "
                         f"got shape {shape} and dtype {dtype}")


def resolve_seed(seed, device: str):
    """The seed a plan takes: None draws a fresh int; an int stays one; a 0-d int64 torch tensor
    on the CPU gives its value, and one on the inputs' ``device`` stays a tensor (a *device seed*,
    read only when the kernels run: no synchronisation, and a CUDA graph replay reads its value
    then)."""
    if seed is None:
        return secrets.randbits(63)
    if is_torch_array(seed):
        if seed.shape != () or str(seed.dtype) != "torch.int64":
            raise ValueError(f"a seed tensor must be a 0-d int64 tensor, got shape {tuple(seed.shape)} and dtype "
                             f"{seed.dtype}")
        if seed.device.type == "cpu":
            seed = int(seed)
        elif str(seed.device) != device:
            raise ValueError(f"a device seed must be on the inputs' device {device}, got one on {seed.device}")
        else:
            return seed.detach()
    check_seed(seed)
    return int(seed)


def make_rng(seed) -> np.random.Generator:
    """One NumPy generator per call: every backend sees the same draws for the same seed."""
    check_seed(seed)
    return np.random.default_rng(seed)


def check_flag(name: str, value) -> bool:
    """``value`` as a bool, or a TypeError naming ``name``."""
    return check_bool(name, value)
