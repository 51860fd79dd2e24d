"""Shared fixtures: small models with random weights and the real digits data."""

from __future__ import annotations

import pytest
import torch
import torchvision

from lightning_xcam.demos import SmallCNN, load_digits_tensors


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits upsampled to 32×32, standardised: ``(images [1797,1,32,32], labels [1797])``."""
    return load_digits_tensors(32)


@pytest.fixture
def resnet18() -> torch.nn.Module:
    """A torchvision ResNet-18 with random weights, 10 classes, in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture
def small_cnn() -> torch.nn.Module:
    """:class:`SmallCNN` (1 channel, 10 classes) with random weights, in eval mode."""
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=10).eval()
