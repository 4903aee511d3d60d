"""A BERT encoder on fast_attn: post-LayerNorm layers, bidirectional attention with a padding mask.

BertEncoder is the embeddings plus the layers (transformers' BertModel without
the pooler); BertEncoder.from_hf(BertModel or a model holding one as `.bert`)
takes transformers' weights. Padding reaches the kernel as a key mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.attention import Attention
from .hf_weights import WeightLink, config_from_hf, hf_field, load_from_hf, weight_and_bias
from .layers import activation


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = hf_field(12, "num_hidden_layers")
    num_heads: int = hf_field(12, "num_attention_heads")
    intermediate_size: int = 3072
    activation: str = hf_field("gelu", "hidden_act")
    max_positions: int = hf_field(512, "max_position_embeddings")
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = hf_field(0.1, "hidden_dropout_prob")
    attention_dropout: float = hf_field(0.1, "attention_probs_dropout_prob")

    @classmethod
    def from_hf(cls, hf_config) -> BertConfig:
        """The config of a transformers BertConfig (an encoder: is_decoder must be False)."""
        if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
            raise ValueError("BertEncoder is an encoder; this BertConfig is a decoder / has cross-attention")
        return config_from_hf(cls, hf_config)


class BertLayer(nn.Module):
    """x = LN(x + attn(x)); x = LN(x + ffn(x)): post-LayerNorm, bidirectional attention."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.attn = Attention(width, config.num_heads, dropout=config.attention_dropout)
        self.attn_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(width, config.intermediate_size)
        self.act = activation(config.activation)
        self.fc_out = nn.Linear(config.intermediate_size, width)
        self.ffn_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, hidden); key_mask bool (B, S), True = real token."""
        x = self.attn_norm(x + self.dropout(self.attn(x, key_mask=key_mask)))
        return self.ffn_norm(x + self.dropout(self.fc_out(self.act(self.fc_in(x)))))


class BertEncoder(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, then BertLayers: (B, S) ids -> (B, S, hidden)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, width)
        self.position_embeddings = nn.Embedding(config.max_positions, width)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        self.embedding_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attention_mask (B, S): nonzero = real token (transformers' meaning), applied as a key mask."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = self.dropout(self.embedding_norm(x + self.position_embeddings(positions)))  # (B, S, hidden)
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        for layer in self.layers:
            x = layer(x, key_mask=key_mask)
        return x

    def hf_links(self) -> list[WeightLink]:
        """Where each parameter lives in a transformers BertModel (built with add_pooling_layer=False)."""
        links = [
            WeightLink("word_embeddings.weight", ("embeddings.word_embeddings.weight",)),
            WeightLink("position_embeddings.weight", ("embeddings.position_embeddings.weight",)),
            WeightLink("token_type_embeddings.weight", ("embeddings.token_type_embeddings.weight",)),
            *weight_and_bias("embedding_norm", "embeddings.LayerNorm"),
        ]
        for i in range(len(self.layers)):
            ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
            qkv = tuple(f"{theirs}attention.self.{name}" for name in ("query", "key", "value"))
            links += [
                WeightLink(ours + "attn.qkv_proj.weight", tuple(n + ".weight" for n in qkv)),
                WeightLink(ours + "attn.qkv_proj.bias", tuple(n + ".bias" for n in qkv)),
            ]
            pairs = [
                ("attn.out_proj", "attention.output.dense"),
                ("attn_norm", "attention.output.LayerNorm"),
                ("fc_in", "intermediate.dense"),
                ("fc_out", "output.dense"),
                ("ffn_norm", "output.LayerNorm"),
            ]
            for a, b in pairs:
                links += weight_and_bias(ours + a, theirs + b)
        return links

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> BertEncoder:
        """A BertEncoder with the weights of a transformers BertModel (or a model holding one as `.bert`).

        The pooler, if any, is not part of the encoder and is ignored.
        """
        bert = getattr(hf_model, "bert", hf_model)
        model = cls(BertConfig.from_hf(bert.config))
        weight = bert.embeddings.word_embeddings.weight
        model.to(device=weight.device, dtype=weight.dtype)
        pooler = getattr(bert, "pooler", None)
        source = bert if pooler is None else _WithoutPooler(bert)
        load_from_hf(model, source, model.hf_links())
        return model.train(hf_model.training)


class _WithoutPooler(nn.Module):
    """A view of a BertModel's embeddings and encoder only (what BertEncoder holds)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.embeddings = bert.embeddings
        self.encoder = bert.encoder
