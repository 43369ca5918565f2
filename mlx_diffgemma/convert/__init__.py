"""mlx_diffgemma.convert: Hugging Face DiffusionGemma weights -> (quantized) MLX folders, memory-bounded.

load headers -> the model's own name mapping (`Model.sanitize_names`) -> plan (from shapes) -> for each tensor:
read, cast, quantize in row chunks, write into its place. Peak memory is about one source tensor plus a chunk,
whatever the model size. The folder is built beside the destination and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_diffgemma import __version__
from mlx_diffgemma.config import ConfigError, ModelConfig
from mlx_diffgemma.files import OutputError, check_output, copy_metadata, replace_dir, staging_dir
from mlx_diffgemma.loading import DTYPES, LoadError, resolve_path, shape_mismatches, weight_files
from mlx_diffgemma.memory import fmt
from mlx_diffgemma.model import Model

from .plan import Item, Plan, make_plan
from .recipes import RECIPES, Recipe, RecipeError, resolve
from .safetensors_io import DTYPES as ST_DTYPES
from .safetensors_io import PlannedFile, SafetensorsError, TensorInfo, read_header, read_rows, read_tensor, to_bytes

__all__ = [
    "ConvertError",
    "RECIPES",
    "Recipe",
    "RecipeError",
    "convert",
    "inspect_source",
    "plan_for_config",
    "resolve",
    "size_report",
]

CHUNK_BYTES = 64 * 2**20


class ConvertError(ValueError):
    """A conversion that cannot proceed, with the reason in one line."""


@dataclass
class Source:
    path: Path
    config: ModelConfig
    tensors: dict[str, TensorInfo]  # every tensor of every shard, by checkpoint name
    text: dict[str, tuple[str, tuple[int, ...]]]  # our name -> (checkpoint name, shape)
    vision: dict[str, tuple[int, ...]]  # vision tower tensors, by checkpoint name

    def float_dtype(self) -> mx.Dtype:
        """The dtype most of the text weights are stored in."""
        counts: dict[str, int] = {}
        for name, shape in self.text.values():
            code = self.tensors[name].dtype
            counts[code] = counts.get(code, 0) + math.prod(shape)
        return ST_DTYPES[max(counts, key=counts.get)][1]

    def files(self) -> list[Path]:
        """Every file of the source folder (weights, configs, tokenizer)."""
        return [f for f in self.path.iterdir() if f.is_file()]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our tensor names and shapes for a config, without allocating (MLX builds the arrays lazily)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(Model(config).parameters())}


def inspect_source(path: str | Path) -> Source:
    """Read and check a source folder without reading weights: config, shards, headers, names and shapes."""
    try:
        folder = resolve_path(path)
        config = ModelConfig.from_file(folder / "config.json")
        files = weight_files(folder)
    except (LoadError, ConfigError) as e:
        raise ConvertError(str(e)) from None
    if config.quantization:
        raise ConvertError(f"{folder} is already quantized; convert from the original Hugging Face weights")
    tensors: dict[str, TensorInfo] = {}
    try:
        for f in files:
            tensors.update(read_header(f))
    except SafetensorsError as e:
        raise ConvertError(str(e)) from None
    mapping = Model.sanitize_names(list(tensors))
    text = {ours: (name, tensors[name].shape) for ours, name in mapping.items()}
    problems = shape_mismatches(expected_shapes(config), {k: s for k, (_, s) in text.items()}, lambda k: text[k][0])
    if problems:
        label, names = problems[0]
        more = f", ... {len(names) - 3} more" if len(names) > 3 else ""
        raise ConvertError(f"{len(names)} weights {label}: {', '.join(names[:3])}{more}")
    vision = {
        n: t.shape
        for n, t in tensors.items()
        if n.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))
    }
    return Source(folder, config, tensors, text, vision)


def plan_for_config(config: ModelConfig, recipe: Recipe, dtype=mx.bfloat16) -> Plan:
    """The plan for a config alone (no weights: the vision tower is not included)."""
    return make_plan({k: (k, s) for k, s in expected_shapes(config).items()}, {}, recipe, dtype)


def size_report(plans: list[Plan]) -> str:
    """A Markdown table: payload per recipe in GB (10^9 bytes), text model and vision tower apart."""
    rows = [
        "| recipe | text weights | bits per weight | vision tower | what it does |",
        "|---|---|---|---|---|",
    ]
    for p in plans:
        text = p.payload(vision=False)
        vision = fmt(p.payload(vision=True)) if any(i.vision for i in p.items) else "n/a (no weights)"
        rows.append(
            f"| {p.recipe.name} | {fmt(text)} | {8 * text / p.parameters():.2f} | {vision} | {p.description()} |"
        )
    return "\n".join(rows)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    recipe: Recipe | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = False,
    shard_bytes: int | None = None,
    log=print,
) -> Path:
    """Convert a Hugging Face DiffusionGemma folder (or cached repo id) into an MLX folder at mlx_path."""
    recipe = recipe or RECIPES["bf16"]
    source = inspect_source(hf_path)
    dst = Path(mlx_path).expanduser()
    try:  # never a destination holding the source (its folder, a shard, a cached blob), even with force
        check_output(dst, force=force, ours=lambda p: False, protect=[source.path, *source.files()], what="--mlx-path")
    except OutputError as e:
        raise ConvertError(str(e)) from None
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype] if dtype else source.float_dtype()
    plan = make_plan(
        source.text, source.vision, recipe, target, **({"shard_bytes": shard_bytes} if shard_bytes else {})
    )
    log(size_report([plan]))
    tmp = staging_dir(dst)
    try:
        _write_weights(source, plan, tmp, progress)
        _write_metadata(source, plan, tmp, target, hf_path, dst.name, log)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_weights(source: Source, plan: Plan, out: Path, progress: bool) -> None:
    bar = _progress(plan.payload()) if progress else None
    weight_map = {}
    try:
        for shard, fname in zip(plan.shards, plan.shard_names()):
            f = PlannedFile(out / fname, [e for item in shard for e in item.outputs])
            try:
                for item in shard:
                    _write_item(source.tensors[item.source], item, f)
                    weight_map.update({e.name: fname for e in item.outputs})
                    if bar:
                        bar[0].update(bar[1], advance=item.nbytes)
            finally:
                f.close()
    finally:
        if bar:
            bar[0].stop()
    index = {"metadata": {"total_size": plan.payload()}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_item(info: TensorInfo, item: Item, f: PlannedFile) -> None:
    """Read, cast (and quantize) one tensor in chunks of its first axis straight from the source file, each
    written at its place: memory holds one chunk, not the tensor. Quantization groups run along the last axis,
    so the leading axes (experts, rows) can be split anywhere."""
    if len(item.shape) < 2:  # norms, scalars: small
        chunks = [(0, read_tensor(info).reshape(1, -1))]
        per_lead = 1
    else:
        lead, cols = item.shape[0], item.shape[-1]
        per_lead = math.prod(item.shape[1:-1])  # rows of width `cols` per index of the first axis
        step = max(1, CHUNK_BYTES // (per_lead * cols * 4))
        chunks = ((i, read_rows(info, i, min(i + step, lead)).reshape(-1, cols)) for i in range(0, lead, step))
    rows = max(math.prod(item.shape[:-1]), 1)
    per_row = {e.name: e.nbytes // rows for e in item.outputs}
    dtype = ST_DTYPES[item.dtype][1]
    for start, chunk in chunks:
        chunk = chunk.astype(dtype)
        if item.spec is None:
            parts = [chunk]
        else:
            s = item.spec
            parts = list(mx.quantize(chunk, group_size=s.group_size, bits=s.bits, mode=s.mode))
        mx.eval(parts)
        for e, part in zip(item.outputs, parts):
            f.write(e.name, start * per_lead * per_row[e.name], to_bytes(part))


def _write_metadata(source: Source, plan: Plan, out: Path, dtype, hf_path, title: str, log) -> None:
    copy_metadata(source.path, out, log)
    config = dict(source.config.raw)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if plan.quantization:
        config["quantization"] = plan.quantization
        config["quantization_config"] = plan.quantization
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    config["dtype"] = dtype_name
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    text, vision = plan.payload(vision=False), plan.payload(vision=True)
    (out / "README.md").write_text(
        f"---\nlibrary_name: mlx\ntags:\n- mlx\n- diffusion_gemma\n---\n\n# {title}\n\n"
        f"DiffusionGemma converted with mlx-diffgemma {__version__} on {time.strftime('%Y-%m-%d')}.\n\n"
        f"- source: `{hf_path}`\n- recipe: `{plan.recipe.name}` ({plan.description()})\n"
        f"- dtype: {dtype_name}\n- text weights: {fmt(text)}; vision tower: {fmt(vision)}\n\n"
        '```python\nimport mlx_diffgemma\n\nmodel, tokenizer = mlx_diffgemma.load("PATH")\n'
        'print(mlx_diffgemma.generate(model, tokenizer, "Why is the sky blue?"))\n```\n'
    )


def _progress(total: int):
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    p = Progress(
        "converting", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), transient=True
    )
    task = p.add_task("convert", total=total)
    p.start()
    return p, task
