"""Top-k self-conditioning (`sc_top_k`, opt-in) against exact: what it costs in quality on the demo model and
what it saves at the real model's shapes.

1. Next step: along exact generations of held-out prompts, every (canvas, probabilities) pair of the first block
   is fed to the decoder with exact self-conditioning and with the top-k one: max and mean |logit difference|,
   top-1 agreement, and the probability mass the top k leave out.
2. Answers: the held-out set generated with each k and with exact mode (same seeds): exact-task accuracy, answers
   that differ from exact mode's, steps per block.
3. Cost of the self-conditioning input for one step at the real shapes (256 positions, vocabulary 262,144, hidden
   2,816, float32 table) on this machine: the whole softmax times the table against k gathered rows.

    python benchmarks/sc_top_k.py [--n 200] [--ks 16 64 256]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.demo import HELD_OUT_SEED, examples
from mlx_diffgemma.generate import Done, prefill, render_prompt, sampling, settings


def next_step(model, tok, n: int, ks: list[int]) -> dict[int, dict]:
    g = settings(model)
    C, V = model.canvas_length, model.args.vocab_size
    stats = {k: {"max": 0.0, "sum": 0.0, "n": 0, "top1": 0, "dropped": 0.0} for k in ks}
    for i, (prompt, _) in enumerate(examples(n, HELD_OUT_SEED)):
        cache = model.make_cache()
        prefill(model, mx.array([render_prompt(tok, prompt)]), cache)
        key = mx.random.key(i)
        key, k_init = mx.random.split(key)
        canvas, sc = sampling.random_canvas((1, C), V, key=k_init), None
        for countdown in range(g.max_denoising_steps, 0, -1):
            logits = model.denoise(canvas, cache, self_conditioning_probs=sc)
            if sc is not None:
                for k in ks:
                    approx = model.denoise(canvas, cache, self_conditioning_probs=sc, sc_top_k=k)
                    d = mx.abs(approx - logits)
                    s = stats[k]
                    s["max"] = max(s["max"], float(d.max()))
                    s["sum"] += float(d.mean()) * C
                    s["n"] += C
                    s["top1"] += int((approx.argmax(-1) == logits.argmax(-1)).sum())
                    s["dropped"] += float(model.soft_embed_top_k(sc, k)[1].sum())
            temp = sampling.temperature(countdown, g.t_min, g.t_max, g.max_denoising_steps)
            processed = logits / temp
            sc, h = sampling.softmax_entropy(processed)
            key, k_step = mx.random.split(key)
            k_sample, k_noise = mx.random.split(k_step)
            mask = sampling.accept_mask(processed, g.entropy_bound, h)
            sampled = sampling.sample(processed, key=k_sample).astype(canvas.dtype)
            noise = sampling.random_canvas(canvas.shape, V, key=k_noise).astype(canvas.dtype)
            canvas = sampling.renoise(sampling.accept(canvas, sampled, mask), mask, noise)
            if bool((h.mean() < g.confidence_threshold).item()):
                break
    return stats


def answers(model, tok, n: int, k: int | None) -> tuple[list[str], float, float]:
    texts, right, steps, blocks = [], 0, 0, 0
    for i, (prompt, answer) in enumerate(examples(n, HELD_OUT_SEED)):
        for e in stream_generate(model, tok, prompt, seed=i, sc_top_k=k):
            if isinstance(e, Done):
                texts.append(e.text)
                right += e.text.strip() == answer
                steps += e.denoising_steps
                blocks += max(1, -(-e.generation_tokens // model.canvas_length))
    return texts, right / n, steps / blocks


def cost(ks: list[int]) -> dict[str, float]:
    C, V, H = 256, 262_144, 2816
    probs = mx.softmax(mx.random.normal((1, C, V)) * 4, axis=-1)
    table = mx.random.normal((V, H)) * 0.02
    mx.eval(probs, table)

    def exact():
        return probs @ table

    def top_k(k):
        idx = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
        return (mx.take_along_axis(probs, idx, axis=-1)[..., None] * table[idx]).sum(axis=-2)

    out = {}
    for name, fn in [("exact", exact)] + [(f"k={k}", lambda k=k: top_k(k)) for k in ks]:
        mx.eval(fn())
        tic = time.perf_counter()
        mx.eval(fn())
        out[name] = time.perf_counter() - tic
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--next-step-n", type=int, default=50)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    args = ap.parse_args()
    model, tok = load("demo")
    print(f"demo model (vocabulary {model.args.vocab_size}); MLX {mx.__version__} ({mx.default_device()})\n")
    stats = next_step(model, tok, args.next_step_n, args.ks)
    base, acc, spb = answers(model, tok, args.n, None)
    print("| self-conditioning | next-step max / mean abs logit diff | next-step top-1 | mass left out | "
          f"exact-task accuracy ({args.n}) | answers unlike exact mode | steps per block |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(f"| exact | 0 / 0 | 100% | 0 | {100 * acc:.1f}% | 0 | {spb:.2f} |")
    for k in args.ks:
        s = stats[k]
        texts, acc_k, spb_k = answers(model, tok, args.n, k)
        changed = sum(a != b for a, b in zip(texts, base))
        n = max(s["n"], 1)
        diff = f"{s['max']:.2e} / {s['sum'] / n:.2e}"
        print(f"| top-{k} | {diff} | {100 * s['top1'] / n:.2f}% | {s['dropped'] / n:.2e} | {100 * acc_k:.1f}% | "
              f"{changed} | {spb_k:.2f} |", flush=True)  # fmt: skip
    times = cost(args.ks)
    print("\nThe self-conditioning input for one step at the real shapes (256 x 262,144 -> 2,816), this machine:")
    print(" | ".join(f"{k}: {1e3 * v:.0f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
