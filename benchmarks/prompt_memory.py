"""Peak memory and time of encoding a long prompt, in pieces (as generation now does) and in one pass (as it did),
side by side, with the estimate that generation checks before starting.

A random model with a long context (hidden 256, 12 layers in the 5 sliding : 1 full pattern, sliding window 1,024,
8 experts top-2, vocabulary 8,192, context 65,536; float32) encodes prompts of 1k to 32k tokens, then runs one
denoising step over them. Each measurement runs in a fresh process (MLX's peak-memory counter, reset before the
prompt; weights included). The one-pass path is skipped where the estimate says it would not fit this machine.

    python benchmarks/prompt_memory.py [--lengths 1024 2048 ...] [--skip-one-pass-over 8e9]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

CONFIG = {
    "model_type": "diffusion_gemma",
    "canvas_length": 64,
    "text_config": {
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "global_head_dim": 128,
        "num_global_key_value_heads": 1,
        "sliding_window": 1024,
        "num_experts": 8,
        "top_k_experts": 2,
        "moe_intermediate_size": 128,
        "max_position_embeddings": 65536,
    },
}

CHILD = """
import json, sys, time
import mlx.core as mx
from mlx_diffgemma.config import ModelConfig
from mlx_diffgemma.generate import prefill
from mlx_diffgemma.model import Model
from mlx_diffgemma.train import init_weights

cfg, n, step = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = Model(ModelConfig.from_dict(cfg))
init_weights(model, seed=0)
ids = mx.random.randint(0, cfg["text_config"]["vocab_size"], (1, n), key=mx.random.key(0))
canvas = mx.random.randint(0, cfg["text_config"]["vocab_size"], (1, cfg["canvas_length"]), key=mx.random.key(1))
mx.eval(ids, canvas)
weights = mx.get_active_memory()
mx.reset_peak_memory()
cache = model.make_cache()
tic = time.perf_counter()
prefill(model, ids, cache, step=step)
cache.materialize()
encode_s = time.perf_counter() - tic
encode_peak = mx.get_peak_memory()
tic = time.perf_counter()
mx.eval(model.denoise(canvas, cache))
step_s = time.perf_counter() - tic
print(json.dumps({"weights": weights, "encode_peak": encode_peak, "peak": mx.get_peak_memory(),
                  "encode_s": encode_s, "step_s": step_s}))
"""


def measure(n: int, step: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(CONFIG), str(n), str(step)], capture_output=True, text=True
    )
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}"}
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--skip-one-pass-over", type=float, default=8e9, help="bytes the one-pass estimate may reach")
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_diffgemma.config import ModelConfig
    from mlx_diffgemma.generate import PREFILL_STEP
    from mlx_diffgemma.memory import estimate, fmt

    cfg = ModelConfig.from_dict(CONFIG)
    print(
        f"# {time.strftime('%Y-%m-%d')} · {platform.machine()} {platform.system()} · MLX {mx.__version__} · "
        f"{mx.default_device()} · prefill step {PREFILL_STEP}"
    )
    print(
        "| prompt | pieces: peak | pieces: estimate | pieces: encode s | step s | one pass: peak | one pass: encode s |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.lengths:
        est = estimate(cfg.text_config, cfg.canvas_length, 4, n + cfg.canvas_length, PREFILL_STEP)
        chunked = measure(n, PREFILL_STEP)
        one_est = estimate(cfg.text_config, cfg.canvas_length, 4, n + cfg.canvas_length, n)
        if one_est.total > args.skip_one_pass_over:
            one = {"error": f"skipped: needs about {fmt(one_est.total)}"}
        else:
            one = measure(n, n)
        row = [f"{n:,}"]
        if "error" in chunked:
            row += [chunked["error"], "", "", ""]
        else:
            row += [
                fmt(chunked["peak"] - chunked["weights"]),
                fmt(est.total),
                f"{chunked['encode_s']:.1f}",
                f"{chunked['step_s']:.2f}",
            ]
        row += [one["error"], ""] if "error" in one else [fmt(one["peak"] - one["weights"]), f"{one['encode_s']:.1f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
