"""Fine-tune a small BERT classifier with fast_attn, and check its loss curve against eager attention.

    python examples/bert_finetune.py [--steps 80] [--plot loss.png]

The task is synthetic and needs the padding mask to be right: a sequence is
positive when a "signal" token occurs among its real tokens. Padded positions
are filled with random tokens, signal included, so a model that attended to
padding would be misled. Two identical models (same initialization, same
batches, no dropout) are trained, one with attn_implementation="fast_attn",
one with "eager"; their losses agree step by step to float32 rounding, which
grows slowly as training amplifies it.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from random_models import bert_classifier_config, random_model

from fast_attn.integrations.transformers import register

VOCAB, SIGNAL, PAD = 64, 7, 0


def make_batch(generator: torch.Generator, batch: int, length: int):
    """input_ids, attention_mask (1 = real token), labels (1 = SIGNAL among the real tokens)."""
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    ids[ids == SIGNAL] = SIGNAL + 1
    real_lengths = torch.randint(length // 3, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < real_lengths[:, None]).long()
    labels = torch.randint(0, 2, (batch,), generator=generator)
    for row in range(batch):
        if labels[row]:
            ids[row, torch.randint(0, int(real_lengths[row]), (1,), generator=generator)] = SIGNAL
        # Padding holds the signal too, half the time: only the mask tells it apart.
        if real_lengths[row] < length and torch.rand(1, generator=generator) < 0.5:
            ids[row, int(real_lengths[row])] = SIGNAL
    return ids, mask, labels


def train(implementation: str, steps: int, batch: int, length: int) -> tuple[list[float], float, float]:
    """Losses per step, final accuracy on held-out batches, seconds."""
    config = bert_classifier_config(VOCAB, length, PAD)
    model = random_model(transformers.AutoModelForSequenceClassification, config, implementation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        ids, mask, labels = make_batch(data, batch, length)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    held_out = torch.Generator().manual_seed(2)
    correct = total = 0
    with torch.no_grad():
        for _ in range(8):
            ids, mask, labels = make_batch(held_out, batch, length)
            correct += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum())
            total += batch
    return losses, correct / total, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--plot", help="write the two loss curves to this PNG (needs matplotlib)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    register()

    results = {name: train(name, args.steps, args.batch, args.length) for name in ("fast_attn", "eager")}
    (ours, ours_acc, ours_s), (eager, eager_acc, eager_s) = results["fast_attn"], results["eager"]
    print(f"{'step':>5} {'fast_attn':>10} {'eager':>10} {'|diff|':>9}")
    for step in list(range(0, args.steps, 10)) + [args.steps - 1]:
        print(f"{step:>5} {ours[step]:>10.5f} {eager[step]:>10.5f} {abs(ours[step] - eager[step]):>9.2e}")
    worst = max(abs(a - b) for a, b in zip(ours, eager))
    print(f"largest loss difference over {args.steps} steps: {worst:.2e}")
    print(f"held-out accuracy: fast_attn {ours_acc:.3f}, eager {eager_acc:.3f}")
    print(f"training time: fast_attn {ours_s:.1f} s, eager {eager_s:.1f} s")
    if args.plot:
        import matplotlib.pyplot as plt

        plt.plot(ours, label="fast_attn")
        plt.plot(eager, "--", label="eager")
        plt.xlabel("step")
        plt.ylabel("loss")
        plt.legend()
        plt.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    # Both runs compute the same float32 math; only rounding may differ.
    if worst > 1e-4 * max(abs(loss) for loss in eager):
        raise SystemExit("the fast_attn training run's losses differ from eager attention's")


if __name__ == "__main__":
    main()
