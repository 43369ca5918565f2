"""Noise that two implementations can share: every random number of a generation as a function of a seed.

A generation consumes three kinds of noise: each block's initial canvas (uniform tokens), each step's sampling
noise (one uniform number per logit, turned into a Gumbel draw: sample = argmax(logits / T + G)) and each step's
renoise tokens for the positions not accepted. `generate_step(..., noise=CounterNoise(seed, vocab))` takes them
from here instead of MLX's random generator, and `mlx_diffgemma reference` feeds the very same numbers to
transformers' own generation loop, so the two can be replayed against each other token for token.

The numbers come from a counter-based hash (Wellons' "lowbias32" finaliser, applied twice with per-stream keys)
over the element index, in unsigned 32-bit integer arithmetic, which NumPy and MLX (on any device) compute
identically: uniforms are (2m + 1) / 2^24 for a 23-bit m, exact in float32, so both sides see the same bits.
Nothing has to be stored: for the real vocabulary one step's uniforms are 67 million numbers.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import numpy as np

KIND = "counter-v1"  # recorded in reference files; change it if the numbers below ever change
_M32 = 0xFFFFFFFF
# what a stream is for (part of its key)
CANVAS, SAMPLE, RENOISE, INPUT_TOKENS, INPUT_LOGITS = range(5)


def _mix_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_key(seed: int, purpose: int, block: int = 0, step: int = 0) -> tuple[int, int]:
    """The two 32-bit keys of one stream (a seed, what it is for, and the block and step it belongs to)."""
    k = _mix_int(seed ^ 0x9E3779B9)
    for v in (purpose, block, step):
        k = _mix_int(k ^ _mix_int(v + 0x632BE5AB))
    return k, _mix_int(k ^ 0x85EBCA6B)


def _hash(index, keys: tuple[int, int]):
    """lowbias32(lowbias32(index ^ k1) + k2), elementwise on a uint32 array (NumPy or MLX: the constants are
    made uint32 arrays of the index's kind, so both wrap modulo 2^32 alike)."""
    if isinstance(index, np.ndarray):

        def c(v):
            return np.uint32(v)
    else:

        def c(v):
            return mx.array(v, dtype=mx.uint32)

    def mix(x):
        x = x ^ (x >> c(16))
        x = x * c(0x7FEB352D)
        x = x ^ (x >> c(15))
        x = x * c(0x846CA68B)
        return x ^ (x >> c(16))

    return mix(mix(index ^ c(keys[0])) + c(keys[1]))


def _size(shape: tuple[int, ...]) -> int:
    n = int(np.prod(shape))
    if n >= 2**32:
        raise ValueError(f"a noise stream holds at most 2^32 numbers, not {n}")
    return n


def uniform_np(keys: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Uniform float32 numbers in (0, 1), NumPy."""
    h = _hash(np.arange(_size(shape), dtype=np.uint32), keys)
    return (((h >> np.uint32(9)) * np.uint32(2) + np.uint32(1)).astype(np.float32) * np.float32(2**-24)).reshape(shape)


def uniform_mx(keys: tuple[int, int], shape: tuple[int, ...]) -> mx.array:
    """Uniform float32 numbers in (0, 1), MLX: bit-identical to `uniform_np`."""
    h = _hash(mx.arange(_size(shape), dtype=mx.uint32), keys)
    return (
        ((h >> mx.array(9, dtype=mx.uint32)) * mx.array(2, dtype=mx.uint32) + mx.array(1, dtype=mx.uint32)).astype(
            mx.float32
        )
        * (2**-24)
    ).reshape(shape)


def tokens_np(keys: tuple[int, int], shape: tuple[int, ...], vocab: int) -> np.ndarray:
    """Token ids in [0, vocab), NumPy (int64)."""
    h = _hash(np.arange(_size(shape), dtype=np.uint32), keys)
    return (h % np.uint32(vocab)).astype(np.int64).reshape(shape)


def tokens_mx(keys: tuple[int, int], shape: tuple[int, ...], vocab: int) -> mx.array:
    """Token ids in [0, vocab), MLX (int32): the same ids as `tokens_np`."""
    h = _hash(mx.arange(_size(shape), dtype=mx.uint32), keys)
    return (h % mx.array(vocab, dtype=mx.uint32)).astype(mx.int32).reshape(shape)


def gumbel(u: mx.array) -> mx.array:
    """Gumbel(0, 1) draws from uniforms in (0, 1)."""
    return -mx.log(-mx.log(u))


class Noise(Protocol):
    """Where a generation's randomness comes from (`generate_step(..., noise=...)`). Blocks count from 0, steps
    within a block from 1, as `Step` events number them."""

    def canvas(self, block: int, shape: tuple[int, int]) -> mx.array:
        """The block's initial canvas, int32 token ids (B, C)."""
        ...

    def sample(self, block: int, step: int, shape: tuple[int, int, int]) -> mx.array:
        """Gumbel noise (B, C, V), float32, added to the temperature-scaled logits before the argmax."""
        ...

    def renoise(self, block: int, step: int, shape: tuple[int, int]) -> mx.array:
        """Token ids (B, C) for the positions this step does not accept."""
        ...


class CounterNoise:
    """The shared noise of `mlx_diffgemma reference` files: a function of (seed, block, step), computed here on the
    device. The same seed gives the same generation, here and in transformers driven by `reference.py`."""

    def __init__(self, seed: int, vocab_size: int):
        self.seed, self.vocab = int(seed), int(vocab_size)

    def canvas(self, block: int, shape: tuple[int, int]) -> mx.array:
        return tokens_mx(stream_key(self.seed, CANVAS, block), shape, self.vocab)

    def sample(self, block: int, step: int, shape: tuple[int, int, int]) -> mx.array:
        return gumbel(uniform_mx(stream_key(self.seed, SAMPLE, block, step), shape))

    def renoise(self, block: int, step: int, shape: tuple[int, int]) -> mx.array:
        return tokens_mx(stream_key(self.seed, RENOISE, block, step), shape, self.vocab)


def trajectory_inputs(seed: int, vocab: int, canvas: int, blocks: int = 2) -> dict[str, list[np.ndarray]]:
    """The fixed trajectory's inputs besides the prompt, NumPy, (1, C) ids and (1, C, V) float32 logits: per block
    a canvas, self-conditioning logits (uniform in [-6, 6), as sharp as a model's), and the tokens committed."""
    return {
        "canvases": [tokens_np(stream_key(seed, INPUT_TOKENS, b, 0), (1, canvas), vocab) for b in range(blocks)],
        "sc_logits": [
            np.float32(12.0) * (uniform_np(stream_key(seed, INPUT_LOGITS, b), (1, canvas, vocab)) - np.float32(0.5))
            for b in range(blocks)
        ],
        "blocks": [tokens_np(stream_key(seed, INPUT_TOKENS, b, 1), (1, canvas), vocab) for b in range(blocks)],
    }
