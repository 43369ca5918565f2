"""Multi-turn chat: only new tokens are encoded, the cache equals encoding everything at once, save/restore."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import load
from mlx_diffgemma.cache import CacheFileError
from mlx_diffgemma.chat import ChatSession
from mlx_diffgemma.generate import Done, render_prompt


@pytest.fixture(scope="module")
def loaded(chat_checkpoint):
    return load(chat_checkpoint)


def _done(events):
    return [e for e in events if isinstance(e, Done)][0]


def test_second_turn_encodes_only_new_tokens_and_matches_one_pass(loaded):
    model, tok = loaded
    chat = ChatSession(model, tok, system="Be brief.")
    first = _done(chat.send("Name a city.", max_tokens=20, seed=1))
    assert first.prompt_tokens == len(render_prompt(tok, "Name a city.", system="Be brief."))
    n_before = len(chat.tokens)
    pending = list(chat.pending)
    second = _done(chat.send("And another?", max_tokens=20, seed=2))
    suffix = tok.encode(
        "<|turn>user\nAnd another?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>", add_special_tokens=False
    )
    assert second.prompt_tokens == len(pending) + len(suffix)  # only the new tokens
    assert chat.tokens[n_before : n_before + len(suffix)] == suffix
    # the history as the template renders it, plus the tokens held exactly as generated
    assert pending[-2:] == tok.encode("<turn|>\n", add_special_tokens=False)

    # the incrementally built cache equals encoding the same tokens in one pass
    encoded = chat.tokens[: chat.cache.offset]
    fresh = model.make_cache()
    model.encode(mx.array([encoded]), fresh)
    assert fresh.offset == chat.cache.offset > 64  # past the sliding window (64)
    canvas = mx.array(np.random.default_rng(0).integers(0, 262_144, (1, 16)))
    a, b = model.denoise(canvas, chat.cache), model.denoise(canvas, fresh)
    assert float(mx.abs(a - b).max()) <= 1e-4


def test_save_restore_continues_identically(loaded, tmp_path):
    model, tok = loaded
    chat = ChatSession(model, tok)
    chat.ask("Hello there.", max_tokens=20, seed=3)
    path = tmp_path / "chat.safetensors"
    chat.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["chat.safetensors"]  # no temporary left behind
    restored = ChatSession.load(path, model, tok)
    assert restored.tokens == chat.tokens and restored.messages == chat.messages
    assert restored.ask("Go on.", max_tokens=20, seed=4) == chat.ask("Go on.", max_tokens=20, seed=4)


def test_foreign_cache_files_are_refused(loaded, chat_checkpoint, checkpoint, tmp_path, monkeypatch):
    model, tok = loaded
    chat = ChatSession(model, tok)
    chat.ask("Hi.", max_tokens=16, seed=0)
    path = tmp_path / "c.safetensors"
    chat.save(path)
    for other in (load(checkpoint("basic"))[0], load(chat_checkpoint, dtype="bfloat16")[0]):
        with pytest.raises(CacheFileError, match="was saved with a different model"):
            ChatSession.load(path, other, tok)
    monkeypatch.setattr("mlx_diffgemma.chat.__version__", "9.9.9")
    with pytest.raises(CacheFileError, match="saved by mlx-diffgemma 0.1.0, this is 9.9.9"):
        ChatSession.load(path, model, tok)
    mx.save_safetensors(str(tmp_path / "x.safetensors"), {"a": mx.zeros(1)})
    with pytest.raises(CacheFileError, match="not an mlx-diffgemma cache file"):
        ChatSession.load(tmp_path / "x.safetensors", model, tok)
    with pytest.raises(CacheFileError, match="cannot read cache file"):
        ChatSession.load(tmp_path / "missing.safetensors", model, tok)


def test_interrupted_turn_leaves_the_session_as_it_was(loaded):
    model, tok = loaded
    chat = ChatSession(model, tok)
    chat.ask("One.", max_tokens=20, seed=5)
    tokens, offset = list(chat.tokens), chat.cache.offset
    events = chat.send("Two, but stopped.", max_tokens=40, seed=6)
    for i, _ in enumerate(events):  # stop mid-reply, after the first block has been committed into the cache
        if i == 6:
            break
    events.close()
    assert chat.tokens == tokens and chat.cache.offset == offset
    chat.ask("Two.", max_tokens=20, seed=7)  # and the conversation goes on, consistent with a one-pass encode
    fresh = model.make_cache()
    model.encode(mx.array([chat.tokens[: chat.cache.offset]]), fresh)
    canvas = mx.array(np.random.default_rng(1).integers(0, 262_144, (1, 16)))
    assert float(mx.abs(model.denoise(canvas, chat.cache) - model.denoise(canvas, fresh)).max()) <= 1e-4
