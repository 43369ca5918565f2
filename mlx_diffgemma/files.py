"""Writing folders so that an interrupted write leaves nothing that loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def staging_dir(dst: Path) -> Path:
    """A fresh hidden folder beside `dst` to build its replacement in."""
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, dst: Path) -> None:
    """Move the finished folder into place; an existing destination is removed only afterwards."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


METADATA_SUFFIXES = (".json", ".jinja", ".model", ".txt")
NOT_METADATA = {"config.json", "model.safetensors.index.json", "README.md", "trainer_state.json"}


def copy_metadata(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, generation config and the like (not config.json, weights or indexes)."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in METADATA_SUFFIXES and f.name not in NOT_METADATA:
            shutil.copy2(f, dst / f.name)
