"""Describing input arrays without importing the frameworks that made them."""

from __future__ import annotations

import collections
import sys
import threading

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


def device_kind(x) -> str:
    """'cpu' or 'cuda' (the device without its index)."""
    return device_name(x).split(":")[0]


def requires_grad(*arrays) -> bool:
    """True when autograd should record a call on these arrays (torch only)."""
    if array_type(arrays[0]) != "torch":
        return False
    import torch

    return torch.is_grad_enabled() and any(a.requires_grad for a in arrays)


def host_to_device(values: np.ndarray, like):
    """``values`` (host NumPy) as an array of ``like``'s type on its device.

    For CUDA torch tensors the copy is staged through a pinned ring buffer and does not block:
    a copy from pageable memory can wait for the GPU's queued work, and pinning each array
    costs ~0.1 ms of host time.
    """
    kind = array_type(like)
    if kind == "numpy":
        return values
    if kind == "torch":
        import torch

        values = np.ascontiguousarray(values)
        if like.device.type == "cuda":
            return _PINNED.copy(values, like.device)
        return torch.from_numpy(values).to(like.device)
    from array_api_compat import array_namespace, device

    return array_namespace(like).asarray(values, device=device(like))


class _PinnedRing:
    """A pinned host buffer used as a ring of staging areas for small host-to-GPU copies.

    Each copy records a CUDA event; an area is reused only after the event of the copy that used
    it last has completed, so the host never overwrites bytes still in flight.  Areas are handed
    out in order, so the copies in flight form a queue sorted by age *and* by position within a
    lap: a new area can only overlap the oldest ones, and each copy looks at the front only (the
    queue grows to thousands of entries when the GPU runs far behind the host).
    """

    SIZE = 16 << 20
    ALIGN = 256

    def __init__(self):
        self.buffer = None
        self.cursor = 0
        self.pending = collections.deque()  # (start, end, event) of copies in flight, oldest first
        self.lock = threading.Lock()

    def copy(self, values: np.ndarray, device):
        import torch

        if values.nbytes > self.SIZE // 4:  # large: a one-off pinned copy
            return torch.from_numpy(values).pin_memory().to(device, non_blocking=True)
        with self.lock:
            return self._staged_copy(values, device)

    def _staged_copy(self, values: np.ndarray, device):
        import torch

        if self.buffer is None:
            self.buffer = torch.empty(self.SIZE, dtype=torch.uint8, pin_memory=True)
        start, end = self._reserve(values.nbytes)
        staged = self.buffer[start:end]
        staged.numpy()[:] = values.reshape(-1).view(np.uint8)
        result = torch.empty(values.shape, dtype=_torch_dtype(values.dtype), device=device)
        result.view(-1).view(torch.uint8).copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((start, end, event))
        return result

    def _reserve(self, nbytes: int) -> tuple[int, int]:
        """The next free area [start, end) of nbytes, once no copy in flight uses it."""
        start = self.cursor
        if start + nbytes > self.SIZE:  # wrap: the skipped tail's copies go first (queue order)
            self._wait_for(start, self.SIZE)
            start = 0
        end = start + nbytes
        self._wait_for(start, end)
        self.cursor = -(-end // self.ALIGN) * self.ALIGN
        return start, end

    def _wait_for(self, start: int, end: int) -> None:
        """Wait for (and forget) the copies in flight that used bytes of [start, end)."""
        pending = self.pending
        while pending:
            s, e, event = pending[0]
            if s == e:  # an empty copy guards no bytes
                pass
            elif s < end and start < e:
                event.synchronize()
            elif not event.query():  # the oldest copy still runs and does not overlap: none does
                return
            pending.popleft()


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


_PINNED = _PinnedRing()
