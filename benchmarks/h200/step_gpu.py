"""One denoising step of the real DiffusionGemma 26B-A4B (its widths and depth, random bfloat16 weights) on a GPU:
mlx-diffgemma on MLX's CUDA build, or transformers on the same GPU, one engine per process.

    python benchmarks/h200/step_gpu.py --engine ours [--prefix 1024] [--steps 5] > ours.json
    python benchmarks/h200/step_gpu.py --engine transformers > transformers.json
    python benchmarks/h200/step_gpu.py --table ours.json transformers.json
    MLX_DIFFGEMMA_KERNELS=0 python benchmarks/h200/step_gpu.py --engine ours > off.json   # kernels forced off
    python benchmarks/h200/step_gpu.py --compare off.json on.json   # speed and tokens, kernels off vs on

Each engine builds the model from `benchmarks/configs/diffusiongemma-26b-a4b/config.json` with random weights made
on the device (nothing is read from disk), encodes a random prompt of --prefix tokens, then runs --steps + 1
denoising steps over a 256-token canvas with its own generation loop (sampler included, no early stop); the
first step (no self-conditioning, kernel compilation) is not counted. `--layers N` keeps the first N layers and
`--hidden`/`--experts`/`--vocab` shrink the model, for trying the script on a machine without a big GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "benchmarks" / "configs" / "diffusiongemma-26b-a4b" / "config.json"
NEVER = dict(stability_threshold=1, confidence_threshold=1e-30)


def config(args) -> dict:
    cfg = json.loads(REAL.read_text())
    t = cfg["text_config"]
    if args.layers:
        t["num_hidden_layers"] = args.layers
        t["layer_types"] = t["layer_types"][: args.layers - 1] + ["full_attention"]
    for key, value in (("hidden_size", args.hidden), ("num_experts", args.experts), ("vocab_size", args.vocab)):
        if value:
            t[key] = value
    if args.hidden:
        t["intermediate_size"], t["moe_intermediate_size"] = 3 * args.hidden // 4, args.hidden // 4
    if args.experts:
        t["top_k_experts"] = min(t["top_k_experts"], args.experts)
    return cfg


def run_ours(cfg: dict, prefix: int, steps: int) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_diffgemma import kernels
    from mlx_diffgemma.accounting import step_costs, total
    from mlx_diffgemma.bench import matmul_rate
    from mlx_diffgemma.config import ModelConfig
    from mlx_diffgemma.generate import generate_step, settings
    from mlx_diffgemma.model import Model

    tic = time.perf_counter()
    config = ModelConfig.from_dict(cfg)
    model = Model(config)
    new = []
    for i, (name, w) in enumerate(tree_flatten(model.parameters())):  # random bf16 weights, made tensor by tensor
        if w.ndim >= 2:
            v = 0.02 * mx.random.normal(w.shape, dtype=mx.bfloat16, key=mx.random.key(i))
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            v = mx.full(w.shape, w.shape[0] ** -0.25, dtype=mx.bfloat16)
        else:
            v = mx.ones(w.shape, dtype=mx.bfloat16)
        mx.eval(v)
        new.append((name, v))
    model.update(tree_unflatten(new))
    del new
    model.eval()
    built = time.perf_counter() - tic
    V, C = config.text_config.vocab_size, config.canvas_length
    ids = mx.random.randint(0, V, (1, prefix), key=mx.random.key(123))
    g = settings(model, max_denoising_steps=steps + 1, eos_token_id=[], **NEVER)
    stamps, drafts = [], []
    tic = time.perf_counter()
    for event in generate_step(model, ids, g, C, key=mx.random.key(0)):
        if not hasattr(event, "draft"):
            break
        mx.eval(event.draft)
        stamps.append(time.perf_counter())
        drafts.append(event.draft)
    first = stamps[0] - tic
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    flops = total(step_costs(config, prefix, weight_bits=16)).flops
    return {
        "engine": "mlx-diffgemma",
        "versions": f"mlx {mx.__version__}",
        "device": str(mx.default_device()),
        "build_s": built,
        "first_step_s": first,
        "step_s": per_step,
        "steps_per_s": 1 / per_step,
        "step_tflop": flops / 1e12,
        "achieved_tflops": flops / per_step / 1e12,
        "matmul_tflops": matmul_rate(mx.bfloat16, 8192 if mx.default_device() == mx.gpu else 512) / 1e12,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "kernels": {op: kernels.use_kernel(op) for op in kernels.OPS},
        "drafts": [d.tolist() for d in drafts],  # the argmax canvas after each step
    }


def compare(off_file: str, on_file: str) -> str:
    """Kernels forced off against the dispatcher's choice: speed, and how far the argmax canvases agree step by
    step (the first step reads no self-conditioning signal, so it compares the vocabulary pass alone)."""
    off, on = (json.loads(Path(f).read_text()) for f in (off_file, on_file))
    lines = [f"kernels used: {', '.join(k for k, v in on['kernels'].items() if v) or 'none'}",
             f"steps/s: kernels off {off['steps_per_s']:.3f}, on {on['steps_per_s']:.3f} "
             f"({on['steps_per_s'] / off['steps_per_s']:.2f}x)"]  # fmt: skip
    for i, (a, b) in enumerate(zip(off["drafts"], on["drafts"]), 1):
        same = sum(x == y for x, y in zip(a, b))
        lines.append(f"step {i}: argmax canvas {same}/{len(a)} positions equal")
    return "\n".join(lines)


def run_transformers(cfg: dict, prefix: int, steps: int) -> dict:
    import torch
    import transformers
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tic = time.perf_counter()
    hf = dict(cfg)
    hf.pop("_comment", None)
    config = DiffusionGemmaConfig(**hf)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):  # transformers' own initialisation, made on the device
        model = DiffusionGemmaForBlockDiffusion(config)
    model.eval()
    if device == "cuda":
        torch.cuda.synchronize()
    built = time.perf_counter() - tic
    stamps: list[float] = []

    class Streamer:
        def put(self, value):
            pass

        def put_draft(self, value):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.randint(0, config.text_config.vocab_size, (1, prefix), device=device)
    tic = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            max_new_tokens=config.canvas_length,
            max_denoising_steps=steps + 1,
            eos_token_id=None,
            streamer=Streamer(),
            **NEVER,
        )
    first = stamps[0] - tic
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return {
        "engine": "transformers",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "build_s": built,
        "first_step_s": first,
        "step_s": per_step,
        "steps_per_s": 1 / per_step,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
    }


def table(files: list[str]) -> str:
    rows = [json.loads(Path(f).read_text()) for f in files]
    engines = " · ".join(f"{r['engine']}: {r['versions']}, {r['device']}" for r in rows)
    out = [
        f"# {time.strftime('%Y-%m-%d')} · {engines}",
        "",
        "| engine | steps/s | ms per step | first step (s) | achieved TFLOP/s | matmul TFLOP/s | peak memory (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        achieved = f"{r['achieved_tflops']:.1f}" if "achieved_tflops" in r else ""
        matmul = f"{r['matmul_tflops']:.0f}" if "matmul_tflops" in r else ""
        mem = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") else ""
        out.append(
            f"| {r['engine']} | {r['steps_per_s']:.3f} | {1e3 * r['step_s']:.1f} | {r['first_step_s']:.1f} | "
            f"{achieved} | {matmul} | {mem} |"
        )
    if len(rows) == 2:
        out.append(f"\nmlx-diffgemma / transformers: {rows[0]['steps_per_s'] / rows[1]['steps_per_s']:.2f}x")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["ours", "transformers"])
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--table", nargs="+")
    ap.add_argument("--compare", nargs=2, metavar=("OFF", "ON"))
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.compare:
        print(compare(*args.compare))
        return
    cfg = config(args)
    run = run_ours if args.engine == "ours" else run_transformers
    result = run(cfg, args.prefix, args.steps)
    result.update(prefix=args.prefix, steps=args.steps, python=platform.python_version())
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
