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
