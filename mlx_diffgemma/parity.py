"""Parity of the MLX model against transformers on tiny checkpoints: the figures `make parity` prints.

Both sides run the same trajectory on the same inputs: encode a prompt, then per block denoise a canvas without
and with self-conditioning logits, then commit a block with `encode`. Needs the `reference` extra.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import reference as ref
from .loading import load_model


class MLXEngine:
    """Our model behind the reference's encode/denoise interface (numpy in, float32 numpy out)."""

    def __init__(self, path: str | Path, dtype: str = "float32"):
        self.model = load_model(path, dtype=dtype)
        self.cache = self.model.make_cache()

    def encode(self, ids: np.ndarray) -> np.ndarray:
        return np.array(self.model.logits(self.model.encode(mx.array(ids), self.cache)))

    def denoise(self, canvas: np.ndarray, self_conditioning_logits: np.ndarray | None = None) -> np.ndarray:
        sc = None if self_conditioning_logits is None else mx.array(self_conditioning_logits)
        return np.array(self.model.denoise(mx.array(canvas), self.cache, sc))


@dataclass
class Inputs:
    prompt: np.ndarray  # (B, P)
    canvases: list[np.ndarray]  # per block, (B, C)
    sc_logits: list[np.ndarray]  # per block, (B, C, V)
    blocks: list[np.ndarray]  # per block, the committed tokens (B, C)


def make_inputs(vocab: int, canvas: int, batch: int, prompt_len: int, blocks: int, seed: int) -> Inputs:
    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(0, vocab, (batch, n), dtype=np.int64)

    return Inputs(
        prompt=ids(prompt_len),
        canvases=[ids(canvas) for _ in range(blocks)],
        sc_logits=[(3 * rng.standard_normal((batch, canvas, vocab))).astype(np.float32) for _ in range(blocks)],
        blocks=[ids(canvas) for _ in range(blocks)],
    )


def trajectory(engine, x: Inputs) -> dict[str, list[np.ndarray]]:
    """Logits at each stage: encode prompt; per block denoise, denoise with self-conditioning, commit."""
    out: dict[str, list[np.ndarray]] = {"encode prompt": [engine.encode(x.prompt)]}
    for j, (c, sc, b) in enumerate(zip(x.canvases, x.sc_logits, x.blocks)):
        first = j == 0
        out.setdefault("denoise" if first else "next block: denoise", []).append(engine.denoise(c))
        out.setdefault("denoise + self-cond" if first else "next block: denoise + self-cond", []).append(
            engine.denoise(c, sc)
        )
        out.setdefault("commit block (encode)", []).append(engine.encode(b))
    return out


def _config(path: Path) -> tuple[int, int, int]:
    cfg = json.loads((path / "config.json").read_text())
    return cfg["text_config"]["vocab_size"], cfg["canvas_length"], cfg["text_config"]["sliding_window"]


def float32_parity(path: Path, batch: int = 2, prompt_len: int = 0, blocks: int = 2, seed: int = 0) -> dict[str, float]:
    """Max |logit difference| per stage, MLX float32 vs transformers float32. The prompt is longer than the
    sliding window unless prompt_len says otherwise."""
    vocab, canvas, window = _config(path)
    prompt_len = prompt_len or window + 5
    x = make_inputs(vocab, canvas, batch, prompt_len, blocks, seed)
    ours, theirs = trajectory(MLXEngine(path), x), trajectory(ref.ReferenceModel(path), x)
    return {k: max(float(np.abs(a - b).max()) for a, b in zip(ours[k], theirs[k])) for k in theirs}


@dataclass
class HalfPrecision:
    positions: int
    rel_rms_ours: float
    rel_rms_theirs: float
    top1_ours: float
    top1_theirs: float


def bfloat16_parity(path: Path, batch: int = 2, prompt_len: int = 40, blocks: int = 0, seed: int = 0) -> HalfPrecision:
    """Our bfloat16 and transformers' bfloat16, each against transformers' float32, over all denoised positions."""
    vocab, canvas, _ = _config(path)
    blocks = blocks or -(-1000 // (2 * batch * canvas))  # at least 1,000 denoised positions
    x = make_inputs(vocab, canvas, batch, prompt_len, blocks, seed)
    runs = [
        trajectory(e, x)
        for e in (
            MLXEngine(path, "bfloat16"),
            ref.ReferenceModel(path, "bfloat16"),
            ref.ReferenceModel(path, "float32"),
        )
    ]

    def denoised(t):
        return np.concatenate([a.reshape(-1, vocab) for k, v in t.items() if "denoise" in k for a in v])

    ours, theirs, truth = (denoised(t) for t in runs)
    return HalfPrecision(
        positions=truth.shape[0],
        rel_rms_ours=ref.relative_rms(ours, truth),
        rel_rms_theirs=ref.relative_rms(theirs, truth),
        top1_ours=ref.top1_agreement(ours, truth),
        top1_theirs=ref.top1_agreement(theirs, truth),
    )


def parity_report(workdir: str | Path | None = None, seed: int = 0) -> str:
    """Build every fixture, measure it, and format the tables (Markdown)."""
    ref.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        lines = [
            f"MLX {mx.__version__} ({mx.default_device()}) vs {ref.versions()}",
            "",
            "float32: max |logit difference| (batch 2, prompt longer than the sliding window)",
            "",
        ]
        rows = {}
        for name, fx in ref.FIXTURES.items():
            path = ref.build_checkpoint(root / name, fx, seed=seed)
            rows[name] = float32_parity(path, seed=seed)
        stages = list(next(iter(rows.values())))
        lines.append("| fixture | " + " | ".join(stages) + " |")
        lines.append("|---" * (len(stages) + 1) + "|")
        for name, r in rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{r[s]:.1e}" for s in stages) + " |")
        h = bfloat16_parity(root / "tamed", seed=seed)
        lines += [
            "",
            f"bfloat16 vs transformers float32 (fixture 'tamed', {h.positions} denoised positions)",
            "",
            "| | relative RMS error | top-1 agreement |",
            "|---|---|---|",
            f"| mlx-diffgemma bfloat16 | {h.rel_rms_ours:.4f} | {100 * h.top1_ours:.1f}% |",
            f"| transformers bfloat16 | {h.rel_rms_theirs:.4f} | {100 * h.top1_theirs:.1f}% |",
        ]
        return "\n".join(lines)
