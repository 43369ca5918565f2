"""The prompt KV cache that the encoder writes and the decoder reads.

Sliding layers keep exactly what transformers' `DynamicCache` keeps: the last `sliding_window - 1` positions.
Full layers keep everything, in a buffer preallocated in chunks so that committing a block writes in place
instead of copying the cache. Arrays are (B, kv_heads, positions, head_dim).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

KV = tuple[mx.array, mx.array]
# What a layer does with the K/V of its new tokens: returns the keys and values that the new tokens attend to.
KVSource = Callable[[mx.array, mx.array], KV]


class FullAttentionCache:
    """Every position, in a buffer grown `step` positions at a time."""

    step = 2048

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> KV:
        """Append new K/V (encode) and return all cached K/V, new included."""
        B, n, L, D = k.shape
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            size = -(-end // self.step) * self.step
            grown_k = mx.zeros((B, n, size, D), k.dtype)
            grown_v = mx.zeros((B, n, size, v.shape[3]), v.dtype)
            if self.keys is not None and self.offset:
                grown_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
                grown_v[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = grown_k, grown_v
        self.keys[..., self.offset : end, :] = k
        self.values[..., self.offset : end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def context(self) -> KV | None:
        if self.keys is None or not self.offset:
            return None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def set_state(self, keys: mx.array, values: mx.array, offset: int) -> None:
        self.keys, self.values, self.offset = keys, values, offset


class SlidingWindowCache:
    """The last `window - 1` positions (transformers' DynamicSlidingWindowLayer)."""

    def __init__(self, window: int) -> None:
        self.keep = window - 1
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen in total

    def update_and_fetch(self, k: mx.array, v: mx.array) -> KV:
        """Append new K/V (encode); return the window before them plus all of them (what they attend to)."""
        if self.keys is not None:
            k = mx.concatenate([self.keys, k], axis=2)
            v = mx.concatenate([self.values, v], axis=2)
        self.offset += k.shape[2] - (0 if self.keys is None else self.keys.shape[2])
        start = max(k.shape[2] - self.keep, 0)
        self.keys, self.values = k[..., start:, :], v[..., start:, :]
        return k, v

    def context(self) -> KV | None:
        if self.keys is None or not self.keys.shape[2]:
            return None
        return self.keys, self.values

    def set_state(self, keys: mx.array, values: mx.array, offset: int) -> None:
        self.keys, self.values, self.offset = keys, values, offset


LayerCache = FullAttentionCache | SlidingWindowCache


class PromptCache:
    """One cache per layer; `offset` is the number of positions encoded so far."""

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else 0

    def writers(self) -> list[KVSource]:
        """KV sources for `encode`: append the new tokens' K/V."""
        return [c.update_and_fetch for c in self.layers]

    def readers(self) -> list[KVSource]:
        """KV sources for `denoise`: attend to the cache plus the new tokens, leaving the cache untouched."""
        return [context_source(c.context()) for c in self.layers]

    def snapshot(self) -> list[tuple]:
        """A cheap restore point (no copies): encoding only appends past each layer's offset (full layers) or
        replaces the window arrays (sliding layers), so the references taken here stay valid."""
        return [(c.keys, c.values, c.offset) for c in self.layers]

    def restore(self, snapshot: list[tuple]) -> None:
        """Drop everything encoded since `snapshot` was taken."""
        for c, (keys, values, offset) in zip(self.layers, snapshot):
            if isinstance(c, FullAttentionCache) and c.keys is not None:
                c.offset = offset  # positions before it were never written since
            else:
                c.set_state(keys, values, offset)

    def materialize(self) -> None:
        """Evaluate every layer's cached K/V."""
        mx.eval([kv for kv in self.state() if kv is not None])

    def state(self) -> list[KV | None]:
        """Each layer's cached K/V (no copies), for saving."""
        return [c.context() for c in self.layers]


def context_source(context: KV | None) -> KVSource:
    """A KV source that prepends fixed K/V to the new tokens' own (denoising; training, where gradients flow
    through `context`)."""

    def read(k: mx.array, v: mx.array) -> KV:
        if context is None:
            return k, v
        return mx.concatenate([context[0], k], axis=2), mx.concatenate([context[1], v], axis=2)

    return read


class CacheFileError(ValueError):
    """A saved cache that cannot be restored here, with the reason in one line."""


FORMAT = "mlx-diffgemma-cache/1"


def save_cache(path: str | Path, cache: PromptCache, metadata: dict[str, Any]) -> None:
    """Write the cache's K/V and `metadata` (JSON-able) to a safetensors file, atomically: a temporary file beside
    `path` renamed into place once complete, so an interrupted save leaves no file that loads."""
    path = Path(path)
    arrays: dict[str, mx.array] = {}
    for i, kv in enumerate(cache.state()):
        if kv is not None:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = kv
    meta = {"format": FORMAT, "offsets": json.dumps([c.offset for c in cache.layers]), "meta": json.dumps(metadata)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent or ".")
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_cache(path: str | Path, cache: PromptCache) -> dict[str, Any]:
    """Fill an empty `cache` (from the same model's make_cache) from a file written by save_cache; returns the
    metadata it was saved with."""
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises several types for missing or damaged files
        raise CacheFileError(f"cannot read cache file {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{path} is not an mlx-diffgemma cache file (format {meta.get('format')!r})")
    offsets = json.loads(meta["offsets"])
    if len(offsets) != len(cache.layers):
        raise CacheFileError(f"{path} holds {len(offsets)} layers, this model has {len(cache.layers)}")
    for i, (layer, offset) in enumerate(zip(cache.layers, offsets)):
        if f"{i}.keys" in arrays:
            layer.set_state(arrays[f"{i}.keys"], arrays[f"{i}.values"], offset)
    return json.loads(meta["meta"])
