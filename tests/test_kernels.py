"""Kernels: each kernel's C++ expansion, run on the CPU with real threads and barriers, equals its pure-MLX
reference; the reference equals the unfused operations it replaces and transformers' sampler; the CUDA expansion
compiles with NVRTC and the Metal one passes a syntax check, and both fail on a planted error; the dispatcher
honours MLX_DIFFGEMMA_KERNELS and falls back to the reference."""

import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_diffgemma import kernels, sampling
from mlx_diffgemma.kernels import checks, cpu
from mlx_diffgemma.kernels import routing as rt
from mlx_diffgemma.kernels import self_cond as sc
from mlx_diffgemma.kernels import vocab as vp
from mlx_diffgemma.kernels.dialect import cuda_translation_unit, metal_translation_unit

T = vp.GROUP_THREADS


def inputs(N, V, seed=0, scale=8.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, V)) * scale).astype(np.float32)
    temps = rng.uniform(0.4, 0.8, N).astype(np.float32)
    u = rng.uniform(1e-7, 1, (N, V)).astype(np.float32)
    return logits, temps, u


def run_cpu(logits, temps, u, cap, threads=T):
    N, V = logits.shape
    out = cpu.run(vp.SPEC, {"logits": logits, "temps": temps, "uniforms": u, "params": np.array([cap], np.float32)},
                  {"stats": N * 3, "ids": N * 2}, {"V": V, "GROUP_THREADS": threads}, N, threads)  # fmt: skip
    return out["stats"].reshape(N, 3), out["ids"].reshape(N, 2)


@pytest.mark.parametrize("N,V,cap", [(3, 1000, 30.0), (2, 256, 0.0), (1, 4099, 30.0), (4, 77, 30.0), (2, 32768, 0.0)])
def test_cpu_expansion_equals_the_reference(N, V, cap):
    """V below, at and not a multiple of the group size; with and without the softcap; temperatures 0.4-0.8."""
    logits, temps, u = inputs(N, V, seed=V)
    stats, ids = run_cpu(logits, temps, u, cap)
    rs, ri = vp.reference(mx.array(logits), mx.array(temps), mx.array(u), cap)
    np.testing.assert_allclose(stats, np.array(rs), rtol=2e-6, atol=2e-5)
    np.testing.assert_array_equal(ids, np.array(ri))


def test_ties_take_the_first_index_and_small_groups_work():
    logits = np.zeros((2, 300), np.float32)
    logits[0, [7, 200]] = 5.0  # a tie across threads: the first index wins, as argmax does
    temps, u = np.ones(2, np.float32), np.full((2, 300), 0.5, np.float32)
    for threads in (256, 32, 2):
        stats, ids = run_cpu(logits, temps, u, 0.0, threads)
        assert ids[0].tolist() == [7, 7] and ids[1].tolist() == [0, 0]
        np.testing.assert_allclose(stats[1], [0.0, np.log(300), np.log(300)], rtol=1e-6)


def test_reference_equals_the_unfused_sampler_and_transformers():
    logits, temps, u = inputs(3, 5000, seed=1)
    x = mx.array(logits)
    stats, ids = vp.reference(x, mx.array(temps), mx.array(u), 30.0)
    scaled = (30.0 * mx.tanh(x / 30.0)) / mx.array(temps)[:, None]
    probs, h = sampling.softmax_entropy(scaled[None])  # today's one-pass softmax/entropy of the step
    np.testing.assert_allclose(np.array(stats[:, 2]), np.array(h[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(ids[:, 0]), np.array(mx.argmax(scaled, axis=-1)))
    np.testing.assert_allclose(np.array(mx.exp(scaled - stats[:, 1:2])), np.array(probs[0]), rtol=1e-5, atol=1e-9)
    t = torch.tensor(np.array(scaled))
    np.testing.assert_allclose(np.array(stats[:, 2]), torch.distributions.Categorical(logits=t).entropy().numpy(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.array(stats[:, 1]), torch.logsumexp(t, -1).numpy(), rtol=1e-6)
    # the sample is Gumbel-max with the given uniforms: over many draws, the softmax's frequencies
    small = mx.array(np.log(np.array([[0.5, 0.3, 0.2]], np.float32)))
    draws = np.random.default_rng(2).uniform(1e-7, 1, (20000, 3)).astype(np.float32)
    _, sid = vp.reference(mx.broadcast_to(small, (20000, 3)), mx.ones(20000), mx.array(draws), 0.0)
    freq = np.bincount(np.array(sid[:, 1]), minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.015)


def test_cuda_expansion_compiles_with_nvrtc_and_a_planted_error_fails():
    if sys.platform == "darwin":
        pytest.skip("NVRTC has no macOS build")
    source = cuda_translation_unit(vp.SPEC, {"V": 262_144, "GROUP_THREADS": T})
    ok, ptx = checks.nvrtc_compile(source)
    assert ok and ".entry custom_kernel_vocab_pass" in ptx and "bar.sync" in ptx
    ok, log = checks.nvrtc_compile(source.replace("BARRIER();", "BARRIER()", 1))
    assert not ok and "error" in log
    ok, log = checks.nvrtc_compile(source.replace("TANHF(x / cap)", "TANHF(x / cap, 1)"))
    assert not ok


def test_metal_expansion_passes_the_syntax_check_and_a_planted_error_fails():
    source = metal_translation_unit(vp.SPEC, {"V": 262_144, "GROUP_THREADS": T})
    ok, log = checks.metal_syntax_check(source)
    assert ok, log
    assert not checks.metal_syntax_check(source.replace("threadgroup_barrier", "threadgroup_barier"))[0]
    assert not checks.metal_syntax_check(source.replace("s_best[t] = s_best[o];", "s_best[t] = s_bst[o];"))[0]


def test_the_dispatcher_falls_back_to_the_reference(monkeypatch):
    logits, temps, u = inputs(2, 500)
    args = (mx.array(logits), mx.array(temps), mx.array(u), 30.0)
    want = vp.reference(*args)
    assert kernels.target() == "reference"  # the CPU: no GPU kernel target
    got = kernels.vocab_pass(*args)
    assert all(mx.array_equal(a, b) for a, b in zip(got, want))
    monkeypatch.setenv("MLX_DIFFGEMMA_KERNELS", "0")
    assert not kernels.enabled() and kernels.target() == "reference"
    with pytest.raises(RuntimeError, match="MLX_DIFFGEMMA_KERNELS=0"):
        kernels.selfcheck()
    monkeypatch.setenv("MLX_DIFFGEMMA_KERNELS", "1")
    monkeypatch.setattr(kernels, "target", lambda: "metal")  # as on a Mac that never ran the self-check
    monkeypatch.setattr(kernels, "_VERDICTS", {})
    assert not kernels.use_kernel("vocab_pass")
    monkeypatch.setattr(kernels, "_VERDICTS", {"vocab_pass": False})
    assert not kernels.use_kernel("vocab_pass")


def test_selfcheck_says_why_it_cannot_run_here():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "mlx_diffgemma", "selfcheck"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 1 and "no GPU kernel target here" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "N,V,H,cap", [(3, 1000, 96, 30.0), (2, 300, 600, 0.0), (1, 77, 2816, 30.0), (2, 512, 256, 30.0)]
)
def test_soft_embed_cpu_expansion_equals_the_reference(N, V, H, cap):
    """V not a multiple of the tile, H below, at and above the group size (several columns per thread); the
    softcap and temperature applied as the logits are read."""
    rng = np.random.default_rng(V + H)
    logits = (rng.standard_normal((N, V)) * 8).astype(np.float32)
    temps = rng.uniform(0.4, 0.8, N).astype(np.float32)
    lse = np.array(mx.logsumexp(vp.scaled(mx.array(logits), mx.array(temps), cap), axis=-1))
    table = rng.standard_normal((V, H)).astype(np.float32)
    feed = {"logits": logits, "temps": temps, "lses": lse, "table": table, "params": np.array([cap], np.float32)}
    out = cpu.run(sc.SPEC, feed, {"out": N * H}, {"V": V, "H": H, "GROUP_THREADS": T}, N, T)["out"].reshape(N, H)
    want = sc.reference(*map(mx.array, (logits, temps, lse, table)), cap)
    np.testing.assert_allclose(out, np.array(want), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_the_dispatchers_kernel_path_takes_each_dtype(dtype, monkeypatch):
    """Through the dispatcher with the CPU expansions standing in for a GPU: logits and tables in the model's
    dtype (the kernels read float32 logits and a table in its own dtype) give the reference's results."""
    rng = np.random.default_rng(0)
    N, V, H, cap = 5, 700, 96, 30.0
    logits = mx.array((rng.standard_normal((N, V)) * 8).astype(np.float32)).astype(dtype)
    temps = mx.array(rng.uniform(0.4, 0.8, N).astype(np.float32))
    u = mx.array(rng.uniform(1e-7, 1, (N, V)).astype(np.float32))
    table = mx.array((rng.standard_normal((V, H)) * 0.02).astype(np.float32)).astype(dtype)
    monkeypatch.setenv("MLX_DIFFGEMMA_KERNELS", "cpu")
    stats, ids = kernels.vocab_pass(logits, temps, u, cap)
    want_stats, want_ids = vp.reference(logits, temps, u, cap)
    np.testing.assert_allclose(np.array(stats), np.array(want_stats), rtol=1e-5, atol=2e-5)
    assert mx.array_equal(ids, want_ids)
    soft = kernels.soft_embed(logits, temps, stats[:, 1], table, cap)
    want = sc.reference(logits, temps, stats[:, 1], table, cap)
    np.testing.assert_allclose(np.array(soft), np.array(want), rtol=1e-5, atol=1e-6)


def test_soft_embed_reference_is_the_models_self_conditioning_input(checkpoint):
    from mlx_diffgemma.loading import load_model

    model = load_model(checkpoint("basic"))
    V = model.args.vocab_size
    raw = mx.array(np.random.default_rng(0).normal(0, 40, (1, 5, V)).astype(np.float32))
    temps = mx.array([[0.4, 0.5, 0.6, 0.7, 0.8]], dtype=mx.float32)
    cap = model.args.final_logit_softcapping
    z = mx.tanh(raw / cap) * cap / temps[..., None]
    want = model.soft_embed(z)[0]  # softmax, then the table, times sqrt(hidden)
    lse = mx.logsumexp(z[0], axis=-1)
    got = kernels.soft_embed(raw[0], temps[0], lse, model.embed_tokens.weight, cap) * model.args.embed_scale
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(model.soft_embed_logits(raw, temps, lse[None])[0]), np.array(want), rtol=1e-5,
                               atol=1e-6)  # fmt: skip


def test_soft_embed_compiles_for_cuda_and_metal_and_planted_errors_fail():
    consts = {"V": 262_144, "H": 2816, "GROUP_THREADS": T}
    metal = metal_translation_unit(sc.SPEC, consts)
    assert checks.metal_syntax_check(metal)[0]
    assert not checks.metal_syntax_check(metal.replace("s_p[t] =", "s_q[t] =", 1))[0]
    if sys.platform != "darwin":
        cuda = cuda_translation_unit(sc.SPEC, consts)
        ok, ptx = checks.nvrtc_compile(cuda)
        assert ok and "bar.sync" in ptx
        assert not checks.nvrtc_compile(cuda.replace("float acc[16];", "float acc[16]"))[0]


# ---- the kernels in generation ------------------------------------------------------------------------------


def test_a_fused_step_equals_the_reference_step(monkeypatch):
    """One denoising step from the same raw logits and key, through the kernels (the CPU expansions) and through
    the reference: the same sampled canvas, argmax, acceptance, stop and history, and the same self-conditioning
    input, at temperatures where the draw is far from the argmax."""
    from mlx_diffgemma.generate import _make_fused_step_fn, _make_step_fn, settings
    from mlx_diffgemma.loading import load_model

    monkeypatch.setenv("MLX_DIFFGEMMA_KERNELS", "cpu")
    model = load_model("demo")
    B, C, V = 2, model.canvas_length, model.args.vocab_size
    cap = model.args.final_logit_softcapping
    g = settings(model, entropy_bound=8.0)  # most positions accepted: most of the canvas is sampled
    raw = mx.array(np.random.default_rng(1).normal(0, 6, (B, C, V)).astype(np.float32))
    canvas = mx.array(np.random.default_rng(2).integers(0, V, (B, C)).astype(np.int32))
    history = sampling.new_history(g.stability_threshold, B, C)
    temp = mx.array(1.5, dtype=mx.float32)
    key = mx.random.key(7)
    want = _make_step_fn(g, V)(mx.tanh(raw / cap) * cap, canvas, history, temp, key)
    got = _make_fused_step_fn(g, V, cap)(raw, canvas, history, temp, key)
    argmax = want[1]
    assert float((want[0] != argmax).mean()) > 0.3  # the samples are not just the argmax
    for i in (0, 1, 3, 4, 5):  # canvas, argmax, mask, stop, history
        assert mx.array_equal(got[i], want[i]), i
    soft = model.soft_embed_logits(*got[2])
    np.testing.assert_allclose(np.array(soft), np.array(model.soft_embed_probs(want[2])), rtol=1e-4, atol=1e-5)


def test_the_same_seed_gives_the_same_tokens_with_kernels_off_and_on(monkeypatch):
    """Whole generations of the demo model, alone and batched (rows with their own settings, one with top-k
    self-conditioning), with the kernels forced off and with every kernel run (the CPU expansions: the logic the
    GPU runs): token for token and step for step the same; and the kernels did run."""
    from mlx_diffgemma import load
    from mlx_diffgemma.batch import Request, generate_batch
    from mlx_diffgemma.demo import HELD_OUT_SEED, examples
    from mlx_diffgemma.generate import Commit, generate_step, render_prompt, settings

    model, tok = load("demo")
    prompts = [render_prompt(tok, p) for p, _ in examples(3, HELD_OUT_SEED + 1)]
    plans = [settings(model), settings(model, sc_top_k=16), settings(model, t_max=1.0, entropy_bound=0.5)]

    def run():
        alone = [
            [(e.tokens, e.steps) for e in generate_step(model, mx.array([ids]), plans[i], 48, key=mx.random.key(i))
             if isinstance(e, Commit)]
            for i, ids in enumerate(prompts)
        ]  # fmt: skip
        together = {}
        reqs = [Request(ids, plans[i], 16 + 16 * i, mx.random.key(10 + i), tag=i) for i, ids in enumerate(prompts)]
        for tag, e in generate_batch(model, reqs):
            if isinstance(e, Commit):
                together.setdefault(tag, []).append((e.tokens, e.steps))
        return alone, together

    monkeypatch.setenv("MLX_DIFFGEMMA_KERNELS", "0")
    off = run()
    launched = []
    real = kernels._on_cpu
    monkeypatch.setattr(kernels, "_on_cpu", lambda op, *a: launched.append(op) or real(op, *a))
    monkeypatch.setenv("MLX_DIFFGEMMA_KERNELS", "cpu")
    assert kernels.target() == "cpu"
    assert run() == off
    assert {"vocab_pass", "soft_embed", "route"} <= set(launched)


# ---- top-k self-conditioning (opt-in) ----------------------------------------------------------------------


def test_top_k_self_conditioning_converges_to_exact_and_reports_what_it_drops(checkpoint, tmp_path):
    from mlx_diffgemma.convert import convert, resolve
    from mlx_diffgemma.generate import prefill
    from mlx_diffgemma.loading import load_model

    q4 = convert(checkpoint("tamed"), tmp_path / "q4", resolve(None, True, 4, None, None), log=lambda s: None)
    for model in (load_model(checkpoint("tamed")), load_model(q4)):  # a quantized table: rows dequantized
        V = model.args.vocab_size
        probs = mx.softmax(mx.array(np.random.default_rng(0).normal(0, 4, (1, 6, V)).astype(np.float32)), axis=-1)
        exact = model.soft_embed_probs(probs)
        full, dropped = model.soft_embed_top_k(probs, V)
        np.testing.assert_allclose(np.array(full), np.array(exact), rtol=1e-4, atol=1e-4)
        assert float(mx.abs(dropped).max()) < 1e-5
        soft, dropped = model.soft_embed_top_k(probs, 8)
        kept = mx.sort(probs, axis=-1)[..., -8:].sum(axis=-1)
        np.testing.assert_allclose(np.array(dropped), np.array(1 - kept), atol=1e-6)
        cache = model.make_cache()
        prefill(model, mx.array([[5, 6, 7, 8, 9]]), cache)
        canvas = mx.array([list(range(10, 10 + model.canvas_length))])
        sc = mx.repeat(probs[:, :1], model.canvas_length, axis=1)
        a = model.denoise(canvas, cache, self_conditioning_probs=sc)
        b = model.denoise(canvas, cache, self_conditioning_probs=sc, sc_top_k=V)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-3)


def test_top_k_self_conditioning_in_generation_and_batches():
    from mlx_diffgemma import load
    from mlx_diffgemma.batch import Request, generate_batch
    from mlx_diffgemma.generate import Commit, generate_step, render_prompt, settings

    model, tok = load("demo")
    ids = [render_prompt(tok, p) for p in ("Sort: 3 1 2", "Add: 4 + 5", "Reverse: a b c")]
    plans = [settings(model, sc_top_k=16), settings(model), settings(model, sc_top_k=64)]

    def alone(i):
        ev = generate_step(model, mx.array([ids[i]]), plans[i], 32, key=mx.random.key(i))
        return [(e.tokens, e.steps) for e in ev if isinstance(e, Commit)]

    got = {}
    for tag, e in generate_batch(model, [Request(ids[i], plans[i], 32, mx.random.key(i), tag=i) for i in range(3)]):
        if isinstance(e, Commit):
            got.setdefault(tag, []).append((e.tokens, e.steps))
    assert got == {i: alone(i) for i in range(3)}  # rows that embed the signal differently, side by side
    with pytest.raises(Exception, match="sc_top_k"):
        settings(model, sc_top_k=0)


# ---- routing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,E,K", [(100, 128, 8), (7, 16, 4), (65, 8, 2)])
def test_routing_cpu_expansion_equals_the_reference(N, E, K):
    """Tokens not a multiple of the group; ties (the lower expert first)."""
    rng = np.random.default_rng(N)
    logits = rng.standard_normal((N, E)).astype(np.float32)
    logits[0, :4] = 5.0  # a four-way tie at the top
    scales = rng.uniform(0.5, 1.5, E).astype(np.float32)
    R = rt.GROUP_THREADS
    out = cpu.run(rt.SPEC, {"logits": logits, "scales": scales}, {"ids": N * K, "weights": N * K},
                  {"N": N, "E": E, "K": K, "GROUP_THREADS": R}, -(-N // R), R)  # fmt: skip
    ids, weights = rt.reference(mx.array(logits), mx.array(scales), K)
    np.testing.assert_array_equal(out["ids"].reshape(N, K), np.array(ids))
    np.testing.assert_allclose(out["weights"].reshape(N, K), np.array(weights), atol=1e-6)
    assert np.array(ids)[0, :4].tolist() == [0, 1, 2, 3] or K < 4


def test_routing_reference_is_the_models_router(checkpoint):
    from mlx_diffgemma.loading import load_model

    model = load_model(checkpoint("two_full"))
    router = model.layers[1].router
    x = mx.array(np.random.default_rng(0).normal(size=(40, model.args.hidden_size)).astype(np.float32))
    idx, w = router(x)
    logits = router.proj(mx.fast.rms_norm(x, None, router.eps) * router.scale * router.root)
    ids, weights = kernels.route(logits, router.per_expert_scale, router.top_k)
    for n in range(40):  # the router's top-k comes unordered (argpartition): compare as expert -> weight
        want = dict(zip(np.array(idx[n]).tolist(), np.array(w[n]).tolist()))
        got = dict(zip(np.array(ids[n]).tolist(), np.array(weights[n]).tolist()))
        assert want.keys() == got.keys() and all(abs(want[e] - got[e]) < 1e-6 for e in want)


def test_routing_compiles_for_cuda_and_metal_and_planted_errors_fail():
    consts = {"N": 4096, "E": 128, "K": 8, "GROUP_THREADS": rt.GROUP_THREADS}
    metal = metal_translation_unit(rt.SPEC, consts)
    assert checks.metal_syntax_check(metal)[0]
    assert not checks.metal_syntax_check(metal.replace("chosen_sum += p;", "chosen_sum += q;"))[0]
    if sys.platform != "darwin":
        cuda = cuda_translation_unit(rt.SPEC, consts)
        assert checks.nvrtc_compile(cuda)[0]
        assert not checks.nvrtc_compile(cuda.replace("int best = -1;", "int best = -1"))[0]
