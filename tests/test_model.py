import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import load
from mlx_diffgemma.cache import FullAttentionCache, SlidingWindowCache
from mlx_diffgemma.reference import ReferenceModel


def _run(model, seed=0):
    rng = np.random.default_rng(seed)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, 512, (2, 20))), cache)
    sc = mx.array(rng.standard_normal((2, 24, 512)).astype(np.float32))
    return model.denoise(mx.array(rng.integers(0, 512, (2, 24))), cache, sc)


@pytest.mark.parametrize("path", ["dense", "gather"])
def test_expert_paths_agree(checkpoint, monkeypatch, path):
    """gather_mm (sorted for many tokens, unsorted for few) and the dense all-experts path compute the same
    function: equal to float32 rounding on the experts, and within parity tolerance on the (chaotic) logits."""
    model, _ = load(checkpoint("two_full"))  # 16 experts, top-4
    experts, router = model.layers[0].experts, model.layers[0].router
    for n in (1, 40):  # 4 and 160 (token, expert) pairs: unsorted and sorted gather
        x = mx.random.normal((n, 64), key=mx.random.key(n))
        idx, w = router(x)
        monkeypatch.setenv("MLX_DIFFGEMMA_EXPERTS", "dense")
        want = np.array(experts(x, idx, w))
        monkeypatch.setenv("MLX_DIFFGEMMA_EXPERTS", path)
        np.testing.assert_allclose(np.array(experts(x, idx, w)), want, rtol=1e-5, atol=1e-7)
    monkeypatch.setenv("MLX_DIFFGEMMA_EXPERTS", "dense")
    dense = np.array(_run(model))
    monkeypatch.setenv("MLX_DIFFGEMMA_EXPERTS", path)
    assert np.abs(np.array(_run(model)) - dense).max() <= 3e-4


def test_cache_matches_transformers_dynamic_cache(checkpoint):
    """Sliding layers keep exactly transformers' last W-1 positions, full layers keep all; same K and V."""
    path = checkpoint("basic")  # window 8
    model, _ = load(path)
    ref = ReferenceModel(path)
    cache = model.make_cache()
    rng = np.random.default_rng(1)
    for n in (13, 16, 3):  # a prompt longer than the window, then two commits
        ids = rng.integers(0, 512, (2, n))
        model.encode(mx.array(ids), cache)
        ref.encode(ids)
    assert cache.offset == 32
    for ours, theirs in zip(cache.layers, ref.cache.layers):
        k, v = ours.context()
        tk, tv = theirs.keys.numpy(), theirs.values.numpy()
        assert k.shape == tk.shape == ((2, 2, 7, 16) if isinstance(ours, SlidingWindowCache) else (2, 1, 32, 32))
        np.testing.assert_allclose(np.array(k), tk, atol=1e-5)
        np.testing.assert_allclose(np.array(v), tv, atol=1e-5)


def test_full_cache_grows_in_chunks_and_denoise_leaves_it_alone(checkpoint):
    model, _ = load(checkpoint("basic"))
    cache = model.make_cache()
    full = next(c for c in cache.layers if isinstance(c, FullAttentionCache))
    model.encode(mx.array(np.arange(10)[None]), cache)
    mx.eval(full.keys)
    capacity = full.keys.shape[2]
    assert capacity == FullAttentionCache.step
    for _ in range(4):  # commits within the chunk write in place: no new buffer
        model.encode(mx.array(np.arange(16)[None]), cache)
        assert full.keys.shape[2] == capacity
    before = [np.array(c.context()[0]) for c in cache.layers]
    mx.eval(model.denoise(mx.array(np.arange(16)[None]), cache))
    assert cache.offset == 74
    for b, c in zip(before, cache.layers):
        np.testing.assert_array_equal(b, np.array(c.context()[0]))
    model.encode(mx.array(np.zeros((1, FullAttentionCache.step), np.int64)), cache)  # crosses a chunk
    assert full.keys.shape[2] == 2 * FullAttentionCache.step and full.offset == 74 + FullAttentionCache.step
