#!/usr/bin/env bash
# On the H200 (wheels from pack.sh, carried as run.sh says): the kernels' self-check on MLX's CUDA build (the
# vocabulary pass at the real model's shape, 256 x 262,144, among others, against its pure-MLX reference), then
# denoising steps of the real-width model (random bfloat16 weights, prefix 1,024) with the kernels forced off and
# with the dispatcher's choice: speed, and the argmax canvases compared step by step.
#   run(carry=[".whl/a"], command="true")
#   run(carry=[".whl/b"], command="bash benchmarks/h200/kernels.sh", timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/h200/install.sh kernels_log.txt
export XDG_CACHE_HOME=$OUT  # the self-check verdict lands in $OUT
timeout 150 python3 -c "
import mlx.core as mx
from mlx_diffgemma import kernels
print('mlx', mx.__version__, mx.default_device(), 'target', kernels.target())
kernels.selfcheck()
"
echo "selfcheck: exit $?"
MLX_DIFFGEMMA_KERNELS=0 timeout 140 python3 benchmarks/h200/step_gpu.py --engine ours > "$OUT/kernels_off.json"
echo "kernels off: exit $?"
timeout 140 python3 benchmarks/h200/step_gpu.py --engine ours > "$OUT/kernels_on.json"; echo "kernels on: exit $?"
python3 benchmarks/h200/step_gpu.py --compare "$OUT"/kernels_off.json "$OUT"/kernels_on.json | tee "$OUT/kernels.md"
