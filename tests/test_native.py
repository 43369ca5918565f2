"""The native CPU kernels (mlx_diffgemma/native/cpu_ops.cpp) against their pure-MLX references: each op on shapes
with vector tails, masked rows and per-row offsets; the uniforms, the rotary embedding and the RMS norm bit for bit
with MLX's own; the experts bit for bit with the segments path; and the demo model's answers the same with the
kernels off.

`make setup` builds them on Linux; there these tests require them to load (a failed build is a failure, not a
skip). MLX_DIFFGEMMA_NATIVE=0 runs the suite on the references instead."""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import fastmath, load, native, sampling
from mlx_diffgemma.noise import gumbel

pytestmark = pytest.mark.skipif(
    os.environ.get("MLX_DIFFGEMMA_NATIVE") == "0" or not sys.platform.startswith("linux"),
    reason="the native kernels are built on Linux only, and MLX_DIFFGEMMA_NATIVE=0 turns them off",
)


@pytest.fixture
def reference(monkeypatch):
    """Runs a function with the kernels off: fastmath's and MLX's own forms."""

    def run(fn, *args):
        monkeypatch.setenv("MLX_DIFFGEMMA_NATIVE", "0")
        try:
            out = fn(*args)
            mx.eval(out)
            return out
        finally:
            monkeypatch.delenv("MLX_DIFFGEMMA_NATIVE")

    return run


def test_the_kernels_are_built_and_load():
    assert native.state() == "ok", native.state()
    assert native.available() and native.describe().startswith("on (")


def test_a_missing_or_stale_build_is_reported_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DIFFGEMMA_NATIVE_CACHE", str(tmp_path))
    assert native._load().startswith("not built")
    lib = native._library()
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not a shared library")
    assert native._load().startswith("does not load")


@pytest.mark.parametrize("shape", [(3, 7, 500), (5, 16), (2, 1), (4, 33)])
def test_softmax_rows_are_fastmath_s_bit_for_bit(shape, reference):
    """The same exponentials and the row sums in MLX's order: fastmath's MLX softmax to the last bit."""
    x = np.random.default_rng(1).normal(0, 6, shape).astype(np.float32)
    masked = min(3, shape[-1] - 1)
    x[0, ..., :masked] = -np.inf  # masked keys (a row keeps one at least)
    got = native.softmax_rows(mx.array(x))
    assert mx.array_equal(got, reference(fastmath.softmax, mx.array(x)))
    want = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    want /= want.sum(axis=-1, keepdims=True)
    assert np.abs(np.array(got, dtype=np.float64) - want).max() < 1.5e-6
    assert np.all(np.array(got)[0, ..., :masked] == 0)


def test_softcap_and_gelu_are_their_mlx_forms_bit_for_bit(reference):
    """The same polynomials, each operation rounded as MLX rounds it (no fused multiply-adds)."""
    y = mx.array(np.linspace(-90, 90, 100_003).astype(np.float32))
    assert mx.array_equal(native.softcap(y, 30.0), reference(fastmath.softcap, y, 30.0))
    g = y / 9
    want = reference(fastmath.gelu_approx, g)
    assert mx.array_equal(native.gelu_tanh(g), want)
    assert mx.array_equal(fastmath.gelu_approx(g), want)  # fastmath takes the kernel here


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("cap", [0.0, 30.0])
def test_the_vocabulary_pass(uniform, cap, reference):
    """Probabilities, entropies, argmax and samples of the native pass against the two-stream MLX pass, from raw
    or capped logits and from uniforms or Gumbel draws, on a vocabulary that is no multiple of the vector width:
    bit for bit from Gumbel draws; from uniforms the kernel takes their logarithms with its own vectorised log
    (MLX's is the C library's), so the draws may differ in their last bit, and the samples only on a near-tie."""
    B, C, V = 2, 9, 3001
    logits = mx.random.normal((B, C, V), key=mx.random.key(3)) * 12
    temps = mx.array([[[0.7]], [[1.3]]], dtype=mx.float32)
    u = sampling.gumbel_uniforms((B, C, V), mx.random.key(4))
    noise = u if uniform else gumbel(u)
    probs, h, am, sm = sampling.native_pass(logits, temps, noise, uniform, cap)

    def ref():
        capped = fastmath.softcap(logits, cap) if cap else logits
        return sampling._half_pass(capped, temps, gumbel(u))

    w_probs, w_h, w_am, w_sm = reference(ref)
    assert mx.array_equal(probs, w_probs) and mx.array_equal(h, w_h)
    assert mx.array_equal(am, w_am) and mx.array_equal(sm, w_sm)
    assert am.dtype == sm.dtype == mx.uint32 and probs.shape == (B, C, V) and h.shape == (B, C)


@pytest.mark.parametrize("shape", [(1, 256, 1000), (1, 17, 3001), (3,), (1,), (2, 5), (7, 1, 9), (33,)])
def test_uniforms_are_mlx_s_bit_for_bit(shape, reference):
    for seed in range(3):
        key = mx.random.key(seed)
        for low, high in ((sampling._TINY, 1.0), (-2.0, 3.5)):
            want = reference(lambda k=key, lo=low, hi=high: mx.random.uniform(lo, hi, shape, key=k))
            assert mx.array_equal(native.uniform(key, shape, low, high), want), (shape, seed, low)


def test_rope_is_mlx_s_bit_for_bit(checkpoint, reference):
    """The native rotary embedding (and transpose) gives mx.fast.rope's numbers: sliding and full layers (the
    latter with unrotated dims, infinite wavelengths), an int offset and one offset per row."""
    model = load(checkpoint("basic"))[0]
    for layer in model.layers[:2]:
        a = layer.self_attn
        x = mx.random.normal((2, 13, a.n_heads, a.head_dim), key=mx.random.key(5))
        for offset in (0, 300, mx.array([5, 17])):
            want = reference(lambda a=a, x=x, off=offset: a._rope(x.transpose(0, 2, 1, 3), off))
            got = native.rope(x, *a._rope_table(13, offset))
            assert got.shape == (2, a.n_heads, 13, a.head_dim) and mx.array_equal(got, want)


@pytest.mark.parametrize("shape", [(7, 512), (3, 5, 384), (2, 2816), (9, 1), (0, 16), (13, 100)])
def test_rms_norm_is_mlx_s_bit_for_bit(shape, reference):
    """native.rms_norm gives mx.fast.rms_norm's CPU numbers to the last bit: with and without a weight, a row
    width with a vector tail and 1 / n inexact, a transposed view, and a temporary it may overwrite in place."""
    rng = np.random.default_rng(7)
    x = mx.array(rng.normal(0, 3, shape).astype(np.float32))
    w = mx.array(rng.normal(0, 1, shape[-1:]).astype(np.float32))
    for weight in (w, None):
        for eps in (1e-6, 1e-5):
            want = reference(lambda wt=weight, e=eps: mx.fast.rms_norm(x, wt, e))
            assert mx.array_equal(native.rms_norm(x, weight, eps), want), (shape, weight is None, eps)
            assert mx.array_equal(native.rms_norm(x * 1, weight, eps), want)  # donated: written in place
    t = mx.array(rng.normal(0, 1, (4, 6, 64)).astype(np.float32)).transpose(1, 0, 2)
    assert mx.array_equal(native.rms_norm(t, None, 1e-6), reference(lambda: mx.fast.rms_norm(t, None, 1e-6)))
    with pytest.raises(ValueError, match="rms_norm"):
        native.rms_norm(x, mx.ones((shape[-1] + 1,)), 1e-6)


def test_experts_are_the_segments_bit_for_bit(checkpoint, monkeypatch):
    """The native mixture of experts returns what the segments path returns, an expert left without tokens
    included."""
    model = load(checkpoint("basic"))[0]
    layer = model.layers[0]
    E = layer.experts.gate_up_proj.num_experts
    x = mx.random.normal((37, model.args.hidden_size), key=mx.random.key(6))
    idx, w = layer.router(x)
    idx = mx.where(idx == 0, 1, idx)  # expert 0 gets nothing
    out = {}
    for path in ("native", "segments"):
        monkeypatch.setenv("MLX_DIFFGEMMA_EXPERTS", path)
        out[path] = layer.experts(x, idx, w)
    assert E > 2 and mx.array_equal(out["native"], out["segments"])


@pytest.mark.parametrize(
    "B, Hk, G, L, S1, D, Dv", [(1, 2, 4, 33, 300, 64, 64), (2, 3, 1, 17, 40, 16, 24), (1, 1, 2, 9, 0, 8, 8)]
)
def test_attention_over_a_cache_view_is_the_joined_attention(B, Hk, G, L, S1, D, Dv):
    """native.attention reads the cached part where it lies (a view of a larger buffer) and gives attention over
    the joined keys, to float32 rounding (the products over the two parts are summed in another order)."""
    from mlx_diffgemma.model import attention

    keys = iter(mx.random.split(mx.random.key(11), 5))
    q = mx.random.normal((B, Hk * G, L, D), key=next(keys)) * 0.3
    k1 = mx.random.normal((B, Hk, S1 + 50, D), key=next(keys))[:, :, :S1]  # a cache holding spare slots
    v1 = mx.random.normal((B, Hk, S1 + 50, Dv), key=next(keys))[:, :, :S1]
    k2 = mx.random.normal((B, Hk, L, D), key=next(keys))
    v2 = mx.random.normal((B, Hk, L, Dv), key=next(keys))
    want = attention(q, mx.concatenate([k1, k2], axis=2), mx.concatenate([v1, v2], axis=2), None)
    got = native.attention(q, k1, v1, k2, v2)
    assert got.shape == (B, Hk * G, L, Dv)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    # the queries' own values as a transposed view, not yet evaluated (as the model gives them): copied to rows
    v2t = (v2.transpose(0, 2, 1, 3) + 0).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.array(native.attention(q, k1, v1, k2, v2t)), np.array(got), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="attention"):
        native.attention(q, k1, v1, mx.concatenate([k2, k2], 1), mx.concatenate([v2, v2], 1))  # other head counts


def test_denoising_through_the_native_attention(checkpoint, monkeypatch):
    """A denoising step with every layer's attention through the native kernel (its key threshold lowered)
    against the matmul path: the same logits to float32 rounding; and gradients through it as the reference's."""
    from mlx_diffgemma import model as model_module
    from mlx_diffgemma.generate import prefill

    model = load(checkpoint("basic"))[0]
    cache = model.make_cache()
    prefill(model, mx.random.randint(3, model.args.vocab_size, (1, 40), key=mx.random.key(12)), cache)
    canvas = mx.random.randint(3, model.args.vocab_size, (1, model.canvas_length), key=mx.random.key(13))
    calls = []
    original = model_module._native_attention
    monkeypatch.setattr(model_module, "_native_attention", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(model_module, "NATIVE_ATTENTION_KEYS", 10**9)
    want = model.denoise(canvas, cache)
    assert not calls
    monkeypatch.setattr(model_module, "NATIVE_ATTENTION_KEYS", 1)
    got = model.denoise(canvas, cache)
    assert len(calls) == len(model.layers)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)

    q, k1, v1, k2, v2 = (mx.random.normal(s, key=mx.random.key(i)) for i, s in enumerate(
        [(1, 4, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8), (1, 2, 5, 8), (1, 2, 5, 8)]))  # fmt: skip

    def joined(*a):
        return (model_module.attention(a[0], mx.concatenate(a[1:4:2], 2), mx.concatenate(a[2:5:2], 2), None) ** 2).sum()

    def through_kernel(*a):
        return (original(*a) ** 2).sum()

    args = [q, k1, v1, k2, v2]
    for g, ref in zip(
        mx.grad(through_kernel, argnums=list(range(5)))(*args), mx.grad(joined, argnums=list(range(5)))(*args)
    ):
        np.testing.assert_allclose(np.array(g), np.array(ref), rtol=1e-4, atol=1e-5)


def test_the_demo_answers_the_same_with_the_kernels_off(monkeypatch):
    """Generation through the kernels against the pure-MLX path on the trained demo model, same seeds: the same
    answers (the kernels' last-bit differences do not flip a sampled token of a model this sure)."""
    from mlx_diffgemma import generate
    from mlx_diffgemma.demo import HELD_OUT_SEED, examples

    model, tok = load("demo")
    cases = examples(6, HELD_OUT_SEED)
    on = [generate(model, tok, p, seed=i) for i, (p, _) in enumerate(cases)]
    monkeypatch.setenv("MLX_DIFFGEMMA_NATIVE", "0")
    off = [generate(model, tok, p, seed=i) for i, (p, _) in enumerate(cases)]
    assert on == off


def test_the_kernels_differentiate_as_their_references(checkpoint, monkeypatch):
    """Training goes through the kernels too: the loss's gradients with them equal those of the references
    (rope: mx.fast.rope's; norms: mx.fast.rms_norm's; experts: the segments path's) to float32 rounding."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = load(checkpoint("basic"))[0]
    ids = mx.random.randint(3, model.args.vocab_size, (2, 12), key=mx.random.key(8))

    def loss(m):
        h = m.embed(ids)
        for layer in m.layers:
            h = layer(h, 0, lambda k, v: (k, v), "causal", True)
        return (m.logits(m.norm(h)) ** 2).mean()

    grads = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MLX_DIFFGEMMA_NATIVE", flag)
        grads[flag] = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    assert grads["1"].keys() == grads["0"].keys()
    for name, g in grads["1"].items():
        ref = grads["0"][name]
        assert mx.allclose(g, ref, rtol=1e-4, atol=1e-6 * (mx.abs(ref).max().item() + 1e-12)), name
