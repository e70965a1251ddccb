import os

# Triton reads this when its decorators run: it must be set before the package is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The section-7 shapes of DESIGN.md: row lengths 1, 2, 27, 1000, 4096 and a long one; one-row
# tensors; a conv kernel; a 3-D tensor.
VECTOR_SHAPES = [
    (5, 1),
    (7, 2),
    (4, 3, 3, 3),
    (3, 1000),
    (2, 4096),
    (1, 64),
    (1, 9000),
    (6, 4, 5),
]
SCALAR_SHAPES = [(10,), (1,), ()]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
