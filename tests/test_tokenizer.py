"""Our tokenizer (tokenizers + Jinja, no transformers at run time) against transformers' on the same folders."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mlx_diffgemma.loading import DEMO
from mlx_diffgemma.tokenizer import StreamingDetokenizer, Tokenizer

MLX_VLM = Path(__file__).parent / "data" / "mlx_vlm-0.7.10" / "q4"
TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "Write a Python function area(x, u) that returns x * u.",
    "déjà vu — naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά",
    "tabs\tand\nnew\n\nlines\r\n",
    "<bos><|turn>user\nliteral control tokens<turn|>\n<|channel>thought\n<channel|>",
    "Sort: 4 7 1 9",
    "Close: ([{<(",
    "",
    " ",
    "a" * 300,
    "x = [i ** 2 for i in range(10)]  # squares\nprint(x)",
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a city."}],
    [
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Two?", "name": None},
    ],
]


@pytest.fixture(scope="module", params=["demo", "gemma4", "mlx_vlm"])
def pair(request, gemma4_tokenizer_dir):
    folder = {"demo": DEMO, "gemma4": gemma4_tokenizer_dir, "mlx_vlm": MLX_VLM}[request.param]
    return Tokenizer(folder), AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def test_encode_decode_and_specials_equal_transformers(pair):
    ours, theirs = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
        ids = theirs.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(ours) == len(theirs)
    some = list(range(0, len(theirs), max(len(theirs) // 500, 1)))
    assert ours.convert_ids_to_tokens(some) == theirs.convert_ids_to_tokens(some)
    tokens = theirs.convert_ids_to_tokens(some) + ["<|channel>", "<turn|>", "no-such-token-here"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)


def test_chat_template_equals_transformers(pair):
    ours, theirs = pair
    assert (ours.chat_template is None) == (theirs.chat_template is None)
    if theirs.chat_template is None:  # the mlx-vlm test folder ships none
        return
    for chat in CHATS:
        for generation_prompt in (True, False):
            for thinking in (False, True):
                kw = dict(add_generation_prompt=generation_prompt, enable_thinking=thinking)
                want = theirs.apply_chat_template(chat, tokenize=False, **kw)
                assert ours.apply_chat_template(chat, tokenize=False, **kw) == want
                got = ours.apply_chat_template(chat, tokenize=True, **kw)
                ids = theirs.apply_chat_template(chat, tokenize=True, **kw)
                assert got == (ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_streaming_detokenizer_is_decode_of_everything(pair):
    ours, _ = pair
    ids = ours.encode(TEXTS[3] + TEXTS[5], add_special_tokens=False)
    d = StreamingDetokenizer(ours)
    pieces = []
    for i in range(0, len(ids), 3):  # three tokens at a time, splitting multi-byte characters on the way
        for t in ids[i : i + 3]:
            d.add_token(t)
        pieces.append(d.last_segment)
        assert "\ufffd" not in pieces[-1]
    d.finalize()
    pieces.append(d.last_segment)
    assert "".join(pieces) == ours.decode(ids)


def test_runtime_imports_neither_torch_nor_transformers():
    """What `generate --model demo` imports: the model, the tokenizer, the sampler, the CLI; not torch."""
    code = (
        "import sys\n"
        "from mlx_diffgemma import cli, generate, load\n"
        "m, tok = load('demo')\n"
        "generate(m, tok, 'Sort: 2 1', max_tokens=16, seed=0)\n"
        "print(sorted(k for k in ('torch', 'transformers', 'mlx_lm') if k in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_remote_code_never_runs(tmp_path):
    """A SentencePiece-only folder goes through transformers with remote code off: its auto_map is not run."""
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "tokenizer_config.json").write_text(
        '{"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", null]}, "tokenizer_class": "EvilTokenizer"}'
    )
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass EvilTokenizer: pass\n")
    (folder / "tokenizer.model").write_bytes(b"not a model")
    shutil.copy(DEMO / "config.json", folder / "config.json")
    from mlx_diffgemma.loading import LoadError, load_tokenizer

    with pytest.raises(LoadError):
        load_tokenizer(folder)
    assert not marker.exists()
