import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from mlx_diffgemma import load
from mlx_diffgemma.loading import LoadError
from mlx_diffgemma.parity import MLXEngine, make_inputs, trajectory


def _logits(path):
    x = make_inputs(512, 16, 2, 10, 1, seed=3)
    return trajectory(MLXEngine(path), x)["denoise + self-cond"][0]


def _rewrite_weights(src, dst, edit):
    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    save_file(edit(w), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_load_returns_model_and_no_tokenizer(checkpoint):
    model, tok = load(checkpoint("basic"))
    assert tok is None  # the tiny fixture ships no tokenizer
    assert model.canvas_length == 16
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    b16, _ = load(checkpoint("basic"), dtype="bfloat16")
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(b16.parameters()))
    # the two layer scalars are separate weights
    l0 = model.layers[0]
    assert float(l0.layer_scalar[0]) != float(l0.encoder_layer_scalar[0])


def test_sharded_checkpoint_with_index(checkpoint, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    src = checkpoint("basic")
    DiffusionGemmaForBlockDiffusion.from_pretrained(src).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    np.testing.assert_array_equal(_logits(tmp_path / "sharded"), _logits(src))


def test_shared_weights_stored_on_the_encoder_side(checkpoint, tmp_path):
    """A checkpoint that keeps the shared layers under model.encoder.language_model loads the same model."""

    def move(w):
        out = {}
        for k, v in w.items():
            shared = k.startswith("model.decoder.") and "self_conditioning" not in k and not k.endswith("layer_scalar")
            out[k.replace("model.decoder.", "model.encoder.language_model.") if shared else k] = v
        return out

    path = _rewrite_weights(checkpoint("basic"), tmp_path / "enc", move)
    np.testing.assert_array_equal(_logits(path), _logits(checkpoint("basic")))


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda w: {k: v for k, v in w.items() if not k.endswith("layers.2.router.proj.weight")},
            r"1 missing \(layers.2.router.proj.weight\)",
        ),
        (
            lambda w: {**w, "model.decoder.layers.0.surprise": np.zeros(3, np.float32)},
            r"1 unexpected \(layers.0.surprise\)",
        ),
        (lambda w: {**w, "model.decoder.norm.weight": np.zeros(7, np.float32)}, r"norm.weight \(7,\) != \(64,\)"),
    ],
)
def test_weight_mismatches_are_named(checkpoint, tmp_path, edit, message):
    path = _rewrite_weights(checkpoint("basic"), tmp_path / "bad", edit)
    with pytest.raises(LoadError, match=message):
        load(path)


def test_folder_errors(checkpoint, tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load(tmp_path / "nowhere")
    other = tmp_path / "other"
    shutil.copytree(checkpoint("basic"), other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(LoadError, match="model_type is 'llama'"):
        load(other)
    pickled = tmp_path / "pickled"
    shutil.copytree(checkpoint("basic"), pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(LoadError, match="pickled weights are not loaded"):
        load(pickled)
    with pytest.raises(LoadError, match="unknown dtype"):
        load(checkpoint("basic"), dtype="int3")


def test_repo_id_from_local_hf_cache(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    snap = tmp_path / "hub" / "models--tiny--diffusiongemma" / "snapshots" / "0123abcd"
    shutil.copytree(checkpoint("basic"), snap)
    (tmp_path / "hub" / "models--tiny--diffusiongemma" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--diffusiongemma" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = load("tiny/diffusiongemma")
    assert model.canvas_length == 16
    with pytest.raises(LoadError, match="tiny/absent is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load("tiny/absent")
