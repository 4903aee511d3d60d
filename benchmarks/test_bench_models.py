"""End-to-end model benchmarks: transformers' GPT-2, BERT and T5, and the score-modifier
models Mistral (sliding window), Gemma 2 (window and softcap) and gpt-oss (window and
sinks), with attention implementation "fast_attn" vs "sdpa" vs "eager" (where the
model accepts it: gpt-oss refuses "sdpa"; Gemma 2 takes it in transformers 5.18 but then
drops its softcap, so that row times a different computation), measured in the same run.

    pytest benchmarks/test_bench_models.py --benchmark-group-by=group
    pytest benchmarks/test_bench_models.py --benchmark-json=benchmarks/results/models-<card>-<date>.json

Two workloads per model: a training step (forward + backward of the LM /
masked loss, no optimizer) and greedy generation with the KV cache (GPT-2 and
T5; BERT is an encoder). Each group holds the three implementations of one
(model, workload), so pytest-benchmark's table compares them directly.

Sizes depend on the device: on a GPU they are the models' real shapes in
bfloat16 (GPT-2 small at 1024 tokens, BERT-base at 512, T5-small at 512/128,
about 8k tokens per step; 64 generated tokens after 512-token prompts); on a
CPU they are small float32 models that run in seconds. Weights are random
(no download): attention cost does not depend on the values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from fast_attn.integrations.transformers import register

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
IMPLEMENTATIONS = ["fast_attn", "sdpa", "eager"]
VOCAB = 32000 if ON_GPU else 1000


@dataclass(frozen=True)
class Workload:
    batch: int
    seqlen: int  # tokens per training sequence (the encoder's for T5)
    target_len: int  # T5's decoder tokens in training
    prompt_len: int
    new_tokens: int
    rounds: int


# GPU: about 8k tokens per training step, each model at its usual context length; generation of
# 64 tokens after a 512-token prompt. Few rounds: the whole file must fit a short GPU session
# (about 3 minutes on an H100, model construction included).
WORKLOADS = (
    {
        "gpt2": Workload(batch=8, seqlen=1024, target_len=0, prompt_len=512, new_tokens=64, rounds=5),
        "bert": Workload(batch=16, seqlen=512, target_len=0, prompt_len=0, new_tokens=0, rounds=5),
        "t5": Workload(batch=16, seqlen=512, target_len=128, prompt_len=512, new_tokens=64, rounds=5),
        **{
            kind: Workload(batch=4, seqlen=2048, target_len=0, prompt_len=512, new_tokens=64, rounds=5)
            for kind in ("mistral", "gemma2", "gpt_oss")
        },
    }
    if ON_GPU
    else {
        "gpt2": Workload(batch=4, seqlen=128, target_len=0, prompt_len=32, new_tokens=16, rounds=3),
        "bert": Workload(batch=4, seqlen=128, target_len=0, prompt_len=0, new_tokens=0, rounds=3),
        "t5": Workload(batch=4, seqlen=128, target_len=32, prompt_len=32, new_tokens=16, rounds=3),
        **{
            kind: Workload(batch=2, seqlen=256, target_len=0, prompt_len=64, new_tokens=16, rounds=3)
            for kind in ("mistral", "gemma2", "gpt_oss")
        },
    }
)
DECODERS = ("mistral", "gemma2", "gpt_oss")


def decoder_config(kind: str):
    """A Mistral / Gemma 2 / gpt-oss decoder whose sliding window covers a quarter of the sequence."""
    hidden, layers, heads, kv_heads = (1024, 8, 16, 4) if ON_GPU else (128, 2, 4, 2)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "sliding_window": WORKLOADS[kind].seqlen // 4,
        "max_position_embeddings": 4096,
        "attention_dropout": 0.0,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": None,
    }
    if kind == "mistral":
        return transformers.MistralConfig(**common)
    if kind == "gemma2":
        return transformers.Gemma2Config(**common, query_pre_attn_scalar=hidden // heads)
    return transformers.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2)


def config(kind: str):
    if kind in DECODERS:
        return decoder_config(kind)
    size_names = {
        "gpt2": ("n_embd", "n_layer", "n_head", "n_positions"),
        "bert": (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ),
        "t5": ("d_model", "d_kv", "num_heads", "d_ff", "num_layers"),
    }[kind]
    # (on a GPU: the real sizes of GPT-2 small, BERT-base and T5-small; on the CPU: small ones)
    gpu_sizes, cpu_sizes = {
        "gpt2": ((768, 12, 12, 1024), (128, 2, 4, 256)),
        "bert": ((768, 12, 12, 3072, 512), (128, 2, 4, 256, 256)),
        "t5": ((512, 64, 8, 2048, 6), (128, 32, 4, 256, 2)),
    }[kind]
    sizes = dict(zip(size_names, gpu_sizes if ON_GPU else cpu_sizes, strict=True))
    no_dropout = {
        "gpt2": {
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "bos_token_id": 0,
            "eos_token_id": None,
            "pad_token_id": 0,
        },
        "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": 0},
        "t5": {"dropout_rate": 0.0, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": None},
    }[kind]
    cls = {"gpt2": transformers.GPT2Config, "bert": transformers.BertConfig, "t5": transformers.T5Config}[
        kind
    ]
    return cls(vocab_size=VOCAB, **sizes, **no_dropout)


def build(kind: str, implementation: str):
    if implementation == "fast_attn":
        register()
    auto = {"bert": "AutoModelForMaskedLM", "t5": "AutoModelForSeq2SeqLM"}.get(kind, "AutoModelForCausalLM")
    torch.manual_seed(0)
    try:
        with torch.device(DEVICE):  # initialize on the device: random init of 100M+ weights is slow on CPU
            model = getattr(transformers, auto).from_config(config(kind), attn_implementation=implementation)
    except ValueError as refusal:  # e.g. Gemma 2 and gpt-oss refuse "sdpa"
        pytest.skip(f"{kind} refuses attn_implementation={implementation!r}: {refusal}")
    return model.to(dtype=DTYPE)


def synchronized(fn):
    def run():
        result = fn()
        if ON_GPU:
            torch.cuda.synchronize()
        return result

    return run


def training_inputs(kind: str) -> dict:
    w = WORKLOADS[kind]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (w.batch, w.seqlen), generator=generator).to(DEVICE)
    if kind == "gpt2" or kind in DECODERS:
        return {"input_ids": ids, "labels": ids}
    if kind == "bert":
        # A quarter of the rows padded to half length: the padding mask is part of the workload.
        mask = torch.ones_like(ids)
        mask[: w.batch // 4, w.seqlen // 2 :] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids}
    labels = torch.randint(1, VOCAB, (w.batch, w.target_len), generator=generator).to(DEVICE)
    return {"input_ids": ids, "labels": labels}


def describe(benchmark, kind: str, implementation: str, workload: str, tokens: int) -> None:
    benchmark.group = f"{kind}-{workload}"
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
            "dtype": str(DTYPE).replace("torch.", ""),
            "implementation": implementation,
            "tokens_per_call": tokens,
            "workload": WORKLOADS[kind].__dict__,
        }
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["gpt2", "bert", "t5", *DECODERS])
def test_training_step(benchmark, kind, implementation):
    model = build(kind, implementation).train()
    inputs = training_inputs(kind)

    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    w = WORKLOADS[kind]
    describe(benchmark, kind, implementation, "train-step", w.batch * w.seqlen)
    benchmark.pedantic(synchronized(step), rounds=w.rounds, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["gpt2", "t5", *DECODERS])
def test_greedy_generation(benchmark, kind, implementation):
    model = build(kind, implementation).eval()
    w = WORKLOADS[kind]
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (w.batch, w.prompt_len), generator=generator).to(DEVICE)

    @torch.no_grad()
    def generate():
        return model.generate(ids, max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens, do_sample=False)

    describe(benchmark, kind, implementation, "generate", w.batch * w.new_tokens)
    tokens = benchmark.pedantic(synchronized(generate), rounds=w.rounds, warmup_rounds=1, iterations=1)
    assert tokens.shape[0] == w.batch
