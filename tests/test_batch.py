"""Batched generation: rows of different lengths, settings and budgets give what each prompt gives alone, joining
and leaving at block boundaries; the padded model passes equal the unpadded ones."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import generate, load, stream_generate
from mlx_diffgemma.batch import Batch, Request, generate_batch
from mlx_diffgemma.cache import join_rows
from mlx_diffgemma.demo import HELD_OUT_SEED, examples, question
from mlx_diffgemma.generate import Commit, Done, generate_step, prefill, render_prompt, settings
from mlx_diffgemma.loading import load_model


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def alone(model, ids, g, max_tokens, seed):
    events = generate_step(model, mx.array([ids]), g, max_tokens, key=mx.random.key(seed))
    return [(e.tokens, e.steps, e.finish_reason) for e in events if isinstance(e, Commit)]


@pytest.mark.parametrize("fixture", ["basic", "two_full"])
def test_padded_rows_compute_what_each_row_computes_alone(checkpoint, fixture):
    """Prompts of 5, 19 and 30 tokens (the sliding window is 8) stacked with left padding: the encoder's and the
    decoder's logits of each row equal its own unpadded run, before and after a committed block."""
    model = load_model(checkpoint(fixture))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, n).tolist() for n in (5, 19, 30)]
    C = model.canvas_length
    canvas = mx.array(rng.integers(0, 512, (3, C)))
    block = mx.array(rng.integers(0, 512, (3, C)))
    want = []
    for b, ids in enumerate(prompts):
        cache = model.make_cache()
        prefill(model, mx.array([ids]), cache)
        first = model.denoise(canvas[b : b + 1], cache)
        enc = model.logits(model.encode(block[b : b + 1], cache))
        want.append((first, enc, model.denoise(canvas[b : b + 1], cache)))
    caches = []
    for ids in prompts:
        cache = model.make_cache()
        prefill(model, mx.array([ids]), cache)
        caches.append(cache)
    cache, start = join_rows(caches, [mx.array([0])] * 3)
    assert start.tolist() == [25, 11, 0]
    first = model.denoise(canvas, cache, start=start)
    enc = model.logits(model.encode(block, cache, start))
    second = model.denoise(canvas, cache, start=start)
    for b, (w1, w2, w3) in enumerate(want):
        for got, w in ((first, w1), (enc, w2), (second, w3)):
            np.testing.assert_allclose(np.array(got[b : b + 1]), np.array(w), atol=2e-4, rtol=0)


def test_batched_rows_generate_what_they_generate_alone(demo):
    model, tok = demo
    g = settings(model)
    fewer = settings(model, max_denoising_steps=3, entropy_bound=0.5)
    ids = [render_prompt(tok, p) for p, _ in examples(10, HELD_OUT_SEED)]
    plan = [(i, fewer if i % 3 == 0 else g, 40 if i % 2 else 16) for i in range(len(ids))]  # mixed settings, budgets
    want = {i: alone(model, ids[i], gi, mt, seed=100 + i) for i, gi, mt in plan}
    got: dict[int, list] = {}
    requests = [Request(ids[i], gi, mt, mx.random.key(100 + i), tag=i) for i, gi, mt in plan]
    for tag, e in generate_batch(model, requests):
        if isinstance(e, Commit):
            got.setdefault(tag, []).append((e.tokens, e.steps, e.finish_reason))
    assert got == want


def test_rows_join_and_leave_at_block_boundaries(demo):
    model, tok = demo
    g = settings(model)
    pairs = sorted(examples(40, HELD_OUT_SEED), key=lambda pa: -len(pa[1]))[:8]  # longest answers: several blocks
    ids = [render_prompt(tok, p) for p, _ in pairs]
    want = {i: alone(model, ids[i], g, 160, seed=i) for i in range(8)}
    assert max(len(w) for w in want.values()) > 1
    batch, got, nxt, widths = Batch(model), {}, 2, []
    batch.add(Request(ids[0], g, 160, mx.random.key(0), tag=0))
    batch.add(Request(ids[1], g, 160, mx.random.key(1), tag=1))
    while len(batch):
        for tag, e in batch.run_block():
            if isinstance(e, Commit):
                got.setdefault(tag, []).append((e.tokens, e.steps, e.finish_reason))
            widths.append(len(batch.rows))
        if nxt < 8:  # one new request after every block
            batch.add(Request(ids[nxt], g, 160, mx.random.key(nxt), tag=nxt))
            nxt += 1
    assert got == want and max(widths) >= 2
    assert batch.cache is None and batch.rows == []  # everything left


def test_a_cancelled_row_leaves_at_the_next_boundary(demo):
    model, tok = demo
    g = settings(model)
    pairs = sorted(examples(40, HELD_OUT_SEED), key=lambda pa: -len(pa[1]))[:2]
    ids = [render_prompt(tok, p) for p, _ in pairs]
    want = alone(model, ids[1], g, 160, seed=1)
    batch = Batch(model)
    batch.add(Request(ids[0], g, 160, mx.random.key(0), tag="a"))
    batch.add(Request(ids[0], g, 160, mx.random.key(5), tag="gone"))
    batch.cancel("gone")
    assert len(batch) == 1  # still waiting: dropped at once
    batch.add(Request(ids[1], g, 160, mx.random.key(1), tag="b"))
    got = []
    for i in range(10):
        for tag, e in batch.run_block():
            assert tag != "a" or i == 0  # after the cancel, nothing more of "a"
            if tag == "b" and isinstance(e, Commit):
                got.append((e.tokens, e.steps, e.finish_reason))
        if i == 0:
            assert [r.req.tag for r in batch.rows] == ["a", "b"]
            batch.cancel("a")
        if not len(batch):
            break
    assert got == want  # the other row is undisturbed


def test_the_python_api_takes_a_list_of_prompts(demo):
    model, tok = demo
    pairs = examples(6, HELD_OUT_SEED)
    prompts = [p for p, _ in pairs]
    one_by_one = [generate(model, tok, p, seed=7 + i) for i, p in enumerate(prompts)]
    assert generate(model, tok, prompts, seed=7) == one_by_one
    assert generate(model, tok, prompts, seed=[7 + i for i in range(6)], batch_size=2) == one_by_one
    rows = {e.row for e in stream_generate(model, tok, prompts[:3], seed=0) if isinstance(e, Done)}
    assert rows == {0, 1, 2}
    with pytest.raises(ValueError, match="2 seeds"):
        generate(model, tok, prompts, seed=[1, 2])


def test_generate_command_writes_one_json_line_per_answer(tmp_path):
    pairs = examples(5, HELD_OUT_SEED)
    pairs[0] = (question(pairs[0][0]), pairs[0][1])  # -p takes text
    f = tmp_path / "prompts.jsonl"
    f.write_text(
        "\n".join(json.dumps({"prompt": p} if isinstance(p, str) else {"messages": p}) for p, _ in pairs[1:]) + "\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma", "generate", "--model", "demo", "-p", pairs[0][0], "--prompts", f,
         "--seed", "3", "--batch-size", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert sorted(x["index"] for x in lines) == list(range(5))
    model, tok = load("demo")
    for x in lines:
        assert x["text"] == generate(model, tok, pairs[x["index"]][0], seed=3 + x["index"])
    f.write_text('{"prompt": ""}\n')
    r = subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma", "generate", "--model", "demo", "--prompts", f],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1 and "prompts.jsonl:1" in r.stderr and "Traceback" not in r.stderr


def test_a_batch_generates_the_same_on_one_stream_or_two(checkpoint, monkeypatch):
    """The batch's sampler on two CPU streams (sampling.split_pass, its Gumbel noise drawn during the forward)
    gives each row the tokens, steps and acceptances of the one-stream pass. On a random checkpoint, where every
    later argmax depends on the tokens drawn before (a draw with other noise changes them)."""
    model = load(checkpoint("basic"))[0]
    g = settings(model, max_denoising_steps=4, eos_token_id=[])
    hot = settings(model, max_denoising_steps=3, entropy_bound=2.0, t_min=1.5, t_max=3.0, eos_token_id=[])
    rng = np.random.default_rng(5)
    ids = [rng.integers(3, model.args.vocab_size, n).tolist() for n in (5, 9, 14, 7)]
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MLX_DIFFGEMMA_STREAMS", flag)
        events = []
        requests = [Request(x, hot if i % 2 else g, 40, mx.random.key(7 + i), tag=i) for i, x in enumerate(ids)]
        for tag, e in generate_batch(model, requests):
            if isinstance(e, Commit):
                events.append((tag, e.tokens, e.steps, e.finish_reason))
            else:
                events.append((tag, e.step, e.draft.tolist(), e.settled.tolist()))
        runs[flag] = events
    assert runs["0"] == runs["1"] and len(runs["1"]) > 4
