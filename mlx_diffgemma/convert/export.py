"""MLX folder -> Hugging Face folder: `mlx_diffgemma export`, the way back from a conversion or a fine-tune.

Writes what transformers' `DiffusionGemmaForBlockDiffusion.from_pretrained` (and so vLLM) loads: the text weights
under transformers' names (shared weights under `model.decoder.`, the encoder's layer scalars under
`model.encoder.language_model.`, the experts' fused tensors without `.weight`), float (a quantized model is
dequantized: the exported weights are exactly what the quantized model computes with), config.json without the
quantization block, and the tokenizer and generation files. The vision tower is copied when the folder has one;
a text-only folder (the demo model, a fine-tune of one) gets a minimal all-zero tower so that the folder loads
without missing weights, and images are then meaningless.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx

from mlx_diffgemma.files import OutputError, check_output, copy_metadata, replace_dir, staging_dir
from mlx_diffgemma.loading import DTYPES, load_model, load_weights, resolve_path

from .quality import float_weights

VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# The smallest Gemma 4 vision tower transformers builds: for text-only folders, and reference.py's test fixtures.
MINIMAL_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    position_embedding_size=64,
)
SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained shards
MARKER = "exported_by"  # in config.json: this folder was written by export (so export may replace it)


class ExportError(ValueError):
    """An export that cannot proceed, with the reason in one line."""


def hf_name(ours: str) -> str:
    """transformers' name for one of our weight names (the inverse of `model.our_name`)."""
    if m := re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", ours):
        return f"model.encoder.language_model.layers.{m[1]}.layer_scalar"
    return "model.decoder." + re.sub(r"experts\.(gate_up_proj|down_proj)\.weight$", r"experts.\1", ours)


def _is_export(path: Path) -> bool:
    try:
        return MARKER in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _quantization(q: dict) -> str:
    return f"{q.get('mode', 'affine')} {q.get('bits')}-bit, group {q.get('group_size')}"


def _write_shards(weights: dict[str, mx.array], folder: Path, shard_bytes: int) -> None:
    """transformers' layout: one model.safetensors, or numbered shards and an index; each shard is computed and
    written on its own, so memory holds one shard at a time (plus the lazily mapped source)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(weights):
        n = weights[name].nbytes
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for names, file in zip(shards, files):
        mx.save_safetensors(str(folder / file), {n: weights[n] for n in names}, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        mx.clear_cache()
    if len(files) > 1:
        total = sum(w.nbytes for w in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _minimal_vision(config: dict, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Zero weights for MINIMAL_VISION, named and shaped as transformers builds them (on its meta device: no
    memory). Needs torch and transformers; without them the folder still loads, transformers then initialises the
    tower itself and says so."""
    try:
        import torch
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    except ImportError:
        return {}
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**config))
    return {
        n: mx.zeros(tuple(p.shape), dtype=dtype) for n, p in model.state_dict().items() if n.startswith(VISION_PREFIXES)
    }


def export(
    model_path: str | Path,
    hf_path: str | Path,
    dtype: str | None = None,
    force: bool = False,
    shard_bytes: int = SHARD_BYTES,
    log=print,
) -> Path:
    """Write the model at `model_path` (an MLX folder, quantized or not, or 'demo') as a Hugging Face folder."""
    src = resolve_path(model_path)
    dst = Path(hf_path).expanduser()
    try:
        check_output(dst, force=force, ours=_is_export, protect=[src], what="--hf-path", not_ours=" (not an export)")
    except OutputError as e:
        raise ExportError(str(e)) from None
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model = load_model(src, lazy=True)
    if model.config.quantization:
        log(f"dequantizing {src.name} ({_quantization(model.config.quantization)}) tensor by tensor")
    target = DTYPES[dtype] if dtype else model.dtype
    weights = {hf_name(k): v for k, v in float_weights(model, target).items()}
    config = {k: v for k, v in model.config.raw.items() if k not in ("quantization", "quantization_config")}
    config.update(
        dtype=next(k for k, v in DTYPES.items() if v == target), architectures=["DiffusionGemmaForBlockDiffusion"]
    )
    config.pop("torch_dtype", None)
    vision = {n: w for n, w in load_weights(src).items() if n.startswith(VISION_PREFIXES)}
    if vision and "vision_config" in config:
        weights.update(vision)
    else:
        config["vision_config"] = dict(MINIMAL_VISION)
        zeros = _minimal_vision(config, target)
        weights.update(zeros)
        log(
            f"{model_path} has no vision tower: wrote a minimal all-zero one (text-only model)"
            if zeros
            else f"{model_path} has no vision tower: transformers will initialise a minimal one when loading"
        )
    config[MARKER] = "mlx-diffgemma export"
    tmp = staging_dir(dst)
    try:
        _write_shards(weights, tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_metadata(src, tmp, log)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
