# make train | make test | make bench | make sweep SWEEP=sweeps/steps.yaml
# Every target installs first, into $(VENV), and skips the install when nothing changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= experiments/default.yaml

.PHONY: install train test bench sweep clean

install: $(STAMP)

# torch and torchvision are pinned as a pair (torchvision needs its own torch release); pip takes
# them from the local wheel cache where one exists.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# W&B's sweep-config schema (its `sweeps` package pins numpy<2 but works with numpy 2)
	$(BIN)/python -m pip install -q jsonschema jsonref
	$(BIN)/python -m pip install -q --no-deps sweeps==0.3.0
	touch $(STAMP)

train: install
	$(BIN)/uqdm fit --config $(CONFIG)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/run.py

# One W&B agent per visible GPU (GPUS_PER_RUN=k: per group of k GPUs, DDP within a run); see
# docs/scale-out.md. The venv comes first on PATH: the agents run `python -m uqdm fit ...`.
SWEEP ?= sweeps/steps.yaml
GPUS_PER_RUN ?= 1

sweep: install
	PATH="$(abspath $(BIN)):$$PATH" GPUS_PER_RUN=$(GPUS_PER_RUN) bash scripts/sweep_agents.sh $(SWEEP)

clean:
	rm -rf $(VENV) runs wandb lightning_logs .pytest_cache
