"""Cost of the ExplanationMonitor at its defaults, as a share of training epochs over 50,000 images.

Run it with ``python benchmarks/overhead.py`` (about 10 minutes on 2 idle CPU cores; ``--quick`` for a
smoke run). The model is the CIFAR variant of ResNet-18 (3×3 stride-1 stem, no max-pool; CAM layer
``net.layer4`` at 4×4), 10 classes, 32×32 RGB inputs drawn once from a fixed generator (cost does not
depend on the pixel values), SGD with momentum, batch 128, fp32, on CPU.

Two ``Trainer.fit`` runs of ``EPOCHS`` short epochs (``STEPS`` training steps each, no validation, so
the monitor runs at the end of every training epoch) with the same seed:

* **plain**: no monitor; the median training-step time gives the time of one epoch over 50,000
  images (``ceil(50,000 / 128) = 391`` steps; data loading from memory is included);
* **monitored**: ``ExplanationMonitor(target_layer="net.layer4")`` with every other argument at its
  default (32 probe items; Expected Grad-CAM and GAD; insertion, deletion, infidelity, max-sensitivity;
  the shortcut checks; 8 heatmap panels to TensorBoard; the SQLite store; ``max_overhead=0.02``). Only
  the budget's clock is changed, so that it sees the epochs it would see at full length: it counts the
  time of every training step ``391 / STEPS`` times (steps are what an epoch repeats; the rest of the
  fit's time counts once, as in a real fit). Each evaluation's wall time is the monitor's own
  ``xcam/time_s``.

The table gives every evaluation's wall time, the metrics it ran and its share of one 50k-image epoch,
and the share of the whole run: the monitor's total time over ``EPOCHS`` full epochs. The goal (≤ 2 %)
applies to that total. Timings are wall-clock; the header prints the load average.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xcam import ExplanationMonitor
from lightning_xcam.budget import CostBudget

EPOCH_IMAGES, BATCH, SIZE = 50_000, 128, 32


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 for 32×32 inputs: a 3×3 stride-1 stem and no max-pool, so ``layer4`` is 4×4."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class Classifier(pl.LightningModule):
    """The trained model; records the wall time of every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = cifar_resnet18()
        self.step_times: list[float] = []
        self._started = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.step_times.append(time.perf_counter() - self._started)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _data(images: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, SIZE, SIZE, generator=generator)
    y = torch.randint(0, 10, (images,), generator=generator)
    return TensorDataset(x, y)


def _fit(root: Path, data: TensorDataset, epochs: int, steps: int, model: Classifier,
         monitor: ExplanationMonitor | None) -> Classifier:
    trainer = pl.Trainer(
        default_root_dir=root, max_epochs=epochs, limit_train_batches=steps, limit_val_batches=0,
        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=TensorBoardLogger(root, name="", version=0),
        callbacks=[] if monitor is None else [monitor],
    )
    trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=True))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="short epochs per run")
    parser.add_argument("--steps", type=int, default=8, help="training steps per short epoch")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs of 2 steps")
    args = parser.parse_args()
    epochs, steps = (2, 2) if args.quick else (args.epochs, args.steps)
    full_steps = math.ceil(EPOCH_IMAGES / BATCH)
    warnings.filterwarnings("ignore")
    data = _data(BATCH * steps)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        pl.seed_everything(0, verbose=False)
        plain = _fit(Path(tmp) / "plain", data, epochs, steps, Classifier(), None)
        pl.seed_everything(0, verbose=False)
        watched = Classifier()
        monitor = ExplanationMonitor(target_layer="net.layer4")
        # the budget's clock counts every training step full_steps / steps times: epochs of 391 steps
        scale = full_steps / steps
        monitor.budget = CostBudget(monitor.max_overhead,
                                    clock=lambda: time.perf_counter() + (scale - 1) * sum(watched.step_times))
        _fit(Path(tmp) / "monitored", data, epochs, steps, watched, monitor)
    # the first step of a fit pays one-time allocation; the median of the rest is the steady state
    # pooled: the monitor does not slow the steps (alternating runs put either one ahead by ±5 %)
    step = statistics.median(plain.step_times[1:] + watched.step_times[1:])
    epoch = step * full_steps
    scores = ("insertion_auc", "deletion_auc", "infidelity", "max_sensitivity")

    print("# lightning_xcam monitor overhead\n")
    print(f"- torch {torch.__version__}, lightning {pl.__version__}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}; load average at start {load[0]:.2f} (1 min)")
    print(f"- model: CIFAR ResNet-18, 32×32, batch {BATCH}; {epochs} epochs × {steps} steps per run; "
          f"the budget (max_overhead {monitor.max_overhead:g}) counts each step {full_steps / steps:.4g} times")
    print(f"- training step (median of both runs' {len(plain.step_times) + len(watched.step_times) - 2}): "
          f"{step * 1e3:.0f} ms (plain {statistics.median(plain.step_times[1:]) * 1e3:.0f}, monitored "
          f"{statistics.median(watched.step_times[1:]) * 1e3:.0f}) → one epoch over {EPOCH_IMAGES:,} images ≈ "
          f"{epoch:.0f} s ({full_steps} steps)\n")
    print("| epoch | wall time s | metrics run (both methods) | share of one 50k-image epoch |")
    print("|---:|---:|---|---:|")
    for h in monitor.history:
        ran = sorted({key.rsplit("/", 1)[-1] for key in h if key.rsplit("/", 1)[-1] in scores})
        print(f"| {h['epoch']} | {h['xcam/time_s']:.1f} | {', '.join(ran) or '-'} | {h['xcam/time_s'] / epoch:.2%} |")
    total = monitor.budget.spent
    share = total / (len(monitor.history) * epoch)
    print(f"\nWhole run: the monitor's {total:.0f} s over {len(monitor.history)} epochs of {epoch:.0f} s = "
          f"**{share:.2%}** (goal ≤ 2 %: {'met' if share <= 0.02 else 'NOT met'}); "
          f"without metrics an evaluation took {min(h['xcam/time_s'] for h in monitor.history):.1f} s; "
          f"the budget saw {monitor.budget.trained / len(monitor.history):.0f} s of training per epoch and a "
          f"share of {monitor.budget.overhead:.2%}.")


if __name__ == "__main__":
    main()
