# oxoptim — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
RUNTIME_DEPS := "torch>=2.7" numpy
DEV_DEPS := "maturin>=1.5,<2" ziglang "pytest>=7" "hypothesis>=6" "mypy>=1.8" snownlp tqdm matplotlib lion-pytorch schedulefree prodigyopt \
            "optuna>=4" "psycopg[binary]"

.DEFAULT_GOAL := help
.PHONY: help venv build test test-rust test-aarch64 test-python stubtest demo bench clean

help: ## Show this help
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(VENV)/.deps:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(RUNTIME_DEPS) $(DEV_DEPS)
	$(PIP) install -q --ignore-installed "maturin>=1.5,<2"  # its script must live in the venv
	# Reference packages of some tests, without their dependencies (they must not change torch).
	$(PIP) install -q --no-deps torch-optimi
	$(PIP) install -q --no-deps bitsandbytes || echo "bitsandbytes did not install: its comparison tests will be skipped"
	touch $@

venv: $(VENV)/.deps ## Create .venv (reuses a system torch if present) with runtime and dev deps

build: venv ## Build the Rust extension (release, LTO) into .venv
	$(PY) -m maturin develop --release -q

test-rust: ## Rust tests: kernels, SIMD vs scalar, dispatch
	cargo test --release -q

# The aarch64 (NEON) kernels under qemu-user; `.ci/aarch64-tools.sh` installs what it needs.
AARCH64 := aarch64-unknown-linux-gnu
test-aarch64: ## Rust core tests on aarch64 (the NEON path) under qemu-user, and the bindings compiled for it
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
	OXOPTIM_EXHAUSTIVE_DIVISORS=1 cargo test -p oxoptim-core --release -q --target $(AARCH64)
	cargo check -p oxoptim-python --release -q --target $(AARCH64)

test-python: build ## Python tests: equivalence with torch.optim (hypothesis), state_dict interchange
	$(PY) -m pytest -q

stubtest: build ## Check the hand-written _core.pyi against the built module
	$(PY) -m mypy.stubtest oxoptim._core

typecheck: ## Type-check the Python package (mypy, settings in pyproject.toml)
	$(PY) -m mypy python/oxoptim

test: test-rust test-python stubtest typecheck ## All tests (Rust and Python)

demo: build ## The main job: multi-stage training of the seed BiGRU on snownlp review sentiment
	$(PY) -m oxoptim train

bench: build ## Benchmark against torch's for-loop, foreach and fused paths (writes benches/results/)
	$(PY) benches/compare_torch.py

clean: ## Remove build outputs and the venv
	cargo clean
	rm -rf $(VENV) dist
