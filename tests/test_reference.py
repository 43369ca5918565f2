"""The reference path: `reference` records transformers' numbers and generations with shared noise, `parity
--against` replays them through our model (any conversion of it), `export` writes our models back in the Hugging
Face layout. Everything runs here on the CPU, as it would on an NVIDIA box and a Mac."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_diffgemma import noise, parity
from mlx_diffgemma import reference as ref
from mlx_diffgemma.convert import convert, resolve
from mlx_diffgemma.convert.export import export
from mlx_diffgemma.demo import HELD_OUT_SEED, examples
from mlx_diffgemma.files import OutputError
from mlx_diffgemma.generate import Commit, generate_step, settings
from mlx_diffgemma.loading import DEMO, load_model

# Float32 against float32: the same bound as the fixture parity tests (tests/test_parity.py).
FLOAT32_MAX_ABS = 2e-4
# A conversion's KL(reference || ours) per position, mean over a stage, must stay below a tenth of what the model
# knows there: KL(reference || uniform) = log V - H(reference), the KL of a model that predicts nothing. A 4-bit
# conversion of the trained demo model keeps 99.6-99.99% of it per stage (demo v2, 32 prompts; v1 kept 96-100%),
# and unrelated weights of the same shape lose all of it. (On
# random checkpoints the outputs are nearly uniform, so there is almost nothing to keep and KL cannot tell a
# 4-bit conversion from an unrelated model: the demo model is the fixture.)
KEPT_INFORMATION = 0.9


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma", *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture(scope="module")
def tamed_ref(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "tamed.ref"
    ref.record(checkpoint("tamed"), out, dtype="float32")
    return out


def test_shared_noise_is_the_same_in_numpy_and_mlx():
    for keys in (noise.stream_key(0, noise.SAMPLE, 0, 1), noise.stream_key(2**32 - 1, noise.RENOISE, 7, 48)):
        u_np, u_mx = noise.uniform_np(keys, (3, 5, 1001)), np.array(noise.uniform_mx(keys, (3, 5, 1001)))
        assert u_np.dtype == u_mx.dtype == np.float32 and np.array_equal(u_np, u_mx)
        assert 0 < u_np.min() and u_np.max() < 1 and abs(u_np.mean() - 0.5) < 0.01 and abs(u_np.std() - 0.2887) < 0.01
        t_np, t_mx = noise.tokens_np(keys, (4, 300), 262_144), np.array(noise.tokens_mx(keys, (4, 300), 262_144))
        assert np.array_equal(t_np, t_mx) and t_np.max() < 262_144
    streams = {noise.stream_key(0, p, b, s) for p in range(5) for b in range(4) for s in range(50)}
    assert len(streams) == 5 * 4 * 50  # every (purpose, block, step) its own stream


def test_generation_takes_its_noise_from_the_hook():
    model = load_model(DEMO)
    g = settings(model, t_min=1.0, t_max=1.5)  # hotter: the demo answers these ids with EOS at its own settings
    prompt = mx.array([[2, 10, 11, 12, 13]])

    def run(seed):
        events = list(generate_step(model, prompt, g, 32, noise=noise.CounterNoise(seed, model.args.vocab_size)))
        return [(e.tokens, e.steps) for e in events if isinstance(e, Commit)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_float32_replay_is_identical(checkpoint, tamed_ref):
    header = parity.read_header(tamed_ref)
    assert header["format"] == parity.FORMAT and header["architecture"] and len(header["prompts"]) == 2
    r = parity.compare(checkpoint("tamed"), tamed_ref)
    assert set(r["stages"]) == set(parity.STAGES)
    for stage, s in r["stages"].items():
        assert s["max_abs"] < FLOAT32_MAX_ABS and s["top1"] == 1.0 and s["kl_mean"] < 1e-9, stage
    assert all(g["identical"] and g["steps_ours"] == g["steps_reference"] for g in r["generations"])
    assert "identical" in parity.format_comparison(r)


def information(ref_file) -> dict[str, float]:
    """Per stage, the mean over positions of log V - H(reference): the KL from the uniform distribution."""
    arrays = {k: np.array(v, dtype=np.float64) for k, v in mx.load(str(ref_file), format="safetensors").items()}
    out = {}
    for stage in parity.STAGES:
        rows = [a[0] for k, a in arrays.items() if k.startswith("p") and f".{parity.slug(stage)}." in k]
        x = np.concatenate(rows)
        lp = x - (x.max(-1, keepdims=True) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)))
        out[stage] = float(np.mean(np.log(x.shape[-1]) + (np.exp(lp) * lp).sum(-1)))
    return out


def test_four_bit_costs_a_bounded_kl(demo_ref, tmp_path):
    hf, ref_file = demo_ref
    q4 = convert(hf, tmp_path / "q4", resolve(None, True, 4, None, None), log=lambda s: None)
    info = information(ref_file)
    r = parity.compare(q4, ref_file)
    for stage, s in r["stages"].items():
        assert 0 < s["kl_mean"] < (1 - KEPT_INFORMATION) * info[stage], (stage, s["kl_mean"], info[stage])
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    for f in hf.iterdir():
        (unrelated / f.name).write_bytes(f.read_bytes())
    model = load_model(unrelated)
    model.update(tree_map(lambda w: w[..., ::-1] if w.ndim == 2 else w, model.parameters()))  # same numbers, rewired
    mx.save_safetensors(str(unrelated / "model.safetensors"), dict(tree_flatten(model.parameters())))
    for stage, s in parity.compare(unrelated, ref_file)["stages"].items():
        assert s["kl_mean"] > (1 - KEPT_INFORMATION) * info[stage], stage


def test_real_vocabulary_stores_top_k_and_replays(chat_checkpoint, tmp_path):
    """A 262,144-token vocabulary: the file keeps the top 64 logits and the log-sum-exp per position (not 67 MB
    a stage), and the comparison still gives top-1 and KL; the chat template renders the default prompts."""
    out = tmp_path / "chat.ref"
    header = ref.record(chat_checkpoint, out, dtype="float32", max_tokens=16, full_logits=False)
    assert [p["logits"] for p in header["prompts"]] == ["top-k"] * len(ref.DEFAULT_PROMPTS)
    assert out.stat().st_size < 20e6
    r = parity.compare(chat_checkpoint, out)
    for stage, s in r["stages"].items():
        assert s["max_abs"] is None and s["top1"] == 1.0 and s["kl_mean"] < 1e-9, stage
    assert all(g["identical"] for g in r["generations"])


@pytest.fixture(scope="module")
def demo_ref(tmp_path_factory):
    """The demo model exported to the Hugging Face layout, and transformers' float32 reference of it over eight
    held-out prompts."""
    root = tmp_path_factory.mktemp("demo")
    hf = export("demo", root / "demo-hf", log=lambda s: None)
    prompts = [{"prompt": p} if isinstance(p, str) else {"messages": p} for p, _ in examples(8, HELD_OUT_SEED)]
    ref.record(hf, root / "demo.ref", dtype="float32", prompts=prompts)  # transformers loads the export
    return hf, root / "demo.ref"


def test_demo_exports_to_transformers_and_replays_identically(demo_ref):
    hf, out = demo_ref
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    ours, back = load_model(DEMO), load_model(hf)  # our loader reads the export as transformers' layout
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(back.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    r = parity.compare("demo", out)
    assert all(g["identical"] for g in r["generations"]), parity.format_comparison(r)
    assert all(s["max_abs"] < FLOAT32_MAX_ABS for s in r["stages"].values())


def test_export_of_a_quantized_model_is_what_it_computes(checkpoint, tmp_path):
    q4 = convert(checkpoint("tamed"), tmp_path / "q4", resolve(None, True, 4, None, None), log=lambda s: None)
    hf = export(q4, tmp_path / "q4-hf", log=lambda s: None)
    out = tmp_path / "q4.ref"
    ref.record(hf, out, dtype="float32", max_tokens=16)
    r = parity.compare(q4, out)
    assert all(s["max_abs"] < FLOAT32_MAX_ABS for s in r["stages"].values())


def test_shards_and_refusals(tmp_path):
    hf = export("demo", tmp_path / "sharded", shard_bytes=2_000_000, log=lambda s: None)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert load_model(hf).args.vocab_size == 384
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("x")
    r = cli("export", "--model", "demo", "--hf-path", mine)
    assert r.returncode == 1 and "--force" in r.stderr and (mine / "thesis.txt").read_text() == "x"
    assert cli("export", "--model", "demo", "--hf-path", hf).returncode == 0  # its own export: replaced


def test_command_line_and_its_errors(checkpoint, tamed_ref, tmp_path):
    model = checkpoint("tamed")
    prompts = tmp_path / "p.txt"
    prompts.write_text('{"ids": [2, 5, 9, 11]}\n\n{"ids": [3]}\n')
    out = tmp_path / "r.ref"
    r = cli("reference", "--model", model, "--out", out, "--prompts", prompts, "--dtype", "float32", "-m", 8)
    assert r.returncode == 0 and "2 prompts" in r.stdout, r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # written in one piece
    r = cli("parity", "--model", model, "--against", out, "--json")
    assert r.returncode == 0 and all(g["identical"] for g in json.loads(r.stdout)["generations"])

    def fails(*args, says, env=None):
        r = cli(*args, env=env)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()[-1]) < 400

    fails("parity", "--model", "demo", "--against", out, says="recorded from another model")
    fails("parity", "--model", model, "--against", tmp_path / "missing.ref", says="no reference file")
    fails("parity", "--model", model, "--against", prompts, says="not a reference file")
    fails("parity", "--model", model, says="give --model M --against REF_FILE, or --fixtures")
    fails("reference", "--model", model, "--out", prompts, says="--force")  # a user's file is not replaced
    assert prompts.read_text().startswith('{"ids"')
    fails("reference", "--model", model, "--out", out, "--device", "cuda", says="no CUDA device")
    fails("reference", "--model", tmp_path / "none", "--out", out, says="none")
    bad = tmp_path / "bad.txt"
    bad.write_text('{"ids": "12"}\n')
    fails("reference", "--model", model, "--out", out, "--prompts", bad, says="bad.txt:1")
    bad.write_text('{"ids": [999999]}\n')
    fails("reference", "--model", model, "--out", out, "--prompts", bad, says="token ids must lie in")
    bad.write_text("Hello there\n")
    fails("reference", "--model", model, "--out", out, "--prompts", bad, says="has no tokenizer")
    # a file from a later format version
    meta = {"mlx_diffgemma_reference": json.dumps({**parity.read_header(out), "version": 2})}
    arrays = {k: np.array(v) for k, v in mx.load(str(out), format="safetensors").items()}
    from safetensors.numpy import save_file

    save_file(arrays, str(tmp_path / "v2.ref"), metadata=meta)
    fails("parity", "--model", model, "--against", tmp_path / "v2.ref", says="version 2 reference file")
    # without torch: the reference command says how to install it; parity --against needs no torch
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('No module named torch')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    fails("reference", "--model", model, "--out", out, says="pip install 'mlx-diffgemma[reference]'", env=env)
    r = cli("parity", "--model", model, "--against", tamed_ref, env=env)
    assert r.returncode == 0 and "identical" in r.stdout, r.stderr


def test_parity_against_needs_no_torch():
    code = "import sys; sys.modules['torch'] = None; import mlx_diffgemma.parity, mlx_diffgemma.cli; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr


def test_the_model_is_never_the_output(checkpoint, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(checkpoint("tamed"), model)
    for out in (model / "model.safetensors", model, tmp_path):
        with pytest.raises(OutputError, match="reads"):
            ref.record(model, out, force=True)
