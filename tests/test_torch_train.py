"""The PyTorch trainer (torch_train): the MLX trainer's schedule and batches, checkpoints `load` reads, exact
resumption, and neither backend resuming the other's run."""

import json

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_diffgemma import load, torch_train, train


def data(n: int = 48, seed: int = 0):
    """Prompts longer than the fixture's sliding window, answers of one to three canvases."""
    rng = np.random.default_rng(seed)
    return [
        (list(rng.integers(3, 512, rng.integers(4, 20))), list(rng.integers(3, 512, rng.integers(3, 40))))
        for _ in range(n)
    ]


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_weights_cross_both_ways(checkpoint):
    model, _ = load(checkpoint("basic"))
    back = torch_train.from_torch(torch_train.to_torch(model))
    mine = weights(model)
    assert set(back) == set(mine)
    assert all(np.array_equal(np.array(back[k]), mine[k]) for k in mine)


def test_schedule_is_the_mlx_trainers():
    cfg = train.TrainConfig(steps=50, learning_rate=3e-3, warmup=10)
    mlx_schedule = optim.join_schedules(
        [optim.linear_schedule(3e-4, 3e-3, 10), optim.cosine_decay(3e-3, 40, 3e-4)],
        [10],
    )
    for step in range(60):
        assert torch_train.learning_rate(cfg, step) == pytest.approx(float(mlx_schedule(mx.array(step))), rel=1e-6)


def test_learns_checkpoints_and_resumes_exactly(checkpoint, tmp_path):
    path = checkpoint("basic")
    cfg = train.TrainConfig(steps=6, batch_size=8, learning_rate=3e-3, warmup=2, checkpoint_every=3, train_router=True)
    quiet = lambda s: None  # noqa: E731
    model, _ = load(path)
    before = weights(model)
    torch_train.train(model, data(), tmp_path / "whole", path, cfg, eos_id=1, log=quiet)
    torch_train.train(load(path)[0], data(), tmp_path / "split", path, cfg, eos_id=1, log=quiet, stop_after=3)
    torch_train.train(load(path)[0], data(), tmp_path / "split", path, cfg, eos_id=1, log=quiet)
    whole, split = (json.loads((tmp_path / d / "trainer/state.json").read_text()) for d in ("whole", "split"))
    assert whole["step"] == split["step"] == 6 and whole["backend"] == "torch"
    assert whole["losses"] == split["losses"]  # the resumed run drew the same batches and took the same steps
    assert whole["losses"][-1][1] < whole["losses"][0][1]
    saved = weights(load(tmp_path / "whole")[0])  # a checkpoint is a model folder
    assert all(np.array_equal(saved[k], v) for k, v in weights(load(tmp_path / "split")[0]).items())
    assert all(np.array_equal(saved[k], v) for k, v in weights(model).items())  # handed back to the MLX model
    changed = {k for k in before if not np.array_equal(before[k], saved[k])}
    assert changed == {k for k in before if not k.endswith("layer_scalar")}  # all but the layer scalars (buffers)
    with pytest.raises(ValueError, match="torch trainer"):  # the MLX trainer does not resume a PyTorch run
        train.train(load(path)[0], data(), tmp_path / "whole", path, cfg, eos_id=1, log=quiet)
    train.train(load(path)[0], data(), tmp_path / "mlx", path, cfg, eos_id=1, log=quiet, stop_after=3)
    with pytest.raises(ValueError, match="mlx trainer"):
        torch_train.train(load(path)[0], data(), tmp_path / "mlx", path, cfg, eos_id=1, log=quiet)
