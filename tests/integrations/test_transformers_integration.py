"""hyperattn.integrations.transformers on tiny Llama-, Qwen2- and Mistral-style models built from
configs here (nothing is downloaded): where HyperAttention runs, where SDPA runs instead, and that
the model's outputs are what they must be in either case."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hyperattn.integrations import transformers as ht  # noqa: E402

#: small enough that the approximation really runs at N=256 (causal splits above 2 * min_seq_len)
SMALL = dict(min_seq_len=64, block_size=32, sample_size=32, lsh_num_projs=4, seed=0)
LONG, SHORT = 256, 48
VOCAB = 97
FAMILIES = ["llama", "qwen2", "mistral"]


@pytest.fixture(autouse=True)
def registered():
    ht.register()
    yield


def make_config(family: str, layers: int = 4, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    common.update((key, extra.pop(key)) for key in list(extra) if key in common)
    if family == "llama":
        return transformers.LlamaConfig(**common, **extra)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, **extra)
    if family == "mistral":
        return transformers.MistralConfig(**{"sliding_window": 4096, **common, **extra})
    raise ValueError(family)


def make_model(family: str, attn: str = "sdpa", seed: int = 0, **extra):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family, **extra), attn_implementation=attn)
    return model.eval()


def tokens(batch: int, n: int, seed: int = 1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, attn: str | None = None, **kwargs):
    if attn is not None:
        model.set_attn_implementation(attn)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs)


def count_hyper_calls(monkeypatch):
    """A spy on the integration's one call into HyperAttention: the K/V head counts it saw."""
    seen = []
    original = ht._hyper_call

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[1], k.shape[1], q.shape[2]))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(ht, "_hyper_call", spy)
    return seen


# --- registration ----------------------------------------------------------------------------


def test_importing_the_integration_registers_nothing():
    code = ("import hyperattn.integrations.transformers as ht\n"
            "from transformers import AttentionInterface\n"
            "from transformers.masking_utils import AttentionMaskInterface\n"
            "assert 'hyper' not in AttentionInterface._global_mapping\n"
            "assert 'hyper' not in AttentionMaskInterface._global_mapping\n"
            "assert not ht.is_registered()\n"
            "ht.register()\n"
            "assert ht.is_registered()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_register_and_unregister():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    ht.register("hyper_test_name")
    assert AttentionInterface._global_mapping["hyper_test_name"] is ht.hyper_attention_forward
    assert AttentionMaskInterface._global_mapping["hyper_test_name"] is ht.hyper_mask
    ht.unregister("hyper_test_name")
    assert "hyper_test_name" not in AttentionInterface._global_mapping


def test_mask_function_passes_no_mask_for_a_plain_causal_batch():
    """What makes 'pure causal' robust: the mask function materialises nothing for an unpadded
    causal batch (so the attention function sees None) and a real mask for padding."""
    assert ht.hyper_mask(batch_size=2, q_length=8, kv_length=8, attention_mask=torch.ones(2, 8, dtype=torch.bool)) is None
    padded = torch.ones(2, 8, dtype=torch.bool)
    padded[1, 6:] = False
    mask = ht.hyper_mask(batch_size=2, q_length=8, kv_length=8, attention_mask=padded)
    assert mask.shape == (2, 1, 8, 8) and not mask[1, 0, :, 6:].any()


# --- choosing layers and parameters ----------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("all", [0, 1, 2, 3, 4, 5]), ("none", []), ("last:2", [4, 5]), ("first:3", [0, 1, 2]), ("odd", [1, 3, 5]),
    ("even", [0, 2, 4]), ([0, -1], [0, 5]), ("1,3", [1, 3]), (2, [2]), ("LAST:0", []),
])
def test_select_layers(spec, expected):
    assert ht.select_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["last:7", "sideways", [6], "first:-1"])
def test_select_layers_rejects_what_it_cannot_mean(spec):
    with pytest.raises(ValueError):
        ht.select_layers(spec, 6)


def test_configure_rejects_unknown_parameters():
    model = make_model("llama")
    with pytest.raises(TypeError, match="blocksize"):
        ht.configure(model, blocksize=64)


@pytest.mark.parametrize("spec, first_patched", [("last:2", 2), ("first:1", 0), ("odd", 1), ([3], 3)])
def test_configure_patches_exactly_the_chosen_layers(spec, first_patched):
    model = make_model("llama")
    ids = tokens(1, LONG)
    exact = logits(model, ids, "sdpa", output_hidden_states=True).hidden_states
    patched = ht.configure(model, layers=spec, **SMALL)
    with ht.record_calls() as calls:
        hyper = logits(model, ids, output_hidden_states=True).hidden_states
    assert model.config._attn_implementation == "hyper"
    assert sorted({c.layer for c in calls if c.path == "hyper"}) == patched == ht.select_layers(spec, 4)
    assert all(c.reason == "layer not patched" for c in calls if c.path == "sdpa")
    # hidden_states[i] is the input of layer i: identical up to the first patched layer's output
    for i in range(first_patched + 1):
        assert torch.equal(hyper[i], exact[i]), i
    assert not torch.allclose(hyper[first_patched + 1], exact[first_patched + 1], atol=1e-6)
    params = ht.layer_params(model)
    assert [i for i, p in params.items() if p is not None] == patched
    assert all(params[i].seed == SMALL["seed"] + i and params[i].block_size == 32 for i in patched)


def test_parameters_live_on_each_model():
    ids = tokens(1, LONG)
    a, b = make_model("llama"), make_model("llama")
    ht.configure(a, **SMALL)
    ht.configure(b, **{**SMALL, "min_seq_len": 1024})
    with ht.record_calls() as calls:
        logits(a, ids)
        logits(b, ids)
    assert [c.path for c in calls] == ["hyper"] * 4 + ["sdpa"] * 4


# --- agreement and the approximation ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_below_min_seq_len_patched_and_exact_models_agree(family):
    model = make_model(family)
    ht.configure(model, **SMALL)
    # shorter than min_seq_len: SDPA runs (identical); below 2 * min_seq_len the causal method is exact
    for n, path in ((SHORT, "sdpa"), (100, "hyper")):
        ids = tokens(2, n)
        exact = logits(model, ids, "sdpa").logits
        with ht.record_calls() as calls:
            hyper = logits(model, ids, "hyper").logits
        assert {c.path for c in calls} == {path}
        if path == "sdpa":
            assert torch.equal(hyper, exact)
        else:
            torch.testing.assert_close(hyper, exact, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_long_inputs_run_the_approximation(family, monkeypatch):
    seen = count_hyper_calls(monkeypatch)
    model = make_model(family)
    ids = tokens(2, LONG)
    exact = logits(model, ids, "sdpa").logits
    ht.configure(model, **SMALL)
    hyper = logits(model, ids).logits
    again = logits(model, ids).logits
    assert seen == [(4, 2, LONG)] * 8  # 4 layers x 2 forwards, GQA: 2 KV heads, never expanded
    assert torch.isfinite(hyper).all()
    assert torch.equal(hyper, again)  # one seed: the same draws
    difference = (hyper - exact).abs()
    assert difference.max() > 1e-4  # the approximation ran ...
    assert difference.mean() < 0.25 * exact.abs().mean()  # ... and approximates (a random model)


def test_model_built_with_attn_implementation_hyper(monkeypatch):
    seen = count_hyper_calls(monkeypatch)
    model = make_model("llama", attn="hyper")
    assert model.config._attn_implementation == "hyper"
    out = logits(model, tokens(1, 5000 // 10)).logits  # defaults: min_seq_len 4096 -> SDPA, no call
    assert torch.isfinite(out).all() and seen == []
    ht.configure(model, layers="last:1", **SMALL)
    logits(model, tokens(1, LONG))
    assert len(seen) == 1


def test_gradients_flow_through_the_approximation():
    model = make_model("llama")
    ht.configure(model, layers="last:1", **SMALL)
    model.train()
    ids = tokens(1, LONG)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grad = model.model.layers[-1].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# --- what falls back to SDPA -----------------------------------------------------------------


def test_padded_batch_is_no_further_from_exact_than_unpadded():
    """Right padding: the real tokens of the padded batch match exact attention (the padded call
    falls back to SDPA), and so are no further from it than the same sequences run unpadded."""
    model = make_model("llama")
    lengths = [LONG, 200]
    ids = tokens(2, LONG)
    mask = torch.ones(2, LONG, dtype=torch.long)
    mask[1, lengths[1]:] = 0
    exact = [logits(model, ids[i:i + 1, :n], "sdpa").logits[0] for i, n in enumerate(lengths)]
    ht.configure(model, **SMALL)
    unpadded = [logits(model, ids[i:i + 1, :n]).logits[0] for i, n in enumerate(lengths)]
    with ht.record_calls() as calls:
        padded = logits(model, ids, attention_mask=mask).logits
    assert {(c.path, c.reason) for c in calls} == {("sdpa", "attention mask (padding or custom)")}
    for i, n in enumerate(lengths):
        padded_error = (padded[i, :n] - exact[i]).abs().max()
        unpadded_error = (unpadded[i] - exact[i]).abs().max()
        assert padded_error <= unpadded_error + 1e-5
        assert padded_error < 1e-4
    # an all-ones mask is no padding: HyperAttention runs
    with ht.record_calls() as calls:
        logits(model, ids, attention_mask=torch.ones_like(mask))
    assert {c.path for c in calls} == {"hyper"}


def test_sliding_window_that_excludes_keys_runs_exact_sdpa():
    model = make_model("mistral", sliding_window=64)
    ids = tokens(1, LONG)
    exact = logits(model, ids, "sdpa").logits
    ht.configure(model, **SMALL)
    with ht.record_calls() as calls:
        out = logits(model, ids).logits
    assert {(c.path, c.reason) for c in calls} == {("sdpa", "sliding window")}
    assert torch.equal(out, exact)


def test_qwen2_sliding_layers_fall_back_and_full_layers_run_hyper():
    model = make_model("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=2)
    ids = tokens(1, LONG)
    ht.configure(model, **SMALL)
    with ht.record_calls() as calls:
        out = logits(model, ids).logits
    assert [(c.layer, c.path) for c in calls] == [(0, "hyper"), (1, "hyper"), (2, "sdpa"), (3, "sdpa")]
    assert torch.isfinite(out).all()


def test_packed_sequences_fall_back():
    model = make_model("llama")
    ids = tokens(1, LONG)
    positions = torch.cat([torch.arange(128), torch.arange(128)])[None]
    exact = logits(model, ids, "sdpa", position_ids=positions).logits
    ht.configure(model, **SMALL)
    with ht.record_calls() as calls:
        out = logits(model, ids, position_ids=positions).logits
    assert {c.path for c in calls} == {"sdpa"}
    assert torch.equal(out, exact)


class _Attention(torch.nn.Module):
    def __init__(self, groups=2, sliding_window=None):
        super().__init__()
        self.layer_idx, self.is_causal, self.num_key_value_groups = 0, True, groups
        self.sliding_window = sliding_window
        self.hyperattn_params = ht.HyperParams(**SMALL)


def _qkv(n_q, n_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, n_q, 16, generator=g), torch.randn(1, 2, n_k, 16, generator=g), torch.randn(1, 2, n_k, 16, generator=g)


def _reference(q, k, v, mask, scale=None):
    """Exact attention with K/V heads expanded, as [B, N, H, D]."""
    return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=mask, scale=scale).transpose(1, 2)


def test_a_materialised_bottom_right_causal_mask_runs_hyper_and_others_fall_back():
    """Chunked prefill against a cache: Nq < Nk with the bottom-right causal mask materialised."""
    n_q, n_k = 100, 160
    q, k, v = _qkv(n_q, n_k)
    causal = (torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + n_k - n_q)[None, None]
    module = _Attention()
    for mask in (causal, torch.where(causal, 0.0, float("-inf")), torch.where(causal, 0.0, torch.finfo(torch.float32).min)):
        with ht.record_calls() as calls:
            out, _ = ht.hyper_attention_forward(module, q, k, v, mask, scaling=0.25)
        assert [c.path for c in calls] == ["hyper"]  # n_q < 2 * min_seq_len: computed exactly
        torch.testing.assert_close(out, _reference(q, k, v, causal, scale=0.25), atol=1e-5, rtol=1e-5)
    holes = causal.clone()
    holes[..., 3] = False
    biased = torch.where(causal, 0.5, float("-inf"))
    for mask in (holes, biased):
        with ht.record_calls() as calls:
            out, _ = ht.hyper_attention_forward(module, q, k, v, mask)
        assert [c.reason for c in calls] == ["attention mask (padding or custom)"]
        torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_a_none_mask_is_completed_where_the_model_mask_was_bypassed():
    """Called directly with no mask: a binding sliding window, or cu_seq_lens of packed
    sequences, still get exact attention with the right mask."""
    n = 160
    q, k, v = _qkv(n, n)
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = (cols <= rows) & (cols > rows - 64)
    with ht.record_calls() as calls:
        out, _ = ht.hyper_attention_forward(_Attention(sliding_window=64), q, k, v, None)
    assert [c.reason for c in calls] == ["sliding window"]
    torch.testing.assert_close(out, _reference(q, k, v, window[None, None]), atol=1e-5, rtol=1e-5)
    cu = torch.tensor([0, 70, n], dtype=torch.int32)
    ids = (torch.arange(n) >= 70).long()
    packed = (cols <= rows) & (ids[:, None] == ids[None, :])
    with ht.record_calls() as calls:
        out, _ = ht.hyper_attention_forward(_Attention(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert [c.reason for c in calls] == ["packed sequences"]
    torch.testing.assert_close(out, _reference(q, k, v, packed[None, None]), atol=1e-5, rtol=1e-5)


def test_dropout_in_training_falls_back():
    model = make_model("llama", attention_dropout=0.1)
    ht.configure(model, **SMALL)
    model.train()
    ids = tokens(1, LONG)
    with ht.record_calls() as calls:
        model(input_ids=ids, use_cache=False)
    assert {c.reason for c in calls} == {"dropout"}


def test_softcap_is_refused():
    q, k, v = _qkv(100, 100)
    with pytest.raises(ValueError, match="softcap"):
        ht.hyper_attention_forward(_Attention(), q, k, v, None, softcap=30.0)


# --- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_from_a_long_prompt(family):
    model = make_model(family)
    ht.configure(model, layers="last:2", **SMALL)
    prompt = tokens(1, LONG)
    with ht.record_calls() as calls, torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (1, LONG + 4) and torch.equal(out[:, :LONG], prompt)
    prefill = [c for c in calls if c.n_q == LONG]
    assert [(c.layer, c.path) for c in prefill] == [(0, "sdpa"), (1, "sdpa"), (2, "hyper"), (3, "hyper")]
    decode = [c for c in calls if c.n_q == 1]
    assert len(decode) == 4 * 3 and all(c.path == "sdpa" for c in decode)
    assert {c.reason for c in decode if c.layer >= 2} == {"query shorter than min_seq_len"}


# --- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_model_has_no_graph_break_and_matches_eager(family):
    """torch.compile(model, fullgraph=True): the attention is one operator per layer, the mask is
    looked at inside it; logits and gradients equal eager (plain batch: the approximation runs;
    padded batch: exact masked attention, as eager falls back to SDPA)."""
    torch._dynamo.reset()
    model = make_model(family, layers=2)
    ht.configure(model, **SMALL)
    ids = tokens(2, LONG)
    padding = torch.ones(2, LONG, dtype=torch.long)
    padding[1, 200:] = 0
    exact = logits(model, ids, "sdpa").logits
    model.set_attn_implementation("hyper")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for mask in (None, padding):
        want = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        want.loss.backward()
        want_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        got = compiled(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        got.loss.backward()
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        for p, w in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-5)
        model.zero_grad(set_to_none=True)
        if mask is None:
            assert (got.logits - exact).abs().max() > 1e-4  # the approximation ran
        else:
            real = slice(0, 200)
            torch.testing.assert_close(got.logits[1, real], logits(model, ids[1:, :200], "sdpa").logits[0],
                                       rtol=1e-4, atol=1e-4)
            model.set_attn_implementation("hyper")
    torch._dynamo.reset()


def test_compiled_partially_patched_model_with_a_cache_matches_eager():
    """layers="last:1", the cache on and no attention mask (the usual prefill): the SDPA layers'
    fallback reads no data under compile either, so the model still compiles in one graph."""
    torch._dynamo.reset()
    model = make_model("llama", layers=3)
    ht.configure(model, layers="last:1", **SMALL)
    ids = tokens(1, LONG)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_compiled_model_on_triton_matches_eager():
    """The same on a GPU: a bf16 Llama-style model with every layer on the Triton backend, compiled
    with inductor in one graph; logits equal eager's (the same kernels on the same plans) and the
    parameter gradients agree within bf16 rounding (sample slots add with atomics)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = make_model("llama", layers=2, hidden_size=256, intermediate_size=512,
                       max_position_embeddings=8192).to("cuda", torch.bfloat16)
    ht.configure(model, backend="triton", min_seq_len=512, block_size=128, sample_size=128, seed=3,
                 exact_crossover=False)
    ids = tokens(1, 4096).cuda()
    want = model(input_ids=ids, labels=ids, use_cache=False)
    want.loss.backward()
    want_grads = [p.grad.float().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    got = torch.compile(model, fullgraph=True)(input_ids=ids, labels=ids, use_cache=False)
    got.loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

    def relative(a, b):  # inductor computes the norms and the MLP in other roundings than eager
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert relative(got.logits, want.logits) < 3e-2, relative(got.logits, want.logits)
    errors = [relative(p.grad, w) for p, w in zip(model.parameters(), want_grads)]
    assert max(errors) < 1e-1, errors
    exact = logits(model, ids, "sdpa").logits
    assert (want.logits.float() - exact.float()).abs().max() > 1e-3  # the approximation ran
    torch._dynamo.reset()
