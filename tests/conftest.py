"""Shared fixtures: small models with random weights and the real digits data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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


@pytest.fixture
def without_write_permission(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to make stores open as SQLite opens a file it may not write: read-only and silently (reads
    work, the first write fails with "attempt to write a readonly database"). Reproduced with a read-only
    URI, as file permissions do not bind root."""
    from lightning_xcam.store import ExplanationStore

    connect = ExplanationStore._connect

    def read_only(self: ExplanationStore, database: str, timeout: float, uri: bool = False) -> None:
        if not uri:
            database, uri = f"{Path(database).resolve().as_uri()}?mode=ro", True
        connect(self, database, timeout, uri)

    return lambda: monkeypatch.setattr(ExplanationStore, "_connect", read_only)
