"""Named parameter sets: the shapes of real architectures' parameters (no weights needed).

Tensors with ``dim() >= 2`` are ND-Adam vectors (one row per output unit, Linear weights as
``[out, in]``); the rest are scalars. ``build(name, ...)`` makes the tensors and their grads.

``SETS`` are architectures; ``ROW_LENGTH_SETS`` (``rows-768`` ... ``rows-8192``, never run by
default) hold one row length each, for how the step's speed depends on the row length alone.
"""

from __future__ import annotations

import torch

__all__ = ["SETS", "GPU_ONLY", "ROW_LENGTH_SETS", "shapes", "build"]


def _wide_resnet(depth: int = 28, width: int = 10, classes: int = 10) -> list[tuple[int, ...]]:
    """WRN-depth-width for CIFAR (the paper's network): 3x3 convs, 1x1 shortcuts, BN, one fc."""
    blocks = (depth - 4) // 6
    channels = [16, 16 * width, 32 * width, 64 * width]
    out = [(16, 3, 3, 3)]
    for stage in range(3):
        c_in, c_out = channels[stage], channels[stage + 1]
        for block in range(blocks):
            first_in = c_in if block == 0 else c_out
            out += [(first_in,), (first_in,)]  # BN gain and bias before the block
            out += [(c_out, first_in, 3, 3), (c_out,), (c_out,), (c_out, c_out, 3, 3)]
            if block == 0 and c_in != c_out:
                out.append((c_out, c_in, 1, 1))
    out += [(channels[-1],), (channels[-1],), (classes, channels[-1]), (classes,)]
    return out


def _transformer(layers: int, d_model: int, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """GPT-2-style decoder: per layer qkv, attention out, MLP in/out (Linear [out, in]), LNs."""
    out = [(vocab, d_model), (context, d_model)]
    for _ in range(layers):
        out += [(d_model,), (d_model,), (3 * d_model, d_model), (3 * d_model,), (d_model, d_model), (d_model,)]
        out += [(d_model,), (d_model,), (4 * d_model, d_model), (4 * d_model,), (d_model, 4 * d_model), (d_model,)]
    out += [(d_model,), (d_model,)]
    return out


def _llama_mlp(layers: int = 1, d_model: int = 4096, d_ff: int = 11008) -> list[tuple[int, ...]]:
    """Llama-2-7B's MLP blocks with their RMSNorm gains: gate and up ``[d_ff, d_model]``, down
    ``[d_model, d_ff]``, whose rows of 11,008 are past the exact form's 8,192 cut-over."""
    out = []
    for _ in range(layers):
        out += [(d_model,), (d_ff, d_model), (d_ff, d_model), (d_model, d_ff)]
    return out


def _many_small(count: int = 2000) -> list[tuple[int, ...]]:
    """Launch overhead: many small tensors (a fixed mix of short and odd row lengths, and biases)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        rows, cols = (int(x) for x in torch.randint(1, 65, (2,), generator=generator))
        out.append((rows, cols) if i % 4 else (rows,))
    return out


def _uniform_rows(row_length: int, tensors: int = 7, elements_per_tensor: int = 640 * 5760) -> list[tuple[int, ...]]:
    """``tensors`` matrices with rows of ``row_length``, each of about ``elements_per_tensor``
    elements (by default the size of WRN-28-10's seven stage-3 convolutions, ``[640, 5760]``)."""
    rows = max(1, round(elements_per_tensor / row_length))
    return [(rows, row_length)] * tensors


SETS = {
    "wrn-16-4": lambda: _wide_resnet(16, 4),
    "wrn-28-10": lambda: _wide_resnet(28, 10),
    "gpt2-small": lambda: _transformer(12, 768),
    "gpt2-medium": lambda: _transformer(24, 1024),
    "transformer-1.3b": lambda: _transformer(24, 2048),
    "llama-7b-mlp": _llama_mlp,
    "many-small": _many_small,
}
#: Too large for a CPU machine's time budget.
GPU_ONLY = {"transformer-1.3b"}

#: One row length per set (the row lengths of GPT-2, WRN-28-10 and the 1.3B set), about 25.8M
#: elements each: asked for by name (``--sets rows-768,rows-5760``), never part of a default run.
ROW_LENGTH_SETS = {f"rows-{length}": (lambda length=length: _uniform_rows(length)) for length in (768, 1440, 2880, 5760, 8192)}


def shapes(name: str) -> list[tuple[int, ...]]:
    make = SETS.get(name) or ROW_LENGTH_SETS.get(name)
    if make is None:
        raise ValueError(f"unknown parameter set {name!r}; choose from {', '.join([*SETS, *ROW_LENGTH_SETS])}")
    return make()


def build(name: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    """The set's parameters with random values and random gradients attached."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes(name):
        p = torch.nn.Parameter(torch.randn(shape, generator=generator, device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=generator, device=device, dtype=dtype) * 1e-2
        params.append(p)
    return params
