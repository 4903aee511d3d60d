"""A T5 encoder-decoder on fast_attn.

T5 layers: RMSNorm before each sublayer, no scaling of q.k (scale 1.0), and a
learned relative position bias, computed once per stack from bucketed
relative positions, shared by all its layers and passed to the kernel as a
(1, H, Sq, Sk) bias whose gradient flows back to the bucket embedding.
Decoder layers add causal self-attention and cross-attention to the encoder.
T5.from_hf(T5ForConditionalGeneration) takes transformers' weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import Attention
from ..nn.kv_cache import KVCache
from .hf_weights import WeightLink, config_from_hf, hf_field, load_from_hf
from .layers import RMSNorm, activation


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    num_heads: int = 8
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # default num_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = hf_field(0.1, "dropout_rate")
    layer_norm_eps: float = hf_field(1e-6, "layer_norm_epsilon")
    feed_forward: str = hf_field("relu", "feed_forward_proj")  # "act" or "gated-act" (T5 v1.1: "gated-gelu")
    scale_decoder_outputs: bool = True  # multiply by d_model ** -0.5 before the tied LM head (original T5)
    tie_word_embeddings: bool = True
    decoder_start_token_id: int = 0

    @classmethod
    def from_hf(cls, hf_config) -> T5Config:
        """The config of a transformers T5Config."""
        scale_outputs = getattr(hf_config, "scale_decoder_outputs", hf_config.tie_word_embeddings)
        return config_from_hf(
            cls,
            hf_config,
            scale_decoder_outputs=bool(scale_outputs),
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        )


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position), int64.

    Half the buckets (per direction when bidirectional) hold the small distances
    exactly; the other half cover distances up to max_distance on a log scale,
    and farther ones share the last bucket. Unidirectional (decoder) attention
    only distinguishes keys in the past; future keys fall in bucket 0.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    # Computed in float32 in this order, as the checkpoints were trained with; distance 0 is
    # clamped away from log(0), and only distances >= exact use this value.
    log_fraction = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_fraction * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative-position bucket: (Sq, Sk) positions -> (1, H, Sq, Sk)."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, seqlen_q: int, seqlen_k: int, query_offset: int = 0) -> torch.Tensor:
        """Queries at positions query_offset + [0, Sq), keys at [0, Sk)."""
        device = self.embedding.weight.device
        query_positions = torch.arange(seqlen_q, device=device)[:, None] + query_offset
        key_positions = torch.arange(seqlen_k, device=device)[None, :]
        buckets = relative_position_bucket(
            key_positions - query_positions,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # (Sq, Sk)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, Sq, Sk)


class T5FeedForward(nn.Module):
    """wo(act(wi(x))), or wo(act(wi_0(x)) * wi_1(x)) when gated (T5 v1.1)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        parts = config.feed_forward.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward must be 'ACT' or 'gated-ACT', got {config.feed_forward!r}")
        self.gated = len(parts) == 2
        # transformers maps "gated-gelu" to the tanh approximation (gelu_new).
        act_name = "gelu_new" if config.feed_forward == "gated-gelu" else parts[-1]
        self.act = activation(act_name)
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        if self.gated:
            self.wi_gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.wi(x))
        if self.gated:
            hidden = hidden * self.wi_gate(x)
        return self.wo(self.dropout(hidden).to(self.wo.weight.dtype))


class T5Block(nn.Module):
    """Self-attention (causal in the decoder), cross-attention (decoder only), feed-forward; RMSNorm first."""

    def __init__(self, config: T5Config, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        width, heads, head_dim = config.d_model, config.num_heads, config.d_kv
        # No 1/sqrt(d) scaling: T5 folds it into the initialization of q.
        common = {"head_dim": head_dim, "bias": False, "scale": 1.0, "dropout": config.dropout}
        self.self_norm = RMSNorm(width, config.layer_norm_eps)
        self.self_attn = Attention(width, heads, causal=is_decoder, **common)
        if is_decoder:
            self.cross_norm = RMSNorm(width, config.layer_norm_eps)
            self.cross_attn = Attention(width, heads, cross_attention=True, **common)
        self.ff_norm = RMSNorm(width, config.layer_norm_eps)
        self.ff = T5FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        position_bias: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        encoder_states: torch.Tensor | None = None,
        encoder_key_mask: torch.Tensor | None = None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, S, d_model); position_bias (1, H, S, Sk); masks bool (B, keys), True = attend."""
        attended = self.self_attn(self.self_norm(x), bias=position_bias, key_mask=key_mask, cache=self_cache)
        x = x + self.dropout(attended)
        if self.is_decoder:
            attended = self.cross_attn(
                self.cross_norm(x), encoder_states, key_mask=encoder_key_mask, cache=cross_cache
            )
            x = x + self.dropout(attended)
        return x + self.dropout(self.ff(self.ff_norm(x)))


class T5Stack(nn.Module):
    """The encoder or the decoder: T5Blocks sharing one relative position bias, then a final RMSNorm."""

    def __init__(self, config: T5Config, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        num_layers = (config.num_decoder_layers or config.num_layers) if is_decoder else config.num_layers
        self.position_bias = RelativePositionBias(
            config.num_heads,
            config.relative_attention_num_buckets,
            config.relative_attention_max_distance,
            bidirectional=not is_decoder,
        )
        self.blocks = nn.ModuleList(T5Block(config, is_decoder) for _ in range(num_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        encoder_states: torch.Tensor | None = None,
        encoder_key_mask: torch.Tensor | None = None,
        caches: list[tuple[KVCache, KVCache]] | None = None,
    ) -> torch.Tensor:
        """x: embedded tokens (B, S, d_model); caches: (self, cross) per decoder block."""
        past = caches[0][0].length if caches else 0
        position_bias = self.position_bias(x.shape[1], past + x.shape[1], query_offset=past)  # (1, H, S, Sk)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            self_cache, cross_cache = caches[i] if caches else (None, None)
            x = block(x, position_bias, key_mask, encoder_states, encoder_key_mask, self_cache, cross_cache)
        return self.dropout(self.final_norm(x))


class T5(nn.Module):
    """T5 for conditional generation: shared embedding, encoder, decoder, LM head."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids -> (B, S, d_model); attention_mask nonzero = real token."""
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        return self.encoder(self.shared(input_ids), key_mask=key_mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        caches: list[tuple[KVCache, KVCache]] | None = None,
    ) -> torch.Tensor:
        """Decoder tokens (B, T) -> logits (B, T, vocab). attention_mask: the encoder's padding."""
        encoder_key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        key_mask = None if decoder_attention_mask is None else decoder_attention_mask.to(torch.bool)
        x = self.decoder(self.shared(decoder_input_ids), key_mask, encoder_states, encoder_key_mask, caches)
        if self.config.scale_decoder_outputs:
            x = x * self.config.d_model**-0.5
        head = self.shared.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(x, head)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) of the decoder tokens given the encoder tokens."""
        encoder_states = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_states, attention_mask, decoder_attention_mask)

    def new_caches(self, batch: int, max_length: int, encoder_length: int) -> list[tuple[KVCache, KVCache]]:
        """(self-attention, cross-attention) caches for each decoder block."""
        return [
            (block.self_attn.new_cache(batch, max_length), block.cross_attn.new_cache(batch, encoder_length))
            for block in self.decoder.blocks
        ]

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Greedy decoding: (B, S) encoder tokens -> (B, 1 + max_new_tokens) decoder tokens (start token first)."""
        batch = input_ids.shape[0]
        encoder_states = self.encode(input_ids, attention_mask)
        caches = self.new_caches(batch, 1 + max_new_tokens, input_ids.shape[1])
        tokens = torch.full(
            (batch, 1), self.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device
        )
        step_ids = tokens
        for _ in range(max_new_tokens):
            logits = self.decode(step_ids, encoder_states, attention_mask, caches=caches)
            step_ids = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens = torch.cat([tokens, step_ids], dim=1)
        return tokens

    def hf_links(self) -> list[WeightLink]:
        """Where each parameter lives in a transformers T5ForConditionalGeneration."""
        links = [WeightLink("shared.weight", ("shared.weight",))]
        if not self.config.tie_word_embeddings:
            links.append(WeightLink("lm_head.weight", ("lm_head.weight",)))
        for stack_name in ("encoder", "decoder"):
            stack = getattr(self, stack_name)
            links.append(
                WeightLink(
                    f"{stack_name}.position_bias.embedding.weight",
                    (f"{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
                )
            )
            for i, block in enumerate(stack.blocks):
                ours, theirs = f"{stack_name}.blocks.{i}.", f"{stack_name}.block.{i}.layer."
                links += _t5_attention_links(ours + "self_attn", theirs + "0.SelfAttention", cross=False)
                links.append(WeightLink(ours + "self_norm.weight", (theirs + "0.layer_norm.weight",)))
                ff_layer = "1"
                if block.is_decoder:
                    links += _t5_attention_links(
                        ours + "cross_attn", theirs + "1.EncDecAttention", cross=True
                    )
                    links.append(WeightLink(ours + "cross_norm.weight", (theirs + "1.layer_norm.weight",)))
                    ff_layer = "2"
                ff = f"{theirs}{ff_layer}.DenseReluDense."
                if block.ff.gated:
                    links += [
                        WeightLink(ours + "ff.wi.weight", (ff + "wi_0.weight",)),
                        WeightLink(ours + "ff.wi_gate.weight", (ff + "wi_1.weight",)),
                    ]
                else:
                    links.append(WeightLink(ours + "ff.wi.weight", (ff + "wi.weight",)))
                links += [
                    WeightLink(ours + "ff.wo.weight", (ff + "wo.weight",)),
                    WeightLink(ours + "ff_norm.weight", (f"{theirs}{ff_layer}.layer_norm.weight",)),
                ]
            links.append(
                WeightLink(f"{stack_name}.final_norm.weight", (f"{stack_name}.final_layer_norm.weight",))
            )
        return links

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> T5:
        """A T5 with the weights of a transformers T5ForConditionalGeneration (its dtype and device)."""
        config = T5Config.from_hf(hf_model.config)
        lm_head = getattr(hf_model, "lm_head", None)
        if lm_head is None:
            raise ValueError(f"T5.from_hf needs a T5ForConditionalGeneration, got {type(hf_model).__name__}")
        config.tie_word_embeddings = lm_head.weight is hf_model.shared.weight
        model = cls(config)
        weight = hf_model.shared.weight
        model.to(device=weight.device, dtype=weight.dtype)
        load_from_hf(model, hf_model, model.hf_links())
        return model.train(hf_model.training)


def _t5_attention_links(ours: str, theirs: str, cross: bool) -> list[WeightLink]:
    q, k, v, o = (f"{theirs}.{name}.weight" for name in "qkvo")
    if cross:
        projections = [
            WeightLink(ours + ".q_proj.weight", (q,)),
            WeightLink(ours + ".kv_proj.weight", (k, v)),
        ]
    else:
        projections = [WeightLink(ours + ".qkv_proj.weight", (q, k, v))]
    return projections + [WeightLink(ours + ".out_proj.weight", (o,))]
