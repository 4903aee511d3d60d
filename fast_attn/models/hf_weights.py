"""Moving configs and weights between our models and transformers' ones.

A config field reads transformers' config attribute of its own name, or the one
`hf_field` names (config_from_hf).

A model lists its WeightLinks: which transformers parameters make up each of
ours. Several are concatenated along dim 0 (the fused q/k/v projection is
[W_q; W_k; W_v]); GPT-2's Conv1D stores (in, out) and is transposed. The same
links map anything shaped like our parameters (their gradients, say) back to
transformers' names, which is how the tests compare gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn


def hf_field(default, hf_name: str):
    """A config field that transformers' config holds under another name, `hf_name`."""
    return field(default=default, metadata={"hf_name": hf_name})


def config_from_hf(config_class, hf_config, **values):
    """A `config_class` (a dataclass) with each field read from transformers' `hf_config`
    under its own name or its hf_field name, but for those `values` give."""
    read = {
        f.name: getattr(hf_config, f.metadata.get("hf_name", f.name))
        for f in fields(config_class)
        if f.name not in values
    }
    return config_class(**read, **values)


@dataclass(frozen=True)
class WeightLink:
    ours: str  # our parameter's name
    theirs: tuple[str, ...]  # transformers parameters, concatenated along dim 0 in this order
    transposed: bool = False  # transformers stores them (in, out) (GPT-2's Conv1D)


def weight_and_bias(ours: str, theirs: str, transposed: bool = False) -> list[WeightLink]:
    """The links of one module's weight and bias (transposed: the weight, as GPT-2's Conv1D stores it)."""
    return [
        WeightLink(f"{ours}.weight", (f"{theirs}.weight",), transposed),
        WeightLink(f"{ours}.bias", (f"{theirs}.bias",)),
    ]


def _their_tensors(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters lists a tied weight once, under its first name, like the links do.
    return dict(hf_model.named_parameters())


def check_links_cover(model: nn.Module, hf_model: nn.Module, links: list[WeightLink]) -> None:
    """Raise unless the links name each of our parameters and each of theirs exactly once."""
    ours = [link.ours for link in links]
    theirs = [name for link in links for name in link.theirs]
    our_params = set(dict(model.named_parameters()))
    their_params = set(_their_tensors(hf_model))
    problems = []
    if sorted(ours) != sorted(our_params):
        problems.append(f"our parameters not linked: {sorted(our_params - set(ours))}")
    if sorted(theirs) != sorted(their_params):
        unused = sorted(their_params - set(theirs))
        missing = sorted(set(theirs) - their_params)
        if unused:
            problems.append(f"transformers parameters this model has no place for: {unused}")
        if missing:
            problems.append(f"transformers parameters expected but absent: {missing}")
    if problems:
        raise ValueError(
            f"cannot load {type(hf_model).__name__} into {type(model).__name__}: " + "; ".join(problems)
        )


def load_from_hf(model: nn.Module, hf_model: nn.Module, links: list[WeightLink]) -> None:
    """Copy transformers' weights into `model` (converted to our parameters' dtype and device)."""
    check_links_cover(model, hf_model, links)
    theirs = _their_tensors(hf_model)
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for link in links:
            parts = [theirs[name].t() if link.transposed else theirs[name] for name in link.theirs]
            source = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            target = ours[link.ours]
            if source.shape != target.shape:
                raise ValueError(
                    f"{link.ours}: transformers' {list(link.theirs)} give shape {tuple(source.shape)}, "
                    f"ours is {tuple(target.shape)}"
                )
            target.copy_(source)


def to_hf_names(
    tensors: dict[str, torch.Tensor], hf_model: nn.Module, links: list[WeightLink]
) -> dict[str, torch.Tensor]:
    """Tensors shaped like our parameters (e.g. their gradients), split and renamed as transformers' ones."""
    shapes = {name: t.shape for name, t in _their_tensors(hf_model).items()}
    converted = {}
    for link in links:
        tensor = tensors[link.ours]
        sizes = [shapes[name][-1 if link.transposed else 0] for name in link.theirs]
        for name, part in zip(link.theirs, tensor.split(sizes, dim=0)):
            converted[name] = part.t() if link.transposed else part
    return converted
