"""fast_attn as a transformers attention implementation named "fast_attn".

    import fast_attn.integrations.transformers as fa_hf
    fa_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fast_attn")

Two functions are registered (transformers >= 5 needs both; without the mask
function a model silently receives no padding mask):

* `attention_forward`, called by every attention layer with q/k/v as
  (B, H, S, D) views of (B, S, H, D) memory. It maps transformers' arguments
  onto `fast_attn.attention`: `scaling`, `dropout`, GQA (k/v keep their own
  head count, never expanded), T5's `position_bias` (a bias whose gradient
  flows back to the relative-position embedding), causality from `is_causal`
  or `module.is_causal` when no mask is given, `sliding_window` (Mistral, Qwen2,
  Gemma 2/3, Starcoder2, Phi-3, gpt-oss, ModernBERT) as `window_size`, Gemma 2's
  `softcap`, gpt-oss's `s_aux` as `sinks` (their gradient reaches the
  parameter), and Inkling 2's `sinks` (one logit per query row) as `sinks`.

* `build_attention_mask`, called once per forward to build the mask. Where the mask
  is plain key padding (bidirectional attention, or causal attention aligned
  bottom-right as with a dynamic KV cache), with or without a sliding window,
  it returns the padding itself as a (B, 1, 1 or Sq, Sk) bool view instead of a
  (Sq, Sk) pattern, and the attention function hands it to the kernel as
  `key_mask` and the window as `window_size` (applied in-kernel, nothing built).
  A window stays in the mask where the model's layers do not hand it to the
  attention function (PhiMoE), as its modeling code shows.
  Packed sequences (one row holding several documents, detected by transformers
  from `position_ids` that restart) of a causal or bidirectional pattern return
  transformers' own (B, T) sequence ids, and the attention function runs the
  documents through `fast_attn.varlen_attention`: no (T, T) mask is built. Any
  other pattern (static caches, chunked attention, custom mask functions) is
  built by transformers' own `sdpa_mask` and reaches the kernel as a -inf bias.
  A model whose layers' `is_causal` transformers never checks against eager (no
  SDPA path, and code that sets it otherwise than to True or from the config)
  gets eager's own additive masks, never skipped, so causality comes from the
  masks alone as in eager: BigBirdPegasus's and PegasusX's decoders and
  VideoPrism's text model say is_causal=False under causal masks, and
  DeepSeek-V4 (eager only) extends the masks itself.

* Packed batches run the documents through `fast_attn.varlen_attention`, from
  `cu_seq_lens_q` / `cu_seq_lens_k` / `max_length_q` / `max_length_k` (as
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` makes them), else
  from the mask function's sequence ids, else, as transformers' flash path does,
  from `position_ids` that restart in a batch of one row without a mask. The
  collator's kwargs cost nothing; the other two find the offsets with `nonzero`,
  and looking at `position_ids` compares them with a range: each is a device-to-host
  sync per attention call on a GPU (transformers' flash path syncs the same way)
  and a graph break under torch.compile. A batch of one row without a mask whose
  `position_ids` do not restart pays that one comparison.

* Context parallelism: a forward given `fast_attn.distributed.shard_model_inputs(...)` (this rank's
  tokens, their positions in the whole sequence, and a `context_parallel` keyword that transformers
  hands down to every attention layer) runs each layer through
  `fast_attn.distributed.context_parallel_attention`; masks, packed sequences and dropout are refused there.

Every keyword argument that reaches `attention_forward` is honoured, or on the
list of arguments that do not change what attention computes
(`RESULT_NEUTRAL_KWARGS`), or refused with a ValueError naming the model class
and the argument: an argument fast_attn does not implement never changes the
result silently. An argument whose value is None is not in effect and passes.

Models whose attention layers compute attention themselves instead of calling
transformers' AttentionInterface (Bloom, MPT, GPT-J, Falcon, TrOCR) would add the
masks of this module to their scores as numbers; the mask function refuses
them with the model class named.

Conventions of the masks this module returns (what `attention_forward` reads):
  None                       no mask; causal (top-left, as SDPA) when the module is causal and Sq > 1
  bool (B, 1, 1, Sk)         key padding; a causal module adds its causal mask aligned bottom-right
  bool (B, 1, Sq, Sk), stride 0 on Sq
                             key padding of a bidirectional layer (exactly the mask SDPA would get)
  any other bool mask        True = attend, applied as a -inf bias
  integer (B, T)             packed sequences: each run of equal ids in a row is one document
  float mask                 added to the scores, as a bias
The first three carry no window: a layer's `sliding_window` W is then applied as
the window (W - 1, W - 1) (a causal layer's right side is 0), which is transformers'
own sliding mask (causal: keys j > i - W; bidirectional, where the model passes
W = its window + 1: |i - j| <= W - 1). A mask that transformers built already
carries its window, and none is added.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import warnings

import torch

from ..distributed.attention import context_parallel_attention
from ..distributed.model_inputs import ContextParallel
from ..functional import attention
from ..masks import bias_from_mask
from ..varlen import varlen_attention

IMPLEMENTATION_NAME = "fast_attn"

# Keyword arguments transformers passes down to the attention function that do not change its result.
RESULT_NEUTRAL_KWARGS = frozenset(
    {
        "position_ids",  # consumed by the rotary embedding; read here only to detect packed sequences
        "cache_position",
        "use_cache",
        "past_key_values",
        "output_attentions",  # weights are never returned: a warning says so
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "num_items_in_batch",
        "shift_labels",  # consumed by the loss (fast_attn.distributed.shard_model_inputs passes them)
        "deterministic",  # ModernBERT: fast_attn's results do not depend on it beyond rounding
    }
)


def _causal_flag(module: torch.nn.Module, is_causal: bool | None) -> bool:
    # The same precedence as transformers' SDPA integration: the call's is_causal, then the module's.
    return bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))


def _sinks_argument(
    module: torch.nn.Module, query: torch.Tensor, s_aux: torch.Tensor | None, sinks: torch.Tensor | None
) -> torch.Tensor | None:
    """fast_attn's sinks from gpt-oss's s_aux (Hq,) or Inkling 2's sinks (B, Hq, Sq, 1), one logit per
    query row: (B, Hq, Sq)."""
    if sinks is None:
        return s_aux
    batch, heads, seqlen = query.shape[:3]
    if s_aux is not None or tuple(sinks.shape) != (batch, heads, seqlen, 1):
        raise ValueError(
            f"{type(module).__name__}: fast_attn takes sinks of one logit per query row, shape (B, Hq, Sq, 1) = "
            f"({batch}, {heads}, {seqlen}, 1), and not with s_aux; got sinks {_describe(sinks)} and s_aux "
            f"{_describe(s_aux)}"
        )
    return sinks[..., 0]


def _is_key_padding(mask: torch.Tensor) -> bool:
    """A bool (B, 1|H, 1|Sq, Sk) mask that only varies along batch and keys."""
    if mask.dtype != torch.bool or mask.dim() != 4:
        return False
    return all(mask.shape[d] == 1 or mask.stride(d) == 0 for d in (1, 2))


def _refuse_unimplemented(module: torch.nn.Module, kwargs: dict) -> None:
    """Raise for every argument that would change the result and that this function does not apply."""
    for name, value in kwargs.items():
        if value is not None and name not in RESULT_NEUTRAL_KWARGS:
            raise ValueError(
                f"{type(module).__name__}: fast_attn's transformers attention does not implement the argument "
                f"{name!r} (got {_describe(value)}); use attn_implementation='eager' for this model"
            )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _mask_arguments(
    mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    causal_module: bool,
    seqlen_q: int,
    seqlen_k: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool | str]:
    """Map transformers' (mask, position_bias, causality) onto fast_attn's (bias, key_mask, causal)."""
    if mask is None:
        return position_bias, None, ("top_left" if causal_module and seqlen_q > 1 else False)
    if mask.shape[-1] > seqlen_k:
        # Eager attention slices a longer mask to the keys it has; do the same.
        mask = mask[..., :seqlen_k]
    if _is_key_padding(mask):
        key_mask = mask[:, 0, 0, :]  # (B, Sk)
        # Only this module's own causal mask function returns a single query row for Sq > 1.
        causal = "bottom_right" if causal_module and mask.shape[2] == 1 and seqlen_q > 1 else False
        return position_bias, key_mask, causal
    if mask.dtype == torch.bool:
        bias_dtype = dtype if position_bias is None else position_bias.dtype
        return bias_from_mask(mask, bias_dtype, position_bias), None, False
    return (mask if position_bias is None else position_bias + mask), None, False


def _is_sequence_ids(mask: torch.Tensor | None) -> bool:
    return mask is not None and not mask.is_floating_point() and mask.dtype != torch.bool


def _offsets_of_sequence_ids(sequence_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 offsets (N + 1,) of the documents of (B, T) sequence ids laid end to end (a row's start
    starts a document), and the longest as a 0-d tensor. `nonzero` syncs with the device."""
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    first_rows = starts.flatten().nonzero().flatten()
    offsets = torch.cat([first_rows, first_rows.new_tensor([sequence_ids.numel()])]).to(torch.int32)
    return offsets, (offsets[1:] - offsets[:-1]).max()


def _offsets_of_restarting_positions(position_ids, query: torch.Tensor, key: torch.Tensor):
    """The packed-sequence arguments of one row whose position_ids restart (transformers' flash path
    detects packing the same way), or None. Looking costs a device sync."""
    seqlen = query.shape[2]
    if (
        position_ids is None
        or position_ids.shape != (1, seqlen)
        or query.shape[0] != 1
        or key.shape[2] != seqlen
    ):
        return None
    positions = position_ids[0]
    first = positions.min()
    if seqlen < 2 or not bool((positions != torch.arange(seqlen, device=positions.device) + first).any()):
        return None
    starts = (positions == first).nonzero().flatten()
    offsets = torch.cat([starts, starts.new_tensor([seqlen])]).to(torch.int32)
    longest = (offsets[1:] - offsets[:-1]).max()
    return offsets, offsets, longest, longest


def _packed_attention(module, query, key, value, packed, causal_module, dropout, scaling, sliding_window,
                      softcap, s_aux) -> torch.Tensor:  # fmt: skip
    """Documents laid end to end through varlen_attention: q (B, Hq, T, D) with `packed` = (cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k) over the B * T tokens -> out (B, T, Hq, D)."""
    batch, heads_q, seqlen_q, head_dim = query.shape
    if key.shape[2] != seqlen_q:
        raise ValueError(
            f"{type(module).__name__}: packed sequences need as many keys as queries, got query "
            f"{tuple(query.shape)} and key {tuple(key.shape)}"
        )
    flat = [t.transpose(1, 2).reshape(batch * seqlen_q, t.shape[1], head_dim) for t in (query, key, value)]
    window = (sliding_window - 1, sliding_window - 1) if sliding_window else None
    out = varlen_attention(
        *flat,
        *packed,
        causal="top_left" if causal_module else False,
        window_size=window,
        softcap=softcap,
        sinks=s_aux,
        scale=scaling,
        dropout_p=dropout,
    )  # (B * T, Hq, D)
    return out.view(batch, seqlen_q, heads_q, head_dim)


def _context_parallel_attention(module, query, key, value, context: ContextParallel, refused: dict, dropout,
                                scaling, causal_module, sliding_window, softcap, s_aux) -> torch.Tensor:  # fmt: skip
    """This rank's shards through context_parallel_attention: q (B, Hq, S_local, D) -> out (B, S_local, Hq, D).
    Masks, a position bias, packed sequences and dropout are refused: none is implemented across ranks."""
    for name, value_given in refused.items():
        if value_given is not None:
            raise ValueError(
                f"{type(module).__name__}: fast_attn's context parallelism does not implement {name} (got "
                f"{_describe(value_given)}): every token of the sharded sequences is real and attends as the "
                f"layer's causality and window say; pass the inputs of fast_attn.distributed.shard_model_inputs"
            )
    if dropout:
        raise ValueError(
            f"{type(module).__name__}: fast_attn's context parallelism does not implement attention dropout "
            f"(got {dropout}); set the model's attention dropout to 0"
        )
    out = context_parallel_attention(
        query,
        key,
        value,
        group=context.group,
        mode=context.mode,
        layout=context.layout,
        causal=causal_module,
        window_size=(sliding_window - 1, sliding_window - 1) if sliding_window else None,
        softcap=softcap,
        sinks=s_aux,
        scale=scaling,
        backend=context.backend,
    )  # (B, Hq, S_local, D)
    return out.transpose(1, 2)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    context_parallel: ContextParallel | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The transformers attention function: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> out (B, Sq, Hq, D).
    With `context_parallel` (fast_attn.distributed.shard_model_inputs) they are this rank's shards."""
    _refuse_unimplemented(module, kwargs)
    if kwargs.get("output_attentions", False):
        warnings.warn(
            "fast_attn does not return attention weights (output_attentions=True); "
            "use attn_implementation='eager' to get them",
            stacklevel=2,
        )
    if value.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"fast_attn needs the value head dim to equal the query head dim in "
            f"{type(module).__name__}, got query {tuple(query.shape)} and value {tuple(value.shape)}"
        )
    kernel_sinks = _sinks_argument(module, query, s_aux, sinks)  # (Hq,) or (B, Hq, Sq)
    if context_parallel is not None:
        refused = {"attention_mask": attention_mask, "position_bias": position_bias,
                   "cu_seq_lens_q": cu_seq_lens_q, "cu_seq_lens_k": cu_seq_lens_k, "sinks": sinks}  # fmt: skip
        args = (dropout, scaling, _causal_flag(module, is_causal), sliding_window, softcap, kernel_sinks)
        return _context_parallel_attention(module, query, key, value, context_parallel, refused, *args), None
    packed = None
    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if position_bias is not None or not (attention_mask is None or _is_sequence_ids(attention_mask)):
            raise ValueError(
                f"{type(module).__name__}: cu_seq_lens_q/k come with an attention mask or position bias, "
                f"got {_describe(attention_mask)} and {_describe(position_bias)}; fast_attn takes one or the other"
            )
        longest = query.shape[0] * query.shape[2]  # a bound when the collator gave none
        packed = (cu_seq_lens_q, cu_seq_lens_k, max_length_q or longest, max_length_k or longest)
    elif _is_sequence_ids(attention_mask):
        offsets, longest = _offsets_of_sequence_ids(attention_mask)
        packed = (offsets, offsets, longest, longest)
    elif attention_mask is None and position_bias is None:
        packed = _offsets_of_restarting_positions(kwargs.get("position_ids"), query, key)
    if packed is not None:
        if sinks is not None:
            raise ValueError(
                f"{type(module).__name__}: fast_attn's packed sequences take sinks of one logit per head "
                f"(s_aux), not one per query row (got sinks {_describe(sinks)})"
            )
        causal_module = _causal_flag(module, is_causal)
        args = (dropout, scaling, sliding_window, softcap, kernel_sinks)
        return _packed_attention(module, query, key, value, packed, causal_module, *args), None
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] < seqlen_k:
        raise ValueError(
            f"{type(module).__name__}: attention mask covers {attention_mask.shape[-1]} keys "
            f"but there are {seqlen_k} (mask shape {tuple(attention_mask.shape)})"
        )
    bias, key_mask, causal = _mask_arguments(
        attention_mask, position_bias, _causal_flag(module, is_causal), seqlen_q, seqlen_k, query.dtype
    )
    mask_carries_no_window = attention_mask is None or key_mask is not None
    window = (sliding_window - 1, sliding_window - 1) if sliding_window and mask_carries_no_window else None
    out = attention(
        query,
        key,
        value,
        bias=bias,
        key_mask=key_mask,
        causal=causal,
        window_size=window,
        softcap=softcap,
        sinks=kernel_sinks,
        scale=scaling,
        dropout_p=dropout,
    )  # (B, Hq, Sq, D)
    return out.transpose(1, 2), None


def _keys_visible(
    padding: torch.Tensor | None, batch_size: int, kv_length: int, kv_offset: int
) -> torch.Tensor | None:
    """The 2-D padding mask (B, seen tokens) cut to the keys [kv_offset, kv_offset + kv_length): (B, Sk)."""
    if padding is None:
        return None
    padding = padding.to(torch.bool)
    missing = kv_offset + kv_length - padding.shape[-1]
    if missing > 0:
        # As transformers does: keys the 2-D mask does not cover are not attended.
        padding = torch.nn.functional.pad(padding, (0, missing), value=False)
    return padding[:, kv_offset : kv_offset + kv_length].expand(batch_size, kv_length)


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _same_mask_function(a, b) -> bool:
    """Whether two transformers mask functions are the same function of the same arguments: the same code
    and, cell by cell, the same closure (functions compared the same way, other values by equality). So
    `sliding_window_causal_mask_function(4)` matches another one of 4, and not one combined with a packed
    sequence mask or a window of 5."""
    if a is b:
        return True
    if getattr(a, "__code__", None) is None or getattr(a, "__code__", None) is not getattr(
        b, "__code__", None
    ):
        return False
    cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
    return len(cells_a) == len(cells_b) and all(
        _same_closure_value(x.cell_contents, y.cell_contents) for x, y in zip(cells_a, cells_b)
    )


def _same_closure_value(x: object, y: object) -> bool:
    if callable(x) or callable(y):
        return _same_mask_function(x, y)
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return len(x) == len(y) and all(_same_closure_value(i, j) for i, j in zip(x, y))
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return False
    return type(x) is type(y) and x == y


def _split_packed_sequences(mask_function, masking_utils) -> tuple:
    """(pattern, sequence ids (B, T)) when mask_function is transformers' and_masks(pattern,
    packed_sequence_mask_function(ids)), the form its mask creation gives packed sequences;
    else (mask_function, None)."""
    and_code = masking_utils.and_masks(masking_utils.causal_mask_function).__code__
    packed_code = masking_utils.packed_sequence_mask_function(None).__code__
    if getattr(mask_function, "__code__", None) is not and_code:
        return mask_function, None
    parts = mask_function.__closure__[0].cell_contents  # and_masks' mask_functions
    if len(parts) != 2 or getattr(parts[1], "__code__", None) is not packed_code:
        return mask_function, None
    return parts[0], parts[1].__closure__[0].cell_contents


def _model_class(config) -> type | None:
    """The transformers model class of a config: its base model, or for a family without one (TrOCR,
    a decoder alone) a model class of its modeling module; None when unknown."""
    if config is None:
        return None
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    class_name = MODEL_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if isinstance(class_name, str) and hasattr(transformers, class_name):
        return getattr(transformers, class_name)
    modeling = sys.modules.get(type(config).__module__.replace(".configuration_", ".modeling_"))
    classes = vars(modeling).values() if modeling is not None else ()
    return next(
        (
            c
            for c in classes
            if isinstance(c, type)
            and issubclass(c, transformers.PreTrainedModel)
            and c.__module__ == modeling.__name__
        ),
        None,
    )


def _refuse_own_attention_models(model_class: type | None) -> None:
    """Refuse a model whose attention layers do not call the attention function (they would add our masks)."""
    if model_class is not None and not model_class._can_set_attn_implementation():
        raise ValueError(
            f"{model_class.__name__} computes attention in its own code instead of calling transformers' "
            f"AttentionInterface, so attn_implementation='fast_attn' cannot run it; use 'eager' or 'sdpa'"
        )


@functools.cache
def _modeling_source(model_class: type) -> str | None:
    """The source of the module that defines model_class (its modeling file); None where unreadable."""
    try:
        return inspect.getsource(sys.modules[model_class.__module__])
    except (KeyError, OSError, TypeError):
        return None


# A call of the attention function whose arguments name sliding_window (nested parentheses one deep).
_CALL_PASSING_SLIDING_WINDOW = re.compile(
    r"attention_interface\((?:[^()]|\([^()]*\))*?\bsliding_window\s*=", re.S
)


@functools.cache
def _layers_pass_sliding_window(model_class: type | None) -> bool:
    """Whether this model's attention layers hand their sliding window to the attention function, read
    from its modeling code as transformers reads whether it calls the attention function at all.
    transformers' flash path takes the window from there, eager and SDPA from the mask; a family whose
    layers do not pass it (PhiMoE) must keep it in the mask. An unknown model (no config) is taken to."""
    if model_class is None:
        return True
    source = _modeling_source(model_class)
    return source is not None and _CALL_PASSING_SLIDING_WINDOW.search(source) is not None


# What a modeling file sets is_causal to, assignment or keyword: `True`, `False`, `is_causal` (a parameter),
# `not getattr(config, "use_bidirectional_attention", False)`, ...
_DECLARED_CAUSALITY = re.compile(r"\bis_causal\s*=(?!=)\s*([^\n]*)")


@functools.cache
def _masks_alone_give_causality(model_class: type | None) -> bool:
    """Whether this model needs eager's own masks, never skipped, because its layers' is_causal may
    contradict them. transformers reads is_causal only on its SDPA and flash paths, and checks it
    against eager on the CPU only where the model runs on SDPA. So it is trusted there, and in a model
    without SDPA whose modeling code sets it only to True or from the config (gpt-oss; Gemma 2 since
    transformers 5.2x); not in one that sets it otherwise: PegasusX's decoder and VideoPrism's text
    model attend through causal masks with layers that say is_causal=False (a parameter left at its
    default, a constant). A model with neither SDPA nor flash attention runs only eagerly: its code may
    also extend the masks itself (DeepSeek-V4 appends columns for its compressed keys)."""
    if model_class is None or getattr(model_class, "_supports_sdpa", False):
        return False
    if not getattr(model_class, "_supports_flash_attn", False):
        return True
    source = _modeling_source(model_class)
    if source is None:
        return True
    values = (value.rstrip(",) ") for value in _DECLARED_CAUSALITY.findall(source))
    return not all(value == "True" or "config" in value for value in values)


def build_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    local_size: int | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The transformers mask function of "fast_attn" (see the module docstring for what it returns)."""
    from transformers import masking_utils

    model_class = _model_class(kwargs.get("config"))
    _refuse_own_attention_models(model_class)
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    eager_masks = _masks_alone_give_causality(model_class)
    if eager_masks:
        # Eager's own additive mask, never skipped: the attention function adds it as a bias, so the
        # pattern comes from the mask alone, as in eager.
        allow_is_bidirectional_skip = False
    pattern_function, sequence_ids = _split_packed_sequences(mask_function, masking_utils)
    plain_offsets = isinstance(q_offset, int) and isinstance(kv_offset, int)
    # The pattern without its sliding window, which the attention function applies from the layer's
    # sliding_window; None when the mask function is some other pattern, or when the layers do not
    # hand their window to the attention function (the mask then carries it).
    pattern = pattern_function if local_size is None else None
    if local_size is not None and _layers_pass_sliding_window(model_class):
        if _same_mask_function(
            pattern_function, masking_utils.sliding_window_causal_mask_function(local_size)
        ):
            pattern = masking_utils.causal_mask_function
        elif _same_mask_function(
            pattern_function, masking_utils.sliding_window_bidirectional_mask_function(local_size)
        ):
            pattern = masking_utils.bidirectional_mask_function
    bidirectional = pattern is masking_utils.bidirectional_mask_function
    causal_bottom_right = (
        pattern is masking_utils.causal_mask_function
        and plain_offsets
        and q_offset - kv_offset == kv_length - q_length
        # A caller that forbids skipping wants a materialized (Sq, Sk) pattern, e.g. to concatenate it.
        and (allow_is_causal_skip or q_length == 1)
    )
    plain_pattern = (bidirectional or causal_bottom_right) and not use_vmap and not eager_masks
    if sequence_ids is not None and attention_mask is None and plain_pattern:
        return sequence_ids  # (B, T): the attention function runs the documents as packed sequences
    if sequence_ids is not None or not plain_pattern:
        transformers_mask = masking_utils.eager_mask if eager_masks else masking_utils.sdpa_mask
        return transformers_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=allow_is_causal_skip,
            allow_is_bidirectional_skip=allow_is_bidirectional_skip,
            use_vmap=use_vmap,
            local_size=local_size,
            **kwargs,
        )
    device = kwargs.get("device", "cpu")
    keys = _keys_visible(attention_mask, batch_size, kv_length, kv_offset)  # (B, Sk) or None
    # Reading the mask's values syncs with the device, as SDPA's mask skipping does; never while tracing.
    no_padding = keys is None or (not _is_tracing() and bool(keys.all()))
    if no_padding:
        if bidirectional and allow_is_bidirectional_skip:
            return None
        if causal_bottom_right and allow_is_causal_skip and q_length in (1, kv_length):
            return None
    if keys is None:
        keys = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    if bidirectional:
        return keys[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
    return keys[:, None, None, :]


def register() -> str:
    """Register "fast_attn" with transformers (attention and mask functions); idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .transformers_paged import PAGED_IMPLEMENTATION_NAME, paged_attention_forward

    AttentionInterface.register(IMPLEMENTATION_NAME, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, build_attention_mask)
    AttentionInterface.register(PAGED_IMPLEMENTATION_NAME, paged_attention_forward)  # continuous batching
    return IMPLEMENTATION_NAME
