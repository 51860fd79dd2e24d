"""Train a small CNN on real handwritten digits (scikit-learn) with ExplanationMonitor attached.

    python examples/digits.py                # ~1 minute on a laptop CPU, 5 epochs
    tensorboard --logdir runs/digits         # SCALARS: xcam/..., IMAGES: xcam_images/..., TEXT: alerts

Everything ships inside scikit-learn: no download.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xcam import ExplanationMonitor
from lightning_xcam.demos import DigitsClassifier, DigitsDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--logdir", default="runs/digits")
    parser.add_argument("--methods", nargs="+", default=["expected_gradcam", "gradcam"])
    args = parser.parse_args()

    pl.seed_everything(0)
    logger = TensorBoardLogger(args.logdir, name="")
    # an epoch of digits lasts about a second, so the default 2 % budget would defer every score after the
    # first evaluation: score at every one
    monitor = ExplanationMonitor(target_layer="net.features", methods=args.methods, num_probe=16, n_samples=8,
                                 max_overhead=None)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=logger, callbacks=[monitor],
                         enable_model_summary=False)
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule(batch_size=16))  # small batches: ~0.8 accuracy in 5 epochs

    last = monitor.history[-1]
    print("\nlast evaluation:")
    for tag in sorted(k for k in last if k.startswith("xcam/")):
        print(f"  {tag:55s} {last[tag]:.4f}")
    print(f"\nalerts: {len(monitor.alerts)}")
    for alert in monitor.alerts:
        print(f"  {alert.message}")
    print(f"\nstore: {logger.log_dir}/xcam.sqlite   (lightning-xcam report {logger.log_dir} [--html report.html])")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}   (CUSTOM SCALARS first, then IMAGES)")


if __name__ == "__main__":
    main()
