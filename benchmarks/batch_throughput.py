"""Batched generation throughput: tokens/s generating the same prompts with 1, 4 and 16 rows in flight (the batch
engine, continuous: a prompt joins as a row finishes), beside one prompt at a time through `generate_step`.

- demo: the shipped demo model, 32 held-out prompts, its default settings (rows stop at their own EOS).
- bench: the bench_step.py checkpoint (hidden 512, 8 layers, 16 experts top-4, vocabulary 32,768; random weights,
  built by transformers on first use), 16 random 64-token prompts, one block each with exactly 4 steps (no early
  stop, no EOS), so every configuration does the same work per token.

    python benchmarks/batch_throughput.py [--models demo bench] [--sizes 1 4 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_diffgemma import load
from mlx_diffgemma.batch import Batch, Request
from mlx_diffgemma.generate import Commit, generate_step, render_prompt, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))


def workload(name: str, workdir: Path):
    if name == "demo":
        from mlx_diffgemma.demo import HELD_OUT_SEED, examples

        model, tok = load("demo")
        prompts = [render_prompt(tok, p) for p, _ in examples(32, HELD_OUT_SEED)]
        return model, prompts, settings(model), 64
    from bench_step import build

    model, _ = load(build(workdir / "bench"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.args.vocab_size, 64).tolist() for _ in range(16)]
    g = settings(model, max_denoising_steps=4, confidence_threshold=1e-9, eos_token_id=[])
    return model, prompts, g, model.canvas_length


def sequential(model, prompts, g, max_tokens) -> int:
    n = 0
    for i, ids in enumerate(prompts):
        for e in generate_step(model, mx.array([ids]), g, max_tokens, key=mx.random.key(i)):
            n += len(e.tokens) if isinstance(e, Commit) else 0
    return n


def batched(model, prompts, g, max_tokens, size) -> int:
    batch, queue, n = Batch(model), list(enumerate(prompts)), 0
    while queue or len(batch):
        while queue and len(batch) < size:
            i, ids = queue.pop(0)
            batch.add(Request(ids, g, max_tokens, mx.random.key(i), tag=i))
        for _, e in batch.run_block():
            n += len(e.tokens) if isinstance(e, Commit) else 0
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo", "bench"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-diffgemma-bench"))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"MLX {mx.__version__} ({mx.default_device()}); tokens/s, best of {args.rounds} rounds (interleaved)\n")
    print("| model | one at a time | " + " | ".join(f"batch {s}" for s in args.sizes) + " |")
    print("|---|---|" + "---|" * len(args.sizes))
    for name in args.models:
        model, prompts, g, max_tokens = workload(name, args.workdir)
        sequential(model, prompts[:2], g, max_tokens)  # warm-up (compilation)
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for key in ["seq", *map(str, args.sizes)]:
                tic = time.perf_counter()
                n = (sequential(model, prompts, g, max_tokens) if key == "seq"
                     else batched(model, prompts, g, max_tokens, int(key)))  # fmt: skip
                best[key] = max(best.get(key, 0.0), n / (time.perf_counter() - tic))
        cells = " | ".join(f"{best[str(s)]:.1f} ({best[str(s)] / best['seq']:.2f}x)" for s in args.sizes)
        print(f"| {name} | {best['seq']:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
