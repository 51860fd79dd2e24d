"""Small real data and models for examples, tests and benchmarks (no downloads).

The data ships inside scikit-learn (``load_digits``: 1,797 handwritten digits, 8×8, 10 classes), so it
needs the ``examples`` extra. Images are scaled to [0, 1], upsampled bilinearly and standardised, i.e.
they live in *model-input space*.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xcam._checks import check_int

__all__ = ["load_digits_tensors", "SmallCNN", "DigitsClassifier", "DigitsDataModule", "add_decoy_tags", "load_lfw_tensors"]


def load_digits_tensors(size: int = 32) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as float32 images ``[1797, 1, size, size]`` and labels ``[1797]``.

    Args:
        size: Side of the upsampled images (8 keeps the original resolution).

    Returns:
        ``(images, labels)``; images are standardised to zero mean and unit variance over the set.

    Raises:
        ImportError: If scikit-learn is not installed (``pip install lightning-xcam[examples]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits demo needs scikit-learn: pip install 'lightning-xcam[examples]'") from err
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    return images, torch.as_tensor(digits.target, dtype=torch.long)


class SmallCNN(nn.Module):
    """A small CNN for 1- or 3-channel images: three conv blocks, global pooling, a two-layer head.

    The CAM layer is ``features`` (the last conv block, at a quarter of the input resolution). The head
    after global pooling is non-linear (``Linear → ReLU → Linear``), so gradient-only CAM variants do not
    collapse to Grad-CAM there.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        width: Channels of the first block (doubled in the next ones).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.ReLU(inplace=True), nn.Linear(2 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def add_decoy_tags(
    images: Tensor,
    labels: Tensor,
    *,
    size: int = 3,
    position: str = "corner",
    contrast: float = 1.0,
    correlation: float = 1.0,
    num_classes: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Stamp a class-coded square patch on each image: a planted shortcut (ALGORITHMS.md §6.6).

    Decoy MNIST (Ross et al., 2017) adapted to model-input space: the patch's value encodes a class code
    ``d`` as ``lo + contrast · (hi − lo) · (1 − d / num_classes)`` per channel, where ``lo``/``hi`` are the
    set's per-channel minimum and maximum (so ``1 − 0.1·d`` of the range for 10 classes, as Decoy MNIST's
    ``255 − 25·d``). With ``correlation = 1`` the code is the label (the shortcut is perfect); otherwise
    each image keeps its label's code with probability ``correlation`` and gets a uniformly random code
    otherwise (``correlation = 0``: the bias-conflicting test set). The *clean twin* is the untagged
    ``images``. Positions and codes are drawn the same way whatever ``correlation`` is, so sets built with
    different correlations from one seed put their patches at the same places.

    Args:
        images: ``[N, C, H, W]`` images in model-input space.
        labels: ``LongTensor [N]`` in ``[0, num_classes)``.
        size: Side of the square patch in pixels.
        position: ``"corner"`` (one of the four corners at random, as Decoy MNIST) or ``"random"``
            (anywhere inside the image).
        contrast: Scale of the patch value above ``lo`` (1 = the full range), ``> 0``.
        correlation: Probability that the code equals the label, in ``[0, 1]``.
        num_classes: Number of class codes.
        generator: Source of randomness (CPU); ``None`` uses a fresh generator seeded 0.

    Returns:
        ``(tagged_images, tag_masks)``: a new ``[N, C, H, W]`` tensor and ``BoolTensor [N, H, W]`` (True
        on the patch), both on ``images``' device.

    Raises:
        TypeError / ValueError: On bad shapes, labels out of range or parameters out of range.

    Example:
        >>> x, m = add_decoy_tags(torch.zeros(2, 1, 8, 8), torch.tensor([0, 5]), size=2)
        >>> m.sum(dim=(1, 2)).tolist()
        [4, 4]
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"`images` must be a floating tensor [N, C, H, W], got {got}.")
    count, _, height, width = images.shape
    if not isinstance(labels, Tensor) or labels.shape != (count,) or labels.is_floating_point():
        raise ValueError(f"`labels` must be an integer tensor of shape [{count}], got {labels!r:.60}.")
    check_int(size, "size", maximum=min(height, width), why=" (the image side)")
    if position not in ("corner", "random"):
        raise ValueError(f"`position` must be 'corner' or 'random', got {position!r}.")
    if not 0 < contrast:
        raise ValueError(f"`contrast` must be > 0, got {contrast!r}.")
    if not 0 <= correlation <= 1:
        raise ValueError(f"`correlation` must be a probability in [0, 1], got {correlation!r}.")
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"`labels` must lie in [0, {num_classes - 1}] for num_classes={num_classes}.")
    generator = generator or torch.Generator().manual_seed(0)
    corner = torch.randint(4, (count,), generator=generator)
    anywhere = torch.stack(
        [torch.randint(height - size + 1, (count,), generator=generator),
         torch.randint(width - size + 1, (count,), generator=generator)]
    )
    keep = torch.rand(count, generator=generator) < correlation
    random_code = torch.randint(num_classes, (count,), generator=generator)
    if position == "corner":
        top, left = (corner // 2) * (height - size), (corner % 2) * (width - size)
    else:
        top, left = anywhere
    codes = torch.where(keep, labels.cpu().long(), random_code)
    rows, cols = torch.arange(height), torch.arange(width)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + size)
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + size)
    masks = (in_rows[:, :, None] & in_cols[:, None, :]).to(images.device)
    low = images.amin(dim=(0, 2, 3))
    high = images.amax(dim=(0, 2, 3))
    level = 1 - codes.to(images.device, images.dtype) / num_classes
    value = low[None] + contrast * (high - low)[None] * level[:, None]
    tagged = torch.where(masks[:, None], value[:, :, None, None], images)
    return tagged, masks


def load_lfw_tensors(size: int = 25) -> tuple[Tensor, Tensor]:
    """scikit-image's ``data.lfw_subset()``: 100 faces then 100 non-faces, 25×25 greyscale.

    Args:
        size: Side of the (bilinearly resized) images; 25 keeps the original resolution.

    Returns:
        ``(images [200, 1, size, size], labels [200])``; labels are 1 for a face, 0 otherwise; images are
        standardised to zero mean and unit variance over the set (model-input space).

    Raises:
        ImportError: If scikit-image is not installed (``pip install lightning-xcam[examples]``).
    """
    try:
        from skimage import data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the faces demo needs scikit-image: pip install 'lightning-xcam[examples]'") from err
    images = torch.as_tensor(data.lfw_subset(), dtype=torch.float32).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(100, dtype=torch.long)])
    return images, labels


class DigitsDataModule(pl.LightningDataModule):
    """The real digits: the first ``num_train`` (shuffled once with ``seed``) for training, the rest for validation.

    Args:
        size: Side of the upsampled images.
        num_train: Training images; the remaining ones validate.
        batch_size: Loader batch size.
        seed: Seed of the one-off split.
    """

    def __init__(self, size: int = 32, num_train: int = 1200, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        images, labels = load_digits_tensors(size)
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
        train, val = order[:num_train], order[num_train:]
        self.batch_size = batch_size
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class DigitsClassifier(pl.LightningModule):
    """A ``LightningModule`` wrapping :class:`SmallCNN` (CAM layer ``"net.features"``), SGD with momentum or Adam.

    Module-level (not built inside a function) so that ``ddp_spawn`` can pickle it.

    Args:
        width: Channels of the first conv block.
        lr: Learning rate.
        num_classes: Output classes.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
    """

    def __init__(self, width: int = 16, lr: float = 0.05, num_classes: int = 10,
                 optimizer: Literal["sgd", "adam"] = "sgd") -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adam', got {optimizer!r}.")
        self.net = SmallCNN(in_channels=1, num_classes=num_classes, width=width)
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], _index: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], _index: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
