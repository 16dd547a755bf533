"""torch.compile: HyperAttention as a ``torch.library`` operator, traced without graph breaks and
equal to eager (forward and gradients), with its randomness an explicit input (CPU, reference)."""

from __future__ import annotations

import os

import pytest
import torch

import hyperattn

SPARSE = dict(block_size=32, sample_size=24, lsh_num_projs=4, min_seq_len=64, backend="reference")


def _inputs(seed=0, n=300, grad=True):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, 16, dtype=torch.float64, generator=generator).requires_grad_(grad) for _ in range(3)]


def _grads(fn, inputs):
    out = fn(*inputs)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)).sum().backward()
    grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    return out.detach(), grads


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("causal", [False, True])
def test_attention_compiles_in_one_graph_and_matches_eager(causal):
    def fn(q, k, v):
        return hyperattn.attention(q, k, v, causal=causal, seed=5, **SPARSE)

    inputs = _inputs()
    eager_out, eager_grads = _grads(fn, inputs)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    out, grads = _grads(compiled, inputs)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=1e-13)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    exact = hyperattn.exact_attention(*inputs, causal=causal)
    assert (out - exact).abs().max() > 1e-6  # the approximation ran, not an exact fallback


def test_seed_is_an_input_of_the_graph_not_a_constant():
    """A new seed per call neither recompiles nor is baked in: each call equals eager with its seed."""
    def fn(q, k, v, seed):
        return hyperattn.attention(q, k, v, seed=seed, **SPARSE)

    inputs = [x.detach() for x in _inputs()]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    outs = []
    for seed in (1, 2, 3):
        out = compiled(*inputs, torch.tensor(seed))
        torch.testing.assert_close(out, fn(*inputs, seed), rtol=0, atol=1e-13)
        outs.append(out)
    assert not torch.equal(outs[0], outs[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_module_compiles_and_draws_the_same_sequence_as_eager():
    eager = hyperattn.HyperAttention(16, seed=7, **SPARSE)
    compiled_module = hyperattn.HyperAttention(16, seed=7, **SPARSE)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    inputs = _inputs(seed=1)
    results = []
    for _ in range(3):  # fresh samples per call, the same sequence in both
        want, want_grads = _grads(lambda q, k, v: eager(q, k, v, causal=True), inputs)
        got, got_grads = _grads(lambda q, k, v: compiled(q, k, v, causal=True), inputs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        results.append(got)
    assert not torch.equal(results[0], results[1])
    assert int(compiled_module.calls) == int(eager.calls) == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_bad_input_under_compile_names_the_argument():
    def fn(q, k, v):
        return hyperattn.attention(q, k, v, block_size=0, backend="reference")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"block_size must be an int >= 1, got 0"):
        compiled(*_inputs(grad=False))


def test_operators_pass_opcheck():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of the operators."""
    from hyperattn.torch.op import attention_op

    q, k, v = _inputs(n=150)
    seed = torch.tensor(3)
    padding = torch.ones(1, 1, 150, 150, dtype=torch.bool)
    padding[..., :7] = False  # the first keys are padding: exact masked attention runs
    cases = ((False, False, None, 0), (True, False, None, 0), (True, True, None, 0), (True, False, padding, 0),
             (False, False, torch.ones(1, 1, 150, 150, dtype=torch.bool), 0), (False, False, None, 8),
             (True, False, None, 8))
    for causal, exact, mask, sinks in cases:
        band = 16 if causal and sinks else 0  # a band of previous keys: causal calls only
        sampling = "stratified" if sinks and not causal else "uniform"
        args = (q, k, v, seed, None, mask, "reference", causal, 0.25, 32, 24, 4, 64, True, sinks, band, sampling, exact)
        torch.library.opcheck(attention_op, args)


@pytest.mark.parametrize("causal", [False, True])
def test_a_mask_that_changes_the_result_gets_exact_masked_attention(causal):
    """Inside the operator: a plain mask (causal pattern / all-True) is what HyperAttention computes
    and is dropped; any other mask alone decides (as SDPA given a mask), exact, with its gradients."""
    from hyperattn import testing
    from hyperattn.torch.masks import causal_pattern
    from hyperattn.torch.op import compiled_attention

    q, k, v = _inputs(n=120)
    config = hyperattn.HyperAttentionConfig(32, 24, 4, 64)
    plain = causal_pattern(120, 120, "cpu")[None, None] if causal else torch.ones(1, 1, 120, 120, dtype=torch.bool)
    kwargs = dict(causal=causal, scale=None, backend="reference", config=config, seed=3, return_lse=False)
    torch.testing.assert_close(compiled_attention(q, k, v, mask=plain, **kwargs),
                               hyperattn.attention(q, k, v, causal=causal, seed=3, **SPARSE), rtol=0, atol=0)
    keep = torch.rand(2, 1, 120, 120, generator=torch.Generator().manual_seed(0)) > 0.3
    keep |= torch.eye(120, dtype=torch.bool)  # no row fully masked
    q2, k2, v2 = (torch.cat([x, x]) for x in (q, k, v))
    out = compiled_attention(q2, k2, v2, mask=keep, **kwargs)
    weights = keep.expand(2, 2, 120, 120).double()
    want, _ = testing.weighted_softmax_attention(q2.detach(), k2.detach(), v2.detach(), weights.numpy(), 16**-0.5)
    torch.testing.assert_close(out, torch.from_numpy(want), rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    dense = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    scores = torch.einsum("bhid,bhjd->bhij", *(torch.cat([x, x]) for x in dense[:2])) * 16**-0.5
    scores = scores.masked_fill(~keep, -torch.inf)
    torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), torch.cat([dense[2], dense[2]])).sum().backward()
    for got, x in zip(grads, dense):
        torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_triton_attention_compiles_and_matches_eager(causal):
    """The same on the Triton backend: bf16 on a GPU, the approximation forced (no crossover)."""
    params = dict(block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=1024, exact_crossover=False,
                  backend="triton")

    def fn(q, k, v):
        return hyperattn.attention(q, k, v, causal=causal, seed=5, **params)

    generator = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(1, 4, 8192, 64, device="cuda", generator=generator, dtype=torch.bfloat16).requires_grad_()
              for _ in range(3)]
    eager_out, eager_grads = _grads(fn, inputs)
    out, grads = _grads(torch.compile(fn, fullgraph=True), inputs)  # inductor
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)  # the same kernels on the same plan
    for got, want in zip(grads, eager_grads):  # sample slots add with atomics: rounding order differs
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_masked_fallback_in_chunks_of_rows_equals_one_chunk():
    """The masked fallback bounds its scores' memory by running chunks of query rows: the same
    output, lse and gradients (GQA, a per-row mask, lse gradient) as one chunk."""
    from hyperattn.torch.masks import masked_exact_backward, masked_exact_forward

    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 50, 8, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(2, 2, 60, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    mask = torch.rand(2, 1, 50, 60, generator=generator) > 0.4
    dout = torch.randn(2, 4, 50, 8, dtype=torch.float64, generator=generator)
    dlse = torch.randn(2, 4, 50, dtype=torch.float64, generator=generator)
    whole = masked_exact_forward(q, k, v, mask, 0.3, True)
    chunked = masked_exact_forward(q, k, v, mask, 0.3, True, chunk_bytes=2 * 4 * 60 * 8 * 7)  # 7 rows a chunk
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    grads = masked_exact_backward(dout, dlse, q, k, v, mask, 0.3, True)
    chunked_grads = masked_exact_backward(dout, dlse, q, k, v, mask, 0.3, True, chunk_bytes=2 * 4 * 60 * 8 * 7)
    for got, want in zip(chunked_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_compiled_backward_keeps_the_forward_plan_when_the_crossover_changes(backend_options):
    """The crossover is an option: changed between a compiled forward and its backward, the
    backward still differentiates the forward's plan (as the eager bridge, which keeps it)."""
    def fn(q, k, v):
        return hyperattn.attention(q, k, v, causal=True, seed=2, **SPARSE)

    inputs = _inputs()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for first, then in (((0, 0), (10**6, 10**6)), ((10**6, 10**6), (0, 0))):  # approximate, then exact; and back
        backend_options("reference", exact_below=first)
        want = fn(*inputs)
        got = compiled(*inputs)
        backend_options("reference", exact_below=then)
        for out in (want, got):
            (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        eager_grads = [x.grad.clone() for x in inputs]  # want's and got's gradients added up
        for x in inputs:
            x.grad = None
        backend_options("reference", exact_below=first)
        reference_out = fn(*inputs)
        (reference_out * torch.linspace(-1, 1, reference_out.shape[-1], dtype=reference_out.dtype)).sum().backward()
        for total, single in zip(eager_grads, [x.grad for x in inputs]):
            torch.testing.assert_close(total, 2 * single, rtol=1e-10, atol=1e-12)
        for x in inputs:
            x.grad = None


def test_dynamic_shapes_compile_once_and_match_eager():
    """torch.compile(dynamic=True): the crossover decision compares symbolic sizes (guards, no
    specialisation), so two lengths on the same side of every threshold share one graph, and both
    match eager, forward and gradients."""
    def fn(q, k, v):
        return hyperattn.attention(q, k, v, causal=True, seed=2, **SPARSE)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (300, 400):
        inputs = _inputs(seed=n, n=n)
        want, want_grads = _grads(fn, inputs)
        got, got_grads = _grads(compiled, inputs)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compiled_bad_seed_is_refused_with_the_eager_message():
    """An int seed is checked before it becomes a tensor: 1.5 is not rounded to 1, 2**63 does not
    overflow with an unnamed error."""
    inputs = _inputs(grad=False)
    for seed in (1.5, 2**63, -1):
        compiled = torch.compile(lambda q, k, v, seed=seed: hyperattn.attention(q, k, v, seed=seed, **SPARSE),
                                 fullgraph=True, backend="aot_eager")
        with pytest.raises(Exception, match=r"seed must be None or an int in \[0, 2\*\*63\)"):
            compiled(*inputs)
        torch._dynamo.reset()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on the CPU")
def test_compiled_call_under_no_grad_takes_the_forward_crossover_as_eager_does(backend_options):
    """Leaves that require grad, called under no_grad: no gradients are recorded, so eager and
    compiled calls both take the forward-only crossover (here: none, so both approximate, on the
    same plan), not the forward+backward one (here: everything exact)."""
    from hyperattn_triton.options import GPU_CROSSOVER

    table = {key: ((0, 0) if key[1] == "fwd" else (10**6, 10**6)) for key in GPU_CROSSOVER}
    backend_options("triton", crossover=table)
    params = dict(block_size=32, sample_size=24, lsh_num_projs=4, min_seq_len=64, backend="triton", seed=4,
                  causal=True)
    q, k, v = (x.float() for x in _inputs())
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))

    def fn(q, k, v):
        return hyperattn.attention(q, k, v, **params)

    with torch.no_grad():
        eager = fn(q, k, v)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
        exact = hyperattn.exact_attention(q, k, v, causal=True, backend="triton")
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert (eager - exact).abs().max() > 1e-3  # the approximation ran


def test_autocast_casts_the_inputs_of_the_compiled_call():
    """Under torch.autocast the compiled call casts q, k, v to its dtype as the eager one does (a
    model's RoPE in float32 beside a bf16 v), in one graph."""
    def fn(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return hyperattn.attention(q, k, v, causal=True, seed=5, **SPARSE)

    q, k, v = (x.detach().float() for x in _inputs(grad=False))
    v16 = v.bfloat16()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fn(q, k, v16), rtol=0, atol=0)
    torch.testing.assert_close(out, hyperattn.attention(q.bfloat16(), k.bfloat16(), v16, causal=True, seed=5,
                                                        **SPARSE), rtol=0, atol=0)
