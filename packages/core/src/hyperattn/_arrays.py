"""Describing input arrays without importing the frameworks that made them."""

from __future__ import annotations

import sys

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def array_type(x) -> str | None:
    """'numpy', 'torch', 'cupy', or None for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if _is_torch_tensor(x):
        return "torch"
    if type(x).__module__.split(".")[0] == "cupy" and type(x).__name__ == "ndarray":
        return "cupy"
    return None


def is_torch_type(x) -> bool:
    """Whether ``x`` is a torch tensor, by its type's modules: never ``sys.modules``, which
    torch.compile's tracer would wrap whole (a module imported while it walks it breaks the trace)."""
    return any(cls.__module__.startswith("torch") for cls in type(x).__mro__)


def _is_torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def dtype_name(x) -> str:
    """'float32', 'bfloat16', 'int64', ... for numpy, torch and cupy arrays alike."""
    return str(x.dtype).removeprefix("torch.")


def device_name(x, kind: str | None = None) -> str:
    """'cpu', 'cuda:0', ...: where the array lives (``kind``: its array_type, if known)."""
    kind = kind or array_type(x)
    if kind == "numpy":
        return "cpu"
    if kind == "torch":
        return str(x.device)
    if kind == "cupy":
        return f"cuda:{x.device.id}"
    return "unknown"


def requires_grad(*arrays) -> bool:
    """True when autograd should record a call on these arrays (torch only)."""
    if array_type(arrays[0]) != "torch":
        return False
    import torch

    return torch.is_grad_enabled() and any(a.requires_grad for a in arrays)
