# mlx-mistral: the two set-up commands are `make demo` (the main job) and `make test` (the whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-fast system-deps bench thesis thesis2 clean

# The GGUF judge (llama.cpp through llama-cpp-python), built portably: a build tuned to the build machine's
# CPU (GGML_NATIVE, the default of a plain `pip install`) segfaulted on another CPU of the same machine kind.
# The wheel is built once into a git-ignored folder named by its version and flags; pip's own cache cannot
# tell a native build from a portable one, so it is neither read nor written for this build.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
empty :=
space := $(empty) $(empty)
LLAMA_WHEELS := .wheels/llama-cpp-python-$(LLAMA_VERSION)-$(subst $(space),-,$(subst =,_,$(subst -D,,$(LLAMA_CMAKE_ARGS))))

# Debian/Ubuntu: OpenBLAS for MLX's CPU backend (see mlx_mistral/backends/_blas.py); needs root, skipped otherwise.
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
	$(PIP) -e ".[test]"
	touch $@

$(LLAMA_WHEELS)/.built: | $(BIN)/python
	@echo "building llama-cpp-python $(LLAMA_VERSION) with CMAKE_ARGS=\"$(LLAMA_CMAKE_ARGS)\" (once; ~5-15 min on 2 cores)"
	mkdir -p $(LLAMA_WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(LLAMA_WHEELS) \
	  llama-cpp-python==$(LLAMA_VERSION)
	touch $@

$(VENV)/.llama: $(VENV)/.test $(LLAMA_WHEELS)/.built
	$(PIP) diskcache jinja2 numpy typing-extensions
	$(BIN)/pip install -q --no-index --no-deps --force-reinstall --find-links $(LLAMA_WHEELS) \
	  llama-cpp-python==$(LLAMA_VERSION)
	touch $@

# The main job: tiny Mistral -> pre-train -> LoRA fine-tune under the dashboard -> before/after on held-out prompts -> export.
demo: system-deps $(VENV)/.base
	$(BIN)/mlx-mistral demo --out demo_out

# The whole test suite (installs the test extras and the portable llama.cpp judge).
# MLX_MISTRAL_REQUIRE_LLAMA=1 / MLX_MISTRAL_REQUIRE_GO=1: the llama.cpp tests and the Ollama template tests
# (Go's text/template) fail instead of skipping when llama-cpp-python or Go is missing.
test: system-deps $(VENV)/.llama
	MLX_MISTRAL_REQUIRE_LLAMA=1 MLX_MISTRAL_REQUIRE_GO=1 $(BIN)/python -m pytest -q

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow and not llama"

# The thesis experiment (docs/thesis.md): ~36 min on 2 CPU cores, ~24 min once the base is cached.
# On a Mac at a larger scale: make thesis THESIS_CONFIG=bench/thesis/mac.yaml
THESIS_CONFIG ?= bench/thesis/config.yaml
thesis: system-deps $(VENV)/.base
	$(BIN)/python -m bench.thesis.run --config $(THESIS_CONFIG) --out bench/thesis/results

# Round two (short records, per-recipe best lr, factor controls, runs to a flat eval curve): two fine-tunes
# at a time, about 70 min on 2 CPU cores from an empty cache (docs/thesis.md). A rerun reuses every
# finished fine-tune.
thesis2: system-deps $(VENV)/.base
	$(BIN)/python -m bench.thesis.round2 --config bench/thesis/round2.yaml --out bench/thesis/results2 --workers 2

bench: $(VENV)/.test
	$(BIN)/python bench/bench_blas.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache  # keeps .wheels/ (the llama.cpp build)
