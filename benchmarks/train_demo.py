"""Train the demo model from scratch with `mlx_diffgemma.train`: a tiny DiffusionGemma (the real layer pattern and
an MoE) on generated tasks whose answers can be checked exactly (mlx_diffgemma/demo).

    python benchmarks/train_demo.py --out .cache/demo-v2/model --init mlx_diffgemma/demo/model

Re-running the same command resumes from the last checkpoint (so a run can span sessions). `--backend torch`
runs the same training on PyTorch (transformers' modules, mlx_diffgemma/torch_train.py): several times faster
than MLX's CPU backend on Linux; on a Mac, MLX on Metal is the one to use. `--init` starts from
another demo model's weights (same architecture; the canvas length is not a weight) instead of random ones. The
held-out questions of benchmarks/eval_demo.py (its seed) are kept out of the training set, as questions and as
earlier turns. `--ship` then copies the finished model, without the trainer's
state, into the package (mlx_diffgemma/demo/model), where `--model demo` finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# MLX's CPU gather_mm over the 2 chosen experts beats computing all 8 for this model's training step (2.2 vs
# 2.6 s at batch 32, benchmarks/RESULTS.md); inference keeps its own default.
os.environ.setdefault("MLX_DIFFGEMMA_EXPERTS", "gather")
sys.path.insert(0, str(REPO / "benchmarks"))
# The training draw without --mix (the held-out set stays uniform over the tasks): the one v2 runs A to T used,
# addition and the multi-line code weighted as the hard tasks. The runs after them, which shipped the model, name
# their draws with --mix (benchmarks/RESULTS.md).
TRAIN_MIX = {"code": 0.25, "sort": 0.15, "reverse": 0.15, "add": 0.30, "brackets": 0.15}

from eval_demo import tokenize  # noqa: E402

from mlx_diffgemma import demo, train  # noqa: E402
from mlx_diffgemma.config import ModelConfig  # noqa: E402
from mlx_diffgemma.model import Model, num_parameters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=REPO / ".cache/demo-v2/model")
    ap.add_argument("--init", type=Path, help="start from this demo model's weights instead of random ones")
    ap.add_argument("--steps", type=int, default=3400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--canvas", type=int, default=64)
    ap.add_argument("--max-denoising-steps", type=int, default=32, help="the shipped generation_config's limit")
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--encoder-weight",
        type=float,
        default=1.0,
        help="the encoder's next-token loss beside the canvas loss (a canvas of 64, most of it end-of-sequence, "
        "dilutes the answer positions' share of the canvas mean 4x against canvas 16)",
    )
    ap.add_argument(
        "--backend",
        choices=("mlx", "torch"),
        default="mlx",
        help="torch: the same training on PyTorch (mlx_diffgemma/torch_train.py), several times faster on a CPU",
    )
    ap.add_argument("--device", default="cpu", help="torch backend: cpu or cuda")
    ap.add_argument(
        "--mix",
        type=_mix,
        help="the training draw's task shares, e.g. add=0.5,code=0.2,sort=0.1,reverse=0.1,brackets=0.1 "
        "(default: TRAIN_MIX); a different draw is different data, so give it a new --out",
    )
    ap.add_argument("--ship", action="store_true", help="copy the finished model into mlx_diffgemma/demo/model")
    args = ap.parse_args()

    folder = args.out.parent / f".{args.out.name}-source"  # config + tokenizer the checkpoints copy
    demo.build_tokenizer(folder)
    config = demo.demo_config(hidden=args.hidden, canvas=args.canvas)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = demo.generation_config(args.max_denoising_steps)
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(folder)
    held_out = {demo.question(p) for p, _ in demo.examples(demo.HELD_OUT, demo.HELD_OUT_SEED)}
    mix = args.mix or TRAIN_MIX
    if set(mix) - set(demo.TASKS):
        unknown, known = ", ".join(sorted(set(mix) - set(demo.TASKS))), ", ".join(sorted(demo.TASKS))
        ap.error(f"--mix: no task {unknown} (the tasks: {known})")
    data = [(p, a) for p, a in demo.examples(args.examples, args.seed + 1, mix) if not held_out & set(_questions(p))]
    pairs = tokenize(tok, data)
    model = Model(ModelConfig.from_dict(config))
    train.init_weights(model, seed=args.seed)
    if args.init is not None:  # a resumed run loads its checkpoint over these
        from mlx_diffgemma.loading import check_weights, load_weights

        weights = Model.sanitize(load_weights(args.init))
        check_weights(model, weights)
        model.load_weights(list(weights.items()))
    print(f"{num_parameters(model):,} parameters, {len(pairs):,} training examples", flush=True)
    cfg = train.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup=100,
        train_router=True,
        encoder_weight=args.encoder_weight,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    v = demo.vocabulary()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.backend == "torch":
        from mlx_diffgemma import torch_train

        torch_train.train(model, pairs, args.out, folder, cfg, v["<eos>"], v["<pad>"], log=log, device=args.device)
    else:
        train.train(model, pairs, args.out, folder, cfg, v["<eos>"], v["<pad>"], progress=sys.stderr.isatty(), log=log)
    if args.ship:
        ship(args.out, REPO / "mlx_diffgemma/demo/model")


def _mix(text: str) -> dict[str, float]:
    """`task=share,...` as a dict (the shares are weights: they need not sum to 1)."""
    out = {}
    for item in text.split(","):
        name, _, share = item.partition("=")
        try:
            out[name.strip()] = float(share)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not task=share") from None
        if out[name.strip()] < 0:
            raise argparse.ArgumentTypeError(f"{item!r}: a share cannot be negative")
    return out


def _questions(prompt) -> list[str]:
    """Every question a training prompt holds: itself, or each user message."""
    return [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"]


def ship(run: Path, dst: Path) -> None:
    """The model folder without `trainer/` (optimizer state and data order), replaced atomically."""
    import shutil

    from mlx_diffgemma.files import replace_dir, staging_dir

    tmp = staging_dir(dst)
    for f in sorted(run.iterdir()):
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, dst)
    print(f"shipped {run} to {dst}")


if __name__ == "__main__":
    main()
