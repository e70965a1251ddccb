# Fresh machine: `make test` creates .venv, installs torch and the package with its test
# extras, and runs the suite. `make demo` runs the main job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -n 2 tests

demo: install
	$(PY) -m benchmarks.mlp_demo

clean:
	rm -rf $(VENV) build *.egg-info
