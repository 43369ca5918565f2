"""The block-diffusion sampler as pure functions, matching transformers' classes on the same inputs.

`step` counts down from N (first denoising step) to 1, as in transformers. Shapes: B batch, C canvas, V vocab.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import fastmath, kernels, native, streams
from .noise import gumbel

_TINY = float(np.nextafter(np.float32(0), np.float32(1)))  # the low end of MLX's Gumbel uniforms


def temperature(step: int | mx.array, t_min: float, t_max: float, max_steps: int) -> float | mx.array:
    """LinearTemperatureScheduleLogitsProcessor: t_max at step N, falling linearly to t_min + (t_max-t_min)/N."""
    return t_min + (t_max - t_min) * (step / max_steps)


def softmax_entropy(logits: mx.array) -> tuple[mx.array, mx.array]:
    """softmax(logits) (B, C, V) and its entropy (B, C), float32, from one exponential per logit: the one pass
    over the vocabulary that a step needs (the probabilities feed sampling and self-conditioning, the entropy
    acceptance and stopping)."""
    x = logits.astype(mx.float32)
    z = x - x.max(axis=-1, keepdims=True)
    e = fastmath.exp(z) if fastmath.enabled() else mx.exp(z)
    total = e.sum(axis=-1, keepdims=True)
    h = mx.log(total[..., 0]) - (e * z).sum(axis=-1) / total[..., 0]
    return e / total, h


def entropy(logits: mx.array) -> mx.array:
    """Entropy of softmax(logits) over the last axis, (B, C, V) -> (B, C), in float32:
    log(sum(e)) - sum(e * z) / sum(e) with z = x - max(x), e = exp(z) (one exponential per logit, and no
    cancellation between large terms when the distribution is sharp)."""
    x = logits.astype(mx.float32)
    z = x - x.max(axis=-1, keepdims=True)
    e = mx.exp(z)
    total = e.sum(axis=-1)
    return mx.log(total) - (e * z).sum(axis=-1) / total


def accept_mask(logits: mx.array | None, entropy_bound: float | mx.array, h: mx.array | None = None) -> mx.array:
    """EntropyBoundSampler acceptance: sort entropies ascending and accept the longest prefix whose cumulative sum
    minus its own largest entropy is <= entropy_bound (the lowest-entropy position is always accepted).
    `h`: the entropies of `logits`, when already computed."""
    h = entropy(logits) if h is None else h  # (B, C)
    order = mx.argsort(h, axis=-1)
    sorted_h = mx.take_along_axis(h, order, axis=-1)
    selected = (mx.cumsum(sorted_h, axis=-1) - sorted_h) <= entropy_bound
    return mx.take_along_axis(selected, mx.argsort(order, axis=-1), axis=-1)  # back to canvas order


def accept(current: mx.array, sampled: mx.array, mask: mx.array) -> mx.array:
    """Accepted positions take the sampled token, the others keep the current canvas."""
    return mx.where(mask, sampled, current)


def renoise(accepted: mx.array, mask: mx.array, noise: mx.array) -> mx.array:
    """Non-accepted positions get fresh uniform tokens (`noise`, same shape as the canvas)."""
    return mx.where(mask, accepted, noise)


def settle(
    canvas: mx.array,
    sampled: mx.array,
    argmax: mx.array,
    h: mx.array,
    history: mx.array,
    noise: mx.array,
    entropy_bound: float | mx.array,
    confidence_threshold: float,
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The end of every denoising step: accept the sampled tokens where the entropy bound says (entropies `h`),
    renoise the other positions with `noise`, and test the stop criterion on the argmax canvas. Returns (the next
    canvas, the accepted mask, stop (B,), the updated history)."""
    mask = accept_mask(None, entropy_bound, h)
    canvas = renoise(accept(canvas, sampled, mask), mask, noise)
    stop, history = stop_criterion(history, argmax, None, confidence_threshold, h)
    return canvas, mask, stop, history


def random_canvas(shape: tuple[int, int], vocab_size: int, key: mx.array | None = None) -> mx.array:
    """Uniform random tokens in [0, vocab_size)."""
    return mx.random.randint(0, vocab_size, shape, dtype=mx.int32, key=key)


def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
    """One draw per position from softmax(logits): (B, C, V) -> (B, C) (Gumbel-max: a uniform number and two
    logarithms per logit; the same key gives the same draws as every earlier version of this package)."""
    return mx.random.categorical(logits, axis=-1, key=key)


def gumbel_uniforms(shape: tuple[int, ...], key: mx.array) -> mx.array:
    """The uniform numbers `sample` draws with `key` (MLX's categorical takes argmax(logits - log(-log u)) over
    these): a fused pass given them samples exactly what `sample` samples. For (B, C, V) with C >= 2 only: over a
    single row MLX's categorical draws other numbers (checked for several V, MLX 0.32.4)."""
    if native.available():  # the same numbers, drawn vectorised on every core
        return native.uniform(key, shape, _TINY, 1.0)
    return mx.random.uniform(low=_TINY, high=1.0, shape=shape, key=key)


def gumbel_draws(shape: tuple[int, ...], key: mx.array) -> mx.array:
    """The Gumbel noise `sample` adds to the logits with `key`: sample(logits, key) is argmax(logits + this)
    (C >= 2, as for `gumbel_uniforms`)."""
    return gumbel(gumbel_uniforms(shape, key))


def gumbel_ahead(shape: tuple[int, ...], keys: list[mx.array], uniform: bool = False) -> mx.array:
    """`gumbel_draws(shape, key)` for each key (`gumbel_uniforms` when `uniform`: the native pass takes their
    logarithms itself), stacked along axis 0, drawn on the second CPU stream and started now: it depends on
    nothing but the keys, so it is ready by the time the decoder's forward is."""
    draw = gumbel_uniforms if uniform else gumbel_draws
    with mx.stream(streams.side() if streams.enabled() else streams.main()):
        draws = [draw(shape, k) for k in keys]
        out = draws[0] if len(draws) == 1 else mx.concatenate(draws)
    mx.async_eval(out)
    return out


def _half_pass(logits: mx.array, temps: mx.array, gumbel: mx.array) -> tuple[mx.array, ...]:
    processed = logits / temps
    probs, h = softmax_entropy(processed)
    return probs, h, processed.argmax(axis=-1), (processed + gumbel).argmax(axis=-1)


_half_pass_compiled = mx.compile(_half_pass)


def split_pass(
    logits: mx.array, temps: mx.array, noise: mx.array, uniform: bool = False, cap: float = 0.0
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The sampler's pass over the vocabulary on the CPU's cores: from logits (B, C, V), temperatures
    broadcastable to (B, 1, 1) and Gumbel noise (B, C, V), the probabilities of logits / temps, their entropies,
    the argmax and the sample argmax(logits / temps + noise). `uniform`: the noise is `gumbel_uniforms`, not yet
    Gumbel draws; `cap`: the logits are raw, before the final softcap (0: none to apply).
    With the native kernels (native/) one vectorised pass on every core; without, two halves of the canvas on
    two CPU streams (MLX's CPU backend runs a stream's elementwise work on one thread), each row seeing the
    operations it would see in one pass: the same numbers."""
    if native.available():
        return native_pass(logits, temps, noise, uniform, cap)
    gumbel_noise = gumbel(noise) if uniform else noise
    if cap:
        logits = fastmath.softcap(logits, cap)
    C = logits.shape[1]
    parts = []
    for stream, half in zip((streams.main(), streams.side()), (slice(0, C // 2), slice(C // 2, C))):
        with mx.stream(stream):
            parts.append(_half_pass_compiled(logits[:, half], temps, gumbel_noise[:, half]))
    probs, h, argmax, sampled = (mx.concatenate(list(x), axis=1) for x in zip(*parts))
    return probs, h, argmax, sampled


def native_pass(
    logits: mx.array, temps: mx.array, noise: mx.array, uniform: bool, cap: float = 0.0
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """`split_pass` through the native kernel: (B, C, V) logits, temperatures broadcastable to (B, C, 1)."""
    B, C, V = logits.shape
    t = mx.broadcast_to(temps.astype(mx.float32), (B, C, 1)).reshape(B * C)
    probs, h, argmax, sampled = native.vocab_pass(
        logits.reshape(B * C, V), t, noise.reshape(B * C, V), cap=cap, uniform=uniform
    )
    return probs.reshape(B, C, V), h.reshape(B, C), argmax.reshape(B, C), sampled.reshape(B, C)


def fused_pass(
    logits: mx.array, temps: mx.array, uniforms: mx.array, cap: float
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The sampler's pass over the vocabulary in one read, through the kernel dispatcher: from raw logits (B, C,
    V) (before the final softcap `cap`), temperatures (B, C) and `gumbel_uniforms` (B, C, V), the entropy, the
    log-sum-exp of the scaled logits, the argmax and the sample, each (B, C)."""
    B, C, V = logits.shape
    stats, ids = kernels.vocab_pass(logits.reshape(B * C, V), temps.reshape(B * C), uniforms.reshape(B * C, V), cap)
    return stats[:, 2].reshape(B, C), stats[:, 1].reshape(B, C), ids[:, 0].reshape(B, C), ids[:, 1].reshape(B, C)


def new_history(stability_threshold: int, batch: int, canvas: int) -> mx.array:
    """The argmax history for the stability test, filled with -1 (matches no token)."""
    return mx.full((stability_threshold, batch, canvas), -1, dtype=mx.int32)


def stop_criterion(
    history: mx.array, argmax: mx.array, logits: mx.array, confidence_threshold: float, h: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """StableAndConfidentStoppingCriteria: stop where the argmax canvas equals each of the last
    `stability_threshold` ones (history (S, B, C); S = 0 means always stable) and the mean entropy of the
    temperature-scaled logits is below `confidence_threshold`. Returns (stop (B,), updated history).
    `h`: the entropies of `logits`, when already computed."""
    if history.shape[0] == 0:
        stable = mx.ones((argmax.shape[0],), dtype=mx.bool_)
    else:
        stable = (history == argmax[None].astype(history.dtype)).all(axis=(0, 2))
        history = mx.concatenate([history[1:], argmax[None].astype(history.dtype)], axis=0)
    confident = (entropy(logits) if h is None else h).mean(axis=-1) < confidence_threshold
    return stable & confident, history
