# Sourced by the H200 scripts (run.sh, reference.sh, kernels.sh), from the repository root with $OUT set: puts
# their output in $OUT/$1, rebuilds MLX's CUDA wheel from the two carried loads (see pack.sh), checks it, and
# installs it with mlx and transformers 5.24 into /tmp/site, first on PYTHONPATH.
exec > >(tee "$OUT/$1") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
whl=/tmp/$(cat .whl/b/mlx-cuda.name)
cat .whl/a/mlx-cuda.part.* .whl/b/mlx-cuda.part.* > "$whl"
echo "$(cat .whl/b/mlx-cuda.sha256)  $whl" | sha256sum -c - || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$whl" .whl/b/mlx-0.32.4-*.whl .whl/b/transformers-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device()); import transformers; print('transformers', transformers.__version__)"
