"""The reference path at the real model's widths, for an NVIDIA machine: what a team with an H100 and a Mac does.

    python benchmarks/h200/reference_gpu.py --work /tmp/ref --out $OUT             # on the H200 (reference.sh)
    python benchmarks/h200/reference_gpu.py --work /tmp/ref --out /tmp/o --small   # here, on the CPU: the logic

1. A random checkpoint in the Hugging Face layout at the real widths (hidden 2,816, 16 query heads, 8 KV heads of
   256 on sliding layers and 2 of 512 on full ones, 128 experts top-8 x 704, vocabulary 262,144, canvas 256) with
   two layers (one sliding, one full) instead of 30, q/k norms at head_dim^-1/4 (as trained ones are, so the outputs
   are not chaotic), bfloat16, 8 denoising steps at most.
2. `reference` with transformers on CUDA in bfloat16 (top-64 logits per position: the real vocabulary).
3. Our float32, bfloat16 and 4-bit conversions of it, each compared with `parity --against` on MLX's CPU, and on
   MLX's CUDA build when it is installed.
4. One table (Markdown) and the JSON reports into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

START = time.time()

REAL = dict(
    vocab_size=262_144,
    hidden_size=2816,
    intermediate_size=2112,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    sliding_window=1024,
    max_position_embeddings=8192,
)
SMALL = dict(
    REAL,
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=192,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    global_head_dim=128,
    num_global_key_value_heads=1,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=64,
    sliding_window=64,
)


def build(work: Path, small: bool) -> Path:
    from mlx_diffgemma import reference as ref

    text = dict(SMALL if small else REAL, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    fx = ref.Fixture("real-widths", text, canvas_length=64 if small else 256, tame=True)
    path = ref.build_checkpoint(work / "hf", fx, seed=0, dtype="bfloat16")
    gen = {"max_denoising_steps": 8, "eos_token_id": [1, 106, 50], "pad_token_id": 0, "bos_token_id": 2}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def compare_in_subprocess(model: Path, ref_file: Path, device: str, out: Path, timeout: float) -> dict | str:
    """parity --against in its own process on MLX's `device` (cpu or gpu); the report, or why it failed."""
    code = (
        "import json, sys, mlx.core as mx\n"
        f"mx.set_default_device(mx.{device})\n"
        "from mlx_diffgemma.parity import compare\n"
        f"r = compare({str(model)!r}, {str(ref_file)!r})\n"
        f"open({str(out)!r}, 'w').write(json.dumps(r, indent=2))\n"
    )
    t = time.time()
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return "not run: the run's time limit"
    if p.returncode:
        return (p.stderr.strip().splitlines() or ["failed"])[-1][:300]
    r = json.loads(out.read_text())
    r["seconds"] = round(time.time() - t, 1)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="Reduced widths, transformers on the CPU (a logic check).")
    ap.add_argument("--deadline", type=float, default=420, help="Seconds from the start after which to stop.")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    import mlx.core as mx
    import torch

    from mlx_diffgemma import reference as ref
    from mlx_diffgemma.convert import convert, resolve

    ref.quiet()
    t = time.time()
    hf = build(args.work, args.small)
    print(f"checkpoint {hf} in {time.time() - t:.0f} s", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.time()
    ref_file = args.work / "real-widths.ref"
    header = ref.record(hf, ref_file, device=device, dtype="bfloat16", force=True, log=print)
    print(f"reference on {header['device']} in {time.time() - t:.0f} s", flush=True)
    t = time.time()
    conversions = {
        "float32": resolve(None, False, None, None, None),
        "bfloat16": resolve(None, False, None, None, None),
        "4-bit affine": resolve(None, True, 4, None, None),
    }
    folders = {}
    for name, recipe in conversions.items():
        folders[name] = args.work / name.replace(" ", "-")
        dtype = "float32" if name == "float32" else "bfloat16"
        convert(hf, folders[name], recipe, dtype=dtype, force=True, log=lambda s: None)
    print(f"converted in {time.time() - t:.0f} s", flush=True)
    # MLX's CUDA build first (fast), then its CPU (4-bit matmuls are slow there), until the deadline
    plan = [(n, "gpu") for n in conversions if mx.is_available(mx.gpu)] + [(n, "cpu") for n in conversions]
    rows = []
    for name, d in plan:
        left = args.deadline - (time.time() - START)
        if left < 5:
            r = "not run: the run's time limit"
        else:
            r = compare_in_subprocess(folders[name], ref_file, d, args.out / f"{folders[name].name}-{d}.json", left)
        rows.append((name, d, r))
        print(name, d, r if isinstance(r, str) else f"done in {r['seconds']} s", flush=True)
    lines = [
        f"Reference: transformers {header['versions']}, {header['dtype']} on {header['device']}; "
        f"{len(header['prompts'])} prompts, {'reduced' if args.small else 'real'} widths, 2 layers, "
        f"top-{header['top_k']} logits stored.",
        "",
        "| ours | MLX device | stage | top-1 agreement | KL mean (nats) | KL max | replayed generation |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d, r in rows:
        if isinstance(r, str):
            lines.append(f"| {name} | {d} | {r} | | | | |")
            continue
        gens = ", ".join(
            "identical" if g["identical"] else f"differs at {g['first_difference']}" for g in r["generations"]
        )
        for stage, s in r["stages"].items():
            lines.append(
                f"| {name} | {d} | {stage} | {100 * s['top1']:.1f}% | {s['kl_mean']:.2e} | {s['kl_max']:.2e} | {gens} |"
            )
            gens = ""
    table = "\n".join(lines)
    (args.out / "reference_table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
