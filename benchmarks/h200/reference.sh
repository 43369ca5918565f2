#!/usr/bin/env bash
# On the H200 (wheels from pack.sh, carried as run.sh says): the reference path at the real widths.
#   run(carry=[".whl/a"], command="true")
#   run(carry=[".whl/b"], command="bash benchmarks/h200/reference.sh", timeout_s=540)
# transformers records in bfloat16 on CUDA; our float32, bfloat16 and 4-bit conversions are compared with it on
# MLX's CUDA build and then its CPU, until 420 s; the table lands in $OUT/reference_table.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/h200/install.sh reference_log.txt
df -h /tmp | tail -1
timeout 500 python3 benchmarks/h200/reference_gpu.py --work /tmp/ref --out "$OUT" --deadline 420
echo "exit $?"
