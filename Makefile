# `make bench` and `make test` each do all of the set-up on a fresh machine: a virtual environment in
# .venv, the pinned requirements, and an editable build of uba_fused against that torch (no build
# isolation, so no second torch is fetched). Steps re-run only when their inputs change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.uba_fused-built

.PHONY: setup test bench demo clean

setup: $(BUILT)

$(DEPS): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $@

$(BUILT): $(DEPS) pyproject.toml setup.py $(wildcard csrc/*)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

test: $(BUILT)
	$(PY) -m uba_fused.env
	$(PY) -m pytest -q --durations=20 tests

bench: $(BUILT)
	$(PY) -m uba_fused.env
	$(PY) -m uba_fused.bench --json bench.json --plot bench.png

demo: $(BUILT)
	$(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) build *.egg-info uba_fused/*.so
