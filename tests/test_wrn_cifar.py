"""benchmarks/wrn_cifar.py: the paper's full setting, exercised on CPU with a tiny WRN and synthetic data."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from benchmarks import wrn_cifar
from benchmarks.wide_resnet import WideResNet
from ndadam_fused import NDAdam
from ndadam_fused.nn import BatchNormSoftmax

# Tiny convolutions: one thread is as fast, and far faster on a CI machine whose cores are busy.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = ["--synthetic", "--synthetic-size", "64", "--depth", "10", "--width", "1", "--batch-size", "16",
        "--steps-per-epoch", "2", "--no-progress", "--device", "cpu"]


def _records(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_defaults_are_the_official_settings():
    args = wrn_cifar.parse_args(["--data", "somewhere"])
    assert (args.depth, args.width, args.epochs, args.batch_size) == (28, 10, 200, 128)
    assert (args.vector_lr, args.beta1, args.beta2, args.crop_padding, args.no_flip) == (0.05, 0.9, 0.99, 4, False)
    assert (args.softmax, args.logit_l2) == ("logit-l2", 1e-3)
    model = WideResNet(depth=10, width=1)
    optimizer = wrn_cifar.build_optimizer(model, args)
    assert isinstance(optimizer, NDAdam)
    assert [(g["vector"], g["lr"], g["betas"]) for g in optimizer.param_groups] == [
        (True, 0.05, (0.9, 0.99)), (False, 1e-3, (0.9, 0.99))
    ]
    assert optimizer.param_groups[1]["weight_decay"] == 5e-6
    bn_args = wrn_cifar.parse_args(["--data", "x", "--dataset", "cifar100", "--softmax", "bn", "--depth", "10", "--width", "1"])
    logit_norm = wrn_cifar.build_model(bn_args).logit_norm
    assert isinstance(logit_norm, BatchNormSoftmax) and float(logit_norm.scale) == 1.0 and logit_norm.num_classes == 100


def test_wrn_28_10_has_the_published_size():
    # 36.5M parameters (Zagoruyko and Komodakis, Table 1 / 36.5M for WRN-28-10); built on the meta device.
    with torch.device("meta"):
        model = WideResNet(depth=28, width=10, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(36.5e6, rel=0.01)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=12)


def test_synthetic_run_trains_and_says_there_is_no_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert wrn_cifar.main([a for a in TINY if a not in ("--device", "cpu")] + ["--epochs", "2"]) == 0
    output = capsys.readouterr().out
    assert "No CUDA GPU found" in output and "python -m benchmarks.wrn_cifar --data" in output
    records = _records(output)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["test_error"] <= 1 for r in records)
    # Cosine schedule over 2 epochs: half the initial lrs after the first, zero after the second.
    assert records[0]["lr"] == pytest.approx([0.025, 0.0005]) and records[1]["lr"] == pytest.approx([0.0, 0.0])
    with pytest.raises(SystemExit, match="--device cuda was asked for, but no CUDA GPU(.|\n)*--data /path/to"):
        wrn_cifar.main([a for a in TINY if a != "cpu"] + ["cuda"])


def test_help_says_how_to_run_on_a_gpu(capsys):
    with pytest.raises(SystemExit):
        wrn_cifar.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "GPU" in text and "--data /path/to/cifar-10-batches-py" in text
    with pytest.raises(SystemExit):
        wrn_cifar.parse_args([])  # neither --data nor --synthetic


def test_checkpoint_resumes_where_it_stopped(tmp_path, capsys, monkeypatch):
    run = TINY + ["--epochs", "3", "--softmax", "bn"]
    straight_checkpoint, resumed_checkpoint = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    wrn_cifar.main(run + ["--checkpoint", str(straight_checkpoint)])
    straight = _records(capsys.readouterr().out)

    # Interrupt the other run while it saves after epoch 3: its checkpoint stays at epoch 2.
    real_save = torch.save
    saves = []

    def save_then_interrupt_the_third(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_interrupt_the_third)
    with pytest.raises(KeyboardInterrupt):
        wrn_cifar.main(run + ["--checkpoint", str(resumed_checkpoint)])
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(resumed_checkpoint, weights_only=True)["epoch"] == 2
    capsys.readouterr()

    wrn_cifar.main(run + ["--checkpoint", str(resumed_checkpoint)])
    output = capsys.readouterr().out
    assert "resumed from" in output and "after epoch 2" in output
    resumed = _records(output)
    assert [r["epoch"] for r in resumed] == [3]
    for key in ("lr", "train_loss", "train_error", "test_error", "test_loss"):
        assert resumed[0][key] == straight[2][key]
    straight_model = torch.load(straight_checkpoint, weights_only=True)["model"]
    for key, value in torch.load(resumed_checkpoint, weights_only=True)["model"].items():
        torch.testing.assert_close(value, straight_model[key], rtol=0, atol=0)


class _MakesADirectoryWhenUnpickled:
    """A pickle payload that runs code on load: unpickling it calls os.mkdir(path)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    checkpoint = tmp_path / "run.pt"
    wrn_cifar.main(TINY + ["--epochs", "2", "--checkpoint", str(checkpoint)])
    saved = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "code-ran"
    saved["schedule"]["payload"] = _MakesADirectoryWhenUnpickled(marker)
    crafted = tmp_path / "crafted.pt"
    torch.save(saved, crafted)
    # The payload is real: an unrestricted load runs it.
    torch.load(crafted, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()

    with pytest.raises(SystemExit, match="crafted.pt holds objects that torch.load\\(weights_only=True\\) refuses"):
        wrn_cifar.main(TINY + ["--epochs", "2", "--checkpoint", str(crafted)])
    assert not marker.exists()


def test_checkpoint_of_another_run_is_refused(tmp_path):
    checkpoint = tmp_path / "run.pt"
    wrn_cifar.main(TINY + ["--epochs", "1", "--checkpoint", str(checkpoint)])
    with pytest.raises(SystemExit, match="different run.*softmax"):
        wrn_cifar.main(TINY + ["--epochs", "1", "--checkpoint", str(checkpoint), "--softmax", "bn"])


def test_random_crop_flip():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    assert torch.equal(wrn_cifar.random_crop_flip(images, 0, flip=False), images)
    generator = torch.Generator().manual_seed(0)
    out = wrn_cifar.random_crop_flip(images, 2, flip=True, generator=generator)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    # Every output image is one 6x6 window of its own padded image, mirrored or not.
    for i in range(2):
        windows = [
            candidate
            for y in range(5) for x in range(5)
            for window in [padded[i, :, y : y + 6, x : x + 6]]
            for candidate in (window, window.flip(2))
        ]
        assert any(torch.equal(out[i], w) for w in windows)
    # Over many draws every offset and both orientations occur.
    many = torch.zeros(400, 1, 6, 6)
    many[:, 0, 0, 0] = 1.0  # mark the top-left pixel to see where it lands
    seen = wrn_cifar.random_crop_flip(many, 2, generator=generator)[:, 0].nonzero()[:, 1:]
    assert len({tuple(p.tolist()) for p in seen}) > 4
    mirrored = wrn_cifar.random_crop_flip(images.repeat(50, 1, 1, 1), 0, flip=True, generator=generator)
    flipped = sum(torch.equal(m, images[0].flip(2)) for m in mirrored[0::2])
    assert 5 < flipped < 45


def _write_pickle(path, payload, protocol=pickle.DEFAULT_PROTOCOL):
    with path.open("wb") as handle:
        pickle.dump(payload, handle, protocol=protocol)


def _as_python2_numpy_pickle(payload) -> bytes:
    """``payload`` pickled as the original CIFAR files are: protocol 2, numpy's arrays named by
    numpy 1's module path (GLOBAL opcodes are newline-terminated text, so renaming is safe)."""
    data = pickle.dumps(payload, protocol=2)
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in data
    return data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def test_loads_the_python_pickle_batches(tmp_path):
    rng = np.random.default_rng(0)
    cifar10 = tmp_path / "cifar-10-batches-py"
    cifar10.mkdir()
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 3).tolist()
        # The real files were written by Python 2: bytes keys. A third of them are written as
        # those files are (protocol 2, numpy 1's names), the others as numpy 2 writes them today
        # with protocol 4 (_reconstruct) and 5 (_frombuffer).
        batch = {b"data": data, b"labels": labels, b"batch_label": name.encode(), b"filenames": [b"x.png"] * 3}
        style = len(batches) % 3
        if style == 0:
            (cifar10 / name).write_bytes(_as_python2_numpy_pickle(batch))
        else:
            _write_pickle(cifar10 / name, batch, protocol=3 + style)
        batches.append((data, labels))
    loaded = wrn_cifar.load_cifar(tmp_path, "cifar10")  # the parent folder works too
    assert loaded.train_images.shape == (15, 3, 32, 32) and loaded.train_images.dtype == torch.uint8
    assert loaded.test_images.shape == (3, 3, 32, 32)
    assert loaded.train_labels.tolist() == sum((labels for _, labels in batches[:5]), [])
    first = batches[0][0][0]
    # Channel planes of 1024 values, rows of 32: red pixel (0, 1) is byte 1, green (0, 0) byte 1024.
    assert int(loaded.train_images[0, 0, 0, 1]) == first[1]
    assert int(loaded.train_images[0, 1, 0, 0]) == first[1024]
    assert int(loaded.train_images[0, 2, 1, 0]) == first[2048 + 32]

    cifar100 = tmp_path / "c100" / "cifar-100-python"
    cifar100.mkdir(parents=True)
    for name, size in (("train", 4), ("test", 2)):
        _write_pickle(cifar100 / name, {b"data": rng.integers(0, 256, (size, 3072), dtype=np.uint8),
                                        b"fine_labels": [99, 0, 5, 7][:size], b"coarse_labels": [1] * size})
    loaded = wrn_cifar.load_cifar(cifar100, "cifar100")
    assert loaded.train_labels.tolist() == [99, 0, 5, 7] and loaded.test_labels.tolist() == [99, 0]

    with pytest.raises(FileNotFoundError, match="--synthetic"):
        wrn_cifar.load_cifar(tmp_path / "nothing", "cifar10")


@pytest.mark.parametrize(
    "payload, refused",
    [
        (_MakesADirectoryWhenUnpickled("MARKER"), f"{os.mkdir.__module__}.mkdir"),
        ({b"data": __import__("collections").OrderedDict(), b"labels": []}, "collections.OrderedDict"),
        ({b"data": np.zeros((1, 3072), dtype=np.uint8), b"labels": [1], b"extra": np.float64(1.0)}, r"numpy\._?core\.multiarray\.scalar"),
    ],
    ids=["code", "other-class", "numpy-scalar"],
)
def test_batches_that_hold_anything_else_are_refused(tmp_path, payload, refused):
    marker = tmp_path / "code-ran"
    if isinstance(payload, _MakesADirectoryWhenUnpickled):
        payload = {b"data": payload, b"labels": []}
        payload[b"data"].path = str(marker)
    cifar10 = tmp_path / "cifar-10-batches-py"
    cifar10.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_pickle(cifar10 / name, payload)
    with pytest.raises(pickle.UnpicklingError, match=f"data_batch_1 refers to {refused}.*refusing to load it"):
        wrn_cifar.load_cifar(cifar10, "cifar10")
    assert not marker.exists()
