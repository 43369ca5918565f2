"""Configuration read from a checkpoint's config.json and generation_config.json.

Field names follow Hugging Face's `DiffusionGemmaTextConfig` / `DiffusionGemmaGenerationConfig`, and per-layer
head dims and KV heads resolve exactly as transformers resolves them (`per_layer_config` first, then the older flat
`global_head_dim` / `num_global_key_value_heads` keys, then transformers' defaults).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "diffusion_gemma"
SLIDING, FULL = "sliding_attention", "full_attention"


class ConfigError(ValueError):
    """A config.json or generation_config.json this package cannot use."""


# transformers' DiffusionGemmaTextConfig defaults for the keys that are optional in a config.json.
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_144,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "sliding_window": 512,
    "final_logit_softcapping": 30.0,
    "use_bidirectional_attention": None,
}
_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass(frozen=True)
class LayerSpec:
    """What one layer's attention looks like once per-layer overrides are applied."""

    layer_type: str  # "sliding_attention" or "full_attention"
    head_dim: int
    num_key_value_heads: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING

    @property
    def has_v_proj(self) -> bool:  # full layers share K and V (no v_proj)
        return self.is_sliding


@dataclass
class TextConfig:
    hidden_size: int
    intermediate_size: int  # dense MLP (and self-conditioning MLP) width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # global value; full layers may override it
    head_dim: int  # global value; full layers may override it
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    vocab_size: int = 262_144
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    final_logit_softcapping: float = 30.0
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    layer_types: list[str] = field(default_factory=list)
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: list[LayerSpec] = field(default_factory=list)  # resolved, one per layer

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ConfigError(f"text_config is missing required keys: {', '.join(missing)}")
        v = {**_TEXT_DEFAULTS, **{k: x for k, x in d.items() if x is not None or k in _TEXT_DEFAULTS}}
        for k in (*_REQUIRED, "vocab_size", "max_position_embeddings", "sliding_window"):
            require_int(k, v[k], 1)
        for k in ("global_head_dim", "num_global_key_value_heads"):
            if v.get(k) is not None:
                require_int(k, v[k], 1)
        if v["top_k_experts"] > v["num_experts"]:
            raise ConfigError(f"top_k_experts ({v['top_k_experts']}) is more than num_experts ({v['num_experts']})")
        require_float("rms_norm_eps", v["rms_norm_eps"], positive=True)
        if v["final_logit_softcapping"] is not None:
            require_float("final_logit_softcapping", v["final_logit_softcapping"])
        for k in ("pad_token_id", "bos_token_id"):
            if v.get(k) is not None:
                require_int(k, v[k], 0)
        eos = v.get("eos_token_id")
        for e in [] if eos is None else [eos] if not isinstance(eos, list) else eos:
            require_int("eos_token_id", e, 0)
        if v.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' (a bidirectional encoder) is not supported")
        if v["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"unsupported hidden_activation {v['hidden_activation']!r}")
        if v.get("attention_bias"):
            raise ConfigError("attention_bias=True is not supported")

        n = int(v["num_hidden_layers"])
        layer_types = list(v.get("layer_types") or [])
        if not layer_types:  # transformers' default pattern: 5 sliding : 1 full
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
        if len(layer_types) != n:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for {n} layers")
        unknown = set(layer_types) - {SLIDING, FULL}
        if unknown:
            raise ConfigError(f"unknown layer types: {sorted(unknown)}")
        layer_types[-1] = FULL  # transformers forces the last layer to full attention

        rope = v.get("rope_parameters") or _DEFAULT_ROPE
        if not isinstance(rope, dict):
            raise ConfigError("rope_parameters must map layer types to settings")
        for t in set(layer_types):
            p = rope.get(t)
            if not isinstance(p, dict):
                raise ConfigError(f"rope_parameters has no entry for {t}")
            require_float(f"rope_parameters.{t}.rope_theta", p.get("rope_theta"), positive=True)
            for k in ("partial_rotary_factor", "factor"):
                if k in p:
                    require_float(f"rope_parameters.{t}.{k}", p[k], positive=True)
            if p.get("partial_rotary_factor", 1.0) > 1:
                raise ConfigError(f"rope_parameters.{t}.partial_rotary_factor must be at most 1")
            if p.get("rope_type", "default") not in ("default", "proportional"):
                raise ConfigError(f"unsupported rope_type {p.get('rope_type')!r} for {t}")
            if p.get("rope_type", "default") == "default" and p.get("partial_rotary_factor", 1.0) != 1.0:
                raise ConfigError(f"partial_rotary_factor with default RoPE is not supported ({t})")

        cfg = cls(
            **{k: v[k] for k in cls.__dataclass_fields__ if k in v and k not in ("layer_types", "layers")},
        )
        cfg.layer_types = layer_types
        cfg.rope_parameters = rope
        cfg.layers = _resolve_layers(v, layer_types)
        if cfg.num_attention_heads % min(s.num_key_value_heads for s in cfg.layers):
            raise ConfigError("num_attention_heads must be a multiple of every layer's num_key_value_heads")
        return cfg

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)


def _resolve_layers(v: dict[str, Any], layer_types: list[str]) -> list[LayerSpec]:
    """Per-layer head_dim / num_key_value_heads, as transformers' DiffusionGemmaTextConfig resolves them."""
    per_layer = v.get("per_layer_config")
    if per_layer is None:
        # Older flat form: full layers take `global_head_dim` (default 512) and `num_global_key_value_heads`.
        overrides: dict[str, Any] = {"head_dim": v.get("global_head_dim", 512)}
        if v.get("num_global_key_value_heads") is not None:
            overrides["num_key_value_heads"] = v["num_global_key_value_heads"]
        per_layer = {i: overrides for i, t in enumerate(layer_types) if t == FULL}
    try:
        per_layer = {int(i): dict(o) for i, o in per_layer.items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"per_layer_config must map layer indices to dicts: {e}") from None
    bad = [i for i in per_layer if not 0 <= i < len(layer_types)]
    if bad:
        raise ConfigError(f"per_layer_config names layers that do not exist: {bad}")
    specs = []
    for i, t in enumerate(layer_types):
        o = per_layer.get(i, {})
        head_dim = require_int(f"layer {i} head_dim", o.get("head_dim", v["head_dim"]), 2)
        heads = require_int(f"layer {i} num_key_value_heads", o.get("num_key_value_heads", v["num_key_value_heads"]), 1)
        if head_dim % 2:
            raise ConfigError(f"layer {i} head_dim must be even (RoPE rotates pairs), got {head_dim}")
        specs.append(LayerSpec(t, head_dim, heads))
    for t in set(layer_types):  # RoPE is built per layer type, so each type must have one head_dim
        dims = {s.head_dim for s in specs if s.layer_type == t}
        if len(dims) > 1:
            raise ConfigError(f"layers of type {t} have different head dims {sorted(dims)}")
    return specs


@dataclass
class ModelConfig:
    text_config: TextConfig
    canvas_length: int = 256
    model_type: str = MODEL_TYPE
    image_token_id: int | None = 258_880
    boi_token_id: int | None = 255_999
    eoi_token_id: int | None = 258_882
    quantization: dict[str, Any] | None = None  # written by the converter, mlx-lm style
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json as read

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        mt = d.get("model_type")
        if mt != MODEL_TYPE:
            raise ConfigError(f"model_type is {mt!r}, expected {MODEL_TYPE!r} (a DiffusionGemma checkpoint)")
        if not isinstance(d.get("text_config"), dict):
            raise ConfigError("config.json has no text_config")
        canvas = 256 if d.get("canvas_length") is None else d["canvas_length"]
        if type(canvas) is not int or canvas <= 0:
            raise ConfigError(f"canvas_length must be a positive integer, got {canvas!r}")
        return cls(
            text_config=TextConfig.from_dict(d["text_config"]),
            canvas_length=canvas,
            image_token_id=d.get("image_token_id", 258_880),
            boi_token_id=d.get("boi_token_id", 255_999),
            eoi_token_id=d.get("eoi_token_id", 258_882),
            quantization=d.get("quantization"),
            raw=d,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(_read_json(Path(path)))

    def architecture(self) -> str:
        """A digest of what fixes the model's function up to its weights: the text model's shapes, layer plan,
        RoPE, norms and softcap, and the canvas length; not the dtype nor the quantization (a checkpoint and
        its conversions share it). Reference files carry it so that they are compared with the model they
        were recorded from."""
        t = dataclasses.asdict(self.text_config)
        for k in ("pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings", "tie_word_embeddings"):
            t.pop(k, None)
        blob = json.dumps({"text": t, "canvas_length": self.canvas_length}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class GenerationConfig:
    """Defaults for the block-diffusion sampler (transformers' defaults where a checkpoint leaves them unset)."""

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    max_new_tokens: int = 256
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    # Opt-in approximation (not transformers'): self-conditioning from the k most probable tokens' embeddings
    # instead of the whole softmax; None is exact.
    sc_top_k: int | None = None
    # Opt-in speed knobs (not transformers'; see MODES). None / "entropy" / False is exact.
    freeze_after: int | None = None  # freeze a position once accepted with the same argmax this many steps
    refresh_every: int | None = None  # with freezing: a full forward (fresh K/V for all) every this many steps
    freeze_confidence: float | None = None  # with freezing: only positions at least this sure of their token
    # with freezing: forward a position once more when it froze on another token than the one its recorded K/V
    # were computed from (False: later steps attend to those stale K/V until a refresh, as Fast-dLLM's cache does)
    refresh_frozen: bool = True
    accept: str = "entropy"  # "entropy": the entropy bound; "confidence": top probability >= accept_confidence
    accept_confidence: float = 0.9
    eos_exit: bool = False  # end a block at once when its argmax canvas is all end-of-sequence tokens
    # forward and attend to the canvas only through its first end-of-sequence token once one is this sure (top
    # probability); the rest counts as end-of-sequence, and the whole canvas comes back if that token goes
    trim_eos: float | None = None
    first_window: float | None = None  # with trim_eos: a block's first step forwards this share of the canvas

    def is_exact(self) -> bool:
        """Whether these settings run the reference algorithm (no speed knob on)."""
        knobs = (self.sc_top_k, self.freeze_after, self.accept, self.eos_exit, self.trim_eos)
        return knobs == (None, None, "entropy", False, None)

    @classmethod
    def from_dict(cls, d: dict[str, Any], text: TextConfig | None = None) -> GenerationConfig:
        g = cls()
        if text is not None:
            g.eos_token_id, g.pad_token_id, g.bos_token_id = text.eos_token_ids, text.pad_token_id, text.bos_token_id
        sampler = d.get("sampler_config") or {}
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            g.entropy_bound = sampler["entropy_bound"]
        for k in (
            "max_denoising_steps",
            "t_min",
            "t_max",
            "stability_threshold",
            "confidence_threshold",
            "max_new_tokens",
            "pad_token_id",
            "bos_token_id",
        ):
            if d.get(k) is not None:
                setattr(g, k, d[k])
        if d.get("eos_token_id") is not None:
            e = d["eos_token_id"]
            g.eos_token_id = list(e) if isinstance(e, list) else [e]
        g.validate()
        return g

    @classmethod
    def from_file(cls, path: str | Path, text: TextConfig | None = None) -> GenerationConfig:
        p = Path(path)
        try:
            return cls.from_dict(_read_json(p) if p.exists() else {}, text)
        except ConfigError as e:
            raise ConfigError(f"{p.name}: {e}" if not str(e).startswith(str(p)) else str(e)) from None

    def validate(self, names: dict[str, str] | None = None) -> None:
        """Raise a ConfigError for a value the sampler cannot use; `names` shows settings under other names (the
        command line's flags) in the message."""
        names = names or {}

        def n(key: str) -> str:
            return names.get(key, key)

        require_int(n("max_denoising_steps"), self.max_denoising_steps, 1)
        require_float(n("t_min"), self.t_min)
        require_float(n("t_max"), self.t_max)
        require_float(n("entropy_bound"), self.entropy_bound)
        require_int(n("stability_threshold"), self.stability_threshold, 0)
        require_float(n("confidence_threshold"), self.confidence_threshold, positive=True)
        require_int(n("max_new_tokens"), self.max_new_tokens, 1)
        if not isinstance(self.eos_token_id, list):
            raise ConfigError(f"{n('eos_token_id')} must be a list of token ids, got {self.eos_token_id!r}")
        for e in self.eos_token_id:
            require_int(n("eos_token_id"), e, 0)
        if self.sc_top_k is not None:
            require_int(n("sc_top_k"), self.sc_top_k, 1)
        if self.freeze_after is not None:
            require_int(n("freeze_after"), self.freeze_after, 0)
        if self.refresh_every is not None:
            require_int(n("refresh_every"), self.refresh_every, 1)
        if self.accept not in ("entropy", "confidence"):
            raise ConfigError(f'{n("accept")} must be "entropy" or "confidence", got {self.accept!r}')
        require_float(n("accept_confidence"), self.accept_confidence, positive=True, maximum=1)
        if self.freeze_confidence is not None:
            require_float(n("freeze_confidence"), self.freeze_confidence, maximum=1)
        if not isinstance(self.refresh_frozen, bool):
            raise ConfigError(f"{n('refresh_frozen')} must be true or false, got {self.refresh_frozen!r}")
        if self.trim_eos is not None:
            require_float(n("trim_eos"), self.trim_eos, positive=True, maximum=1)
        if self.first_window is not None:
            require_float(n("first_window"), self.first_window, positive=True)
            if self.first_window > 1:
                raise ConfigError(f"{n('first_window')} is a share of the canvas, at most 1, got {self.first_window!r}")
            if self.trim_eos is None:
                raise ConfigError(f"{n('first_window')} needs {n('trim_eos')} (the window finds where the answer ends)")
        if not isinstance(self.eos_exit, bool):
            raise ConfigError(f"{n('eos_exit')} must be true or false, got {self.eos_exit!r}")
        if self.t_max <= self.t_min:
            raise ConfigError(
                f"{n('t_max')} must be greater than {n('t_min')} ({n('t_min')}={self.t_min}, {n('t_max')}={self.t_max})"
            )


# Named speed modes: the knobs each sets (a setting given explicitly wins). What each costs in accuracy is measured
# by benchmarks/eval_modes.py (benchmarks/RESULTS.md) and `mlx_diffgemma eval` on a user's own data.
MODES: dict[str, dict[str, Any]] = {
    "exact": {},
    "fast": {"freeze_after": 0, "freeze_confidence": 0.99, "eos_exit": True, "trim_eos": 0.9, "first_window": 0.375},
    "turbo": {
        "freeze_after": 0,
        "freeze_confidence": 0.9,
        "accept": "confidence",
        "accept_confidence": 0.9,
        "sc_top_k": 16,
        "eos_exit": True,
        "trim_eos": 0.9,
        "first_window": 0.375,
    },
}


def require_int(name: str, value: Any, minimum: int) -> int:
    """An integer (not a bool, not a float) >= minimum, or a ConfigError naming the key."""
    if type(value) is not int or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def require_float(
    name: str, value: Any, positive: bool = False, minimum: float = 0.0, maximum: float | None = None
) -> float:
    """A finite number >= minimum (> 0 with positive) and at most `maximum` if given, or a ConfigError naming the
    key."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (positive and value <= 0):
        bound = "> 0" if positive else f">= {minimum:g}"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, got {value!r}")
    return float(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return d
