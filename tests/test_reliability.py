"""What an outside audit broke, one class at a time: a user's files survive, bad input is a one-line error, an
interrupted run leaves nothing half-written behind, chat files load under any name and damaged ones are refused,
nothing escapes the model folder, and NaN is refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import generate, load
from mlx_diffgemma.cache import CacheFileError
from mlx_diffgemma.chat import ChatSession
from mlx_diffgemma.convert import RECIPES, ConvertError, convert
from mlx_diffgemma.generate import PromptError, prefill
from mlx_diffgemma.loading import DEMO, LoadError

CHAT = '{"messages": [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]}\n'


def cli(*args, input=None, cwd=None, env=None):
    r = subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma", *map(str, args)],
        input=input,
        capture_output=True,
        text=not isinstance(input, bytes),
        timeout=300,
        cwd=cwd,
        env=env,
    )
    return r


def one_line_error(r, code=(1, 2)):
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode()
    lines = [line for line in err.strip().splitlines() if not line.startswith("Fetching")]
    assert r.returncode in ((code,) if isinstance(code, int) else code), err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(CHAT * 4)
    return p


# ---- data loss ------------------------------------------------------------------------------------------------


def test_train_never_replaces_what_it_did_not_write(tmp_path, data):
    users = tmp_path / "d"
    users.mkdir()
    (users / "thesis.txt").write_text("x")
    plain = tmp_path / "notes.txt"
    plain.write_text("keep")
    for out in (users, plain):
        line = one_line_error(cli("train", "--model", "demo", "--data", data, "--out", out, "--steps", 1))
        assert "pass --force" in line
    assert (users / "thesis.txt").read_text() == "x" and plain.read_text() == "keep"
    model = tmp_path / "model"
    shutil.copytree(DEMO, model)
    for out, force in ((model, ["--force"]), (tmp_path, ["--force"]), (data.parent, [])):  # the model, the data
        line = one_line_error(cli("train", "--model", model, "--data", data, "--out", out, "--steps", 1, *force))
        assert "which this command reads" in line
    assert (model / "model.safetensors").exists() and data.exists()
    # an empty folder is fine; with --force a folder of other files is replaced
    r = cli("train", "--model", "demo", "--data", data, "--out", users, "--steps", 1, "--batch-size", 2, "--force")
    assert r.returncode == 0, r.stderr
    assert not (users / "thesis.txt").exists() and (users / "trainer" / "state.json").exists()


def test_convert_force_never_deletes_its_source(tmp_path):
    src = tmp_path / "models" / "demo"
    shutil.copytree(DEMO, src)
    for dst in (src, src.parent, tmp_path):
        line = one_line_error(cli("convert", "--hf-path", src, "--mlx-path", dst, "--force"))
        assert "which this command reads" in line
    assert (src / "model.safetensors").exists()
    link = tmp_path / "link"  # a destination that reaches the source through a link
    link.symlink_to(src.parent)
    one_line_error(cli("convert", "--hf-path", src, "--mlx-path", link, "--force"))
    assert (src / "model.safetensors").exists()


def test_chat_save_never_replaces_other_files(tmp_path):
    model, tok = load("demo")
    chat = ChatSession(model, tok)
    chat.ask("Sort: 2 1", seed=0)
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    from mlx_diffgemma.files import OutputError

    for bad in (mine, tmp_path, Path(os.devnull)):
        with pytest.raises(OutputError):
            chat.save(bad)
    assert mine.read_text() == "mine"
    chat.save(tmp_path / "c1")
    chat.save(tmp_path / "c1")  # its own file is replaced
    chat.save(mine, force=True)
    assert ChatSession.load(mine, model, tok).messages == chat.messages


# ---- crashes --------------------------------------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary(tmp_path, checkpoint, gemma4_tokenizer_dir):
    model, tok = load("demo")
    for ids in ([2, 10**6], [2, -1], [2, 3.5]):
        with pytest.raises(PromptError, match="outside the model's vocabulary"):
            generate(model, tok, ids, max_tokens=16)
    small = tmp_path / "small"  # a tokenizer (262,144 pieces) larger than the model's vocabulary (512)
    shutil.copytree(checkpoint("basic"), small)
    for f in gemma4_tokenizer_dir.iterdir():
        shutil.copy(f, small / f.name)
    line = one_line_error(cli("generate", "--model", small, "-p", "Hello there, how are you?"), 1)
    assert "outside the model's vocabulary (0..511)" in line
    r = cli("train", "--model", small, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o", "--steps", 1)
    one_line_error(r)  # a missing data file
    (tmp_path / "d.jsonl").write_text(CHAT.replace("Sort: 3 1 2", "Hello there, how are you?"))
    line = one_line_error(cli("train", "--model", small, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o"))
    assert "outside the model's vocabulary" in line and not (tmp_path / "o").exists()


def test_chat_file_with_foreign_ids_is_refused(tmp_path):
    model, tok = load("demo")
    chat = ChatSession(model, tok)
    chat.ask("Sort: 2 1", seed=0)
    path = tmp_path / "c"
    chat.save(path)
    arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    inner = json.loads(meta["meta"])
    inner["pending"][-1] = 10**6
    inner["tokens"][-1] = 10**6
    mx.save_safetensors(str(tmp_path / "bad.safetensors"), arrays, metadata={**meta, "meta": json.dumps(inner)})
    with pytest.raises(CacheFileError, match="token ids"):
        ChatSession.load(tmp_path / "bad.safetensors", model, tok)


def test_prompt_is_encoded_in_pieces_with_the_same_result(checkpoint):
    model, _ = load(checkpoint("basic"))  # sliding window 8: pieces of 5 cross it many times
    ids = mx.array(np.random.default_rng(0).integers(0, 512, (1, 53)))
    whole, pieces = model.make_cache(), model.make_cache()
    model.encode(ids, whole)
    prefill(model, ids, pieces, step=5)
    canvas = mx.array(np.random.default_rng(1).integers(0, 512, (1, 16)))
    a, b = model.denoise(canvas, whole), model.denoise(canvas, pieces)
    assert pieces.offset == whole.offset == 53
    assert float(mx.abs(a - b).max()) <= 1e-4 * float(mx.abs(a).max())


def test_prompt_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path):
    env = dict(os.environ, MLX_DIFFGEMMA_MEMORY_GB="0.001")
    line = one_line_error(cli("generate", "--model", "demo", "-p", "Sort: 3 1 2", env=env), 1)
    assert "of memory" in line and "available" in line and "MB" in line


# ---- interrupted work -----------------------------------------------------------------------------------------


def _killed(code: str) -> None:
    """Run `code` in a child process that SIGKILLs itself where the code says (no cleanup of any kind runs)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr


def test_killed_convert_leaves_nothing_after_the_next_run(tmp_path):
    dst = tmp_path / "out"
    _killed(
        "import os, signal\n"
        "import mlx_diffgemma.convert as c\n"
        "c._write_metadata = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"  # weights written, then killed
        f"c.convert('demo', {str(dst)!r}, c.RECIPES['q8'], log=lambda s: None)\n"
    )
    partial = [p.name for p in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].startswith(".out.partial-") and not dst.exists()
    with pytest.raises(LoadError):
        load(tmp_path / partial[0])  # what an interrupted run leaves does not load
    r = cli("convert", "--hf-path", "demo", "--mlx-path", dst, "-q")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("exchange", [True, False])
def test_killed_checkpoint_swap_always_leaves_a_checkpoint(tmp_path, data, exchange):
    """Killed in the middle of replacing the step-1 checkpoint with step 2's, with the OS's atomic exchange and
    without it (two renames): the next run resumes from a whole checkpoint, never from scratch."""
    out = tmp_path / "ckpt"
    args = ["--model", "demo", "--data", data, "--out", out, "--batch-size", 2, "--checkpoint-every", 1]
    assert cli("train", *args, "--steps", 1).returncode == 0
    kill = (
        "remove = f._remove\n"  # killed after the exchange, before the old version (now at .ready-) is removed
        "f._remove = lambda p: os.kill(os.getpid(), signal.SIGKILL) if '.ready-' in p.name else remove(p)\n"
        if exchange
        else "f._EXCHANGE = None\n"
        "real = os.replace\n"
        "def replace(a, b):\n"
        "    if '.old-' in str(b): real(a, b); os.kill(os.getpid(), signal.SIGKILL)\n"  # between the two renames
        "    real(a, b)\n"
        "f.os.replace = replace\n"
    )
    _killed(
        "import os, signal, sys\nimport mlx_diffgemma.files as f\n"
        + kill
        + "from mlx_diffgemma.cli import run\n"
        + f"run({['train', *map(str, args), '--steps', '2']!r})\n"
    )
    if not exchange:
        assert not out.exists()  # the moment the audit found: no checkpoint in place
    r = cli("train", *args, "--steps", 3)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 2" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "ckpt"]
    assert json.loads((out / "trainer" / "state.json").read_text())["step"] == 3
    load(out)


# ---- chat files -----------------------------------------------------------------------------------------------


def test_chat_files_load_under_any_name_and_damage_is_refused_with_the_session_alive(tmp_path):
    script = "\n".join(
        [
            "Sort: 3 1 2",
            f"/save {tmp_path / 'chat1'}",
            f"/load {tmp_path / 'chat1'}",
            f"/load {tmp_path / 'damaged'}",
            f"/load {tmp_path / 'badmeta'}",
            f"/load {tmp_path / 'missing'}",
            "Reverse: abc",
            "",
        ]
    )
    model, tok = load("demo")
    chat = ChatSession(model, tok)
    chat.ask("Sort: 2 1", seed=0)
    chat.save(tmp_path / "good")
    raw = bytearray((tmp_path / "good").read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the arrays
    (tmp_path / "damaged").write_bytes(bytes(raw))
    arrays, meta = mx.load(str(tmp_path / "good"), format="safetensors", return_metadata=True)
    mx.save_safetensors(str(tmp_path / "badmeta.safetensors"), arrays, metadata={**meta, "meta": "{not json"})
    (tmp_path / "badmeta.safetensors").rename(tmp_path / "badmeta")
    r = cli("chat", "--model", "demo", "--seed", 0, input=script.encode() + b"\xff\xfe not utf-8\nReverse: xyz\n")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "(saved to" in err and "(loaded" in err
    assert "damaged: its arrays do not match the digest" in err
    assert f"{tmp_path / 'badmeta'} is damaged" in err
    assert "no such file" in err and "not UTF-8" in err and "Traceback" not in err
    answers = r.stdout.decode().splitlines()
    assert answers[0] == "1 2 3" and len(answers) == 3  # the session went on after every error


# ---- security -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_index_cannot_point_outside_the_folder(tmp_path, name):
    model = tmp_path / "m"
    shutil.copytree(DEMO, model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(DEMO / "model.safetensors", tmp_path / "outside.safetensors")
    with pytest.raises(LoadError, match="names a shard outside the model folder"):
        load(model)
    with pytest.raises(ConvertError, match="names a shard outside the model folder"):
        convert(model, tmp_path / "out", RECIPES["q8"], log=lambda s: None)


def test_links_to_outside_files_are_not_copied(tmp_path, data):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    model = tmp_path / "m"
    shutil.copytree(DEMO, model)
    (model / "notes.txt").symlink_to(secret)
    (model / "extra.json").symlink_to(model / "generation_config.json")  # a link inside the folder is fine
    r = cli("convert", "--hf-path", model, "--mlx-path", tmp_path / "q", "-q")
    assert r.returncode == 0 and "skipped notes.txt" in r.stderr
    assert not (tmp_path / "q" / "notes.txt").exists() and (tmp_path / "q" / "extra.json").is_file()
    r = cli("train", "--model", model, "--data", data, "--out", tmp_path / "t", "--steps", 1, "--batch-size", 2)
    assert r.returncode == 0 and "skipped notes.txt" in r.stderr
    found = [
        p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and "PRIVATE" in p.read_text("latin-1")
    ]
    assert found == [secret]


# ---- validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--t-min", "nan"],
        ["--t-max", "inf"],
        ["--entropy-bound", "nan"],
        ["--confidence", "-inf"],
        ["--confidence", "0"],
        ["--steps", "0"],
        ["--seed", "-1"],
    ],
)
def test_generate_refuses_nan_and_names_the_flag(flags):
    line = one_line_error(cli("generate", "--model", "demo", "-p", "hi", *flags), 2)
    assert flags[0] in line and "_" not in line.split(":")[1]


@pytest.mark.parametrize("flags", [["--lr", "nan"], ["--lr", "-1"], ["--encoder-weight", "inf"], ["--steps", "0"]])
def test_train_refuses_nan(tmp_path, data, flags):
    line = one_line_error(cli("train", "--model", "demo", "--data", data, "--out", tmp_path / "o", *flags), 2)
    assert flags[0] in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "change",
    [
        {"sliding_window": 0},
        {"hidden_size": "96"},
        {"num_attention_heads": 0},
        {"num_experts": -8},
        {"intermediate_size": 1.5},
        {"rms_norm_eps": float("nan")},
        {"top_k_experts": 99},
        {"head_dim": True},
    ],
)
def test_bad_config_values_are_one_line(tmp_path, change):
    model = tmp_path / "m"
    shutil.copytree(DEMO, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["text_config"].update(change)
    (model / "config.json").write_text(json.dumps(cfg))
    key = next(iter(change))
    for args in (["generate", "--model", model, "-p", "hi"], ["info", "--model", model]):
        line = one_line_error(cli(*args), 1)
        assert key in line and "ValueError" not in line


@pytest.mark.parametrize("canvas", [0, -16, "16", 2.5])
def test_bad_canvas_length_is_one_line(tmp_path, canvas):
    model = tmp_path / "m"
    shutil.copytree(DEMO, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "canvas_length": canvas}))
    assert "canvas_length" in one_line_error(cli("generate", "--model", model, "-p", "hi"), 1)


@pytest.mark.parametrize(
    "line,says",
    [
        ('{"prompt": "hi"}', 'expected {"messages": [...]} or {"prompt": "...", "completion": "..."}'),
        ('{"messages": "hi"}', '"messages" must be a list'),
        ("[1, 2]", "expected {"),
        ("{not json", "not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "the last message must be the assistant's"),
    ],
)
def test_bad_jsonl_line_says_what_is_wrong(tmp_path, line, says):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(CHAT + line + "\n")
    out = one_line_error(cli("train", "--model", "demo", "--data", bad, "--out", tmp_path / "o"), 1)
    assert f"bad.jsonl:2: {says}" in out


def test_resuming_with_other_lora_settings_is_refused(tmp_path, data):
    out = tmp_path / "o"
    base = ["train", "--model", "demo", "--data", data, "--out", out, "--batch-size", 2]
    assert cli(*base, "--steps", 1, "--lora-rank", 4).returncode == 0
    for other in (["--lora-rank", 8], []):
        line = one_line_error(cli(*base, "--steps", 2, *other), 1)
        assert "lora_rank 4" in line and "--lora-rank" in line
    r = cli(*base, "--steps", 2, "--lora-rank", 4)
    assert r.returncode == 0 and "resuming from step 1" in r.stderr


def test_a_local_folder_named_demo_wins(tmp_path, checkpoint):
    shutil.copytree(checkpoint("basic"), tmp_path / "demo")
    r = cli("info", "--model", "demo", cwd=tmp_path)
    assert r.returncode == 0 and "vocab 512" in r.stdout  # the local folder, not the packaged demo (vocab 384)
