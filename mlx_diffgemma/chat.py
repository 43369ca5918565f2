"""Multi-turn chat that keeps the KV cache across turns and never re-renders the history.

After a reply, the reply's committed tokens that are not yet in the cache (transformers never encodes its last
block) and the turn's closing `<turn|>\\n` are encoded with the next turn's tokens, which are exactly what the chat
template appends for the new user message. The cache can be saved to disk and restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from . import __version__
from .cache import CacheFileError, is_cache_file, load_cache, save_cache, saved_metadata
from .files import OutputError, check_output
from .generate import Block, Done, Step, _stream, settings
from .model import Model, fingerprint

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

    def save(self, path: str | Path, force: bool = False) -> None:
        """Write the cache and the conversation to `path` (a safetensors file, whatever its name), atomically. An
        existing file is replaced only when it is a saved chat, or with `force`; never a folder or a device."""
        check_output(
            Path(path),
            force=force,
            ours=is_cache_file,
            folder=False,
            what="chat file",
            not_ours=" and is not a saved chat",
        )
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
        """Restore a session saved with `save`; a file from another model or version, or a damaged one, is
        refused (CacheFileError) and nothing else changes."""
        session = cls(model, tokenizer, **overrides)
        header = saved_metadata(path) or {}  # what the file says of itself, before its arrays are read
        if header and header.get("version") != __version__:
            raise CacheFileError(f"{path} was saved by mlx-diffgemma {header.get('version')}, this is {__version__}")
        if header and header.get("model") != fingerprint(model):
            raise CacheFileError(f"{path} was saved with a different model")
        cache = model.make_cache()
        shapes = [(s.num_key_value_heads, s.head_dim) for s in model.args.layers]
        meta = load_cache(path, cache, shapes, model.dtype)
        problem = _invalid(meta, cache.offset, model.args.vocab_size)
        if problem:
            raise CacheFileError(f"{path} is damaged: {problem}")
        messages, tokens, pending = meta["messages"], meta["tokens"], meta["pending"]
        session.cache, session.messages = cache, messages
        session.tokens, session.pending = tokens, pending
        session.enable_thinking = meta["enable_thinking"]
        return session


def _invalid(meta: dict, offset: int, vocab: int) -> str | None:
    """What is wrong with a saved conversation's metadata, or None."""
    messages, tokens, pending = meta.get("messages"), meta.get("tokens"), meta.get("pending")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        return "its messages are not a list of {role, content} texts"
    for name, ids in (("tokens", tokens), ("pending", pending)):
        if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < vocab for i in ids):
            return f"its {name} are not token ids of this model's vocabulary (0..{vocab - 1})"
    if len(tokens) != offset + len(pending) or tokens[len(tokens) - len(pending) :] != pending:
        return "its token list does not match its cache"
    if not isinstance(meta.get("enable_thinking"), bool):
        return "enable_thinking is not true or false"
    return None


# ---- the interactive commands ----------------------------------------------------------------------------------

HELP = """commands:
  /help          this list
  /reset         start over (the system prompt is kept)
  /system TEXT   start over with this system prompt (/system alone clears it)
  /save FILE     save the conversation and its KV cache (/save! FILE replaces a file that is not a saved chat)
  /load FILE     restore a saved conversation
  /quit          leave (also Ctrl-D)"""


def command(session: ChatSession, line: str, **overrides) -> tuple[ChatSession, str]:
    """Carry out one /command typed in a chat; returns the session to go on with (a new one after /load) and the
    line to show. Errors are returned as "error: ..." lines: the session always goes on."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name == "/help":
        return session, HELP
    if name == "/reset":
        first = session.messages[:1]
        session.reset(first[0]["content"] if first and first[0]["role"] == "system" else None)
        return session, "(conversation reset)"
    if name == "/system":
        session.reset(arg or None)
        return session, "(new conversation with this system prompt)" if arg else "(system prompt cleared)"
    if name in ("/save", "/save!", "/load"):
        if not arg:
            return session, f"error: {name} needs a file name"
        path = Path(arg).expanduser()
        try:
            if name == "/load":
                session = ChatSession.load(path, session.model, session.tokenizer, **overrides)
                return session, f"(loaded {arg}: {len(session.messages)} messages)"
            session.save(path, force=name == "/save!")
            return session, f"(saved to {arg})"
        except (CacheFileError, OutputError) as e:
            return session, f"error: {e}"
        except OSError as e:
            return session, f"error: cannot {'read' if name == '/load' else 'write'} {arg}: {e.strerror or e}"
    return session, f"error: unknown command {name}; /help lists the commands"


if __name__ == "__main__":  # python -m mlx_diffgemma.chat
    import sys

    from .cli import run

    run(["chat", *sys.argv[1:]])
