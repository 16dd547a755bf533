"""Names of PyTorch's attention kernels, as backends' options take them; no torch import, so that
options can be validated where torch is not installed (``fused.py`` maps them to the kernels)."""

from __future__ import annotations

#: PyTorch SDPA's kernels by name (``torch.nn.attention.SDPBackend``).
SDPA_KERNELS = ("cudnn", "flash", "efficient", "math")
#: PyTorch's fused kernels that return the log-sum-exp (used for exact pieces).
FUSED_KERNELS = ("cudnn", "flash")


def check_kernel_names(owner: str, name: str, value, allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming ``owner.name`` unless ``value`` is a non-empty tuple of distinct names
    from ``allowed`` (for options such as ``fused_kernels`` and ``sdpa_order``)."""
    if not (isinstance(value, tuple) and value and all(v in allowed for v in value) and len(set(value)) == len(value)):
        raise ValueError(f"{owner}.{name}: expected a non-empty tuple of distinct names from {allowed}, "
                         f"got {value!r}")
