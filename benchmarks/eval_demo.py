"""Exact-task accuracy of the demo model on held-out examples, with the default generation settings: accuracy per
task, mean denoising steps per block and tokens per forward (so speed work can be judged on accuracy).

    python benchmarks/eval_demo.py --model mlx_diffgemma/demo/model [--n 500]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

EVAL_SEED = 20261129  # the held-out set; benchmarks/train_demo.py keeps these prompts out of training


def tokenize(tok, pairs):
    """(prompt, answer) -> (prompt ids with the chat template, answer ids + end of turn)."""
    end = tok.convert_tokens_to_ids("<turn|>")
    out = []
    for prompt, answer in pairs:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, enable_thinking=False
        )
        out.append((list(ids), tok.encode(answer, add_special_tokens=False) + [end]))
    return out


def main() -> None:
    from mlx_diffgemma import load, stream_generate
    from mlx_diffgemma.demo import examples
    from mlx_diffgemma.generate import Block, Done

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "mlx_diffgemma/demo/model")
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    model, tok = load(args.model)
    right, total = defaultdict(int), defaultdict(int)
    steps = blocks = generated = 0
    for i, (prompt, answer) in enumerate(examples(args.n, EVAL_SEED)):
        task = prompt.split(":")[0].split(" ")[0].lower()  # sort, reverse, add, balanced, write (code)
        for e in stream_generate(model, tok, prompt, seed=i):
            if isinstance(e, Block):
                blocks += 1
            elif isinstance(e, Done):
                done = e
        steps += done.denoising_steps  # decoder forward passes
        generated += done.tokens_per_forward * done.denoising_steps
        total[task] += 1
        right[task] += done.text.strip() == answer
    print("| task | exact | n |\n|---|---|---|")
    for t in sorted(total):
        print(f"| {t} | {100 * right[t] / total[t]:.1f}% | {total[t]} |")
    n = sum(total.values())
    print(f"| all | {100 * sum(right.values()) / n:.1f}% | {n} |")
    print(
        f"mean denoising steps per block {steps / blocks:.2f} (limit {model.generation_config.max_denoising_steps});"
        f" tokens per forward {generated / steps:.2f}"
    )


if __name__ == "__main__":
    main()
