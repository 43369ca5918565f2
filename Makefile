# setup · test · parity · lint.  On Linux: installs Debian's OpenBLAS if missing and preloads it for MLX's CPU
# backend (about 10-40x faster fp32 matmul than the reference BLAS bundled in the wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
UNAME := $(shell uname -s)
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
# OpenBLAS 0.3.21 (Debian 12) does not know recent CPUs (a Sapphire Rapids Xeon among them) and falls back to its
# generic Prescott kernels: 48 GFLOP/s fp32 matmul there against 196 with its SkylakeX kernels. The kernel family
# is named from the CPU's own flags (a setting of OPENBLAS_CORETYPE in the environment wins).
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
CORETYPE := $(or $(OPENBLAS_CORETYPE),$(if $(and $(filter avx512bw,$(CPU_FLAGS)),$(filter avx512vl,$(CPU_FLAGS)),$(filter avx512dq,$(CPU_FLAGS))),SkylakeX,$(if $(and $(filter avx2,$(CPU_FLAGS)),$(filter fma,$(CPU_FLAGS))),Haswell)))
# OpenBLAS's idle workers spin (sched_yield) for 2^28 cycles after each product before they sleep: between a step's
# products they took a core from the native kernels' threads and MLX's own ops; 2^4 puts them to sleep at once
# (bench_step on a 2-core Zen 3: 2.45 -> 2.72 steps/s at a 256 prefix, 1.19 -> 1.27 at 8,192). Read at load only.
THREAD_TIMEOUT := $(or $(OPENBLAS_THREAD_TIMEOUT),4)
ifeq ($(UNAME),Linux)
  TORCH := torch==2.13.0
  RUN_ENV = env $$([ -e $(OPENBLAS) ] && echo LD_PRELOAD=$(OPENBLAS) $(if $(CORETYPE),OPENBLAS_CORETYPE=$(CORETYPE)) OPENBLAS_THREAD_TIMEOUT=$(THREAD_TIMEOUT))
else
  TORCH := torch
  RUN_ENV = env
endif

DEMO_PROMPT ?= Write a Python function area(x, u) that returns x * u.
.PHONY: setup runtime openblas native clang test parity demo lint bench
setup: $(VENV)/.installed openblas native
runtime: $(VENV)/.runtime openblas native

# the package alone (what `make demo` needs); the tests add torch + transformers (the reference) and pytest
$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[reference,dev]"
	touch $@

openblas:
ifeq ($(UNAME),Linux)
	@[ -e $(OPENBLAS) ] || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null) \
	  || echo "note: libopenblas0-pthread not installed (needs root); MLX uses its slow bundled BLAS"; }
endif

# the native CPU kernels (mlx_diffgemma/native): compiled for this machine into ~/.cache/mlx-diffgemma/native, once
# per source and MLX version; without them (no compiler, no CMake) everything runs, on the pure-MLX references
native: $(VENV)/.runtime
ifeq ($(UNAME),Linux)
	@command -v cmake >/dev/null || $(PY) -m pip install -q "cmake>=3.24"
	@PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m mlx_diffgemma.native build >/dev/null \
	  || echo "note: the native CPU kernels were not built; the CPU path runs on pure MLX (slower)"
endif

# the tests syntax-check the Metal kernels with clang++ (macOS has it; on Linux it is installed when missing)
clang:
ifeq ($(UNAME),Linux)
	@command -v clang++ >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq clang >/dev/null) \
	  || echo "note: clang++ not installed (needs root): the Metal syntax-check test will fail"; }
endif

test: setup clang
	@$(RUN_ENV) $(PY) -m pytest -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

parity: setup
	@$(RUN_ENV) $(VENV)/bin/mlx_diffgemma parity --fixtures

# exact-mode speed side by side with mlx-vlm and transformers, MLX run as above (ARGS="--rounds 2 --steps 2")
bench: setup
	@$(PY) -m pip install -q "mlx-vlm==0.7.10"
	@$(RUN_ENV) $(PY) benchmarks/bench_step.py $(ARGS)

# The main job: the demo model shipped inside the package (mlx_diffgemma/demo/model, trained from scratch by
# benchmarks/train_demo.py) answers with the live canvas on a terminal, block by block in a pipe.
demo: runtime
	@$(RUN_ENV) $(VENV)/bin/mlx_diffgemma generate --model demo -p "$(DEMO_PROMPT)" --seed 0 --verbose

lint: setup
	$(VENV)/bin/ruff check mlx_diffgemma tests benchmarks
