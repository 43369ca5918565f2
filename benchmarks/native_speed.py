"""The native CPU kernels (mlx_diffgemma/native) against their pure-MLX references, side by side in one process:
each op on a denoising step's shapes, then generation's step on the bench checkpoint, the kernels on and off
(MLX_DIFFGEMMA_NATIVE toggled between interleaved rounds: the same process, model and machine noise).

    python benchmarks/native_speed.py [--prefix 256] [--rounds 3] [--steps 3]

The bench checkpoint is bench_step.py's (built with transformers on first use).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, runs: int = 5) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(runs):
        tic = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - tic)
    return best


def both(fn) -> tuple[float, float]:
    """(seconds with the kernels, seconds without), fn called under each setting."""
    out = []
    for flag in ("1", "0"):
        os.environ["MLX_DIFFGEMMA_NATIVE"] = flag
        out.append(timed(fn))
    os.environ["MLX_DIFFGEMMA_NATIVE"] = "1"
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-diffgemma-bench"))
    args = ap.parse_args()

    import bench_step

    from mlx_diffgemma import fastmath, load, native, sampling
    from mlx_diffgemma.bench import step_rate
    from mlx_diffgemma.noise import gumbel

    if native.state() != "ok":
        sys.exit(f"error: native CPU kernels not in use: {native.state()}")
    blas = os.environ.get("LD_PRELOAD", "MLX's bundled BLAS")
    print(f"# mlx {mx.__version__}, native kernels {native.describe()}, BLAS {blas}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}")  # fmt: skip
    model = load(bench_step.build(args.workdir / "checkpoint"))[0]
    C, V = model.canvas_length, model.args.vocab_size
    a = model.layers[3].self_attn  # a full-attention layer
    key = mx.random.key(0)
    logits = mx.random.normal((1, C, V), key=key) * 8
    scores = mx.random.normal((1, 2, 4 * C, C + args.prefix), key=key) * 3
    q = mx.random.normal((1, C, a.n_heads, a.head_dim), key=key)
    hidden = mx.random.normal((C, model.args.hidden_size), key=key)
    layer = model.layers[0]
    idx, w = layer.router(hidden)
    u = sampling.gumbel_uniforms((1, C, V), key)
    mx.eval(logits, scores, q, idx, w, u)
    temp = mx.array(0.8, dtype=mx.float32)
    cap = model.args.final_logit_softcapping or 30.0

    def vocab():
        if native.available():
            return sampling.split_pass(logits, temp, u, uniform=True, cap=cap)
        return sampling._half_pass(fastmath.softcap(logits, cap), temp, gumbel(u))

    ops = {
        f"softmax over a full layer's scores {tuple(scores.shape)}": lambda: fastmath.softmax(scores),
        f"softcap of the logits {tuple(logits.shape)}": lambda: fastmath.softcap(logits, cap),
        "the sampler's vocabulary pass (softcap, Gumbel logs, softmax, entropy, argmax, draw), one stream": vocab,
        f"uniforms for the draw {tuple(u.shape)}": lambda: sampling.gumbel_uniforms((1, C, V), key),
        f"rotary embedding of a full layer's queries {tuple(q.shape)}": lambda: (
            a._rope(q.transpose(0, 2, 1, 3), args.prefix)
            if not native.available()
            else native.rope(q, *a._rope_table(C, args.prefix))
        ),
        f"experts of one layer ({C} tokens)": lambda: layer.experts(hidden, idx, w),
    }
    print("| op | native (ms) | pure MLX (ms) | ratio |")
    print("|---|---|---|---|")
    for name, fn in ops.items():
        on, off = both(fn)
        print(f"| {name} | {on * 1e3:.1f} | {off * 1e3:.1f} | {off / on:.1f}x |")

    rates: dict[str, list[float]] = {"1": [], "0": []}
    step_rate(model, args.prefix, steps=1)  # warm-up
    for _ in range(args.rounds):
        for flag in ("1", "0"):
            os.environ["MLX_DIFFGEMMA_NATIVE"] = flag
            rates[flag].append(step_rate(model, args.prefix, steps=args.steps))
    os.environ["MLX_DIFFGEMMA_NATIVE"] = "1"
    on, off = statistics.median(rates["1"]), statistics.median(rates["0"])
    print(
        f"\ngeneration's step at prefix {args.prefix} ({args.rounds} interleaved rounds of {args.steps} steps): "
        f"native {min(rates['1']):.3f}-{on:.3f} steps/s, pure MLX {min(rates['0']):.3f}-{off:.3f} "
        f"(min-median): {on / off:.2f}x"
    )


if __name__ == "__main__":
    main()
