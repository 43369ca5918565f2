"""Parity of the MLX model against transformers: on tiny checkpoints built here (`parity --fixtures`, the figures
`make parity` prints; needs the `reference` extra) and against a reference file recorded elsewhere
(`parity --against FILE`, `compare`; needs no torch).

Both sides run the same trajectory on the same inputs: encode a prompt, then per block denoise a canvas without
and with self-conditioning logits, then commit a block with `encode`; a reference file adds a whole generation
whose noise both sides draw from `noise.CounterNoise`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import noise
from .loading import load_model


class MLXEngine:
    """Our model behind the reference's encode/denoise interface (numpy in, float32 numpy out)."""

    def __init__(self, path: str | Path | None = None, dtype: str = "float32", model=None):
        self.model = model if model is not None else load_model(path, dtype=dtype)
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
    from . import reference as ref

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
    from . import reference as ref

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
    from . import reference as ref

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


# ---- reference files ----------------------------------------------------------------------------------------------

FORMAT, FORMAT_VERSION, META_KEY = "mlx-diffgemma-reference", 1, "mlx_diffgemma_reference"
STAGES = [
    "encode prompt",
    "denoise",
    "denoise + self-cond",
    "commit block (encode)",
    "next block: denoise",
    "next block: denoise + self-cond",
]


class ReferenceFileError(ValueError):
    """A reference file that cannot be compared with this model, in one line."""


def slug(stage: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in stage).strip("_")


def read_header(path: str | Path) -> dict:
    """The metadata header of a reference file, checked for format and version (reads the header only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReferenceFileError(f"no reference file at {path}; record one with `mlx_diffgemma reference`")
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= 100_000_000:
            raise ReferenceFileError(f"{path} is not a reference file (not safetensors)")
        try:
            meta = json.loads(f.read(n)).get("__metadata__") or {}
            header = json.loads(meta[META_KEY])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ReferenceFileError(f"{path} is not a reference file (no {META_KEY} header)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ReferenceFileError(f"{path} is not a reference file (format {header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise ReferenceFileError(
            f"{path} is a version {header.get('version')} reference file; this mlx-diffgemma reads version "
            f"{FORMAT_VERSION}: record it again with this version's `mlx_diffgemma reference`"
        )
    return header


@dataclass
class StageStats:
    positions: int = 0
    max_abs: float | None = None  # None where only top-k was stored
    sum_abs: float = 0.0
    full_positions: int = 0
    top1: int = 0
    kl: list[float] | None = None

    def add(self, theirs: dict[str, np.ndarray], ours: np.ndarray) -> None:
        q = ours[0].astype(np.float64)  # (L, V)
        lq = q - _lse(q)[:, None]
        self.kl = self.kl or []
        if "logits" in theirs:
            p = theirs["logits"][0].astype(np.float64)
            lp = p - _lse(p)[:, None]
            kl = (np.exp(lp) * (lp - lq)).sum(-1)
            d = np.abs(p - q)
            self.max_abs = max(self.max_abs or 0.0, float(d.max()))
            self.sum_abs += float(d.mean(-1).sum())
            self.full_positions += p.shape[0]
            self.top1 += int((p.argmax(-1) == q.argmax(-1)).sum())
        else:
            ids = theirs["topk_ids"][0]
            lp = theirs["topk_values"][0].astype(np.float64) - theirs["lse"][0].astype(np.float64)[:, None]
            lq_k = np.take_along_axis(lq, ids, -1)
            pk, qk = np.exp(lp), np.exp(lq_k)
            rest_p, rest_q = np.clip(1 - pk.sum(-1), 0, 1), np.clip(1 - qk.sum(-1), 1e-300, 1)
            tail = np.where(rest_p > 0, rest_p * (np.log(np.maximum(rest_p, 1e-300)) - np.log(rest_q)), 0.0)
            kl = (pk * (lp - lq_k)).sum(-1) + tail
            self.top1 += int((ids[:, 0] == q.argmax(-1)).sum())
        self.kl += np.maximum(kl, 0.0).tolist()
        self.positions += q.shape[0]

    def row(self) -> dict:
        kl = np.array(self.kl or [0.0])
        return {
            "positions": self.positions,
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / self.full_positions if self.full_positions else None,
            "top1": self.top1 / max(self.positions, 1),
            "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
        }


def _lse(x: np.ndarray) -> np.ndarray:
    m = x.max(-1)
    return m + np.log(np.exp(x - m[:, None]).sum(-1))


def compare(model_path: str | Path, ref_file: str | Path, dtype: str | None = None, log=lambda s: None) -> dict:
    """Replay a reference file's inputs and noise through our model (any conversion of the model it was recorded
    from): per stage logit differences, top-1 agreement and KL(reference || ours), and per prompt whether the
    generation is identical (else where it first differs)."""
    from .generate import generate_step, settings
    from .loading import resolve_path
    from .noise import CounterNoise

    header = read_header(ref_file)
    model = load_model(resolve_path(model_path), dtype=dtype)
    arch = model.config.architecture()
    if header["architecture"] != arch:
        raise ReferenceFileError(
            f"{ref_file} was recorded from another model ({header['model']}: architecture {header['architecture']}, "
            f"this one {arch}); record a reference of this model's original with `mlx_diffgemma reference`"
        )
    if header.get("noise") != noise.KIND:
        raise ReferenceFileError(f"{ref_file} uses noise {header.get('noise')!r}; this version draws {noise.KIND!r}")
    arrays = {k: np.array(v) for k, v in mx.load(str(Path(ref_file).expanduser()), format="safetensors").items()}
    V, C = model.args.vocab_size, model.canvas_length
    g = settings(model, **header["generation"])
    stats = {s: StageStats() for s in STAGES}
    generations = []
    for i, entry in enumerate(header["prompts"]):
        s = entry["noise_seed"]
        inputs = noise.trajectory_inputs(s, V, C)
        if not (
            np.array_equal(np.concatenate(inputs["canvases"]), arrays[f"p{i}.canvases"])
            and np.array_equal(np.concatenate(inputs["blocks"]), arrays[f"p{i}.blocks"])
        ):
            raise ReferenceFileError(f"{ref_file}: this machine's shared noise differs from the recording's")
        prompt = arrays[f"p{i}.prompt"].astype(np.int64)[None]
        ours = trajectory(MLXEngine(model=model), Inputs(prompt=prompt, **inputs))
        for stage, outs in ours.items():
            for j, a in enumerate(outs):
                name = f"p{i}.{slug(stage)}.{j}"
                theirs = {k.rsplit(".", 1)[1]: v for k, v in arrays.items() if k.rsplit(".", 1)[0] == name}
                stats[stage].add(theirs, a)
        log(f"prompt {i + 1}/{len(header['prompts'])}: trajectory compared; replaying the generation")
        tokens, steps = [], []
        for ev in generate_step(model, mx.array(prompt), g, header["max_tokens"], noise=CounterNoise(s, V)):
            if hasattr(ev, "tokens"):
                tokens += ev.tokens + ([ev.eos] if ev.eos is not None else [])
                steps.append(ev.steps)
        ref_tokens, ref_steps = arrays[f"p{i}.tokens"].tolist(), arrays[f"p{i}.steps"].tolist()
        first = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        if first is None and len(tokens) != len(ref_tokens):
            first = min(len(tokens), len(ref_tokens))
        generations.append(
            {
                "prompt": i,
                "tokens": len(ref_tokens),
                "identical": first is None,
                "first_difference": first,
                "block": None if first is None else first // C,
                "steps_reference": ref_steps,
                "steps_ours": steps,
            }
        )
    return {
        "reference": {k: header[k] for k in ("model", "dtype", "device", "versions", "created")},
        "model": str(model_path),
        "dtype": str(model.dtype).removeprefix("mlx.core."),
        "quantization": model.config.quantization,
        "mlx": f"MLX {mx.__version__} ({mx.default_device()})",
        "stages": {s: st.row() for s, st in stats.items() if st.positions},
        "generations": generations,
    }


def format_comparison(r: dict) -> str:
    """The report of `compare` as Markdown tables."""
    ref_ = r["reference"]
    q = r["quantization"]
    quantized = f", quantized {q.get('bits')}-bit {q.get('mode', 'affine')}" if q else ""
    what = f"{r['model']} ({r['dtype']}{quantized})"
    lines = [
        f"{what} on {r['mlx']}",
        f"against {ref_['model']} ({ref_['dtype']}, {ref_['device']}; {ref_['versions']}; recorded {ref_['created']})",
        "",
        "| stage | positions | max abs diff | mean abs diff | top-1 agreement | KL mean (nats) | KL max |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, s in r["stages"].items():
        mx_, mean = ("n/a" if s[k] is None else f"{s[k]:.2e}" for k in ("max_abs", "mean_abs"))
        lines.append(
            f"| {stage} | {s['positions']} | {mx_} | {mean} | {100 * s['top1']:.1f}% | {s['kl_mean']:.2e} | "
            f"{s['kl_max']:.2e} |"
        )
    lines += ["", "| prompt | generated tokens | replayed generation | steps per block (reference / ours) |"]
    lines.append("|---|---|---|---|")
    for gen in r["generations"]:
        verdict = (
            "identical"
            if gen["identical"]
            else f"first difference at token {gen['first_difference']} (block {gen['block']})"
        )
        steps = f"{gen['steps_reference']} / {gen['steps_ours']}"
        lines.append(f"| {gen['prompt'] + 1} | {gen['tokens']} | {verdict} | {steps} |")
    if any(s["max_abs"] is None for s in r["stages"].values()):
        lines += [
            "",
            "Stages with n/a stored the reference's top-k logits only: KL there lumps the rest of the vocabulary into"
            " one outcome (a lower bound, tight when the top-k hold nearly all the probability).",
        ]
    return "\n".join(lines)
