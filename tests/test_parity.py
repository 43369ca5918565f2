"""MLX against transformers, float32 and bfloat16 (see parity.py for the trajectory both sides run)."""

import json

import pytest

from mlx_diffgemma import parity
from mlx_diffgemma import reference as ref

STAGES = [
    "encode prompt",
    "denoise",
    "denoise + self-cond",
    "commit block (encode)",
    "next block: denoise",
    "next block: denoise + self-cond",
]


@pytest.mark.parametrize("name", list(ref.FIXTURES))
def test_float32_parity(checkpoint, name):
    path = checkpoint(name)
    window = json.loads((path / "config.json").read_text())["text_config"]["sliding_window"]
    diffs = parity.float32_parity(path, batch=2, prompt_len=window + 5)  # the prompt overflows the window
    assert list(diffs) == STAGES
    for stage, d in diffs.items():
        assert d <= 3e-4, f"{name}: {stage} differs by {d:.2e}"


def test_tamed_fixture_reaches_float_noise(checkpoint):
    """With trained-like q/k norms, two correct float32 implementations agree to about 1e-6."""
    diffs = parity.float32_parity(checkpoint("tamed"), batch=2)
    assert max(diffs.values()) <= 2e-5, diffs


def test_fixtures_cover_the_traps(checkpoint):
    flat = json.loads((checkpoint("flat_keys") / "config.json").read_text())["text_config"]
    assert "per_layer_config" not in flat and "global_head_dim" in flat
    two_full = json.loads((checkpoint("two_full") / "config.json").read_text())["text_config"]
    assert two_full["layer_types"].count("full_attention") > 1
    assert len(two_full["per_layer_config"]) > 1


def test_bfloat16_as_close_as_transformers_own(checkpoint):
    h = parity.bfloat16_parity(checkpoint("tamed"), batch=2)
    assert h.positions >= 1000
    assert h.rel_rms_ours <= 1.25 * h.rel_rms_theirs, h
    assert h.top1_ours >= h.top1_theirs - 0.05, h
