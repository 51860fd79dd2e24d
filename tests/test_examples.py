"""The examples run as documented: the LightningCLI config, and CIFAR-10's data path on a generated stand-in."""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torchvision
import torchvision.datasets.cifar as tv_cifar
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_xcam.store import ExplanationStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 8  # stand-in images per file: 40 to train, 8 to validate


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cifar10() -> ModuleType:
    return _load("cifar10")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _write_cifar_standin(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-10 python format as torchvision extracts it, with random pixels; returns all images and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images = torch.randint(256, (len(names) * PER_BATCH, 3072), dtype=torch.uint8, generator=generator)
    labels = torch.randint(10, (len(names) * PER_BATCH,), generator=generator)
    for i, name in enumerate(names):
        rows = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        entry = {"batch_label": name, "labels": labels[rows].tolist(), "data": images[rows].numpy(),
                 "filenames": [f"{name}_{j}.png" for j in range(PER_BATCH)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"num_cases_per_batch": PER_BATCH, "label_names": CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return images, labels


# ---------------------------------------------------------------------------------------------------------
# LightningCLI


def test_cli_config_attaches_the_monitor_and_logs_xcam_scalars_and_store(tmp_path: Path) -> None:
    config = yaml.safe_load((EXAMPLES / "config.yaml").read_text())
    (monitor,) = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "lightning_xcam.ExplanationMonitor"]
    assert monitor["init_args"]["target_layer"] == "net.features"

    # the documented command, shrunk from the command line only
    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
            "--trainer.callbacks.init_args.every_n_epochs=1", "--trainer.callbacks.init_args.num_probe=4",
            "--trainer.callbacks.init_args.n_samples=2",
            "--trainer.callbacks.init_args.num_references=8", "--trainer.callbacks.init_args.num_fit=8",
            "--trainer.callbacks.init_args.metrics=[insertion, deletion]", "--trainer.callbacks.init_args.steps=4",
            "--trainer.callbacks.init_args.log_images=2"]
    done = _run(str(EXAMPLES / "cli.py"), "fit", "--config", str(EXAMPLES / "config.yaml"), *tiny, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "version_0"
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    methods = monitor["init_args"]["methods"]
    for method in methods:
        for name in ("insertion_auc", "deletion_auc", "degenerate"):
            tag = f"xcam/{method}/{name}"
            assert tag in scalars, (tag, sorted(scalars))
            assert [math.isfinite(e.value) for e in events.Scalars(tag)] == [True]
        assert any(t.startswith(f"xcam_images/{method}/probe_") for t in events.Tags()["images"])
    assert "val_acc" in scalars  # the demo model and data module came from the config too

    with ExplanationStore(run / "xcam.sqlite") as store:
        assert store.epochs() == [0]
        recorded = store.config()
        assert store.methods() == sorted(methods)
    # YAML values and command-line overrides both reached the monitor
    assert recorded["target_layer"] == "net.features"
    assert recorded["methods"] == methods
    assert (recorded["every_n_epochs"], recorded["num_probe"], recorded["n_samples"]) == (1, 4, 2)
    assert recorded["metrics"] == ["insertion", "deletion"]


def test_cli_rejects_an_unknown_method_before_training(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cli.py"])  # LightningCLI warns when pytest's own arguments are there too
    cli = _load("cli")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(EXAMPLES / "config.yaml"), f"--trainer.default_root_dir={tmp_path}",
                  "--trainer.callbacks.init_args.methods=[gradcam, gradcamm]"])
    assert exit_info.value.code != 0
    assert "gradcamm" in capsys.readouterr().err
    assert not (tmp_path / "version_0").exists()


def test_cli_help_exits_zero(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    with pytest.raises(SystemExit) as exit_info:
        _load("cli").main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--trainer.callbacks" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_help_exits_zero(tmp_path: Path) -> None:
    done = _run(str(EXAMPLES / "cifar10.py"), "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for flag in ("--data-dir", "--download", "--max-epochs", "--accelerator", "--limit-train-batches"):
        assert flag in done.stdout


def test_read_cifar10_equals_torchvision_on_the_same_files(cifar10: ModuleType, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _write_cifar_standin(tmp_path)
    # the oracle: torchvision's own reader, its MD5 checks switched off (the stand-in cannot match them)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    splits = ((True, 5 * PER_BATCH, slice(0, 5 * PER_BATCH)), (False, PER_BATCH, slice(5 * PER_BATCH, None)))
    for train, count, rows in splits:
        x, y, classes = cifar10.read_cifar10(tmp_path, train=train)
        reference = tv_cifar.CIFAR10(tmp_path, train=train)
        assert x.dtype == torch.uint8 and x.shape == (count, 3, 32, 32)
        assert torch.equal(x, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
        assert y.tolist() == reference.targets == labels[rows].tolist()
        assert classes == reference.classes == CLASSES
        assert torch.equal(x.flatten(1), images[rows])


def test_read_cifar10_errors_name_the_file_and_the_fix(cifar10: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--download"):
        cifar10.read_cifar10(tmp_path, train=True)
    _write_cifar_standin(tmp_path)
    broken = {"data": torch.zeros(4, 100, dtype=torch.uint8).numpy(), "labels": [0, 1, 2, 3]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(broken))
    with pytest.raises(ValueError, match=r"test_batch.*\[n, 3072\]"):
        cifar10.read_cifar10(tmp_path, train=False)


def test_download_goes_through_torchvision_with_its_checksum(cifar10: ModuleType, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Offline(Exception):
        pass

    def no_network(url: str, download_root: str, filename: str, md5: str) -> None:
        calls.append((url, Path(download_root), filename, md5))
        raise Offline

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    cifar10.CIFAR10DataModule(tmp_path, download=False).prepare_data()
    assert calls == []
    with pytest.raises(Offline):
        cifar10.CIFAR10DataModule(tmp_path, download=True).prepare_data()
    assert calls == [(tv_cifar.CIFAR10.url, tmp_path, tv_cifar.CIFAR10.filename, tv_cifar.CIFAR10.tgz_md5)]


def test_resnet_32x32_has_resnet18_topology_and_4x4_layer4(cifar10: ModuleType) -> None:
    reference = torchvision.models.resnet18(num_classes=10)
    reference.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)  # the usual CIFAR stem, no max-pool
    net = cifar10.resnet_32x32()
    assert [p.shape for p in net.parameters()] == [p.shape for p in reference.parameters()]
    assert [b.shape for b in net.buffers()] == [b.shape for b in reference.buffers()]
    small = cifar10.resnet_32x32(width=8).eval()
    features = {}
    small.layer4.register_forward_hook(lambda module, args, out: features.setdefault("layer4", out))
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert features["layer4"].shape == (2, 64, 4, 4)
    with pytest.raises(ValueError, match="width"):
        cifar10.resnet_32x32(width=0)


def test_random_crop_flip_is_a_shifted_possibly_mirrored_window(cifar10: ModuleType) -> None:
    batch, size, pad = 64, 8, 2
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    code = (1 + rows * size + cols).float()  # each pixel's value names its position; padding reads 0
    x = torch.stack([code, code + 1000]).expand(batch, 2, size, size)
    out = cifar10.random_crop_flip(x, padding=pad, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    flips, shifts = set(), set()
    for image in out:
        inside = image[0] > 0
        assert torch.equal(image[1][inside], image[0][inside] + 1000)  # channels move together
        assert bool((image[1][~inside] == 0).all())
        src_row, src_col = (image[0][inside].long() - 1) // size, (image[0][inside].long() - 1) % size
        dy = src_row - rows[inside]
        assert bool((dy == dy[0]).all()) and abs(int(dy[0])) <= pad
        forward, backward = src_col - cols[inside], src_col + cols[inside]
        flipped = not bool((forward == forward[0]).all())
        along = backward if flipped else forward
        assert bool((along == along[0]).all())
        dx = int(along[0]) - (size - 1 if flipped else 0)
        assert abs(dx) <= pad
        # the visible window is exactly the part of the shifted image that lies inside the original
        assert int(inside.sum()) == (size - abs(int(dy[0]))) * (size - abs(dx))
        flips.add(flipped)
        shifts.add((int(dy[0]), dx))
    assert flips == {False, True} and len(shifts) > 10


def test_cifar10_example_fits_on_the_standin(cifar10: ModuleType, tmp_path: Path) -> None:
    images, _ = _write_cifar_standin(tmp_path / "data")
    trainer, monitor = cifar10.main([
        "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "runs"), "--width", "8",
        "--accelerator", "cpu", "--max-epochs", "1", "--batch-size", "8", "--num-workers", "0",
        "--every-n-epochs", "1", "--methods", "gradcam", "expected_gradcam", "--metrics", "insertion", "deletion",
        "--num-probe", "4", "--n-samples", "2", "--log-images", "1", "--max-overhead", "none",
    ])
    assert [h["epoch"] for h in monitor.history] == [0]
    assert trainer.global_step == 5 * PER_BATCH // 8  # every training batch of the stand-in was used
    for method in ("gradcam", "expected_gradcam"):
        for name in ("insertion_auc", "deletion_auc"):
            assert math.isfinite(monitor.history[0][f"xcam/{method}/{name}"])
    assert monitor.layer_name == "net.layer4"
    # the probe is drawn from the validation (test_batch) images, explained in the network's input space
    mean, std = torch.tensor(cifar10.MEAN).view(3, 1, 1), torch.tensor(cifar10.STD).view(3, 1, 1)
    raw = images[5 * PER_BATCH:].view(-1, 3, 32, 32)[monitor._data.ids]
    torch.testing.assert_close(monitor._data.x, (raw.float() / 255 - mean) / std)
    with ExplanationStore(tmp_path / "runs" / "version_0" / "xcam.sqlite") as store:
        assert store.epochs() == [0]
        assert store.maps("gradcam", 0).shape[0] == 4
