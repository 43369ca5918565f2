"""The PyTorch/transformers reference path: tiny checkpoints in the real HF layout and transformers' own numbers.

The only module that imports torch or transformers (the `reference` extra). Runs on the CPU or CUDA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
    import transformers
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the reference path needs torch and transformers>=5.24: pip install 'mlx-diffgemma[reference]'"
    ) from e


@dataclass(frozen=True)
class Fixture:
    """A tiny random DiffusionGemma checkpoint: its text config and how its weights are perturbed."""

    name: str
    text: dict[str, Any]
    canvas_length: int = 16
    flat_keys: bool = False  # write config.json in the older flat form (no per_layer_config)
    tame: bool = False  # q/k norm weights scaled to head_dim^-1/4, as in a trained model
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=8,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
    max_position_embeddings=4096,
)

FIXTURES: dict[str, Fixture] = {
    f.name: f
    for f in [
        Fixture("basic", _BASE, notes="5 sliding : 1 full, window 8 < prompt"),
        Fixture(
            "two_full",
            {
                **_BASE,
                "num_hidden_layers": 8,
                "num_experts": 16,
                "top_k_experts": 4,
                "layer_types": [
                    "sliding_attention",
                    "full_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "full_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "full_attention",
                ],
                "num_global_key_value_heads": 2,
                "global_head_dim": 64,
            },
            canvas_length=24,
            notes="3 full layers, 16 experts top-4",
        ),
        Fixture(
            "flat_keys",
            {**_BASE, "sliding_window": 6},
            flat_keys=True,
            notes="published flat global_head_dim keys, no per_layer_config",
        ),
        Fixture(
            "tamed",
            {**_BASE, "sliding_window": 32},
            canvas_length=32,
            tame=True,
            notes="q/k norms at head_dim^-1/4 (trained-like)",
        ),
    ]
}


def _perturb(model: DiffusionGemmaForBlockDiffusion, fixture: Fixture, seed: int) -> None:
    """Move norms, router scales and layer scalars away from 1 so that a missing term shows."""
    g = torch.Generator().manual_seed(seed + 1)

    def u(shape, lo=0.5, hi=1.5):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(("router.scale", "router.per_expert_scale")):
                p.copy_(u(p.shape))
            if fixture.tame and name.endswith(("q_norm.weight", "k_norm.weight")):
                p.mul_(p.shape[0] ** -0.25)
        dec = model.model.decoder.layers
        enc = model.model.encoder.language_model.layers
        for d, e in zip(dec, enc):  # different encoder and decoder layer scalars
            d.layer_scalar.copy_(u((1,), 0.6, 1.0))
            e.layer_scalar.copy_(u((1,), 1.1, 1.5))


def build_checkpoint(path: str | Path, fixture: str | Fixture = "basic", seed: int = 0) -> Path:
    """Save a tiny random DiffusionGemma in the real Hugging Face layout (transformers' save_pretrained)."""
    f = FIXTURES[fixture] if isinstance(fixture, str) else fixture
    path = Path(path)
    torch.manual_seed(seed)
    text = {k: v for k, v in f.text.items()}
    config = DiffusionGemmaConfig(
        text_config=text,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            position_embedding_size=64,
        ),
        canvas_length=f.canvas_length,
        **f.extra,
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    _perturb(model, f, seed)
    model.save_pretrained(path)
    if f.flat_keys:  # rewrite config.json the way published configs spell the full-layer overrides
        cfg = json.loads((path / "config.json").read_text())
        tc = cfg["text_config"]
        tc.pop("per_layer_config", None)
        tc["global_head_dim"] = f.text["global_head_dim"]
        tc["num_global_key_value_heads"] = f.text["num_global_key_value_heads"]
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReferenceModel:
    """transformers' DiffusionGemmaForBlockDiffusion driven step by step: encode, denoise, commit."""

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu"):
        self.model = (
            DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=_TORCH_DTYPES[dtype]).to(device).eval()
        )
        self.device = device
        self.cache = self.new_cache()

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config.text_config)

    def _softcap(self, x: torch.Tensor) -> torch.Tensor:
        cap = self.model.final_logit_softcapping
        return torch.tanh(x.float() / cap) * cap

    @torch.no_grad()
    def encode(self, ids: np.ndarray) -> np.ndarray:
        """Encode ids (B, L) into the cache; returns the encoder's softcapped logits (B, L, V), float32."""
        out = self.model.model.encoder(input_ids=torch.as_tensor(ids, device=self.device), cache=self.cache)
        return self._softcap(self.model.lm_head(out.last_hidden_state)).cpu().numpy()

    @torch.no_grad()
    def denoise(self, canvas: np.ndarray, self_conditioning_logits: np.ndarray | None = None) -> np.ndarray:
        """Decoder logits (B, C, V), float32, for a canvas (B, C) over the current cache."""
        sc = None
        if self_conditioning_logits is not None:
            sc = torch.as_tensor(self_conditioning_logits, device=self.device).to(self.model.dtype)
        out = self.model(
            decoder_input_ids=torch.as_tensor(canvas, device=self.device), cache=self.cache, self_conditioning_logits=sc
        )
        return out.logits.float().cpu().numpy()


def quiet() -> None:
    """Silence transformers' progress bars and warnings (for command-line reports)."""
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def versions() -> str:
    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def build_tiny_chat_model(path: str | Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random model over the real 262,144-piece vocabulary, with a Gemma-4-compatible tokenizer folder's
    files and Gemma 4's EOS ids: runs end to end (its output is noise: the weights are random)."""
    import shutil

    fx = Fixture("tiny-chat", {**FIXTURES["basic"].text, "vocab_size": 262_144, "sliding_window": 64}, canvas_length=16)
    path = build_checkpoint(path, fx, seed=seed)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, path / f.name)
    (path / "generation_config.json").write_text(
        json.dumps(
            {
                "max_denoising_steps": 4,
                "eos_token_id": [1, 106, 50],
                "pad_token_id": 0,
                "bos_token_id": 2,
                "t_min": 0.4,
                "t_max": 0.8,
                "stability_threshold": 1,
                "confidence_threshold": 0.005,
                "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
            },
            indent=2,
        )
    )
    return path


if __name__ == "__main__":  # python -m mlx_diffgemma.reference OUT_DIR TOKENIZER_DIR
    import sys

    quiet()
    print(build_tiny_chat_model(sys.argv[1], sys.argv[2]))


def reference_loss(model: DiffusionGemmaForBlockDiffusion, batch, encoder_weight: float = 1.0, reweight: bool = False):
    """mlx_diffgemma.train.loss computed with transformers' modules, example by example: the encoder over the
    whole sequence (next-token loss), the encoder over the context into a DynamicCache, then the decoder over the
    noisy block (a no-grad first pass for self-conditioning on the chosen examples). Returns torch tensors."""
    import torch.nn.functional as F

    text = model.config.text_config
    enc_sum, enc_n, dec = 0.0, 0, []
    for b in range(batch.ids.shape[0]):
        seq = torch.as_tensor(batch.ids[b : b + 1, : batch.lengths[b]])
        h = model.model.encoder(input_ids=seq, cache=DynamicCache(config=text)).last_hidden_state
        logits = model.lm_head(h).float()
        logits = torch.tanh(logits / model.final_logit_softcapping) * model.final_logit_softcapping
        enc_sum = enc_sum + F.cross_entropy(logits[0, :-1], seq[0, 1:], reduction="sum")
        enc_n += seq.shape[1] - 1
        cache = DynamicCache(config=text)
        model.model.encoder(input_ids=seq[:, : batch.context[b]], cache=cache)
        noisy = torch.as_tensor(batch.noisy[b : b + 1])
        out = model(decoder_input_ids=noisy, cache=cache).logits
        if batch.sc_mask[b]:
            out = model(
                decoder_input_ids=noisy,
                cache=cache,
                self_conditioning_logits=out.detach(),
                self_conditioning_mask=torch.tensor([True]),
            ).logits
        ce = F.cross_entropy(out[0].float(), torch.as_tensor(batch.targets[b]))
        dec.append(ce / float(batch.t[b]) if reweight else ce)
    dec_loss = torch.stack(dec).mean()
    enc_loss = enc_sum / enc_n
    return dec_loss + encoder_weight * enc_loss, {"canvas": dec_loss, "encoder": enc_loss}
