"""The plan of one call: which pieces (exact rectangles, sparse structures) compute it.

A *plan* splits one attention call into pieces whose (query, key) supports are disjoint:

* non-causal: one rectangle, exact if it has fewer than ``min_seq_len`` query rows, else
  sortLSH block diagonal plus sampled residual (a :class:`SparseStructure`);
* causal (square part aligned bottom-right, so ``Nq <= Nk``): the prefix keys every query sees
  form one rectangle; the square is split at its middle recursively, each level's lower-left
  rectangles forming one sparse call (batched over the level), while a diagonal block whose
  lower half would have fewer than ``min_seq_len`` rows is a leaf computed exactly (all leaves in
  one call).

Random draws (projections, then samples in piece order) come from one NumPy generator, so a seed
gives every backend identical structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from array_api_compat import array_namespace

from ..config import HyperAttentionConfig
from ..protocol import Backend, Segments, SparseStructure


@dataclass(frozen=True)
class ExactPiece:
    segments: Segments
    causal: bool


@dataclass(frozen=True)
class SparsePiece:
    structure: SparseStructure


class Pieces:
    """A plan's pieces, made on first use and kept: a forward runs each piece as soon as it is
    made, so the GPU computes the exact leaves while the host plans the sparse levels."""

    def __init__(self, count: int, source):
        self.count, self._source, self._made = count, iter(source), []

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        i = 0
        while True:
            if i == len(self._made):
                piece = next(self._source, None)
                if piece is None:
                    return
                self._made.append(piece)
            yield self._made[i]
            i += 1


@dataclass(frozen=True)
class Plan:
    """Everything random or data-dependent about one call; reused by its backward.

    ``pieces``: a sequence (a tuple, or :class:`Pieces` made lazily, in order)."""

    pieces: tuple | Pieces
    scale: float


def draw_projections(rng: np.random.Generator, head_dim: int, num_projs: int) -> np.ndarray:
    """Gaussian hyperplanes of the sortLSH, float64 [D, r]."""
    return rng.standard_normal((head_dim, num_projs))


def causal_split(n_q: int, min_seq_len: int) -> tuple[list[tuple[int, int]], list[list[tuple[int, int, int]]]]:
    """Split the causal square ``[0, n_q)`` into exact leaves and levels of rectangles.

    Returns ``(leaves, levels)``: leaves are ``(start, end)`` diagonal blocks; each level is a list
    of ``(start, mid, end)``: rows ``[mid, end)`` attend to keys ``[start, mid)``.  A block of at
    least two rows is split while its lower half ``end - mid`` has at least ``min_seq_len`` rows.
    """
    leaves, levels = [], []
    frontier = [(0, n_q)]
    while frontier:
        level, next_frontier = [], []
        for start, end in frontier:
            mid = start + (end - start) // 2
            if end - start < 2 or end - mid < min_seq_len:
                leaves.append((start, end))
            else:
                level.append((start, mid, end))
                next_frontier += [(start, mid), (mid, end)]
        if level:
            levels.append(level)
        frontier = next_frontier
    return leaves, levels


def is_exact_call(n_q: int, n_k: int, causal: bool, config: HyperAttentionConfig, backend: Backend) -> bool:
    """True when the plan of such a call is one exact piece: too short for the approximation, or
    (with ``config.exact_crossover``) short enough that the backend's exact attention is faster
    (``backend.options.exact_below``)."""
    exact_keys, exact_rows = backend.options.exact_below if config.exact_crossover else (0, 0)
    if not causal:
        return n_q < config.min_seq_len or n_k < exact_keys
    return n_q < 2 or n_q - n_q // 2 < config.min_seq_len or n_q < exact_rows  # no split (see causal_split)


def plan_attention(
    backend: Backend,
    q,
    k,
    *,
    causal: bool,
    scale: float,
    config: HyperAttentionConfig,
    projections,
    rng,
) -> Plan:
    """Decide the pieces of one call.  q, k native [B, H, N, D].

    ``projections`` (float64 [D, r]) and ``rng`` may be given as functions returning them: they
    are then called (projections first) only when the plan has a sparse piece.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    exact, sparse_calls = None, []
    if is_exact_call(n_q, n_k, causal, config, backend):  # one exact rectangle, the causal prefix included
        exact = ExactPiece(Segments.from_ranges([(0, n_q, 0, n_k)]), causal=causal)
    elif not causal:
        sparse_calls.append([(0, n_q, 0, n_k)])
    else:
        leaves, levels = causal_split(n_q, config.min_seq_len)
        offset = n_k - n_q  # keys [0, offset) are seen by every query: one non-causal rectangle
        if offset > 0:  # it has n_q >= min_seq_len rows (there are levels), so it is sparse
            sparse_calls.append([(0, n_q, 0, offset)])
        leaf_ranges = [(start, end, start + offset, end + offset) for start, end in leaves]
        exact = ExactPiece(Segments.from_ranges(leaf_ranges), causal=True)
        sparse_calls += [[(mid, end, start + offset, mid + offset) for start, mid, end in level] for level in levels]

    def make_pieces():
        if exact is not None:  # first: it needs no hashing, so it runs while the rest is planned
            yield exact
        if not sparse_calls:
            return
        projs = projections() if callable(projections) else projections
        generator = rng() if callable(rng) else rng
        xp = array_namespace(q)
        # cast on the host: one copy to the device, no conversion kernel there
        proj = backend.from_host(np.asarray(projs, dtype=np.float64 if q.dtype == xp.float64 else np.float32), q)
        q_codes = backend.lsh_codes(q, proj)
        k_codes = backend.lsh_codes(k, proj)
        for ranges in sparse_calls:
            segments = Segments.from_ranges(ranges)
            yield SparsePiece(sparse_structure(backend, q, k, q_codes, k_codes, segments, config, generator))

    return Plan(Pieces((exact is not None) + len(sparse_calls), make_pieces()), float(scale))


def sparse_structure(backend, q, k, q_codes, k_codes, segments, config, rng) -> SparseStructure:
    """Sort each segment by LSH code and draw its samples (from ``rng``, after the projections)."""
    bits = config.lsh_num_projs
    q_order, _ = backend.segment_sort(q_codes, segments.q_start, segments.q_end, code_bits=bits)
    k_order, k_rank = backend.segment_sort(k_codes, segments.k_start, segments.k_end, code_bits=bits)
    m = config.sample_size
    n_k = segments.k_len
    samples = None
    if m > 0:
        batch, kv_heads = k.shape[0], k.shape[1]
        samples = backend.from_host(draw_samples(rng, (batch, kv_heads), segments, m, k.shape[2]), k)
    log_weight = np.log(n_k / m) if m > 0 else np.zeros(len(segments))
    return SparseStructure(segments, config.block_size, q_order, k_order, k_rank, samples, log_weight)


def draw_samples(rng, heads: tuple[int, int], segments: Segments, m: int, n_k: int) -> np.ndarray:
    """[B, Hk, S, m] key indices drawn uniformly with replacement from each segment's key range:
    int32 (int64 from ``n_k`` = 2**31), host NumPy.

    Uniform floats scaled to each segment (about twice as fast as integers with per-segment
    bounds), float32 ones while every segment has at most 2**24 keys: a float32 has 24 random
    bits, so each key is hit by ``2**24 / span`` of them (exactly uniform for a power-of-two
    span), at half the cost of float64 (host time, at every causal level)."""
    spans = segments.k_len[None, None, :, None]
    narrow = n_k < 2**31
    small = int(segments.k_len.max(initial=0)) <= 2**24
    dtype = np.float32 if small else np.float64
    uniform = rng.random((*heads, len(segments), m), dtype=dtype)
    drawn = (uniform * spans.astype(dtype)).astype(np.int32 if narrow else np.int64)
    np.minimum(drawn, spans - 1, out=drawn, casting="unsafe")  # a float product may round up to span
    drawn += segments.k_start[None, None, :, None].astype(drawn.dtype)
    return drawn
