"""The block-diffusion loop (transformers' `DiffusionGemmaGenerationMixin.generate`) as a generator of events.

`generate_step` is the token-level core: it yields a `Step` per denoising step and a `Commit` per block, and knows
nothing of tokenizers or terminals. Text-level `stream_generate` / `generate` build on it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import kernels, memory, native, sampling, streams
from .cache import PromptCache
from .config import MODES, ConfigError, GenerationConfig
from .model import CanvasKV, Model, put_positions
from .noise import Noise


@dataclass(frozen=True)
class Step:
    """One denoising step of one block."""

    block: int  # 0-based block index
    step: int  # 1 on the block's first denoising step, counting up (at most max_denoising_steps)
    draft: mx.array  # (C,) the argmax canvas after this step (unevaluated until read)
    settled: mx.array  # (C,) bool: the positions the sampler accepted this step (the rest were renoised)
    row: int = 0  # which prompt of a batch (0 for a single prompt)
    queries: int | None = None  # canvas positions this step forwarded (None: all; fewer in a speed mode)
    attended: int | None = None  # canvas positions its queries attended to (None: all; fewer with trim_eos)

    @property
    def accepted(self) -> int:
        """How many positions the sampler accepted this step."""
        return int(self.settled.sum())


@dataclass(frozen=True)
class Commit:
    """A finished block: its tokens up to (not including) the first EOS and within max_tokens."""

    block: int
    tokens: list[int]
    steps: int  # denoising steps (decoder forward passes) this block took
    finished: bool  # an EOS was generated or max_tokens reached: no block follows
    finish_reason: str | None  # "eos" or "length" when finished
    eos: int | None = None  # the EOS token that ended the output, if any
    generated: int = 0  # tokens this block generated as transformers counts them (through the EOS, else all C)


class PromptError(ValueError):
    """A prompt this model cannot take (ids outside its vocabulary, more than its context or the memory holds),
    with the reason in one line."""


def settings(
    model: Model, *, mode: str | None = None, names: dict[str, str] | None = None, **overrides
) -> GenerationConfig:
    """The checkpoint's generation defaults with a speed mode's knobs (config.MODES; None or "exact": none) and
    keyword overrides on top, validated (a ConfigError on bad values, naming each setting as `names` says, e.g.
    by its command-line flag)."""
    base = getattr(model, "generation_config", None) or GenerationConfig()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GenerationConfig)}
    if unknown:
        raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
    if mode is not None and mode not in MODES:
        flag = (names or {}).get("mode", "mode")
        raise ConfigError(f"{flag} must be one of {', '.join(MODES)}, got {mode!r}")
    knobs = {**MODES[mode or "exact"], **{k: v for k, v in overrides.items() if v is not None}}
    g = dataclasses.replace(base, **knobs)
    if isinstance(g.eos_token_id, int):
        g.eos_token_id = [g.eos_token_id]
    g.validate(names)
    return g


def _make_step_fn(g: GenerationConfig, vocab: int, cap: float = 0.0):
    """The pure part of a denoising step, compiled: one exponential pass over the vocabulary (softmax and entropy),
    the draw, then accept, renoise, and test the stop criterion. Returns the probabilities as the next step's
    self-conditioning (the decoder would otherwise compute the same softmax again). With the native kernels the
    pass is theirs, over the uniforms `sample` draws with the same key (and the softcap `cap` of raw logits);
    without, cap must be 0."""
    through_native = native.available()

    def step_fn(logits, canvas, history, temp, key):
        k_sample, k_noise = mx.random.split(key)
        if through_native:
            uniforms = sampling.gumbel_uniforms(logits.shape, k_sample)
            probs, h, argmax, sampled = sampling.native_pass(logits, temp, uniforms, True, cap)
            argmax, sampled = argmax.astype(canvas.dtype), sampled.astype(canvas.dtype)
        else:
            processed = logits / temp  # (B, C, V) temperature-scaled
            probs, h = sampling.softmax_entropy(processed)  # (B, C, V), (B, C): shared by everything below
            sampled = sampling.sample(processed, key=k_sample).astype(canvas.dtype)
            argmax = processed.argmax(axis=-1).astype(canvas.dtype)
        noise = sampling.random_canvas(canvas.shape, vocab, key=k_noise).astype(canvas.dtype)
        canvas, mask, stop, history = sampling.settle(
            canvas, sampled, argmax, h, history, noise, g.entropy_bound, g.confidence_threshold
        )
        return canvas, argmax, probs, mask, stop.all(), history

    return mx.compile(step_fn)


def _compiled_settle(g: GenerationConfig):
    """`sampling.settle` with g's bound and threshold, compiled: (canvas, sampled, argmax, h, history, noise) ->
    (canvas, accepted mask, stop (a scalar: every row), history)."""

    @mx.compile
    def tail(canvas, sampled, argmax, h, history, noise):
        canvas, mask, stop, history = sampling.settle(
            canvas, sampled, argmax, h, history, noise, g.entropy_bound, g.confidence_threshold
        )
        return canvas, mask, stop.all(), history

    return tail


def _make_split_step_fn(g: GenerationConfig, shape: tuple[int, int, int], cap: float = 0.0):
    """`_make_step_fn` for MLX's CPU backend, where a stream evaluates elementwise work on one thread and the
    sampler's pass over the (B, C, V) logits is nothing else: the pass runs as `sampling.split_pass` (the native
    kernel on every core, or two halves of the canvas on two streams), and its noise, which depends only on the
    key, is drawn on the second stream while the decoder runs (`prepare(key)`, called before the forward). Each
    row sees the same operations on the same numbers as in `_make_step_fn`, and the noise is the one
    `sampling.sample` draws with that key: the same tokens, probabilities and entropies, bit for bit
    (tests/test_generate.py). Returns (prepare, step). C >= 2 (see `sampling.gumbel_uniforms`). `cap` as for
    `_make_step_fn`."""
    B, C, V = shape
    tail = _compiled_settle(g)
    uniform = native.available()

    def prepare(key):
        k_sample, k_noise = mx.random.split(key)
        draws = sampling.gumbel_ahead(shape, [k_sample], uniform=uniform)
        return draws, sampling.random_canvas((B, C), V, key=k_noise)

    def step(logits, canvas, history, temp, gumbel, noise):
        probs, h, argmax, sampled = sampling.split_pass(logits, temp, gumbel, uniform=uniform, cap=cap)
        argmax = argmax.astype(canvas.dtype)
        canvas, mask, stop, history = tail(canvas, sampled.astype(canvas.dtype), argmax, h, history, noise)
        return canvas, argmax, probs, mask, stop, history

    return prepare, step


def _make_noise_step_fn(g: GenerationConfig):
    """`_make_step_fn` with the noise given: Gumbel noise (B, C, V) for the draw and renoise tokens (B, C)."""

    through_native = native.available()

    def step_fn(logits, canvas, history, temp, gumbel, fresh):
        if through_native:
            probs, h, argmax, sampled = sampling.native_pass(logits, temp, gumbel, False)
            argmax, sampled = argmax.astype(canvas.dtype), sampled.astype(canvas.dtype)
        else:
            processed = logits / temp
            probs, h = sampling.softmax_entropy(processed)
            sampled = (processed + gumbel).argmax(axis=-1).astype(canvas.dtype)
            argmax = processed.argmax(axis=-1).astype(canvas.dtype)
        canvas, mask, stop, history = sampling.settle(
            canvas, sampled, argmax, h, history, fresh.astype(canvas.dtype), g.entropy_bound, g.confidence_threshold
        )
        return canvas, argmax, probs, mask, stop.all(), history

    return mx.compile(step_fn)


def _make_fused_step_fn(g: GenerationConfig, vocab: int, cap: float):
    """`_make_step_fn` through the kernels: one fused pass over the raw logits (softcap, temperature, entropy,
    log-sum-exp, argmax, and the sample from the uniforms `sample` would draw with the same key, so the same seed
    samples the same tokens), then accept, renoise and the stop criterion, compiled. The next step's
    self-conditioning signal is (raw logits, temperatures, log-sum-exp) instead of the probabilities."""

    tail = _compiled_settle(g)

    def step_fn(logits, canvas, history, temp, key):
        k_sample, k_noise = mx.random.split(key)
        temps = mx.broadcast_to(temp, canvas.shape)
        h, lse, argmax, sampled = sampling.fused_pass(
            logits, temps, sampling.gumbel_uniforms(logits.shape, k_sample), cap
        )
        noise = sampling.random_canvas(canvas.shape, vocab, key=k_noise).astype(canvas.dtype)
        argmax = argmax.astype(canvas.dtype)
        canvas, mask, stop, history = tail(canvas, sampled.astype(canvas.dtype), argmax, h, history, noise)
        return canvas, argmax, (logits, temps, lse), mask, stop, history

    return step_fn


def window(share: float, canvas: int) -> int:
    """The positions a block's first step forwards with `first_window` = share: at least 1 and at most all."""
    return min(canvas, max(1, round(share * canvas)))


def partial_steps(g: GenerationConfig) -> bool:
    """Whether `g` needs a speed mode's block loop (freezing, confidence acceptance, the EOS exit or trimming;
    top-k self-conditioning alone runs in the exact loop)."""
    return g.freeze_after is not None or g.accept != "entropy" or g.eos_exit or g.trim_eos is not None


def fused() -> bool:
    """Whether generation's steps go through the kernels here (the vocabulary pass runs as a kernel)."""
    return kernels.use_kernel("vocab_pass")


def generate_step(
    model: Model,
    prompt: mx.array | None,
    g: GenerationConfig,
    max_tokens: int,
    cache: PromptCache | None = None,
    key: mx.array | None = None,
    noise: Noise | None = None,
) -> Iterator[Step | Commit]:
    """Encode `prompt` (1, P) into `cache` (new if None; prompt None: the cache already holds it), then generate
    ceil(max_tokens / C) blocks at most.

    Each block starts from uniform random tokens and runs up to `max_denoising_steps` steps; it commits its argmax
    canvas, which is encoded into the cache only when another block follows (as transformers does).

    Randomness comes from MLX's generator (`key`; a time-based one if None) unless `noise` is given: then every
    initial canvas, sampling draw and renoise token comes from it (`noise.CounterNoise(seed, vocab)` replays the
    noise of a `mlx_diffgemma reference` file, so this loop and transformers' consume the same numbers).

    Where the kernels run (kernels.use_kernel), a step's pass over the vocabulary and the self-conditioning
    input go through them, drawing the same random numbers: the same key gives the same tokens either way."""
    if prompt is not None and (prompt.ndim != 2 or prompt.shape[0] != 1):
        raise ValueError(f"prompt must have shape (1, P), got {tuple(prompt.shape)}")
    if prompt is None and (cache is None or cache.offset == 0):
        raise ValueError("no prompt: pass prompt ids or a cache that holds them")
    if prompt is not None:
        check_ids(model, prompt)
    cache = cache if cache is not None else model.make_cache()
    key = key if key is not None else mx.random.key(int(time.time_ns() % 2**31))
    C, V, N = model.canvas_length, model.args.vocab_size, g.max_denoising_steps
    through_kernels = noise is None and fused()
    prepare = None  # randomness drawn before the forward (the split sampler's Gumbel noise)
    # the native sampler applies the final softcap itself, in its one read of the raw logits
    cap = (model.args.final_logit_softcapping or 0.0) if noise is None and native.available() else 0.0
    if through_kernels:
        step_fn = _make_fused_step_fn(g, V, model.args.final_logit_softcapping or 0.0)
    elif noise is None and (streams.enabled() or native.available()) and C > 1:
        prepare, step_fn = _make_split_step_fn(g, (1, C, V), cap)
    else:
        step_fn = _make_step_fn(g, V, cap) if noise is None else _make_noise_step_fn(g)
    eos = set(g.eos_token_id)
    fast = partial_steps(g)
    if fast and noise is not None:
        raise ValueError("shared noise replays exact mode only")
    pending = prompt  # tokens to encode before the next block
    produced = 0
    for block in range(math.ceil(max_tokens / C)):
        if pending is not None:
            prefill(model, pending, cache)
            memory.drop_stale_buffers(cache)
        if noise is None:
            key, k_init = mx.random.split(key)
            canvas = sampling.random_canvas((1, C), V, key=k_init)
        else:
            canvas = noise.canvas(block, (1, C)).astype(mx.int32)
        history = sampling.new_history(g.stability_threshold, 1, C)
        sc, argmax, steps = None, canvas, 0
        if fast:
            argmax, steps, key = yield from _fast_block(model, cache, g, canvas, key, block)
        for countdown in (
            range(N, 0, -1) if not fast else ()
        ):  # transformers' step counter: N first, 1 at the last possible step
            if noise is None:
                key, k_step = mx.random.split(key)
                randomness = (k_step,) if prepare is None else prepare(k_step)  # before the forward: it overlaps
            else:
                randomness = (noise.sample(block, steps + 1, (1, C, V)), noise.renoise(block, steps + 1, (1, C)))
            if through_kernels:
                soft = None if sc is None else model.soft_embed_logits(*sc, top_k=g.sc_top_k)
                logits = model.denoise(canvas, cache, self_conditioning_embeds=soft, softcap=False)
            else:
                logits = model.denoise(canvas, cache, self_conditioning_probs=sc, sc_top_k=g.sc_top_k, softcap=not cap)
            temp = mx.array(sampling.temperature(countdown, g.t_min, g.t_max, N), dtype=mx.float32)
            canvas, argmax, sc, mask, stop, history = step_fn(logits, canvas, history, temp, *randomness)
            steps += 1
            mx.async_eval(canvas, argmax, stop)
            yield Step(block, steps, argmax[0], mask[0], queries=C)
            if stop.item():  # the one host read per step
                break
        tokens = argmax[0].tolist()
        hits = [i for i, t in enumerate(tokens) if t in eos]
        cut = hits[0] if hits else C
        keep = min(cut, max_tokens - produced)
        produced += keep
        reason = "eos" if hits and keep == cut else "length" if produced >= max_tokens else None
        eos_token = tokens[cut] if reason == "eos" else None
        yield Commit(block, tokens[:keep], steps, reason is not None, reason, eos_token, cut + 1 if hits else C)
        if reason is not None:
            return
        pending = argmax


# trim_eos: an end of sequence found by the first step's window in its last this many positions does not trim
WINDOW_MARGIN = 2


def _fast_block(
    model: Model,
    cache: PromptCache,
    g: GenerationConfig,
    canvas: mx.array,
    key: mx.array,
    block: int,
    start: mx.array | None = None,
):
    """One block in a speed mode (a generator of Steps; returns the argmax canvas (1, C), the steps taken and the
    key to go on with). Its random numbers are drawn as exact mode's loop draws them, so with every knob neutral
    it gives exact mode's tokens.

    As exact mode, but: acceptance by the entropy bound or by confidence (top probability >= accept_confidence,
    the most confident position at least); with `freeze_after`, a position accepted with an unchanged argmax for
    freeze_after + 1 steps in a row (and, with `freeze_confidence`, at least that sure of it) freezes: its token
    is its argmax, it is no longer renoised or forwarded, and later steps attend to its recorded K/V (a position
    that froze on another token than the one it was read with is forwarded once more, so that its K/V are its
    token's); every `refresh_every` steps one full forward refreshes every K/V. With `trim_eos`, once the argmax
    canvas's first end-of-sequence token is that sure (top probability), later steps forward and attend to the
    canvas through it only (the rest counts as end-of-sequence: what the commit keeps ends there anyway); if it
    goes, the whole canvas comes back, the positions left out forwarded with no self-conditioning signal, as on a
    first step. With `first_window` as well, the first step forwards only that share of the canvas: if no end
    shows in it (or only in its last WINDOW_MARGIN positions), the rest joins at the next step. The block ends
    when every position it still forwards is frozen, by the reference stop rule (over the whole canvas, the left
    out positions end-of-sequence and certain), or (eos_exit) as soon as its argmax canvas is all end-of-sequence
    tokens. `start` (1,): the first real slot of a left-padded cache (a batch's row)."""
    C, V, N = model.canvas_length, model.args.vocab_size, g.max_denoising_steps
    eos = np.array(sorted(set(g.eos_token_id)))
    kv = CanvasKV() if g.freeze_after is not None else None
    uniform = native.available()  # the native sampler takes the uniforms, not Gumbel draws
    frozen, run = np.zeros(C, bool), np.zeros(C, np.int64)
    stale = np.zeros(C, bool)  # frozen with another token than the one their recorded K/V were computed from
    tokens = np.array(canvas[0])
    argmax = tokens.copy()
    sure = np.zeros(C, np.float32)  # each position's top probability when last forwarded
    history = sampling.new_history(g.stability_threshold, 1, C)
    soft, since_full = None, 0
    L = C if g.first_window is None else window(g.first_window, C)  # positions [0, L) are forwarded and attended to
    probing = L < C
    for steps, countdown in enumerate(range(N, 0, -1), 1):
        full = kv is None or steps == 1 or not frozen[:L].any() or (g.refresh_every and since_full >= g.refresh_every)
        pos = np.arange(L) if full else np.nonzero((~frozen | stale)[:L])[0]  # stale ones: K/V of their token
        attended = L  # this step's canvas keys (L may change below)
        live = None if full else mx.array(pos, dtype=mx.int32)
        since_full = 1 if full else since_full + 1
        key, k_step = mx.random.split(key)
        k_sample, k_noise = mx.random.split(k_step)
        split = (streams.enabled() or uniform) and len(pos) > 1  # the sampler as in exact mode
        if split:  # its noise drawn on the second stream while the decoder runs
            gumbel = sampling.gumbel_ahead((1, len(pos), V), [k_sample], uniform=uniform)
        logits = model.denoise(
            mx.array(tokens[:L])[None], cache, self_conditioning_embeds=soft, canvas_kv=kv, live=live, start=start
        )
        temp = mx.array(sampling.temperature(countdown, g.t_min, g.t_max, N), dtype=mx.float32)
        if split:
            probs, h, am, sampled = sampling.split_pass(logits, temp, gumbel, uniform)  # (1, Q, V), (1, Q) each
            am, sampled = am[0], sampled[0]
        else:
            processed = logits / temp
            probs, h = sampling.softmax_entropy(processed)  # (1, Q, V), (1, Q): the forwarded positions
            am, sampled = processed[0].argmax(-1), sampling.sample(processed, key=k_sample)[0]
        noise = sampling.random_canvas((len(pos),), V, key=k_noise)
        cand = ~frozen[pos]  # frozen positions forwarded (a full step, a stale one) keep their token
        stale[pos] = False
        h_cand = mx.where(mx.array(cand), h[0], mx.inf)
        top = probs[0].max(axis=-1)
        if g.accept == "entropy":
            acc = sampling.accept_mask(None, g.entropy_bound, h_cand[None])[0]
        else:
            best = mx.argmin(h_cand)  # at least the most certain candidate
            acc = (top >= g.accept_confidence) | (mx.arange(len(pos)) == best)
        this = model.soft_embed_probs(probs) if g.sc_top_k is None else model.soft_embed_top_k(probs, g.sc_top_k)[0]
        soft = this if full else put_positions(soft, live, this, axis=1)  # frozen positions keep theirs
        results = (am, sampled, acc, noise, h[0], top)
        mx.eval(*results, soft)  # one evaluation for the step (the next step's signal included)
        am, sampled, acc, noise, h, top = (np.array(a) for a in results)
        acc &= cand
        same, read = argmax[pos] == am, tokens[pos]  # read: the tokens this step's K/V were computed from
        argmax[pos[cand]] = am[cand]
        sure[pos] = top
        tokens[pos[cand]] = np.where(acc, sampled, noise)[cand]
        run[pos] = np.where(acc, np.where(same, run[pos] + 1, 1), 0)
        if g.freeze_after is not None:
            newly = acc & (run[pos] > g.freeze_after)
            if g.freeze_confidence is not None:
                newly &= top >= g.freeze_confidence
            frozen[pos[newly]] = True
            stale[pos[newly]] = (read[newly] != am[newly]) & g.refresh_frozen
            tokens[pos[newly]] = am[newly]
        if g.trim_eos is not None:  # forward the canvas only through the answer's end, once that end is sure
            ends = np.nonzero(np.isin(argmax[:L], eos))[0]
            first = int(ends[0]) if len(ends) else None
            # after the first step's window: an end in its last positions may be the window's, not the answer's
            short = first is None or (probing and first + 1 + WINDOW_MARGIN > L)
            probing = False
            if not short and sure[first] >= g.trim_eos and first + 1 < L:
                L = first + 1
                soft = soft[:, :L]
                if kv is not None:
                    kv.truncate(L)
            elif short and L < C:  # no end in sight: the whole canvas again, the new positions forwarded next
                argmax[L:], frozen[L:], stale[L:], run[L:] = tokens[L:], False, False, 0
                soft = mx.concatenate([soft, mx.zeros((1, C - L, soft.shape[2]), soft.dtype)], axis=1)
                if kv is not None:
                    kv.extend(C)
                L = C
            if L < C:  # the positions left out count as end-of-sequence (one shows before them)
                argmax[L:] = argmax[first]
        settled = frozen.copy()
        settled[pos[acc]] = True
        settled[L:] = True
        draft = mx.array(argmax)
        yield Step(block, steps, draft, mx.array(settled), queries=len(pos), attended=attended)
        entropy = np.zeros(C, np.float32)
        entropy[pos[cand]] = h[cand]
        entropy[L:] = 0  # positions this step trimmed away count as certain end-of-sequence
        stop, history = sampling.stop_criterion(
            history, draft[None], None, g.confidence_threshold, mx.array(entropy)[None]
        )
        if frozen[:L].all() or (g.eos_exit and np.isin(argmax, eos).all()) or bool(stop.all()):
            break
    return mx.array(argmax)[None], steps, key


# ---- text ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A committed block as text: what it added to the answer and to the thought channel."""

    index: int
    tokens: list[int]
    text: str
    thought: str
    steps: int
    row: int = 0  # which prompt of a batch


@dataclass(frozen=True)
class Done:
    """The end of a generation, with its statistics."""

    finish_reason: str  # "eos" or "length"
    text: str
    thought: str
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    denoising_steps: int
    tokens_per_forward: float  # transformers' definition: tokens through the EOS / decoder forward passes
    peak_memory_gb: float
    eos: int | None = None  # the EOS token that ended the output (not part of the text)
    row: int = 0  # which prompt of a batch


def is_batch(prompt) -> bool:
    """Whether `prompt` is several prompts: a list of strings, or of lists (messages or ids)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)


def render_prompt(
    tokenizer,
    prompt: str | list[dict] | list[int],
    system: str | None = None,
    enable_thinking: bool = False,
    raw: bool = False,
) -> list[int]:
    """Token ids for a prompt: a string rendered as one user turn with the chat template (optionally after a
    system prompt), a list of chat messages, ids as they are (checked against the vocabulary where they are
    used), or (raw) a string tokenized without a template."""
    if not isinstance(prompt, (str, list)):
        raise PromptError(
            f"a prompt is a string, a list of messages or a list of token ids, not {type(prompt).__name__}"
        )
    if isinstance(prompt, list) and not all(isinstance(m, dict) for m in prompt):
        ids = list(prompt)
    elif raw:
        if not isinstance(prompt, str):
            raise ValueError("raw mode takes a string prompt")
        ids = tokenizer.encode(prompt)
    else:
        if isinstance(prompt, list) and not all(
            isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        ):
            raise PromptError('chat messages are {"role": "...", "content": "..."} dicts')
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, enable_thinking=enable_thinking
        )
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
    if not ids or (isinstance(prompt, str) and not prompt.strip()):
        raise PromptError("the prompt is empty")
    return ids


class _TextStream:
    """Routes committed tokens to the answer or the thought channel and detokenizes each incrementally."""

    HEADER = "thought\n"  # the channel name that follows <|channel>

    def __init__(self, tokenizer, in_thought: bool = False):
        self.open = _token_id(tokenizer, "<|channel>")
        self.close = _token_id(tokenizer, "<channel|>")
        self.answer, self.thought = copy.copy(tokenizer.detokenizer), copy.copy(tokenizer.detokenizer)
        self.answer.reset()
        self.thought.reset()
        self.in_thought = in_thought
        self.thought_sent = 0

    def add(self, tokens: list[int], final: bool = False) -> tuple[str, str]:
        for t in tokens:
            if t == self.open:
                self.in_thought = True
            elif t == self.close:
                self.in_thought = False
            else:
                (self.thought if self.in_thought else self.answer).add_token(t)
        if final:
            self.answer.finalize()
            self.thought.finalize()
        text = self.thought.text
        if self.HEADER.startswith(text):
            text = ""
        elif text.startswith(self.HEADER):
            text = text[len(self.HEADER) :]
        new_thought, self.thought_sent = text[self.thought_sent :], len(text)
        return self.answer.last_segment, new_thought


def _token_id(tokenizer, token: str) -> int | None:
    i = tokenizer.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None) else None


def stream_generate(
    model: Model,
    tokenizer,
    prompt: str | list,
    *,
    max_tokens: int | None = None,
    system: str | None = None,
    enable_thinking: bool = False,
    raw: bool = False,
    seed: int | list[int] | None = None,
    cache: PromptCache | None = None,
    batch_size: int | None = None,
    **overrides,
) -> Iterator[Step | Block | Done]:
    """Generate text by block diffusion, yielding a `Step` per denoising step, a `Block` per committed block and
    one final `Done`. Settings default to the checkpoint's generation_config.json; keyword overrides use its names
    (max_denoising_steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold, eos_token_id).
    The same seed reproduces a run on the same machine.

    A list of prompts (strings, message lists or id lists) is generated in one batch; each event's `row` says
    whose it is, and each row gives what its prompt gives alone with its seed (`seed` + row, or a list of seeds).
    `batch_size` caps the rows in flight: the next prompt joins as soon as a row finishes (at a block boundary)."""
    g = settings(model, **overrides)
    max_tokens = g.max_new_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    batch = is_batch(prompt)
    seeds = seed if batch and isinstance(seed, list) else [seed]
    for s in seeds:
        if s is not None and (type(s) is not int or s < 0):
            raise ValueError(f"seed must be an integer >= 0, got {s!r}")
    if not batch:
        ids = render_prompt(tokenizer, prompt, system, enable_thinking, raw)
        yield from _stream(model, tokenizer, ids, g, max_tokens, cache or model.make_cache(), seed)
        return
    if cache is not None:
        raise ValueError("a batch of prompts takes no cache")
    if isinstance(seed, list) and len(seed) != len(prompt):
        raise ValueError(f"{len(prompt)} prompts and {len(seed)} seeds")
    ids = [render_prompt(tokenizer, p, system, enable_thinking, raw) for p in prompt]
    if isinstance(seed, list):
        seeds = seed
    else:
        base = seed if seed is not None else time.time_ns() % 2**31
        seeds = [base + i for i in range(len(ids))]
    if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    yield from _stream_batch(model, tokenizer, ids, g, max_tokens, seeds, batch_size or len(ids))


class ContextError(PromptError):
    """A prompt (with the blocks to generate) longer than the model's context, or than memory can hold."""


def check_ids(model: Model, ids: list[int] | mx.array) -> None:
    """Every id inside the model's vocabulary (an id past the embedding table would read outside it)."""
    V = model.args.vocab_size
    if isinstance(ids, mx.array):
        if ids.size == 0:
            raise PromptError("the prompt is empty")
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise PromptError(f"token ids must be integers, got {ids.dtype}")
        lo, hi = mx.min(ids).item(), mx.max(ids).item()
        bad = hi if hi >= V else lo if lo < 0 else None
    else:
        bad = next((i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < V), None)
    if bad is not None:
        raise PromptError(
            f"token id {bad!r} is outside the model's vocabulary (0..{V - 1}); the tokenizer or the ids do not "
            "belong to this model"
        )


PREFILL_STEP = 512  # prompt tokens encoded per pass (mlx-lm's prefill step size, smaller for CPU attention)


def prefill(
    model: Model, ids: mx.array, cache: PromptCache, step: int = PREFILL_STEP, start: mx.array | None = None
) -> None:
    """Encode ids (B, L) into `cache` `step` tokens at a time, evaluating the cache between pieces: memory holds
    one piece's attention over the cache, so it grows linearly with the prompt instead of with its square. Same
    result as one `model.encode` (the sliding layers' masks join the cached window to each piece). The last piece
    is left unevaluated, as `encode` leaves it (a committed block is evaluated with the next denoising step).
    `start`: a batch's padding, as for `Model.encode`."""
    for first in range(0, ids.shape[1], step):
        if first:
            cache.materialize()
        model.encode(ids[:, first : first + step], cache, start)


def memory_estimate(model: Model, positions: int, batch: int = 1) -> memory.Estimate:
    """What a context of `positions` tokens needs in memory (see `memory.estimate`)."""
    return memory.estimate(
        model.args,
        model.canvas_length,
        model.dtype.size,
        positions,
        PREFILL_STEP,
        batch=batch,
        dense_experts=bool(model.layers) and model.layers[0].experts.dense(),
        fused_attention=mx.default_device() == mx.gpu,
    )


def _check_context(model: Model, cache: PromptCache, n_prompt: int, max_tokens: int) -> None:
    C, limit = model.canvas_length, model.args.max_position_embeddings
    needed = cache.offset + n_prompt + math.ceil(max_tokens / C) * C
    held = f" after {cache.offset} earlier tokens" if cache.offset else ""
    if needed > limit:
        raise ContextError(
            f"the prompt has {n_prompt} tokens{held}; with {max_tokens} new tokens (in blocks of {C}) it needs "
            f"{needed} positions, more than the model's context of {limit}"
        )
    est, free = memory_estimate(model, needed), memory.available()
    if free is not None and est.total > free:
        raise ContextError(
            f"the prompt has {n_prompt} tokens{held}; with {max_tokens} new tokens it needs about "
            f"{memory.fmt(est.total)} of memory (KV cache {memory.fmt(est.kv_cache)}, working "
            f"{memory.fmt(est.total - est.kv_cache)}) and {memory.fmt(max(free, 0))} is available; shorten it"
        )


def _stream(model, tokenizer, ids, g, max_tokens, cache, seed, in_thought=None) -> Iterator[Step | Block | Done]:
    check_ids(model, ids)
    _check_context(model, cache, len(ids), max_tokens)
    key = mx.random.key(seed if seed is not None else time.time_ns() % 2**31)
    stream = _TextStream(tokenizer, in_thought if in_thought is not None else _opens_thought(tokenizer, ids))
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prefill(model, mx.array([ids]), cache)
    cache.materialize()
    prompt_time = time.perf_counter() - tic
    tic = time.perf_counter()
    texts, thoughts, n_tokens, generated, steps = [], [], 0, 0, 0
    for event in generate_step(model, None, g, max_tokens, cache, key):
        if isinstance(event, Step):
            yield event
            continue
        text, thought = stream.add(event.tokens, final=event.finished)
        texts.append(text)
        thoughts.append(thought)
        n_tokens, generated, steps = n_tokens + len(event.tokens), generated + event.generated, steps + event.steps
        yield Block(event.block, event.tokens, text, thought, event.steps)
        if event.finished:
            gen_time = time.perf_counter() - tic
            yield Done(
                finish_reason=event.finish_reason,
                text="".join(texts),
                thought="".join(thoughts),
                prompt_tokens=len(ids),
                prompt_tps=len(ids) / max(prompt_time, 1e-9),
                generation_tokens=n_tokens,
                generation_tps=n_tokens / max(gen_time, 1e-9),
                denoising_steps=steps,
                tokens_per_forward=generated / max(steps, 1),
                peak_memory_gb=mx.get_peak_memory() / 1e9,
                eos=event.eos,
            )


def _stream_batch(model, tokenizer, ids_list, g, max_tokens, seeds, batch_size) -> Iterator[Step | Block | Done]:
    """Several prompts in one batch (`batch.Batch`), at most `batch_size` at a time; events carry their prompt's
    `row`."""
    from .batch import Batch, Request

    for ids in ids_list:  # every prompt checked before any work
        check_ids(model, ids)
        _check_context(model, model.make_cache(), len(ids), max_tokens)
    batch = Batch(model)
    queue = list(enumerate(zip(ids_list, seeds)))
    decoders = [_TextStream(tokenizer, _opens_thought(tokenizer, ids)) for ids in ids_list]
    texts, thoughts = [[] for _ in ids_list], [[] for _ in ids_list]
    counts = [[0, 0, 0] for _ in ids_list]  # tokens, generated (transformers' count), steps
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tokens = sum(len(i) for i in ids_list)
    while queue or len(batch):
        while queue and len(batch) < batch_size:
            i, (ids, s) = queue.pop(0)
            batch.add(Request(ids, g, max_tokens, mx.random.key(s), tag=i))
        for i, event in batch.run_block():
            if isinstance(event, Step):
                yield dataclasses.replace(event, row=i)
                continue
            text, thought = decoders[i].add(event.tokens, final=event.finished)
            texts[i].append(text)
            thoughts[i].append(thought)
            c = counts[i]
            c[0], c[1], c[2] = c[0] + len(event.tokens), c[1] + event.generated, c[2] + event.steps
            yield Block(event.block, event.tokens, text, thought, event.steps, row=i)
            if event.finished:
                elapsed = time.perf_counter() - tic
                yield Done(
                    finish_reason=event.finish_reason,
                    text="".join(texts[i]),
                    thought="".join(thoughts[i]),
                    prompt_tokens=len(ids_list[i]),
                    prompt_tps=prompt_tokens / max(elapsed, 1e-9),
                    generation_tokens=c[0],
                    generation_tps=c[0] / max(elapsed, 1e-9),
                    denoising_steps=c[2],
                    tokens_per_forward=c[1] / max(c[2], 1),
                    peak_memory_gb=mx.get_peak_memory() / 1e9,
                    eos=event.eos,
                    row=i,
                )


def _opens_thought(tokenizer, ids: list[int]) -> bool:
    """Whether the prompt leaves the thought channel open (the model continues inside it)."""
    open_, close = _token_id(tokenizer, "<|channel>"), _token_id(tokenizer, "<channel|>")
    last_open = max((i for i, t in enumerate(ids) if t == open_), default=-1)
    return last_open >= 0 and close not in ids[last_open:]


def generate(model: Model, tokenizer, prompt: str | list, **kwargs) -> str | list[str]:
    """The answer text (the thought channel excluded); for a list of prompts, the list of answers, generated in
    one batch. Keyword arguments as for `stream_generate`."""
    answers = {}
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        if isinstance(event, Done):
            answers[event.row] = event.text
    if not is_batch(prompt):
        return answers[0]
    return [answers[i] for i in range(len(prompt))]


if __name__ == "__main__":  # python -m mlx_diffgemma.generate, as mlx-lm users type it
    import sys

    from .cli import run

    run(["generate", *sys.argv[1:]])
