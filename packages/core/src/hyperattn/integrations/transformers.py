"""HyperAttention inside Hugging Face transformers models: ``attn_implementation="hyper"``.

    from hyperattn.integrations import transformers as hyper_tf

    hyper_tf.register()                                   # opt in: importing registers nothing
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hyper")
    hyper_tf.configure(model, layers="last:4", min_seq_len=8192, seed=0)   # the others run SDPA

``register()`` adds ``"hyper"`` to transformers' ``AttentionInterface`` (the attention function
:func:`hyper_attention_forward`) and to its ``AttentionMaskInterface`` (:func:`hyper_mask`, which
builds exactly SDPA's masks: ``None`` for a plain causal batch without padding, a boolean 4-D mask
otherwise, so the layers left on SDPA get what they expect).  ``model.set_attn_implementation("hyper")``
switches a loaded model.

The attention function gets q [B, H, N, D] and k/v with the model's KV heads (GQA runs on them,
never expanded) and returns ``(out [B, N, H, Dv], None)``; it honours ``scaling`` and causality.
It runs HyperAttention only where HyperAttention computes what the model asked for, and exact
attention through transformers' own SDPA function (the one ``attn_implementation="sdpa"`` runs)
everywhere else, never an approximation of something else:

* layers that :func:`configure` left out;
* queries shorter than the layer's ``min_seq_len`` (decode steps, short prompts, short chunks);
* a mask that is not plain causal: padding, packed sequences (``cu_seq_lens_q``/``cu_seq_lens_k``
  or ``position_ids`` that restart), any custom 4-D or additive mask.  A materialised mask is
  tested: one that is exactly the bottom-right causal pattern (or all-True, non-causal) still runs
  HyperAttention;
* a sliding window that excludes keys (more keys than ``sliding_window``): exact windowed SDPA;
  a window longer than the keys changes nothing and HyperAttention runs;
* dropout > 0 (training with ``attention_dropout``).

Softcapping and attention sinks (``softcap``, ``s_aux``) raise: neither SDPA nor HyperAttention
computes them.  :func:`record_calls` lists, per call, which path ran and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import hyperattn

NAME = "hyper"
#: the attribute of an attention module holding its :class:`HyperParams` (None: the layer runs SDPA)
PARAMS_ATTR = "hyperattn_params"


@dataclasses.dataclass(frozen=True)
class HyperParams:
    """The method's parameters of one layer (see :func:`hyperattn.attention`)."""

    block_size: int = 256
    sample_size: int = 256
    lsh_num_projs: int = 7
    min_seq_len: int = 4096
    seed: int | None = None
    backend: str = "auto"
    exact_crossover: bool = True
    sink_keys: int = 0
    band_keys: int = 0
    sampling: str = "stratified"
    estimator: str | None = None


DEFAULT_PARAMS = HyperParams()
PARAM_NAMES = tuple(field.name for field in dataclasses.fields(HyperParams))


# --- registration ----------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why the integration cannot work here (transformers missing, or without the attention and
    mask interfaces it registers with), or None when it can."""
    try:
        import transformers
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401
    except ImportError as error:
        return f"transformers is not usable: {error}"
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        return f"needs transformers >= 5, found {transformers.__version__}"
    return None


def register(name: str = NAME) -> None:
    """Register the attention function and its mask function under ``name`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, hyper_attention_forward)
    AttentionMaskInterface.register(name, hyper_mask)


def unregister(name: str = NAME) -> None:
    """Undo :func:`register` (models still set to ``name`` fail on their next call)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def is_registered(name: str = NAME) -> bool:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping


def hyper_mask(*args, **kwargs):
    """The mask function of ``"hyper"``: transformers' ``sdpa_mask``, unchanged.

    It returns None where SDPA may rely on ``is_causal`` (no padding and q_len == kv_len, a single
    query, or prefill into an empty static cache) and a boolean [B, 1, Nq, Nk] mask otherwise
    (padding, packed sequences, a sliding window shorter than the keys, custom mask functions).
    The unpatched layers run SDPA on the same mask, so they compute what ``"sdpa"`` computes."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


# --- choosing layers and parameters ---------------------------------------------------------


def attention_modules(model) -> dict[int, list]:
    """The attention modules of ``model`` by layer index (modules named ``*Attention`` with an
    int ``layer_idx``, as every model using transformers' attention interface has)."""
    found: dict[int, list] = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and type(module).__name__.endswith("Attention"):
            found.setdefault(layer, []).append(module)
    return dict(sorted(found.items()))


def select_layers(layers, num_layers: int) -> list[int]:
    """Layer indices from a spec: ``"all"``, ``"none"``, ``"last:N"``, ``"first:N"``, ``"odd"``,
    ``"even"``, an int, a comma list ``"0,3,-1"`` or a list of ints (negative counts from the end)."""
    if isinstance(layers, str):
        spec = layers.strip().lower()
        if spec == "all":
            return list(range(num_layers))
        if spec == "none":
            return []
        if spec in ("odd", "even"):
            return list(range(1 if spec == "odd" else 0, num_layers, 2))
        head, _, count = spec.partition(":")
        if head in ("last", "first") and count:
            n = int(count)
            if not 0 <= n <= num_layers:
                raise ValueError(f"layers={layers!r}: N must be in [0, {num_layers}]")
            return list(range(num_layers - n, num_layers)) if head == "last" else list(range(n))
        try:
            indices = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"layers={layers!r}: expected 'all', 'none', 'last:N', 'first:N', 'odd', 'even', "
                             "or indices such as '0,3,-1'") from None
    elif isinstance(layers, int):
        indices = [layers]
    elif isinstance(layers, Iterable):
        indices = [int(index) for index in layers]
    else:
        raise TypeError(f"layers must be a str, an int or a list of ints, got {type(layers).__name__}")
    chosen = set()
    for index in indices:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"layer index {index} out of range for {num_layers} layers")
        chosen.add(index % num_layers)
    return sorted(chosen)


def configure(model, layers="all", **params) -> list[int]:
    """Run HyperAttention in the chosen layers of ``model`` and SDPA in the others; returns the
    patched layer indices.

    ``layers``: see :func:`select_layers` (the paper patches the last ones: ``"last:N"``).
    ``params``: ``block_size``, ``sample_size``, ``lsh_num_projs``, ``min_seq_len``, ``seed``,
    ``backend``, ``exact_crossover``, ``sink_keys``, ``band_keys``, ``sampling``
    (as :func:`hyperattn.attention`).
    They are stored on each layer's attention module (attribute ``hyperattn_params``), not in this
    module: two models can be configured differently.  With ``seed=s``, layer ``i`` draws from ``s + i``; ``seed=None``
    draws afresh on every call.  Registers ``"hyper"`` and switches the model to it if needed.
    """
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if unknown:
        raise TypeError(f"unknown HyperAttention parameters {unknown}; valid: {list(PARAM_NAMES)}")
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"no attention modules with a layer_idx found in {type(model).__name__}")
    num_layers = max(modules) + 1
    chosen = select_layers(layers, num_layers)
    base = dataclasses.replace(DEFAULT_PARAMS, **params)
    for layer, group in modules.items():
        layer_params = None
        if layer in chosen:
            layer_params = base if base.seed is None else dataclasses.replace(base, seed=int(base.seed) + layer)
        for module in group:
            setattr(module, PARAMS_ATTR, layer_params)
    register()
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
    return chosen


def layer_params(model) -> dict[int, HyperParams | None]:
    """Each layer's parameters (None: SDPA), as :func:`configure` left them."""
    return {layer: getattr(group[0], PARAMS_ATTR, DEFAULT_PARAMS) for layer, group in attention_modules(model).items()}


# --- which path ran --------------------------------------------------------------------------


class CallRecord(NamedTuple):
    layer: int | None
    path: str          # "hyper" or "sdpa"
    reason: str        # why SDPA ran ("" for hyper)
    n_q: int
    n_k: int


_records: list[CallRecord] | None = None


@contextlib.contextmanager
def record_calls() -> Iterator[list[CallRecord]]:
    """``with record_calls() as calls:`` lists every call of the attention function made inside."""
    global _records
    saved, _records = _records, []
    try:
        yield _records
    finally:
        _records = saved


def _record(module, path: str, reason: str, n_q: int, n_k: int) -> None:
    if _records is not None:
        _records.append(CallRecord(getattr(module, "layer_idx", None), path, reason, n_q, n_k))


# --- the attention function ------------------------------------------------------------------


def _hyper_call(q, k, v, *, causal: bool, scale: float | None, params: HyperParams, mask=None):
    """The one call into HyperAttention: q [B, Hq, Nq, D], k/v [B, Hk, Nk, D] -> [B, Hq, Nq, Dv].

    ``mask`` (under torch.compile only): the model's mask, looked at inside the operator when it
    runs (dropped if plain causal, else exact masked attention), see ``hyperattn.torch.op``."""
    if mask is None:
        return hyperattn.attention(q, k, v, causal=causal, scale=scale, backend=params.backend,
                                   block_size=params.block_size, sample_size=params.sample_size,
                                   lsh_num_projs=params.lsh_num_projs, min_seq_len=params.min_seq_len,
                                   exact_crossover=params.exact_crossover, sink_keys=params.sink_keys,
                                   band_keys=params.band_keys, sampling=params.sampling, estimator=params.estimator,
                                   seed=params.seed)
    from hyperattn.config import HyperAttentionConfig, estimator_params
    from hyperattn.torch.op import compiled_attention

    config = HyperAttentionConfig(**estimator_params(params.estimator, params.block_size, params.sample_size,
                                                     params.lsh_num_projs, params.min_seq_len, params.exact_crossover,
                                                     params.sink_keys, params.band_keys, params.sampling))
    return compiled_attention(q, k, v, causal=causal, scale=scale, backend=params.backend, config=config,
                              seed=params.seed, return_lse=False, mask=mask)


def hyper_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None,
                            sliding_window: int | None = None, **kwargs):
    """transformers' attention-function convention: q [B, H, Nq, D], k/v [B, Hkv, Nk, D] ->
    ``(out [B, Nq, H, Dv], None)``.  HyperAttention where it computes what was asked, else SDPA."""
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='hyper' does not support {name!r}: use 'eager'")
    params = getattr(module, PARAMS_ATTR, DEFAULT_PARAMS)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    n_q, n_k = query.shape[2], key.shape[2]

    compiling = _compiling()
    reason = _fallback_reason(params, query, key, attention_mask, dropout, causal, sliding_window, kwargs,
                              look_at_data=not compiling)
    if reason is None and attention_mask is None and causal and n_k > n_q:
        # SDPA's convention for a None mask with more keys than queries (prefill into an empty
        # static cache): the keys past the queries are the cache's empty slots
        key, value = key[:, :, :n_q], value[:, :, :n_q]
    if reason is not None:
        _record(module, "sdpa", reason, n_q, n_k)
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, causal, sliding_window, kwargs)
    _record(module, "hyper", "", n_q, n_k)
    out = _hyper_call(query, key, value, causal=causal, scale=scaling, params=params,
                      mask=attention_mask if compiling else None)
    return out.transpose(1, 2).contiguous(), None


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _fallback_reason(params, query, key, mask, dropout, causal, window, kwargs, look_at_data=True) -> str | None:
    """Why this call cannot run HyperAttention (None: it can).  ``look_at_data=False`` (under
    torch.compile) decides on shapes and settings only: the mask, which transformers then always
    materialises and which then also encodes packed sequences, is looked at inside the operator."""
    n_q, n_k = query.shape[2], key.shape[2]
    if params is None:
        return "layer not patched"
    if dropout and dropout > 0:
        return "dropout"
    if n_q < params.min_seq_len:
        return "query shorter than min_seq_len"
    if causal and n_q > n_k:
        return "more queries than keys"
    if window is not None and n_k > window:
        return "sliding window"
    if not look_at_data:
        return None
    if _packed(kwargs):
        return "packed sequences"
    if mask is None:
        return None
    if not _is_plain_mask(mask, n_q, n_k, causal):
        return "attention mask (padding or custom)"
    return None


def _packed(kwargs) -> bool:
    """Several sequences in one row: cu_seq_lens with more than one sequence, or position_ids
    that restart (padding-free batches)."""
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        lens = kwargs.get(name)
        if lens is not None and lens.numel() > 2:
            return True
    positions = kwargs.get("position_ids")
    if positions is not None and positions.dim() == 2 and positions.shape[-1] > 1:
        return bool((positions.diff(dim=-1) != 1).any())
    return False


def _is_plain_mask(mask, n_q: int, n_k: int, causal: bool) -> bool:
    """Whether a materialised mask is exactly what HyperAttention computes anyway (see
    :func:`hyperattn.torch.masks.is_plain_mask`)."""
    from hyperattn.torch.masks import is_plain_mask

    return is_plain_mask(mask, n_q, n_k, causal)


def _sdpa(module, query, key, value, mask, dropout, scaling, causal, window, kwargs):
    """Exact attention: transformers' SDPA function, with a mask made here where the model's mask
    function was bypassed (a None mask under a sliding window or packed sequences)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if mask is None:
        mask = _implied_mask(query, key, causal, window, kwargs)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=causal, **kwargs)


def _implied_mask(query, key, causal, window, kwargs):
    import torch

    n_q, n_k, device = query.shape[2], key.shape[2], query.device
    windowed = window is not None and n_k > window
    # under torch.compile packing cannot be read off position_ids without a data-dependent branch;
    # transformers then encodes it in the mask it materialises (and does not detect it with a cache)
    packed = n_q > 1 and n_q == n_k and not _compiling() and _packed(kwargs)
    if not (windowed or packed):
        return None
    q_pos = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    k_pos = torch.arange(n_k, device=device)[None, :]
    allowed = (k_pos <= q_pos) if causal else torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if windowed:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None, None]
    if packed:
        ids = _sequence_ids(kwargs, n_q, device)
        allowed = allowed & (ids[:, None, :, None] == ids[:, None, None, :])
    return allowed


def _sequence_ids(kwargs, n: int, device):
    """[B, N] index of the packed sequence of each token."""
    import torch

    lens = kwargs.get("cu_seq_lens_q")
    if lens is not None and lens.numel() > 2:
        return torch.bucketize(torch.arange(n, device=device), lens[1:-1].to(device), right=True)[None]
    positions = kwargs["position_ids"]
    starts = torch.nn.functional.pad(positions.diff(dim=-1) != 1, (1, 0), value=False)
    return starts.long().cumsum(-1)


__all__ = ["NAME", "DEFAULT_PARAMS", "unavailable_reason", "HyperParams", "CallRecord", "attention_modules", "configure", "hyper_attention_forward",
           "hyper_mask", "is_registered", "layer_params", "record_calls", "register", "select_layers", "unregister"]
