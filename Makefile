# Quickstart: `make demo` then `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow install clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Trains the KL tokenizer on scikit-learn's bundled digits, then writes reconstructions.
demo: $(STAMP)
	$(BIN)/python -m ardiff_jax.main --config configs/kl_digits.py --workdir $(DEMO_DIR)/kl --mode train
	$(BIN)/python -m ardiff_jax.main --config configs/kl_digits.py --workdir $(DEMO_DIR)/kl --mode sample
	@echo "Pictures: $(DEMO_DIR)/kl/samples/ (originals next to reconstructions); metrics: $(DEMO_DIR)/kl/metrics.jsonl"

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
