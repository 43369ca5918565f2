"""The CPU's compiled exp/tanh/softmax/GELU against float64 NumPy, attention's CPU path against MLX's own, and the
three expert paths against each other."""

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_diffgemma import fastmath, load
from mlx_diffgemma.generate import prefill
from mlx_diffgemma.model import attention


def test_exp_is_float32_accurate_and_flushes_what_underflows():
    x = np.concatenate([np.linspace(-100, 88, 400_001), np.random.default_rng(0).normal(0, 8, 100_000)])
    x = x.astype(np.float32)
    want = np.exp(x.astype(np.float64))
    got = np.array(fastmath.exp(mx.array(x)), dtype=np.float64)
    normal = want > 1.2e-38
    assert (np.abs(got - want) / want)[normal].max() < 2e-7  # MLX's own CPU exp: 3.5e-6
    assert np.all(got[x < -87.34] == 0) and np.all(np.isfinite(got))


def test_tanh_softcap_gelu_and_softmax():
    y = np.linspace(-30, 30, 600_001).astype(np.float32)
    want = np.tanh(y.astype(np.float64))
    assert np.abs(np.array(fastmath.tanh(mx.array(y)), dtype=np.float64) - want).max() < 5e-7
    logits = np.linspace(-90, 90, 10_001).astype(np.float32)
    capped = np.array(fastmath.softcap(mx.array(logits), 30.0), dtype=np.float64)
    assert np.abs(capped - 30 * np.tanh(logits / 30.0)).max() < 3e-5  # 30 x float32 rounding
    g = np.array(fastmath.gelu_approx(mx.array(y[::10])))
    np.testing.assert_allclose(g, np.array(nn.gelu_approx(mx.array(y[::10]))), atol=2e-6, rtol=1e-6)
    bf = fastmath.gelu_approx(mx.array(y[::10]).astype(mx.bfloat16))
    assert bf.dtype == mx.bfloat16
    s = mx.array(np.random.default_rng(1).normal(0, 6, (3, 7, 500)).astype(np.float32))
    np.testing.assert_allclose(np.array(fastmath.softmax(s)), np.array(mx.softmax(s, axis=-1, precise=True)), atol=3e-7)


MASKS = [(9, 20), (2, 1, 1, 20), (2, 1, 9, 20), (1, 8, 9, 20), (2, 8, 1, 20)]  # training's are per example


@pytest.mark.parametrize(
    "heads,kv_heads,mask",
    [(4, 2, None), (4, 1, "causal"), (2, 2, None)] + [(8, 2, shape) for shape in MASKS] + [(4, 4, MASKS[1])],
)
def test_cpu_attention_equals_mlx_attention(heads, kv_heads, mask):
    rng = np.random.default_rng(2)
    q = mx.array(rng.normal(size=(2, heads, 9, 16)).astype(np.float32))
    k = mx.array(rng.normal(size=(2, kv_heads, 20, 16)).astype(np.float32))
    v = mx.array(rng.normal(size=(2, kv_heads, 20, 12)).astype(np.float32))
    if isinstance(mask, tuple):  # every row keeps its last key, so no row is all -inf
        mask = mx.array(rng.random(mask) < 0.6) | (mx.arange(20) == 19)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    got = attention(q, k, v, mask)
    assert fastmath.enabled()  # the CPU path is the one under test
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6, rtol=1e-5)


def test_expert_paths_agree(checkpoint, monkeypatch):
    model, _ = load(checkpoint("basic"))
    cache = model.make_cache()
    prefill(model, mx.array(np.random.default_rng(3).integers(0, 512, (1, 30))), cache)
    canvas = mx.array(np.random.default_rng(4).integers(0, 512, (1, 16)))
    out = {}
    for path in ("dense", "segments", "gather"):
        monkeypatch.setenv("MLX_DIFFGEMMA_EXPERTS", path)
        out[path] = np.array(model.denoise(canvas, cache))
    for path in ("segments", "gather"):
        assert np.abs(out[path] - out["dense"]).max() < 1e-4 * np.abs(out["dense"]).max(), path


def test_fastmath_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MLX_DIFFGEMMA_FASTMATH", "0")
    assert not fastmath.enabled()
    monkeypatch.delenv("MLX_DIFFGEMMA_FASTMATH")
    assert fastmath.enabled() == (mx.default_device() == mx.cpu) and "MLX_DIFFGEMMA_FASTMATH" not in os.environ


def test_gradients_are_the_functions_own():
    """Training differentiates through these as through MLX's versions: exact derivatives, not the
    approximations' (and exp's bit-level 2^n, which has none)."""
    rng = np.random.default_rng(5)
    x = mx.array(rng.normal(0, 3, (4, 33)).astype(np.float32))
    c = mx.array(rng.normal(size=(4, 33)).astype(np.float32))
    pairs = [
        (fastmath.softmax, lambda a: mx.softmax(a, axis=-1, precise=True)),
        (lambda a: fastmath.softmax(a, axis=0), lambda a: mx.softmax(a, axis=0, precise=True)),
        (lambda a: fastmath.softcap(a, 2.0), lambda a: 2.0 * mx.tanh(a / 2.0)),
        (fastmath.gelu_approx, nn.gelu_approx),
    ]
    for fast, ref in pairs:
        got = mx.vjp(fast, [x], [c])[1][0]
        want = mx.vjp(ref, [x], [c])[1][0]
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6, rtol=1e-5)
