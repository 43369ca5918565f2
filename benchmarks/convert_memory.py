"""Peak resident memory of `convert` stays flat as the model grows.

Builds synthetic DiffusionGemma checkpoints at the real widths (hidden 2816, 128 experts x 704, vocabulary 262,144;
bfloat16, several shards) with 2 and 4 layers, converts each with the default 4-bit recipe in a fresh process, and
records that process's peak RSS against its RSS after imports (the baseline) and the largest tensor.
Target: peak <= baseline + 3 x largest tensor, for both depths.

    python benchmarks/convert_memory.py [--workdir DIR] [--layers 2 4]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "benchmarks/configs/diffusiongemma-26b-a4b"


def hf_name(ours: str) -> str:
    if ours.endswith("encoder_layer_scalar"):
        return "model.encoder.language_model." + ours.replace("encoder_layer_scalar", "layer_scalar")
    return "model.decoder." + ours.removesuffix(".weight") if ".experts." in ours else "model.decoder." + ours


def build(path: Path, layers: int, shard_bytes: int = 2 * 10**9) -> int:
    """Write the checkpoint tensor by tensor (bfloat16 from float32 normals); returns the largest tensor's bytes."""
    from mlx_diffgemma.config import ModelConfig
    from mlx_diffgemma.convert import expected_shapes
    from mlx_diffgemma.convert.safetensors_io import Entry, PlannedFile

    cfg = json.loads((REAL / "config.json").read_text())
    tc = cfg["text_config"]
    tc["num_hidden_layers"] = layers
    tc["layer_types"] = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(REAL / "generation_config.json", path)
    shapes = {hf_name(k): s for k, s in expected_shapes(ModelConfig.from_dict(cfg)).items()}
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(Entry(name, "BF16", shape))
        size += nbytes
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        f = PlannedFile(path / fname, entries, {"format": "pt"})
        for e in entries:
            n, done = math.prod(e.shape), 0
            while done < n:
                k = min(n - done, 2**24)
                x = (rng.standard_normal(k, dtype=np.float32) * 0.02).view(np.uint32)
                f.write(e.name, 2 * done, memoryview((x >> 16).astype(np.uint16)).cast("B"))
                done += k
            weight_map[e.name] = fname
        f.close()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return max(2 * math.prod(s) for s in shapes.values())


CHILD = r"""
import json, resource, sys, time
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import mlx.core as mx
from mlx_diffgemma.convert import RECIPES, convert
base = rss_kb()
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], RECIPES["q4"], log=lambda s: None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
if sys.platform == "darwin":
    peak //= 1024
print(json.dumps({"baseline_kb": base, "peak_kb": peak, "seconds": time.perf_counter() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="convert-memory-"))
    rows = []
    try:
        for layers in args.layers:
            src, dst = root / f"src-{layers}", root / f"dst-{layers}"
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
            t = time.perf_counter()
            largest = build(src, layers)
            built = time.perf_counter() - t
            source_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
            out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base, peak = r["baseline_kb"] * 1024, r["peak_kb"] * 1024
            rows.append(
                (layers, source_gb, len(list(src.glob("*.safetensors"))), largest, base, peak, r["seconds"], built)
            )
            shutil.rmtree(src)
            shutil.rmtree(dst)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"python {platform.python_version()}, {platform.machine()}, {platform.system()}")
    print(
        "| layers | source (GB) | shards | largest tensor (GB) | baseline RSS (GB) | peak RSS (GB) | "
        "peak - baseline | / largest tensor | convert (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for layers, src_gb, shards, largest, base, peak, secs, _ in rows:
        ratio = (peak - base) / largest
        ok &= ratio <= 3
        print(
            f"| {layers} | {src_gb:.2f} | {shards} | {largest / 1e9:.3f} | {base / 1e9:.2f} | {peak / 1e9:.2f} | "
            f"{(peak - base) / 1e9:.2f} | {ratio:.2f} | {secs:.0f} |"
        )
    print("target peak <= baseline + 3 x largest tensor:", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
