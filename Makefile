# Quickstart: `make demo` then `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= workdirs/demo
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist), one test file each at a time: the suite is mostly XLA
# compilation, which is single-threaded, so two workers on two cores take ~2/3 of the time.
TEST_WORKERS ?= 2

.PHONY: demo demo-llamagen demo-paella test test-slow install clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The whole chain on scikit-learn's bundled digits: the KL tokenizer (and its reconstructions),
# its latent cache, MAR on those latents, class-conditional samples and their evaluation.
KL := --config configs/kl_digits.py --workdir $(DEMO_DIR)/kl
MAR := --config configs/mar_digits.py:kl=$(DEMO_DIR)/kl --workdir $(DEMO_DIR)/mar
demo: $(STAMP)
	$(BIN)/python -m ardiff_jax.main $(KL) --mode train
	$(BIN)/python -m ardiff_jax.main $(KL) --mode sample
	$(BIN)/python -m ardiff_jax.main $(KL) --mode cache
	$(BIN)/python -m ardiff_jax.main $(MAR) --mode train
	$(BIN)/python -m ardiff_jax.main $(MAR) --mode sample
	$(BIN)/python -m ardiff_jax.main $(MAR) --mode eval
	@echo "Pictures: $(DEMO_DIR)/mar/samples/grid_*.png (one row per digit class) and"
	@echo "          $(DEMO_DIR)/kl/samples/grid_*.png (originals next to reconstructions)."
	@echo "Metrics:  $(DEMO_DIR)/mar/eval/*.json (FD-clf, class accuracy, precision/recall) and"
	@echo "          $(DEMO_DIR)/mar/eval/condition_error_*.png (denoising and condition SNR per timestep)."

# The discrete chain on the same digits: the VQ tokenizer, its code cache, LlamaGen, samples, eval.
VQ := --config configs/vq_digits.py --workdir $(DEMO_DIR)/vq
LG := --config configs/llamagen_digits.py:vq=$(DEMO_DIR)/vq --workdir $(DEMO_DIR)/llamagen
demo-llamagen: $(STAMP)
	$(BIN)/python -m ardiff_jax.main $(VQ) --mode train
	$(BIN)/python -m ardiff_jax.main $(VQ) --mode sample
	$(BIN)/python -m ardiff_jax.main $(VQ) --mode cache
	$(BIN)/python -m ardiff_jax.main $(LG) --mode train
	$(BIN)/python -m ardiff_jax.main $(LG) --mode sample
	$(BIN)/python -m ardiff_jax.main $(LG) --mode eval
	@echo "Pictures: $(DEMO_DIR)/llamagen/samples/grid_*.png (one row per digit class); metrics:"
	@echo "          $(DEMO_DIR)/llamagen/eval/*.json."

# Paella on the same digits: its f = 4 VQGAN, the code cache, the U-Net token predictor, samples
# from the 12-step renoise sampler, eval.
PVQ := --config configs/paella_vq_digits.py --workdir $(DEMO_DIR)/paella_vq
PAELLA := --config configs/paella_digits.py:vq=$(DEMO_DIR)/paella_vq --workdir $(DEMO_DIR)/paella
demo-paella: $(STAMP)
	$(BIN)/python -m ardiff_jax.main $(PVQ) --mode train
	$(BIN)/python -m ardiff_jax.main $(PVQ) --mode cache
	$(BIN)/python -m ardiff_jax.main $(PAELLA) --mode train
	$(BIN)/python -m ardiff_jax.main $(PAELLA) --mode sample
	$(BIN)/python -m ardiff_jax.main $(PAELLA) --mode eval
	@echo "Pictures: $(DEMO_DIR)/paella/samples/grid_*.png (one row per digit class); metrics:"
	@echo "          $(DEMO_DIR)/paella/eval/*.json."

# The layer contract (pyproject.toml, [tool.importlinter]) first: a broken contract fails the suite.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
