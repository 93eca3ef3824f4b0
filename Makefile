# Two entry points (see README): `make quickstart` runs the main job, `make test` runs the test suite.
# Both create ./.venv on first use and install the project into it (CPU torch, verl 0.9.1, dev tools).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: quickstart test install lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# CPU build of torch first (on these machines the wheel lies on disk); verl then finds it satisfied.
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/masksearch-rl quickstart

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/retrieval.py --quick

clean:
	rm -rf runs/quickstart .pytest_cache
