"""The demo model's training step on both backends, rounds interleaved, on the same batches from the same weights:
MLX (`train.train`'s step: value_and_grad, clip, AdamW update) and PyTorch (`torch_train`'s: `reference.batch_loss`,
backward, clip, AdamW). Each runs in a process of its own, PyTorch's without LD_PRELOAD (a preloaded OpenBLAS takes
over torch's matrix products and slows them several times). Seconds per step, tokens per second, and the ratio.

    python benchmarks/train_speed.py [--batch-size 32] [--steps 3] [--rounds 2]
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
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per backend per round (after one untimed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("BACKEND", "ROUND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args, args.child[0], int(args.child[1]))

    import json
    import subprocess

    import numpy as np
    from bench_step import _clean_env, openblas_core, versions

    print(f"# {time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} CPUs · {versions()}")
    print(
        f"demo, batch {args.batch_size}, {args.steps} timed steps per backend per round; each "
        "backend in a fresh process per round, torch's without LD_PRELOAD (its own BLAS)"
    )
    if openblas_core() is None:
        print("note: MLX runs on its bundled reference BLAS (no OpenBLAS preloaded): see the Makefile")
    timings: dict[str, list[float]] = {"mlx": [], "torch": []}
    for r in range(args.rounds):
        for name in ("mlx", "torch") if r % 2 == 0 else ("torch", "mlx"):
            env = None if name == "mlx" else _clean_env()
            cmd = [sys.executable, __file__, "--batch-size", str(args.batch_size)]
            cmd += ["--steps", str(args.steps), "--child", name, str(r)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            seconds, tokens = json.loads(out.splitlines()[-1])
            timings[name].append(seconds / args.steps)
            print(
                f"round {r + 1} {name:5s} {seconds / args.steps:6.2f} s/step {tokens / seconds:7.0f} tokens/s",
                flush=True,
            )
    med = {k: float(np.median(v)) for k, v in timings.items()}
    ratio = med["mlx"] / med["torch"]
    print(f"median s/step: mlx {med['mlx']:.2f}, torch {med['torch']:.2f}; torch / mlx speed {ratio:.2f}x")


def child(args, backend: str, round_: int) -> None:
    """One backend's round: the same weights and batches as every other process, one untimed step, then the
    round's timed steps; prints [seconds, tokens]."""
    import json

    import numpy as np
    from eval_demo import tokenize
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from train_demo import TRAIN_MIX

    from mlx_diffgemma import demo, train
    from mlx_diffgemma.config import ModelConfig
    from mlx_diffgemma.model import Model

    folder = REPO / ".cache/train-speed"
    demo.build_tokenizer(folder)
    tok = load_tokenizer(folder)
    pairs = tokenize(tok, demo.examples(4000, 1, TRAIN_MIX))
    model = Model(ModelConfig.from_dict(demo.demo_config()))
    train.init_weights(model, seed=0)
    cfg = train.TrainConfig(batch_size=args.batch_size, learning_rate=1e-3, train_router=True)
    rng = np.random.default_rng(0)
    batches = train.length_batches(pairs, cfg.batch_size, 0)
    v = demo.vocabulary()
    drawn = [
        train.next_batch(pairs, batches, rng, cfg, model.canvas_length, model.args.vocab_size, v["<eos>"], v["<pad>"])
        for _ in range(1 + (round_ + 1) * args.steps)
    ]
    chosen = drawn[1 + round_ * args.steps :]
    step = mlx_step(model, cfg) if backend == "mlx" else torch_step(model, cfg)
    step(drawn[0])
    tic = time.perf_counter()
    for b in chosen:
        step(b)
    seconds = time.perf_counter() - tic
    print(json.dumps([seconds, sum(int(b.lengths.sum()) for b in chosen)]))


def mlx_step(model, cfg):
    """train.train's step (train.make_step), with a constant learning rate."""
    import mlx.optimizers as optim

    from mlx_diffgemma import train

    train.prepare(model, cfg)
    return train.make_step(model, optim.AdamW(learning_rate=1e-3, weight_decay=0.0), cfg)


def torch_step(model, cfg):
    """torch_train's step (torch_train.make_step), with a constant learning rate."""
    import torch

    from mlx_diffgemma import torch_train

    tm = torch_train.to_torch(model).train()
    params = torch_train.trainable(tm, cfg)
    return torch_train.make_step(tm, params, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0), cfg)


if __name__ == "__main__":
    main()
