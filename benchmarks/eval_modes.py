"""Every speed mode, and each knob alone, against exact mode on the demo model's held-out set: exact-task
accuracy, steps per block, tokens per forward, decoder FLOPs per generated token (the step accounting over the
positions each step forwards) and tokens/s on this machine, the modes run side by side prompt by prompt. Prints
a markdown table and writes a speed-versus-accuracy plot (PNG; needs matplotlib).

    python benchmarks/eval_modes.py [--model demo] [--n 500] [--plot benchmarks/modes.png]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from mlx_diffgemma.config import MODES

REPO = Path(__file__).resolve().parents[1]


def without_trimming(mode: str) -> dict:
    """A named mode's knobs with trim_eos and first_window left out (what the mode was before them)."""
    return {k: v for k, v in MODES[mode].items() if k not in ("trim_eos", "first_window")}


# The named modes, then each knob alone (what each contributes, and what it costs).
VARIANTS = {
    "exact": {"mode": "exact"},
    "fast": {"mode": "fast"},
    "turbo": {"mode": "turbo"},
    **{f"{m} without trimming": without_trimming(m) for m in ("fast", "turbo")},
    "trim_eos=0.9": {"trim_eos": 0.9},
    "trim_eos=0.9, first_window=0.375": {"trim_eos": 0.9, "first_window": 0.375},
    "sc_top_k=16": {"sc_top_k": 16},
    "freeze_after=0": {"freeze_after": 0},
    "freeze_after=0, freeze_confidence=0.99": {"freeze_after": 0, "freeze_confidence": 0.99},
    "freeze_after=0, freeze_confidence=0.9": {"freeze_after": 0, "freeze_confidence": 0.9},
    "freeze 0 @0.99, accept=confidence 0.9": {
        "freeze_after": 0,
        "freeze_confidence": 0.99,
        "accept": "confidence",
        "accept_confidence": 0.9,
    },
    "freeze 0 @0.9, accept=confidence 0.9": {
        "freeze_after": 0,
        "freeze_confidence": 0.9,
        "accept": "confidence",
        "accept_confidence": 0.9,
    },
    "freeze_after=1, refresh_every=4": {"freeze_after": 1, "refresh_every": 4},
    "fast, refresh_frozen=False": {"mode": "fast", "refresh_frozen": False},
    "turbo, refresh_frozen=False": {"mode": "turbo", "refresh_frozen": False},
    "accept=confidence 0.7": {"accept": "confidence", "accept_confidence": 0.7},
    "max_denoising_steps=4": {"max_denoising_steps": 4},
    "eos_exit": {"eos_exit": True},
}


def plot(results, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = results["exact"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, key, label in (
        (
            axes[0],
            lambda r: exact.flops_per_token / r.flops_per_token,
            "decoder FLOPs per token: times fewer than exact",
        ),
        (axes[1], lambda r: r.tokens_per_s, "tokens/s (this machine)"),
    ):
        for r in results.values():
            named = r.name in ("exact", "fast", "turbo")
            ax.scatter(key(r), 100 * r.accuracy, s=60 if named else 25, marker="o" if named else "x")
            ax.annotate(r.name, (key(r), 100 * r.accuracy), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axhline(97 * exact.accuracy, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("exact-task accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].axvline(3, color="grey", lw=0.8, ls=":")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    import mlx.core as mx

    from mlx_diffgemma import load
    from mlx_diffgemma.demo import HELD_OUT, HELD_OUT_SEED, examples
    from mlx_diffgemma.evaluate import Item, evaluate, table

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n", type=int, default=HELD_OUT)
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="a subset of the variants (exact is added)")
    ap.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "modes.png")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not 0 < args.n <= HELD_OUT:
        ap.error(f"--n must be 1..{HELD_OUT}")
    names = ["exact", *[v for v in args.only or VARIANTS if v != "exact"]]
    model, tok = load(args.model)
    items = [Item(p, a) for p, a in examples(args.n, HELD_OUT_SEED)]
    results = evaluate(
        model, tok, items, {v: VARIANTS[v] for v in names},
        progress=lambda i, n: print(f"{i}/{n}", file=sys.stderr, flush=True) if i % 50 == 0 else None,
    )  # fmt: skip
    blas = "OpenBLAS" if "openblas" in " ".join(open("/proc/self/maps").read().split()).lower() else "MLX's bundled"
    where = f"{platform.machine()}, MLX {mx.__version__} on {mx.default_device()}, BLAS: {blas}"
    print(f"{args.model} (canvas {model.canvas_length}), {args.n} held-out; {where}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([r.row() for r in results.values()], indent=2))
    try:
        plot(results, args.plot, f"demo model, canvas {model.canvas_length}, {args.n} held-out; {where}")
        print(f"\nplot: {args.plot}")
    except ImportError:
        print("\n(no plot: pip install matplotlib)")


if __name__ == "__main__":
    main()
