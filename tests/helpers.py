"""Helpers the tests of every subject share: seeded inputs."""

from __future__ import annotations

import numpy as np


def make_inputs(shape, *, seed=0, dtype=np.float64, kv_heads=None, n_k=None, v_dim=None):
    """Gaussian q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] as NumPy arrays."""
    batch, q_heads, n_q, dim = shape
    kv_heads = q_heads if kv_heads is None else kv_heads
    n_k = n_q if n_k is None else n_k
    v_dim = dim if v_dim is None else v_dim
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_heads, n_q, dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_heads, n_k, dim)).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, n_k, v_dim)).astype(dtype)
    return q, k, v


# -- one plan on two backends (the Triton tests) ------------------------------------------------
#: A small configuration: several blocks, samples and causal levels on interpreter-sized inputs.
SMALL = dict(block_size=16, sample_size=10, lsh_num_projs=3, min_seq_len=20)


def plan_on(plan, backend, like):
    """The same plan with its index arrays as ``backend``'s native arrays on ``like``'s device."""
    import dataclasses

    from hyperattn.algorithm import Plan, SparsePiece

    pieces = []
    for piece in plan.pieces:
        if isinstance(piece, SparsePiece):
            st = piece.structure
            moved = {
                name: None if getattr(st, name) is None else backend.from_host(np.asarray(getattr(st, name)), like)
                for name in ("q_order", "k_order", "k_rank", "samples", "sample_log_weights")
            }
            piece = SparsePiece(dataclasses.replace(st, **moved))
        pieces.append(piece)
    return Plan(tuple(pieces), plan.scale)


def piece_segments(piece):
    """The Segments of a plan piece, exact or sparse."""
    from hyperattn.algorithm import ExactPiece

    return piece.segments if isinstance(piece, ExactPiece) else piece.structure.segments


def first_piece_row_counts(plan, n_q: int) -> np.ndarray:
    """[n_q] how many of the first piece's segments hold each row (run_forward needs 1 everywhere:
    the first piece writes every row without reading)."""
    segments = piece_segments(next(iter(plan.pieces)))
    covered = np.zeros(n_q, dtype=int)
    for start, end in zip(segments.q_start, segments.q_end):
        covered[start:end] += 1
    return covered


def assert_pieces_are_disjoint_within(plan) -> None:
    """Within each piece of ``plan``, the segments' query ranges are disjoint, and so are their key
    ranges (what one kernel call may hold without write races)."""
    for piece in plan.pieces:
        seg = piece_segments(piece)
        for starts, ends in ((seg.q_start, seg.q_end), (seg.k_start, seg.k_end)):
            order = np.argsort(starts)
            assert (np.asarray(starts)[order][1:] >= np.asarray(ends)[order][:-1]).all()


def without_samples(plan):
    """``plan`` with every sparse piece's samples dropped: its block diagonals and exact pieces."""
    import dataclasses

    from hyperattn.algorithm import Plan, SparsePiece

    pieces = tuple(SparsePiece(dataclasses.replace(p.structure, samples=None)) if isinstance(p, SparsePiece) else p
                   for p in plan.pieces)
    return Plan(pieces, plan.scale)


def assert_matches_plan_oracle(q, k, v, *, causal: bool, seed: int, params: dict) -> None:
    """The reference backend's call with ``params`` equals the dense float64 oracle of its own
    seeded plan (out to 1e-9, lse to 1e-12 relative)."""
    import hyperattn
    from hyperattn import testing
    from hyperattn.config import HyperAttentionConfig
    from hyperattn.registry import backend_status

    out, lse = hyperattn.attention(q, k, v, causal=causal, seed=seed, return_lse=True, backend="reference", **params)
    plan = testing.seeded_plan(backend_status("reference").backend, q, k, causal=causal, scale=q.shape[-1] ** -0.5,
                               config=HyperAttentionConfig(**params), seed=seed)
    want_out, want_lse = testing.dense_attention_from_plan(plan, q, k, v)
    np.testing.assert_allclose(out, want_out, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)


def run_both(q, k, v, *, causal, params, seed=0, backward=True, other="triton"):
    """Forward (and backward) of one reference-built plan on the reference and on backend ``other``.

    Returns ({name: (out, lse, dq, dk, dv)} as float64 NumPy arrays, the plan).
    """
    import torch

    from hyperattn import testing
    from hyperattn.algorithm import run_backward, run_forward
    from hyperattn.config import HyperAttentionConfig
    from hyperattn.registry import backend_status

    reference, backend = backend_status("reference").backend, backend_status(other).backend
    plan = testing.seeded_plan(reference, q, k, causal=causal, scale=q.shape[-1] ** -0.5,
                               config=HyperAttentionConfig(**params), seed=seed)
    results = {}
    d_out = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(seed))
    for name, this in (("reference", reference), (other, backend)):
        qn, kn, vn = (this.to_native(x) for x in (q, k, v))
        this_plan = plan if this is reference else plan_on(plan, this, qn)
        out, lse = run_forward(this, this_plan, qn, kn, vn)
        grads = ()
        if backward:
            dout = this.to_native(d_out.to(device=q.device, dtype=torch.float32))
            grads = run_backward(this, this_plan, qn, kn, vn, out, lse, dout)
        results[name] = tuple(testing.to_numpy64(x) for x in (out, lse, *grads))
    return results, plan


def error_or_absolute(got, want) -> float:
    """Relative error, measured against 1 where the expected value is ~0 (e.g. dq of a single key)."""
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1.0))


class Poisoned:
    """An array namespace whose ``empty`` returns NaN-filled arrays (uninitialised memory at its worst)."""

    def __init__(self, xp):
        self._xp = xp

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def empty(self, shape, dtype=None, device=None):
        return self._xp.full(shape, float("nan"), dtype=dtype, device=device)


def poison_allocations(monkeypatch) -> None:
    """Make every buffer the core's forward and backward allocate uninitialised NaN-filled."""
    import importlib

    for name in ("hyperattn.algorithm.forward", "hyperattn.algorithm.backward"):
        module = importlib.import_module(name)
        real = module.array_namespace
        monkeypatch.setattr(module, "array_namespace", lambda *arrays, real=real: Poisoned(real(*arrays)))


def segment_weights_reference():
    """The reference backend declaring sparse kernels that read one log weight per segment (no
    ``per_draw_weights``, the default samplings), as CuPy's do: dispatch refuses key_norm for it."""
    import dataclasses

    from hyperattn.protocol import Capabilities
    from hyperattn.registry import backend_status

    reference = type(backend_status("reference").backend)
    default_samplings = next(f.default for f in dataclasses.fields(Capabilities) if f.name == "samplings")

    class SegmentWeightsOnly(reference):
        name = "segment-weights-only"
        capabilities = dataclasses.replace(reference.capabilities, per_draw_weights=False,
                                           samplings=default_samplings)

    return SegmentWeightsOnly()
