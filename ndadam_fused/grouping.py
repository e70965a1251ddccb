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


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and kin): a Linear whose weight is stored ``[in, out]``.

    Recognized by its name and its ``nf`` (output features) attribute, without importing
    transformers: its hidden units are the weight's columns (unit_dim 1).
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def _unit_dim_of(module: nn.Module, local_name: str, param: Tensor) -> int | None:
    """The unit_dim of ``param`` as ``module``'s parameter ``local_name``; None: not a vector there."""
    if local_name != "weight" or param.dim() < 2:
        return None
    if is_vector_module(module):
        return 0
    if _is_transformers_conv1d(module):
        return 1
    return None


def param_groups(
    model: nn.Module,
    *,
    lr: float | None = None,
    vector_lr: float | None = None,
    exclude: Iterable[type[nn.Module]] = (),
    exclude_names: Iterable[str] = (),
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into ND-Adam vector groups and a scalar group.

    Vectors: the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (each row, or each
    output channel, is one hidden unit's input weights), and of Hugging Face's ``Conv1D``
    (GPT-2's layers, weights stored ``[in, out]``: each column is a unit's input weights; they
    get a group of their own with ``"unit_dim": 1``). Scalars: everything else (biases, norm
    gains, embeddings, transposed-conv weights, parameters registered directly on a module),
    weights whose units have a single input (``Linear(1, d)``: a direction in one dimension
    cannot change), every parameter that an exclusion names, and a weight shared between an
    embedding and a Linear head (GPT-2's ``wte`` and ``lm_head``): such a tied weight is an
    embedding, whichever module the model lists first. A parameter is a vector only when every
    module that owns it owns it as a vector weight.

    The paper's settings (official code): ``lr=1e-3`` for scalars and ``vector_lr=0.05``
    (50x the scalar lr), with ``NDAdam(..., betas=(0.9, 0.99))`` as its PyTorch code uses and a
    cosine lr schedule over the whole run::

        groups = ndadam_fused.param_groups(model, lr=1e-3, vector_lr=0.05, exclude=(nn.Embedding,))
        opt = NDAdam(groups, betas=(0.9, 0.99))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    or, equivalently, ``NDAdam(param_groups(model), lr=1e-3, vector_lr=0.05, ...)``.

    Args:
        model: the module whose parameters to group. Parameters with ``requires_grad=False`` are
            left out (frozen); a parameter shared by several modules appears once.
        lr: learning rate of the scalar group, and of the vector groups when ``vector_lr`` is
            None. None (the default): the groups carry no ``"lr"`` and take NDAdam's ``lr`` and
            ``vector_lr``.
        vector_lr: learning rate of the vector groups; None means ``lr`` (as in ``NDAdam``).
        exclude: module types whose parameters are all scalars, including those of their
            submodules (e.g. ``(nn.Embedding,)`` or a whole attention block's class).
        exclude_names: parameter names (as ``model.named_parameters()`` spells them) or
            ``fnmatch`` patterns (``"head.*"``, ``"*.gate.weight"``) that are scalars. Use it for
            a weight that must not be normalized, such as a zero-initialized layer (ND-Adam
            cannot normalize an all-zero row). A pattern that matches no parameter is an error,
            so that a typo does not silently leave a weight in the vector group.
        group_options: other options set on every group (``weight_decay``, ``betas``, ...).

    Returns:
        Up to three groups, the vector groups first, each with ``"vector": True/False`` (vector
        groups also ``"unit_dim"``), ``"lr"`` where one was given, and ``(name, tensor)`` pairs
        as ``"params"`` (so optimizer errors and state dicts name the parameters). ``NDAdam``
        keeps such groups as they are; an empty group is left out.
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
    for key in ("params", "vector", "unit_dim", "lr", "vector_lr"):
        if key in group_options:
            raise ValueError(f"param_groups: '{key}' is set by param_groups itself")

    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    uninitialized = [name for name, param in named if isinstance(param, nn.parameter.UninitializedParameter)]
    if uninitialized:
        raise ValueError(
            f"param_groups: {uninitialized} are not initialized yet (lazy modules); run one forward "
            "pass before building the optimizer, so that their shapes are known"
        )

    # Every (module, role) that owns each parameter: it is a vector (with that unit_dim) only
    # when every owner uses it as a vector weight with the same unit_dim and none is excluded.
    unit_dims: dict[int, set[int | None]] = {}
    excluded_ids: set[int] = set()
    excluded_prefixes: list[str] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        inside_excluded = isinstance(module, exclude) or any(
            prefix == "" or module_name == prefix or module_name.startswith(prefix + ".")
            for prefix in excluded_prefixes
        )
        if isinstance(module, exclude):
            excluded_prefixes.append(module_name)
        for local_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if inside_excluded:
                excluded_ids.add(id(param))
            unit_dims.setdefault(id(param), set()).add(_unit_dim_of(module, local_name, param))

    unmatched = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named)]
    if unmatched:
        known = ", ".join(name for name, _ in named[:8]) + (", ..." if len(named) > 8 else "")
        raise ValueError(
            f"param_groups: exclude_names {unmatched} match no trainable parameter of the model "
            f"(its parameters are named like: {known})"
        )

    vectors: dict[int, list[tuple[str, Tensor]]] = {0: [], 1: []}
    scalars: list[tuple[str, Tensor]] = []
    for name, param in named:
        owners = unit_dims.get(id(param), {None})
        excluded = id(param) in excluded_ids or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        unit_dim = next(iter(owners)) if len(owners) == 1 else None
        single_input = unit_dim is not None and param.numel() > 0 and param.numel() == param.shape[unit_dim]
        if unit_dim is None or excluded or single_input:
            scalars.append((name, param))
        else:
            vectors[unit_dim].append((name, param))
    if not any(vectors.values()) and not scalars:
        raise ValueError("param_groups: the model has no trainable parameters")

    groups = []
    vector_lr = lr if vector_lr is None else vector_lr
    for unit_dim, params in vectors.items():
        if params:
            group = {**group_options, "params": params, "vector": True, "unit_dim": unit_dim}
            if vector_lr is not None:
                group["lr"] = vector_lr
            groups.append(group)
    if scalars:
        group = {**group_options, "params": scalars, "vector": False}
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return groups
