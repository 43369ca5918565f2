"""Prompts, the chat template, and text streaming with the real Gemma-4-compatible tokenizer."""

import pytest

from mlx_diffgemma import load
from mlx_diffgemma.generate import Block, Done, Step, _TextStream, generate, render_prompt, stream_generate

PORTUGAL = "Write a long essay about Portugal."


@pytest.fixture(scope="module")
def loaded(chat_checkpoint):
    return load(chat_checkpoint)


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded[1]


def test_default_render_matches_transformers_integration_test(tok):
    ids = render_prompt(tok, PORTUGAL)
    assert ids == [
        2,
        105,
        2364,
        107,
        6974,
        496,
        1440,
        20494,
        1003,
        23613,
        236761,
        106,
        107,
        105,
        4368,
        107,
        100,
        45518,
        107,
        101,
    ]


def test_thinking_and_system_renders(tok):
    want = tok.encode(
        f"<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n{PORTUGAL}<turn|>\n<|turn>model\n",
        add_special_tokens=False,
    )
    assert render_prompt(tok, PORTUGAL, enable_thinking=True) == want
    ids = render_prompt(tok, "Hi", system="Be brief.")
    assert tok.decode(ids) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert render_prompt(tok, "Hi there", raw=True) == tok.encode("Hi there")
    assert render_prompt(tok, [5, 6, 7]) == [5, 6, 7]
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="the prompt is empty"):
            render_prompt(tok, empty)


def test_streaming_detokenizer_across_blocks(tok):
    s = _TextStream(tok)
    b1, b2 = tok.convert_tokens_to_ids(["<0xC3>", "<0xA9>"])  # "é" as two byte-fallback pieces
    hello, world = tok.encode("Hello", add_special_tokens=False), tok.encode(" world", add_special_tokens=False)
    assert s.add(hello + [b1]) == ("Hello", "")  # half a character is held back
    assert s.add([b2] + world, final=True) == ("é world", "")


def test_thought_channel_is_kept_apart(tok):
    s = _TextStream(tok)
    thought = tok.encode("thought\nLet me think.", add_special_tokens=False)
    answer = tok.encode("Lisbon.", add_special_tokens=False)
    channel_open, channel_close = tok.convert_tokens_to_ids(["<|channel>", "<channel|>"])
    got = [s.add([channel_open] + thought[:2]), s.add(thought[2:] + [channel_close] + answer, final=True)]
    assert "".join(a for a, _ in got) == "Lisbon."
    assert "".join(t for _, t in got) == "Let me think."


def test_stream_generate_events_and_text(loaded):
    model, tok = loaded
    events = list(stream_generate(model, tok, PORTUGAL, max_tokens=20, seed=5))
    kinds = [type(e) for e in events]
    assert kinds[-1] is Done and kinds.count(Done) == 1 and kinds[0] is Step
    blocks = [e for e in events if isinstance(e, Block)]
    done = events[-1]
    tokens = [t for b in blocks for t in b.tokens]
    assert done.text == "".join(b.text for b in blocks) == tok.decode(tokens)
    assert done.generation_tokens == len(tokens) <= 20
    assert done.denoising_steps == sum(isinstance(e, Step) for e in events) == sum(b.steps for b in blocks)
    assert done.prompt_tokens == 20 and done.tokens_per_forward > 0 and done.peak_memory_gb > 0
    assert generate(model, tok, PORTUGAL, max_tokens=20, seed=5) == done.text
    assert generate(model, tok, PORTUGAL, max_tokens=20, seed=6) != done.text


def test_bad_settings(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, tok, "Hi", max_tokens=0)
    with pytest.raises(ValueError, match="t_max must be greater than t_min"):
        generate(model, tok, "Hi", t_min=0.9, t_max=0.1)
