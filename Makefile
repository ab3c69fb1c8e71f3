# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

demo: setup
	$(BIN)/ablate run sweeps/demo.yaml
	$(BIN)/ablate rank sweeps/demo.yaml
	$(BIN)/ablate report sweeps/demo.yaml

bench: setup
	$(BIN)/python bench/run.py
	$(BIN)/python bench/eval_bench.py
	$(BIN)/python bench/rank_bench.py --repeats 3
	$(BIN)/python bench/data_memory.py
	$(BIN)/python bench/eval_split_bench.py
	$(BIN)/python bench/save_bench.py
	$(BIN)/python bench/sharded_save.py
	$(BIN)/python bench/log_truncate.py --mb 50  # docs/benchmarks.md: the 477 MB run

PY_SOURCES := ablate core trainer eval tests bench

lint: setup
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)

clean:
	rm -rf runs .pytest_cache
