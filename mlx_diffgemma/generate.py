"""The block-diffusion loop (transformers' `DiffusionGemmaGenerationMixin.generate`) as a generator of events.

`generate_step` is the token-level core: it yields a `Step` per denoising step and a `Commit` per block, and knows
nothing of tokenizers or terminals. Text-level `stream_generate` / `generate` build on it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx

from . import sampling
from .cache import PromptCache
from .config import GenerationConfig
from .model import Model


@dataclass(frozen=True)
class Step:
    """One denoising step of one block."""

    block: int  # 0-based block index
    step: int  # transformers' countdown: N on the first step of a block, 1 on the last possible one
    draft: mx.array  # (C,) the argmax canvas after this step (unevaluated until read)
    accepted: mx.array  # () how many positions the sampler accepted this step


@dataclass(frozen=True)
class Commit:
    """A finished block: its tokens up to (not including) the first EOS and within max_tokens."""

    block: int
    tokens: list[int]
    steps: int  # denoising steps (decoder forward passes) this block took
    finished: bool  # an EOS was generated or max_tokens reached: no block follows
    finish_reason: str | None  # "eos" or "length" when finished


def settings(model: Model, **overrides) -> GenerationConfig:
    """The checkpoint's generation defaults with keyword overrides, validated (a ConfigError on bad values)."""
    base = getattr(model, "generation_config", None) or GenerationConfig()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GenerationConfig)}
    if unknown:
        raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
    g = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if isinstance(g.eos_token_id, int):
        g.eos_token_id = [g.eos_token_id]
    g.validate()
    return g


def _make_step_fn(g: GenerationConfig, vocab: int):
    """The pure part of a denoising step, compiled: sample, accept, renoise, test the stop criterion."""

    def step_fn(logits, canvas, history, temp, key):
        k_sample, k_noise = mx.random.split(key)
        processed = logits / temp  # (B, C, V) temperature-scaled
        sampled = sampling.sample(processed, key=k_sample).astype(canvas.dtype)
        argmax = processed.argmax(axis=-1).astype(canvas.dtype)
        mask = sampling.accept_mask(processed, g.entropy_bound)
        noise = sampling.random_canvas(canvas.shape, vocab, key=k_noise).astype(canvas.dtype)
        canvas = sampling.renoise(sampling.accept(canvas, sampled, mask), mask, noise)
        stop, history = sampling.stop_criterion(history, argmax, processed, g.confidence_threshold)
        return canvas, argmax, processed, mask.sum(axis=-1), stop.all(), history

    return mx.compile(step_fn)


def generate_step(
    model: Model,
    prompt: mx.array,
    g: GenerationConfig,
    max_tokens: int,
    cache: PromptCache | None = None,
    key: mx.array | None = None,
) -> Iterator[Step | Commit]:
    """Encode `prompt` (1, P) into `cache` (new if None), then generate ceil(max_tokens / C) blocks at most.

    Each block starts from uniform random tokens and runs up to `max_denoising_steps` steps; it commits its argmax
    canvas, which is encoded into the cache only when another block follows (as transformers does)."""
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must have shape (1, P), got {tuple(prompt.shape)}")
    cache = cache if cache is not None else model.make_cache()
    key = key if key is not None else mx.random.key(int(time.time_ns() % 2**31))
    C, V, N = model.canvas_length, model.args.vocab_size, g.max_denoising_steps
    step_fn = _make_step_fn(g, V)
    eos = set(g.eos_token_id)
    pending = prompt  # tokens to encode before the next block
    produced = 0
    for block in range(math.ceil(max_tokens / C)):
        model.encode(pending, cache)
        key, k_init = mx.random.split(key)
        canvas = sampling.random_canvas((1, C), V, key=k_init)
        history = sampling.new_history(g.stability_threshold, 1, C)
        sc, argmax, steps = None, canvas, 0
        for step in range(N, 0, -1):
            key, k_step = mx.random.split(key)
            logits = model.denoise(canvas, cache, sc)
            temp = mx.array(sampling.temperature(step, g.t_min, g.t_max, N), dtype=mx.float32)
            canvas, argmax, sc, accepted, stop, history = step_fn(logits, canvas, history, temp, k_step)
            steps += 1
            mx.async_eval(canvas, argmax, stop)
            yield Step(block, step, argmax[0], accepted[0])
            if stop.item():  # the one host read per step
                break
        tokens = argmax[0].tolist()
        hits = [i for i, t in enumerate(tokens) if t in eos]
        cut = hits[0] if hits else C
        keep = min(cut, max_tokens - produced)
        produced += keep
        reason = "eos" if hits and keep == cut else "length" if produced >= max_tokens else None
        yield Commit(block, tokens[:keep], steps, reason is not None, reason)
        if reason is not None:
            return
        pending = argmax
