"""The prompt KV cache that the encoder writes and the decoder reads.

Sliding layers keep exactly what transformers' `DynamicCache` keeps: the last `sliding_window - 1` positions.
Full layers keep everything, in a buffer preallocated in chunks so that committing a block writes in place
instead of copying the cache. Arrays are (B, kv_heads, positions, head_dim).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

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


def subset(cache: PromptCache, rows: list[int]) -> PromptCache:
    """A new cache holding only the given batch rows (copies of their slots; `cache` is unchanged)."""
    idx = mx.array(rows)
    layers = []
    for c in cache.layers:
        layer, ctx = _blank(c), c.context()
        if ctx is not None:
            layer.set_state(ctx[0][idx], ctx[1][idx], c.offset)
        layer.offset = c.offset
        layers.append(layer)
    return PromptCache(layers)


def _blank(layer: LayerCache) -> LayerCache:
    return SlidingWindowCache(layer.keep + 1) if isinstance(layer, SlidingWindowCache) else FullAttentionCache()


def join_rows(caches: list[PromptCache], starts: list[mx.array]) -> tuple[PromptCache, mx.array]:
    """Stack batches whose caches hold different numbers of slots into one, left-padding the shorter ones with
    zero K/V: a row's slots keep their order and end at the common last slot, so its positions are unchanged.
    `starts[i]` (B_i,) are each batch's first real slots; returns the joined cache and its starts. Every cache
    must hold at least one position."""
    total = max(c.offset for c in caches)
    layers = []
    for per_layer in zip(*(c.layers for c in caches)):
        contexts = [c.context() for c in per_layer]
        width = max(kv[0].shape[2] for kv in contexts)
        keys, values = [], []
        for kv in contexts:
            for out, a in ((keys, kv[0]), (values, kv[1])):
                pad = width - a.shape[2]
                out.append(
                    mx.concatenate([mx.zeros((*a.shape[:2], pad, a.shape[3]), a.dtype), a], axis=2) if pad else a
                )
        layer = _blank(per_layer[0])
        layer.set_state(mx.concatenate(keys), mx.concatenate(values), total)
        layers.append(layer)
    start = mx.concatenate([s + (total - c.offset) for c, s in zip(caches, starts)])
    return PromptCache(layers), start


def context_source(context: KV | None) -> KVSource:
    """A KV source that prepends fixed K/V to the new tokens' own (denoising; training, where gradients flow
    through `context`)."""

    def read(k: mx.array, v: mx.array) -> KV:
        if context is None:
            return k, v
        return mx.concatenate([context[0], k], axis=2), mx.concatenate([context[1], v], axis=2)

    read.context = context  # for an attention that reads the two parts without joining them (model.Attention)
    return read


class CacheFileError(ValueError):
    """A saved cache that cannot be restored here, with the reason in one line."""


FORMAT = "mlx-diffgemma-cache/1"


def _digest(arrays: dict[str, mx.array]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
        h.update(memoryview(np.ascontiguousarray(np.array(raw, copy=False))).cast("B"))
    return h.hexdigest()


def save_cache(path: str | Path, cache: PromptCache, metadata: dict[str, Any]) -> None:
    """Write the cache's K/V and `metadata` (JSON-able) to a safetensors file (whatever its name), with a digest of
    the arrays, atomically: written beside `path` and renamed into place once complete, so an interrupted save
    leaves no file that loads and the previous one, if any, whole."""
    from .files import replace_path, staging_file

    path = Path(path)
    arrays: dict[str, mx.array] = {}
    for i, kv in enumerate(cache.state()):
        if kv is not None:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = kv
    mx.eval(arrays)
    meta = {
        "format": FORMAT,
        "offsets": json.dumps([c.offset for c in cache.layers]),
        "meta": json.dumps(metadata),
        "digest": _digest(arrays),
    }
    tmp = staging_file(path)
    try:
        with open(tmp, "wb") as f:  # a file object: MLX would append ".safetensors" to a name without it
            mx.save_safetensors(f, arrays, metadata=meta)
            f.flush()
            os.fsync(f.fileno())
        replace_path(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def saved_metadata(path: str | Path) -> dict[str, Any] | None:
    """The metadata `save_cache` wrote into `path` (read from the header alone), or None when `path` is not such a
    file. A CacheFileError when it is one whose metadata is damaged."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 1 << 26:
                return None
            header = json.loads(f.read(n))
        meta = header.get("__metadata__", {})
    except (OSError, ValueError, struct.error, AttributeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    try:
        metadata = json.loads(meta["meta"])
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not an object")
    except (KeyError, ValueError, TypeError) as e:
        raise CacheFileError(f"{path} is damaged ({e})") from None
    return metadata


def is_cache_file(path: str | Path) -> bool:
    """Whether `path` is a file that `save_cache` wrote (its header says so; nothing else is read)."""
    try:
        return saved_metadata(path) is not None
    except CacheFileError:
        return True


def load_cache(path: str | Path, cache: PromptCache, shapes: list[tuple[int, int]], dtype: mx.Dtype) -> dict[str, Any]:
    """Fill an empty `cache` (from the same model's make_cache) from a file written by save_cache, whatever its
    name; returns the metadata it was saved with. `shapes` is each layer's (kv_heads, head_dim) and `dtype` the
    model's: a file whose arrays do not fit them, or whose digest does not match its arrays, is refused."""
    p = Path(path)
    if p.is_dir():
        raise CacheFileError(f"{path} is a folder, not a saved chat")
    try:
        arrays, meta = mx.load(str(p), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX raises several types for missing or damaged files
        reason = "no such file" if not p.exists() else f"not a safetensors file ({type(e).__name__})"
        raise CacheFileError(f"cannot read cache file {path}: {reason}") from None
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{path} is not an mlx-diffgemma cache file (format {meta.get('format')!r})")
    try:
        offsets = json.loads(meta["offsets"])
        metadata = json.loads(meta["meta"])
        digest = meta["digest"]
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not an object")
        if not isinstance(offsets, list) or not all(type(o) is int and o >= 0 for o in offsets):
            raise ValueError("bad offsets")
    except (KeyError, ValueError, TypeError) as e:
        raise CacheFileError(f"{path} is damaged ({e})") from None
    if len(offsets) != len(cache.layers):
        raise CacheFileError(f"{path} holds {len(offsets)} layers, this model has {len(cache.layers)}")
    if _digest(arrays) != digest:
        raise CacheFileError(f"{path} is damaged: its arrays do not match the digest saved with them")
    if len(set(offsets)) > 1:
        raise CacheFileError(f"{path} is damaged: its layers hold different numbers of positions")
    names = {f"{i}.{kind}" for i, o in enumerate(offsets) if o for kind in ("keys", "values")}
    if set(arrays) != names:
        raise CacheFileError(f"{path} is damaged: it does not hold one key and one value array per layer")
    for i, (layer, offset, (heads, dim)) in enumerate(zip(cache.layers, offsets, shapes)):
        if not offset:
            continue
        keys, values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
        held = offset if isinstance(layer, FullAttentionCache) else min(offset, layer.keep)
        for a in (keys, values):
            if a.ndim != 4 or tuple(a.shape[1:]) != (heads, held, dim) or a.dtype != dtype:
                raise CacheFileError(
                    f"{path} does not fit this model: layer {i} holds {a.dtype} {tuple(a.shape)}, expected "
                    f"{dtype} (B, {heads}, {held}, {dim})"
                )
        layer.set_state(keys, values, offset)
    return metadata
