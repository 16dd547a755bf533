"""``hyperattn::attention`` as a ``torch.library`` operator: what ``torch.compile`` sees.

The operator takes tensors and plain values only.  Everything random is an input: the seed
(an int64 tensor, so a new seed per call neither recompiles nor is baked into the graph: on the
CPU it is read when the operator runs, on the inputs' device by the kernels, which keeps a CUDA
graph of the call free of host reads) and the LSH projections (or None: drawn from a CPU seed).
Whether the plan is one exact piece (the backend's crossover) is decided when the call is traced
and passed to both operators as ``exact``, so the backward rebuilds the forward's plan.  An optional ``mask`` (the transformers
integration passes the model's) is looked at when the operator runs: one that HyperAttention
computes anyway (plain causal, or all-True) is dropped, any other gets exact masked attention
(``masks.py``), so the traced graph has no data-dependent branch.  Its backward, ``hyperattn::attention_backward``,
rebuilds the plan from the same inputs (hashing and sorting are deterministic, the samples come
from the seed), so it differentiates exactly the function the forward computed.  Both check their
inputs when they run (inside the compiled graph), with the same messages as eager calls.
"""

from __future__ import annotations

import torch

from .. import registry
from ..algorithm import forward_call, is_exact_shape, run_backward
from ..config import make_config
from ..request import prepare
from ..validate import check_flag, check_seed
from .arguments import config_arguments, plan_projections
from .autocast import autocast_inputs
from .masks import is_plain_mask, masked_exact_backward, masked_exact_forward


def _request(q, k, v, seed, projections, backend, causal, scale, block_size, sample_size, lsh_num_projs,
             min_seq_len, exact_crossover, sink_keys, band_keys, sampling, exact):
    config = None if exact else make_config(block_size, sample_size, lsh_num_projs, min_seq_len, exact_crossover,
                                         sink_keys, band_keys, sampling)
    return prepare(q, k, v, causal=causal, scale=scale, backend=backend, config=config, seed=seed,
                   return_lse=True, projections=projections)


@torch.library.custom_op("hyperattn::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor,
                 projections: torch.Tensor | None, mask: torch.Tensor | None, backend: str, causal: bool,
                 scale: float, block_size: int, sample_size: int, lsh_num_projs: int, min_seq_len: int,
                 exact_crossover: bool, sink_keys: int, band_keys: int, sampling: str, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Nq, Dv] in q's dtype, lse [B, Hq, Nq] float32 (float64 for float64 inputs)).

    ``exact``: the plan is one exact piece (``compiled_attention`` passes the crossover's decision
    here and ``exact_crossover=False``, so the backward makes the same plan)."""
    request = _request(q, k, v, seed, projections, backend, causal, scale, block_size, sample_size, lsh_num_projs,
                       min_seq_len, exact_crossover, sink_keys, band_keys, sampling, exact)
    if _needs_mask(mask, request):  # the mask alone decides (as SDPA given a mask: no is_causal)
        out, lse = masked_exact_forward(q, k, v, mask, request.scale, causal=False)
        return out.contiguous(), lse.contiguous()
    impl = request.backend
    result = forward_call(impl, q, k, v, request.spec(plan_projections(projections, q)))
    out, lse = result.outputs(impl, q)
    return _fresh(out, q, k, v), _fresh(lse, q, k, v)


@attention_op.register_fake
def _(q, k, v, seed, projections, mask, backend, causal, scale, block_size, sample_size, lsh_num_projs,
      min_seq_len, exact_crossover, sink_keys, band_keys, sampling, exact):
    out = q.new_empty((*q.shape[:3], v.shape[3]))
    lse = q.new_empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@torch.library.custom_op("hyperattn::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor,
                          projections: torch.Tensor | None, mask: torch.Tensor | None,
                          backend: str, causal: bool,
                          scale: float,
                          block_size: int, sample_size: int, lsh_num_projs: int, min_seq_len: int,
                          exact_crossover: bool, sink_keys: int, band_keys: int,
                          sampling: str,
                          exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``hyperattn::attention`` with the same inputs, given its (out, lse)."""
    request = _request(q, k, v, seed, projections, backend, causal, scale, block_size, sample_size, lsh_num_projs,
                       min_seq_len, exact_crossover, sink_keys, band_keys, sampling, exact)
    if _needs_mask(mask, request):
        grads = masked_exact_backward(dout, dlse, q, k, v, mask, request.scale, causal=False)
        return tuple(g.contiguous() for g in grads)
    impl = request.backend
    qn, kn, vn = (impl.to_native(x) for x in (q, k, v))
    plan = request.spec(plan_projections(projections, q)).plan(impl, qn, kn)
    grads = run_backward(impl, plan, qn, kn, vn, impl.to_native(out), impl.to_native(lse), impl.to_native(dout),
                         None if dlse is None else impl.to_native(dlse), grad_dtype=qn.dtype)
    return tuple(_fresh(impl.from_native(g, like), q, k, v) for g, like in zip(grads, (q, k, v)))


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, seed, projections, mask, backend, causal, scale, block_size,
      sample_size, lsh_num_projs, min_seq_len, exact_crossover, sink_keys, band_keys, sampling, exact):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the real ones


def _needs_mask(mask, request) -> bool:
    """Whether ``mask`` changes what the call computes (it is not the plain causal / all-True one)."""
    problem = request.problem
    return mask is not None and not is_plain_mask(mask, problem.n_q, problem.n_k, request.causal)


def _setup_context(ctx, inputs, output):
    q, k, v, seed, projections, mask, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed, projections, mask)
    ctx.params = params
    # an unused lse gets no gradient (None, not zeros): the backward then may take the fused exact
    # kernels, which need dlse == 0 and the final out
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, seed, projections, mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_backward_op(dout, dlse, q, k, v, out, lse, seed, projections, mask, *ctx.params)
    return dq, dk, dv, None, None, None, *([None] * len(ctx.params))


attention_op.register_autograd(_backward, setup_context=_setup_context)


def _fresh(x, *inputs):
    """``x`` contiguous (the layout the fake kernels promise), copied if it shares memory with an
    input (an operator's outputs may not alias them)."""
    storage = x.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == storage for t in inputs):
        return x.clone(memory_format=torch.contiguous_format)
    return x.contiguous()


def compiled_attention(q, k, v, *, causal, scale, backend, config, seed, return_lse, projections=None,
                       head_dim=None, mask=None):
    """The call as ``torch.compile`` traces it: one ``hyperattn::attention`` node (checks run inside;
    ``mask``: see the module docstring)."""
    if head_dim is not None and q.shape[-1] != head_dim:
        raise ValueError(f"query's head dim D must equal the module's input_dim={head_dim}, got {q.shape[-1]}")
    q, k, v = autocast_inputs(q, k, v)
    if seed is None:  # drawn in the graph: a new one every run
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    elif not isinstance(seed, torch.Tensor):
        check_seed(seed)  # before the conversion, which would round a float or overflow
        seed = torch.tensor(seed, dtype=torch.int64)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return_lse = check_flag("return_lse", return_lse)
    arguments = config_arguments(config)
    if config is not None and config.exact_crossover:  # decided now: the forward and backward then agree
        # as the eager call decides (validate: requires_grad under grad mode; dynamo guards on the mode)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        # the head dims pick the crossover's tier by comparisons (guards: sizes stay symbolic);
        # reading the generation makes torch.compile guard on it, so a configure() call retraces
        widest = max(q.shape[3], v.shape[3])
        # (257 stands for every head dim above the widest tier: dispatch refuses it where runtime would)
        tier_dim = 64 if widest <= 64 else 128 if widest <= 128 else 256 if widest <= 256 else 257
        below = _crossover_of(backend, str(q.device), str(q.dtype).removeprefix("torch."), tier_dim, grad,
                              registry._options_generation)
        exact = is_exact_shape(q.shape[2], k.shape[2], bool(causal), config.min_seq_len, below)
        arguments = (*arguments[:4], False, *arguments[5:8], bool(exact))
    out, lse = attention_op(q, k, v, seed, projections, mask, backend, bool(causal), float(scale), *arguments)
    return (out, lse) if return_lse else out


@torch.compiler.assume_constant_result
def _crossover_of(backend: str, device: str, dtype: str, head_dim: int, grad: bool,
                  generation: int) -> tuple[int, int]:
    """The (keys, rows) crossover of the backend that runs such calls: read once when the call is
    traced (a constant of the graph; ``generation``, the registry's count of option changes, is
    part of the key).  (0, 0) where dispatch fails: the operator then raises when it runs, with
    the eager call's message."""
    from ..dispatch import resolve_backend
    from ..protocol import Problem

    try:  # sizes do not change which backend runs: placeholders keep them symbolic
        impl = resolve_backend(backend, Problem("torch", device, dtype, 1, 1, 1, 1, 1, head_dim, head_dim, grad))
    except (ValueError, TypeError, RuntimeError):
        return (0, 0)
    return tuple(impl.options.exact_below_for(head_dim, grad))
