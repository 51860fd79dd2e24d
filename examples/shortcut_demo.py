"""Watch the monitor catch a shortcut while it is being learned (about 10 seconds on 2 CPU cores).

Real handwritten digits (scikit-learn), 0–4 vs 5–9, with pixel noise that makes the digit harder to read,
and a planted shortcut: a 4×4 tag in a random corner whose brightness encodes the label
(:func:`lightning_xcam.demos.add_decoy_tags`). A small CNN learns the tag within a few epochs; the
:class:`~lightning_xcam.ExplanationMonitor` explains 48 held-out tagged digits after every epoch, finds that
filling in a tiny region of each image costs far more confidence than filling equal-area random regions,
and raises an alert with its evidence (the flagged digits' heatmaps and their mean map) in TensorBoard.

Run::

    python examples/shortcut_demo.py
    tensorboard --logdir runs/shortcut_demo
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_xcam import ExplanationMonitor
from lightning_xcam.demos import DigitsClassifier, add_decoy_tags, load_digits_tensors


class TaggedDigits(pl.LightningDataModule):
    """Noisy digits at 32×32, 0–4 vs 5–9, each with a class-coded 4×4 corner tag (code = label)."""

    def __init__(self, num_train: int = 400, num_val: int = 200, seed: int = 0) -> None:
        super().__init__()
        images, digits = load_digits_tensors(32)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(images.shape[0], generator=generator)[: num_train + num_val]
        x = images[order] + 0.5 * torch.randn(len(order), 1, 32, 32, generator=generator)
        y = (digits[order] >= 5).long()
        state = generator.get_state()
        tagged, _ = add_decoy_tags(x, y, size=4, num_classes=2, generator=generator)
        generator.set_state(state)  # same positions, codes independent of the label: the tag made useless
        scrambled, _ = add_decoy_tags(x, y, size=4, num_classes=2, correlation=0.0, generator=generator)
        self.train_set = TensorDataset(tagged[:num_train], y[:num_train])
        self.val_set = TensorDataset(tagged[num_train:], y[num_train:])
        self.scrambled_val = TensorDataset(scrambled[num_train:], y[num_train:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=200)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train on tagged digits and watch the shortcut alert fire.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--root", default="runs/shortcut_demo")
    args = parser.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)  # one clean run per call, so the paths printed below are the run's

    pl.seed_everything(0)
    monitor = ExplanationMonitor(
        target_layer="net.features", methods=("expected_gradcam",), metrics=("insertion", "deletion"),
        num_probe=48, n_samples=8, num_fit=2, log_images=4, steps=10,
        max_overhead=None,  # one-second epochs: score at every evaluation instead of within 2 % of training
    )
    logger = TensorBoardLogger(root, name="", version=0, default_hp_metric=False)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[monitor],
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    model, data = DigitsClassifier(width=8, lr=3e-3, num_classes=2, optimizer="adam"), TaggedDigits()
    trainer.fit(model, datamodule=data)

    log_dir = Path(logger.log_dir)
    x, y = data.scrambled_val.tensors
    with torch.no_grad():
        scrambled = float((model.eval()(x).argmax(1) == y).float().mean())
    print(f"\nval_acc {float(trainer.callback_metrics['val_acc']):.3f} after {trainer.current_epoch} epochs; "
          f"{scrambled:.3f} when the tags are scrambled (the model reads the tag, not the digit)")
    if monitor.alerts:
        print(f"{len(monitor.alerts)} shortcut alert(s):")
        for alert in monitor.alerts:
            print(f"  [{alert.kind}] {alert.message}")
    else:
        print("No shortcut alert was raised in this run.")
    kinds = sorted({a.kind for a in monitor.alerts})
    print("\nWhere to look:")
    print(f"  tensorboard --logdir {root}")
    print("    CUSTOM SCALARS: 'xcam: shortcut signals' (the fill-in and transplant z building up to the alert)")
    print("    SCALARS: xcam/alert (1 at the evaluation that raised), xcam/expected_gradcam/*")
    print("    TEXT:    " + (", ".join(f"xcam_alerts/{k}" for k in kinds) or "xcam_alerts/<kind>"))
    print("    IMAGES:  " + (", ".join(f"xcam_alerts/{k}/evidence" for k in kinds) or "xcam_alerts/<kind>/evidence")
          + " (mean map of the flagged digits, then each digit: image | map | overlay), xcam_images/...")
    print(f"  store:   {log_dir / 'xcam.sqlite'} (tables evaluations, summaries, metrics, drift, maps, alerts)")
    print(f"  report:  lightning-xcam report {root}")


if __name__ == "__main__":
    main()
