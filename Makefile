# setup · test · parity · lint.  On Linux: installs Debian's OpenBLAS if missing and preloads it for MLX's CPU
# backend (about 10-20x faster fp32 matmul than the reference BLAS bundled in the wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
UNAME := $(shell uname -s)
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
ifeq ($(UNAME),Linux)
  TORCH := torch==2.13.0
  RUN_ENV = env $$([ -e $(OPENBLAS) ] && echo LD_PRELOAD=$(OPENBLAS))
else
  TORCH := torch
  RUN_ENV = env
endif

DEMO := .cache/tiny-random
.PHONY: setup openblas test parity demo lint
setup: $(VENV)/.installed openblas

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[reference,dev]"
	touch $@

openblas:
ifeq ($(UNAME),Linux)
	@[ -e $(OPENBLAS) ] || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null) \
	  || echo "note: libopenblas0-pthread not installed (needs root); MLX uses its slow bundled BLAS"; }
endif

test: setup
	@$(RUN_ENV) $(PY) -m pytest -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

parity: setup
	@$(RUN_ENV) $(VENV)/bin/mlx_diffgemma parity

# The main job until the trained demo model exists: a tiny RANDOM checkpoint (its output is noise) generating
# through the real tokenizer, chat template, sampler and live view.
demo: setup
	@[ -e $(DEMO)/config.json ] || $(PY) -m mlx_diffgemma.reference $(DEMO) "$$($(PY) tests/tools/build_gemma4_tokenizer.py)"
	@$(RUN_ENV) $(VENV)/bin/mlx_diffgemma generate --model $(DEMO) -p "Write a haiku about the sea." -m 64 --seed 0 --verbose

lint: setup
	$(VENV)/bin/ruff check mlx_diffgemma convert tests benchmarks
