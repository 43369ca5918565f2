import json

import pytest
from transformers import DiffusionGemmaTextConfig

from mlx_diffgemma.config import ConfigError, GenerationConfig, ModelConfig, TextConfig

# The published DiffusionGemma 26B-A4B text config (flat keys, as published configs spell them).
REAL_TEXT = dict(
    vocab_size=262_144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    sliding_window=1024,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    final_logit_softcapping=30.0,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(30)],
)
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=32,
    vocab_size=128,
)


def _transformers_layers(d):
    c = DiffusionGemmaTextConfig(**d)
    return c.layer_types, [
        (c.per_layer_config[i].head_dim, c.per_layer_config[i].num_key_value_heads) for i in range(c.num_hidden_layers)
    ]


@pytest.mark.parametrize(
    "d",
    [
        REAL_TEXT,
        {**SMALL},  # no global keys at all: transformers' defaults (head_dim 512 on full layers)
        {**SMALL, "global_head_dim": 32},
        {**SMALL, "global_head_dim": 32, "num_global_key_value_heads": 1},
        {**SMALL, "layer_types": ["sliding_attention"] * 4},  # last layer forced to full
        {
            **SMALL,
            "per_layer_config": {"1": {"head_dim": 8}, "3": {"head_dim": 8, "num_key_value_heads": 1}},
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        },
    ],
)
def test_per_layer_resolution_matches_transformers(d):
    ours = TextConfig.from_dict(json.loads(json.dumps(d)))  # as read from JSON (string keys)
    types, dims = _transformers_layers(json.loads(json.dumps(d)))
    assert ours.layer_types == types
    assert [(s.head_dim, s.num_key_value_heads) for s in ours.layers] == dims


def test_per_layer_config_as_written_by_transformers():
    """transformers 5.24 writes per_layer_config with zero-padded string keys; a round trip resolves the same."""
    c = DiffusionGemmaTextConfig(**REAL_TEXT)
    written = json.loads(json.dumps(c.to_dict()))
    assert "per_layer_config" in written and "05" in written["per_layer_config"]
    ours = TextConfig.from_dict(written)
    assert [i for i, s in enumerate(ours.layers) if not s.is_sliding] == [5, 11, 17, 23, 29]
    assert {(s.head_dim, s.num_key_value_heads) for s in ours.layers if not s.is_sliding} == {(512, 2)}
    assert {(s.head_dim, s.num_key_value_heads) for s in ours.layers if s.is_sliding} == {(256, 8)}


def test_model_config_errors():
    with pytest.raises(ConfigError, match="model_type is 'gemma4'"):
        ModelConfig.from_dict({"model_type": "gemma4", "text_config": REAL_TEXT})
    bad = {k: v for k, v in REAL_TEXT.items() if k != "num_experts"}
    with pytest.raises(ConfigError, match="num_experts"):
        ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": bad})
    with pytest.raises(ConfigError, match="rope_type"):
        TextConfig.from_dict(
            {
                **SMALL,
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1.0},
                },
            }
        )
    m = ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": REAL_TEXT, "unused_key": 1})
    assert m.canvas_length == 256 and m.text_config.sliding_window == 1024


def test_generation_config():
    g = GenerationConfig.from_dict(
        {
            "max_denoising_steps": 32,
            "eos_token_id": [1, 106, 50],
            "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.2},
        }
    )
    assert (g.max_denoising_steps, g.entropy_bound, g.eos_token_id, g.t_min, g.t_max) == (
        32,
        0.2,
        [1, 106, 50],
        0.4,
        0.8,
    )
    d = GenerationConfig.from_dict({"max_denoising_steps": None})  # transformers writes nulls for unset values
    assert (d.max_denoising_steps, d.stability_threshold, d.confidence_threshold) == (48, 1, 0.005)
    for bad in ({"t_min": 0.8, "t_max": 0.8}, {"max_denoising_steps": 0}, {"confidence_threshold": 0.0}):
        with pytest.raises(ConfigError):
            GenerationConfig.from_dict(bad)
