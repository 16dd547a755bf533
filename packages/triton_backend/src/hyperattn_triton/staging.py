"""Host-to-device staging and the device-side caches a backend instance owns.

* :class:`PinnedRing` stages small host-to-GPU copies through a pinned ring buffer (no blocking);
  :func:`host_to_device` copies a NumPy array next to a torch tensor through one.
* :class:`DeviceTables` keeps device copies of host tables (tile tables, sort tables), built and
  copied once per distinct arguments.
* :class:`DerivedTensors` keeps tensors derived from a tensor while it lives and is unchanged
  (the prepared projections, the codes' presort).

While a CUDA graph is being captured (or torch.compile's CUDA-graph trees warm a function up in
the pool they capture in: ``graph_pool_on``) the caches neither add entries (a copy or kernel recorded
then fills its tensor only when the graph replays, so an eager call must not find it) nor let go
of the entries made before that the graph reads: those are held, never freed before the graph
(by the capture that reads them, ``hyperattn.capture.keep_for_capture``, inside a graphed module's
capture; else for the life of the cache).  What a capture makes is not kept past its last use: it lives in the graph's
memory pool, and the graph's own copy or kernel refills it on every replay (as any intermediate of
the graph); ``torch.compile``'s CUDA-graph trees also refuse pool memory that outlives the capture
unless it is an output.
"""

from __future__ import annotations

import collections
import sys
import threading
import weakref

import numpy as np
import torch
import torch.utils.weak

from hyperattn.capture import keep_for_capture
from hyperattn.tiles import table_key


class PinnedRing:
    """A pinned host buffer used as a ring of staging areas for small host-to-GPU copies.

    A copy from pageable memory can wait for the GPU's queued work, and pinning each array costs
    host time; so small arrays are copied into this buffer and sent from there without blocking.
    Each copy records a CUDA event; an area is reused only after the event of the copy that used
    it last has completed, so the host never overwrites bytes still in flight.  Areas are handed
    out in order, so the copies in flight form a queue sorted by age *and* by position within a
    lap: a new area can only overlap the oldest ones, and each copy looks at the front only (the
    queue grows to thousands of entries when the GPU runs far behind the host).

    While a CUDA graph is being captured a copy gets a pinned buffer of its own, kept as long as
    the graph (``keep_for_capture``) or else the ring: the graph's copy node reads it on every
    replay, so it must never be reused.
    """

    SIZE = 16 << 20
    ALIGN = 256

    def __init__(self, size: int | None = None):
        if size is not None:
            self.SIZE = size
        self.buffer = None  # allocated on the first copy
        self.cursor = 0
        self.pending = collections.deque()  # (start, end, event) of copies in flight, oldest first
        self.lock = threading.Lock()
        self.captured = []  # pinned buffers read by captured CUDA graphs

    def copy(self, values: np.ndarray, device):
        """``values`` (C-contiguous) as a tensor on the CUDA ``device``, without blocking."""
        if torch.cuda.is_current_stream_capturing():  # device is CUDA here
            staged = torch.from_numpy(values).pin_memory()
            if not keep_for_capture(staged):
                self.captured.append(staged)
            return staged.to(device, non_blocking=True)
        if values.nbytes > self.SIZE // 4:  # large: a one-off pinned copy
            return torch.from_numpy(values).pin_memory().to(device, non_blocking=True)
        with self.lock:
            return self._staged_copy(values, device)

    def _staged_copy(self, values: np.ndarray, device):
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


def capturing_on(like) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``like``'s device."""
    return like.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def graph_pool_on(like) -> bool:
    """Whether new allocations on ``like``'s device go to a CUDA graph's memory pool: a graph is
    being captured on the current stream, or ``torch.compile``'s CUDA-graph trees run a function's
    warm-up (eagerly, on their own stream, allocating from the pool they will capture in)."""
    return capturing_on(like) or (like.device.type == "cuda" and _graph_trees_warming_up(like.device))


def _graph_trees_warming_up(device) -> bool:
    """CUDA-graph trees' warm-up of ``device`` runs on this thread's current stream (never true
    unless inductor's ``cudagraph_trees`` is imported).  The trees' state is found as they find it
    (``get_obj``): in this thread's locals, or in the thread-local state autograd hands its device
    threads, where a backward's warm-up runs; it is looked up without being created."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None:
        return False
    try:
        containers = trees.get_obj(trees.local, "tree_manager_containers")
        container = containers.get(device.index)
        manager = None if container is None else container.tree_manager
        return bool(manager is not None and manager.in_warmup and torch.cuda.current_stream(device) == manager.stream)
    except (AssertionError, AttributeError, RuntimeError):  # no trees state here, or another PyTorch's internals
        return False


def _torch_dtype(dtype: np.dtype):
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def host_to_device(values: np.ndarray, like, ring: PinnedRing):
    """``values`` (host NumPy) as a torch tensor on ``like``'s device: through ``ring`` on a GPU."""
    values = np.ascontiguousarray(values)
    if like.device.type == "cuda":
        return ring.copy(values, like.device)
    return torch.from_numpy(values).to(like.device)


class DeviceTables:
    """Device copies of host tables, least recently used first out beyond ``capacity()`` entries.

    ``stage(values, like)`` copies a host array next to ``like``; ``capacity`` is read at every
    insertion (the backend's options may change).
    """

    def __init__(self, stage, capacity):
        self._stage = stage
        self._capacity = capacity
        self._tables: collections.OrderedDict = collections.OrderedDict()
        # tables read by captured CUDA graphs, by id (see the module docstring): held, ids stay unique
        self.held = {}

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, build, like, *args):
        """``build(*args)`` (a host table, a tuple of them, or None) on ``like``'s device, built and
        copied once per distinct arguments (compared by value: segments by their bounds, structures
        by their segments and sizes, arrays by their contents)."""
        key = (build.__qualname__, like.device, *(table_key(a) for a in args))
        if key in self._tables:
            self._tables.move_to_end(key)
            if capturing_on(like) and not keep_for_capture(self._tables[key]):
                self.held[id(self._tables[key])] = self._tables[key]
            return self._tables[key]
        host = build(*args)
        if isinstance(host, tuple):
            tables = tuple(self._stage(t, like) for t in host)
        else:
            tables = None if host is None else self._stage(host, like)
        if graph_pool_on(like):  # filled only by the graph, or pool memory: neither cached nor kept
            return tables
        self._tables[key] = tables
        while len(self._tables) > self._capacity():
            self._tables.popitem(last=False)
        return tables


class DerivedTensors:
    """Tensors derived from a tensor (by ``key``), kept while it lives and made again after an
    in-place change of it (``Tensor._version``): a call's q and k share their prepared projections,
    a causal call's levels one presort of the codes.

    One made while a CUDA graph is captured is shared by that capture's later uses while it is alive
    (a causal call's levels share their presort inside the graph too), through a weak reference: it
    is not kept past its last use, and eager calls make their own, since the captured one is filled
    only when the graph replays."""

    def __init__(self):
        # tensor -> (its version, {key: (derived, None) made eagerly or (None, weakref) during a capture})
        self._entries = torch.utils.weak.WeakIdKeyDictionary()
        # derived tensors made eagerly that captured CUDA graphs read, by id (see the module docstring)
        self.held = {}

    def __contains__(self, tensor) -> bool:
        return tensor in self._entries

    def get(self, tensor, key, make):
        """``make()`` for (``tensor``, ``key``), made once per version of ``tensor``."""
        version, derived = self._entries.get(tensor, (None, None))
        if version != tensor._version:
            derived = {}
            self._entries[tensor] = (tensor._version, derived)
        value, recorded = derived.get(key, (None, None))
        if value is not None:
            if capturing_on(tensor) and not keep_for_capture(value):
                self.held[id(value)] = value
            return value
        pooled = graph_pool_on(tensor)
        if pooled and recorded is not None and (value := _alive(recorded)) is not None:
            return value
        value = make()
        derived[key] = (None, _weak(value)) if pooled else (value, None)
        return value


def _weak(value):
    """Weak references to a tensor or to each tensor of a tuple."""
    return tuple(weakref.ref(x) for x in value) if isinstance(value, tuple) else weakref.ref(value)


def _alive(refs):
    """What ``_weak`` referred to, or None once any of it is gone."""
    if isinstance(refs, tuple):
        values = tuple(ref() for ref in refs)
        return None if any(x is None for x in values) else values
    return refs()
