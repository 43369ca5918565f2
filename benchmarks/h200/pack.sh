#!/usr/bin/env bash
# Here, before a device session: fetch the wheels the H200 image lacks (MLX's CUDA build, transformers 5.24) into
# .whl/ (ignored by git) and cut them into two loads that each fit a call's 64 MiB with the working tree.
#   bash benchmarks/h200/pack.sh
# Then, on the device, two calls within 30 s of each other (the machine stays warm and keeps .whl/a):
#   run(carry=[".whl/a"], command="true")
#   run(carry=[".whl/b"], command="bash benchmarks/h200/run.sh", timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/a .whl/b .whl/dl
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/dl "$@"
}
get mlx==0.32.4 mlx-cuda-13==0.32.4
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl/dl transformers==5.24.0
cuda=$(ls .whl/dl/mlx_cuda_13-*.whl)
sha256sum "$cuda" | awk '{print $1}' > .whl/b/mlx-cuda.sha256
basename "$cuda" > .whl/b/mlx-cuda.name
split -b 52000000 -d "$cuda" .whl/a/mlx-cuda.part.
mv .whl/a/mlx-cuda.part.01 .whl/b/
mv .whl/dl/mlx-0.32.4-*.whl .whl/dl/transformers-*.whl .whl/b/
rm -rf .whl/dl
du -sh .whl/a .whl/b
