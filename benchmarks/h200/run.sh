#!/usr/bin/env bash
# On the H200 (see pack.sh): install the carried wheels, then one step of the real-size model with each engine
# (mlx-diffgemma on MLX's CUDA build, transformers on torch), one process each, and the table into $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/h200/install.sh log.txt
timeout 230 python3 benchmarks/h200/step_gpu.py --engine ours > "$OUT/ours.json"; echo "ours: exit $?"
timeout 230 python3 benchmarks/h200/step_gpu.py --engine transformers > "$OUT/transformers.json"; echo "transformers: exit $?"
python3 benchmarks/h200/step_gpu.py --table "$OUT"/ours.json "$OUT"/transformers.json | tee "$OUT/table.md"
