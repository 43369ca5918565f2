"""What each conversion recipe costs against transformers, measured the way a user with real weights would: the
demo model exported to the Hugging Face layout (`mlx_diffgemma export`), transformers' float32 reference of it over
held-out prompts (`mlx_diffgemma reference`), and every recipe's conversion of that folder compared with it
(`mlx_diffgemma parity --against`): KL per position and top-1 over all trajectory stages, what share of what the
model knows per position it keeps (1 - KL / KL(reference || uniform)), and how many replayed generations are
identical token for token.

    python benchmarks/reference_recipes.py [--prompts 32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_diffgemma import parity
from mlx_diffgemma import reference as ref
from mlx_diffgemma.convert import RECIPES, convert
from mlx_diffgemma.convert.export import export
from mlx_diffgemma.demo import HELD_OUT_SEED, examples


def information(ref_file: Path) -> float:
    """Mean over all stored positions of KL(reference || uniform) = log V - H(reference)."""
    vals = []
    for k, a in mx.load(str(ref_file), format="safetensors").items():
        if k.endswith(".logits"):
            x = np.array(a[0], dtype=np.float64)
            m = x.max(-1, keepdims=True)
            lp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
            vals += (np.log(x.shape[-1]) + (np.exp(lp) * lp).sum(-1)).tolist()
    return float(np.mean(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    ref.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        hf = export("demo", root / "demo-hf", force=True, log=lambda s: None)
        prompts = [
            {"prompt": p} if isinstance(p, str) else {"messages": p} for p, _ in examples(args.prompts, HELD_OUT_SEED)
        ]
        ref_file = root / "demo.ref"
        t = time.time()
        header = ref.record(hf, ref_file, dtype="float32", prompts=prompts, force=True)
        print(f"reference: {header['versions']}, float32 on cpu, {len(prompts)} prompts, {time.time() - t:.0f} s")
        info = information(ref_file)
        print(f"mean KL(reference || uniform) per position: {info:.3f} nats\n")
        rows = [("float32 (no conversion)", None)] + [(name, recipe) for name, recipe in RECIPES.items()]
        print("| ours | KL mean (nats) | KL max | kept | top-1 | generations identical | replay time |")
        print("|---|---|---|---|---|---|---|")
        for name, recipe in rows:
            folder = hf
            if recipe is not None:
                dtype = "bfloat16" if name == "bf16" else None  # the rest keep the export's float32 elsewhere
                folder = convert(hf, root / name, recipe, dtype=dtype, force=True, log=lambda s: None)
            t = time.time()
            r = parity.compare(folder, ref_file)
            seconds = time.time() - t
            n = sum(s["positions"] for s in r["stages"].values())
            kl = sum(s["kl_mean"] * s["positions"] for s in r["stages"].values()) / n
            top1 = sum(s["top1"] * s["positions"] for s in r["stages"].values()) / n
            kl_max = max(s["kl_max"] for s in r["stages"].values())
            same = sum(g["identical"] for g in r["generations"])
            print(
                f"| {name} | {kl:.2e} | {kl_max:.2e} | {100 * (1 - kl / info):.2f}% | {100 * top1:.1f}% | "
                f"{same}/{len(r['generations'])} | {seconds:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
