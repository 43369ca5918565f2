"""mlx_diffgemma convert: every recipe round-trips through load; sizes as planned; bad input; mlx-vlm folders."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

import mlx_diffgemma.convert as conv
from mlx_diffgemma import load
from mlx_diffgemma.cli import app
from mlx_diffgemma.config import ModelConfig
from mlx_diffgemma.convert.quality import dequantized, logit_metrics
from mlx_diffgemma.convert.safetensors_io import read_header

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def logits(model, seed=0):
    """Denoising logits (with self-conditioning) after a prompt longer than the window, batch 2."""
    rng = np.random.default_rng(seed)
    V, C = model.args.vocab_size, model.canvas_length
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, V, (2, model.args.sliding_window + 5))), cache)
    canvas = mx.array(rng.integers(0, V, (2, C)))
    first = model.denoise(canvas, cache)
    return np.array(model.denoise(canvas, cache, first))


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {
        name: conv.convert(checkpoint("tamed"), root / name, r, dtype="float32", log=lambda s: None)
        for name, r in conv.RECIPES.items()
    }


@pytest.mark.parametrize("recipe", list(conv.RECIPES))
def test_recipe_round_trip(converted, checkpoint, recipe):
    """The converted model computes what its dequantized weights compute (proves the quantized path), and
    unquantized weights arrive unchanged."""
    model, _ = load(converted[recipe])
    got = logits(model)
    twin = logits(dequantized(model))
    assert np.abs(got - twin).max() <= 3e-4
    source, _ = load(checkpoint("tamed"))
    if recipe == "bf16":
        np.testing.assert_array_equal(got, logits(source))


def test_more_bits_less_error(converted, checkpoint):
    """Quality itself cannot be judged on random weights (benchmarks/quant_quality.py reports it); the order
    of the errors can."""
    reference = logits(load(checkpoint("tamed"))[0])
    err = {r: logit_metrics(logits(load(converted[r])[0]), reference)["rel_rms"] for r in ("q8", "q4", "mac16")}
    assert err["q8"] < err["q4"] < err["mac16"], err


def test_quantization_block_records_the_recipe(converted):
    q = json.loads((converted["mac16"] / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (3, 128, "affine")
    assert q["layers.0.experts.gate_up_proj"] == {"group_size": 64, "bits": 3, "mode": "affine"}  # 64 in-dims
    assert q["layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert q["layers.0.router.proj"] is False
    model, _ = load(converted["mac16"])
    assert (model.layers[0].experts.gate_up_proj.bits, model.embed_tokens.bits) == (3, 4)
    assert not hasattr(model.layers[0].router.proj, "scales")
    mx_q = json.loads((converted["mxfp4"] / "config.json").read_text())["quantization"]
    assert mx_q["mode"] == "mxfp4" and mx_q["embed_tokens"]["mode"] == "affine"


def test_payload_as_planned_and_files_within_one_percent(checkpoint, converted, tmp_path):
    from mlx_diffgemma import reference as ref

    wide = ref.Fixture(
        "wide",
        {
            **ref.FIXTURES["basic"].text,
            "vocab_size": 8192,
            "hidden_size": 256,
            "intermediate_size": 512,
            "moe_intermediate_size": 256,
            "head_dim": 64,
            "global_head_dim": 128,
        },
    )
    path = ref.build_checkpoint(tmp_path / "wide", wide)  # tens of MB: headers are a small fraction, as for real
    src = conv.inspect_source(path)
    for name, recipe in conv.RECIPES.items():
        out = conv.convert(path, tmp_path / name, recipe, log=lambda s: None)
        plan = conv.plan.make_plan(src.text, src.vision, recipe, mx.float32)
        written = sum(t.end - t.start for f in out.glob("*.safetensors") for t in read_header(f).values())
        files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        assert written == plan.payload()
        assert files <= 1.01 * plan.payload(), (name, files, plan.payload())
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == written
    assert {p.name for p in converted["q4"].iterdir()} >= {
        "config.json",
        "generation_config.json",
        "README.md",
        "model.safetensors",
        "model.safetensors.index.json",
    }


def test_plan_from_config_alone_equals_plan_from_headers(checkpoint):
    src = conv.inspect_source(checkpoint("two_full"))
    config = ModelConfig.from_file(checkpoint("two_full") / "config.json")
    for r in conv.RECIPES.values():
        from_headers = conv.plan.make_plan(src.text, {}, r, mx.bfloat16)
        from_config = conv.plan_for_config(config, r, mx.bfloat16)
        assert [(i.name, i.outputs) for i in from_headers.items] == [(i.name, i.outputs) for i in from_config.items]
        assert from_headers.quantization == from_config.quantization


def test_real_config_sizes():
    """The published 26B-A4B shapes: the default 4-bit recipe fits 16 GB, the 16 GB-Mac recipe 11.5 GB."""
    config = ModelConfig.from_file(REPO / "benchmarks/configs/diffusiongemma-26b-a4b/config.json")
    sizes = {n: conv.plan_for_config(config, r).payload() / 1e9 for n, r in conv.RECIPES.items()}
    assert sizes["q4"] <= 16 and sizes["mac16"] <= 11.5 and 48 <= sizes["bf16"] <= 52, sizes
    r = runner.invoke(
        app, ["convert", "--hf-path", str(REPO / "benchmarks/configs/diffusiongemma-26b-a4b"), "--report"]
    )
    assert r.exit_code == 0 and f"| q4 | {sizes['q4']:.2f} GB |" in r.output


def test_sharded_output(checkpoint, tmp_path):
    out = conv.convert(
        checkpoint("basic"), tmp_path / "sharded", conv.RECIPES["q4"], shard_bytes=200_000, log=lambda s: None
    )
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    model, _ = load(out)
    assert np.abs(logits(model) - logits(dequantized(model))).max() <= 3e-4


def _no_leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if name in p.name]


def cli(*args):
    return runner.invoke(app, ["convert", *map(str, args)])


def test_bad_input_one_line_and_nothing_left(checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(checkpoint("basic"), src)
    dst = tmp_path / "out"

    def check(result, code, message):
        assert result.exit_code == code, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
        assert _no_leftovers(tmp_path, "out") == []

    check(cli("--hf-path", src, "--mlx-path", dst, "-q", "--q-mode", "int3"), 2, "unknown quantization mode 'int3'")
    check(cli("--hf-path", src, "--mlx-path", dst, "-q", "--q-bits", "7"), 2, "--q-bits must be one of")
    check(cli("--hf-path", src, "--mlx-path", dst, "--recipe", "tiny"), 2, "unknown recipe 'tiny'")
    check(cli("--hf-path", tmp_path / "nope", "--mlx-path", dst), 1, "does not exist")

    # truncated weights
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    check(cli("--hf-path", src, "--mlx-path", dst, "-q"), 1, "model.safetensors is truncated")

    # a wrong shape
    from safetensors.numpy import load_file, save_file

    (src / "model.safetensors").write_bytes(data)
    w = load_file(str(src / "model.safetensors"))
    w["model.decoder.norm.weight"] = np.ones(65, np.float32)
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    check(cli("--hf-path", src, "--mlx-path", dst), 1, "1 weights with the wrong shape: model.decoder.norm.weight")

    # a missing shard named by the index
    sharded = tmp_path / "sharded_src"
    from transformers import DiffusionGemmaForBlockDiffusion

    DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint("basic")).save_pretrained(
        sharded, max_shard_size="100KB"
    )
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    check(cli("--hf-path", sharded, "--mlx-path", dst), 1, "missing shards named in its index")


def test_existing_destination_needs_force(checkpoint, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    r = cli("--hf-path", checkpoint("basic"), "--mlx-path", dst, "-q")
    assert r.exit_code == 1 and r.output.strip() == f"error: {dst} exists; pass --force to replace it"
    assert (dst / "keep.txt").exists()
    r = cli("--hf-path", checkpoint("basic"), "--mlx-path", dst, "-q", "--force")
    assert r.exit_code == 0, r.output
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert _no_leftovers(tmp_path, "out") == ["out"]
    load(dst)


def test_interrupted_conversion_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    calls = []
    real = conv._write_item

    def interrupt(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(conv, "_write_item", interrupt)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(checkpoint("basic"), tmp_path / "out", conv.RECIPES["q4"], log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_mlx_vlm_conversion_loads():
    """A tiny checkpoint converted by mlx-vlm 0.7.10 (tests/tools/make_mlx_vlm_fixture.sh): its names and its
    quantization block map onto ours; its weights are the source's, quantized."""
    root = REPO / "tests/data/mlx_vlm-0.7.10"
    model, _ = load(root / "q4")
    assert np.abs(logits(model) - logits(dequantized(model))).max() <= 3e-4
    source, _ = load(root / "hf")
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(dequantized(model).parameters()))
    for name, w in tree_flatten(source.parameters()):
        err = float(mx.abs(ours[name] - w).max() / (mx.abs(w).max() + 1e-12))
        quantized = name.endswith("proj.weight") or name == "embed_tokens.weight"
        assert err < (0.2 if quantized else 1e-6), (name, err)
