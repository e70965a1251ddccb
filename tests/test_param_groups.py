"""ndadam_fused.param_groups: which parameters are vectors, exclusions, and that NDAdam takes the groups."""

import pytest
import torch
from torch import nn

from ndadam_fused import NDAdam, param_groups
from ndadam_fused.nn import BatchNormSoftmax


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(1, 4, 3, bias=True)
        self.norm = nn.BatchNorm2d(4)
        self.upsample = nn.ConvTranspose2d(4, 2, 2)
        self.proj = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 3, bias=False)
        self.logit_norm = BatchNormSoftmax(3)
        self.temperature = nn.Parameter(torch.ones(1, 1))  # a 2-D parameter that is no unit's input


def _names(groups):
    return {group["vector"]: [name for name, _ in group["params"]] for group in groups}


def test_linear_and_conv_weights_are_vectors_everything_else_is_scalar():
    groups = param_groups(TinyNet(), lr=1e-3, vector_lr=0.05)
    assert [g["vector"] for g in groups] == [True, False]
    assert [g["lr"] for g in groups] == [0.05, 1e-3]
    names = _names(groups)
    assert names[True] == ["conv.weight", "proj.weight", "attn.out_proj.weight", "head.weight"]
    assert set(names[False]) == {
        "embed.weight", "conv.bias", "norm.weight", "norm.bias", "upsample.weight", "upsample.bias",
        "proj.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.bias",
        "logit_norm.bias", "temperature",
    }


def test_every_trainable_parameter_appears_exactly_once():
    model = TinyNet()
    model.norm.weight.requires_grad_(False)
    groups = param_groups(model)
    listed = [param for group in groups for _, param in group["params"]]
    trainable = [param for param in model.parameters() if param.requires_grad]
    assert len(listed) == len(trainable)
    assert {id(p) for p in listed} == {id(p) for p in trainable}
    assert all(p is not model.norm.weight for p in listed)


def test_vector_lr_defaults_to_lr_and_options_reach_both_groups():
    groups = param_groups(TinyNet(), lr=0.01, weight_decay=5e-4, betas=(0.9, 0.99))
    assert [g["lr"] for g in groups] == [0.01, 0.01]
    # Without lr or vector_lr the groups carry none: NDAdam's lr and vector_lr apply.
    assert all("lr" not in g for g in param_groups(TinyNet()))
    assert all(g["weight_decay"] == 5e-4 and g["betas"] == (0.9, 0.99) for g in groups)
    with pytest.raises(ValueError, match="'vector'"):
        param_groups(TinyNet(), vector=True)


def test_exclude_by_module_type_covers_submodules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    groups = param_groups(model, exclude=(nn.Sequential,))
    # The root is a Sequential too: everything is excluded.
    assert _names(groups) == {False: ["0.weight", "0.bias", "1.0.weight", "1.0.bias", "1.1.weight", "1.1.bias"]}

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

    model = nn.ModuleDict({"block": Block(), "out": nn.Linear(4, 2)})
    names = _names(param_groups(model, exclude=(Block,)))
    assert names[True] == ["out.weight"]
    assert names[False] == ["block.inner.weight", "block.inner.bias", "out.bias"]


def test_exclude_by_name_and_pattern():
    names = _names(param_groups(TinyNet(), exclude_names=("head.weight", "attn.*")))
    assert names[True] == ["conv.weight", "proj.weight"]
    assert {"head.weight", "attn.out_proj.weight"} <= set(names[False])


def test_exclude_name_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"hed\.weight"):
        param_groups(TinyNet(), exclude_names=["hed.weight"])


@pytest.mark.parametrize("order", ["embedding-first", "head-first"])
def test_a_weight_tied_between_an_embedding_and_a_head_is_an_embedding(order):
    embed = nn.Embedding(10, 4)
    decoder = nn.Linear(4, 10, bias=False)
    decoder.weight = embed.weight  # tied input and output embeddings (GPT-2's wte and lm_head)
    modules = {"embed": embed, "decoder": decoder}
    if order == "head-first":
        modules = dict(reversed(list(modules.items())))
    model = nn.ModuleDict(modules)
    first_name = next(iter(modules)) + ".weight"
    assert _names(param_groups(model)) == {False: [first_name]}
    assert _names(param_groups(model, exclude=(nn.Embedding,))) == {False: [first_name]}
    # Two Linear layers sharing one weight are both vector owners: it stays a vector.
    shared = nn.ModuleDict({"a": nn.Linear(4, 6), "b": nn.Linear(4, 6)})
    shared.b.weight = shared.a.weight
    assert _names(param_groups(shared))[True] == ["a.weight"]


def test_ndadam_accepts_the_groups_and_treats_them_as_given():
    model = TinyNet()
    opt = NDAdam(param_groups(model, lr=1e-3, vector_lr=0.05), betas=(0.9, 0.99))
    assert [g["vector"] for g in opt.param_groups] == [True, False]
    assert [g["lr"] for g in opt.param_groups] == [0.05, 1e-3]
    assert opt.param_groups[0]["param_names"][-1] == "head.weight"
    # Vector rows were normalized; the 2-D scalars (embedding, packed projection) were not.
    torch.testing.assert_close(model.head.weight.norm(dim=1), torch.ones(3))
    assert not torch.allclose(model.embed.weight.norm(dim=1), torch.ones(11))
    assert not torch.allclose(model.attn.in_proj_weight.norm(dim=1), torch.ones(24))


def test_one_training_step_updates_vectors_on_the_sphere():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    opt = NDAdam(param_groups(model, lr=1e-3, vector_lr=0.05), betas=(0.9, 0.99))
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(torch.randn(8, 1, 4, 4)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    torch.testing.assert_close(model[0].weight.reshape(3, -1).norm(dim=1), torch.ones(3))
    torch.testing.assert_close(model[4].weight.norm(dim=1), torch.ones(2))


def test_a_zero_initialized_weight_excluded_by_name_works():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(model[2].weight)  # zero-init output layer: its rows cannot be normalized
    with pytest.raises(ValueError, match=r"'2\.weight'.*all-zero row"):
        NDAdam(param_groups(model))
    opt = NDAdam(param_groups(model, exclude_names=["2.weight"]))
    assert [(g["vector"], g["param_names"]) for g in opt.param_groups] == [
        (True, ["0.weight"]), (False, ["0.bias", "2.weight", "2.bias"])
    ]
    nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
    opt.step()
    assert model[2].weight.abs().sum() > 0  # Adam moved it off zero


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        param_groups([torch.zeros(2, 2)])
    with pytest.raises(TypeError, match="exclude"):
        param_groups(TinyNet(), exclude=("Embedding",))
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.ReLU())
    with pytest.raises(ValueError, match="lazy"):
        param_groups(nn.LazyLinear(3))
