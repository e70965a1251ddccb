"""Mixed precision: GradScaler inside the step, bf16 master weights, stochastic rounding (issue 12).

Every test runs on every backend that runs on the CPU (Triton under its interpreter); the same
tests run on CUDA in benchmarks/gpu_check.sh.
"""

import copy
import io
import os

import pytest
import torch
from torch import nn

from ndadam_fused import NDAdam
from ndadam_fused.rounding import random_bits, stochastic_round_to_bfloat16

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu"
BACKENDS = ["reference", "native", "triton"]


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(DEVICE, dtype)


def _batch(seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=generator).to(DEVICE, dtype), torch.randn(16, 3, generator=generator).to(DEVICE, dtype)


def _state_snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


# ---------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inf_gradient_changes_nothing_bit_for_bit(backend):
    model = _model()
    opt = NDAdam(model.parameters(), lr=1e-2, vector_lr=0.05, backend=backend)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**8)
    for seed in range(3):
        x, y = _batch(seed)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = _state_snapshot(opt)
    scale = scaler.get_scale()
    x, y = _batch(10)
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    model[0].weight.grad[1, 2] = float("inf")
    model[2].bias.grad[0] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale  # the scaler saw the inf
    for before, p in zip(params, model.parameters()):
        assert torch.equal(before, p)
    for p, entries in opt.state.items():
        for key, value in entries.items():
            assert torch.equal(state[id(p)][key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [False, True], ids=["in-kernel-unscale", "unscale_-then-clip"])
def test_a_scaled_run_equals_unscaled_training(backend, clip):
    plain, scaled = _model(), _model()
    plain_opt = NDAdam(plain.parameters(), lr=1e-2, vector_lr=0.05, backend=backend)
    opt = NDAdam(scaled.parameters(), lr=1e-2, vector_lr=0.05, backend=backend)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12, growth_interval=1000)
    for seed in range(8):
        x, y = _batch(seed)
        plain_opt.zero_grad()
        nn.functional.mse_loss(plain(x), y).backward()
        if clip:
            nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()

        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(scaled(x), y)).backward()
        if clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(scaled.parameters(), 1.0)
        else:
            grads_before = {p: p.grad.clone() for p in scaled.parameters()}
            scale = scaler.get_scale()
        scaler.step(opt)
        if not clip:
            # The scaler did not unscale the gradients: the step divided them on the fly. The
            # vector kernels read them only; the scalars' Adam leaves them unscaled, as torch's
            # fused Adam does, in every backend.
            for group in opt.param_groups:
                for p in group["params"]:
                    expected = grads_before[p] if group["vector"] else grads_before[p] / scale
                    assert torch.equal(expected, p.grad), group["vector"]
        scaler.update()
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- bf16 without losing small updates


def _stall_problem(mode, backend, steps=300, lr=2e-4):
    """lr 2e-4 on [32, 256] bf16 rows (issue 12's measurement); the fp32 run as the truth."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(32, 256, generator=generator)
    grads = [torch.randn(32, 256, generator=generator) for _ in range(8)]
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    w = nn.Parameter(start.to(DEVICE, dtype))
    options = {"master": dict(master_weights=True), "stochastic": dict(stochastic_rounding=True)}.get(mode, {})
    opt = NDAdam([w], lr=lr, betas=(0.9, 0.99), backend=backend if mode != "fp32" else "reference", **options)
    first = w.detach().float().clone()
    for t in range(steps):
        w.grad = grads[t % len(grads)].to(DEVICE, dtype)
        opt.step()
    return first, w.detach().float(), opt, w


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_and_stochastic_rounding_keep_small_bf16_updates(backend):
    first, truth, _, _ = _stall_problem("fp32", backend)
    assert (truth - first).abs().mean() > 1e-3  # the fp32 run moves
    _, nearest, _, _ = _stall_problem("nearest", backend)
    stalled_error = (nearest - truth).abs().mean()
    for mode in ("master", "stochastic"):
        _, result, _, _ = _stall_problem(mode, backend)
        error = (result - truth).abs().mean()
        assert error < 0.5 * stalled_error, (mode, float(error), float(stalled_error))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["master", "stochastic"])
def test_bf16_modes_resume_bit_for_bit(backend, mode):
    _, _, opt, w = _stall_problem(mode, backend, steps=5, lr=1e-2)
    if mode == "master":
        master = opt.state[w]["master_param"]
        assert master.dtype == torch.float32 and master.shape == w.shape
        torch.testing.assert_close(master.to(torch.bfloat16), w.detach(), rtol=0, atol=0)
    else:
        assert opt.state[w]["rounding_seed"].dtype == torch.int64
    buffer = io.BytesIO()
    torch.save({"w": w.detach().clone(), "opt": opt.state_dict()}, buffer)
    generator = torch.Generator().manual_seed(7)
    grads = [torch.randn(32, 256, generator=generator).to(DEVICE, torch.bfloat16) for _ in range(4)]
    for g in grads:
        w.grad = g
        opt.step()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = nn.Parameter(saved["w"])
    options = dict(master_weights=True) if mode == "master" else dict(stochastic_rounding=True)
    resumed_opt = NDAdam([resumed], lr=1e-2, betas=(0.9, 0.99), backend=backend, **options)
    resumed_opt.load_state_dict(saved["opt"])
    for g in grads:
        resumed.grad = g
        resumed_opt.step()
    assert torch.equal(resumed, w)
    for key, value in opt.state[w].items():
        assert torch.equal(resumed_opt.state[resumed][key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_of_bf16_scalars(backend):
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(64).to(DEVICE, torch.bfloat16))
    opt = NDAdam([bias], lr=1e-4, master_weights=True, backend=backend)
    start = bias.detach().clone()
    for _ in range(50):
        bias.grad = torch.ones_like(bias)
        opt.step()
    master = opt.state[bias]["master_param"]
    # Adam moves each element by lr / (1 + eps) per step: 5e-3 in all, below one bf16 ulp (7.8e-3
    # at 1) per 50 steps; the fp32 master keeps it to fp32 rounding (50 additions).
    torch.testing.assert_close(master, start.float() - 50 * 1e-4, rtol=0, atol=1e-5)
    assert torch.equal(bias.detach(), master.to(torch.bfloat16))


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x = torch.full((200_000,), 1.0 + 2.0**-10)  # 1/8 of the way from 1 to the next bf16 (1 + 2^-7)
    seed, step = torch.tensor(12345), torch.tensor(3.0)
    rounded = stochastic_round_to_bfloat16(x, seed, step).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(rounded.mean().item() - x[0].item()) < 2e-5
    assert torch.equal(rounded, stochastic_round_to_bfloat16(x, seed, step).float())
    assert not torch.equal(rounded, stochastic_round_to_bfloat16(x, seed, torch.tensor(4.0)).float())
    bits = random_bits(seed, step, 1 << 16)
    assert bits.min() >= 0 and bits.max() < 1 << 16 and bits.unique().numel() > 0.6 * (1 << 16)


def test_bad_mixed_precision_options_are_refused():
    w = nn.Parameter(torch.randn(3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"is float16: stochastic_rounding rounds to bfloat16 only"):
        NDAdam([w], stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"master_weights and stochastic_rounding .* choose one"):
        NDAdam([w], master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"'master_weights' must be True or False"):
        NDAdam([{"params": [w], "master_weights": 1}])


def test_the_scalars_adam_op_declares_what_it_mutates():
    """With a grad_scale torch's fused Adam writes the unscaled gradients back: the custom op that
    torch.compile sees must say so (opcheck compares the schema with what the op mutates)."""
    from ndadam_fused.backends.scalars import fused_adam_

    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(7, generator=generator), torch.randn(3, 5, generator=generator)]
    grads = [torch.randn(p.shape, generator=generator) * 1024 for p in params]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    for grad_scale, found_inf in ((None, None), (torch.tensor(1024.0), torch.tensor(0.0))):
        torch.library.opcheck(fused_adam_, (params, grads, exp_avgs, exp_avg_sqs, steps, torch.tensor(0.01),
                                            0.9, 0.99, 1e-8, 0.0, grad_scale, found_inf))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounding_seeds_survive_a_reload(backend):
    """torch's load_state_dict casts every state tensor of a bf16 param to bf16: a seed (32 bits)
    would lose most of them, and a resumed run would round with other random bits."""
    generator = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(8, 16, generator=generator).to(DEVICE, torch.bfloat16)) for _ in range(3)]
    opt = NDAdam(params, lr=1e-2, backend=backend, stochastic_rounding=True)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(DEVICE, torch.bfloat16)
    opt.step()
    seeds = [opt.state[p]["rounding_seed"].clone() for p in params]
    assert len({int(s) for s in seeds}) == 3 and max(int(s) for s in seeds) > 2**16
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = NDAdam(twin, lr=1e-2, backend=backend, stochastic_rounding=True)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q, seed in zip(params, twin, seeds):
        assert twin_opt.state[q]["rounding_seed"].dtype == torch.int64
        assert torch.equal(twin_opt.state[q]["rounding_seed"], seed)
        q.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
