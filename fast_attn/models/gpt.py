"""A GPT-2 style decoder-only model on fast_attn: pre-LayerNorm blocks, causal attention.

GPT.from_hf(GPT2LMHeadModel or GPT2Model) takes transformers' weights; the
tests hold outputs and every parameter gradient to the error of transformers'
own eager GPT-2 against float64. GPT.generate does greedy decoding with a KV
cache per layer (left-padded batches included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.attention import Attention
from ..nn.kv_cache import KVCache
from .hf_weights import WeightLink, config_from_hf, hf_field, load_from_hf, weight_and_bias
from .layers import MLP


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    max_positions: int = hf_field(1024, "n_positions")
    hidden_size: int = hf_field(768, "n_embd")
    num_layers: int = hf_field(12, "n_layer")
    num_heads: int = hf_field(12, "n_head")
    intermediate_size: int | None = hf_field(None, "n_inner")  # default 4 * hidden_size
    activation: str = hf_field("gelu_new", "activation_function")
    layer_norm_eps: float = hf_field(1e-5, "layer_norm_epsilon")
    embedding_dropout: float = hf_field(0.1, "embd_pdrop")
    residual_dropout: float = hf_field(0.1, "resid_pdrop")
    attention_dropout: float = hf_field(0.1, "attn_pdrop")
    scale_attn_weights: bool = True  # scores scaled by 1 / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # and by 1 / (layer index + 1)

    @classmethod
    def from_hf(cls, hf_config) -> GPTConfig:
        """The config of a transformers GPT2Config."""
        if getattr(hf_config, "add_cross_attention", False):
            raise ValueError("GPT does not implement GPT-2's cross-attention (add_cross_attention=True)")
        return config_from_hf(cls, hf_config)


class GPTBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)): pre-LayerNorm, causal self-attention."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        width = config.hidden_size
        head_dim = width // config.num_heads
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.ln_1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attn = Attention(
            width, config.num_heads, causal=True, dropout=config.attention_dropout, scale=scale
        )
        self.ln_2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MLP(width, config.intermediate_size or 4 * width, config.activation)
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """x (B, S, hidden); key_mask bool (B, cached + S), True = attend."""
        x = x + self.dropout(self.attn(self.ln_1(x), key_mask=key_mask, cache=cache))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """Token + position embeddings, GPTBlocks, a final LayerNorm, an LM head tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_positions, config.hidden_size)
        self.dropout = nn.Dropout(config.embedding_dropout)
        self.blocks = nn.ModuleList(GPTBlock(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, S, vocab).

        attention_mask: (B, cached + S), nonzero = real token (transformers' meaning), applied as a key mask.
        position_ids: (B or 1, S), default counts on from the cached length.
        caches: one KVCache per block (see new_caches) for incremental decoding.
        """
        past = caches[0].length if caches else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        x = self.dropout(self.wte(input_ids) + self.wpe(position_ids))  # (B, S, hidden)
        for i, block in enumerate(self.blocks):
            x = block(x, key_mask=key_mask, cache=caches[i] if caches else None)
        return self.ln_f(x) @ self.wte.weight.t()  # (B, S, vocab)

    def new_caches(self, batch: int, max_length: int) -> list[KVCache]:
        return [block.attn.new_cache(batch, max_length) for block in self.blocks]

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Greedy decoding: (B, S) prompt -> (B, S + max_new_tokens). Left padding via attention_mask."""
        batch, prompt_length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Positions count real tokens only, so left padding does not shift them (as transformers does).
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        caches = self.new_caches(batch, prompt_length + max_new_tokens)
        tokens, step_ids = input_ids, input_ids
        for _ in range(max_new_tokens):
            logits = self(step_ids, attention_mask=attention_mask, position_ids=position_ids, caches=caches)
            step_ids = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens = torch.cat([tokens, step_ids], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
        return tokens

    def hf_links(self) -> list[WeightLink]:
        """Where each parameter lives in a transformers GPT2LMHeadModel / GPT2Model."""
        links = [WeightLink("wte.weight", ("wte.weight",)), WeightLink("wpe.weight", ("wpe.weight",))]
        for i in range(len(self.blocks)):
            ours, theirs = f"blocks.{i}.", f"h.{i}."
            # (ours, theirs, transposed): transformers' Conv1D modules store their weight (in, out).
            modules = [
                ("ln_1", "ln_1", False),
                ("attn.qkv_proj", "attn.c_attn", True),
                ("attn.out_proj", "attn.c_proj", True),
                ("ln_2", "ln_2", False),
                ("mlp.fc_in", "mlp.c_fc", True),
                ("mlp.fc_out", "mlp.c_proj", True),
            ]
            for a, b, transposed in modules:
                links += weight_and_bias(ours + a, theirs + b, transposed)
        links += weight_and_bias("ln_f", "ln_f")
        return links

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> GPT:
        """A GPT with the weights of a transformers GPT2LMHeadModel or GPT2Model (its dtype and device)."""
        transformer = getattr(hf_model, "transformer", hf_model)
        lm_head = getattr(hf_model, "lm_head", None)
        if lm_head is not None and lm_head.weight is not transformer.wte.weight:
            raise ValueError("GPT ties its LM head to the token embedding; this GPT-2 has an untied lm_head")
        model = cls(GPTConfig.from_hf(hf_model.config))
        weight = transformer.wte.weight
        model.to(device=weight.device, dtype=weight.dtype)
        load_from_hf(model, transformer, model.hf_links())
        return model.train(hf_model.training)
