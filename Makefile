# mlx-mistral: the two set-up commands are `make demo` (the main job) and `make test` (the whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-fast system-deps bench thesis clean

# Debian/Ubuntu: OpenBLAS for MLX's CPU backend (see mlx_mistral/_blas.py); needs root, skipped otherwise.
system-deps:
	@if [ "$$(uname)" = Linux ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  if ! ldconfig -p | grep -q libopenblas.so.0; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  fi; \
	elif [ "$$(uname)" = Linux ] && ! ldconfig -p | grep -q libopenblas.so.0; then \
	  echo "note: install OpenBLAS (apt install libopenblas0-pthread) for ~15x faster MLX on CPU"; \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3

$(VENV)/.base: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e ".[test,gguf-judge]"
	touch $@

# The main job: tiny Mistral + bundled chat data -> fine-tune under the dashboard -> eval -> generate -> export.
demo: system-deps $(VENV)/.base
	$(BIN)/mlx-mistral demo --out demo_out

# The whole test suite (installs the test extras, including llama.cpp through llama-cpp-python).
test: system-deps $(VENV)/.test
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow and not llama"

# The thesis experiment (docs/thesis.md): ~36 min on 2 CPU cores, ~24 min once the base is cached.
# On a Mac at a larger scale: make thesis THESIS_CONFIG=bench/thesis/mac.yaml
THESIS_CONFIG ?= bench/thesis/config.yaml
thesis: system-deps $(VENV)/.base
	$(BIN)/python -m bench.thesis.run --config $(THESIS_CONFIG) --out bench/thesis/results

bench: $(VENV)/.test
	$(BIN)/python bench/bench_blas.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
