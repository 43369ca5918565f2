"""How a quantized model compares with its source: the dequantized twin (same numbers, float weights) and the
logit error metrics recorded per recipe."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffgemma.model import Model, QuantizedSwitchLinear


def float_weights(model: Model, dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    """Name -> float weight, lazily: each quantized module's weight dequantized exactly as its matmuls see it (in
    `dtype`, by default the model's), every other weight as it is (cast to `dtype` when one is given)."""
    out = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        out = {k: v.astype(dtype) for k, v in out.items()}
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            for k in ("weight", "scales", "biases"):
                out.pop(f"{path}.{k}", None)
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode)
            out[f"{path}.weight"] = w.astype(dtype or model.dtype)
    return out


def dequantized(model: Model) -> Model:
    """A float model holding the quantized model's weights dequantized (and every other weight as it is)."""
    float_model = Model(dataclasses.replace(model.config, quantization=None))
    float_model.load_weights(list(float_weights(model).items()), strict=True)
    mx.eval(float_model.parameters())
    return float_model


def logit_metrics(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """max |difference|, relative RMS error and top-1 agreement of `ours` against `reference`."""
    d = ours - reference
    return {
        "max_abs": float(np.abs(d).max()),
        "rel_rms": float(np.sqrt(np.mean(d**2)) / np.sqrt(np.mean(reference**2))),
        "top1": float(np.mean(ours.argmax(-1) == reference.argmax(-1))),
    }
