"""Device copies of host tables (tile tables, sort tables, sample bounds) that a backend instance
keeps: built and copied once per distinct arguments, least recently used first out."""

from __future__ import annotations

import collections

import numpy as np

from hyperattn.protocol import Segments, SparseStructure


def _table_key(arg):
    """What a table depends on, hashable: segment bounds by value, structures by their segments and sizes."""
    if isinstance(arg, Segments):
        return tuple(a.tobytes() for a in (arg.q_start, arg.q_end, arg.k_start, arg.k_end))
    if isinstance(arg, SparseStructure):
        return _table_key(arg.segments), arg.block_size, arg.sample_size
    if isinstance(arg, np.ndarray):
        return arg.dtype.str, arg.shape, arg.tobytes()
    return arg


class DeviceTables:
    """``get(build, like, *args)``: ``build(*args)`` (a host NumPy table, a tuple of them, or None) on
    ``like``'s device, built and copied once per distinct arguments; at most ``capacity()`` kept."""

    def __init__(self, capacity):
        self._capacity = capacity
        self._tables: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, build, like, *args):
        key = (build.__qualname__, like.device.id, *(_table_key(a) for a in args))
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        host = build(*args)
        tables = tuple(to_device(t, like) for t in host) if isinstance(host, tuple) else to_device(host, like)
        self._tables[key] = tables
        while len(self._tables) > self._capacity():
            self._tables.popitem(last=False)
        return tables


def to_device(values: np.ndarray | None, like):
    """A host array as a cupy array on ``like``'s device (None stays None)."""
    if values is None:
        return None
    import cupy

    with cupy.cuda.Device(like.device.id):
        return cupy.asarray(np.ascontiguousarray(values))
