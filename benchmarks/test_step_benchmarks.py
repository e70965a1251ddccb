"""pytest-benchmark cases for the optimizer step, kept out of the default test run.

    python -m pytest benchmarks/test_step_benchmarks.py --benchmark-only --benchmark-autosave
    python -m pytest benchmarks/test_step_benchmarks.py --benchmark-only --benchmark-compare

Sets: the small ones by default; NDADAM_BENCH_SETS=gpt2-small,... for more. On a GPU the
device is CUDA and every step is synchronized, so a round is a whole step.
"""

import os

import pytest
import torch

from benchmarks import param_sets
from benchmarks.step import CANDIDATES, make_candidate

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETS = os.environ.get("NDADAM_BENCH_SETS", "many-small,wrn-16-4").split(",")


@pytest.fixture(scope="module", params=SETS)
def parameter_set(request):
    return request.param, param_sets.build(request.param, DEVICE, torch.float32)


@pytest.mark.parametrize("candidate_name", CANDIDATES)
def test_step(benchmark, parameter_set, candidate_name):
    set_name, params = parameter_set
    candidate = make_candidate(candidate_name, params, DEVICE)
    if isinstance(candidate, str):
        pytest.skip(candidate)

    def one_step():
        candidate.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.extra_info.update(set=set_name, bytes_per_step=candidate.bytes_per_step)
    benchmark.pedantic(one_step, rounds=5, warmup_rounds=1)
