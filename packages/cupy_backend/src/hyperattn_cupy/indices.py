"""A sparse structure's index arrays as the attention kernels read them (int32 cupy arrays), made
once per structure: its forward and backward share them."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from hyperattn.protocol import SparseStructure
from hyperattn.tiles import log_sample_weights, query_blocks

from .staging import DeviceTables


@dataclass
class IndexArrays:
    """The kernels' index arguments (cupy arrays; one-element dummies for exact pieces, which read
    none of them).

    q_order, k_order  int32 [B, Hq, Nq] / [B, Hk, Nk]: the LSH orders (sorted position -> row / key)
    samples           int32 [B, Hk, S, m]: sampled key indices per segment (contiguous)
    sample_blocks     int32 [B, Hk, S, m]: each sample's key block (``k_rank // block_size``)
    log_w             float32 [S]: each segment's log sample weight
    draw_log_w        float32 [B, Hk, S, m] with the samples' layout: each draw's log weight
                      (``sampling="key_norm"``; read instead of log_w when ``draw_weights``)
    q_blocks          int32 [Nq]: the key block of each sorted query position (made on first use,
                      by the dK/dV kernel of the sample slots)
    """

    q_order: object
    k_order: object
    samples: object
    sample_blocks: object
    log_w: object
    sample_size: int
    draw_log_w: object = None
    draw_weights: bool = False
    q_blocks: object | None = None

    def __post_init__(self):
        if self.draw_log_w is None:  # a pointer argument the kernels do not read
            self.draw_log_w = self.log_w


def as_int32(x):
    """``x`` in int32: itself when it is."""
    import cupy

    return x if x.dtype == cupy.int32 else x.astype(cupy.int32)


class StructureIndices:
    """IndexArrays per structure, kept while the structure lives."""

    def __init__(self, tables: DeviceTables, launches):
        self._tables = tables
        self._launches = launches  # () -> the launch table in force
        self._cache = weakref.WeakKeyDictionary()  # SparseStructure -> IndexArrays
        self._dummies = {}  # device id -> (int32 [1], float32 [1]) zeros: arguments the kernels do not read

    def get(self, q, structure: SparseStructure | None) -> IndexArrays:
        if structure is None:
            dummy, zero = self._dummy(q)
            return IndexArrays(dummy, dummy, dummy, dummy, zero, 0)
        cached = self._cache.get(structure)
        if cached is None:
            cached = self._cache[structure] = self._make(q, structure)
        return cached

    def query_blocks(self, q, structure: SparseStructure):
        """int32 [Nq]: see ``hyperattn.tiles.query_blocks`` (kept with the structure's indices)."""
        indices = self.get(q, structure)
        if indices.q_blocks is None:
            indices.q_blocks = self._tables.get(query_blocks, q, structure, q.shape[2])
        return indices.q_blocks

    def _dummy(self, q):
        import cupy

        device = q.device.id
        if device not in self._dummies:
            self._dummies[device] = (cupy.zeros(1, dtype=cupy.int32), cupy.zeros(1, dtype=cupy.float32))
        return self._dummies[device]

    def _make(self, q, structure: SparseStructure) -> IndexArrays:
        import cupy

        from . import utility

        dummy, _ = self._dummy(q)
        q_order, k_order = as_int32(structure.q_order), as_int32(structure.k_order)
        samples = sample_blocks = dummy
        if structure.samples is not None:
            samples = as_int32(structure.samples)
            if not samples.flags.c_contiguous:
                samples = samples.copy()
            sample_blocks = utility.sample_blocks(samples, structure.k_rank, structure.block_size, self._launches())
        draws = structure.samples is not None and structure.sample_log_weights is not None
        # C-contiguous like the samples: the kernels read the weights with the samples' strides
        draw_log_w = cupy.ascontiguousarray(structure.sample_log_weights, dtype=cupy.float32) if draws else None
        log_w = self._tables.get(log_sample_weights, q, structure)
        return IndexArrays(q_order, k_order, samples, sample_blocks, log_w, structure.sample_size, draw_log_w, draws)

