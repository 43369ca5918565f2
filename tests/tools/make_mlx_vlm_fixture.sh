#!/usr/bin/env bash
# Regenerates tests/data/mlx_vlm-0.7.10/: a tiny DiffusionGemma checkpoint ("hf", built with transformers by our
# reference fixture builder: the trained-like "tamed" fixture written with flat config keys, since mlx-vlm
# 0.7.10 ignores per_layer_config) and its 4-bit conversion by mlx-vlm 0.7.10 ("q4"). CI does not install
# mlx-vlm: the output is committed. Needs the project's venv (make setup) and network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=tests/data/mlx_vlm-0.7.10
env_dir=$(mktemp -d)/mlx-vlm
rm -rf "$out" && mkdir -p "$out"
.venv/bin/python - "$out/hf" <<'PY'
import dataclasses, sys
from mlx_diffgemma import reference as ref
ref.quiet()
ref.build_checkpoint(sys.argv[1], dataclasses.replace(ref.FIXTURES["tamed"], name="mlx_vlm", flat_keys=True), seed=0)
PY
python3 -m venv "$env_dir"
mlx_pkg=$([ "$(uname -s)" = Darwin ] && echo "mlx==0.32.4" || echo "mlx[cpu]==0.32.4")
"$env_dir/bin/pip" install -q "$mlx_pkg" mlx-vlm==0.7.10
"$env_dir/bin/python" -m mlx_vlm convert --hf-path "$out/hf" --mlx-path "$out/q4" -q --q-bits 4 --q-group-size 32
rm -rf "$(dirname "$env_dir")"
du -sh "$out"/*
