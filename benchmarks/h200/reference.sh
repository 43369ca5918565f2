#!/usr/bin/env bash
# On the H200 (wheels from pack.sh, carried as run.sh says): the reference path at the real widths.
#   run(carry=[".whl/a"], command="true")
#   run(carry=[".whl/b"], command="bash benchmarks/h200/reference.sh", timeout_s=540)
# transformers records in bfloat16 on CUDA; our float32, bfloat16 and 4-bit conversions are compared with it on
# MLX's CUDA build and then its CPU, until 420 s; the table lands in $OUT/reference_table.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/reference_log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
whl=/tmp/$(cat .whl/b/mlx-cuda.name)
cat .whl/a/mlx-cuda.part.* .whl/b/mlx-cuda.part.* > "$whl"
echo "$(cat .whl/b/mlx-cuda.sha256)  $whl" | sha256sum -c - || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$whl" .whl/b/mlx-0.32.4-*.whl .whl/b/transformers-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device()); import transformers; print('transformers', transformers.__version__)"
df -h /tmp | tail -1
timeout 500 python3 benchmarks/h200/reference_gpu.py --work /tmp/ref --out "$OUT" --deadline 420
echo "exit $?"
