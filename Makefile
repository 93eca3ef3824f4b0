# Two entry points (see README): `make quickstart` runs the main job, `make test` runs the test suite.
# Both create ./.venv on first use and install the project into it (CPU torch, verl 0.9.1, dev tools).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: quickstart test test-multiproc install lint bench clean

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
	$(PY) -m pytest -m "not multiproc"

# Several training processes / Ray nodes on this one machine (torchrun SFT x2, 2 FSDP ranks, 2 Ray nodes): minutes
# each on 2 cores, so a stage of its own (docs/cluster.md); .ci/run calls it after `make test`.
test-multiproc: $(STAMP)
	$(PY) -m pytest -m multiproc tests/test_multi*.py

bench: $(STAMP)
	$(PY) benchmarks/retrieval.py --quick

clean:
	rm -rf runs/quickstart .pytest_cache
