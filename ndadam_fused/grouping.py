"""Param groups the way the paper splits a model: hidden units' input weights are vectors.

ND-Adam treats the input weight vector of every hidden unit as one unit-norm vector. In a
PyTorch model those are the weights of ``nn.Linear`` layers (one row per output unit) and of
convolutions (one output channel per row). Everything else is a scalar updated by Adam.
:class:`~ndadam_fused.NDAdam` splits a plain parameter list by ``dim() >= 2``, which also
catches 2-D tensors that are not hidden units' inputs (embedding tables, positional
embeddings, attention's packed projections); :func:`param_groups` looks at the modules instead.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

__all__ = ["param_groups", "is_vector_module"]

# Transposed convolutions are left out on purpose: their weight is [in, out / groups, kh, kw],
# so a row of reshape(shape[0], -1) is what one INPUT channel feeds forward, not a unit's input.
_VECTOR_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_vector_module(module: nn.Module) -> bool:
    """True for the modules whose ``weight`` rows are hidden units' input weights (Linear, Conv1-3d)."""
    return isinstance(module, _VECTOR_MODULE_TYPES)


def param_groups(
    model: nn.Module,
    *,
    lr: float = 1e-3,
    vector_lr: float | None = None,
    exclude: Iterable[type[nn.Module]] = (),
    exclude_names: Iterable[str] = (),
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into an ND-Adam vector group and a scalar group.

    Vectors: the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (each row, or each
    output channel, is one hidden unit's input weights). Scalars: everything else (biases,
    norm gains, embeddings, transposed-conv weights, parameters registered directly on a module),
    plus every parameter that an exclusion names.

    The paper's settings (official code): ``lr=1e-3`` for scalars and ``vector_lr=0.05``
    (50x the scalar lr), with ``NDAdam(..., betas=(0.9, 0.99))`` as its PyTorch code uses and a
    cosine lr schedule over the whole run::

        groups = ndadam_fused.param_groups(model, lr=1e-3, vector_lr=0.05, exclude=(nn.Embedding,))
        opt = NDAdam(groups, betas=(0.9, 0.99))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    Args:
        model: the module whose parameters to group. Parameters with ``requires_grad=False`` are
            left out (frozen); a parameter shared by several modules appears once.
        lr: learning rate of the scalar group.
        vector_lr: learning rate of the vector group; None means ``lr`` (as in ``NDAdam``).
        exclude: module types whose parameters are all scalars, including those of their
            submodules (e.g. ``(nn.Embedding,)`` or a whole attention block's class).
        exclude_names: parameter names (as ``model.named_parameters()`` spells them) or
            ``fnmatch`` patterns (``"head.*"``, ``"*.gate.weight"``) that are scalars. Use it for
            a weight that must not be normalized, such as a zero-initialized layer (ND-Adam
            cannot normalize an all-zero row). A pattern that matches no parameter is an error,
            so that a typo does not silently leave a weight in the vector group.
        group_options: other options set on both groups (``weight_decay``, ``betas``, ...).

    Returns:
        Up to two groups, the vector group first, each with ``"vector": True/False``, its
        ``"lr"`` and ``(name, tensor)`` pairs as ``"params"`` (so optimizer errors and state
        dicts name the parameters). ``NDAdam`` keeps such groups as they are; an empty group is
        left out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: model must be an nn.Module, got {type(model).__name__}")
    exclude = tuple(exclude)
    for excluded_type in exclude:
        if not (isinstance(excluded_type, type) and issubclass(excluded_type, nn.Module)):
            raise TypeError(f"param_groups: exclude must hold nn.Module subclasses, got {excluded_type!r}")
    if isinstance(exclude_names, str):
        exclude_names = (exclude_names,)
    patterns = tuple(exclude_names)
    for key in ("params", "vector"):
        if key in group_options:
            raise ValueError(f"param_groups: '{key}' is set by param_groups itself")

    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    uninitialized = [name for name, param in named if isinstance(param, nn.parameter.UninitializedParameter)]
    if uninitialized:
        raise ValueError(
            f"param_groups: {uninitialized} are not initialized yet (lazy modules); run one forward "
            "pass before building the optimizer, so that their shapes are known"
        )

    # Whether each parameter is a vector, decided from every module that owns it: it is a
    # vector when a vector module owns it as its "weight" and no excluded module owns it.
    owned_as_vector: dict[int, bool] = {}
    excluded_ids: set[int] = set()
    excluded_prefixes: list[str] = []
    for module_name, module in model.named_modules():
        inside_excluded = isinstance(module, exclude) or any(
            prefix == "" or module_name == prefix or module_name.startswith(prefix + ".")
            for prefix in excluded_prefixes
        )
        if isinstance(module, exclude):
            excluded_prefixes.append(module_name)
        for local_name, param in module.named_parameters(recurse=False):
            key = id(param)
            if inside_excluded:
                excluded_ids.add(key)
            is_vector = local_name == "weight" and is_vector_module(module) and param.dim() >= 2
            owned_as_vector[key] = owned_as_vector.get(key, False) or is_vector

    unmatched = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named)]
    if unmatched:
        known = ", ".join(name for name, _ in named[:8]) + (", ..." if len(named) > 8 else "")
        raise ValueError(
            f"param_groups: exclude_names {unmatched} match no trainable parameter of the model "
            f"(its parameters are named like: {known})"
        )

    vectors: list[tuple[str, Tensor]] = []
    scalars: list[tuple[str, Tensor]] = []
    for name, param in named:
        excluded = id(param) in excluded_ids or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        if owned_as_vector.get(id(param), False) and not excluded:
            vectors.append((name, param))
        else:
            scalars.append((name, param))
    if not vectors and not scalars:
        raise ValueError("param_groups: the model has no trainable parameters")

    groups = []
    if vectors:
        groups.append({**group_options, "params": vectors, "vector": True, "lr": lr if vector_lr is None else vector_lr})
    if scalars:
        groups.append({**group_options, "params": scalars, "vector": False, "lr": lr})
    return groups
