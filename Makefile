# Fresh machine: `make test` creates .venv, installs torch and the package with its test
# extras, and runs the suite. `make demo` runs the main job: the short version of the paper's
# experiment (benchmarks/generalization.py --quick); `make experiment` runs the full one.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1

.PHONY: install test demo experiment clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,experiment]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -n 2 tests

demo: install
	$(PY) -m benchmarks.generalization --quick

# The full run (23.5 min wall, 39 min CPU on 2 shared cores); it rewrites benchmarks/results/generalization/.
experiment: install
	nice $(PY) -m benchmarks.generalization

clean:
	rm -rf $(VENV) build *.egg-info
