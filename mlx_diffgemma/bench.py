"""`mlx_diffgemma bench`: a denoising step on this machine and this model, taken apart.

Measures, in one run: the machine's own matmul rate (a square float matmul in the model's dtype), one full step
as generation runs it (`generate_step`, sampler included), each component of a step timed alone on the same
inputs, and end-to-end generation on a fixed prompt; and sets them beside the step's floating-point work
(`accounting.step_costs`), so the achieved rate of each component reads against the machine's limit.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from . import accounting, memory, native, streams
from .generate import _make_split_step_fn, _make_step_fn, generate_step, prefill, settings
from .model import Model

NEVER_STOP = dict(stability_threshold=1, confidence_threshold=1e-30, eos_token_id=[])


def _timed(fn: Callable[[], object], runs: int = 3) -> float:
    """Seconds of the fastest of `runs` evaluations of fn() after one warm-up."""
    mx.eval(fn())
    best = math.inf
    for _ in range(runs):
        tic = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - tic)
    return best


def matmul_rate(dtype: mx.Dtype, n: int | None = None) -> float:
    """FLOP/s of an n x n matmul in `dtype` (n 2048 on the CPU, 4096 on a GPU)."""
    n = n or (4096 if mx.default_device() == mx.gpu else 2048)
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b)
    return 2 * n**3 / _timed(lambda: a @ b)


def weight_bits(model: Model) -> float:
    """Bits per weight as stored (quantized models: their bits, scales and biases included)."""
    q = model.config.quantization
    if not q:
        return 8 * model.dtype.size
    bits, group = q.get("bits", 4), q.get("group_size", 64)
    return bits + (2 * 8 * model.dtype.size / group if q.get("mode", "affine") == "affine" else 8 / group)


def component_times(model: Model, prefix: int, seed: int = 0) -> dict[str, float]:
    """Seconds of each component of one step (canvas C over `prefix` cached positions), each timed alone on the
    inputs a real step gives it: attention, dense MLP, router and experts summed over the layers; then the output
    head, self-conditioning (probabilities @ embedding matrix and its MLP) and the sampler."""
    V, C = model.args.vocab_size, model.canvas_length
    key = mx.random.key(seed)
    cache = model.make_cache()
    prefill(model, mx.random.randint(0, V, (1, prefix), key=key), cache)
    cache.materialize()
    memory.drop_stale_buffers(cache)  # as generation does after the prompt
    canvas = mx.random.randint(0, V, (1, C), key=mx.random.split(key)[0])
    # as generation runs it: with the native kernels the sampler applies the final softcap to the raw logits
    cap = (model.args.final_logit_softcapping or 0.0) if native.available() else 0.0
    logits = model.denoise(canvas, cache, softcap=not cap)
    g = settings(model, **NEVER_STOP)
    if (streams.enabled() or native.available()) and C > 1:  # timed here with its noise drawn, not overlapped
        prepare, split = _make_split_step_fn(g, (1, C, V), cap)

        def step_fn(logits, canvas, history, temp, key):
            return split(logits, canvas, history, temp, *prepare(key))
    else:
        step_fn = _make_step_fn(g, V, cap)
    from .sampling import new_history

    history, temp = new_history(g.stability_threshold, 1, C), mx.array(g.t_max, dtype=mx.float32)
    _, _, probs, *_ = step_fn(logits, canvas, history, temp, key)
    mx.eval(probs)
    times = dict.fromkeys(accounting.COMPONENTS, 0.0)
    times["sampler"] = _timed(lambda: step_fn(logits, canvas, history, temp, key))
    x = model.embed(canvas)
    times["self-conditioning"] = _timed(lambda: model.self_conditioning(x, model.soft_embed_probs(probs)))
    h = model.self_conditioning(x, model.soft_embed_probs(probs))
    mx.eval(h)
    for layer, source in zip(model.layers, cache.readers()):
        normed = layer.input_layernorm(h)
        attn = _timed(lambda layer=layer, n=normed, s=source: layer.self_attn(n, cache.offset, s, None))
        times["attention"] += attn
        mid = h + layer.post_attention_layernorm(layer.self_attn(normed, cache.offset, source, None))
        mx.eval(mid)
        times["dense MLP"] += _timed(lambda layer=layer, m=mid: layer.mlp(layer.pre_feedforward_layernorm(m)))
        flat = mid.reshape(-1, mid.shape[-1])
        times["router"] += _timed(lambda layer=layer, f=flat: layer.router(f))
        idx, w = layer.router(flat)
        mx.eval(idx, w)
        ex_in = layer.pre_feedforward_layernorm_2(flat)
        mx.eval(ex_in)
        times["experts"] += _timed(lambda layer=layer, a=ex_in, i=idx, ww=w: layer.experts(a, i, ww))
        h = layer(h, cache.offset, source, None, True)
        mx.eval(h)
    hn = model.norm(h)
    mx.eval(hn)
    times["output head"] = _timed(lambda: model.logits(hn, softcap=not cap))
    return times


def step_rate(model: Model, prefix: int, steps: int = 3, seed: int = 0) -> float:
    """Denoising steps per second of `generate_step` (sampler included; the first step, without
    self-conditioning, and the prompt's encoding not counted)."""
    V, C = model.args.vocab_size, model.canvas_length
    key = mx.random.key(seed)
    ids = mx.random.randint(0, V, (1, prefix), key=key)
    g = settings(model, max_denoising_steps=steps + 1, **NEVER_STOP)
    stamps = []
    for event in generate_step(model, ids, g, C, key=key):
        if not hasattr(event, "draft"):
            break
        mx.eval(event.draft)
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


@dataclass
class Report:
    prefix: int
    costs: dict[str, accounting.Cost]
    matmul_flops: float | None = None  # the machine's rate (the fastest of the run's measurements)
    matmul_range: tuple[float, float] | None = None  # the slowest and fastest of them
    times: dict[str, float] = field(default_factory=dict)  # seconds per component
    steps_per_s: float | None = None
    end_to_end: dict[str, float] = field(default_factory=dict)
    native: str | None = None  # the native CPU kernels' state (on the CPU)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """Markdown: per component GFLOP, weights and activations moved, time and achieved rate."""
        peak = self.matmul_flops
        rows = [
            "| component | GFLOP | weights (MB) | activations (MB) | time (ms) | GFLOP/s | of matmul peak |",
            "|---|---|---|---|---|---|---|",
        ]
        total = accounting.total(self.costs)
        for name, c in [*self.costs.items(), ("step (sum)", total)]:
            t = self.times.get(name) if name != "step (sum)" else (sum(self.times.values()) or None)
            rate = c.flops / t / 1e9 if t else None
            rows.append(
                f"| {name} | {_num(c.flops / 1e9)} | {_num(c.weight_bytes / 1e6)} | {_num(c.activation_bytes / 1e6)} | "
                + (f"{_num(t * 1e3)} | {_num(rate)} | " if t else "| | ")
                + (f"{100 * rate * 1e9 / peak:.0f}% |" if t and peak else "|")
            )
        return "\n".join(rows)

    def summary(self) -> list[str]:
        total = accounting.total(self.costs)
        lines = [f"one step over a canvas after {self.prefix} cached positions: {total.flops / 1e9:.1f} GFLOP"]
        if self.native:
            lines.append(f"native CPU kernels: {self.native}")
        lines += self.notes
        if self.matmul_flops:
            spread = ""
            if self.matmul_range and self.matmul_range[0] < 0.9 * self.matmul_range[1]:
                spread = (
                    f" (the fastest of 6 runs before and after the step; the slowest {self.matmul_range[0] / 1e9:.1f})"
                )
            lines.append(f"this machine's matmul: {self.matmul_flops / 1e9:.1f} GFLOP/s{spread}")
        if self.steps_per_s:
            achieved = total.flops * self.steps_per_s
            share = f" ({100 * achieved / self.matmul_flops:.0f}% of the matmul rate)" if self.matmul_flops else ""
            lines.append(
                f"generation's step: {self.steps_per_s:.3f} steps/s, {1e3 / self.steps_per_s:.0f} ms, "
                f"{achieved / 1e9:.1f} GFLOP/s{share}"
            )
        if self.end_to_end:
            e = self.end_to_end
            lines.append(
                f"end to end: {e['tokens']:.0f} tokens in {e['seconds']:.2f} s, {e['tokens'] / e['seconds']:.1f} "
                f"tok/s, {e['steps']:.0f} denoising steps"
            )
        return lines


def blas_note() -> str | None:
    """A hint when MLX runs on a preloaded OpenBLAS whose idle workers spin: they sleep only after 2^28 cycles
    unless OPENBLAS_THREAD_TIMEOUT says otherwise (read when the library loads, so it cannot be set from here)."""
    preloaded = any("openblas" in p for p in os.environ.get("LD_PRELOAD", "").split(":"))
    if not preloaded or os.environ.get("OPENBLAS_THREAD_TIMEOUT"):
        return None
    return (
        "note: OpenBLAS's idle threads spin between products and take a core from the rest of the step; "
        "OPENBLAS_THREAD_TIMEOUT=4 in the environment (as `make` sets it) made a step 10% faster on a 2-core Zen 3"
    )


def _num(x: float) -> str:
    """Three significant digits, at least one decimal below 100."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}" if x < 1 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def end_to_end(model: Model, tokenizer, prompt: str, max_tokens: int, seed: int = 0) -> dict[str, float]:
    """Generation with the checkpoint's own settings on a fixed prompt (a warm-up run first)."""
    from .generate import Done, stream_generate

    runs = []
    for _ in range(2):
        tic = time.perf_counter()
        for event in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, seed=seed):
            if isinstance(event, Done):
                done = event
        runs.append((time.perf_counter() - tic, done))
    seconds, done = runs[-1]
    return {"seconds": seconds, "tokens": done.generation_tokens, "steps": done.denoising_steps}


def run(
    model: Model | None,
    config,
    prefix: int,
    steps: int = 3,
    tokenizer=None,
    prompt: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Report:
    """The whole report; `model` None: the accounting alone (a config without weights)."""
    bits = weight_bits(model) if model is not None else 16
    report = Report(prefix, accounting.step_costs(config, prefix, weight_bits=bits))
    if model is None:
        return report
    say = log or (lambda s: None)
    if mx.default_device() == mx.cpu:
        report.native = native.describe()
        report.notes += [n for n in (blas_note(),) if n]
    say("measuring the machine's matmul rate")
    rates = [matmul_rate(model.dtype) for _ in range(3)]
    say("timing each component of a step")
    report.times = component_times(model, prefix)
    say("timing generation's step")
    report.steps_per_s = step_rate(model, prefix, steps)
    say("measuring the matmul rate again")
    rates += [matmul_rate(model.dtype) for _ in range(3)]
    # the fastest seen before and after: where the machine's speed wanders, the step's share is not flattered
    report.matmul_flops, report.matmul_range = max(rates), (min(rates), max(rates))
    if tokenizer is not None and prompt:
        say("generating end to end")
        report.end_to_end = end_to_end(model, tokenizer, prompt, model.canvas_length)
    return report
