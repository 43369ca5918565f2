"""The tokenizer, without transformers: `tokenizers` for tokenizer.json, Jinja for the chat template (rendered as
transformers renders it), and a streaming detokenizer for text that arrives a block at a time.

Importing transformers takes seconds and pulls in torch where it is installed; this loads in milliseconds, and
runs no code from the model folder (the chat template runs in Jinja's sandbox, as in transformers). Its outputs
equal transformers' (`tests/test_tokenizer.py`). A folder with only a SentencePiece `tokenizer.model` is loaded
through transformers, with remote code off.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be loaded, with the reason in one line."""


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return d


class Tokenizer:
    """The parts of a Hugging Face tokenizer that generation, chat and training use, with the same names and
    results: encode, decode, apply_chat_template, convert_tokens_to_ids / convert_ids_to_tokens, the special
    tokens, and `detokenizer` (a fresh StreamingDetokenizer)."""

    SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as Backend
        from tokenizers import processors

        folder = Path(folder)
        try:
            self._tok = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises its own Exception type for a damaged file
            raise TokenizerError(f"cannot load {folder / 'tokenizer.json'}: {' '.join(str(e).split())[:200]}") from None
        config_file = folder / "tokenizer_config.json"
        self.config = _read_json(config_file) if config_file.exists() else {}
        self.special_tokens_map = {k: t for k in self.SPECIAL if (t := _content(self.config.get(k))) is not None}
        self.chat_template = _chat_template(folder, self.config)
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        add_bos, add_eos = self.config.get("add_bos_token"), self.config.get("add_eos_token")
        if add_bos is not None or add_eos is not None or self._tok.post_processor is None:
            # what transformers' update_post_processor builds from add_bos_token / add_eos_token
            add_bos = bool(add_bos) and self.bos_token_id is not None
            add_eos = bool(add_eos) and self.eos_token_id is not None
            bos, eos = self.special_tokens_map.get("bos_token"), self.special_tokens_map.get("eos_token")
            single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
            pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
            specials = [(bos, self.bos_token_id)] * add_bos + [(eos, self.eos_token_id)] * add_eos
            self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # ---- the Hugging Face names ---------------------------------------------------------------------------------

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_ids(self) -> set[int]:
        return {self.eos_token_id} - {None}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            i = self._tok.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> str | list[int] | dict[str, list[int]]:
        """The chat template's render (transformers' environment and variables: the special tokens, `messages`
        with None-valued keys dropped, `tools`, `documents`, `add_generation_prompt`, and keyword arguments such
        as `enable_thinking`), tokenized without adding special tokens, as transformers does."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (use raw mode)")
        if not conversation:
            raise ValueError("cannot apply the chat template to an empty conversation")
        messages = [{k: v for k, v in m.items() if v is not None} for m in conversation]
        for m in messages:
            reasoning = next(
                (m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None
            )
            if reasoning is not None:
                m.update({"thinking": reasoning, **m, "reasoning_content": reasoning})
        text = _compile(self.chat_template).render(
            **{
                **self.special_tokens_map,
                **kwargs,
                "messages": messages,
                "tools": tools,
                "documents": documents,
                "add_generation_prompt": add_generation_prompt,
            }
        )
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")):
        text = text.replace(a, b)
    for a, b in ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or the "default" of a named
    list), else chat_template.json, as transformers looks for it."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.json").exists():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template in transformers' sandboxed Jinja environment (same options, filters and globals)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes (no way into CPython internals)
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    return env.from_string(template)


class StreamingDetokenizer:
    """Text of tokens that arrive a few at a time (mlx-lm's detokenizer interface: reset, add_token, finalize,
    text, last_segment). The text is `decode(tokens)` without an incomplete UTF-8 character at its end: byte
    pieces waiting for the rest of a character decode to replacement characters, and can turn the run of byte
    pieces before them into replacement characters too, so the text shown is the longest clean one that extends
    what was shown before, until the character is complete (or `finalize` is called)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.final = False
        self._clean = ""
        self._sent = 0

    def add_token(self, token: int) -> None:
        self.tokens.append(token)

    def finalize(self) -> None:
        self.final = True

    @property
    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        stripped = text.rstrip("\ufffd")
        if self.final or stripped == text:
            self._clean = text
        elif stripped.startswith(self._clean):
            self._clean = stripped
        return self._clean

    @property
    def last_segment(self) -> str:
        """What the text gained since the last call."""
        text = self.text
        segment, self._sent = text[self._sent :], len(text)
        return segment


def load(folder: str | Path):
    """The tokenizer in `folder`: ours from tokenizer.json, else transformers' (a SentencePiece-only folder)."""
    folder = Path(folder)
    return Tokenizer(folder) if (folder / "tokenizer.json").exists() else load_transformers(folder)


def load_transformers(folder: str | Path):
    """transformers' tokenizer, wrapped by mlx-lm for its detokenizer, with remote code off: a folder's
    `auto_map` never runs its Python."""
    from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # its warnings about a broken folder would add lines to our one-line error
    try:
        return load_mlx_lm_tokenizer(Path(folder), tokenizer_config_extra={"trust_remote_code": False})
    except Exception as e:  # transformers raises many types for a broken tokenizer folder
        raise TokenizerError(f"cannot load the tokenizer in {folder}: {' '.join(str(e).split())[:200]}") from None
    finally:
        logging.set_verbosity(level)
