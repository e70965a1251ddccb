# Fresh machine: `make test` creates .venv, installs torch and the package with its test
# extras, builds the C++ CPU kernel in place, compiles the CUDA kernel for sm_90 with nvcc (no
# GPU needed), runs the C++ row-math test and the suite. `make demo` runs the main job: the
# short version of the paper's experiment (benchmarks/generalization.py --quick); `make
# experiment` runs the full one.
PYTHON    ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
TORCH     ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda-13.0
CSRC      := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.h csrc/cuda/*.cuh csrc/cuda/*.cu)
EXTENSION := ndadam_fused/_C.abi3.so

.PHONY: install extension cuda-compile cpp-test test demo experiment clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH)" ninja
	NDADAM_NO_EXTENSION=1 $(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,experiment]"
	touch $@

install: $(VENV)/.installed

# The C++ CPU kernel, built in place (about 30 s). CPU only: a CUDA build takes minutes, and
# cuda-compile below checks the CUDA source. A failed build fails here.
$(EXTENSION): $(VENV)/.installed $(CSRC) setup.py
	NDADAM_NO_CUDA=1 NDADAM_REQUIRE_EXTENSION=1 MAX_JOBS=2 $(PY) setup.py --quiet build_ext --inplace
	touch $@

extension: $(EXTENSION)

# nvcc on the .cu files for sm_90, to object files: a CUDA compile error, a register spill or a
# PTX check (no flush to zero, round-to-nearest per-row scalars) fails CI without a GPU.
cuda-compile: $(VENV)/.installed
	CUDA_HOME=$(CUDA_HOME) $(PY) tools/compile_cuda.py --arch sm_90

# The torch-free C++ tests, through CMake and ctest: the row math, and the CUDA kernel's device
# code, plan and table cache run on the CPU by the SIMT emulation (about 10-30 s on 2 cores).
cpp-test:
	cmake -S . -B build/cpp-test -DNDADAM_BUILD_EXTENSION=OFF > /dev/null
	cmake --build build/cpp-test
	ctest --test-dir build/cpp-test --output-on-failure

test: install extension cuda-compile cpp-test
	$(PY) -m pytest -n 2 tests

# The main job: the paper's experiment, short version (about a minute on 2 CPU cores).
demo: install extension
	$(PY) -m benchmarks.generalization --quick

# The full run (about 25 minutes on 2 CPU cores); it rewrites benchmarks/results/generalization/.
experiment: install extension
	nice $(PY) -m benchmarks.generalization

clean:
	rm -rf $(VENV) build *.egg-info $(EXTENSION)
