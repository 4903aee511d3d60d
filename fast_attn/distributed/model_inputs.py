"""A transformers model's batch cut for context parallelism.

    inputs = shard_model_inputs(input_ids, labels, group=group)      # this rank's part, and how to run it
    loss = model(**inputs).loss          # model with attn_implementation="fast_attn"
    loss.backward()                      # then sum the gradients over the group (DDP/FSDP do)

The `context_parallel` entry of the inputs reaches every attention layer (transformers hands a model's
keyword arguments down to its attention function), where fast_attn's transformers integration runs
context_parallel_attention on the layer's shards; nothing global is switched, so gradient
checkpointing's recomputation runs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..validation import validate_backend_name
from .attention import MODES
from .layout import check_layout, shard_sequence

IGNORE_INDEX = -100  # the label transformers' losses skip


@dataclass(frozen=True)
class ContextParallel:
    """How the attention layers of a model run over a sharded sequence: context_parallel_attention's
    group, mode, layout and backend."""

    group: dist.ProcessGroup | None = None
    mode: str = "ring"
    layout: str = "zigzag"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_layout(self.layout)
        validate_backend_name(self.backend)


def shard_model_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    mode: str = "ring",
    layout: str = "zigzag",
    backend: str = "auto",
) -> dict:
    """This rank's part of a causal LM's batch, as keyword arguments of the model's forward.

    input_ids, labels: (B, S) of the whole sequences (the same on every rank; S a multiple of world, or
    of 2 * world for zigzag). Returns:
      input_ids, position_ids (B, S_local): this rank's tokens and their positions in the whole
          sequence, so that rotary embeddings see the true positions;
      attention_mask (B, S_local) of ones: no padding (it also keeps transformers from reading the
          jumps of zigzag positions as packed documents, which it does when no mask is given);
      context_parallel: the ContextParallel the attention layers run with;
      with labels, labels and shift_labels: this rank's part of the labels shifted over the whole
          sequence (position i predicts token i + 1; the last predicts nothing), and
          num_items_in_batch: the labelled tokens of the whole batch, so that the model's loss is this
          rank's share of the mean over them: their sum over the ranks is the loss of the whole batch.
    """
    context = ContextParallel(group=group, mode=mode, layout=layout, backend=backend)
    batch, seqlen = input_ids.shape
    positions = torch.arange(seqlen, device=input_ids.device).expand(batch, seqlen)
    local_ids = shard_sequence(input_ids, 1, group=group, layout=layout)
    inputs = {
        "input_ids": local_ids,
        "position_ids": shard_sequence(positions, 1, group=group, layout=layout),
        "attention_mask": torch.ones_like(local_ids),
        "context_parallel": context,
    }
    if labels is not None:
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, S)
        local_labels = shard_sequence(shifted, 1, group=group, layout=layout)
        inputs |= {
            "labels": local_labels,  # the model computes its loss when given labels; shift_labels says which
            "shift_labels": local_labels,
            "num_items_in_batch": (shifted != IGNORE_INDEX).sum(),
        }
    return inputs
