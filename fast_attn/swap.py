"""swap_attention: switch the attention of an existing model to fast_attn, in place.

    report = fast_attn.swap_attention(model)
    print(report)

* Every torch.nn.MultiheadAttention becomes a fast_attn.nn.MultiheadAttention:
  the same object, keeping its parameters, buffers, hooks and references
  (only its class changes; the fast_attn class is a subclass that adds no
  state and replaces `forward`), so optimizers built before the swap still
  hold the right parameters.
* nn.TransformerEncoderLayer / nn.TransformerEncoder have an inference fast
  path that calls torch's fused kernel directly instead of `self_attn`. It is
  turned off for the swapped layers (a no-op forward pre-hook on `self_attn`
  is one of the documented conditions that disable it, and the encoder's
  nested-tensor conversion is switched off with it), so every call reaches
  fast_attn; pass keep_torch_fastpath=True to leave torch's path in place.
* A transformers model is switched to the "fast_attn" attention
  implementation (registered on the way), and so is every transformers
  submodel with its own config: T5's encoder and decoder stacks, which
  `set_attn_implementation` on the outer model does not reach.

What cannot be swapped safely is refused with a SwapError naming the module,
before anything is changed.

The swap changes which kernel runs, not what is computed: outputs match the
previous implementation within rounding, except for query rows that see no
key (e.g. left padding under a causal mask): fast_attn gives them 0, where
some of torch's paths give NaN and transformers' eager attention averages
every key. Those rows are padding and nothing reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .nn.multihead_attention import MultiheadAttention as FastMultiheadAttention


class SwapError(ValueError):
    """A module of the model cannot be switched to fast_attn (the message names it)."""


@dataclass
class SwapReport:
    """What swap_attention changed (module names as in model.named_modules(); "" is the model itself)."""

    multihead_attention: list[str] = field(default_factory=list)
    transformers_models: list[str] = field(default_factory=list)  # "name: previous -> fast_attn"
    torch_fastpath_disabled: list[str] = field(default_factory=list)
    already_fast_attn: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["swap_attention:"]
        sections = (
            ("nn.MultiheadAttention -> fast_attn", self.multihead_attention),
            ("transformers attention implementation", self.transformers_models),
            ("torch encoder fast path disabled", self.torch_fastpath_disabled),
            ("already on fast_attn", self.already_fast_attn),
        )
        for title, names in sections:
            if names:
                lines.append(f"  {title} ({len(names)}):")
                lines += [f"    {name or '<model>'}" for name in names]
        return "\n".join(lines)


def _route_to_fast_attn(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence turns off torch's encoder-layer fast path."""


def _transformers_pretrained_class():
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return PreTrainedModel


@dataclass
class _Plan:
    multihead: list[tuple[str, nn.Module]] = field(default_factory=list)
    encoder_layers: list[tuple[str, nn.Module]] = field(default_factory=list)
    encoders: list[tuple[str, nn.Module]] = field(default_factory=list)
    hf_models: list[tuple[str, nn.Module, str]] = field(default_factory=list)  # (name, model, previous)
    already: list[str] = field(default_factory=list)


def _plan(model: nn.Module) -> _Plan:
    """Find what to swap; raise SwapError for what cannot be swapped (nothing is changed yet)."""
    pretrained = _transformers_pretrained_class()
    plan = _Plan()
    seen_configs: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, FastMultiheadAttention):
            plan.already.append(name)
        elif type(module) is nn.MultiheadAttention:
            plan.multihead.append((name, module))
        elif isinstance(module, nn.MultiheadAttention):
            raise SwapError(
                f"{name or '<model>'}: {type(module).__qualname__} subclasses torch.nn.MultiheadAttention with "
                f"its own code; swap_attention only replaces torch.nn.MultiheadAttention itself"
            )
        elif pretrained is not None and isinstance(module, pretrained):
            if id(module.config) in seen_configs:
                continue  # e.g. the GPT2Model inside GPT2LMHeadModel shares its config
            seen_configs.add(id(module.config))
            if module.config._attn_implementation == "fast_attn":
                plan.already.append(name)
            elif not getattr(module, "_can_set_attn_implementation", lambda: True)():
                raise SwapError(
                    f"{name or '<model>'}: transformers model {type(module).__name__} does not route its attention "
                    f"through transformers' AttentionInterface, so its attention cannot be switched"
                )
            else:
                plan.hf_models.append((name, module, module.config._attn_implementation))
        if isinstance(module, nn.TransformerEncoderLayer):
            plan.encoder_layers.append((name, module))
        if isinstance(module, nn.TransformerEncoder):
            plan.encoders.append((name, module))
    if not (plan.multihead or plan.hf_models or plan.already):
        raise SwapError(
            f"{type(model).__name__} holds no torch.nn.MultiheadAttention and no transformers model: "
            f"nothing to swap"
        )
    return plan


def swap_attention(model: nn.Module, *, keep_torch_fastpath: bool = False) -> SwapReport:
    """Switch every attention of `model` that fast_attn can run to fast_attn, in place (see module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention takes a torch.nn.Module, got {type(model).__name__}")
    plan = _plan(model)
    report = SwapReport(already_fast_attn=plan.already)

    for name, module in plan.multihead:
        # The fast_attn class adds no state: changing the class keeps the object, parameters and hooks.
        module.__class__ = FastMultiheadAttention
        report.multihead_attention.append(name)

    if not keep_torch_fastpath:
        for name, layer in plan.encoder_layers:
            attn = layer.self_attn
            if (
                isinstance(attn, FastMultiheadAttention)
                and _route_to_fast_attn not in attn._forward_pre_hooks.values()
            ):
                attn.register_forward_pre_hook(_route_to_fast_attn)
                report.torch_fastpath_disabled.append(name)
        for name, encoder in plan.encoders:
            layers = list(encoder.layers)
            if (
                layers
                and isinstance(layers[0].self_attn, FastMultiheadAttention)
                and encoder.use_nested_tensor
            ):
                # Nested-tensor inputs would bypass the layers' self_attn (and fast_attn takes dense tensors).
                encoder.use_nested_tensor = False
                report.torch_fastpath_disabled.append(name)

    if plan.hf_models:
        from .integrations.transformers import IMPLEMENTATION_NAME, register

        register()
        for name, module, previous in plan.hf_models:
            module.set_attn_implementation(IMPLEMENTATION_NAME)
            if module.config._attn_implementation != IMPLEMENTATION_NAME:
                raise SwapError(
                    f"{name or '<model>'}: {type(module).__name__} kept attention implementation "
                    f"{module.config._attn_implementation!r} after set_attn_implementation('fast_attn')"
                )
            report.transformers_models.append(f"{name or '<model>'}: {previous} -> {IMPLEMENTATION_NAME}")
    return report


__all__ = ["SwapError", "SwapReport", "swap_attention"]
