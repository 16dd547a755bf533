"""Device copies of host tables (tile tables, sort tables, sample bounds) that a backend instance
keeps: built and copied once per distinct arguments, least recently used first out."""

from __future__ import annotations

import collections

import numpy as np

from hyperattn.tiles import table_key


class DeviceTables:
    """``get(build, like, *args)``: ``build(*args)`` (a host NumPy table, a tuple of them, or None) on
    ``like``'s device, built and copied once per distinct arguments; at most ``capacity()`` kept."""

    def __init__(self, capacity):
        self._capacity = capacity
        self._tables: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, build, like, *args):
        key = (build.__qualname__, like.device.id, *(table_key(a) for a in args))
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
