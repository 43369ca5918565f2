"""Speed modes: the partial-step machinery is exact where it should be (a partial step over an unchanged canvas
gives the full step's logits; the speed-mode loop with every knob neutral gives exact mode's tokens), each knob
does what it says, the modes resolve and validate, and `eval` measures them."""

import importlib
import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import load
from mlx_diffgemma.config import MODES, ConfigError
from mlx_diffgemma.generate import Commit, Step, generate_step, prefill, render_prompt, settings
from mlx_diffgemma.model import CanvasKV

gen = importlib.import_module("mlx_diffgemma.generate")  # the module (the package's `generate` is the function)


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def test_a_partial_step_over_an_unchanged_canvas_gives_the_full_steps_logits(checkpoint):
    model = load(checkpoint("basic"))[0]  # sliding and full layers, canvas 16
    C = model.canvas_length
    cache = model.make_cache()
    prefill(model, mx.array([list(range(3, 40))]), cache)  # longer than the sliding window
    canvas = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (1, C)).astype(np.int32))
    soft = mx.array(np.random.default_rng(1).normal(0, 1, (1, C, model.args.hidden_size)).astype(np.float32))
    want = model.denoise(canvas, cache, self_conditioning_embeds=soft)
    kv = CanvasKV()
    full = model.denoise(canvas, cache, self_conditioning_embeds=soft, canvas_kv=kv)
    assert mx.array_equal(full, want)
    for live in ([0, 5, 6, 15], [3], list(range(C))):
        idx = mx.array(live, dtype=mx.int32)
        part = model.denoise(canvas, cache, self_conditioning_embeds=soft, canvas_kv=kv, live=idx)
        assert part.shape == (1, len(live), model.args.vocab_size)
        np.testing.assert_allclose(np.array(part), np.array(want[:, idx]), rtol=1e-5, atol=1e-5)
    other = mx.array(np.random.default_rng(2).integers(0, model.args.vocab_size, (1, C)).astype(np.int32))
    stale = model.denoise(other, cache, self_conditioning_embeds=soft, canvas_kv=kv, live=mx.array([0, 1]))
    fresh = model.denoise(other, cache, self_conditioning_embeds=soft)[:, :2]
    assert not np.allclose(np.array(stale), np.array(fresh), atol=1e-3)  # the others' K/V are the recorded ones
    with pytest.raises(ValueError, match="full one first"):
        model.denoise(canvas, cache, canvas_kv=CanvasKV(), live=mx.array([0]))


def test_the_speed_mode_loop_with_neutral_knobs_gives_exact_modes_tokens(demo, monkeypatch):
    model, tok = demo
    g = settings(model)
    from mlx_diffgemma.demo import HELD_OUT_SEED, examples

    def run(**kw):
        out = []
        for i, (p, _) in enumerate(examples(6, HELD_OUT_SEED)):
            events = generate_step(
                model, mx.array([render_prompt(tok, p)]), settings(model, **kw), 40, key=mx.random.key(i)
            )
            out.append([(e.tokens, e.steps) for e in events if isinstance(e, Commit)])
        return out

    exact = run()
    monkeypatch.setattr(gen, "partial_steps", lambda g: True)  # the speed-mode loop, no knob on
    assert run() == exact
    # freezing that never fires, and a refresh at every step, change nothing either
    assert run(freeze_after=1000, refresh_every=1) == exact
    assert g.is_exact() and not settings(model, mode="fast").is_exact()


def test_knobs_do_what_they_say(demo):
    model, tok = demo
    C = model.canvas_length
    ids = mx.array([render_prompt(tok, "Reverse: qwertyuiopasdfgh")])

    def steps(**kw):
        return [
            e for e in generate_step(model, ids, settings(model, **kw), 64, key=mx.random.key(3)) if isinstance(e, Step)
        ]

    frozen = [s for s in steps(freeze_after=0, t_max=1.5, t_min=1.0) if s.block == 0]  # hotter: slower to settle
    assert len(frozen) > 3 and frozen[0].queries == frozen[1].queries == C  # the second: the stale ones too
    assert all(a.queries >= b.queries for a, b in zip(frozen[1:], frozen[2:])) and frozen[-1].queries < C // 2
    refreshed = steps(freeze_after=0, refresh_every=2)
    assert all(s.queries == C for s in refreshed if s.step % 2 == 1)
    capped = steps(max_denoising_steps=1)
    assert {s.step for s in capped} == {1}


def test_confidence_acceptance_takes_every_position_that_sure(demo, monkeypatch):
    """Half the canvas 95% sure of its token, the rest undecided: confidence 0.9 accepts that half, where the
    entropy bound (0.1; each sure position carries about 0.5 nats) accepts one position."""
    model, tok = demo
    C, V = model.canvas_length, model.args.vocab_size
    g = settings(model, max_denoising_steps=1)
    gap = -g.t_max * np.log(0.05 / (0.95 * (V - 1)))  # top probability 0.95 after the first step's temperature
    sure = mx.arange(C)[:, None] < C // 2
    fixed = mx.where(sure & (mx.arange(V)[None] == 7), gap, 0.0)[None]
    monkeypatch.setattr(
        model, "denoise", lambda canvas, cache, live=None, **kw: fixed if live is None else fixed[:, live]
    )
    ids = mx.array([render_prompt(tok, "Sort: 3 1")])

    def settled(**kw):
        (s,) = [e for e in generate_step(model, ids, settings(model, max_denoising_steps=1, **kw), 16,
                                         key=mx.random.key(0)) if isinstance(e, Step)]  # fmt: skip
        return np.array(s.settled)

    assert (settled(accept="confidence", accept_confidence=0.9) == np.array(sure[:, 0])).all()
    assert settled(accept="confidence", accept_confidence=0.99).sum() == 1  # none that sure: the surest alone
    assert settled().sum() == 1

    def forwarded(sure_enough: float, steps: int, **kw) -> list[int]:  # positions each step forwards
        g = settings(model, max_denoising_steps=steps, accept="confidence", accept_confidence=0.9, freeze_after=0,
                     freeze_confidence=sure_enough, stability_threshold=5, confidence_threshold=1e-30,
                     **kw)  # fmt: skip
        return [e.queries for e in generate_step(model, ids, g, 16, key=mx.random.key(0)) if isinstance(e, Step)]

    # only positions that sure freeze (0.95 at the first step's temperature); those frozen on another token than
    # they were read with are forwarded once more (their K/V then hold their token), then no more
    assert forwarded(0.99, 2) == [C, C] and forwarded(0.9, 3) == [C, C, C - C // 2]
    # without that refresh, later steps attend to the K/V they were read with and forward the rest alone
    assert forwarded(0.9, 3, refresh_frozen=False) == [C, C - C // 2, C - C // 2]


def test_eos_exit_ends_a_block_that_is_all_eos(demo, monkeypatch):
    model, tok = demo
    eos = settings(model).eos_token_id[0]
    real = model.denoise

    def all_eos(canvas, cache, **kw):  # a model that answers nothing but EOS, with certainty
        out = real(canvas, cache, **kw)
        return mx.where(mx.arange(out.shape[-1]) == eos, 30.0, -30.0) + 0 * out

    monkeypatch.setattr(model, "denoise", all_eos)
    ids = mx.array([render_prompt(tok, "Sort: 3 1")])
    g = settings(model, eos_exit=True, confidence_threshold=1e-30, stability_threshold=5)
    commits = [e for e in generate_step(model, ids, g, 16, key=mx.random.key(0)) if isinstance(e, Commit)]
    assert commits[0].steps == 1 and commits[0].finish_reason == "eos"
    g = settings(model, confidence_threshold=1e-30, stability_threshold=5)
    commits = [e for e in generate_step(model, ids, g, 16, key=mx.random.key(0)) if isinstance(e, Commit)]
    assert commits[0].steps > 1


def test_canvas_kv_cut_and_grown_matches_a_fresh_forward(checkpoint):
    """What trimming does to the recorded K/V: cut to the first L positions, a partial step over a canvas of L
    forwards as a full step over those L; grown back to C, a step forwarding every position is a full step."""
    model = load(checkpoint("basic"))[0]
    C, L = model.canvas_length, 6
    cache = model.make_cache()
    prefill(model, mx.array([list(range(3, 40))]), cache)
    canvas = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (1, C)).astype(np.int32))
    kv = CanvasKV()
    model.denoise(canvas, cache, canvas_kv=kv)
    kv.truncate(L)
    part = model.denoise(canvas[:, :L], cache, canvas_kv=kv, live=mx.arange(L, dtype=mx.int32))
    np.testing.assert_allclose(np.array(part), np.array(model.denoise(canvas[:, :L], cache)), rtol=1e-5, atol=1e-5)
    kv.extend(C)
    assert all(k.shape[2] == C and v.shape[2] == C for k, v in kv.kv)
    grown = model.denoise(canvas, cache, canvas_kv=kv, live=mx.arange(C, dtype=mx.int32))
    np.testing.assert_allclose(np.array(grown), np.array(model.denoise(canvas, cache)), rtol=1e-5, atol=1e-5)


def test_trimming_forwards_the_canvas_through_its_end(demo, monkeypatch):
    """A model sure of an answer that ends at position `end`: with trim_eos, the steps after the first forward and
    attend to the canvas through that end only; with first_window, the first step forwards that share, and the
    rest joins at the next step when no end shows in it (or one shows only in its last WINDOW_MARGIN positions)."""
    model, tok = demo
    C, V = model.canvas_length, model.args.vocab_size
    eos = settings(model).eos_token_id[0]
    seen = []

    def sure_of(end, gap):
        def denoise(canvas, cache, live=None, **kw):
            n = canvas.shape[1]
            seen.append(n)
            pos = mx.arange(n) if live is None else live
            want = mx.where(pos < end, 7, eos)
            return mx.where(mx.arange(V)[None] == want[:, None], gap, 0.0)[None]

        return denoise

    ids = mx.array([render_prompt(tok, "Sort: 3 1")])

    def run(end, gap=60.0, **kw):  # a gap of 60 between the logits: certain (top probability 1 in float32)
        monkeypatch.setattr(model, "denoise", sure_of(end, gap))
        seen.clear()
        g = settings(model, confidence_threshold=1e-30, stability_threshold=3, max_denoising_steps=4, **kw)
        events = list(generate_step(model, ids, g, C, key=mx.random.key(0)))
        commit = events[-1]
        assert isinstance(commit, Commit) and commit.tokens == [7] * end and commit.finish_reason == "eos"
        steps = [e for e in events if isinstance(e, Step)]
        assert all(int(s.draft[end]) == eos and (np.array(s.draft[end:]) == eos).all() for s in steps[1:])
        return [(s.queries, s.attended) for s in steps], list(seen)

    assert run(5, trim_eos=0.9)[0] == [(C, C), (6, 6), (6, 6), (6, 6)]
    w = gen.window(0.25, C)
    assert run(5, trim_eos=0.9, first_window=0.25)[0] == [(w, w), (6, 6), (6, 6), (6, 6)]
    # an end in the window's last positions, or none in it: the whole canvas at the next step, then trimmed
    late = w - gen.WINDOW_MARGIN
    assert run(late, trim_eos=0.9, first_window=0.25)[0][:3] == [(w, w), (C, C), (late + 1, late + 1)]
    assert run(30, trim_eos=0.9, first_window=0.25)[0][:3] == [(w, w), (C, C), (31, 31)]
    # with freezing the grown step forwards the positions the window left out and none of the frozen ones (those
    # frozen on another token than the one they were read with are forwarded once more unless refresh_frozen is off)
    steps, canvases = run(30, trim_eos=0.9, first_window=0.25, freeze_after=0, refresh_frozen=False)
    assert steps[:2] == [(w, w), (C - w, C)] and canvases[:2] == [w, C]
    # never that sure: nothing trimmed (a gap of 8: top probability 0.98 to 0.99996 at these temperatures)
    assert run(5, gap=8.0, trim_eos=1.0)[0] == [(C, C)] * 4
    assert run(5, gap=8.0, trim_eos=0.95)[0] == [(C, C), (6, 6), (6, 6), (6, 6)]


def test_modes_resolve_and_bad_knobs_are_one_line_errors(demo):
    model, _ = demo
    assert set(MODES) == {"exact", "fast", "turbo"} and settings(model, mode="exact") == settings(model)
    turbo = settings(model, mode="turbo")
    assert turbo.freeze_after == MODES["turbo"]["freeze_after"] and turbo.sc_top_k == MODES["turbo"]["sc_top_k"]
    assert settings(model, mode="turbo", sc_top_k=64).sc_top_k == 64  # an explicit knob wins
    for bad, match in (
        ({"mode": "warp"}, "must be one of exact, fast, turbo"),
        ({"freeze_after": -1}, "freeze_after"),
        ({"refresh_every": 0}, "refresh_every"),
        ({"accept": "vote"}, "accept"),
        ({"accept_confidence": 1.5}, "accept_confidence"),
        ({"freeze_confidence": 1.5}, "freeze_confidence"),
        ({"refresh_frozen": "no"}, "refresh_frozen"),
        ({"trim_eos": 1.5}, "trim_eos must be at most 1"),
        ({"trim_eos": 0}, "trim_eos"),
        ({"trim_eos": 0.9, "first_window": 0}, "first_window"),
        ({"trim_eos": 0.9, "first_window": 1.5}, "first_window is a share of the canvas"),
        ({"first_window": 0.5}, "first_window needs trim_eos"),
    ):
        with pytest.raises(ConfigError, match=match):
            settings(model, **bad)


def test_a_batch_row_in_a_speed_mode_gives_what_it_gives_alone(demo):
    from mlx_diffgemma.batch import Request, generate_batch
    from mlx_diffgemma.demo import HELD_OUT_SEED, examples

    model, tok = demo
    prompts = [render_prompt(tok, p) for p, _ in [("Reverse: qwertyuiopasdfgh", ""), *examples(3, HELD_OUT_SEED + 7)]]
    plans = [
        settings(model, freeze_after=0, t_max=1.5, t_min=1.0),  # hotter: fewer accepted per step, partial steps
        settings(model),
        settings(model, mode="fast"),
        settings(model, mode="turbo"),
    ]

    def alone(i):
        events = generate_step(model, mx.array([prompts[i]]), plans[i], 40, key=mx.random.key(i))
        return [(e.tokens, e.steps) for e in events if isinstance(e, Commit)]

    together, queries = {}, set()
    for tag, e in generate_batch(model, [Request(prompts[i], plans[i], 40, mx.random.key(i), tag=i) for i in range(4)]):
        if isinstance(e, Commit):
            together.setdefault(tag, []).append((e.tokens, e.steps))
        elif tag == 0:
            queries.add(e.queries)
    assert together == {i: alone(i) for i in range(4)}  # left padding, exact rows beside
    assert min(queries) < model.canvas_length  # a speed row took partial steps


def test_eval_command_measures_the_modes(tmp_path, capsys):
    from mlx_diffgemma.cli import run

    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Sort: 3 1 2", "answer": "1 2 3"}, {"messages": [{"role": "user", "content": "Reverse: abc"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(SystemExit) as e:
        run(["eval", "--model", "demo", "--data", str(data), "--mode", "turbo", "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in out["results"]] == ["exact", "turbo"]  # exact added: one prompt has no answer
    exact, turbo = out["results"]
    assert exact["n"] == turbo["n"] == 2 and exact["accuracy"] == 1.0  # exact agrees with itself
    assert turbo["decoder_flops_per_token"] < exact["decoder_flops_per_token"]
    for args, msg in (
        (["--mode", "warp"], "--mode must be among"),
        (["--limit", "0"], "--limit"),
    ):
        with pytest.raises(SystemExit) as e:
            run(["eval", "--model", "demo", "--data", str(data), *args])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    data.write_text('{"answer": "x"}\n')
    with pytest.raises(SystemExit) as e:
        run(["eval", "--model", "demo", "--data", str(data)])
    assert e.value.code == 1 and "prompts.jsonl:1" in capsys.readouterr().err


def test_the_speed_mode_loop_gives_the_same_tokens_on_one_stream_or_two(checkpoint, monkeypatch):
    """The speed-mode loop's sampler on two CPU streams (sampling.split_pass over the forwarded positions, its noise
    drawn during the forward) changes nothing: on a random checkpoint, where every draw steers what follows, with
    freezing (partial steps over fewer positions) and a refresh."""
    model = load(checkpoint("basic"))[0]
    g = settings(
        model, mode="fast", max_denoising_steps=8, eos_token_id=[], t_max=1.5, t_min=1.0, freeze_confidence=None
    )
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MLX_DIFFGEMMA_STREAMS", flag)
        events = list(generate_step(model, mx.array([[2, 40, 41, 42, 43]]), g, 32, key=mx.random.key(3)))
        runs[flag] = [(e.tokens, e.steps) if isinstance(e, Commit) else (e.draft.tolist(), e.queries) for e in events]
    assert runs["0"] == runs["1"]
    assert any(isinstance(q, int) and 1 < q < model.canvas_length for _, q in runs["1"])  # partial steps ran
