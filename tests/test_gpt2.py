"""Hugging Face GPT-2 (issue 9 item 5): its Conv1D weights are stored [in, out], so each hidden
unit's input weights are a column (unit_dim 1); wte is tied to the Linear head. A tiny GPT-2 is
built from a config (no download). Skipped where transformers is not installed.
"""

import io

import pytest
import torch
from torch import nn

from ndadam_fused import NDAdam, param_groups

BACKENDS = ["reference", "native", "triton"]

transformers = pytest.importorskip("transformers")


def _tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(config)


def test_param_groups_of_gpt2_puts_conv1d_weights_in_a_unit_dim_1_group():
    model = _tiny_gpt2()
    groups = param_groups(model, lr=1e-3, vector_lr=0.05)
    by_kind = {(g["vector"], g.get("unit_dim")): [name for name, _ in g["params"]] for g in groups}
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    assert by_kind[(True, 1)] == [name + ".weight" for name in conv1d]
    # wte is tied to lm_head (a Linear): an embedding, so a scalar, and listed once.
    assert model.lm_head.weight is model.transformer.wte.weight
    scalars = by_kind[(False, None)]
    assert "transformer.wte.weight" in scalars and "lm_head.weight" not in scalars
    assert (True, 0) not in by_kind  # GPT-2 has no nn.Linear besides the tied head


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_conv1d_columns_stay_unit_and_match_the_transposed_problem(backend):
    model = _tiny_gpt2()
    opt = NDAdam(param_groups(model), lr=1e-3, vector_lr=0.05, backend=backend)
    conv1d = [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    for m in conv1d:  # normalized at construction, column by column
        torch.testing.assert_close(m.weight.norm(dim=0), torch.ones(m.nf), rtol=0, atol=1e-6)
    # The same weights as [out, in] rows, stepped by the reference with unit_dim 0.
    twins = [nn.Parameter(m.weight.detach().t().contiguous()) for m in conv1d]
    twin_opt = NDAdam([{"params": twins, "vector": True}], lr=0.05, backend="reference")
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        for m, twin in zip(conv1d, twins):
            twin.grad = m.weight.grad.t().contiguous()
        opt.step()
        twin_opt.step()
    for m, twin in zip(conv1d, twins):
        torch.testing.assert_close(m.weight.norm(dim=0), torch.ones(m.nf), rtol=0, atol=1e-5)
        torch.testing.assert_close(m.weight.detach().t(), twin.detach(), rtol=0, atol=1e-5)
        state = opt.state[m.weight]
        assert state["exp_avg_sq"].shape == (m.nf,)
        assert state["exp_avg"].shape == m.weight.shape
        torch.testing.assert_close(state["exp_avg"].t(), twin_opt.state[twin]["exp_avg"], rtol=0, atol=1e-5)


def test_gpt2_resumes_bit_for_bit():
    model = _tiny_gpt2()
    opt = NDAdam(param_groups(model), lr=1e-3, vector_lr=0.05)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(tokens, labels=tokens).loss.backward()
            opt.step()

    train(model, opt, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 2)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _tiny_gpt2()
    resumed_opt = NDAdam(param_groups(resumed), lr=1e-3, vector_lr=0.05)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
