"""What a demo-model checkpoint has learned, per task, in one forward pass each (seconds, where eval_demo.py's
generation takes minutes): the encoder's teacher-forced next-token accuracy over the answer, and the decoder's
argmax accuracy on the first answer block at fixed noise levels (t = 1 is where generation starts).

    python benchmarks/probe_demo.py .cache/demo-run/model [--n 48] [--positions 4]

`--positions K` adds, per task, the decoder's accuracy at each of the first K answer positions at t = 1 (for
addition: which digits of the sum the model has, the ones digit last).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_demo import tokenize  # noqa: E402

NOISE = (1.0, 0.5, 0.1)


def main() -> None:
    from mlx_diffgemma import load, train
    from mlx_diffgemma.demo import HELD_OUT, HELD_OUT_SEED, TASKS, examples, task_of, vocabulary

    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--n", type=int, default=48, help="held-out examples per task")
    ap.add_argument("--positions", type=int, default=0, help="also: accuracy at each of the first K answer positions")
    args = ap.parse_args()
    model, tok = load(args.model)
    v = vocabulary()
    held_out = examples(HELD_OUT, HELD_OUT_SEED)
    noise = " | ".join(f"decoder at t = {t}: positions, blocks" for t in NOISE)
    print(f"| task | encoder, teacher-forced | {noise} |")
    print("|---|---|" + "---|" * len(NOISE))
    per_position = {}
    for name in sorted(TASKS):
        pairs = tokenize(tok, [e for e in held_out if task_of(e[0]) == name][: args.n])
        rng = np.random.default_rng(0)
        batch = train.make_batch(pairs, model.canvas_length, model.args.vocab_size, v["<eos>"], v["<pad>"], rng)
        batch.context[:] = [len(p) for p, _ in pairs]  # the first block, as generation starts
        batch.sc_mask[:] = False
        cells = []
        for t in NOISE:
            batch.noise_mask = rng.random(batch.noise_mask.shape) < t
            enc, dec = train.batch_logits(model, batch)
            hit = np.array(dec.argmax(-1)) == batch.targets
            cells.append(f"{hit.mean():.2f}, {hit.all(axis=1).mean():.2f}")
            if t == 1.0 and args.positions:
                per_position[name] = hit[:, : args.positions].mean(axis=0)
        pred = np.array(enc.argmax(-1))
        answer = [pred[b, len(p) - 1 : len(p) + len(a) - 1] == a for b, (p, a) in enumerate(pairs)]
        print(f"| {name} | {np.mean(np.concatenate(answer)):.2f} | " + " | ".join(cells) + " |")
    for name, acc in per_position.items():
        print(f"{name}: decoder at t = 1, answer positions 1..{len(acc)}: " + " ".join(f"{a:.2f}" for a in acc))


if __name__ == "__main__":
    main()
