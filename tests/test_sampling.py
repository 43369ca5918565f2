"""Each sampling function against its transformers counterpart, on the same inputs."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from mlx_diffgemma import sampling

B, C, V = 2, 64, 300


def _logits(sharpness: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, V)).astype(np.float32) * sharpness
    x[:, ::3, rng.integers(0, V)] += 4 * sharpness  # a mix of confident and uncertain positions
    return x


SHARPNESS = [0.1, 1.0, 4.0, 20.0]


@pytest.mark.parametrize("step", [48, 30, 1])
def test_temperature_schedule(step):
    proc = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 48)
    x = _logits(1.0, 0)
    want = proc(None, torch.tensor(x), step).numpy()
    got = np.array(mx.array(x) / sampling.temperature(step, 0.4, 0.8, 48))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("sharpness", SHARPNESS)
def test_entropy(sharpness):
    x = _logits(sharpness, 1)
    want = torch.distributions.Categorical(logits=torch.tensor(x)).entropy().numpy()
    np.testing.assert_allclose(np.array(sampling.entropy(mx.array(x))), want, rtol=1e-4, atol=1e-5)


def _reference_mask(x: np.ndarray, bound: float) -> np.ndarray:
    s = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), C, V, 48)
    cur = torch.zeros((B, C), dtype=torch.long)
    s.accept_canvas(cur, cur + 1, torch.tensor(x), 1)
    return s.accepted_token_mask.numpy()


@pytest.mark.parametrize("sharpness", SHARPNESS)
@pytest.mark.parametrize("bound", [0.1, 1.0, 10.0])
def test_accept_mask(sharpness, bound):
    x = _logits(sharpness, 2)
    want = _reference_mask(x, bound)
    got = np.array(sampling.accept_mask(mx.array(x), bound))
    h = torch.distributions.Categorical(logits=torch.tensor(x)).entropy().numpy()
    for b in range(B):
        assert got[b].sum() == want[b].sum()
        hs = np.sort(h[b])
        close = np.isclose(hs[1:], hs[:-1], rtol=0, atol=1e-6)
        ties = np.isin(h[b], np.concatenate([hs[:-1][close], hs[1:][close]]))
        np.testing.assert_array_equal(got[b][~ties], want[b][~ties])  # orders may differ only within exact ties


def test_accept_mask_edge_cases():
    sharp = np.full((B, C, V), -30.0, np.float32)
    sharp[..., 7] = 30.0  # every position certain: all accepted
    assert np.array(sampling.accept_mask(mx.array(sharp), 0.1)).all()
    assert _reference_mask(sharp, 0.1).all()
    flat = _logits(0.01, 3)  # every position near-uniform: none accepted but the lowest-entropy one
    flat[:, 9] *= 50  # (made clearly the lowest, away from float-noise near-ties)
    got, want = np.array(sampling.accept_mask(mx.array(flat), 0.1)), _reference_mask(flat, 0.1)
    np.testing.assert_array_equal(got, want)
    assert (got.sum(-1) == 1).all() and got[:, 9].all()


def test_accept_and_renoise_match_the_sampler():
    x = _logits(4.0, 4)
    rng = np.random.default_rng(5)
    cur, sampled, noise = (rng.integers(0, V, (B, C)) for _ in range(3))
    s = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=1.0), C, V, 48)
    accepted_ref = s.accept_canvas(torch.tensor(cur), torch.tensor(sampled), torch.tensor(x), 5)
    s.initialize_canvas = lambda batch_size, device: torch.tensor(noise)  # the same fresh tokens on both sides
    renoised_ref = s.renoise_canvas(accepted_ref, 5)
    mask = sampling.accept_mask(mx.array(x), 1.0)
    accepted = sampling.accept(mx.array(cur), mx.array(sampled), mask)
    np.testing.assert_array_equal(np.array(accepted), accepted_ref.numpy())
    np.testing.assert_array_equal(np.array(sampling.renoise(accepted, mask, mx.array(noise))), renoised_ref.numpy())


@pytest.mark.parametrize("stability", [0, 1, 2])
def test_stop_criterion_sequence(stability):
    """Feed the same argmax/logits sequence to both; the stop decisions agree at every step."""
    rng = np.random.default_rng(6)
    ref = StableAndConfidentStoppingCriteria(stability, 0.05)
    hist = sampling.new_history(stability, B, C)
    a = rng.integers(0, V, (B, C))
    confident = np.full((B, C, V), -30.0, np.float32)
    confident[..., 3] = 30.0
    seq = [
        (a, _logits(1.0, 7)),
        (a, confident),
        (a, confident),
        (a + 1, confident),
        (a + 1, confident),
        (a + 1, confident),
    ]
    decisions = []
    for argmax, logits in seq:
        want = ref(torch.tensor(argmax), torch.tensor(logits)).numpy()
        got, hist = sampling.stop_criterion(hist, mx.array(argmax), mx.array(logits), 0.05)
        np.testing.assert_array_equal(np.array(got), want)
        decisions.append(bool(want.all()))
    assert decisions[0] is False and decisions[-1] is True


def test_sampling_draws_from_softmax():
    x = np.log(np.array([[[0.7, 0.2, 0.1]]], np.float32))
    draws = np.array(sampling.sample(mx.broadcast_to(mx.array(x), (1, 20000, 3)), key=mx.random.key(0)))
    np.testing.assert_allclose(np.bincount(draws[0], minlength=3) / 20000, [0.7, 0.2, 0.1], atol=0.015)
    c = np.array(sampling.random_canvas((2, 5000), 7, key=mx.random.key(1)))
    assert c.min() == 0 and c.max() == 6


def test_softmax_entropy_is_softmax_and_entropy_in_one_pass():
    x = mx.array(np.random.default_rng(1).normal(0, 4, (2, 5, 300)).astype(np.float32))
    p, h = sampling.softmax_entropy(x)
    np.testing.assert_allclose(np.array(p), np.array(mx.softmax(x, axis=-1)), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.array(h), np.array(sampling.entropy(x)), rtol=1e-5, atol=1e-6)
