"""What a generation will need in memory, and what the machine has, so that a prompt that cannot fit is refused
with the numbers before any work (instead of the process being killed, or worse, half way through).

The estimate counts what grows with the prompt: the KV cache (full-attention layers keep every position, in
buffers grown 2,048 positions at a time; sliding layers keep the last window), and the larger of the two working
sets that come and go: a prefill chunk (its attention over the cache, its feed-forward) and a denoising step
(attention of the canvas over the cache, the cache and canvas K/V joined per layer, the (C, V) logits and the
sampler's passes over them). Off the GPU, attention scores are counted in float32, as MLX's unfused attention
materialises them; Metal's fused attention does not. `benchmarks/prompt_memory.py` sets the estimate beside
measured peaks.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import mlx.core as mx

from .cache import FullAttentionCache, PromptCache
from .config import TextConfig

GB = 1e9


@dataclass(frozen=True)
class Estimate:
    kv_cache: int  # bytes
    prefill: int  # bytes of one prefill chunk's working set
    denoise: int  # bytes of one denoising step's working set

    @property
    def total(self) -> int:
        return self.kv_cache + max(self.prefill, self.denoise)


def estimate(
    cfg: TextConfig,
    canvas: int,
    itemsize: int,
    positions: int,
    chunk: int,
    batch: int = 1,
    dense_experts: bool = True,
    fused_attention: bool = False,
) -> Estimate:
    """Bytes for a context of `positions` tokens (prompt and generated blocks), prefilled `chunk` at a time."""
    kv, joined = 0, 0
    W = cfg.sliding_window
    for s in cfg.layers:
        per_position = 2 * s.num_key_value_heads * s.head_dim * itemsize * batch  # K and V
        if s.is_sliding:
            kv += per_position * min(positions, W - 1)
        else:
            kv += per_position * math.ceil(positions / FullAttentionCache.step) * FullAttentionCache.step
        joined = max(joined, per_position * (positions + max(canvas, chunk)))
    H, heads = cfg.hidden_size, cfg.num_attention_heads
    experts = cfg.num_experts if dense_experts else cfg.top_k_experts

    def working(n: int, keys: int) -> int:
        scores = 0 if fused_attention else heads * n * keys * 4 * batch  # float32 scores, softmax in place
        ffn = n * batch * (2 * cfg.intermediate_size + experts * 3 * cfg.moe_intermediate_size + 6 * H) * 4
        return scores + ffn + joined

    prefill = working(min(chunk, positions), positions)
    logits = 6 * canvas * cfg.vocab_size * 4 * batch  # logits, scaled, softmax, sampler passes (float32)
    denoise = working(canvas, positions) + logits
    return Estimate(kv, prefill, denoise)


def available() -> int | None:
    """Bytes this process can still allocate for arrays: on a Mac with Metal, the GPU's recommended working set
    less what MLX's arrays hold; elsewhere, the memory the OS reports available (Linux MemAvailable, else
    physical memory less MLX's arrays) plus MLX's cache of freed buffers, which it reuses. None when the machine
    does not say."""
    override = os.environ.get("MLX_DIFFGEMMA_MEMORY_GB")  # a cap of the user's own (shared machines)
    if override:
        try:
            return int(float(override) * GB)
        except ValueError:
            pass
    if mx.default_device() == mx.gpu and sys.platform == "darwin":
        info = mx.device_info()
        limit = info.get("max_recommended_working_set_size") or info.get("memory_size")
        return int(limit) - mx.get_active_memory() if limit else None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + mx.get_cache_memory()
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") - mx.get_active_memory()
    except (ValueError, OSError, AttributeError):
        return None


def fmt(n: float) -> str:
    """Bytes for people: 1.23 GB, 45.6 MB, 789 KB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GB' else 1 if unit == 'MB' else 0}f} {unit}"
    return f"{int(n)} B"


CPU_BUFFER_CACHE = 1 << 30  # bytes


def stale_buffers() -> bool:
    """Whether MLX's CPU buffer cache is over half full, where the shapes a step allocates are about to change (a
    block's first step attends to 256 more keys than the last block's; a prompt's encoding leaves buffers shaped
    for its own pieces): `drop_stale_buffers` then empties it. MLX's CPU allocator never evicts: once
    full of buffers no step asks for again, every buffer a step frees goes back to the OS and comes back page by
    page the next step (at a prefix of 8,192 after the prompt's encoding: 128,000 page faults, 1 s of system time
    per 1.9 s step on a 2-core Zen 3). Emptying costs one step's page faults. Always False on the GPU."""
    if mx.default_device() != mx.cpu:
        return False
    limit = mx.set_cache_limit(1 << 62)  # MLX has no getter: read by raising it, put back (nothing is freed)
    mx.set_cache_limit(limit)
    return mx.get_cache_memory() > limit // 2


def drop_stale_buffers(cache: PromptCache) -> None:
    """After an encoding into `cache` (a prompt, a block's commit): when `stale_buffers()`, evaluate the encoding
    (its own buffers are freed first) and empty MLX's buffer cache."""
    if stale_buffers():
        cache.materialize()
        mx.clear_cache()


def keep_step_buffers() -> None:
    """On the CPU, let MLX keep up to 1 GiB (at most 1/16 of the machine's memory) of freed buffers for reuse, from
    32 MB: a denoising step frees and allocates again the same large buffers (the (C, V) logits and
    probabilities, each 32 MB on the bench model; attention scores of 69 MB per full layer at a prefix of 8,192),
    and every one above the cache's size came back from the OS page by page (page faults and zeroing: 20-25% of
    a full layer's attention at that prefix). Only ever raises the limit; the GPU keeps MLX's own policy."""
    if mx.default_device() != mx.cpu:
        return
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 16 * CPU_BUFFER_CACHE
    want = min(CPU_BUFFER_CACHE, physical // 16)
    previous = mx.set_cache_limit(want)
    if previous > want:
        mx.set_cache_limit(previous)
