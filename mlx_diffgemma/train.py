"""The block-diffusion training objective (NeMo AutoModel's DiffusionGemmaSFTRecipe / Megatron Bridge's
diffusion_gemma_step, as issue 6 summarises them), on the model's pure forward.

Per example: the response is cut into canvas blocks (the last one filled out with EOS, which is trained too);
one block j is scored; a noise level t ~ U(eps, 1) replaces each of its positions by a uniform random token with
probability t; the decoder reads the encoder's K/V of the prompt and blocks < j only (gradients flow back through
them) and predicts the clean block. The encoder's clean next-token loss over the whole sequence comes from the
same encoder pass. On a random half of the examples, a first decoder pass without gradient supplies the
self-conditioning logits of the second.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .cache import context_source
from .config import FULL, SLIDING, ConfigError, require_float, require_int
from .generate import render_prompt
from .model import Model, attention_masks, fingerprint


@dataclass
class Batch:
    """Everything random is drawn here, so that a loss is a pure function of (model, batch)."""

    ids: np.ndarray  # (B, L) prompt + response blocks, right-padded with pad
    lengths: np.ndarray  # (B,) tokens per example (prompt + all its blocks)
    context: np.ndarray  # (B,) positions before the scored block (prompt + j blocks)
    t: np.ndarray  # (B,) noise level
    noise_mask: np.ndarray  # (B, C) bool: positions replaced by noise
    noise_tokens: np.ndarray  # (B, C) the uniform random tokens used there
    sc_mask: np.ndarray  # (B,) bool: examples trained with self-conditioning

    @property
    def targets(self) -> np.ndarray:
        """(B, C) the clean scored block."""
        C = self.noise_mask.shape[1]
        return np.stack([row[c : c + C] for row, c in zip(self.ids, self.context)])

    @property
    def noisy(self) -> np.ndarray:
        return np.where(self.noise_mask, self.noise_tokens, self.targets)


def make_batch(
    examples: list[tuple[list[int], list[int]]],
    canvas_length: int,
    vocab_size: int,
    eos_id: int,
    pad_id: int,
    rng: np.random.Generator,
    eps: float = 1e-3,
    self_conditioning_prob: float = 0.5,
) -> Batch:
    """Draw one training batch from (prompt ids, response ids) pairs."""
    C = canvas_length
    seqs, contexts = [], []
    for prompt, response in examples:
        if not prompt or not response:
            raise ValueError("every example needs a prompt and a response")
        blocks = math.ceil(len(response) / C)
        padded = list(response) + [eos_id] * (blocks * C - len(response))  # attended and trained
        seqs.append(list(prompt) + padded)
        contexts.append(len(prompt) + C * int(rng.integers(0, blocks)))
    B, L = len(seqs), max(map(len, seqs))
    ids = np.full((B, L), pad_id, dtype=np.int64)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    t = rng.uniform(eps, 1.0, B)
    return Batch(
        ids=ids,
        lengths=np.array([len(s) for s in seqs]),
        context=np.array(contexts),
        t=t,
        noise_mask=rng.random((B, C)) < t[:, None],
        noise_tokens=rng.integers(0, vocab_size, (B, C)),
        sc_mask=rng.random(B) < self_conditioning_prob,
    )


def _cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy, float32: (..., V), (...) -> (...)."""
    logits = logits.astype(mx.float32)
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _decoder_masks(model: Model, S: int, context: mx.array) -> dict[str, mx.array]:
    """(B, 1, 1, S + C) keys each canvas may see: its example's context (the last W-1 positions of it on
    sliding layers, as the sliding cache keeps) and the whole canvas."""
    k = mx.arange(S + model.canvas_length)[None, :]
    ctx = context[:, None]
    canvas = k >= S
    full = (k < ctx) | canvas
    sliding = ((k < ctx) & (k >= ctx - (model.args.sliding_window - 1))) | canvas
    return {FULL: full[:, None, None, :], SLIDING: sliding[:, None, None, :]}


def batch_logits(model: Model, batch: Batch) -> tuple[mx.array, mx.array]:
    """The two passes of a training step: the encoder's logits (B, S-1, V) for ids[:, 1:], and the decoder's
    logits (B, C, V) for the scored blocks (after the self-conditioning pass on the examples that draw it)."""
    ids = mx.array(batch.ids)
    B, S = ids.shape
    kv: list[tuple[mx.array, mx.array]] = []

    def record(k: mx.array, v: mx.array):
        kv.append((k, v))
        return k, v

    # the encoder: one causal pass over the clean sequences; its K/V feed every decoder pass
    masks = attention_masks(model.args, 0, S, {t: 0 for t in set(model.args.layer_types)})
    h = model.forward(model.embed(ids), 0, [record] * len(model.layers), masks, decoder=False)
    enc_logits = model.logits(h[:, :-1])

    context = mx.array(batch.context)
    dec_masks = _decoder_masks(model, S, context)
    sources = [context_source(c) for c in kv]
    noisy = mx.array(batch.noisy)

    def decode(soft: mx.array | None) -> mx.array:
        x = model.self_conditioning(model.embed(noisy), soft)
        return model.logits(model.forward(x, context, sources, dec_masks, decoder=True))

    logits = decode(None)
    if batch.sc_mask.any():  # detached two-pass self-conditioning on the chosen examples
        sc = mx.stop_gradient(logits)
        soft = model.soft_embed(sc) * mx.array(batch.sc_mask)[:, None, None].astype(model.dtype)
        logits = decode(soft)
    return enc_logits, logits


def loss(
    model: Model, batch: Batch, encoder_weight: float = 1.0, reweight: bool = False
) -> tuple[mx.array, dict[str, mx.array]]:
    """Total loss and its parts: canvas cross-entropy (mean over positions, or weighted by 1/t per example with
    `reweight`) + encoder_weight x the encoder's next-token cross-entropy (mean over every position that has a
    next token)."""
    enc_logits, logits = batch_logits(model, batch)
    S = batch.ids.shape[1]
    enc_ce = _cross_entropy(enc_logits, mx.array(batch.ids[:, 1:]))  # (B, S-1)
    valid = mx.arange(S - 1)[None, :] < (mx.array(batch.lengths) - 1)[:, None]
    enc_loss = (enc_ce * valid).sum() / valid.sum()
    dec_ce = _cross_entropy(logits, mx.array(batch.targets))  # (B, C)
    if reweight:
        dec_loss = (dec_ce.mean(axis=1) / mx.array(batch.t, dtype=mx.float32)).mean()
    else:
        dec_loss = dec_ce.mean()
    return dec_loss + encoder_weight * enc_loss, {"canvas": dec_loss, "encoder": enc_loss}


# ---- the training loop ----------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-4
    warmup: int = 20  # linear warm-up steps, then cosine decay to 10%
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # global gradient-norm clip
    lora_rank: int | None = None  # None: full fine-tuning; else LoRA on attention and dense-MLP projections
    lora_scale: float = 20.0
    train_router: bool = False  # the router stays frozen by default when fine-tuning a trained model
    encoder_weight: float = 1.0
    reweight: bool = False  # canvas loss weighted by 1/t
    self_conditioning_prob: float = 0.5
    eps: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 100

    def validate(self, names: dict[str, str] | None = None) -> None:
        """Raise a ValueError (ConfigError) for a setting training cannot use; `names` shows settings under other
        names (the command line's flags)."""
        n = (names or {}).get
        for name in ("steps", "batch_size", "checkpoint_every"):
            require_int(n(name, name), getattr(self, name), 1)
        require_int(n("warmup", "warmup"), self.warmup, 0)
        require_int(n("seed", "seed"), self.seed, 0)
        require_float(n("learning_rate", "learning_rate"), self.learning_rate, positive=True)
        for name in ("weight_decay", "encoder_weight", "self_conditioning_prob"):
            require_float(n(name, name), getattr(self, name))
        require_float(n("lora_scale", "lora_scale"), self.lora_scale, positive=True)
        require_float(n("eps", "eps"), self.eps, positive=True)
        if self.grad_clip is not None:
            require_float(n("grad_clip", "grad_clip"), self.grad_clip, positive=True)
        if self.lora_rank is not None:
            require_int(n("lora_rank", "lora_rank"), self.lora_rank, 1)
        if self.self_conditioning_prob > 1 or self.eps >= 1:
            raise ConfigError("self_conditioning_prob must be at most 1 and eps below 1")


# Settings a checkpoint's run must share with the run that resumes it: they decide what trains and how.
STRUCTURAL = ("lora_rank", "lora_scale", "train_router")


TRAINER = "trainer"  # the checkpoint subfolder holding what resuming needs
LORA_TARGETS = r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def prepare(model: Model, cfg: TrainConfig) -> None:
    """Choose what trains. LoRA: adapters on the attention and dense-MLP projections, nothing else, initialised
    from cfg.seed (the same run starts from the same adapters whatever else drew random numbers before). Full:
    every weight but the router (unless train_router) and the layer scalars (buffers in transformers)."""
    import re

    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear

    if cfg.lora_rank is not None:
        model.freeze()
        targets = [
            (p, m)
            for p, m in model.named_modules()
            if re.fullmatch(LORA_TARGETS, p) and isinstance(m, (nn.Linear, nn.QuantizedLinear))
        ]
        adapters = [(p, LoRALinear.from_base(m, r=cfg.lora_rank, scale=cfg.lora_scale)) for p, m in targets]
        keys = mx.random.split(mx.random.key(cfg.seed), max(len(adapters), 1))
        for (_, a), key in zip(adapters, keys):  # mlx-lm's initialisation, drawn from the run's seed
            bound = a.lora_a.shape[0] ** -0.5
            a.lora_a = mx.random.uniform(-bound, bound, a.lora_a.shape, key=key)
        model.update_modules(tree_unflatten(adapters))
        return
    model.unfreeze()
    for layer in model.layers:
        layer.freeze(keys=["layer_scalar", "encoder_layer_scalar"], recurse=False)
        if not cfg.train_router:
            layer.router.freeze()


def merged_weights(model: Model) -> dict[str, mx.array]:
    """The model's weights under the names `load` reads, with LoRA adapters folded into their base layers."""
    from mlx_lm.tuner.lora import LoRALinear

    weights = dict(tree_flatten(model.parameters()))
    for path, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        for k in list(weights):
            if k.startswith(path + "."):
                del weights[k]
        for k, v in tree_flatten(m.fuse(dequantize=False).parameters()):  # a quantized base stays quantized
            weights[f"{path}.{k}"] = v
    return weights


def end_of_turn(tokenizer, eos_id: int) -> int:
    """The id that ends an answer: the chat template's end of turn (`<turn|>`), or EOS where there is none."""
    end = tokenizer.convert_tokens_to_ids("<turn|>")
    return end if isinstance(end, int) and end != getattr(tokenizer, "unk_token_id", None) else eos_id


def encode_example(tokenizer, prompt: str | list[dict], answer: str, end: int) -> tuple[list[int], list[int]]:
    """One training example: the prompt rendered exactly as generation renders it (chat template, generation
    prompt), and the answer's ids followed by the end of turn."""
    return list(render_prompt(tokenizer, prompt)), tokenizer.encode(answer, add_special_tokens=False) + [end]


def load_jsonl(path: str | Path, tokenizer, eos_id: int) -> list[tuple[list[int], list[int]]]:
    """Chat-formatted JSONL: one {"messages": [..., {"role": "assistant", "content": ...}]} (or {"prompt": ...,
    "completion": ...}) per line. The prompt is the chat template's render of the messages before the last, with
    the generation prompt, exactly as at inference; the response is the answer followed by the end of turn.
    A line that is not such an example is a ValueError naming the file, the line and what is wrong."""
    import json

    end = end_of_turn(tokenizer, eos_id)
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                *history, answer = _messages(json.loads(line))
                pair = encode_example(tokenizer, history, answer["content"], end)
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{n}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            out.append(pair)
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def _messages(row) -> list[dict]:
    """One JSONL example as chat messages, checked."""
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError('"messages" must be a list of {"role": "...", "content": "..."} objects')
    elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        raise ValueError('expected {"messages": [...]} or {"prompt": "...", "completion": "..."}')
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's, after at least one other")
    return messages


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a folder that `train` wrote (it holds the trainer's state)."""
    return (Path(path) / TRAINER / "state.json").is_file()


def check_out(out_dir: str | Path, protect: list[Path], force: bool) -> None:
    """Refuse an --out that would destroy what is not a checkpoint of this tool's (a folder of other files, a
    plain file) unless `force`, and always one that holds the model or the data being trained on. An empty or
    missing folder, or a checkpoint (resumed), is fine."""
    from .files import check_output

    check_output(
        Path(out_dir),
        force=force,
        ours=is_checkpoint,
        protect=protect,
        what="--out",
        not_ours=" and holds no checkpoint",
    )


def resume_state(
    out_dir: Path, cfg: TrainConfig, base: str | None = None, log=None, backend: str = "mlx"
) -> dict | None:
    """The trainer state of the checkpoint in `out_dir` when this run can resume it (None when there is none); a
    ValueError when the run differs in what trains (LoRA or not, its rank and scale, the router), in the backend
    that wrote it (MLX here, PyTorch in torch_train) or, given the base model's `fingerprint`, in the model it
    started from. `log` hears of the settings that changed."""
    import json

    if not is_checkpoint(out_dir):
        return None
    try:
        state = json.loads((Path(out_dir) / TRAINER / "state.json").read_text())
        saved, step = state["config"], state["step"]
        if not isinstance(saved, dict) or type(step) is not int or step < 0:
            raise ValueError("bad config or step")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{out_dir} holds a damaged checkpoint ({e}); pass --force to start over") from None
    if state.get("backend", "mlx") != backend:
        raise ValueError(
            f"{out_dir} holds a run of the {state.get('backend')} trainer, not the {backend} one; resume it with "
            "that backend, or pass --force to start over"
        )
    for key in STRUCTURAL:
        if saved.get(key) != getattr(cfg, key):
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"{out_dir} holds a run with {key} {saved.get(key)}, this one has {getattr(cfg, key)}; resume with the "
                f"same {flag}, or pass --force to start over"
            )
    if base is not None and state.get("base") not in (None, base):
        raise ValueError(
            f"{out_dir} holds a run that started from another model (or dtype); resume with its --model, or pass "
            "--force to start over"
        )
    changed = [k for k, v in dataclasses.asdict(cfg).items() if k in saved and saved[k] != v]
    if changed and log is not None:
        log("note: resuming with other " + ", ".join(f"{k} ({saved[k]} -> {getattr(cfg, k)})" for k in changed))
    return state


def make_step(model, optimizer, cfg: TrainConfig):
    """One optimizer step of `train`, as a function of a batch: the loss and its gradients, clipping, the update,
    all evaluated; returns (loss, its parts). benchmarks/train_speed.py times this same function."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    loss_and_grad = nn.value_and_grad(model, lambda batch: loss(model, batch, cfg.encoder_weight, cfg.reweight))

    def step(batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        (value, parts), grads = loss_and_grad(batch)
        if cfg.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, value)
        return value, parts

    return step


def train(
    model: Model,
    examples: list[tuple[list[int], list[int]]],
    out_dir: str | Path,
    model_dir: str | Path | None,
    cfg: TrainConfig,
    eos_id: int,
    pad_id: int = 0,
    progress: bool = False,
    log=print,
    stop_after: int | None = None,
    force: bool = False,
) -> Model:
    """Train `model` on (prompt ids, response ids) pairs, checkpointing every `checkpoint_every` steps into
    `out_dir` in the folder layout `load` reads (plus the trainer's state). A run whose out_dir holds a
    checkpoint resumes from it, with the same batches the uninterrupted run would have drawn. `model_dir` is the
    folder whose tokenizer and configs are copied into checkpoints. `stop_after` ends the run early (tests).
    `out_dir` must be missing, empty or a checkpoint (see `check_out`); `force` replaces whatever it holds and
    starts over."""
    import mlx.optimizers as optim

    from .files import recover

    cfg.validate()
    out_dir = Path(out_dir)
    for line in recover(out_dir.parent):  # a run killed mid-checkpoint: its checkpoint back in place
        log(line)
    check_out(out_dir, [Path(model_dir)] if model_dir is not None else [], force)
    check_examples(examples, model.args.vocab_size)
    base = fingerprint(model)
    state = None if force else resume_state(out_dir, cfg, base, log)
    prepare(model, cfg)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(cfg.learning_rate / max(cfg.warmup, 1), cfg.learning_rate, max(cfg.warmup, 1)),
            optim.cosine_decay(cfg.learning_rate, max(cfg.steps - cfg.warmup, 1), cfg.learning_rate * 0.1),
        ],
        [max(cfg.warmup, 1)],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    start, losses = 0, []  # losses: [step, total, canvas, encoder] per step, kept in the checkpoint
    if state is not None:
        model.update(tree_unflatten(list(mx.load(str(out_dir / TRAINER / "trainable.safetensors")).items())))
        optimizer.init(model.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(out_dir / TRAINER / "optimizer.safetensors")).items()))
        rng.bit_generator.state = state["rng"]
        start = state["step"]
        losses = state.get("losses", [])
        log(f"resuming from step {start}")

    step_fn = make_step(model, optimizer, cfg)
    bar = _Bar(cfg.steps, start) if progress else None
    batches = length_batches(examples, cfg.batch_size, cfg.seed)
    tic, tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        batch = next_batch(examples, batches, rng, cfg, model.canvas_length, model.args.vocab_size, eos_id, pad_id)
        value, parts = step_fn(batch)
        if not math.isfinite(float(value)):  # never checkpoint NaN weights over good ones
            raise ValueError(
                f"the loss is {float(value)} at step {step + 1}; stopped without writing it (the last checkpoint in "
                f"{out_dir} is kept); try a lower --lr"
            )
        tokens += int(batch.lengths.sum())
        losses.append([step + 1, float(value), float(parts["canvas"]), float(parts["encoder"])])
        tps = tokens / (time.perf_counter() - tic)
        if bar:
            bar.update(step + 1, float(value), tps)
        elif (step + 1) % max(cfg.checkpoint_every // 4, 1) == 0 or step + 1 == cfg.steps:
            log(progress_line(step + 1, cfg.steps, losses[-1], tps))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _checkpoint(model, optimizer, rng, step + 1, cfg, out_dir, model_dir, losses, base, log)
        if stop_after is not None and step + 1 >= stop_after:
            break
    if bar:
        bar.close()
    return model


def next_batch(examples, batches, rng, cfg: TrainConfig, canvas_length, vocab_size, eos_id, pad_id) -> Batch:
    """One step's batch: one of `length_batches` at random (or a draw with replacement from fewer examples than a
    batch), made with the run's generator."""
    if batches:
        chosen = batches[rng.integers(len(batches))]
    else:  # fewer examples than a batch
        chosen = rng.choice(len(examples), cfg.batch_size, replace=True)
    return make_batch(
        [examples[i] for i in chosen],
        canvas_length,
        vocab_size,
        eos_id,
        pad_id,
        rng,
        cfg.eps,
        cfg.self_conditioning_prob,
    )


def progress_line(step: int, steps: int, losses: list[float], tps: float) -> str:
    """The log line of a step: `losses` is [step, total, canvas, encoder]."""
    _, value, canvas, encoder = losses
    return f"step {step}/{steps} loss {value:.4f} (canvas {canvas:.4f}, encoder {encoder:.4f}) {tps:.0f} tok/s"


def length_batches(
    examples: list[tuple[list[int], list[int]]], batch_size: int, seed: int = 0, bucket: int = 16
) -> list[np.ndarray]:
    """Batches drawn at random each step, each example in one batch. Examples are grouped by length rounded up
    to `bucket` tokens and shuffled within their group before being cut, so a batch mixes the examples of
    neighbouring lengths (whatever task they come from: plain length sorting makes batches nearly single-task,
    and the loss swings from batch to batch) while padding stays under `bucket` tokens an example."""
    sizes = np.array([-(-(len(p) + len(r)) // bucket) for p, r in examples])
    order = np.argsort(sizes, kind="stable")
    rng = np.random.default_rng(seed)
    for s in np.unique(sizes):
        group = np.flatnonzero(sizes[order] == s)
        order[group] = rng.permutation(order[group])
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def check_examples(examples: list[tuple[list[int], list[int]]], vocab: int) -> None:
    """Every example non-empty, every id inside the model's vocabulary (a ValueError naming the first that is not)."""
    for n, (prompt, response) in enumerate(examples, 1):
        if not prompt or not response:
            raise ValueError(f"example {n} has an empty prompt or response")
        bad = next((i for i in (*prompt, *response) if not 0 <= i < vocab), None)
        if bad is not None:
            raise ValueError(
                f"example {n} holds token id {bad}, outside the model's vocabulary (0..{vocab - 1}); the tokenizer "
                "does not belong to this model"
            )


def _checkpoint(model, optimizer, rng, step, cfg, out_dir: Path, model_dir, losses, base, log) -> None:
    """The MLX trainer's checkpoint: the trainable weights and the optimizer's state beside state.json."""

    def trainer(folder: Path) -> None:
        trainable = dict(tree_flatten(model.trainable_parameters()))
        mx.save_safetensors(str(folder / "trainable.safetensors"), trainable)
        mx.save_safetensors(str(folder / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))

    state = trainer_state(step, rng, cfg, base, "mlx", losses)
    save_checkpoint(out_dir, model_dir, model.config.raw, merged_weights(model), trainer, state, log)


def trainer_state(step: int, rng, cfg: TrainConfig, base: str, backend: str, losses: list) -> dict:
    """state.json: what `resume_state` checks and a resumed run continues from."""
    state = {"step": step, "rng": rng.bit_generator.state, "config": dataclasses.asdict(cfg), "base": base}
    return state | {"backend": backend, "losses": losses}


def save_checkpoint(out_dir: Path, model_dir, config: dict, weights: dict[str, mx.array], trainer, state: dict, log):
    """Write a loadable model folder (`weights` under our names, `config` as config.json, the tokenizer and other
    metadata of `model_dir`), with the trainer's state in its `trainer/` subfolder (`trainer(folder)` writes the
    backend's own files there, beside state.json), atomically: a killed run leaves the last checkpoint whole."""
    import json

    from .files import copy_metadata, replace_dir, staging_dir

    tmp = staging_dir(out_dir)
    try:
        if model_dir is not None:
            copy_metadata(Path(model_dir), tmp, log)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in sorted(weights)}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / TRAINER).mkdir()
        trainer(tmp / TRAINER)
        (tmp / TRAINER / "state.json").write_text(json.dumps(state, indent=2))
        replace_dir(tmp, out_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _Bar:
    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(
            "training",
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.p.add_task("train", total=total, completed=start, info="")
        self.p.start()

    def update(self, step: int, value: float, tps: float) -> None:
        self.p.update(self.task, completed=step, info=f"loss {value:.4f} · {tps:.0f} tok/s")

    def close(self) -> None:
        self.p.stop()


def init_weights(model: Model, std: float = 0.02, seed: int = 0) -> None:
    """Initialise for training from scratch: normal(0, std) for projections, experts and the embedding; ones for
    norm weights, router scales and layer scalars, as transformers does, except the q/k norms, at head_dim^-1/4.

    Attention runs at scale 1.0 on RMS-normed q and k, so with unit norm weights the logits of a fresh model have
    a standard deviation of sqrt(head_dim) (about 5 here): attention starts nearly one-hot on random keys and
    learns to copy slowly. At head_dim^-1/4 the logits start at unit scale, as 1/sqrt(d) attention does (the demo
    model reached 2.5% held-out accuracy after 600 steps with ones, and did not learn to copy)."""
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for i, (name, w) in enumerate(params):
        if w.ndim >= 2:
            new.append((name, (std * mx.random.normal(w.shape, key=keys[i])).astype(w.dtype)))
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            new.append((name, mx.full(w.shape, w.shape[0] ** -0.25, dtype=w.dtype)))
        else:
            new.append((name, mx.ones(w.shape, dtype=w.dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
