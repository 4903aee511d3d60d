"""GPT-2, BERT and T5 style models built on fast_attn, loadable from transformers (`from_hf`)."""

from .bert import BertConfig, BertEncoder, BertLayer
from .gpt import GPT, GPTBlock, GPTConfig
from .t5 import T5, T5Block, T5Config, T5Stack

__all__ = [
    "GPT",
    "T5",
    "BertConfig",
    "BertEncoder",
    "BertLayer",
    "GPTBlock",
    "GPTConfig",
    "T5Block",
    "T5Config",
    "T5Stack",
]
