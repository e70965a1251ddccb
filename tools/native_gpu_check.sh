#!/usr/bin/env bash
# The native backend's GPU check, for a machine with an NVIDIA GPU (CI has none): build
# ndadam_fused._C with its CUDA kernel and run the CUDA variants of tests/test_native.py
# (the section-7 matrix, both paths, launch count, cut-over limit) against the reference.
#
#   bash tools/native_gpu_check.sh        # PYTHON, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS, OUT optional
#
# Needs a Python with a CUDA build of torch and pytest. The log goes to $OUT (when set, as on
# the device machines) or benchmarks/results/, as native_gpu_check.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/native_gpu_check.txt"

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    MAX_JOBS=${MAX_JOBS:-16} NDADAM_REQUIRE_EXTENSION=1 "$PY" setup.py build_ext --inplace
  # The CUDA tests skip without a GPU or a CUDA build; here a skip would hide a failure.
  "$PY" -c "import torch, ndadam_fused._C as C; assert torch.cuda.is_available() and C.BUILT_WITH_CUDA, 'no GPU or no CUDA kernel'"
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_native.py -k cuda
} 2>&1 | tee "$LOG"
