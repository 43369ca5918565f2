"""The PyTorch/transformers reference path: tiny checkpoints in the real HF layout and transformers' own numbers.

With torch_train (the training loop on PyTorch), the only modules that import torch or transformers (the
`reference` extra). Runs on the CPU or CUDA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import noise
from .config import FULL, SLIDING
from .convert.export import MINIMAL_VISION

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


def build_checkpoint(path: str | Path, fixture: str | Fixture = "basic", seed: int = 0, dtype: str = "float32") -> Path:
    """Save a tiny random DiffusionGemma in the real Hugging Face layout (transformers' save_pretrained), its
    weights in `dtype`."""
    f = FIXTURES[fixture] if isinstance(fixture, str) else fixture
    path = Path(path)
    torch.manual_seed(seed)
    text = {k: v for k, v in f.text.items()}
    config = DiffusionGemmaConfig(
        text_config=text,
        vision_config=dict(MINIMAL_VISION),
        canvas_length=f.canvas_length,
        **f.extra,
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    _perturb(model, f, seed)
    model.to(_TORCH_DTYPES[dtype]).save_pretrained(path)
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

    @torch.no_grad()
    def generate(self, ids: list[int], seed: int, max_new_tokens: int) -> tuple[list[int], list[int]]:
        """transformers' own `generate` on one prompt with its random draws taken from `noise.CounterNoise(seed)`:
        the initial canvases and renoise tokens from the sampler's `initialize_canvas` (a subclass), and the draw
        that `torch.multinomial` makes from the probabilities replaced, in the generation module only and for this
        call only, by the Gumbel-max draw with the shared uniforms. Everything else (temperature, acceptance,
        stopping, EOS and padding) is transformers' code. Returns the generated tokens through the first EOS
        (at most `max_new_tokens`: transformers appends whole canvases) and the denoising steps each block took."""
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen

        V, C = self.model.config.text_config.vocab_size, self.model.config.canvas_length
        device = self.device
        state = {"block": -1, "steps": []}

        def ids_from(purpose: int, step: int, shape) -> torch.Tensor:
            keys = noise.stream_key(seed, purpose, state["block"], step)
            return torch.as_tensor(noise.tokens_np(keys, tuple(shape), V), device=device)

        class ReplaySampler(gen.EntropyBoundSampler):
            def initialize_canvas(self, batch_size: int, device: torch.device) -> torch.LongTensor:
                state["block"] += 1
                state["steps"].append(0)
                return ids_from(noise.CANVAS, 0, (batch_size, C))

            def renoise_canvas(self, accepted_canvas: torch.LongTensor, cur_step: int) -> torch.LongTensor:
                fresh = ids_from(noise.RENOISE, state["steps"][-1], accepted_canvas.shape)
                return torch.where(~self.accepted_token_mask, fresh, accepted_canvas)

        def multinomial(probs: torch.Tensor, num_samples: int = 1, **_) -> torch.Tensor:
            state["steps"][-1] += 1
            keys = noise.stream_key(seed, noise.SAMPLE, state["block"], state["steps"][-1])
            u = torch.as_tensor(noise.uniform_np(keys, tuple(probs.shape)), device=probs.device)
            return (probs.float().log() - torch.log(-torch.log(u))).argmax(dim=-1, keepdim=True)

        class TorchWithReplay:  # the generation module's `torch`, but for multinomial
            def __getattr__(self, name: str):
                return getattr(torch, name)

        TorchWithReplay.multinomial = staticmethod(multinomial)

        def sampler(gc):
            return ReplaySampler(gc.sampler_config, C, V, gc.max_denoising_steps)

        saved = gen.torch
        gen.torch, self.model._prepare_sampler = TorchWithReplay(), sampler
        try:
            out = self.model.generate(
                input_ids=torch.as_tensor([ids], device=device), max_new_tokens=max_new_tokens, disable_compile=True
            )
        finally:
            gen.torch = saved
            del self.model._prepare_sampler
        tokens = out.sequences[0, len(ids) :].tolist()[:max_new_tokens]  # whole canvases: cut as we do
        eos = set(self.settings()["eos_token_id"])
        cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        return tokens[:cut], state["steps"]

    def settings(self) -> dict[str, Any]:
        """The sampler settings transformers' `generate` uses for this checkpoint (its generation config with
        transformers' defaults), by our names."""
        gc, _ = self.model._prepare_generation_config(None)
        eos = gc.eos_token_id
        return {
            "max_denoising_steps": int(gc.max_denoising_steps),
            "entropy_bound": float(gc.sampler_config.entropy_bound),
            "t_min": float(gc.t_min),
            "t_max": float(gc.t_max),
            "stability_threshold": int(gc.stability_threshold),
            "confidence_threshold": float(gc.confidence_threshold),
            "eos_token_id": [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None],
        }


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


def batch_loss(model: DiffusionGemmaForBlockDiffusion, batch, encoder_weight: float = 1.0, reweight: bool = False):
    """`reference_loss` for the whole batch at once (what torch_train trains with): one encoder pass over the
    right-padded sequences into a cache that keeps every key (transformers' sliding layers would keep only the last
    window of the whole sequence), then the decoder over all scored blocks, each masked to its own context (the last
    W-1 positions of it on sliding layers, as generation's sliding cache keeps) and placed at its own positions."""
    import torch.nn.functional as F

    text = model.config.text_config
    ids = torch.as_tensor(batch.ids, device=model.device)
    B, S = ids.shape
    C = batch.noise_mask.shape[1]
    cache = DynamicCache()  # no config: plain layers, all S keys kept
    h = model.model.encoder(input_ids=ids, cache=cache).last_hidden_state
    logits = model.lm_head(h[:, :-1]).float()
    cap = model.final_logit_softcapping
    logits = torch.tanh(logits / cap) * cap
    ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(B, S - 1)
    lengths = torch.as_tensor(batch.lengths, device=ids.device)
    valid = torch.arange(S - 1, device=ids.device)[None] < (lengths - 1)[:, None]
    enc_loss = (ce * valid).sum() / valid.sum()

    ctx = torch.as_tensor(batch.context, device=ids.device)[:, None]
    k = torch.arange(S + C, device=ids.device)[None]
    canvas = k >= S
    full = (k < ctx) | canvas
    sliding = ((k < ctx) & (k >= ctx - (text.sliding_window - 1))) | canvas
    masks = {name: m[:, None, None, :].expand(B, 1, C, S + C) for name, m in [(FULL, full), (SLIDING, sliding)]}
    kw = dict(
        decoder_input_ids=torch.as_tensor(batch.noisy, device=ids.device),
        cache=cache,
        decoder_attention_mask=masks,
        decoder_position_ids=ctx + torch.arange(C, device=ids.device)[None],
    )
    out = model(**kw).logits
    if batch.sc_mask.any():  # detached two-pass self-conditioning on the chosen examples
        sc_mask = torch.as_tensor(batch.sc_mask, device=ids.device)
        out = model(**kw, self_conditioning_logits=out.detach(), self_conditioning_mask=sc_mask).logits
    targets = torch.as_tensor(batch.targets, device=ids.device)
    dec_ce = F.cross_entropy(out.float().flatten(0, 1), targets.flatten(), reduction="none").view(B, C)
    if reweight:
        dec_loss = (dec_ce.mean(1) / torch.as_tensor(batch.t, dtype=torch.float32, device=ids.device)).mean()
    else:
        dec_loss = dec_ce.mean()
    return dec_loss + encoder_weight * enc_loss, {"canvas": dec_loss, "encoder": enc_loss}


# ---- reference files: what an NVIDIA box (or a big CPU machine) hands to a Mac -----------------------------------

DEFAULT_PROMPTS = [
    {"prompt": "Write a Python function that checks whether a string is a palindrome, with a docstring."},
    {"prompt": "Explain in three sentences why the sky is blue."},
    {"prompt": "What is 17 * 23? Show the working."},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three primes."}]},
]
FULL_LOGITS_LIMIT = 1 << 24  # store a stage's logits whole up to this many numbers per prompt (64 MB), else top-k


class ReferenceRunError(ValueError):
    """Something the reference run cannot do, in one line with what to do about it."""


def _device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU seen"
        raise ReferenceRunError(
            f"--device cuda: torch {torch.__version__} has no CUDA device here ({build}); install a CUDA build of "
            "torch (https://pytorch.org/get-started) or use --device cpu"
        )
    if device not in ("cpu", "cuda"):
        raise ReferenceRunError(f"--device must be cpu or cuda, not {device!r}")
    return device


def prompt_ids(path: Path, prompts: list[dict] | None, vocab: int, window: int, seed: int) -> list[list[int]]:
    """Token ids for each prompt, rendered as `mlx_diffgemma generate` renders them (the model's chat template).
    A model without a tokenizer gets ids drawn from the shared noise (one prompt longer than its sliding window),
    unless the prompts are given as ids."""
    from .generate import render_prompt
    from .loading import load_tokenizer

    tok = load_tokenizer(path)
    if prompts is None and tok is None:
        lengths = [window + 5, 12]
        return [
            noise.tokens_np(noise.stream_key(seed, noise.INPUT_TOKENS, 99, n), (n,), vocab).tolist() for n in lengths
        ]
    out = []
    for i, p in enumerate(prompts or DEFAULT_PROMPTS):
        if "ids" in p:
            ids = [int(t) for t in p["ids"]]
        elif tok is None:
            raise ReferenceRunError(f'{path} has no tokenizer: give prompt {i + 1} as token ids ({{"ids": [...]}})')
        else:
            ids = render_prompt(tok, p.get("messages") or p["prompt"])
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ReferenceRunError(f"prompt {i + 1}: token ids must lie in [0, {vocab}) and not be empty")
        out.append(ids)
    return out


def compact(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """(1, L, V) float32 logits -> their k largest values and ids (descending) and log-sum-exp per position: enough
    for top-1 agreement and KL(reference || other) with the tail lumped into one outcome."""
    x = logits[0]
    ids = np.argpartition(-x, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(x, ids, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    ids, vals = np.take_along_axis(ids, order, -1), np.take_along_axis(vals, order, -1)
    m = x.max(axis=-1, keepdims=True).astype(np.float64)
    lse = (m[:, 0] + np.log(np.exp(x.astype(np.float64) - m).sum(axis=-1))).astype(np.float32)
    return {"topk_values": vals[None], "topk_ids": ids[None].astype(np.int32), "lse": lse[None]}


def record(
    model: str | Path,
    out: Path,
    *,
    device: str = "cpu",
    dtype: str = "bfloat16",
    prompts: list[dict] | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    top_k: int = 64,
    full_logits: bool | None = None,
    force: bool = False,
    log=lambda s: None,
) -> dict[str, Any]:
    """Run the fixed trajectory and a generation with shared noise for each prompt on transformers, and write them
    with their inputs to `out` (one safetensors file, metadata header `mlx_diffgemma_reference`). Returns the
    header."""
    import datetime

    from safetensors.numpy import save_file

    from . import __version__
    from .config import ModelConfig
    from .files import check_output, replace_path, staging_file
    from .loading import resolve_path, weight_files
    from .parity import FORMAT, FORMAT_VERSION, META_KEY, Inputs, slug, trajectory

    if dtype not in _TORCH_DTYPES:
        raise ReferenceRunError(f"--dtype must be one of {', '.join(_TORCH_DTYPES)}, not {dtype!r}")
    out = Path(out).expanduser()
    path = resolve_path(model)
    check_output(
        out,
        force=force,
        ours=is_reference_file,
        protect=[path, *weight_files(path)],
        what="--out",
        folder=False,
        not_ours=" and is not a reference file",
    )
    config = ModelConfig.from_file(path / "config.json")
    V, C, W = config.text_config.vocab_size, config.canvas_length, config.text_config.sliding_window
    max_tokens = max_tokens or 2 * C
    ids_list = prompt_ids(path, prompts, V, W, seed)
    log(f"loading {path} with transformers ({dtype}, {_device(device)})")
    rm = ReferenceModel(path, dtype, device)
    tensors: dict[str, np.ndarray] = {}
    entries = []
    for i, ids in enumerate(ids_list):
        s = (seed + 7919 * i) & 0xFFFFFFFF
        inputs = noise.trajectory_inputs(s, V, C)
        x = Inputs(prompt=np.array([ids], dtype=np.int64), **inputs)
        rm.cache = rm.new_cache()
        full = full_logits if full_logits is not None else (len(ids) + C) * V <= FULL_LOGITS_LIMIT
        for stage, arrays in trajectory(rm, x).items():
            for j, a in enumerate(arrays):
                name = f"p{i}.{slug(stage)}.{j}"
                if full:
                    tensors[f"{name}.logits"] = a.astype(np.float32)
                else:
                    tensors.update({f"{name}.{k}": v for k, v in compact(a, top_k).items()})
        tensors[f"p{i}.prompt"] = np.array(ids, dtype=np.int32)
        tensors[f"p{i}.canvases"] = np.concatenate(inputs["canvases"]).astype(np.int32)
        tensors[f"p{i}.blocks"] = np.concatenate(inputs["blocks"]).astype(np.int32)
        log(f"prompt {i + 1}/{len(ids_list)}: {len(ids)} tokens, trajectory done; generating {max_tokens} tokens")
        tokens, steps = rm.generate(ids, s, max_tokens)
        tensors[f"p{i}.tokens"] = np.array(tokens, dtype=np.int32)
        tensors[f"p{i}.steps"] = np.array(steps, dtype=np.int32)
        entries.append({"noise_seed": s, "prompt_tokens": len(ids), "logits": "full" if full else "top-k"})
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": config.architecture(),
        "model": str(model),
        "dtype": dtype,
        "device": device if device == "cpu" else f"cuda ({torch.cuda.get_device_name()})",
        "versions": f"{versions()}, mlx-diffgemma {__version__}",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "noise": noise.KIND,
        "top_k": top_k,
        "max_tokens": max_tokens,
        "generation": rm.settings(),
        "prompts": entries,
    }
    tmp = staging_file(out)
    try:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(header)})
        replace_path(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return header


def is_reference_file(path: Path) -> bool:
    """Whether `path` is a reference file (one this command may replace)."""
    from .parity import read_header

    try:
        read_header(path)
        return True
    except (OSError, ValueError):
        return False
