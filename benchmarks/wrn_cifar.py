"""The paper's full setting: a wide residual network on CIFAR-10/100 with ND-Adam (needs a GPU).

Official settings (the defaults here): WRN-28-10, ND-Adam with vector lr 0.05 and scalar lr
0.001, betas (0.9, 0.99), L2 weight decay 5e-6 on scalars, a cosine lr schedule over 200 epochs,
batch 128, regularized softmax (logit L2 penalty 1e-3, or ``--softmax bn`` for BN-Softmax with
scale 2.5 on CIFAR-10 and 1 on CIFAR-100), random crops with 4-pixel (reflect) padding and
horizontal flips. The paper reports 3.70% (CIFAR-10) and 18.42% (CIFAR-100) test error for
WRN-28-10 with ND-Adam, against 3.80% and 18.48% with SGD.

Data: the python-pickle CIFAR batches (``cifar-10-batches-py/`` or ``cifar-100-python/``, as
https://www.cs.toronto.edu/~kriz/cifar.html ships them); nothing is downloaded. The whole data set
sits on the device as uint8 and is augmented there with torch ops (no torchvision, no workers).

Files from elsewhere are not trusted: the batches are read by an unpickler that builds only what
they hold (numpy arrays, dicts, lists, numbers, bytes), and ``--checkpoint`` holds only what
``torch.load(weights_only=True)`` loads (tensors, state dicts, plain numbers and strings) and is
read that way, so neither can run code.

On a GPU machine::

    python -m benchmarks.wrn_cifar --data /path/to/cifar-10-batches-py --dataset cifar10 \\
        --checkpoint wrn28-10-c10.pt --log wrn28-10-c10.jsonl
    python -m benchmarks.wrn_cifar --data /path/to/cifar-100-python --dataset cifar100 --softmax bn
    python -m benchmarks.wrn_cifar --optimizer sgd ...      # the paper's SGD baseline

``--synthetic`` replaces the data by random CIFAR-shaped images (a smoke test of the pipeline).
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import json
import math
import pickle
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.wide_resnet import WideResNet
from ndadam_fused import NDAdam, param_groups
from ndadam_fused.nn import logit_l2_penalty

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
FOLDER_NAMES = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
BN_SOFTMAX_SCALE = {"cifar10": 2.5, "cifar100": 1.0}  # the official values
DEFAULT_WEIGHT_DECAY = {"ndadam": 5e-6, "sgd": 5e-4}  # official ND-Adam PyTorch code; WRN's SGD
DEFAULT_LR = {"ndadam": 1e-3, "sgd": 0.1}
# A checkpoint resumes only a run with these settings (the schedule's length is among them).
RESUME_MUST_MATCH = ("dataset", "synthetic", "depth", "width", "softmax", "optimizer", "epochs", "batch_size", "seed")

GPU_HOWTO = """\
The paper's setting (WRN-28-10, 200 epochs of 50,000 images) is a GPU job; on a machine with a CUDA GPU
and the CIFAR batches, run for example:
    python -m benchmarks.wrn_cifar --data /path/to/cifar-10-batches-py --dataset cifar10 --checkpoint run.pt
On CPU, use a small network and few steps (e.g. --depth 10 --width 1 --epochs 1 --steps-per-epoch 5)."""


# --------------------------------------------------------------------------------------- data


@dataclass
class CifarData:
    """Images as uint8 [N, 3, 32, 32] and labels int64 [N], for train and test."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def _numpy_function(name: str, modules: tuple[str, ...]):
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in any of {modules}")


def _allowed_batch_globals() -> dict[tuple[str, str], object]:
    """Every global a CIFAR batch pickle refers to, under each name numpy has had for it.

    The original files (Python 2, numpy 1) name ``numpy.core.multiarray._reconstruct``; a batch
    pickled again by numpy 2 names ``numpy._core``, with protocol 5 ``_frombuffer``; Python 3's
    protocols 0-2 write bytes as ``_codecs.encode``.
    """
    import numpy as np

    reconstruct = _numpy_function("_reconstruct", ("numpy._core.multiarray", "numpy.core.multiarray"))
    frombuffer = _numpy_function("_frombuffer", ("numpy._core.numeric", "numpy.core.numeric"))
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class CifarBatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and builtin containers, numbers and strings.

    A pickle can name any importable callable and call it while loading; a downloaded file is
    not trusted to name only numpy's array constructors, so every other name is refused.
    """

    def __init__(self, file, *, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_batch_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"wrn_cifar: {self._source} refers to {module}.{name}, which no CIFAR batch holds (they hold only "
                "numpy arrays, lists, numbers and bytes); refusing to load it"
            ) from None


def _unpickle(path: Path) -> dict:
    with path.open("rb") as handle:
        batch = CifarBatchUnpickler(handle, source=str(path)).load()
    if not isinstance(batch, dict):
        raise ValueError(f"wrn_cifar: {path} holds a {type(batch).__name__}, not a CIFAR batch (a dict)")
    # The batches were pickled by Python 2: keys are bytes.
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}


def _images_and_labels(batches: list[dict], label_key: str) -> tuple[Tensor, Tensor]:
    import numpy as np

    data = np.concatenate([np.asarray(batch["data"], dtype=np.uint8) for batch in batches])
    labels = np.concatenate([np.asarray(batch[label_key], dtype=np.int64) for batch in batches])
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def find_cifar_folder(path: Path, dataset: str) -> Path:
    """``path`` itself when it holds the batches, else its ``cifar-10-batches-py`` (or -100) child."""
    marker = "test_batch" if dataset == "cifar10" else "test"
    for candidate in (path, path / FOLDER_NAMES[dataset]):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(
        f"no {dataset} batches in {path} or {path / FOLDER_NAMES[dataset]} (looked for '{marker}'). Get the "
        f"'CIFAR-{dataset[5:]} python version' from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it and "
        "pass the folder with --data; or use --synthetic"
    )


def load_cifar(path: Path, dataset: str) -> CifarData:
    folder = find_cifar_folder(Path(path), dataset)
    if dataset == "cifar10":
        train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
        test = [_unpickle(folder / "test_batch")]
        label_key = "labels"
    else:
        train, test = [_unpickle(folder / "train")], [_unpickle(folder / "test")]
        label_key = "fine_labels"
    train_images, train_labels = _images_and_labels(train, label_key)
    test_images, test_labels = _images_and_labels(test, label_key)
    return CifarData(train_images, train_labels, test_images, test_labels)


def synthetic_cifar(num_classes: int, train_size: int, test_size: int, seed: int = 0) -> CifarData:
    """Random CIFAR-shaped uint8 images: one random template per class plus noise, so it is learnable."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, 32, 32, generator=generator) * 255

    def sample(size: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, num_classes, (size,), generator=generator)
        noise = torch.randn(size, 3, 32, 32, generator=generator) * 40
        return (templates[labels] + noise).clamp(0, 255).to(torch.uint8), labels

    return CifarData(*sample(train_size), *sample(test_size))


def channel_statistics(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images, as [1, 3, 1, 1] float tensors."""
    as_float = images.float()
    return as_float.mean(dim=(0, 2, 3), keepdim=True), as_float.std(dim=(0, 2, 3), keepdim=True)


def random_crop_flip(
    images: Tensor, padding: int, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Random ``H x W`` crops of the images padded by ``padding`` (reflect), each mirrored with p = 1/2.

    One offset and one flip per image, drawn on the images' device; a batched gather, no loop.
    ``padding=0`` and ``flip=False`` return the images unchanged.
    """
    batch, channels, height, width = images.shape
    device = images.device
    if padding > 0:
        # Reflect padding needs a float tensor; it is what the official code uses (cv2.BORDER_REFLECT).
        images = F.pad(images.float(), (padding, padding, padding, padding), mode="reflect")
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), device=device, generator=generator)
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), device=device, generator=generator)
    mirrored = torch.rand(batch, device=device, generator=generator) < 0.5
    rows = offset_y[:, None] + torch.arange(height, device=device)
    columns = offset_x[:, None] + torch.arange(width, device=device)
    if flip:
        # A mirrored image reads its columns right to left.
        columns = torch.where(mirrored[:, None], columns.flip(1), columns)
    return images[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


# ----------------------------------------------------------------------------------- training


def build_model(args: argparse.Namespace) -> nn.Module:
    num_classes = NUM_CLASSES[args.dataset]
    bn_scale = None
    if args.softmax == "bn":
        bn_scale = args.bn_scale if args.bn_scale is not None else BN_SOFTMAX_SCALE[args.dataset]
    return WideResNet(depth=args.depth, width=args.width, num_classes=num_classes, in_channels=3, bn_softmax_scale=bn_scale)


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    weight_decay = args.weight_decay if args.weight_decay is not None else DEFAULT_WEIGHT_DECAY[args.optimizer]
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    groups = param_groups(model, lr=lr, vector_lr=args.vector_lr)
    return NDAdam(groups, betas=(args.beta1, args.beta2), weight_decay=weight_decay, backend=args.backend)


def loss_fn(logits: Tensor, target: Tensor, args: argparse.Namespace) -> Tensor:
    loss = F.cross_entropy(logits, target)
    if args.softmax == "logit-l2":
        loss = loss + logit_l2_penalty(logits, args.logit_l2)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, batch_size: int) -> tuple[float, float]:
    model.eval()
    wrong, loss = 0, 0.0
    for start in range(0, len(images), batch_size):
        batch = (images[start : start + batch_size].float() - mean) / std
        logits = model(batch)
        target = labels[start : start + batch_size]
        wrong += int((logits.argmax(1) != target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
    return wrong / len(images), loss / len(images)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint written by :func:`main`, read with ``weights_only=True``.

    It holds the epoch, the run's settings (strings, numbers, booleans), the model's, optimizer's
    and schedule's state dicts and the generator's state (a uint8 tensor): all of it loads
    without unpickling arbitrary objects, so a file from elsewhere cannot run code here.
    """
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise SystemExit(
            f"wrn_cifar: {path} holds objects that torch.load(weights_only=True) refuses to load, so it is not a "
            f"checkpoint this script wrote; not loading it (it could run code). torch said: {error}"
        ) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a wide residual network on CIFAR-10/100 with ND-Adam and regularized softmax, "
        "with the official settings of the ND-Adam paper (defaults). This is a GPU job: WRN-28-10 for 200 "
        "epochs. Example on a CUDA machine: python -m benchmarks.wrn_cifar --data /path/to/cifar-10-batches-py "
        "--dataset cifar10 --checkpoint run.pt --log run.jsonl. Without a GPU it says so and runs on CPU "
        "(use --depth 10 --width 1 --steps-per-epoch N there).",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="folder with the python-pickle batches (or its parent)")
    data.add_argument("--dataset", choices=list(NUM_CLASSES), default="cifar10")
    data.add_argument("--synthetic", action="store_true", help="random CIFAR-shaped data instead of --data")
    data.add_argument("--synthetic-size", type=int, default=512, help="synthetic train images (test: half)")
    data.add_argument("--crop-padding", type=int, default=4, help="random-crop padding in pixels (0: no crop)")
    data.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    model = parser.add_argument_group("model")
    model.add_argument("--depth", type=int, default=28, help="6n + 4 (default 28)")
    model.add_argument("--width", type=int, default=10, help="widening factor (default 10)")
    model.add_argument("--softmax", choices=["logit-l2", "bn", "plain"], default="logit-l2",
                       help="regularized softmax: logit L2 penalty (official PyTorch code), BN-Softmax, or none")
    model.add_argument("--logit-l2", type=float, default=1e-3, help="logit L2 weight (default 1e-3)")
    model.add_argument("--bn-scale", type=float, help="BN-Softmax scale (default 2.5 for cifar10, 1 for cifar100)")
    train = parser.add_argument_group("training")
    train.add_argument("--optimizer", choices=["ndadam", "sgd"], default="ndadam")
    train.add_argument("--lr", type=float, help="scalar lr for ndadam (default 0.001), lr for sgd (default 0.1)")
    train.add_argument("--vector-lr", type=float, default=0.05, help="ND-Adam's vector lr (default 0.05)")
    train.add_argument("--beta1", type=float, default=0.9)
    train.add_argument("--beta2", type=float, default=0.99)
    train.add_argument("--weight-decay", type=float, help="L2 (ndadam: scalars only, default 5e-6; sgd: 5e-4)")
    train.add_argument("--backend", default="auto", help="NDAdam backend (default auto)")
    train.add_argument("--epochs", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--steps-per-epoch", type=int, help="cap on steps per epoch (smoke tests)")
    train.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--device", help="default: cuda when available, else cpu")
    run.add_argument("--checkpoint", type=Path, help="saved after every epoch; resumed from when it exists")
    run.add_argument("--log", type=Path, help="append one JSON line per epoch to this file")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.synthetic and args.data is None:
        parser.error("give --data PATH (the CIFAR python batches) or --synthetic")
    if args.epochs < 1 or args.batch_size < 2:
        parser.error("--epochs must be >= 1 and --batch-size >= 2 (batch norm needs 2)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"wrn_cifar: --device cuda was asked for, but no CUDA GPU is available here.\n{GPU_HOWTO}")
    if device.type != "cuda":
        print(f"No CUDA GPU found: running on {device}.\n{GPU_HOWTO}", flush=True)
    else:
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(args.seed)
    num_classes = NUM_CLASSES[args.dataset]
    if args.synthetic:
        cifar = synthetic_cifar(num_classes, args.synthetic_size, max(args.synthetic_size // 2, 2), seed=args.seed)
    else:
        cifar = load_cifar(args.data, args.dataset)
    mean, std = channel_statistics(cifar.train_images)
    train_images, train_labels = cifar.train_images.to(device), cifar.train_labels.to(device)
    test_images, test_labels = cifar.test_images.to(device), cifar.test_labels.to(device)
    mean, std = mean.to(device), std.to(device)

    model = build_model(args).to(device)
    optimizer = build_optimizer(model, args)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    first_epoch = 1
    run_config = {key: getattr(args, key) for key in RESUME_MUST_MATCH}
    if args.checkpoint is not None and args.checkpoint.exists():
        saved = load_checkpoint(args.checkpoint, device)
        changed = {key: (saved["config"].get(key), value) for key, value in run_config.items() if saved["config"].get(key) != value}
        if changed:
            raise SystemExit(
                f"wrn_cifar: {args.checkpoint} is from a different run; (saved, now) differ in {changed}. "
                "Use another --checkpoint path, or the same settings to resume."
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["generator"].cpu())  # a generator's state lives on the host
        first_epoch = saved["epoch"] + 1
        print(f"resumed from {args.checkpoint} after epoch {saved['epoch']}", flush=True)

    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"WRN-{args.depth}-{args.width} ({parameters / 1e6:.2f}M parameters) on "
        f"{'synthetic ' if args.synthetic else ''}{args.dataset}: {len(train_labels)} train / {len(test_labels)} "
        f"test images, {args.optimizer}, softmax {args.softmax}, {args.epochs} epochs, batch {args.batch_size}, "
        f"device {device}",
        flush=True,
    )
    steps = len(train_labels) // args.batch_size  # drop_last: a 1-image batch would break batch norm
    if args.steps_per_epoch is not None:
        steps = min(steps, args.steps_per_epoch)
    if steps < 1:
        raise SystemExit(f"wrn_cifar: {len(train_labels)} training images make no batch of {args.batch_size}")

    for epoch in range(first_epoch, args.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(train_labels), device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        wrong = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{args.epochs}", disable=args.no_progress, leave=False, mininterval=1.0)
        for step in bar:
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            images = random_crop_flip(train_images[index], args.crop_padding, not args.no_flip, generator)
            images = (images.float() - mean) / std
            target = train_labels[index]
            logits = model(images)
            loss = loss_fn(logits, target, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Summed on the device: one host sync per epoch, not per step.
            loss_sum += loss.detach() * len(index)
            wrong += (logits.detach().argmax(1) != target).sum()
        bar.close()
        schedule.step()
        train_seconds = time.perf_counter() - started
        seen = steps * args.batch_size
        train_loss = float(loss_sum) / seen
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"wrn_cifar: the training loss diverged at epoch {epoch}")
        test_error, test_loss = evaluate(model, test_images, test_labels, mean, std, batch_size=500)
        record = {
            "epoch": epoch, "lr": [group["lr"] for group in optimizer.param_groups],
            "train_loss": round(train_loss, 5), "train_error": round(int(wrong) / seen, 5),
            "test_error": round(test_error, 5), "test_loss": round(test_loss, 5),
            "train_seconds": round(train_seconds, 2),
        }
        print(json.dumps(record), flush=True)
        if args.log is not None:
            with args.log.open("a") as handle:
                handle.write(json.dumps({**record, "args": {k: str(v) for k, v in vars(args).items()}}) + "\n")
        if args.checkpoint is not None:
            temporary = args.checkpoint.with_name(args.checkpoint.name + ".tmp")
            torch.save(
                {"epoch": epoch, "config": run_config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "generator": generator.get_state()},
                temporary,
            )
            temporary.replace(args.checkpoint)  # a crash mid-save leaves the previous checkpoint whole
    print(f"final test error {100 * test_error:.2f}%" if first_epoch <= args.epochs else "nothing left to train", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
