"""Train a ResNet-18 (adapted to 32×32) on CIFAR-10 with ExplanationMonitor attached. For a GPU and internet.

    python examples/cifar10.py --download                      # fetch CIFAR-10 (170 MB) into ./data, 30 epochs
    python examples/cifar10.py --max-epochs 5 --limit-train-batches 0.2     # a quick look
    tensorboard --logdir runs/cifar10     # SCALARS: xcam/..., IMAGES: xcam_images/..., TEXT: xcam_alerts/...

``--download`` goes through ``torchvision.datasets.CIFAR10`` (which verifies the archive's and every
file's MD5). Training then reads the extracted ``cifar-10-batches-py`` folder (the python pickle format)
into uint8 tensors once; random crop + flip run batched on the device, and the monitor explains
validation images in the same normalised space the network sees. The CAM layer is ``net.layer4``
(4×4 at 32×32 inputs).
"""

from __future__ import annotations

import argparse
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10
from torchvision.models.resnet import BasicBlock

from lightning_xcam import ExplanationMonitor
from lightning_xcam.callback import METHODS, METRICS

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
# per-channel statistics of the CIFAR-10 training set, on [0, 1] pixels
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def read_cifar10(root: str | Path, train: bool) -> tuple[Tensor, Tensor, list[str]]:
    """Read the extracted CIFAR-10 python format (``<root>/cifar-10-batches-py``) into tensors.

    The same files ``torchvision.datasets.CIFAR10`` reads, without its MD5 checks, which
    :meth:`CIFAR10DataModule.prepare_data` leaves to torchvision when downloading.

    Args:
        root: Folder that holds ``cifar-10-batches-py``.
        train: ``True`` for ``data_batch_1..5``, ``False`` for ``test_batch``.

    Returns:
        ``(images, labels, classes)``: ``uint8 [N, 3, 32, 32]`` (RGB), ``LongTensor [N]`` and the ten
        class names from ``batches.meta``.

    Raises:
        FileNotFoundError: If a file is missing (the message says how to download it).
        ValueError: If a file does not hold CIFAR-10 batches (wrong keys, sizes or labels).

    Example:
        >>> images, labels, classes = read_cifar10("data", train=False)  # doctest: +SKIP
        >>> images.shape, classes[0]  # doctest: +SKIP
        (torch.Size([10000, 3, 32, 32]), 'airplane')
    """
    folder = Path(root) / FOLDER
    images, labels = [], []
    for name in (TRAIN_FILES if train else TEST_FILES):
        entry = _load_pickle(folder / name)
        if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
            raise ValueError(f"{folder / name} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'.")
        data = torch.as_tensor(entry["data"])
        rows_ok = data.ndim == 2 and data.shape[1] == 3 * 32 * 32 and data.shape[0] == len(entry["labels"])
        if data.dtype != torch.uint8 or not rows_ok:
            raise ValueError(
                f"{folder / name}: 'data' must be uint8 [n, 3072] with one label per row, got {data.dtype} "
                f"{tuple(data.shape)} and {len(entry['labels'])} labels."
            )
        images.append(data.view(-1, 3, 32, 32))  # each row is 1024 red, then green, then blue values
        labels.append(torch.as_tensor(entry["labels"], dtype=torch.long))
    meta = _load_pickle(folder / META_FILE)
    classes = list(meta["label_names"]) if isinstance(meta, dict) and "label_names" in meta else None
    if classes is None or len(classes) != 10:
        raise ValueError(f"{folder / META_FILE} must hold ten 'label_names'.")
    targets = torch.cat(labels)
    if bool(((targets < 0) | (targets >= 10)).any()):
        raise ValueError(f"{folder}: labels must lie in [0, 9].")
    return torch.cat(images), targets, classes


def _load_pickle(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 file {path} not found. Pass --download to fetch CIFAR-10 (170 MB) into --data-dir "
            f"({path.parent.parent}), or point --data-dir to the folder that holds {FOLDER}/."
        )
    with path.open("rb") as handle:
        # the batches were pickled by Python 2; latin1 turns their byte strings back into str / bytes
        return pickle.load(handle, encoding="latin1")


class NormalizedImages(Dataset):
    """uint8 images kept as they are in memory, returned as normalised float32 ``[3, 32, 32]`` per item.

    Args:
        images: ``uint8 [N, 3, 32, 32]``.
        labels: ``LongTensor [N]``.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return (self.images[index].float() / 255 - self.mean) / self.std, self.labels[index]


def random_crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Batched standard CIFAR augmentation: zero-pad, crop back at a random offset, flip half horizontally.

    On normalised images the zero padding is the data set's mean colour.

    Args:
        x: ``[B, C, H, W]`` images (any device).
        padding: Pixels of zero padding on each side (the largest shift).
        generator: Random source on ``x``'s device; ``None`` uses the global one.

    Returns:
        A new ``[B, C, H, W]`` tensor.

    Example:
        >>> random_crop_flip(torch.ones(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(2 * padding + 1, (batch,), device=x.device, generator=generator)
    left = torch.randint(2 * padding + 1, (batch,), device=x.device, generator=generator)
    flip = torch.rand(batch, device=x.device, generator=generator) < 0.5
    cols = torch.arange(width, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(0), cols)  # reading columns backwards is the flip
    rows = top[:, None] + torch.arange(height, device=x.device)
    cols = left[:, None] + cols
    sample = torch.arange(batch, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[sample, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from ``data_dir``: the 50,000 training images train, the 10,000 test images validate.

    After ``setup``, ``classes`` holds the ten class names (index → name, e.g. for an alert's class).

    Args:
        data_dir: Folder that holds (or will hold) ``cifar-10-batches-py``.
        download: Fetch the archive through ``torchvision.datasets.CIFAR10`` if it is not there.
        batch_size: Loader batch size.
        num_workers: Loader worker processes.
    """

    def __init__(self, data_dir: str | Path = "data", download: bool = False, batch_size: int = 128,
                 num_workers: int = 2) -> None:
        super().__init__()
        self.data_dir, self.download = Path(data_dir), download
        self.batch_size, self.num_workers = batch_size, num_workers
        self.classes: list[str] = []

    def prepare_data(self) -> None:
        if self.download:  # torchvision downloads, extracts and checks every MD5
            for train in (True, False):
                CIFAR10(self.data_dir, train=train, download=True)

    def setup(self, stage: str) -> None:
        images, labels, self.classes = read_cifar10(self.data_dir, train=True)
        self.train_set = NormalizedImages(images, labels)
        images, labels, _ = read_cifar10(self.data_dir, train=False)
        self.val_set = NormalizedImages(images, labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=2 * self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        # augment on the device, one batched op, and only while training
        if self.trainer is not None and self.trainer.training:
            x, y = batch
            return random_crop_flip(x), y
        return batch


def resnet_32x32(width: int = 64, num_classes: int = 10) -> nn.Sequential:
    """ResNet-18 for 32×32 images, built from torchvision's ``BasicBlock``, with a configurable width.

    A 3×3 stride-1 stem without max-pool (ImageNet's 7×7/2 stem and max-pool would leave 1×1 maps at
    ``layer4``), four stages of two blocks with ``width, 2·width, 4·width, 8·width`` channels at strides
    1, 2, 2, 2, global average pooling and a linear head. ``width=64`` is ResNet-18 (11.2 M parameters);
    ``layer4`` is 4×4.

    Args:
        width: Channels of the first stage (64 in ResNet-18; smaller for quick runs).
        num_classes: Output classes.

    Returns:
        The randomly initialised network; its stages are named ``layer1`` … ``layer4``.

    Raises:
        ValueError: If ``width`` is not an int >= 1.

    Example:
        >>> resnet_32x32(width=8)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"`width` must be an int >= 1, got {width!r}.")
    layers: dict[str, nn.Module] = {
        "stem": nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
    }
    channels = width
    for stage in range(4):
        planes = width * 2**stage
        blocks = []
        for index in range(2):
            stride = 2 if stage > 0 and index == 0 else 1
            shortcut = None
            if stride != 1 or channels != planes:  # the residual must match the block's output shape
                shortcut = nn.Sequential(
                    nn.Conv2d(channels, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            blocks.append(BasicBlock(channels, planes, stride=stride, downsample=shortcut))
            channels = planes
        layers[f"layer{stage + 1}"] = nn.Sequential(*blocks)
    layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(channels, num_classes))
    net = nn.Sequential(OrderedDict(layers))
    for module in net.modules():
        if isinstance(module, nn.Conv2d):  # He init, as torchvision's ResNet: the stack is all ReLU
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return net


class CIFAR10Classifier(pl.LightningModule):
    """A 32×32 ResNet-18 trained with SGD (Nesterov) and a one-cycle learning rate; CAM layer ``net.layer4``.

    Args:
        width: Channels of the first stage (64 in ResNet-18).
        lr: Peak learning rate.
        weight_decay: SGD weight decay.
    """

    def __init__(self, width: int = 64, lr: float = 0.1, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = resnet_32x32(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], _index: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], _index: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True,
                                    weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _fraction_or_count(text: str) -> float | int:
    """Lightning's ``limit_*_batches`` convention: ``0.25`` or ``1.0`` is a fraction, ``10`` a number of batches."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _share_or_none(text: str) -> float | None:
    """``max_overhead`` on the command line: a share such as ``0.02``, or ``none``."""
    return None if text.lower() == "none" else float(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``).

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data", help="folder that holds cifar-10-batches-py (default: data)")
    data.add_argument("--download", action="store_true", help="download CIFAR-10 through torchvision if missing")
    data.add_argument("--batch-size", type=int, default=128)
    data.add_argument("--num-workers", type=int, default=2)
    train = parser.add_argument_group("training")
    train.add_argument("--width", type=int, default=64, help="channels of the first stage (default: 64, ResNet-18's)")
    train.add_argument("--lr", type=float, default=0.1)
    train.add_argument("--max-epochs", type=int, default=30)
    train.add_argument("--accelerator", default="auto", help="auto, gpu, cpu, mps, ... (default: auto)")
    train.add_argument("--devices", default="1", help="devices per node, or 'auto' (several GPUs run DDP)")
    train.add_argument("--precision", default="32-true", help="e.g. bf16-mixed or 16-mixed on a GPU")
    train.add_argument("--limit-train-batches", type=_fraction_or_count, default=1.0,
                       help="fraction (a float, 1.0 = all) or number (an int) of training batches per epoch")
    train.add_argument("--limit-val-batches", type=_fraction_or_count, default=1.0,
                       help="fraction (a float) or number (an int) of validation batches per epoch")
    train.add_argument("--log-dir", default="runs/cifar10")
    train.add_argument("--seed", type=int, default=0)
    xcam = parser.add_argument_group("explanation monitor")
    xcam.add_argument("--target-layer", default="net.layer4")
    xcam.add_argument("--every-n-epochs", type=int, default=2)
    xcam.add_argument("--methods", nargs="+", choices=METHODS, default=["expected_gradcam", "gad"])
    xcam.add_argument("--metrics", nargs="+", choices=METRICS,
                      default=["insertion", "deletion", "infidelity", "max_sensitivity"])
    xcam.add_argument("--num-probe", type=int, default=32)
    xcam.add_argument("--n-samples", type=int, default=16)
    xcam.add_argument("--log-images", type=int, default=8)
    xcam.add_argument("--max-overhead", type=_share_or_none, default=0.02,
                      help="largest share of training time the metrics may bring the monitor to; 'none' scores "
                           "at every evaluation")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> tuple[pl.Trainer, ExplanationMonitor]:
    """Train with the monitor attached and print the last evaluation.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The trainer and the monitor after training (its ``history`` and ``alerts``).
    """
    args = parse_args(argv)
    pl.seed_everything(args.seed)
    data = CIFAR10DataModule(args.data_dir, download=args.download, batch_size=args.batch_size,
                             num_workers=args.num_workers)
    model = CIFAR10Classifier(width=args.width, lr=args.lr)
    monitor = ExplanationMonitor(
        target_layer=args.target_layer, every_n_epochs=args.every_n_epochs, methods=args.methods,
        metrics=args.metrics, num_probe=args.num_probe, n_samples=args.n_samples, log_images=args.log_images,
        seed=args.seed, max_overhead=args.max_overhead,
    )
    logger = TensorBoardLogger(args.log_dir, name="")
    devices = args.devices if args.devices == "auto" else int(args.devices)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs, accelerator=args.accelerator, devices=devices, precision=args.precision,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        logger=logger, callbacks=[monitor], default_root_dir=args.log_dir,
    )
    trainer.fit(model, datamodule=data)

    if trainer.is_global_zero and monitor.history:
        last = monitor.history[-1]
        print(f"\nlast evaluation (epoch {last['epoch']}):")
        for tag in sorted(k for k in last if k.startswith("xcam/")):
            print(f"  {tag:55s} {last[tag]:.4f}")
        print(f"\nalerts: {len(monitor.alerts)}")
        for alert in monitor.alerts:
            where = "all classes" if alert.class_index is None else data.classes[alert.class_index]
            print(f"  [{where}] {alert.message}")
        print(f"\nstore: {logger.log_dir}/xcam.sqlite\nTensorBoard: tensorboard --logdir {args.log_dir}")
    return trainer, monitor


if __name__ == "__main__":
    main()
