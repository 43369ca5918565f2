"""Two CPU streams for MLX's CPU backend, where each stream evaluates its operations on one thread: only the
matrix products (BLAS) use more than one core, and the elementwise work between them (exponentials, softmax,
GELU, the sampler's pass over the vocabulary) runs on one. Work split over two streams runs on two.
MLX_DIFFGEMMA_STREAMS=0 keeps everything on one stream."""

from __future__ import annotations

import os

import mlx.core as mx

_SIDE: mx.Stream | None = None


def enabled() -> bool:
    """Whether to split work over two CPU streams: on the CPU, unless MLX_DIFFGEMMA_STREAMS=0."""
    return os.environ.get("MLX_DIFFGEMMA_STREAMS", "1") != "0" and mx.default_device() == mx.cpu


def side() -> mx.Stream:
    """The second CPU stream (its own thread), made once per process."""
    global _SIDE
    if _SIDE is None:
        _SIDE = mx.new_stream(mx.cpu)
    return _SIDE


def main() -> mx.Stream:
    return mx.default_stream(mx.cpu)
