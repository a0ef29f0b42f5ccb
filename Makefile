# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
EXTRAS ?= cpu,dev,compare
RUN    ?= runs/demo

# Offline by default: no hub lookups, W&B files on disk, Ray on 127.0.0.1, DeepSpeed on CPU.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# kronfluence 1.0.1 pins an old torch range; its runtime deps come from the `compare` extra.
	$(PIP) install --quiet --no-deps kronfluence==1.0.1
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dastra demo --run-dir $(RUN)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_fit_score.py

clean:
	rm -rf $(VENV) runs .pytest_cache
