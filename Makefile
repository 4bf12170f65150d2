# Two commands on a fresh machine: `make train` and `make test`; each installs what it needs.
PYTHON ?= python3
# The CPU wheel on developer/CI machines; GPU users set TORCH="torch==2.13.0" with their index.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test chaos lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so no later requirement can pull a different (CUDA) build
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(BIN)/python -m trainer.train experiment=t2v_tiny $(ARGS)

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

# a 4-process run SIGKILLed on a random rank 10 times, restarted each time, against an
# uninterrupted one (tests/chaos.py); CHAOS_ARGS="--kills 20 --seed 7 --dir /tmp/chaos"
CHAOS_ARGS ?= --kills 10
chaos: install
	OMP_NUM_THREADS=1 $(BIN)/python -m tests.chaos $(CHAOS_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/step.py
	$(BIN)/python bench/text_following.py checkpoint=runs/t2v_tiny
	$(BIN)/python bench/parallel_comm.py
	$(BIN)/python bench/cp_memory.py
	$(BIN)/python bench/long_context.py

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
