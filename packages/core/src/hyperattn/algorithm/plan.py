"""The plan of one call: which pieces (exact rectangles, sparse structures) compute it.

A *plan* splits one attention call into pieces whose (query, key) supports are disjoint:

* non-causal: one rectangle, exact if it has fewer than ``min_seq_len`` query rows, else
  sortLSH block diagonal plus sampled residual (a :class:`SparseStructure`);
* causal (square part aligned bottom-right, so ``Nq <= Nk``): the prefix keys every query sees
  form one rectangle; the square is split at its middle recursively, each level's lower-left
  rectangles forming one sparse call (batched over the level), while a diagonal block whose
  lower half would have fewer than ``min_seq_len`` rows is a leaf computed exactly (all leaves in
  one call).

The LSH projections come from a NumPy generator seeded with the call's seed (unless given); the
samples are a counter-based function of the seed and the piece (``hyperattn.sampling``), drawn by
the backend, on its device where it can.  So a seed gives every backend identical structure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from array_api_compat import array_namespace

from .. import sampling
from ..config import HyperAttentionConfig, check_band
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
class GlobalHeads:
    """This call's KV heads are heads ``kv_index`` of a call with ``kv_total`` KV heads (one rank's
    share of a head-sharded call, see ``hyperattn.distributed``): its samples are drawn as that
    call's for those heads, so the shares together compute exactly the whole call's plan."""

    kv_total: int
    kv_index: tuple[int, ...]

    def take(self, samples):
        """This call's heads of ``samples`` [B, kv_total, S, m] (a view where they are a range)."""
        first, count = self.kv_index[0], len(self.kv_index)
        if self.kv_index == tuple(range(first, first + count)):
            return samples[:, first:first + count]
        return samples[:, list(self.kv_index)]


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


def is_exact_call(n_q: int, n_k: int, causal: bool, config: HyperAttentionConfig, backend: Backend,
                  head_dim: int = 64, backward: bool = False) -> bool:
    """True when the plan of such a call is one exact piece: too short for the approximation, or
    (with ``config.exact_crossover``) short enough that the backend's exact attention is faster
    (``backend.options.exact_below_for(head_dim, backward)``: heads of ``head_dim``, the wider of
    q's and v's; ``backward``: the call records gradients)."""
    below = backend.options.exact_below_for(head_dim, backward) if config.exact_crossover else (0, 0)
    return is_exact_shape(n_q, n_k, causal, config.min_seq_len, below)


def is_exact_shape(n_q, n_k, causal: bool, min_seq_len: int, exact_below: tuple[int, int]) -> bool:
    """``is_exact_call`` given the crossover ``exact_below`` = (keys, rows): plain comparisons, so
    that symbolic sizes under ``torch.compile`` become guards."""
    exact_keys, exact_rows = exact_below
    if not causal:
        return n_q < min_seq_len or n_k < exact_keys
    return n_q < 2 or n_q - n_q // 2 < min_seq_len or n_q < exact_rows  # no split (see causal_split)


def plan_attention(
    backend: Backend,
    q,
    k,
    *,
    causal: bool,
    scale: float,
    config: HyperAttentionConfig,
    projections,
    seed,
    global_heads: GlobalHeads | None = None,
) -> Plan:
    """Decide the pieces of one call.  q, k native [B, H, N, D].

    ``projections``: float64 host [D, r] (NumPy), a native array on q's device (passed to the
    kernels as it is, in any float dtype), or a function returning one: called only when the plan
    has a sparse piece.  ``seed``: an int or a device seed (see ``Backend.draw_samples``).
    A config with ``exact_crossover`` applies the forward-only crossover of q's head dim; calls
    come here with it off (``Request.plan_config``: the request decided, knowing the mode).
    ``global_heads``: the samples are those of a larger call's heads (see :class:`GlobalHeads`).
    """
    n_q, n_k = q.shape[2], k.shape[2]
    exact_pieces, sparse_calls = piece_ranges(n_q, n_k, causal, config, backend, q.shape[-1])

    def make_pieces():
        yield from exact_pieces  # first: they need no hashing, so they run while the rest is planned
        if not sparse_calls:
            return
        projs = projections() if callable(projections) else projections
        if isinstance(projs, np.ndarray):
            xp = array_namespace(q)
            # cast on the host: one copy to the device (kept by backends that can), no conversion kernel
            proj = backend.host_constant(np.asarray(projs, dtype=np.float64 if q.dtype == xp.float64 else np.float32),
                                         q)
        else:
            proj = backend.to_native(projs)
        q_codes, k_codes = backend.lsh_codes_pair(q, k, proj)
        # importance sampling: the key weights once per call (every level draws from the same keys)
        key_weights = backend.key_norm_weights(k) if config.sampling == "key_norm" and config.sample_size else None
        for stream, segments in enumerate(sparse_calls):
            yield SparsePiece(sparse_structure(backend, q, k, q_codes, k_codes, segments, config, seed, stream,
                                               global_heads, key_weights))

    return Plan(Pieces(len(exact_pieces) + len(sparse_calls), make_pieces()), float(scale))


def piece_ranges(n_q: int, n_k: int, causal: bool, config: HyperAttentionConfig, backend: Backend,
                 head_dim: int) -> tuple[tuple[ExactPiece, ...], tuple[Segments, ...]]:
    """A call's exact pieces (the first covers every row) and its sparse calls' segments, whose
    supports together tile what the call attends to, each (row, key) once; made once per shape
    and parameters (the same shapes come back on every call of a layer), so read only.

    ``config.sink_keys`` = s > 0: keys [0, s) are attended exactly by every row, and cut out of the
    sparse rectangles (their block diagonals and samples cover the other keys).  Non-causal: one
    exact rectangle [all rows] x [0, s).  Causal: the prefix keys (every row sees them) up to s in
    one exact rectangle; sink keys inside the causal square are the first leaf's (computed exactly
    there) and, for the rows below it, one more exact rectangle, cut from the lower-left
    rectangles that start at key 0 (sink keys past the first leaf's, possible only for
    ``sink_keys == min_seq_len``, are approximated as the others).

    ``config.band_keys`` = w > 0 (causal only): every sparse rectangle ends where its rows' own
    keys begin (the prefix ends at the square, a level's lower-left rectangle at its diagonal
    block), so only its first w rows have previous keys in it; those w rows attend to the whole
    rectangle exactly, and the sparse part keeps the rows after them.  A row then sees at least
    its previous w keys exactly (rows further from a leaf's start have theirs in their own
    square, whose levels and leaf do the same); the exact cost is w rows per rectangle, w x Nq / 2
    pairs a level, computed as dense pieces (one per level: their rows and keys are disjoint, and
    where the split is even they are equal rectangles at constant strides, one fused batch).

    Returns ``(exact pieces, sparse calls' Segments)``.
    """
    exact_call = is_exact_call(n_q, n_k, causal, config, backend, head_dim)
    return _pieces_of_shape(int(n_q), int(n_k), bool(causal), config, exact_call)


@functools.lru_cache(maxsize=256)
def _pieces_of_shape(n_q: int, n_k: int, causal: bool, config: HyperAttentionConfig,
                     exact_call: bool) -> tuple[tuple[ExactPiece, ...], tuple[Segments, ...]]:
    """``piece_ranges`` once the exact decision is made (the backend's crossover is not a key)."""
    check_band(config, causal)
    sinks = min(config.sink_keys, n_k)
    if exact_call or (not causal and sinks == n_k):  # one exact rectangle (the causal prefix included; or all sinks)
        return (ExactPiece(Segments.from_ranges([(0, n_q, 0, n_k)]), causal=causal),), ()
    if not causal:
        exact = (ExactPiece(Segments.from_ranges([(0, n_q, 0, sinks)]), causal=False),) if sinks else ()
        return exact, (Segments.from_ranges([(0, n_q, sinks, n_k)]),)
    leaves, levels = causal_split(n_q, config.min_seq_len)
    offset = n_k - n_q  # keys [0, offset) are seen by every query: one non-causal rectangle
    leaf_ranges = [(start, end, start + offset, end + offset) for start, end in leaves]
    exact = [ExactPiece(Segments.from_ranges(leaf_ranges), causal=True)]
    sparse_calls, band_pieces = [], []

    def cut_band(rectangles):
        """The sparse parts of one sparse call's rectangles (rows [r0, r1) x keys [k0, k1)), whose
        keys end where the rows' causal keys begin; their first band_keys rows are one exact piece
        (a level's: equal rectangles at constant strides where the split is even, which the fused
        kernels run as one batch), or two where only the first rectangle differs (its keys start
        after the square's sink keys)."""
        band, kept = [], []
        for r0, r1, k0, k1 in rectangles:
            edge = min(config.band_keys, r1 - r0)
            if edge and k0 < k1:
                band.append((r0, r0 + edge, k0, k1))
            kept.append((r0 + edge, r1, k0, k1))
        whole, rest = Segments.from_ranges(band), Segments.from_ranges(band[1:])
        parts = [Segments.from_ranges(band[:1]), rest] if whole.strided_tiling is None and rest.strided_tiling else [whole]
        band_pieces.extend(ExactPiece(part, causal=False) for part in parts if len(part))
        return kept

    prefix_sinks = min(sinks, offset)
    if prefix_sinks:
        exact.append(ExactPiece(Segments.from_ranges([(0, n_q, 0, prefix_sinks)]), causal=False))
    if offset > prefix_sinks:  # it has n_q >= min_seq_len rows (there are levels), so it is sparse
        sparse_calls.append(cut_band([(0, n_q, prefix_sinks, offset)]))
    # sink keys [offset, offset + square_sinks) of the causal square: at most the first leaf's keys
    # (it has min_seq_len - 1 rows or more, so only sink_keys = min_seq_len can lose one)
    first_leaf_end = min(end for start, end in leaves if start == 0)
    square_sinks = min(sinks - prefix_sinks, first_leaf_end)
    if square_sinks:
        exact.append(ExactPiece(Segments.from_ranges([(first_leaf_end, n_q, offset, offset + square_sinks)]),
                                causal=False))
    for level in levels:
        sparse_calls.append(cut_band([(mid, end, start + offset + (square_sinks if start == 0 else 0), mid + offset)
                                      for start, mid, end in level]))
    exact += band_pieces
    sparse = (Segments.from_ranges([r for r in ranges if r[0] < r[1] and r[2] < r[3]]) for ranges in sparse_calls)
    return tuple(exact), tuple(segments for segments in sparse if len(segments.q_start))


def check_draw_weights(backend: Backend, structure: SparseStructure) -> None:
    """Refuse to hand a plan with per-draw sample weights (``sampling="key_norm"``) to a backend
    whose kernels read one weight per segment: it would silently compute another estimator."""
    if structure.sample_log_weights is not None and not backend.capabilities.per_draw_weights:
        raise ValueError(f"backend {backend.name!r} cannot run a plan with per-draw sample weights "
                         f"(sampling='key_norm'): its kernels read one weight per segment")


def sparse_structure(backend, q, k, q_codes, k_codes, segments, config, seed, stream: int = 0,
                     global_heads: GlobalHeads | None = None, key_weights=None) -> SparseStructure:
    """Sort each segment by LSH code and draw its samples (``backend.draw_samples``, stream ``stream``;
    with ``global_heads``, the larger call's draws of these heads; ``sampling="key_norm"``:
    ``backend.draw_samples_by_key_norm`` of ``key_weights``, made from k when not given)."""
    bits = config.lsh_num_projs
    q_order, k_order, k_rank = backend.sort_pair(q_codes, k_codes, segments, code_bits=bits)
    m = config.sample_size
    n_k = segments.k_len
    samples = draw_log_w = None
    if m > 0:
        if segments.max_k_len > sampling.MAX_SPAN:  # the draws' multiply-shift covers 2**32 keys
            raise ValueError(f"a sparse piece may span at most 2**32 keys (the samples' range), got {segments.max_k_len}")
        if config.sampling == "key_norm":
            head_ids = None if global_heads is None else global_heads.kv_index
            kv_total = None if global_heads is None else global_heads.kv_total
            if key_weights is None:
                key_weights = backend.key_norm_weights(k)
            samples, draw_log_w = backend.draw_samples_by_key_norm(seed, stream, segments, m, key_weights, k,
                                                                   head_ids, kv_total)
        else:
            stratified = config.sampling == "stratified"
            if global_heads is None:
                samples = backend.draw_samples(seed, stream, (k.shape[0], k.shape[1]), segments, m, k.shape[2], k,
                                               stratified)
            else:  # all heads' draws (a few KiB each), then this call's
                samples = global_heads.take(backend.draw_samples(seed, stream, (k.shape[0], global_heads.kv_total),
                                                                 segments, m, k.shape[2], k, stratified))
    log_weight = np.log(n_k / m) if m > 0 else np.zeros(len(segments))
    return SparseStructure(segments, config.block_size, q_order, k_order, k_rank, samples, log_weight, draw_log_w)


