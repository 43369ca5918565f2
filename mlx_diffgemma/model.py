"""DiffusionGemma text model in pure MLX: one set of weights, run causally (encode) or bidirectionally (denoise).

Mirrors transformers' `modular_diffusion_gemma.py`. Module attribute names equal the checkpoint's, so `sanitize`
only strips prefixes. Shapes: B batch, L new tokens, S attended positions, C canvas, H hidden, V vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import fastmath, kernels, native
from .cache import FullAttentionCache, KVSource, PromptCache, SlidingWindowCache, context_source
from .config import LayerSpec, ModelConfig, TextConfig

Mask = mx.array | str | None


def _gelu_tanh(x: mx.array) -> mx.array:
    return fastmath.gelu_approx(x) if fastmath.enabled() else nn.gelu_approx(x)


def _activation(name: str):
    return _gelu_tanh if name == "gelu_pytorch_tanh" else nn.gelu


def attention(q: mx.array, k: mx.array, v: mx.array, mask: Mask) -> mx.array:
    """Scaled (by 1.0) dot-product attention, q (B, Hq, L, D) over k, v (B, Hk, S, D) with Hq a multiple of Hk;
    mask None, "causal" (the last L of S positions) or a bool array (L, S) or (B | 1, Hq | 1, L | 1, S). MLX's
    fused kernel where it has one; on the CPU (where MLX's version is these same matmuls, with its slower
    exponential) the query heads of each KV head are stacked into one matmul and the softmax is fastmath's."""
    if not fastmath.enabled():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    scores = q.reshape(B, Hk, Hq // Hk * L, D) @ k.swapaxes(-1, -2)  # (B, Hk, groups * L, S)
    if mask is not None:
        if isinstance(mask, str):  # causal: query i (at S - L + i) sees keys up to itself
            mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        if mask.ndim == 4:  # (B | 1, Hq | 1, L | 1, S) -> (B | 1, Hk | 1, groups | 1, L | 1, S)
            b, h, l, _ = mask.shape
            mask = mask[:, :, None] if h == 1 else mask.reshape(b, Hk, Hq // Hk, l, S)
        scores = mx.where(mask, scores.reshape(B, Hk, -1, L, S), -mx.inf).reshape(B, Hk, -1, S)
    probs = fastmath.softmax(scores).astype(v.dtype)
    return (probs @ v).reshape(B, Hq, L, -1)


# keys from which the native attention runs: any number (on a 2-core Zen 3 it was faster than the matmuls and
# fastmath's softmax from 272 keys, 1.2x at 512 over 64-wide heads, to 8,448, 1.15x over 512-wide ones)
NATIVE_ATTENTION_KEYS = 1


@mx.custom_function
def _native_attention(q: mx.array, k1: mx.array, v1: mx.array, k2: mx.array, v2: mx.array) -> mx.array:
    """native.attention with the derivative of `attention` over the joined keys (training through a context)."""
    return native.attention(q, k1, v1, k2, v2)


@_native_attention.vjp
def _native_attention_vjp(primals, cotangent, output):
    def reference(q, k1, v1, k2, v2):
        return attention(q, mx.concatenate([k1, k2], axis=2), mx.concatenate([v1, v2], axis=2), None)

    return tuple(mx.vjp(reference, list(primals), [cotangent])[1])


def _native_attention_runs(q: mx.array, kv: KVSource, k: mx.array, mask: Mask) -> bool:
    """Whether the native attention computes this call: no mask, a KV source that joins a fixed context to the
    new keys (denoising's), float32, on the CPU with the kernels built, and enough keys for it to pay."""
    context = getattr(kv, "context", None)
    return (
        mask is None
        and context is not None
        and native.available()
        and context[0].shape[2] + k.shape[2] >= NATIVE_ATTENTION_KEYS
        and all(a.dtype == mx.float32 for a in (q, k, *context))
    )


@functools.cache
def _native_rms_norm(eps: float, weighted: bool):
    """native.rms_norm as a function of (x, weight) or (x,), with mx.fast.rms_norm's derivative."""

    def reference(*a: mx.array) -> mx.array:
        return mx.fast.rms_norm(a[0], a[1] if weighted else None, eps)

    @mx.custom_function
    def norm(*a: mx.array) -> mx.array:
        return native.rms_norm(a[0], a[1] if weighted else None, eps)

    @norm.vjp
    def norm_vjp(primals, cotangent, output):
        primals = [primals] if isinstance(primals, mx.array) else list(primals)  # one argument comes bare
        return tuple(mx.vjp(reference, primals, [cotangent])[1])

    return norm


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """mx.fast.rms_norm; on the CPU with the native kernels, float32, their version of it (the same numbers:
    MLX's CPU form is several single-threaded passes, each row's sum one chain of additions)."""
    if x.dtype == mx.float32 and (weight is None or weight.dtype == mx.float32) and native.available():
        return _native_rms_norm(float(eps), weight is not None)(*((x,) if weight is None else (x, weight)))
    return mx.fast.rms_norm(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


def _rope_freqs(params: dict[str, Any], head_dim: int) -> mx.array:
    """Wavelengths (1 / inverse frequency) for mx.fast.rope over the whole head dim, as transformers builds them.

    "proportional" rotates the first `partial_rotary_factor` of the angles with exponents over the *full* head
    dim and leaves the rest unrotated (infinite wavelength)."""
    base = float(params["rope_theta"])
    if params.get("rope_type", "default") == "proportional":
        rotated = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        factor = float(params.get("factor", 1.0))
    else:
        rotated, factor = head_dim // 2, 1.0
    exponents = mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim
    return mx.concatenate([factor * base**exponents, mx.full((head_dim // 2 - rotated,), mx.inf)])


@mx.custom_function
def _native_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """native.rope (x (B, L, H, D) -> rotated (B, H, L, D)) with its derivative: the inverse rotation of the
    cotangent, transposed back (cos and sin are constants of the positions)."""
    return native.rope(x, cos, sin)


@_native_rope.vjp
def _native_rope_vjp(primals, cotangent, output):
    x, cos, sin = primals
    if cos.ndim == 3:  # one row of positions per batch row: (B, L, D/2) -> (B, 1, L, D/2)
        cos, sin = cos[:, None], sin[:, None]
    g1, g2 = mx.split(cotangent, 2, axis=-1)
    gx = mx.concatenate([g1 * cos + g2 * sin, g2 * cos - g1 * sin], axis=-1).transpose(0, 2, 1, 3)
    return gx, mx.zeros_like(primals[1]), mx.zeros_like(primals[2])


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec, rope: dict[str, Any]):
        super().__init__()
        H, hd = cfg.hidden_size, spec.head_dim
        self.n_heads, self.head_dim, self.eps = cfg.num_attention_heads, hd, cfg.rms_norm_eps
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(H, spec.num_key_value_heads * hd, bias=False)
        if spec.has_v_proj:  # full layers use K as V
            self.v_proj = nn.Linear(H, spec.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self._freqs = _rope_freqs(rope, hd)
        self._tables: dict[tuple[int, int], tuple[mx.array, mx.array]] = {}  # (L, offset) -> the native rope's cos, sin

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """x (B, heads, L, hd) at positions offset.. (an int, or one offset per row (B,)), or at the positions
        `offset` (B, L) gives one by one (a speed mode's scattered canvas positions)."""
        if isinstance(offset, mx.array) and offset.ndim == 2:  # each position its own row for mx.fast.rope
            B, h, L, d = x.shape
            rows = x.transpose(0, 2, 1, 3).reshape(B * L, h, 1, d)
            return self._rope(rows, offset.reshape(-1)).reshape(B, L, h, d).transpose(0, 2, 1, 3)
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)

    def _rope_table(self, L: int, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        """cos and sin of the rotary angles at positions offset.. (L, hd/2), or (B, L, hd/2) for one offset per
        row, computed as mx.fast.rope's CPU form computes them (so the native rope gives its numbers). A block's
        steps share their positions: kept per (L, offset)."""
        key = (L, offset) if isinstance(offset, int) else None
        if key in self._tables:
            return self._tables[key]
        off = mx.array(offset, dtype=mx.int32) if isinstance(offset, int) else offset.astype(mx.int32)[:, None]
        positions = (mx.arange(L, dtype=mx.float32) + off) * mx.array(1.0, dtype=mx.float32)
        theta = positions[..., None] * mx.reciprocal(self._freqs)
        table = (mx.cos(theta), mx.sin(theta))
        if key is not None:
            if len(self._tables) >= 4:
                self._tables.clear()
            self._tables[key] = table
        return table

    def _native_rope(self, x: mx.array, offset: int | mx.array) -> bool:
        return native.available() and x.dtype == mx.float32 and (isinstance(offset, int) or offset.ndim == 1)

    def __call__(self, x: mx.array, offset: int | mx.array, kv: KVSource, mask: Mask) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, -1, self.head_dim))
        k_raw = self.k_proj(x).reshape(B, L, -1, self.head_dim)
        v = self.v_proj(x).reshape(B, L, -1, self.head_dim) if "v_proj" in self else k_raw
        if self._native_rope(q, offset):  # rotation and transpose in one pass over each, on every core
            cos, sin = self._rope_table(L, offset)
            q, k = _native_rope(q, cos, sin), _native_rope(self.k_norm(k_raw), cos, sin)
        else:
            q = self._rope(q.transpose(0, 2, 1, 3), offset)  # (B, heads, L, hd)
            k = self._rope(self.k_norm(k_raw).transpose(0, 2, 1, 3), offset)  # (B, kv_heads, L, hd)
        v = rms_norm(v, None, self.eps).transpose(0, 2, 1, 3)  # v_norm has no scale
        if _native_attention_runs(q, kv, k, mask):  # the cache's keys read in place, not joined to the new ones
            own = getattr(kv, "own", None)  # a speed mode's partial step: the canvas's K/V, its fresh ones put in
            k2, v2 = own(k, v) if own is not None else (k, v)
            o = _native_attention(q, kv.context[0], kv.context[1], k2, v2)
        else:
            keys, values = kv(k, v)  # (B, kv_heads, S, hd)
            o = attention(q, keys, values, mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)
        self.act = _activation(activation)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k routing on the raw residual; weights renormalised, then scaled per expert."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = mx.ones((cfg.hidden_size,))
        self.per_expert_scale = mx.ones((cfg.num_experts,))
        self.top_k, self.eps, self.root = cfg.top_k_experts, cfg.rms_norm_eps, cfg.hidden_size**-0.5

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        h = rms_norm(x, None, self.eps) * self.scale * self.root
        if not self.training and kernels.use_kernel("route"):  # inference: the fused kernel (no derivative)
            return kernels.route_kernel(self.proj(h).astype(mx.float32), self.per_expert_scale, self.top_k)
        probs = mx.softmax(self.proj(h).astype(mx.float32), axis=-1)  # (N, E)
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k])  # (N, k)
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        return idx, w * self.per_expert_scale[idx]


class SwitchLinear(nn.Module):
    """Per-expert weights (E, out, in), applied to each token's chosen experts."""

    def __init__(self, dims_in: int, dims_out: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, dims_out, dims_in))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def expert(self, e: int, x: mx.array) -> mx.array:  # (n, in) -> (n, out) for one expert
        return x @ self.weight[e].T

    def gather(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)

    def dense(self, x: mx.array) -> mx.array:  # (N, in) -> (E, N, out): every expert on every token
        return x @ self.weight.swapaxes(-1, -2)

    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = "affine", quantize_input: bool = False
    ) -> QuantizedSwitchLinear:
        if quantize_input:
            raise ValueError("activation quantization is not supported for experts")
        q = QuantizedSwitchLinear(group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(self.weight, q.group_size, q.bits, mode=mode)
        if biases:
            q.biases = biases[0]
        return q


class QuantizedSwitchLinear(nn.Module):
    """Quantized per-expert weights, applied with gather_qmm (any MLX quantization mode)."""

    def __init__(self, group_size: int | None, bits: int | None, mode: str):
        super().__init__()
        defaults = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}[mode]
        self.group_size, self.bits, self.mode = group_size or defaults[0], bits or defaults[1], mode
        self.freeze()

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def expert(self, e: int, x: mx.array) -> mx.array:  # (n, in) -> (n, out) for one expert
        biases = self.get("biases")
        return mx.quantized_matmul(
            x,
            self.weight[e],
            self.scales[e],
            None if biases is None else biases[e],
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    def gather(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=idx,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


def expert_path() -> str:
    """How the experts run: "gather" (gather_mm / gather_qmm over the chosen experts: the GPU's path),
    "segments" (tokens sorted by expert, one matmul per expert over its own rows, the counts read on the host: the
    CPU's path, where gather_mm is slow and float32-only), "native" (the segments' arithmetic in one native CPU
    primitive, native/cpu_ops.cpp: no host read; float32 weights and GELU-tanh gating, else the segments), or
    "dense" (every expert on every token, weighted: the simplest, kept as a check). Same numbers each way;
    MLX_DIFFGEMMA_EXPERTS=dense|gather|segments|native overrides."""
    forced = os.environ.get("MLX_DIFFGEMMA_EXPERTS")
    if forced in ("dense", "gather", "segments", "native"):
        return forced
    if mx.default_device() == mx.gpu:
        return "gather"
    return "native" if native.available() else "segments"


def _weighted(y: mx.array, w: mx.array) -> mx.array:
    """The experts' outputs (N * k, H), one per (token, slot), summed per token with the weights w (N, k)."""
    return (y.reshape(*w.shape, -1) * w[..., None]).sum(axis=1)


class Experts(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = SwitchLinear(H, 2 * I, E)  # rows: gate then up
        self.down_proj = SwitchLinear(I, H, E)
        self.act = _activation(cfg.hidden_activation)

    def dense(self) -> bool:
        """Whether every expert runs on every token here (the dense path), rather than the chosen ones."""
        return expert_path() == "dense" and isinstance(self.gate_up_proj, SwitchLinear)

    def _glu(self, gu: mx.array) -> mx.array:
        gate, up = mx.split(gu, 2, axis=-1)
        return self.act(gate) * up

    def __call__(self, x: mx.array, idx: mx.array, w: mx.array) -> mx.array:
        """x (N, H), idx (N, k) expert ids, w (N, k) float32 weights -> (N, H)."""
        path = expert_path()
        if path == "dense" and isinstance(self.gate_up_proj, SwitchLinear):
            y = self.down_proj.dense(self._glu(self.gate_up_proj.dense(x)))  # (E, N, H)
            onehot = idx[..., None] == mx.arange(y.shape[0])  # (N, k, E)
            dense_w = (onehot * w[..., None]).sum(axis=1)  # (N, E)
            return (y * dense_w.T[..., None]).sum(axis=0).astype(x.dtype)
        if path == "native" and self._native_ok(x):
            return self._native(x, idx, w).astype(x.dtype)
        if path in ("segments", "native"):
            y = self._segments(x, idx)
        else:
            y = self._gather(x, idx)
        return _weighted(y, w).astype(x.dtype)

    def _native(self, x: mx.array, idx: mx.array, w: mx.array) -> mx.array:
        """The native primitive, its derivative that of the segments path over the same weights."""

        def reference(x, w, gate_up, down):
            return _weighted(self._segments(x, idx, gate_up, down), w)

        @mx.custom_function
        def fn(x, w, gate_up, down):
            return native.experts(x, idx, w, gate_up, down)

        @fn.vjp
        def fn_vjp(primals, cotangent, output):
            return tuple(mx.vjp(reference, list(primals), [cotangent])[1])

        return fn(x, w, self.gate_up_proj.weight, self.down_proj.weight)

    def _native_ok(self, x: mx.array) -> bool:
        """Whether the native primitive computes this call: float32, unquantized, GELU-tanh gating."""
        return (
            native.available()
            and isinstance(self.gate_up_proj, SwitchLinear)
            and x.dtype == mx.float32
            and self.gate_up_proj.weight.dtype == mx.float32
            and self.down_proj.weight.dtype == mx.float32
            and self.act is _gelu_tanh
        )

    def _segments(
        self, x: mx.array, idx: mx.array, gate_up: mx.array | None = None, down: mx.array | None = None
    ) -> mx.array:
        """(N, H) x (N, k) expert ids -> (N * k, H), each expert applied to its own tokens only: the (token, slot)
        pairs sorted by expert, one matmul per expert over its contiguous rows. Reads the per-expert counts on the
        host (one synchronisation per layer). `gate_up`, `down`: float weights (E, out, in) to use instead of the
        layers' (the native path's derivative)."""
        N, k = idx.shape
        flat = mx.stop_gradient(idx.flatten())
        order = mx.stop_gradient(mx.argsort(flat))
        counts = np.bincount(np.array(flat), minlength=self.gate_up_proj.num_experts)
        xs = x[order // k]  # (N * k, H), grouped by expert
        parts, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = xs[start : start + n]
                if gate_up is None:
                    h = self._glu(self.gate_up_proj.expert(e, rows))
                    parts.append(self.down_proj.expert(e, h))
                else:
                    parts.append(self._glu(rows @ gate_up[e].T) @ down[e].T)
            start += n
        return mx.concatenate(parts)[mx.stop_gradient(mx.argsort(order))]

    def _gather(self, x: mx.array, idx: mx.array) -> mx.array:
        """(N, H) x (N, k) -> (N * k, H) with gather_mm / gather_qmm."""
        N, k = idx.shape
        do_sort = idx.size >= 64
        xe = x[:, None, None, :]  # (N, 1, 1, H)
        flat = idx
        if do_sort:  # group tokens by expert so each expert's weights are read once
            flat = idx.flatten()
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            xe, flat = xe.flatten(0, -3)[order // k], flat[order]
        h = self._glu(self.gate_up_proj.gather(xe, flat, do_sort))
        y = self.down_proj.gather(h, flat, do_sort)
        return (y[inv] if do_sort else y).reshape(N * k, -1)


class Layer(nn.Module):
    """Shared by encoder and decoder; only the layer scalar differs (`layer_scalar` is the decoder's)."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, spec, cfg.rope_parameters[spec.layer_type])
        self.mlp = MLP(H, cfg.intermediate_size, cfg.hidden_activation)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(H, eps))
        self.layer_scalar = mx.ones((1,))
        self.encoder_layer_scalar = mx.ones((1,))

    def __call__(self, h: mx.array, offset: int | mx.array, kv: KVSource, mask: Mask, decoder: bool) -> mx.array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), offset, kv, mask))
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        flat = h.reshape(-1, h.shape[-1])
        idx, w = self.router(flat)  # the router reads the raw residual
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w).reshape(h.shape)
        h = h + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(moe))
        return h * (self.layer_scalar if decoder else self.encoder_layer_scalar)


class SelfConditioning(nn.Module):
    """post_norm(embeds + mlp(pre_norm(soft))); the scale-less post_norm runs even without a signal."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _activation(cfg.hidden_activation)
        self.eps = cfg.rms_norm_eps

    def __call__(self, embeds: mx.array, soft: mx.array | None) -> mx.array:
        if soft is not None:  # a zero signal contributes exactly zero (no biases, gelu(0) = 0)
            n = self.pre_norm(soft)
            embeds = embeds + self.down_proj(self.act(self.gate_proj(n)) * self.up_proj(n))
        return rms_norm(embeds, None, self.eps)


def put_positions(base: mx.array, live: mx.array, values: mx.array, axis: int) -> mx.array:
    """`base` with its entries at positions `live` (ascending, along `axis`) replaced by `values` (the same shape
    but len(live) along `axis`), as a new array."""
    C = base.shape[axis]
    shape = [1] * base.ndim
    shape[axis] = C
    hit = (mx.zeros((C,), dtype=mx.int32).at[live].add(1) > 0).reshape(shape)
    slot = mx.zeros((C,), dtype=mx.int32).at[live].maximum(mx.arange(live.shape[0], dtype=mx.int32))
    return mx.where(hit, mx.take(values, slot, axis=axis), base)


class CanvasKV:
    """Each decoder layer's K/V over the whole canvas, from the steps that computed them: what a speed mode's
    partial steps attend to for the positions they do not forward (frozen ones, whose K/V are then stale: computed
    while the rest of the canvas held other tokens)."""

    def __init__(self) -> None:
        self.kv: list[tuple[mx.array, mx.array] | None] = []

    def sources(self, cache: PromptCache, live: mx.array | None) -> list[KVSource]:
        """KV sources for `denoise`: a full step (live None) records every layer's canvas K/V; a partial step
        puts its live positions' fresh K/V in place of the recorded ones and attends to the result."""
        if not self.kv:
            self.kv = [None] * len(cache.layers)
        if live is not None and any(kv is None for kv in self.kv):
            raise ValueError("a partial step needs a full one first")
        out = []
        for i, c in enumerate(cache.layers):
            ctx = c.context()

            def own(k: mx.array, v: mx.array, i: int = i) -> tuple[mx.array, mx.array]:  # the canvas's K/V
                if live is not None:
                    K, V = self.kv[i]
                    k, v = put_positions(K, live, k, axis=2), put_positions(V, live, v, axis=2)
                self.kv[i] = (k, v)
                return k, v

            def read(k: mx.array, v: mx.array, own=own, ctx=ctx):
                return context_source(ctx)(*own(k, v))

            read.context, read.own = ctx, own  # the two parts, for the native attention (as context_source's)
            out.append(read)
        return out

    def truncate(self, length: int) -> None:
        """Keep the recorded K/V of canvas positions [0, length) only (a speed mode that stops attending to the
        rest)."""
        self.kv = [None if kv is None else (kv[0][:, :, :length], kv[1][:, :, :length]) for kv in self.kv]

    def extend(self, length: int) -> None:
        """Zeros for canvas positions from the recorded length up to `length`: the next (partial) step must
        forward all of them."""

        def pad(a: mx.array) -> mx.array:
            return mx.concatenate([a, mx.zeros((*a.shape[:2], length - a.shape[2], *a.shape[3:]), a.dtype)], axis=2)

        self.kv = [None if kv is None else (pad(kv[0]), pad(kv[1])) for kv in self.kv]


def attention_masks(cfg: TextConfig, offset: int, length: int, cached: dict[str, int]) -> dict[str, Mask]:
    """Causal masks for encoding `length` new tokens at `offset`, after `cached[type]` cached positions.

    Full layers: plain causal. Sliding layers: causal within the window (a query at p sees keys in (p - W, p]),
    which differs from plain causal only when the cached and new positions together exceed the window."""
    masks: dict[str, Mask] = {}
    for t, n_cached in cached.items():
        if length == 1:
            masks[t] = None
        elif t == "sliding_attention" and n_cached + length > cfg.sliding_window:
            q = mx.arange(offset, offset + length)[:, None]
            k = mx.arange(offset - n_cached, offset + length)[None, :]
            masks[t] = (k <= q) & (k > q - cfg.sliding_window)
        else:
            masks[t] = "causal"
    return masks


def padding_masks(
    masks: dict[str, Mask], offset: int, length: int, cached: dict[str, int], start: mx.array
) -> dict[str, mx.array]:
    """`masks` (from `attention_masks`, or None for bidirectional) for a batch of left-padded rows: a key in a
    cache slot before its row's `start` is padding and is never attended to. Slots count alike in every row (the
    rows' positions differ by their padding only), so the causal and sliding rules apply to slots unchanged.
    Returns (B, 1, L | 1, S) bool masks."""
    out = {}
    for t, mask in masks.items():
        n = cached[t]
        keys = mx.arange(offset - n, offset + length)  # the slot of each key: the cached ones, then the new ones
        valid = keys[None, :] >= start[:, None]  # (B, S)
        if isinstance(mask, str):
            mask = mx.arange(offset, offset + length)[:, None] >= keys[None, :]
        out[t] = valid[:, None, None, :] if mask is None else valid[:, None, None, :] & mask[None, None]
    return out


class Model(nn.Module):
    """The DiffusionGemma text model.

    `encode(ids, cache)` runs the layers causally over new tokens and appends their K/V to `cache`;
    `denoise(canvas, cache, self_conditioning_logits)` runs them bidirectionally over cache + canvas and returns
    softcapped float32 logits, leaving the cache untouched. Both are built on `forward`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        cfg = self.args = config.text_config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Layer(cfg, spec) for spec in cfg.layers]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)

    @property
    def dtype(self) -> mx.Dtype:
        return self.norm.weight.dtype

    @property
    def canvas_length(self) -> int:
        return self.config.canvas_length

    def make_cache(self) -> PromptCache:
        return PromptCache(
            [
                SlidingWindowCache(self.args.sliding_window) if s.is_sliding else FullAttentionCache()
                for s in self.args.layers
            ]
        )

    def embed(self, ids: mx.array) -> mx.array:
        """Scaled token embeddings; the scale is rounded to the model dtype, as in transformers."""
        return self.embed_tokens(ids) * mx.array(self.args.embed_scale, dtype=self.dtype)

    def soft_embed(self, logits: mx.array) -> mx.array:
        """softmax(logits) (float32) @ embedding matrix * sqrt(hidden): (B, C, V) -> (B, C, H)."""
        return self.soft_embed_probs(mx.softmax(logits.astype(mx.float32), axis=-1))

    def soft_embed_probs(self, probs: mx.array) -> mx.array:
        """probabilities (B, C, V) @ embedding matrix * sqrt(hidden) -> (B, C, H), in the model dtype."""
        p = probs.astype(self.dtype)
        e = self.embed_tokens
        if isinstance(e, nn.QuantizedEmbedding):  # the same quantized table the input and the head use
            table = mx.quantized_matmul(
                p,
                e.weight,
                e.scales,
                e.get("biases"),
                transpose=False,
                group_size=e.group_size,
                bits=e.bits,
                mode=e.mode,
            )
        else:
            table = p @ e.weight
        return table * mx.array(self.args.embed_scale, dtype=self.dtype)

    def soft_embed_top_k(self, probs: mx.array, k: int) -> tuple[mx.array, mx.array]:
        """The self-conditioning input from each position's k most probable tokens only: sum over them of
        p * embedding row * sqrt(hidden), (B, C, H) in the model dtype, and the probability mass left out (B, C).
        Reads k embedding rows per position instead of the whole table (a quantized table's rows are dequantized
        as they are gathered). An approximation: `sc_top_k` in the generation settings, off by default."""
        k = min(k, probs.shape[-1])
        p = probs.astype(mx.float32)
        idx = mx.argpartition(-p, kth=k - 1, axis=-1)[..., :k]  # (B, C, k)
        top = mx.take_along_axis(p, idx, axis=-1)
        rows = self.embed_tokens(idx)  # (B, C, k, H), dequantized rows for a quantized table
        soft = (top[..., None].astype(rows.dtype) * rows).sum(axis=-2)
        return soft * mx.array(self.args.embed_scale, dtype=self.dtype), 1.0 - top.sum(axis=-1)

    def soft_embed_logits(self, logits: mx.array, temps: mx.array, lse: mx.array, top_k: int | None = None) -> mx.array:
        """The self-conditioning input from a step's raw (not softcapped) logits (B, C, V), its temperatures
        (B, C) and the log-sum-exp of the scaled logits (B, C) (the vocabulary pass gives it): softmax(softcap /
        temperature) @ table * sqrt(hidden), (B, C, H) in the model dtype. Without the (B, C, V) probabilities
        where the soft-embedding kernel runs (a float table, no `top_k`); else the probabilities are formed and
        go through `soft_embed_probs` or `soft_embed_top_k` (never a float32 copy of the table)."""
        B, C, V = logits.shape
        cap = self.args.final_logit_softcapping or 0.0
        flat, t, m = logits.reshape(B * C, V), temps.reshape(B * C), lse.reshape(B * C)
        table = self.embed_tokens
        if top_k is None and not isinstance(table, nn.QuantizedEmbedding) and kernels.soft_embed_runs(table.weight):
            soft = kernels.soft_embed(flat, t, m, table.weight, cap).reshape(B, C, -1)
            return (soft * self.args.embed_scale).astype(self.dtype)
        probs = mx.exp(kernels.vocab.scaled(flat, t, cap) - m[:, None]).reshape(B, C, V)
        return self.soft_embed_probs(probs) if top_k is None else self.soft_embed_top_k(probs, top_k)[0]

    def logits(self, h: mx.array, softcap: bool = True) -> mx.array:
        """Tied LM head, then the final softcap in float32 (`softcap` False: without it, for the kernels that
        apply it as they read)."""
        cap = self.args.final_logit_softcapping
        x = self.embed_tokens.as_linear(h).astype(mx.float32)
        if not cap or not softcap:
            return x
        return fastmath.softcap(x, cap) if fastmath.enabled() else mx.tanh(x / cap) * cap

    def forward(
        self,
        h: mx.array,
        offset: int | mx.array,
        kv: list[KVSource],
        masks: dict[str, Mask],
        decoder: bool,
    ) -> mx.array:
        """The pure forward over explicit inputs: embeddings h (B, L, H) at positions offset.., each layer's KV
        source (what its new K/V are joined to), masks per layer type; returns the final-normed hidden states."""
        for layer, spec, source in zip(self.layers, self.args.layers, kv):
            h = layer(h, offset, source, masks.get(spec.layer_type), decoder)
        return self.norm(h)

    def _cached(self, cache: PromptCache) -> dict[str, int]:
        cached: dict[str, int] = {}
        for spec, c in zip(self.args.layers, cache.layers):
            ctx = c.context()
            cached.setdefault(spec.layer_type, 0 if ctx is None else ctx[0].shape[2])
        return cached

    def encode(self, ids: mx.array, cache: PromptCache, start: mx.array | None = None) -> mx.array:
        """Causal pass over new tokens ids (B, L); appends their K/V to `cache`; returns the normed hidden states
        (B, L, H) (unevaluated: generation never pays for the last layer's feed-forward unless it reads them).
        `start` (B,): for a batch of left-padded rows, each row's first real cache slot (its position 0)."""
        offset, L = cache.offset, ids.shape[1]
        cached = self._cached(cache)
        masks = attention_masks(self.args, offset, L, cached)
        if start is not None:
            masks = padding_masks(masks, offset, L, cached, start)
            offset = offset - start
        return self.forward(self.embed(ids), offset, cache.writers(), masks, decoder=False)

    def denoise(
        self,
        canvas: mx.array,
        cache: PromptCache,
        self_conditioning_logits: mx.array | None = None,
        self_conditioning_probs: mx.array | None = None,
        start: mx.array | None = None,
        sc_top_k: int | None = None,
        self_conditioning_embeds: mx.array | None = None,
        softcap: bool = True,
        canvas_kv: CanvasKV | None = None,
        live: mx.array | None = None,
    ) -> mx.array:
        """Bidirectional pass over cache + canvas (B, C) -> float32 logits (B, C, V); the cache is unchanged. The
        self-conditioning signal is the previous step's logits (transformers' form), or their softmax when the
        caller already has it (generation: the sampler computes it anyway). `start` as for `encode`. `sc_top_k`:
        the approximation of `soft_embed_top_k` for the probabilities' signal. `self_conditioning_embeds`: the
        signal already embedded (B, C, H) (a batch whose rows embed theirs differently). `softcap` False: the
        logits before the final softcap (the kernels' step applies it).

        Speed modes: `canvas_kv` records each layer's canvas K/V; with `live` (ascending canvas positions) only
        those positions are forwarded, attending to the cache, their own fresh K/V and the recorded K/V of the
        others, and the logits are (B, len(live), V)."""
        x = self.embed(canvas)
        if self_conditioning_embeds is not None:
            soft = self_conditioning_embeds
        elif self_conditioning_probs is not None and sc_top_k is not None:
            soft = self.soft_embed_top_k(self_conditioning_probs, sc_top_k)[0]
        elif self_conditioning_probs is not None:
            soft = self.soft_embed_probs(self_conditioning_probs)
        elif self_conditioning_logits is not None:
            soft = self.soft_embed(self_conditioning_logits)
        else:
            soft = None
        offset, masks, sources = cache.offset, {}, cache.readers()
        if start is not None:  # keys: the cache and the whole canvas, whichever positions are forwarded
            cached = self._cached(cache)
            masks = padding_masks(dict.fromkeys(cached), offset, canvas.shape[1], cached, start)
        if live is not None:
            x, soft = x[:, live], None if soft is None else soft[:, live]
            offset = (offset + live)[None].astype(mx.int32)  # each forwarded position at its own place
        x = self.self_conditioning(x, soft)
        if canvas_kv is not None:
            sources = canvas_kv.sources(cache, live)
        if start is not None:
            offset = offset - (start if live is None else start[:, None])
        h = self.forward(x, offset, sources, masks, decoder=True)
        return self.logits(h, softcap)

    # ---- checkpoint names -------------------------------------------------------------------------------------

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint names to ours (see `sanitize_names`); drops the vision tower and the tied lm_head."""
        return {ours: weights[src] for ours, src in Model.sanitize_names(list(weights)).items()}

    @staticmethod
    def sanitize_names(names: list[str]) -> dict[str, str]:
        """{our name: checkpoint name} for every tensor the text model uses.

        Hugging Face: transformers saves the shared weights under `model.decoder.` and only the encoder's layer
        scalars under `model.encoder.language_model.`; a checkpoint that stores the shared weights on the encoder
        side is read from there. mlx-vlm conversions keep the `model.decoder.` names with fused, possibly
        quantized `experts.gate_up_proj.{weight,scales,biases}`. Our own names map to themselves."""
        out: dict[str, str] = {}
        encoder_side: dict[str, str] = {}
        for name in names:
            ours = our_name(name)
            if ours is None:
                continue
            if name.startswith("model.encoder.language_model.") and not ours.endswith("encoder_layer_scalar"):
                encoder_side[ours] = name
            else:
                out[ours] = name
        for ours, name in encoder_side.items():
            out.setdefault(ours, name)
        return out


def our_name(name: str) -> str | None:
    """Our name for one checkpoint tensor name (or module path), None for what the text model does not use."""
    if name.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")) or name.startswith("lm_head"):
        return None
    if m := re.fullmatch(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar", name):
        return f"layers.{m[1]}.encoder_layer_scalar"
    name = name.removeprefix("model.encoder.language_model.").removeprefix("model.decoder.")
    return re.sub(r"experts\.(gate_up_proj|down_proj)$", r"experts.\1.weight", name)


def fingerprint(model: Model) -> str:
    """Identifies a model's weights and config cheaply: config, dtype, and a few weight values."""
    h = hashlib.sha256(json.dumps(model.config.raw, sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    for w in (model.norm.weight, model.self_conditioning.pre_norm.weight, model.layers[0].input_layernorm.weight):
        h.update(np.array(w.astype(mx.float32)).tobytes())
    return h.hexdigest()[:32]


def num_parameters(model: Model) -> int:
    from mlx.utils import tree_flatten

    return sum(math.prod(v.shape) for _, v in tree_flatten(model.parameters()))
