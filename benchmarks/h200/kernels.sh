#!/usr/bin/env bash
# On the H200 (wheels from pack.sh, carried as run.sh says): the kernels' self-check on MLX's CUDA build, the
# vocabulary pass at the real model's shape (256 x 262,144) among others, against its pure-MLX reference.
#   run(carry=[".whl/a"], command="true")
#   run(carry=[".whl/b"], command="bash benchmarks/h200/kernels.sh", timeout_s=300)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/kernels_log.txt") 2>&1
whl=/tmp/$(cat .whl/b/mlx-cuda.name)
cat .whl/a/mlx-cuda.part.* .whl/b/mlx-cuda.part.* > "$whl"
echo "$(cat .whl/b/mlx-cuda.sha256)  $whl" | sha256sum -c - || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$whl" .whl/b/mlx-0.32.4-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XDG_CACHE_HOME=$OUT
timeout 240 python3 -c "
import mlx.core as mx
from mlx_diffgemma import kernels
print('mlx', mx.__version__, mx.default_device(), 'target', kernels.target())
kernels.selfcheck()
"
echo "exit $?"
