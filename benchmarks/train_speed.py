"""The demo model's training step on both backends, interleaved on the same batches: MLX (`train.train`'s step:
value_and_grad, clip, AdamW update) and PyTorch (`torch_train`'s: `reference.batch_loss`, backward, clip, AdamW),
each from the same weights. Tokens per second and seconds per step for each, and their ratio.

    python benchmarks/train_speed.py [--version 2] [--batch-size 32] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("MLX_DIFFGEMMA_EXPERTS", "gather")  # as train_demo.py trains


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", type=int, choices=(1, 2), default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per backend per round (after one untimed)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    import torch
    from bench_step import versions
    from eval_demo import tokenize
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from train_demo import TRAIN_MIX, TRAIN_MIX_V2

    from mlx_diffgemma import demo, torch_train, train
    from mlx_diffgemma.config import ModelConfig
    from mlx_diffgemma.model import Model
    from mlx_diffgemma.reference import batch_loss

    folder = REPO / ".cache/train-speed"
    demo.build_tokenizer(folder)
    tok = load_tokenizer(folder)
    canvas = 16 if args.version == 1 else 64
    mix = TRAIN_MIX if args.version == 1 else TRAIN_MIX_V2
    pairs = tokenize(tok, demo.examples(4000, 1, mix, version=args.version))
    model = Model(ModelConfig.from_dict(demo.demo_config(canvas=canvas)))
    train.init_weights(model, seed=0)
    tm = torch_train.to_torch(model).train()
    cfg = train.TrainConfig(batch_size=args.batch_size, learning_rate=1e-3, train_router=True)
    train.prepare(model, cfg)
    rng = np.random.default_rng(0)
    batches = train.length_batches(pairs, cfg.batch_size, 0)
    v = demo.vocabulary()

    def draw():
        return train.next_batch(pairs, batches, rng, cfg, canvas, model.args.vocab_size, v["<eos>"], v["<pad>"])

    optimizer = optim.AdamW(learning_rate=1e-3, weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, lambda b: train.loss(model, b))

    def mlx_step(batch):
        (value, _), grads = loss_and_grad(batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, value)

    params = [p for n, p in tm.named_parameters() if not n.startswith(torch_train.VISION_PREFIXES)]
    topt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def torch_step(batch):
        value, _ = batch_loss(tm, batch)
        topt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        topt.step()

    print(f"# {time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} CPUs · {versions()}")
    print(f"demo v{args.version}, batch {args.batch_size}, {args.steps} timed steps per backend per round")
    warm = draw()
    mlx_step(warm)
    torch_step(warm)
    timings = {"mlx": [], "torch": []}
    for r in range(args.rounds):
        chosen = [draw() for _ in range(args.steps)]
        tokens = sum(int(b.lengths.sum()) for b in chosen)
        for name, step in (
            (("mlx", mlx_step), ("torch", torch_step)) if r % 2 == 0 else (("torch", torch_step), ("mlx", mlx_step))
        ):
            tic = time.perf_counter()
            for b in chosen:
                step(b)
            seconds = time.perf_counter() - tic
            timings[name].append((seconds / len(chosen), tokens / seconds))
            print(
                f"round {r + 1} {name:5s} {seconds / len(chosen):6.2f} s/step {tokens / seconds:7.0f} tokens/s",
                flush=True,
            )
    med = {k: float(np.median([t for t, _ in v])) for k, v in timings.items()}
    ratio = med["mlx"] / med["torch"]
    print(f"median s/step: mlx {med['mlx']:.2f}, torch {med['torch']:.2f}; torch / mlx speed {ratio:.2f}x")


if __name__ == "__main__":
    main()
