"""Training: it learns, freezes what it should, writes checkpoints `load` reads, and resumes exactly."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_diffgemma import load, train
from mlx_diffgemma.generate import render_prompt


def reversal(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = list(rng.integers(10, 60, 8))
        out.append(([2, 5] + x + [6], x[::-1]))
    return out


def params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def denoise(model, seed=0):
    rng = np.random.default_rng(seed)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, 512, (1, 12))), cache)
    return np.array(model.denoise(mx.array(rng.integers(0, 512, (1, model.canvas_length))), cache))


def test_full_fine_tuning_learns_and_keeps_buffers(checkpoint, tmp_path):
    model, _ = load(checkpoint("basic"))
    before = params(model)
    data = reversal(64)
    cfg = train.TrainConfig(steps=40, batch_size=8, learning_rate=3e-3, warmup=5, checkpoint_every=20)
    rng = np.random.default_rng(9)
    probe = train.make_batch(data[:16], 16, 512, 1, 0, rng)
    first = float(train.loss(model, probe)[0])
    train.train(model, data, tmp_path / "out", checkpoint("basic"), cfg, eos_id=1, log=lambda s: None)
    assert float(train.loss(model, probe)[0]) < 0.7 * first
    after = params(model)
    for k in before:
        frozen = k.endswith("layer_scalar") or ".router." in k
        assert np.array_equal(before[k], after[k]) == frozen, k
    saved, _ = load(tmp_path / "out")  # a checkpoint is a model folder
    np.testing.assert_array_equal(denoise(saved), denoise(model))
    state = json.loads((tmp_path / "out" / "trainer" / "state.json").read_text())
    assert state["step"] == 40 and not list(tmp_path.glob(".out*"))


def test_lora_trains_adapters_only_and_folds_them(checkpoint, tmp_path):
    model, _ = load(checkpoint("tamed"))
    base = params(model)
    cfg = train.TrainConfig(steps=10, batch_size=4, learning_rate=1e-2, lora_rank=4, checkpoint_every=10)
    probe = train.make_batch(reversal(16)[:8], model.canvas_length, 512, 1, 0, np.random.default_rng(9))
    first = float(train.loss(model, probe)[0])
    train.train(model, reversal(16), tmp_path / "lora", None, cfg, eos_id=1, log=lambda s: None)
    assert float(train.loss(model, probe)[0]) < 0.9 * first  # the adapters learn the data
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    assert all(".self_attn." in k or ".mlp." in k for k in trainable)
    merged = train.merged_weights(model)
    assert set(merged) == set(base)
    assert all(np.array_equal(base[k], np.array(merged[k])) for k in base if "_proj" not in k or ".experts." in k)
    saved, _ = load(tmp_path / "lora")
    folded = dict(saved.named_modules())
    adapted = [(p, m) for p, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
    assert len(adapted) == len(trainable) // 2
    for path, m in adapted:  # each folded layer computes what base + adapter computed
        xi = mx.random.normal((5, m.linear.weight.shape[1]), key=mx.random.key(4))
        np.testing.assert_allclose(np.array(folded[path](xi)), np.array(m(xi)), rtol=1e-5, atol=1e-5, err_msg=path)
    # end to end: the same logits, but for a position whose top-k expert choice sits on a near tie, where a
    # 1e-7 difference may pick the other expert (seen once in CI: one position off by 1e-2)
    diff = np.abs(denoise(saved) - denoise(model)).max(axis=-1)[0]
    assert (diff <= 1e-4).mean() >= 0.9, diff


def test_resume_continues_exactly(checkpoint, tmp_path):
    data = reversal(32)
    cfg = train.TrainConfig(steps=6, batch_size=4, learning_rate=1e-3, warmup=2, checkpoint_every=3)
    a, _ = load(checkpoint("basic"))
    train.train(a, data, tmp_path / "a", None, cfg, eos_id=1, log=lambda s: None)
    b, _ = load(checkpoint("basic"))
    train.train(b, data, tmp_path / "b", None, cfg, eos_id=1, log=lambda s: None, stop_after=4)  # dies at 4
    assert json.loads((tmp_path / "b" / "trainer" / "state.json").read_text())["step"] == 3
    c, _ = load(checkpoint("basic"))
    lines = []
    train.train(c, data, tmp_path / "b", None, cfg, eos_id=1, log=lines.append)
    assert lines[0] == "resuming from step 3"
    pa, pc = params(a), params(c)
    assert all(np.allclose(pa[k], pc[k], rtol=0, atol=1e-6) for k in pa)


def test_jsonl(chat_checkpoint, tmp_path):
    _, tok = load(chat_checkpoint)
    f = tmp_path / "data.jsonl"
    f.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Sort 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]})
        + "\n\n"
        + json.dumps({"prompt": "Reverse ab", "completion": "ba"})
        + "\n"
    )
    (p1, r1), (p2, r2) = train.load_jsonl(f, tok, eos_id=1)
    assert p1 == render_prompt(tok, "Sort 3 1 2") and r1 == tok.encode("1 2 3", add_special_tokens=False) + [106]
    assert p2 == render_prompt(tok, "Reverse ab") and r2[-1] == 106
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="data.jsonl:1: the last message must be the assistant's"):
        train.load_jsonl(f, tok, eos_id=1)
    f.write_text("{oops\n")
    with pytest.raises(ValueError, match="data.jsonl:1:"):
        train.load_jsonl(f, tok, eos_id=1)


def test_train_command(chat_checkpoint, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Echo {i}", "completion": f"{i}"}) for i in range(8)) + "\n")
    run = [
        sys.executable,
        "-m",
        "mlx_diffgemma",
        "train",
        "--model",
        str(chat_checkpoint),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "ft"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lora-rank",
        "2",
        "--checkpoint-every",
        "2",
    ]
    r = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "8 examples; training LoRA rank 2" in r.stderr and r.stdout.strip() == f"wrote {tmp_path / 'ft'}"
    model, tok = load(tmp_path / "ft")
    assert tok is not None and model.canvas_length == 16
    from mlx_diffgemma import generate

    assert isinstance(generate(model, tok, "Echo 3", max_tokens=16, seed=0), str)  # the adapted model generates
    bad = subprocess.run(run[:-2] + ["--checkpoint-every", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --checkpoint-every must be an integer >= 1, got 0"
    data.write_text("not json\n")
    bad = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and bad.stderr.strip().startswith(f"error: {data}:1:")


def test_init_weights_for_training_from_scratch(checkpoint):
    model, _ = load(checkpoint("basic"))
    train.init_weights(model, std=0.02, seed=1)
    p = params(model)
    for k, w in p.items():
        if k.endswith(("q_norm.weight", "k_norm.weight")):  # unit-scale attention logits at the start
            np.testing.assert_allclose(w, w.shape[0] ** -0.25, rtol=1e-6, err_msg=k)
        elif w.ndim == 1:
            assert np.all(w == 1), k
        elif w.size >= 1000:
            assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002, k
    assert any(k.endswith("q_norm.weight") for k in p)


def test_length_batches_mix_neighbouring_lengths():
    rng = np.random.default_rng(0)
    # two "tasks" of adjacent lengths within one 16-token bucket, and a long one in a bucket of its own
    examples = [([1] * int(rng.integers(32, 40)), [2]) for _ in range(64)]  # task A: 33..40 tokens
    examples += [([3] * int(rng.integers(40, 48)), [4]) for _ in range(64)]  # task B: 41..48 tokens
    examples += [([5] * 100, [6]) for _ in range(64)]  # long: its own bucket
    batches = train.length_batches(examples, 16, seed=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(192))  # each example in exactly one batch
    assert all(len(b) == 16 for b in batches)
    for b in batches:
        lengths = [len(examples[i][0]) + 1 for i in b]
        assert max(lengths) - min(lengths) < 16  # padding stays under one bucket
    kinds = [{examples[i][0][0] for i in b} for b in batches]
    assert kinds.count({5}) == 4 and kinds.count({1, 3}) >= 6  # A and B share batches; plain sorting never mixes them
    assert [b.tolist() for b in train.length_batches(examples, 16, seed=0)] == [b.tolist() for b in batches]
    assert [b.tolist() for b in train.length_batches(examples, 16, seed=1)] != [b.tolist() for b in batches]


def test_lora_adapters_start_from_the_run_seed(checkpoint):
    """The same seed gives the same adapters, whatever drew random numbers before (other tests, other code)."""
    cfg = train.TrainConfig(lora_rank=4)

    def adapters(cfg):
        model, _ = load(checkpoint("tamed"))
        train.prepare(model, cfg)
        return dict(tree_flatten(model.trainable_parameters()))

    first = adapters(cfg)
    mx.random.normal((1000,))  # move MLX's global generator
    again = adapters(cfg)
    other = adapters(train.TrainConfig(lora_rank=4, seed=1))
    assert first.keys() == again.keys() and all(mx.array_equal(first[k], again[k]) for k in first)
    assert not all(mx.array_equal(first[k], other[k]) for k in first if k.endswith("lora_a"))
