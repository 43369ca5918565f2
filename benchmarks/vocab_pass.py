"""The vocabulary pass on this machine: today's step operations (softmax and entropy in one pass, argmax, a
Gumbel-max draw) against the kernels' pure-MLX reference (`kernels.vocab.reference`: softcap, temperature, max,
log-sum-exp, entropy, argmax and the draw from given uniforms, without the (N, V) probabilities), and the
dispatcher's choice (the reference off a GPU). Off a GPU this measures the reference's cost, not a kernel's.

    python benchmarks/vocab_pass.py [--rows 256] [--vocab 32768 262144]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from mlx_diffgemma import fastmath, kernels, sampling
from mlx_diffgemma.kernels import vocab


def today(logits, temps, key):
    x = fastmath.softcap(logits, 30.0) if fastmath.enabled() else 30.0 * mx.tanh(logits / 30.0)
    processed = x / temps[:, None]
    probs, h = sampling.softmax_entropy(processed[None])
    return probs, h, processed.argmax(-1), sampling.sample(processed, key=key)


def timed(fn, *args, rounds=5) -> float:
    mx.eval(fn(*args))
    best = float("inf")
    for _ in range(rounds):
        tic = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - tic)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32_768, 262_144])
    args = ap.parse_args()
    print(f"MLX {mx.__version__} ({mx.default_device()}), kernel target: {kernels.target()}; best of 5, ms\n")
    print("| rows x vocab | today's step ops (with probabilities) | reference, given uniforms | dispatcher |")
    print("|---|---|---|---|")
    for V in args.vocab:
        logits = mx.random.normal((args.rows, V)) * 8
        temps = mx.full((args.rows,), 0.6)
        u = mx.random.uniform(shape=(args.rows, V))
        mx.eval(logits, temps, u)
        a = timed(today, logits, temps, mx.random.key(0))
        b = timed(vocab.reference, logits, temps, u, 30.0)
        c = timed(kernels.vocab_pass, logits, temps, u, 30.0)
        print(f"| {args.rows} x {V:,} | {1e3 * a:.0f} | {1e3 * b:.0f} | {1e3 * c:.0f} |", flush=True)


if __name__ == "__main__":
    main()
