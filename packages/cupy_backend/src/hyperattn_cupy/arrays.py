"""Arrays in and out of the CuPy backend: torch CUDA tensors through DLPack (no copy) and cupy
arrays as they are; bfloat16 through ``ml_dtypes.bfloat16`` (CuPy's bfloat16 dtype).

Kernels run on CuPy's current device and stream.  Every backend method makes them the inputs'
device and, for torch inputs, torch's current stream there (:func:`on_device_of`), so that
allocations, table copies and kernels are ordered with the caller's torch work.
"""

from __future__ import annotations

import contextlib
import sys
import threading


def is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def torch_to_cupy(x):
    """A torch CUDA tensor as a cupy array over the same memory (bfloat16 through an int16 view)."""
    import cupy
    import torch

    x = x.detach()
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return cupy.from_dlpack(x.view(torch.int16)).view(ml_dtypes.bfloat16)
    return cupy.from_dlpack(x)


def cupy_to_torch(y, dtype=None):
    """A cupy array as a torch tensor over the same memory, then in ``dtype`` (a torch dtype)."""
    import torch

    if y.dtype.name == "bfloat16":
        import cupy

        out = torch.from_dlpack(y.view(cupy.int16)).view(torch.bfloat16)
    else:
        out = torch.from_dlpack(y)
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


def element_strides(x) -> tuple:
    """A cupy (or NumPy) array's strides in elements, as the kernels take them (np.int64)."""
    import numpy as np

    return tuple(np.int64(s // x.itemsize) for s in x.strides)


def cupy_dtype(name: str):
    """The cupy/NumPy dtype of a dtype name ("bfloat16" through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    import numpy as np

    return np.dtype(name)


class StreamBridge:
    """Which stream the kernels of the current thread's call run on: torch's current stream of the
    inputs' device when the caller gave torch tensors (recorded by :meth:`record`), else CuPy's."""

    def __init__(self):
        self._local = threading.local()
        self._streams = {}  # (stream pointer, device) -> cupy.cuda.Stream wrapping it

    def record(self, x) -> None:
        """Remember the caller's stream for an input ``x`` (torch: its device's current stream)."""
        if is_torch(x):
            import torch

            self._local.stream = torch.cuda.current_stream(x.device).cuda_stream
            self._local.device = x.device.index
        else:
            self._local.stream = None

    def torch_inputs(self) -> bool:
        """Whether the current thread's call was given torch tensors (recorded by :meth:`record`)."""
        return getattr(self._local, "stream", None) is not None

    def scope(self):
        """A context in which CuPy's current stream is the recorded one (nothing to do for cupy inputs)."""
        pointer = getattr(self._local, "stream", None)
        if pointer is None:
            return contextlib.nullcontext()
        key = (pointer, self._local.device)  # a default stream is pointer 0 on every device
        stream = self._streams.get(key)
        if stream is None:
            import cupy

            with cupy.cuda.Device(self._local.device):  # the stream belongs to the recorded device
                stream = self._streams[key] = cupy.cuda.Stream.from_external(_StreamHandle(pointer))
        return stream


class _StreamHandle:
    """A raw stream pointer in the CUDA stream protocol, which ``cupy.cuda.Stream.from_external``
    takes (its ``ExternalStream`` is deprecated in CuPy 14)."""

    def __init__(self, pointer: int):
        self.pointer = pointer

    def __cuda_stream__(self):
        return (0, self.pointer)


@contextlib.contextmanager
def on_device_of(x, streams: StreamBridge):
    """CuPy's current device made ``x``'s (a cupy array), then its current stream the caller's
    (``streams``): allocations, table copies and launches all land there, ordered with the caller."""
    import cupy

    with cupy.cuda.Device(x.device.id), streams.scope():
        yield


def capture_in_progress() -> str | None:
    """Which CUDA graph capture records the current stream: ``"torch"`` (``torch.cuda.graph``,
    ``torch.compile``'s graph trees) or ``"cupy"`` (``cupy.cuda.Stream.begin_capture``), else None
    (also without a GPU or driver: nothing can be capturing there)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return "torch"
        cupy = sys.modules.get("cupy")
        if cupy is not None and cupy.cuda.runtime.getDeviceCount() > 0 \
                and cupy.cuda.get_current_stream().is_capturing():
            return "cupy"
    except Exception:  # no driver, or one older than the runtime: no stream to capture
        return None
    return None
