"""Batched block diffusion: several prompts denoised together, each row with its own settings, noise, stopping and
blocks, rows joining and leaving at block boundaries (continuous batching).

A row gives what its prompt gives alone (`generate.generate_step` with the same key): its prompt is encoded on its
own, then its cache is stacked with the others', left-padded with zero K/V that the masks hide (`model.padding_masks`;
positions count from each row's first real slot, so RoPE sees the same positions as alone); each denoising step
runs the model over all rows at once and then each row's sampler with the row's own key, exactly as alone. A row
that has stopped denoising keeps its canvas while the others go on (as transformers does in a batch), and a row
that has finished leaves the batch at the block's end. A row in a speed mode (partial steps: config.MODES) runs
each block on its own, through the speed modes' own loop, before the batched pass of the others: it gives what it
gives alone too, without the batching.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from . import memory, native, sampling, streams
from .cache import FullAttentionCache, PromptCache, join_rows, subset
from .config import GenerationConfig
from .generate import Commit, Step, _check_context, _fast_block, check_ids, fused, partial_steps, prefill
from .model import Model


@dataclass
class Request:
    """One prompt of a batch: ids, its settings, its token budget, the key of its randomness, a caller's tag."""

    ids: list[int]
    g: GenerationConfig
    max_tokens: int
    key: mx.array
    tag: Any = None
    head: int = 0  # the first `head` ids are shareable (a system prompt, a conversation so far): see PrefixCache


@dataclass
class _Row:
    req: Request
    key: mx.array
    produced: int = 0
    block: int = 0
    pending: mx.array | None = None  # the committed block still to encode (1, C)
    # per block:
    canvas: mx.array | None = None
    argmax: mx.array | None = None
    history: mx.array | None = None
    countdown: int = 0
    steps: int = 0
    stopped: bool = False
    cancelled: bool = False


class PrefixCache:
    """Encoded prompt heads shared across requests: the cache after a system prompt or a conversation's earlier
    turns, so that the next request starting with the same tokens encodes only the rest. An entry never changes:
    sliding layers replace their arrays when more is encoded, full layers write into their buffer only past the
    stored offset, and a reused entry gets its own copy of the full layers' slots. Least recently used entries go
    first beyond `entries` or `max_bytes`."""

    def __init__(self, entries: int = 16, max_bytes: int = 2 * 2**30):
        self.entries, self.max_bytes = entries, max_bytes
        self.store: dict[tuple[int, ...], list[tuple]] = {}
        self.hits = self.misses = 0

    def _bytes(self, state: list[tuple]) -> int:
        return sum(k.nbytes + v.nbytes for k, v, _ in state if k is not None)

    def lookup(self, ids: list[int]) -> tuple[int, list[tuple] | None]:
        """The longest stored head that `ids` starts with (a proper prefix), as (length, cache state)."""
        best: tuple[int, ...] = ()
        for head in self.store:
            if len(best) < len(head) < len(ids) and tuple(ids[: len(head)]) == head:
                best = head
        if not best:
            self.misses += 1
            return 0, None
        self.hits += 1
        state = self.store.pop(best)
        self.store[best] = state  # most recently used last
        return len(best), state

    def put(self, ids: list[int], cache: PromptCache) -> None:
        key = tuple(ids)
        self.store.pop(key, None)
        self.store[key] = [(c.keys, c.values, c.offset) for c in cache.layers]
        while len(self.store) > self.entries or (
            len(self.store) > 1 and sum(map(self._bytes, self.store.values())) > self.max_bytes
        ):
            self.store.pop(next(iter(self.store)))


@mx.compile
def _scores(logits: mx.array, temps: mx.array):
    """The batched, row-independent part of a step: temperature, one softmax/entropy pass, argmax."""
    processed = logits / temps  # (B, C, V) / (B, 1, 1)
    probs, h = sampling.softmax_entropy(processed)
    return processed, probs, h, processed.argmax(axis=-1).astype(mx.int32)


def _temperature(r: _Row) -> float:
    g = r.req.g
    return sampling.temperature(max(r.countdown, 1), g.t_min, g.t_max, g.max_denoising_steps)


class Batch:
    """Rows being generated together. `add` queues a request; each `run_block` admits the queued ones, denoises
    one block for every row and yields `(tag, event)` for each row's `Step`s and `Commit`; rows that finish leave."""

    def __init__(self, model: Model, prefix_cache: PrefixCache | None = None):
        self.model = model
        self.prefix_cache = prefix_cache
        self.rows: list[_Row] = []
        self.waiting: list[_Row] = []
        self.cache: PromptCache | None = None
        self.start: list[int] = []  # each row's first real cache slot

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def add(self, req: Request) -> None:
        """Queue a request (validated now: ids, context, memory); it joins at the next block boundary."""
        if not req.ids:
            raise ValueError("the prompt is empty")
        check_ids(self.model, req.ids)
        _check_context(self.model, self.model.make_cache(), len(req.ids), req.max_tokens)
        self.waiting.append(_Row(req, req.key))

    def cancel(self, tag: Any) -> None:
        """Drop a request (a client went away): now if it waits, before the next block if it runs (the block
        under way finishes; its events still come)."""
        self.waiting = [r for r in self.waiting if r.req.tag != tag]
        for r in self.rows:
            if r.req.tag == tag:
                r.cancelled = True

    def _starts(self) -> mx.array | None:
        return None if not any(self.start) else mx.array(self.start)

    def _admit(self) -> None:
        """Encode what the running rows committed, then stack the new rows' caches (each prompt encoded alone)."""
        model = self.model
        if self.rows:
            prefill(model, mx.concatenate([r.pending for r in self.rows]), self.cache, start=self._starts())
            for r in self.rows:
                r.pending = None
        if not self.waiting:
            if self.cache is not None:
                memory.drop_stale_buffers(self.cache)  # as generate_step after an encoding
            return
        caches, starts = ([self.cache], [mx.array(self.start)]) if self.rows else ([], [])
        for r in self.waiting:
            cache = self._prompt_cache(r.req)
            caches.append(cache)
            starts.append(mx.array([0]))
        self.cache, start = join_rows(caches, starts)
        self.start = start.tolist()
        self.rows += self.waiting
        self.waiting = []
        memory.drop_stale_buffers(self.cache)

    def _prompt_cache(self, req: Request) -> PromptCache:
        """The request's prompt encoded alone, from a stored head where one matches (and its own head stored)."""
        model, ids, pc = self.model, req.ids, self.prefix_cache
        cache, done = model.make_cache(), 0
        if pc is not None:
            done, state = pc.lookup(ids)
            if state is not None:
                for layer, (k, v, offset) in zip(cache.layers, state):
                    if isinstance(layer, FullAttentionCache) and k is not None:  # its own copy of the slots used
                        k, v = k[..., :offset, :], v[..., :offset, :]
                    layer.set_state(k, v, offset)
            if done < req.head < len(ids):
                prefill(model, mx.array([ids[done : req.head]]), cache)
                cache.materialize()
                pc.put(ids[: req.head], cache)
                done = req.head
        prefill(model, mx.array([ids[done:]]), cache)
        cache.materialize()
        return cache

    def run_block(self) -> Iterator[tuple[Any, Step | Commit]]:
        keep = [i for i, r in enumerate(self.rows) if not r.cancelled]
        if len(keep) < len(self.rows):
            self._keep(keep)
        self._admit()
        if not self.rows:
            return
        model, C, V = self.model, self.model.canvas_length, self.model.args.vocab_size
        cap, through_kernels = model.args.final_logit_softcapping or 0.0, fused()
        for r in self.rows:
            r.key, k_init = mx.random.split(r.key)
            r.canvas = sampling.random_canvas((1, C), V, key=k_init)
            r.argmax = r.canvas
            r.history = sampling.new_history(r.req.g.stability_threshold, 1, C)
            r.countdown, r.steps, r.stopped = r.req.g.max_denoising_steps, 0, False
        for b, r in enumerate(self.rows):  # a speed mode's row: its block on its own (the partial steps' loop)
            if partial_steps(r.req.g):
                start = mx.array([self.start[b]]) if self.start[b] else None
                block = _fast_block(model, subset(self.cache, [b]), r.req.g, r.canvas, r.key, r.block, start)
                while True:
                    try:
                        yield r.req.tag, next(block)
                    except StopIteration as done:
                        r.argmax, r.steps, r.key = done.value
                        break
                r.stopped = True
        # Each pass runs the rows still denoising; when some stop, the next passes take the others only (their
        # cache rows copied once per change of the set), so a batch costs what its live rows cost.
        cur, cache, start, sc = list(range(len(self.rows))), self.cache, self._starts(), None
        while True:
            live = [b for b, r in enumerate(self.rows) if not r.stopped]
            if not live:
                break
            if live != cur:
                if sc is not None:
                    pick = mx.array([cur.index(b) for b in live])
                    sc = tuple(a[pick] for a in sc) if through_kernels else sc[pick]
                cache = subset(self.cache, live)
                start = mx.array([self.start[b] for b in live]) if any(self.start[b] for b in live) else None
                cur = live
            rows = [self.rows[b] for b in cur]
            canvas = mx.concatenate([r.canvas for r in rows])
            ks = {r.req.g.sc_top_k for r in rows}
            keys = []
            for r in rows:
                r.key, k_step = mx.random.split(r.key)
                keys.append(mx.random.split(k_step))  # (sample, renoise)
            uniform = native.available()  # the native sampler takes the uniforms, not Gumbel draws
            split = not through_kernels and (streams.enabled() or uniform) and C > 1
            if split:  # the draws' noise on the second stream while the decoder runs (sampling.split_pass)
                gumbel = sampling.gumbel_ahead((1, C, V), [k[0] for k in keys], uniform=uniform)
            if through_kernels:  # one fused pass over the raw logits; the signal is (logits, temperatures, lse)
                if sc is None:
                    soft = None
                elif len(ks) == 1:
                    soft = model.soft_embed_logits(*sc, top_k=ks.pop())
                else:
                    soft = mx.concatenate([model.soft_embed_logits(*(a[j : j + 1] for a in sc), top_k=r.req.g.sc_top_k)
                                           for j, r in enumerate(rows)])  # fmt: skip
                logits = model.denoise(canvas, cache, start=start, self_conditioning_embeds=soft, softcap=False)
                temps = mx.array([[_temperature(r)] * C for r in rows], dtype=mx.float32)
                u = mx.concatenate([sampling.gumbel_uniforms((1, C, V), k[0]) for k in keys])
                h, lse, argmax, sampled = sampling.fused_pass(logits, temps, u, cap)
                argmax, sampled = argmax.astype(mx.int32), sampled.astype(mx.int32)
                sc, processed = (logits, temps, lse), None
            else:
                if sc is None or len(ks) == 1:
                    logits = model.denoise(canvas, cache, self_conditioning_probs=sc, start=start, sc_top_k=ks.pop())
                else:  # rows that differ in how they embed the signal: each its own way
                    soft = [model.soft_embed_top_k(sc[j : j + 1], r.req.g.sc_top_k)[0] if r.req.g.sc_top_k
                            else model.soft_embed_probs(sc[j : j + 1]) for j, r in enumerate(rows)]  # fmt: skip
                    logits = model.denoise(canvas, cache, start=start, self_conditioning_embeds=mx.concatenate(soft))
                temps = mx.array([[[_temperature(r)]] for r in rows], dtype=mx.float32)
                if split:
                    sc, h, argmax, sampled = sampling.split_pass(logits, temps, gumbel, uniform)
                    argmax, sampled = argmax.astype(mx.int32), sampled.astype(mx.int32)
                else:
                    processed, sc, h, argmax = _scores(logits, temps)
            stops, masks = [], []
            for j, r in enumerate(rows):
                if through_kernels or split:
                    chosen = sampled[j : j + 1]
                else:
                    chosen = sampling.sample(processed[j : j + 1], key=keys[j][0]).astype(mx.int32)
                noise = sampling.random_canvas((1, C), V, key=keys[j][1])
                r.argmax = argmax[j : j + 1]
                r.canvas, mask, stop, r.history = sampling.settle(
                    r.canvas, chosen, r.argmax, h[j : j + 1], r.history, noise, r.req.g.entropy_bound,
                    r.req.g.confidence_threshold,
                )  # fmt: skip
                r.steps += 1
                r.countdown -= 1
                stops.append(stop.all())
                masks.append(mask[0])
            mx.async_eval(sc, *[r.canvas for r in rows], *stops)
            for j, r in enumerate(rows):
                yield r.req.tag, Step(r.block, r.steps, r.argmax[0], masks[j])
            for r, stop in zip(rows, stops):
                r.stopped = bool(stop.item()) or r.countdown == 0
        yield from self._commit()

    def _commit(self) -> Iterator[tuple[Any, Commit]]:
        C, keep_rows = self.model.canvas_length, []
        for i, r in enumerate(self.rows):
            req, eos = r.req, set(r.req.g.eos_token_id)
            tokens = r.argmax[0].tolist()
            hits = [j for j, t in enumerate(tokens) if t in eos]
            cut = hits[0] if hits else C
            keep = min(cut, req.max_tokens - r.produced)
            r.produced += keep
            reason = "eos" if hits and keep == cut else "length" if r.produced >= req.max_tokens else None
            eos_token = tokens[cut] if reason == "eos" else None
            yield req.tag, Commit(r.block, tokens[:keep], r.steps, reason is not None, reason, eos_token,
                                  cut + 1 if hits else C)  # fmt: skip
            r.block += 1
            if reason is None:
                r.pending = r.argmax
                keep_rows.append(i)
        if len(keep_rows) < len(self.rows):
            self._keep(keep_rows)

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows (the others leave the batch), and drop the padding no row needs any more."""
        self.rows = [self.rows[i] for i in rows]
        if not self.rows:
            self.cache, self.start = None, []
            return
        self.cache = subset(self.cache, rows)
        self.start = [self.start[i] for i in rows]
        if min(self.start):
            self._trim(min(self.start))

    def _trim(self, n: int) -> None:
        """Remove the first n slots (padding in every row) from the full layers' caches."""
        for c in self.cache.layers:
            ctx = c.context()
            if hasattr(c, "keep") or ctx is None:
                continue  # sliding windows keep a fixed number of slots
            c.set_state(ctx[0][:, :, n:], ctx[1][:, :, n:], c.offset)
        # slots are renumbered from the full layers' first kept slot; sliding layers count from the end, so only
        # the starts and the offset move
        for c in self.cache.layers:
            c.offset -= n
        self.start = [s - n for s in self.start]


def generate_batch(
    model: Model,
    requests: list[Request],
) -> Iterator[tuple[Any, Step | Commit]]:
    """Generate every request together (one batch, no later joins); yields (tag, event) in step order."""
    batch = Batch(model)
    for r in requests:
        batch.add(r)
    while len(batch):
        yield from batch.run_block()
