"""PyTorch's fused attention kernels as the GPU backends use them for exact pieces
(``hyperattn.torch.fused``): the parts that run without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


def test_fold_views_are_views_or_nothing():
    """Causal leaves fold into the head axis as views; leaves after a key prefix with several heads
    cannot (their key range is not one stride), and then nothing is folded rather than copied."""
    from hyperattn.protocol import Segments
    from hyperattn.torch.fused import fold_views

    q = torch.randn(2, 3, 8, 4)
    out = torch.zeros(2, 3, 8, 4)
    kv = torch.randn(2, 3, 8, 4)
    tiling = Segments.from_ranges([(0, 4, 0, 4), (4, 8, 4, 8)]).equal_tiling(8, causal=True)
    qf, kf, vf, out_f = fold_views(tiling, q, kv, kv, query_side=(out,))
    out_f += 1  # writes land in out
    assert (out == 1).all() and torch.equal(kf[1, 3], kv[1, 1, 4:8]) and torch.equal(qf[0, 5], q[0, 2, 4:8])
    longer = torch.randn(2, 3, 10, 4)
    prefixed = Segments.from_ranges([(0, 4, 2, 6), (4, 8, 6, 10)]).equal_tiling(8, causal=True)
    assert fold_views(prefixed, q, longer, longer) is None


def test_strided_rectangles_fold_as_views_of_their_rows_and_keys():
    """A level's band (equal rectangles at constant strides) folds into [B * H, count, n, .] views
    whose writes land in place; a skinny rectangle, a causal one or unequal ones do not fold."""
    from hyperattn.protocol import Segments
    from hyperattn.torch.fused import strided_views

    segments = Segments.from_ranges([(4, 6, 0, 4), (12, 14, 8, 12)])  # 2 rows x 4 keys, every 8
    tiling = segments.strided_tiling
    assert tiling == (2, 2, 4, 4, 8, 0, 8)
    q, out = torch.randn(2, 3, 16, 5), torch.zeros(2, 3, 16, 5)
    kv, lse = torch.randn(2, 3, 16, 5), torch.zeros(2, 3, 16)
    qf, kf, vf, out_f, lse_f = strided_views(tiling, q, kv, kv, query_side=(out, lse))
    assert qf.shape == (6, 2, 2, 5) and kf.shape == (6, 2, 4, 5) and lse_f.shape == (6, 2, 2)
    assert torch.equal(qf[4, 1], q[1, 1, 12:14]) and torch.equal(kf[5, 0], kv[1, 2, 0:4])
    out_f += 1
    lse_f += 1
    touched = torch.zeros(16, dtype=torch.bool)
    touched[4:6] = touched[12:14] = True
    assert (out[:, :, touched] == 1).all() and (out[:, :, ~touched] == 0).all() and (lse[:, :, touched] == 1).all()
    assert strided_views(tiling, q.transpose(0, 1), kv, kv) is None  # batch and heads do not merge
    assert Segments.from_ranges([(0, 8, 0, 2)]).strided_tiling is None  # skinny
    assert Segments.from_ranges([(0, 2, 0, 4), (4, 6, 4, 7)]).strided_tiling is None  # unequal
    assert Segments.from_ranges([(0, 2, 0, 4), (4, 6, 4, 8), (9, 11, 8, 12)]).strided_tiling is None  # steps
    assert Segments.from_ranges([(0, 2, 0, 4)]).strided_tiling == (1, 2, 4, 0, 2, 0, 4)


@settings(max_examples=60, deadline=None)
@given(n_q=st.integers(2, 300), extra_keys=st.integers(0, 50), min_seq_len=st.integers(1, 40),
       band=st.integers(1, 40), sinks=st.integers(0, 8), batch=st.integers(1, 2), heads=st.integers(1, 3))
def test_every_strided_piece_of_a_plan_views_exactly_its_rows_and_keys(n_q, extra_keys, min_seq_len, band, sinks,
                                                                       batch, heads):
    """For any causal plan with a band (and sinks, Nq <= Nk), each exact piece that is a strided
    tiling folds into views whose entry (b * H + h, i) holds exactly rows / keys of segment i of
    head h (positions written into the tensors)."""
    from hyperattn.algorithm.plan import _pieces_of_shape
    from hyperattn.config import HyperAttentionConfig
    from hyperattn.torch.fused import strided_views

    n_k = n_q + extra_keys
    config = HyperAttentionConfig(min_seq_len=min_seq_len, band_keys=band, sink_keys=min(sinks, min_seq_len))
    exact, _ = _pieces_of_shape(n_q, n_k, True, config, False)
    position = torch.arange(4096, dtype=torch.float32)
    head = torch.arange(batch * heads, dtype=torch.float32).reshape(batch, heads, 1, 1) * 10000
    q = (position[:n_q, None] + head).expand(batch, heads, n_q, 2).contiguous()
    k = (position[:n_k, None] + head).expand(batch, heads, n_k, 2).contiguous()
    for piece in exact:
        tiling = None if piece.causal else piece.segments.strided_tiling
        if tiling is None:
            continue
        qf, kf, _ = strided_views(tiling, q, k, k)
        for i, (q0, q1, k0, k1) in enumerate(piece.segments.table.tolist()):
            for bh in range(batch * heads):
                assert torch.equal(qf[bh, i, :, 0], position[q0:q1] + bh * 10000)
                assert torch.equal(kf[bh, i, :, 0], position[k0:k1] + bh * 10000)


def test_batch_chunks_cover_the_batch_once_within_the_budget():
    """Whole outer rows where they fit (a strided fold's B * H axis is the outer one), else pieces
    of a row; every entry of [outer, inner] exactly once, in order."""
    from hyperattn.torch.fused import batch_chunks

    assert batch_chunks(3, 4, 12) == [(slice(None), slice(None))]
    assert batch_chunks(3, 4, 9) == [(slice(0, 2), slice(None)), (slice(2, 4), slice(None))]
    for outer, inner, per_chunk in ((3, 4, 9), (32, 1, 1), (5, 3, 2), (2, 7, 3), (4, 4, 100), (1, 5, 1)):
        seen = np.zeros((outer, inner), dtype=int)
        for rows, cols in batch_chunks(outer, inner, per_chunk):
            assert seen[rows, cols].size <= per_chunk
            seen[rows, cols] += 1
        assert (seen == 1).all(), (outer, inner, per_chunk)


def test_first_fused_follows_the_order_and_falls_back(monkeypatch):
    """cuDNN first while enabled, FlashAttention when cuDNN rejects the inputs or is off."""
    from hyperattn.torch.fused import FUSED_KERNELS, first_fused

    def rejected():
        raise RuntimeError("cuDNN does not take these shapes")

    default = FUSED_KERNELS
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    assert first_fused(default, lambda: "cudnn", lambda: "flash") == "cudnn"
    assert first_fused(default, rejected, lambda: "flash") == "flash"
    flash_first = ("flash", "cudnn")
    assert first_fused(flash_first, lambda: "cudnn", lambda: "flash") == "flash"
    cudnn_only = ("cudnn",)
    with pytest.raises(RuntimeError, match="no fused attention kernel"):
        first_fused(cudnn_only, rejected, lambda: "flash")
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="no fused attention kernel"):
        first_fused(cudnn_only, lambda: "cudnn", lambda: "flash")


def test_sdpa_in_order_changes_the_priority_for_one_call_only():
    """cuDNN-first SDPA through two C calls: the same output as SDPA, PyTorch's priority restored
    afterwards, also when SDPA raises."""
    from hyperattn.torch.fused import SDPA_KERNELS, sdpa_backends, sdpa_in_order

    order = SDPA_KERNELS
    before = torch._C._get_sdp_priority_order()
    q, k, v = (torch.randn(1, 2, 9, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order())
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        out = sdpa_in_order(q, k, v, True, 0.3, order)
    torch.testing.assert_close(out, real(q, k, v, is_causal=True, scale=0.3), rtol=0, atol=0)
    assert seen[0][:len(order)] == [int(b) for b in sdpa_backends(order)] and sorted(seen[0]) == sorted(before)
    assert torch._C._get_sdp_priority_order() == before
    with pytest.raises(RuntimeError):
        sdpa_in_order(q, k[:, :, :, :4], v, False, 0.3, order)
    assert torch._C._get_sdp_priority_order() == before


def test_kernel_names_are_checked_with_the_option_named():
    from hyperattn.torch.kernel_names import FUSED_KERNELS, check_kernel_names

    check_kernel_names("Opts", "fused_kernels", ("flash",), FUSED_KERNELS)
    for bad in ((), ("flash", "flash"), ("math",), ["cudnn"]):
        with pytest.raises(ValueError, match=r"Opts\.fused_kernels: expected a non-empty tuple"):
            check_kernel_names("Opts", "fused_kernels", bad, FUSED_KERNELS)
