#!/usr/bin/env bash
# On the H200 (wheels from pack.sh, carried as run.sh says): the kernels' self-check on MLX's CUDA build, the
# vocabulary pass at the real model's shape (256 x 262,144) among others, against its pure-MLX reference.
#   run(carry=[".whl/a"], command="true")
#   run(carry=[".whl/b"], command="bash benchmarks/h200/kernels.sh", timeout_s=300)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/h200/install.sh kernels_log.txt
export XDG_CACHE_HOME=$OUT  # the self-check verdict lands in $OUT
timeout 240 python3 -c "
import mlx.core as mx
from mlx_diffgemma import kernels
print('mlx', mx.__version__, mx.default_device(), 'target', kernels.target())
kernels.selfcheck()
"
echo "exit $?"
