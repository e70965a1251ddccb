"""The comparison every fused backend passes: the same run on the backend and on the reference.

A backend's test module parametrizes :func:`compare_with_reference` over DESIGN.md section 7's
matrix (shapes, dtypes, steps, groups, re-allocated grads) for its device. Tolerances:

- float64: 1e-10, float32: 1e-5 (max abs on the unit-norm params after the run);
- bfloat16 / float16 params (fp32 state): the backend's error against a float64 reference run
  from the same start is at most twice the error the reference itself makes in that dtype.

State is compared as well as params: ``exp_avg`` and ``exp_avg_sq`` relative to their own
size, ``step`` exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ndadam_fused import NDAdam

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}

# Row lengths 1, 2, 27, 1000, 4096 and 9000 (past any single-pass limit the backends use by
# default), one-row tensors, a conv kernel, a 3-D tensor.
SECTION_7_SHAPES = [(5, 1), (7, 2), (4, 3, 3, 3), (3, 1000), (2, 4096), (1, 64), (1, 9000), (6, 4, 5)]
MANY_SMALL_SHAPES = [(1 + i % 3, 1 + i % 7) for i in range(200)]
SCALAR_SHAPES = [(10,), (1,)]


def _initial_values(shapes: Sequence[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _gradients(shapes, steps, seed) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed + 1)
    return [
        [torch.randn(shape, generator=generator, dtype=torch.float64) * 10.0 ** (2 * torch.rand(1, generator=generator).item() - 2) for shape in shapes]
        for _ in range(steps)
    ]


def _groups(params, vector_lrs, scalar_lr):
    """Vector tensors split round-robin over ``len(vector_lrs)`` groups; scalars in their own."""
    vectors = [p for p in params if p.dim() >= 2]
    scalars = [p for p in params if p.dim() < 2]
    groups = [
        {"params": vectors[i :: len(vector_lrs)], "vector": True, "lr": lr} for i, lr in enumerate(vector_lrs)
    ]
    groups = [g for g in groups if g["params"]]
    if scalars:
        groups.append({"params": scalars, "vector": False, "lr": scalar_lr})
    return groups


def run(
    backend: str,
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    steps: int,
    *,
    device: str | torch.device = "cpu",
    vector_lrs: Sequence[float] = (0.05,),
    scalar_lr: float = 0.01,
    realloc_grads: bool = False,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> tuple[list[torch.Tensor], NDAdam]:
    """Train ``shapes`` for ``steps`` on ``backend``; returns the params and the optimizer.

    With ``realloc_grads`` every other step assigns freshly allocated gradient tensors (as
    ``zero_grad(set_to_none=True)`` and a backward would) and the others write into the
    existing ones in place, so a backend's cached tables see both.
    """
    params = [torch.nn.Parameter(x.to(device=device, dtype=dtype)) for x in _initial_values(shapes, seed)]
    with warnings.catch_warnings():
        # SECTION_7_SHAPES has rows of length 1 in explicit vector groups on purpose.
        warnings.filterwarnings("ignore", message=".*rows of length 1")
        opt = NDAdam(
            _groups(params, vector_lrs, scalar_lr), lr=scalar_lr, betas=betas, eps=eps,
            weight_decay=weight_decay, backend=backend,
        )
    for t, grads in enumerate(_gradients(shapes, steps, seed)):
        for p, g in zip(params, grads):
            g = g.to(device=device, dtype=dtype)
            if p.grad is None or (realloc_grads and t % 2 == 1):
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        opt.step()
    return params, opt


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0


def compare_with_reference(backend: str, shapes, dtype, steps, **kwargs) -> dict[str, float]:
    """Run ``backend`` and the reference on the same problem and assert they agree.

    Returns the measured errors, for tests that want to report them.
    """
    params, opt = run(backend, shapes, dtype, steps, **kwargs)
    ref_params, ref_opt = run("reference", shapes, dtype, steps, **kwargs)
    errors = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    for p, q in zip(params, ref_params):
        assert p.dtype == q.dtype and p.shape == q.shape
        if p.numel() == 0:
            continue
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert state["step"].item() == ref_state["step"].item() == steps
        assert state["exp_avg"].dtype == ref_state["exp_avg"].dtype
        assert state["exp_avg_sq"].shape == ref_state["exp_avg_sq"].shape
        errors["param"] = max(errors["param"], _max_abs(p.detach(), q.detach()))
        for key in ("exp_avg", "exp_avg_sq"):
            scale = max(1.0, ref_state[key].abs().max().item())
            errors[key] = max(errors[key], _max_abs(state[key], ref_state[key]) / scale)

    if dtype in TOLERANCE:
        tol = TOLERANCE[dtype]
        assert errors["param"] <= tol, f"{backend} vs reference ({dtype}): params differ by {errors['param']:.3g} > {tol}"
        for key in ("exp_avg", "exp_avg_sq"):
            assert errors[key] <= tol, f"{backend} vs reference ({dtype}): {key} differs by {errors[key]:.3g} > {tol}"
        return errors

    # Low-precision params: judge both against a float64 run from the same (rounded) start.
    # The float64 run starts from the unrounded values: rounding the start is part of the dtype's error.
    exact_params, _ = run("reference", shapes, torch.float64, steps, **kwargs)
    backend_error = max((_max_abs(p.detach(), e.detach()) for p, e in zip(params, exact_params) if p.dim() >= 2), default=0.0)
    reference_error = max((_max_abs(q.detach(), e.detach()) for q, e in zip(ref_params, exact_params) if q.dim() >= 2), default=0.0)
    errors["vs_float64"] = backend_error
    errors["reference_vs_float64"] = reference_error
    assert backend_error <= 2 * reference_error, (
        f"{backend} ({dtype}) is {backend_error:.3g} from the float64 run; the reference is {reference_error:.3g}"
    )
    return errors
