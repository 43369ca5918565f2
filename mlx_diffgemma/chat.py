"""Multi-turn chat that keeps the KV cache across turns and never re-renders the history.

After a reply, the reply's committed tokens that are not yet in the cache (transformers never encodes its last
block) and the turn's closing `<turn|>\\n` are encoded with the next turn's tokens, which are exactly what the chat
template appends for the new user message. The cache can be saved to disk and restored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import __version__
from .cache import CacheFileError, load_cache, save_cache
from .generate import Block, Done, Step, _stream, settings
from .model import Model

CLOSE_TURN = "<turn|>\n"


class ChatSession:
    """A conversation with one model. `send(text)` streams the reply's events; `ask(text)` returns its text."""

    def __init__(self, model: Model, tokenizer, system: str | None = None, enable_thinking: bool = False, **overrides):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings(model, **overrides)
        self.enable_thinking = enable_thinking
        self.reset(system)

    def reset(self, system: str | None = None) -> None:
        """Start over (keeping the model), optionally with a new system prompt."""
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cache = self.model.make_cache()
        self.tokens: list[int] = []  # every token of the conversation so far, encoded or pending
        self.pending: list[int] = []  # tokens of the conversation not yet in the cache

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, enable_thinking=self.enable_thinking
        )

    def _turn_tokens(self, text: str) -> list[int]:
        """What the template appends for a new user message: the whole render on the first turn."""
        if not text.strip():
            raise ValueError("the message is empty")
        after = self._render(self.messages + [{"role": "user", "content": text}], True)
        if not self.tokens:
            return self.tokenizer.encode(after, add_special_tokens=False)
        before = self._render(self.messages, False)
        if not after.startswith(before):
            raise ValueError("this chat template re-renders earlier turns; the cache cannot be reused across turns")
        return self.tokenizer.encode(after[len(before) :], add_special_tokens=False)

    def send(
        self, text: str, *, max_tokens: int | None = None, seed: int | None = None
    ) -> Iterator[Step | Block | Done]:
        """Stream the reply to `text`: Step and Block events, then Done. Only new tokens are encoded."""
        new = self._turn_tokens(text)
        ids = self.pending + new
        max_tokens = self.settings.max_new_tokens if max_tokens is None else max_tokens
        reply: list[int] = []
        last: list[int] = []
        restore_point, done = self.cache.snapshot(), False
        try:
            for event in _stream(self.model, self.tokenizer, ids, self.settings, max_tokens, self.cache, seed):
                if isinstance(event, Block):
                    reply += event.tokens
                    last = event.tokens
                if isinstance(event, Done):
                    self._commit(text, new, reply, last, event)
                    done = True
                yield event
        finally:
            if not done:  # interrupted (Ctrl-C, an error, the caller stopped iterating): the turn never happened
                self.cache.restore(restore_point)

    def _commit(self, text: str, new: list[int], reply: list[int], last: list[int], event: Done) -> None:
        # tokens already holds the old pending; the cache now holds it, the new turn, and every block of the
        # reply but the last; the last block and the turn's close wait for the next turn
        self.pending = last + self.tokenizer.encode(CLOSE_TURN, add_special_tokens=False)
        self.tokens += new + reply[: len(reply) - len(last)] + self.pending
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": event.text}]

    def ask(self, text: str, **kwargs) -> str:
        """The reply's answer text (thought channel excluded)."""
        for event in self.send(text, **kwargs):
            if isinstance(event, Done):
                return event.text
        raise AssertionError("send ended without Done")

    # ---- persistence ---------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the cache and the conversation to `path` (a safetensors file), atomically."""
        save_cache(
            path,
            self.cache,
            {
                "version": __version__,
                "model": fingerprint(self.model),
                "messages": self.messages,
                "tokens": self.tokens,
                "pending": self.pending,
                "enable_thinking": self.enable_thinking,
            },
        )

    @classmethod
    def load(cls, path: str | Path, model: Model, tokenizer, **overrides) -> ChatSession:
        """Restore a session saved with `save`; a file from another model or version is refused."""
        session = cls(model, tokenizer, **overrides)
        cache = model.make_cache()
        meta = load_cache(path, cache)
        if meta.get("version") != __version__:
            raise CacheFileError(f"{path} was saved by mlx-diffgemma {meta.get('version')}, this is {__version__}")
        if meta.get("model") != fingerprint(model):
            raise CacheFileError(f"{path} was saved with a different model")
        session.cache, session.messages = cache, meta["messages"]
        session.tokens, session.pending = meta["tokens"], meta["pending"]
        session.enable_thinking = meta["enable_thinking"]
        return session


def fingerprint(model: Model) -> str:
    """Identifies a model's weights and config cheaply: config, dtype, and a few weight values."""
    h = hashlib.sha256(json.dumps(model.config.raw, sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    for w in (model.norm.weight, model.self_conditioning.pre_norm.weight, model.layers[0].input_layernorm.weight):
        h.update(np.array(w.astype(mx.float32)).tobytes())
    return h.hexdigest()[:32]
