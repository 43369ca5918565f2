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

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import context_source
from .config import FULL, SLIDING
from .model import Model, attention_masks


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


def loss(
    model: Model, batch: Batch, encoder_weight: float = 1.0, reweight: bool = False
) -> tuple[mx.array, dict[str, mx.array]]:
    """Total loss and its parts: canvas cross-entropy (mean over positions, or weighted by 1/t per example with
    `reweight`) + encoder_weight x the encoder's next-token cross-entropy (mean over every position that has a
    next token)."""
    ids = mx.array(batch.ids)
    B, S = ids.shape
    kv: list[tuple[mx.array, mx.array]] = []

    def record(k: mx.array, v: mx.array):
        kv.append((k, v))
        return k, v

    # the encoder: one causal pass over the clean sequences; its K/V feed every decoder pass
    masks = attention_masks(model.args, 0, S, {t: 0 for t in set(model.args.layer_types)})
    h = model.forward(model.embed(ids), 0, [record] * len(model.layers), masks, decoder=False)
    enc_ce = _cross_entropy(model.logits(h[:, :-1]), ids[:, 1:])  # (B, S-1)
    valid = mx.arange(S - 1)[None, :] < (mx.array(batch.lengths) - 1)[:, None]
    enc_loss = (enc_ce * valid).sum() / valid.sum()

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
    dec_ce = _cross_entropy(logits, mx.array(batch.targets))  # (B, C)
    if reweight:
        dec_loss = (dec_ce.mean(axis=1) / mx.array(batch.t, dtype=mx.float32)).mean()
    else:
        dec_loss = dec_ce.mean()
    return dec_loss + encoder_weight * enc_loss, {"canvas": dec_loss, "encoder": enc_loss}
