import math

import mlx.core as mx
import pytest

from mlx_diffgemma import load
from mlx_diffgemma.config import ConfigError, GenerationConfig
from mlx_diffgemma.generate import Commit, Step, generate_step, settings

PROMPT = mx.array([[2, 105, 30, 31, 32, 106, 107]])


@pytest.fixture(scope="module")
def model(checkpoint):
    return load(checkpoint("basic"))[0]  # canvas 16


def run(model, seed=0, max_tokens=40, **kw):
    g = settings(model, **{"max_denoising_steps": 6, "eos_token_id": [], **kw})
    return list(generate_step(model, PROMPT, g, max_tokens, key=mx.random.key(seed)))


def tokens(events):
    return [t for e in events if isinstance(e, Commit) for t in e.tokens]


def test_event_order_and_counts(model):
    events = run(model, max_tokens=40)  # ceil(40 / 16) = 3 blocks
    commits = [e for e in events if isinstance(e, Commit)]
    assert [c.block for c in commits] == [0, 1, 2]
    block = 0
    for e in events:  # each block's steps count up from 1, then its commit
        if isinstance(e, Step):
            assert e.block == block and 1 <= e.step <= 6 and 1 <= int(e.accepted) <= 16
        else:
            block += 1
    for c in commits:
        steps = [e for e in events if isinstance(e, Step) and e.block == c.block]
        assert [s.step for s in steps] == list(range(1, len(steps) + 1)) and c.steps == len(steps)
    assert len(tokens(events)) == 40 and commits[-1].finish_reason == "length"
    assert commits[0].tokens == events[commits[0].steps - 1].draft.tolist()  # the commit is the last draft


def test_seeds(model):
    assert tokens(run(model, seed=1)) == tokens(run(model, seed=1))
    assert tokens(run(model, seed=1)) != tokens(run(model, seed=2))


@pytest.mark.parametrize("max_tokens", [1, 16, 17])
def test_max_tokens(model, max_tokens):
    events = run(model, max_tokens=max_tokens)
    assert len(tokens(events)) == max_tokens
    assert sum(isinstance(e, Commit) for e in events) == math.ceil(max_tokens / 16)


def test_eos_stops_mid_block(model):
    """The same seed with an EOS id that the first block produces: output stops before it, no later block."""
    first = [e for e in run(model, seed=3) if isinstance(e, Commit)][0].tokens
    eos = first[5]
    events = run(model, seed=3, eos_token_id=[eos])
    commits = [e for e in events if isinstance(e, Commit)]
    assert len(commits) == 1 and commits[0].finish_reason == "eos"
    assert commits[0].tokens == first[: first.index(eos)]


def test_adaptive_stop(model):
    """stability 0 and a loose confidence bound stop every block after its first step."""
    events = run(model, stability_threshold=0, confidence_threshold=1e6)
    assert all(e.steps == 1 for e in events if isinstance(e, Commit))


def test_invalid_settings(model):
    with pytest.raises(ConfigError, match="t_max must be greater than t_min"):
        settings(model, t_min=0.9, t_max=0.8)
    with pytest.raises(ConfigError, match="max_denoising_steps"):
        settings(model, max_denoising_steps=0)
    with pytest.raises(TypeError, match="unknown generation settings: temp"):
        settings(model, temp=1.0)


@pytest.mark.parametrize("C", [16, 17, 2])
def test_the_split_sampler_is_the_compiled_step_bit_for_bit(C):
    """The CPU sampler on two streams (halves of the canvas, Gumbel noise drawn ahead) returns exactly what the
    one-stream compiled step returns: canvas, argmax, probabilities, acceptance, stop and history."""
    from mlx_diffgemma.generate import _make_split_step_fn, _make_step_fn
    from mlx_diffgemma.sampling import new_history

    V = 3001
    g = GenerationConfig(entropy_bound=2.0, confidence_threshold=0.5)  # some rows accepted, some not
    canvas = mx.random.randint(0, V, (1, C), key=mx.random.key(7))
    history = new_history(1, 1, C)
    for seed, (scale, temp) in enumerate([(1.0, 0.8), (8.0, 0.4), (30.0, 0.6)]):
        logits = mx.random.normal((1, C, V), key=mx.random.key(100 + seed)) * scale
        key, t = mx.random.key(seed), mx.array(temp, dtype=mx.float32)
        want = _make_step_fn(g, V)(logits, canvas, history, t, key)
        prepare, step = _make_split_step_fn(g, (1, C, V))
        got = step(logits, canvas, history, t, *prepare(key))
        for name, w, o in zip(("canvas", "argmax", "probs", "mask", "stop", "history"), want, got):
            assert w.dtype == o.dtype and mx.array_equal(w, o), name
        canvas, history = got[0], got[5]


def test_generation_is_the_same_with_one_stream_or_two(model, monkeypatch):
    monkeypatch.setenv("MLX_DIFFGEMMA_STREAMS", "0")
    one = run(model, seed=3, max_tokens=40)
    monkeypatch.setenv("MLX_DIFFGEMMA_STREAMS", "1")
    two = run(model, seed=3, max_tokens=40)
    assert [type(e) for e in one] == [type(e) for e in two]
    for a, b in zip(one, two):
        if isinstance(a, Step):
            assert mx.array_equal(a.draft, b.draft) and mx.array_equal(a.settled, b.settled)
        else:
            assert a == b


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="MLX's CPU allocator")
def test_a_buffer_cache_full_of_stale_buffers_is_reported_and_the_limit_kept():
    from mlx_diffgemma import memory

    previous = mx.set_cache_limit(16 << 20)
    try:
        mx.clear_cache()
        assert not memory.stale_buffers()
        a = mx.zeros((3 << 20,))  # 12 MB, over half the limit once freed into the cache
        mx.eval(a)
        del a
        assert mx.get_cache_memory() >= 12 << 20
        assert memory.stale_buffers()
        assert mx.get_cache_memory() >= 12 << 20  # asking frees nothing
        assert mx.set_cache_limit(16 << 20) == 16 << 20  # nor changes the limit
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()


def test_stale_buffers_are_dropped_after_each_encoding_and_the_output_is_the_same(model, monkeypatch):
    """generate_step empties the buffer cache after the prompt's and each commit's encoding when it is crowded;
    what it generates does not change."""
    from mlx_diffgemma import memory

    expected = tokens(run(model, seed=4, max_tokens=40))
    cleared = []
    monkeypatch.setattr(memory, "stale_buffers", lambda: True)
    monkeypatch.setattr(mx, "clear_cache", lambda: cleared.append(1))
    assert tokens(run(model, seed=4, max_tokens=40)) == expected
    assert len(cleared) == 3  # the prompt, then the commits of blocks 0 and 1 before blocks 1 and 2
