"""Small real data and models for examples, tests and benchmarks (no downloads).

The data ships inside scikit-learn (``load_digits``: 1,797 handwritten digits, 8×8, 10 classes), so it
needs the ``examples`` extra. Images are scaled to [0, 1], upsampled bilinearly and standardised, i.e.
they live in *model-input space*.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["load_digits_tensors", "SmallCNN"]


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
