"""The inputs as ``torch.autocast`` hands them to torch's SDPA (torch is imported only for torch
tensors): every entry point that takes q, k, v casts them here first."""

from __future__ import annotations

from .._arrays import is_torch_type

#: Devices without autocast, as dynamo sees them (``torch.amp.is_autocast_available`` is untraceable).
_NO_AUTOCAST = ("meta",)


def autocast_inputs(q, k, v):
    """q, k and v in ``torch.autocast``'s dtype while it is on for their device, as SDPA takes them
    (it is on autocast's lower-precision list); float64 stays as it is.  A model's RoPE computed in
    float32 under autocast hands attention float32 q and k beside a bf16 v."""
    if not is_torch_type(q):
        return q, k, v
    import torch

    device = q.device.type
    # devices without autocast (meta, ...): is_autocast_enabled would raise.  Dynamo cannot trace
    # is_autocast_available (torch 2.11): while compiling, the known one is ruled out by name
    available = device not in _NO_AUTOCAST if torch.compiler.is_compiling() else torch.amp.is_autocast_available(device)
    if not available or not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(x.to(dtype) if x.dtype in castable and x.dtype != dtype else x for x in (q, k, v))
