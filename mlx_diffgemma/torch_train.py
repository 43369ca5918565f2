"""`train.train`'s loop on PyTorch, with transformers' modules: the same batches from the same generator, the same
objective (`reference.batch_loss`, equal to `train.loss` and tested so), checkpoints in the same folder layout
(our weight names, loadable by `load`), resumable across sessions.

Why a second backend: MLX's CPU backend is slow at the demo model's small shapes (Linux has no Metal), where
PyTorch's CPU kernels are not; the demo's version-2 training step is several times faster here (numbers in
benchmarks/RESULTS.md). On a Mac, `train.train` on Metal is the one to use. Differences from it, by design:
PyTorch's AdamW corrects its moment estimates for their zero start (MLX's default does not), and LoRA is not
offered (full training only; the demo is trained from scratch).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import train as T
from .convert.export import MINIMAL_VISION, VISION_PREFIXES, hf_name
from .model import Model, fingerprint, our_name
from .reference import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, batch_loss, torch

STATE_FILE = "torch.pt"  # in the checkpoint's trainer/ folder: the torch weights and the optimizer's state


def to_torch(model: Model, device: str = "cpu") -> DiffusionGemmaForBlockDiffusion:
    """transformers' model holding `model`'s weights in float32 (with a minimal vision tower it never uses)."""
    if model.config.quantization:
        raise ValueError("the PyTorch trainer trains float weights; this model is quantized")
    config = {k: v for k, v in model.config.raw.items() if k not in ("dtype", "torch_dtype")}
    config["vision_config"] = dict(MINIMAL_VISION)
    tm = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**config)).float()
    state = tm.state_dict()
    written = set()
    with torch.no_grad():
        for ours, w in tree_flatten(model.parameters()):
            target = state[hf_name(ours)]
            target.copy_(torch.from_numpy(np.array(w.astype(mx.float32))))
            written.add(target.data_ptr())
    missing = [
        n for n, t in state.items() if not n.startswith(VISION_PREFIXES + ("lm_head",)) and t.data_ptr() not in written
    ]
    if missing:  # a weight transformers has and ours lacks (or one not shared between encoder and decoder)
        raise ValueError(f"no weight of ours for {', '.join(missing[:3])}")
    return tm.to(device)


def from_torch(tm: DiffusionGemmaForBlockDiffusion, dtype: mx.Dtype = mx.float32) -> dict[str, mx.array]:
    """The text model's weights under our names (the shared weights read from the decoder's side)."""
    out = {}
    for name, t in tm.state_dict().items():
        ours = our_name(name)
        if ours is None or (name.startswith("model.encoder.language_model.") and "encoder_layer_scalar" not in ours):
            continue
        out[ours] = mx.array(t.detach().float().cpu().numpy()).astype(dtype)
    return out


def trainable(tm: DiffusionGemmaForBlockDiffusion, cfg: T.TrainConfig) -> list:
    """Mark what trains (every text weight; the router unless cfg.train_router is false) and return it."""
    params = []
    for name, p in tm.named_parameters():
        trains = not name.startswith(VISION_PREFIXES) and (cfg.train_router or ".router." not in name)
        p.requires_grad_(trains)
        if trains:
            params.append(p)
    return params


def make_step(tm: DiffusionGemmaForBlockDiffusion, params: list, optimizer, cfg: T.TrainConfig):
    """One optimizer step of `train`, as a function of a batch: the loss (reference.batch_loss) and, when it is
    finite, backward, clipping and the update; returns (loss, its parts). A non-finite loss leaves the weights as
    they were (the caller stops). benchmarks/train_speed.py times this same function."""

    def step(batch):
        value, parts = batch_loss(tm, batch, cfg.encoder_weight, cfg.reweight)
        if not math.isfinite(value.item()):
            return value, parts
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        return value, parts

    return step


def learning_rate(cfg: T.TrainConfig, step: int) -> float:
    """The rate of update `step` (from 0): train.train's schedule, a linear warm-up from lr/warmup to lr, then a
    cosine decay to 10% at the last step."""
    lr, warmup = cfg.learning_rate, max(cfg.warmup, 1)
    if step < warmup:
        return lr / warmup + (lr - lr / warmup) * step / warmup
    decay = max(cfg.steps - cfg.warmup, 1)
    t = min(step - warmup, decay)
    return 0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * t / decay))


def train(
    model: Model,
    examples: list[tuple[list[int], list[int]]],
    out_dir: str | Path,
    model_dir: str | Path | None,
    cfg: T.TrainConfig,
    eos_id: int,
    pad_id: int = 0,
    log=print,
    stop_after: int | None = None,
    force: bool = False,
    device: str = "cpu",
) -> Model:
    """`train.train` on PyTorch (same arguments, same checkpoints, `device` "cpu" or "cuda"); the trained weights
    end up in `model` too."""
    from .files import recover

    cfg.validate()
    if cfg.lora_rank is not None:
        raise ValueError("the PyTorch trainer trains every weight; LoRA runs on the MLX one")
    out_dir = Path(out_dir)
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        log(
            "note: the preloaded OpenBLAS takes over PyTorch's matrix products (several times slower than its own); "
            "run the torch backend without LD_PRELOAD"
        )
    for line in recover(out_dir.parent):  # a run killed mid-checkpoint: its checkpoint back in place
        log(line)
    T.check_out(out_dir, [Path(model_dir)] if model_dir is not None else [], force)
    T.check_examples(examples, model.args.vocab_size)
    base = fingerprint(model)
    state = None if force else T.resume_state(out_dir, cfg, base, log, backend="torch")
    tm = to_torch(model, device).train()
    params = trainable(tm, cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    start, losses = 0, []
    if state is not None:
        saved = torch.load(out_dir / T.TRAINER / STATE_FILE, map_location=device, weights_only=True)
        tm.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = state["rng"]
        start, losses = state["step"], state.get("losses", [])
        log(f"resuming from step {start}")

    step_fn = make_step(tm, params, optimizer, cfg)
    batches = T.length_batches(examples, cfg.batch_size, cfg.seed)
    tic, tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        batch = T.next_batch(examples, batches, rng, cfg, model.canvas_length, model.args.vocab_size, eos_id, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        value, parts = step_fn(batch)
        if not math.isfinite(value.item()):  # not stepped: never checkpoint on a NaN
            raise ValueError(
                f"the loss is {value.item()} at step {step + 1}; stopped without writing it (the last checkpoint in "
                f"{out_dir} is kept); try a lower --lr"
            )
        tokens += int(batch.lengths.sum())
        losses.append([step + 1, value.item(), parts["canvas"].item(), parts["encoder"].item()])
        if (step + 1) % max(cfg.checkpoint_every // 4, 1) == 0 or step + 1 == cfg.steps:
            log(T.progress_line(step + 1, cfg.steps, losses[-1], tokens / (time.perf_counter() - tic)))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            weights = from_torch(tm, model.dtype)
            trained = {"model": tm.state_dict(), "optimizer": optimizer.state_dict()}
            run = T.trainer_state(step + 1, rng, cfg, base, "torch", losses)
            T.save_checkpoint(
                out_dir,
                model_dir,
                model.config.raw,
                weights,
                lambda f, t=trained: torch.save(t, f / STATE_FILE),
                run,
                log,
            )
        if stop_after is not None and step + 1 >= stop_after:
            break
    model.load_weights(list(from_torch(tm, model.dtype).items()))
    return model
