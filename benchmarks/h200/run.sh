#!/usr/bin/env bash
# On the H200 (see pack.sh): install the carried wheels, then one step of the real-size model with each engine
# (mlx-diffgemma on MLX's CUDA build, transformers on torch), one process each, and the table into $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
whl=/tmp/$(cat .whl/b/mlx-cuda.name)
cat .whl/a/mlx-cuda.part.* .whl/b/mlx-cuda.part.* > "$whl"
echo "$(cat .whl/b/mlx-cuda.sha256)  $whl" | sha256sum -c - || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$whl" .whl/b/mlx-0.32.4-*.whl .whl/b/transformers-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device()); import transformers; print('transformers', transformers.__version__)"
timeout 230 python3 benchmarks/h200/step_gpu.py --engine ours > "$OUT/ours.json"; echo "ours: exit $?"
timeout 230 python3 benchmarks/h200/step_gpu.py --engine transformers > "$OUT/transformers.json"; echo "transformers: exit $?"
python3 benchmarks/h200/step_gpu.py --table "$OUT"/ours.json "$OUT"/transformers.json | tee "$OUT/table.md"
