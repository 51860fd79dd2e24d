"""LightningCLI entry point: attach ExplanationMonitor from a YAML config, no Python changes.

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.max_epochs=2
    tensorboard --logdir runs/cli

The model and data are chosen by ``class_path`` in the config (the digits demo by default), so the
same entry point trains any LightningModule / LightningDataModule importable from Python. The monitor
is a plain ``trainer.callbacks`` entry; ``python examples/cli.py fit --help`` lists every option.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Parse ``args`` (``None`` = ``sys.argv[1:]``) and run the chosen subcommand.

    Args:
        args: Command-line arguments, e.g. ``["fit", "--config", "examples/config.yaml"]``.

    Returns:
        The ``LightningCLI`` after the subcommand ran (its ``trainer`` holds the monitor as a callback).
    """
    # subclass mode: model and data come from `class_path` in the config, not from this file
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        args=args,
    )


if __name__ == "__main__":
    main()
