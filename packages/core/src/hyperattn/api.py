"""The front door: validation, backend resolution, and the run of a plan."""

from __future__ import annotations

import functools
import math
import numbers
import sys
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .algorithm import ExactPiece, Plan, draw_projections, is_exact_call, plan_attention, run_forward
from .config import HyperAttentionConfig
from .protocol import Backend, Segments
from .registry import available_backends, backend_status, known_backend_names


@dataclass(frozen=True)
class Problem:
    """The validated description of one call's inputs."""

    array_type: str
    device: str
    dtype: str
    batch: int
    q_heads: int
    kv_heads: int
    n_q: int
    n_k: int
    head_dim: int
    v_head_dim: int
    requires_grad: bool

    @property
    def head_dims(self) -> tuple[int, int]:
        return (self.head_dim, self.v_head_dim)


def validate_inputs(q, k, v, *, causal: bool) -> Problem:
    """Check q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv]; raise naming what is wrong."""
    problem = _valid_torch_problem(q, k, v, causal)
    return problem if problem is not None else _validate_slowly(q, k, v, causal=causal)


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


def _validate_slowly(q, k, v, *, causal: bool) -> Problem:
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
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")


def make_rng(seed) -> np.random.Generator:
    """One NumPy generator per call: every backend sees the same draws for the same seed."""
    check_seed(seed)
    return np.random.default_rng(seed)


def _unsupported_reason(status, problem: Problem) -> str | None:
    if not status.available:
        return status.reason
    backend = status.backend
    reason = backend.unsupported_reason(problem.array_type, problem.device, problem.dtype, problem.head_dims)
    if reason is None and problem.requires_grad and not backend.capabilities.supports_backward:
        reason = "inputs require grad but this backend has no backward"
    return reason


def resolve_backend(name, problem: Problem) -> Backend:
    """The backend that runs ``problem``: the named one, or for "auto" the fastest that can."""
    names = known_backend_names()
    if not isinstance(name, str) or (name != "auto" and name not in names):
        raise ValueError(f"backend must be one of {('auto',) + names}, got {name!r}")
    if name != "auto":
        status = backend_status(name)
        reason = _unsupported_reason(status, problem)
        if reason is not None:
            extra = "" if status.available else f"; install it with: {status.install_hint}"
            raise ValueError(f"backend {name!r} cannot run these inputs ({_describe(problem)}): {reason}{extra}")
        return status.backend
    statuses = sorted(
        available_backends(), key=lambda s: -(s.backend.capabilities.priority if s.available else -1)
    )
    reasons = []
    for status in statuses:
        reason = _unsupported_reason(status, problem)
        if reason is None:
            return status.backend
        hint = "" if status.available else f" [install: {status.install_hint}]"
        reasons.append(f"  {status.name}: {reason}{hint}")
    raise ValueError(f"no backend can run these inputs ({_describe(problem)}):\n" + "\n".join(reasons))


def _describe(problem: Problem) -> str:
    return (
        f"{problem.array_type} {problem.dtype} on {problem.device}, "
        f"D={problem.head_dim}, Dv={problem.v_head_dim}" + (", requires grad" if problem.requires_grad else "")
    )


def execute(backend: Backend, q, k, v, make_plan, *, return_lse: bool, problem: Problem):
    """Run ``make_plan(q_native, k_native) -> Plan`` on ``backend``; outputs like q."""
    if problem.requires_grad:
        from .nn import planned_attention

        out, lse = planned_attention(backend, q, k, v, make_plan)
    else:
        qn, kn, vn = (backend.to_native(x) for x in (q, k, v))
        out_n, lse_n = run_forward(backend, make_plan(qn, kn), qn, kn, vn)
        out = backend.from_native(out_n, q)
        lse = backend.from_native(lse_n, q, dtype=lse_dtype(problem.dtype)) if return_lse else None
    return (out, lse) if return_lse else out


def lse_dtype(dtype: str) -> str:
    """The log-sum-exp is float32, float64 for float64 inputs."""
    return "float64" if dtype == "float64" else "float32"


def attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    block_size: int = 256,
    sample_size: int = 256,
    lsh_num_projs: int = 7,
    min_seq_len: int = 4096,
    seed: int | None = None,
    return_lse: bool = False,
):
    """HyperAttention of q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] -> out [B, Hq, Nq, Dv].

    With ``return_lse=True`` returns ``(out, lse)``, lse [B, Hq, Nq] float32 (float64 for float64
    inputs), natural log of the softmax normaliser of the scaled scores.  ``Hq % Hk == 0`` (GQA /
    MQA without copying K and V).  ``causal`` aligns the mask bottom-right and needs Nq <= Nk.
    ``seed`` makes the call deterministic and identical on every backend; None draws fresh.
    Calls shorter than ``min_seq_len``, or short enough that the backend's exact attention is
    faster (``Capabilities.exact_below``), are computed exactly.
    """
    config = _config(block_size, sample_size, lsh_num_projs, min_seq_len)
    problem = validate_inputs(q, k, v, causal=causal)
    scale = resolve_scale(scale, problem.head_dim)
    _check_flag("return_lse", return_lse)
    check_seed(seed)
    impl = resolve_backend(backend, problem)
    out = fused_exact(impl, q, k, v, problem, causal=bool(causal), scale=scale, return_lse=return_lse, config=config)
    if out is not None:
        return out
    rng = functools.cache(lambda: make_rng(seed))  # drawn from only when the plan has a sparse piece

    def make_plan(qn, kn) -> Plan:
        return plan_attention(
            impl, qn, kn, causal=bool(causal), scale=scale, config=config, rng=rng,
            projections=lambda: draw_projections(rng(), problem.head_dim, config.lsh_num_projs),
        )

    return execute(impl, q, k, v, make_plan, return_lse=return_lse, problem=problem)


def _config(block_size, sample_size, lsh_num_projs, min_seq_len) -> HyperAttentionConfig:
    """The validated config, made once per distinct plain-int parameters."""
    if all(type(x) is int for x in (block_size, sample_size, lsh_num_projs, min_seq_len)):
        return _cached_config(block_size, sample_size, lsh_num_projs, min_seq_len)
    return HyperAttentionConfig(block_size, sample_size, lsh_num_projs, min_seq_len)


@functools.lru_cache(maxsize=64)
def _cached_config(block_size: int, sample_size: int, lsh_num_projs: int, min_seq_len: int) -> HyperAttentionConfig:
    return HyperAttentionConfig(block_size, sample_size, lsh_num_projs, min_seq_len)


def fused_exact(backend: Backend, q, k, v, problem: Problem, *, causal: bool, scale: float, return_lse: bool,
                config: HyperAttentionConfig | None = None):
    """The whole call through the backend's optional ``fused_attention`` (one fused,
    differentiable exact kernel, no log-sum-exp), or None: when the lse is asked for, when the
    call is not exact (``is_exact_call`` under ``config``; None means exact attention was asked
    for), or when the backend has no such kernel or declines."""
    if return_lse or (config is not None and not is_exact_call(problem.n_q, problem.n_k, causal, config, backend)):
        return None
    fused = getattr(backend, "fused_attention", None)
    return None if fused is None else fused(q, k, v, causal=causal, scale=scale)


def exact_attention(q, k, v, *, causal: bool = False, scale: float | None = None, return_lse: bool = False):
    """Exact softmax attention (same shapes, GQA and causal convention as :func:`attention`)."""
    problem = validate_inputs(q, k, v, causal=causal)
    scale = resolve_scale(scale, problem.head_dim)
    _check_flag("return_lse", return_lse)
    impl = resolve_backend("auto", problem)
    out = fused_exact(impl, q, k, v, problem, causal=bool(causal), scale=scale, return_lse=return_lse)
    if out is not None:
        return out
    plan = Plan((ExactPiece(Segments.from_ranges([(0, problem.n_q, 0, problem.n_k)]), bool(causal)),), scale)
    return execute(impl, q, k, v, lambda qn, kn: plan, return_lse=return_lse, problem=problem)


def _check_flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


__all__ = ["attention", "exact_attention", "resolve_backend", "validate_inputs"]
