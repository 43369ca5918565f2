"""load(path or repo id) -> (model, tokenizer), from safetensors only: nothing is unpickled, no remote code runs."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import memory
from .config import ConfigError, GenerationConfig, ModelConfig
from .model import Model, our_name

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class LoadError(ValueError):
    """A model folder that cannot be loaded, with the reason in one line."""


DEMO = Path(__file__).resolve().parent / "demo" / "model"  # the demo model shipped inside the package
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.jinja", "tokenizer.model", "*.safetensors"]  # what loading and converting read


def resolve_path(path_or_repo: str | Path, weights: bool = True) -> Path:
    """A model folder: a local path (it wins over everything else, `./demo` included), `demo` (the model shipped
    in the package), or a Hugging Face repo id, downloaded into the Hugging Face cache when it is not there yet
    (only the files a model needs; `weights=False` takes only its configs and tokenizer). HF_HUB_OFFLINE=1
    forbids downloading."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise LoadError(f"{p} is a file; expected a model folder")
    name = str(path_or_repo)
    if name == "demo":
        if not (DEMO / "config.json").exists():
            raise LoadError("the demo model is not in this build (benchmarks/train_demo.py --ship trains it)")
        return DEMO
    if REPO_ID.fullmatch(name) and ".." not in name:
        return _download(name, HUB_FILES if weights else HUB_FILES[:-1])
    raise LoadError(f"model folder {p} does not exist")


def _download(repo: str, patterns: list[str]) -> Path:
    """snapshot_download with one-line errors; it resumes an interrupted download and reuses what is cached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except GatedRepoError:
        raise LoadError(f"{repo} is gated: accept its terms on the Hub, then log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise LoadError(
            f"{repo} is neither a local folder nor a repo on the Hugging Face Hub (a private repo needs "
            "`hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise LoadError(f"{repo} has no main revision on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise LoadError(f"{repo} is not in the local Hugging Face cache and {why}") from None
    except HfHubHTTPError as e:
        raise LoadError(f"cannot download {repo}: {' '.join(str(e).split())[:200]}") from None
    except OSError as e:
        raise LoadError(f"cannot download {repo}: {e.strerror or e}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards, from the index when there is one. An index may only name files of the folder
    itself: a name with a folder part (`../x`, `/etc/x`, `sub/x`) is refused before anything is opened."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LoadError(f"cannot read {index}: {type(e).__name__}: {e}") from None
        for n in names:
            if not isinstance(n, str) or not _plain_file_name(n):
                raise LoadError(f"{index} names a shard outside the model folder: {n!r}")
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LoadError(f"{path} is missing shards named in its index: {', '.join(missing)}")
        return files
    files = sorted(f for f in path.glob("*.safetensors") if f.is_file())
    if not files:
        other = [f.name for f in path.glob("*") if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (
            f" (found {', '.join(other)}: pickled weights are not loaded; convert them to safetensors)" if other else ""
        )
        raise LoadError(f"no .safetensors weights in {path}{hint}")
    return files


def _plain_file_name(name: str) -> bool:
    """A file name with no folder part, on any OS."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\:\0")


def load_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of all shards, lazily (read on first use)."""
    weights: dict[str, mx.array] = {}
    for f in weight_files(path):
        try:
            weights.update(mx.load(str(f), format="safetensors"))
        except Exception as e:  # MLX raises RuntimeError/ValueError for a damaged file
            raise LoadError(f"cannot read {f}: {e}") from None
    return weights


def shape_mismatches(
    expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], name=lambda k: k
) -> list[tuple[str, list[str]]]:
    """What differs between the tensors a model expects and those a checkpoint holds, by our names:
    [(kind, descriptions)] for the kinds that occur ("missing", "unexpected", "with the wrong shape");
    `name` says how to show a tensor in the wrong-shape descriptions."""
    found = [
        ("missing", sorted(set(expected) - set(got))),
        ("unexpected", sorted(set(got) - set(expected))),
        (
            "with the wrong shape",
            [f"{name(k)} {got[k]} != {expected[k]}" for k in expected if k in got and got[k] != expected[k]],
        ),
    ]
    return [(kind, items) for kind, items in found if items]


def check_weights(model: Model, weights: dict[str, mx.array]) -> None:
    """Every expected key present with its shape, nothing unexpected; names what is wrong."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    problems = shape_mismatches(expected, {k: tuple(v.shape) for k, v in weights.items()})
    if problems:
        raise LoadError(
            "weights do not match the config: " + "; ".join(f"{len(i)} {kind} ({_few(i)})" for kind, i in problems)
        )


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... {len(items) - n} more" if len(items) > n else "")


def load_model(path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False) -> Model:
    """The model alone. dtype: "float32", "bfloat16", "float16" or None (keep the stored dtype)."""
    path = resolve_path(path)
    try:
        config = ModelConfig.from_file(path / "config.json")
    except ConfigError as e:
        raise LoadError(str(e)) from None
    model = Model(config)
    weights = Model.sanitize(load_weights(path))
    if config.quantization:
        quantize_like(model, config.quantization, weights)
    check_weights(model, weights)
    target = _dtype(dtype)
    floats = {k: v for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}
    if target is None:  # one dtype for the whole model: the one most floating weights are stored in
        target = max(
            {v.dtype for v in floats.values()},
            key=lambda d: sum(math.prod(v.shape) for v in floats.values() if v.dtype == d),
        )
    weights.update({k: v.astype(target) for k, v in floats.items()})
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    memory.keep_step_buffers()
    model.generation_config = GenerationConfig.from_file(path / "generation_config.json", config.text_config)
    return model


def quantize_like(model: Model, quantization: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Turn the modules a conversion quantized into quantized modules, mlx-lm style: the `quantization` block
    holds the defaults (group_size, bits, mode) and per-module entries (a dict of settings, or false); any other
    module is quantized when the weights hold its scales. Module paths are mapped like weight names."""
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    overrides: dict[str, Any] = {}
    for path, value in quantization.items():
        if isinstance(value, (dict, bool)):
            ours = our_name(path + ".weight")
            if ours is not None:
                overrides[ours.removesuffix(".weight")] = {**defaults, **value} if isinstance(value, dict) else value

    def predicate(path: str, module) -> bool | dict:
        if path in overrides:
            return overrides[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return dict(defaults)

    try:
        nn.quantize(model, class_predicate=predicate)
    except (ValueError, KeyError, TypeError) as e:
        raise LoadError(f"cannot rebuild the quantized model from its quantization block: {e}") from None


def _dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(path: str | Path) -> Any | None:
    """The folder's tokenizer (see `tokenizer.py`: tokenizer.json without transformers; a SentencePiece-only
    folder, or MLX_DIFFGEMMA_TOKENIZER=transformers, through transformers with remote code off), or None when the
    folder has no tokenizer."""
    from . import tokenizer

    path = resolve_path(path)
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    try:
        if os.environ.get("MLX_DIFFGEMMA_TOKENIZER") == "transformers":
            return tokenizer.load_transformers(path)
        return tokenizer.load(path)
    except tokenizer.TokenizerError as e:
        raise LoadError(str(e)) from None


def load(path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False) -> tuple[Model, Any | None]:
    """Load a DiffusionGemma checkpoint folder (or a cached Hugging Face repo id).

    Returns (model, tokenizer); the tokenizer is mlx-lm's TokenizerWrapper, or None when the folder has none.
    dtype casts every floating weight ("float32", "bfloat16", "float16"); None keeps the stored dtype.
    The vision tower, if present, is ignored."""
    folder = resolve_path(path)  # once: a repo id is looked up (or downloaded) a single time
    model = load_model(folder, dtype=dtype, lazy=lazy)
    return model, load_tokenizer(folder)
