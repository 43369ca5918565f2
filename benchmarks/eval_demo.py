"""Exact-task accuracy of the demo model on held-out examples, with the default generation settings: accuracy per
task, mean denoising steps per block and tokens per forward (so speed work can be judged on accuracy).

    python benchmarks/eval_demo.py --model mlx_diffgemma/demo/model [--n 500]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path


def tokenize(tok, pairs):
    """(prompt, answer) -> (prompt ids rendered as generation renders them, answer ids + end of turn)."""
    from mlx_diffgemma.train import encode_example, end_of_turn

    end = end_of_turn(tok, tok.eos_token_id)
    return [encode_example(tok, p, a, end) for p, a in pairs]


def evaluate(model, tok, n: int, **settings) -> dict:
    """Generate an answer to each of the first n held-out prompts (seed i for the i-th) and score it exactly."""
    from mlx_diffgemma import stream_generate
    from mlx_diffgemma.demo import HELD_OUT_SEED, examples, task_of
    from mlx_diffgemma.generate import Block, Done

    right, total = defaultdict(int), defaultdict(int)
    steps = blocks = generated = 0
    for i, (prompt, answer) in enumerate(examples(n, HELD_OUT_SEED)):
        task = task_of(prompt)
        for e in stream_generate(model, tok, prompt, seed=i, **settings):
            if isinstance(e, Block):
                blocks += 1
            elif isinstance(e, Done):
                done = e
        steps += done.denoising_steps  # decoder forward passes
        generated += done.tokens_per_forward * done.denoising_steps
        total[task] += 1
        right[task] += done.text.strip() == answer
    return {
        "tasks": {t: (right[t], total[t]) for t in sorted(total)},
        "exact": sum(right.values()) / n,
        "steps_per_block": steps / blocks,
        "tokens_per_forward": generated / steps,
    }


def main() -> None:
    from mlx_diffgemma import load
    from mlx_diffgemma.demo import HELD_OUT

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "mlx_diffgemma/demo/model")
    ap.add_argument("--n", type=int, default=HELD_OUT)
    args = ap.parse_args()
    if not 0 < args.n <= HELD_OUT:
        ap.error(f"--n must be 1..{HELD_OUT}: only the first {HELD_OUT} held-out examples are kept out of training")
    model, tok = load(args.model)
    r = evaluate(model, tok, args.n)
    print("| task | exact | n |\n|---|---|---|")
    for t, (right, total) in r["tasks"].items():
        print(f"| {t} | {100 * right / total:.1f}% | {total} |")
    print(f"| all | {100 * r['exact']:.1f}% | {args.n} |")
    print(
        f"mean denoising steps per block {r['steps_per_block']:.2f} (limit "
        f"{model.generation_config.max_denoising_steps}); tokens per forward {r['tokens_per_forward']:.2f}"
    )


if __name__ == "__main__":
    main()
