"""Quantization quality per recipe: every recipe converts a tiny checkpoint and is compared with the unquantized
model (max |logit difference|, relative RMS error, top-1 agreement over denoised positions), and with its own
dequantized twin (which it must equal to float32 noise: that proves the quantized path).

On random weights the error says little about a trained model (see DESIGN.md, "Measured facts"): the first table
is on the trained-like "tamed" fixture (q/k norms at head_dim^-1/4); the second converts the trained demo model and
adds what matters to a user: its exact accuracy on held-out tasks and how fast it settles (benchmarks/eval_demo.py).

    python benchmarks/quant_quality.py [--demo-n 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_diffgemma import load
from mlx_diffgemma import reference as ref
from mlx_diffgemma.convert import RECIPES, convert
from mlx_diffgemma.convert.quality import dequantized, logit_metrics
from mlx_diffgemma.loading import resolve_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_demo import evaluate  # noqa: E402


def denoised_logits(model, blocks: int = 4, seed: int = 0) -> np.ndarray:
    """Logits over several blocks (batch 2): encode a prompt, then denoise and commit block after block."""
    rng = np.random.default_rng(seed)
    V, C = model.args.vocab_size, model.canvas_length
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, V, (2, model.args.sliding_window + 5))), cache)
    out = []
    for _ in range(blocks):
        canvas = mx.array(rng.integers(0, V, (2, C)))
        first = model.denoise(canvas, cache)
        second = model.denoise(canvas, cache, first)
        out += [np.array(first), np.array(second)]
        model.encode(mx.array(rng.integers(0, V, (2, C))), cache)
    return np.concatenate([o.reshape(-1, V) for o in out])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-n", type=int, default=200, help="held-out examples per recipe (0: skip the demo model)")
    args = ap.parse_args()
    ref.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        src = ref.build_checkpoint(Path(tmp) / "tamed", "tamed", seed=0)
        base = denoised_logits(load(src)[0])
        print(f"fixture 'tamed' (float32 conversions), {base.shape[0]} denoised positions; MLX {mx.__version__}")
        print("| recipe | vs dequantized twin: max abs | vs unquantized: max abs | relative RMS | top-1 |")
        print("|---|---|---|---|---|")
        for name, recipe in RECIPES.items():
            model = load(convert(src, Path(tmp) / name, recipe, dtype="float32", log=lambda s: None))[0]
            got = denoised_logits(model)
            twin = float(np.abs(got - denoised_logits(dequantized(model))).max())
            m = logit_metrics(got, base)
            print(f"| {name} | {twin:.1e} | {m['max_abs']:.3f} | {m['rel_rms']:.4f} | {100 * m['top1']:.1f}% |")
        if args.demo_n <= 0:
            return
        demo, tok = load("demo")
        base = denoised_logits(demo)
        print(f"\nthe demo model, {args.demo_n} held-out examples per recipe (float32 conversions)")
        print("| recipe | relative RMS | top-1 | exact | steps per block | tokens per forward |")
        print("|---|---|---|---|---|---|")
        runs = [("float32 (as shipped)", demo)]
        for name, recipe in RECIPES.items():
            out = convert(resolve_path("demo"), Path(tmp) / f"demo-{name}", recipe, dtype="float32", log=lambda s: None)
            runs.append((name, load(out)[0]))
        for name, model in runs:
            m = logit_metrics(denoised_logits(model), base)
            r = evaluate(model, tok, args.demo_n)
            print(
                f"| {name} | {m['rel_rms']:.4f} | {100 * m['top1']:.1f}% | {100 * r['exact']:.1f}% "
                f"| {r['steps_per_block']:.2f} | {r['tokens_per_forward']:.2f} |"
            )


if __name__ == "__main__":
    main()
