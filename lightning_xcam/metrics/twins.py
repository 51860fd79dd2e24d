"""torchmetrics twins of the functional metrics: one accumulation mechanism, one subclass per metric.

:class:`ExplanationMetric` calls its functional metric on each ``update`` and keeps, per class bucket,
the sum and the count of the valid per-item values (``dist_reduce_fx="sum"``, so ranks reduce by
adding), plus the number of items left out (degenerate maps, empty masks). ``compute()`` returns the mean
over valid items, or, with ``num_classes``, the mean over classes of the per-class means (the pointing
game's benchmark aggregate). Values do not depend on how the items were split into batches.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_xcam._checks import check_int
from lightning_xcam.metrics.complexity import entropy, sparseness
from lightning_xcam.metrics.faithfulness import (
    average_drop,
    deletion_auc,
    increase_in_confidence,
    infidelity,
    insertion_auc,
)
from lightning_xcam.metrics.localization import energy_pointing_game, pointing_game, relevance_mass, relevance_rank
from lightning_xcam.metrics.robustness import max_sensitivity

__all__ = [
    "ExplanationMetric",
    "InsertionAUC",
    "DeletionAUC",
    "Infidelity",
    "MaxSensitivity",
    "AverageDrop",
    "IncreaseInConfidence",
    "PointingGame",
    "EnergyPointingGame",
    "RelevanceMass",
    "RelevanceRank",
    "Sparseness",
    "Entropy",
]


class ExplanationMetric(Metric):
    """Accumulate a functional metric's per-item values across batches and DDP ranks.

    Subclasses only set ``function`` (a functional metric accepting ``return_valid=True``) and
    ``higher_is_better``. Constructor keywords that the function accepts become its defaults for every
    ``update``; the remaining keywords go to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Args:
        num_classes: If given, ``update`` needs ``classes=`` (``LongTensor [B]``, e.g. the targets) and
            ``compute`` averages the per-class means over the classes seen.
        **options: Defaults for the function (``steps=``, ``substrate=``, ``max_batch=``, ...) and
            torchmetrics options.

    Raises:
        TypeError / ValueError: On a bad ``num_classes``; torchmetrics rejects unknown keywords.

    Example:
        >>> metric = Sparseness()
        >>> metric.update(torch.tensor([[[0.0, 1.0]]]))
        >>> metric.update(torch.zeros(1, 1, 2))  # all-zero map: left out and counted
        >>> metric.compute().round(decimals=3), metric.num_degenerate
        (tensor(0.5000), 1)
    """

    function: ClassVar[Callable[..., Any]]
    full_state_update: ClassVar[bool] = False
    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = None

    total: Tensor
    count: Tensor
    degenerate: Tensor

    def __init__(self, num_classes: int | None = None, **options: Any) -> None:
        accepted = set(inspect.signature(type(self).function).parameters) - {"return_valid"}
        metric_options = {k: v for k, v in options.items() if k not in accepted}
        super().__init__(**metric_options)
        if num_classes is not None:
            check_int(num_classes, "num_classes", why=" or None")
        self.num_classes = num_classes
        self.options = {k: v for k, v in options.items() if k in accepted}
        buckets = num_classes or 1
        self.add_state("total", default=torch.zeros(buckets), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(buckets, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("degenerate", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, *args: Any, classes: Tensor | None = None, **kwargs: Any) -> None:
        """Evaluate the function on one batch (same arguments as the function) and accumulate.

        Args:
            *args: Positional arguments of the function (e.g. ``model, x, maps``).
            classes: ``LongTensor [B]`` class of each item; required iff ``num_classes`` was given.
            **kwargs: Keyword arguments of the function; they override the constructor's defaults.

        Raises:
            ValueError: If ``classes`` is missing, superfluous, of the wrong shape or out of range.
        """
        values, valid = type(self).function(*args, **{**self.options, **kwargs}, return_valid=True)
        values, valid = values.to(self.total.device), valid.to(self.total.device)
        if self.num_classes is None:
            if classes is not None:
                raise ValueError("`classes` is only used with `num_classes`; construct the metric with num_classes=K.")
            buckets = torch.zeros_like(valid, dtype=torch.long)
        else:
            if not isinstance(classes, Tensor) or classes.shape != values.shape or classes.is_floating_point():
                raise ValueError(
                    f"`classes` must be a LongTensor of shape {tuple(values.shape)} when num_classes is set."
                )
            buckets = classes.to(self.total.device, torch.long)
            if bool(((buckets < 0) | (buckets >= self.num_classes)).any()):
                raise ValueError(f"`classes` must lie in [0, {self.num_classes - 1}].")
        self.total.index_add_(0, buckets[valid], values[valid].to(self.total.dtype))
        self.count.index_add_(0, buckets[valid], torch.ones_like(buckets[valid]))
        self.degenerate += (~valid).sum()

    def compute(self) -> Tensor:
        """Mean over valid items (per class, then over classes seen); 0.0 with a warning if no valid item
        was seen (a placeholder, not a score: never NaN)."""
        seen = self.count > 0
        if not bool(seen.any()):
            warnings.warn(
                f"{type(self).__name__}: no valid item to average ({int(self.degenerate)} left out: degenerate "
                "maps or empty masks); 0.0 is returned as a placeholder, not a score.",
                UserWarning,
                stacklevel=2,
            )
            return torch.zeros((), device=self.total.device)
        return (self.total[seen] / self.count[seen]).mean()

    @property
    def num_valid(self) -> int:
        """Items that entered the mean (on this rank until synced)."""
        return int(self.count.sum())

    @property
    def num_degenerate(self) -> int:
        """Items left out: degenerate maps or empty masks (on this rank until synced)."""
        return int(self.degenerate)


class InsertionAUC(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.insertion_auc`; ``update(model, x, maps, targets=None)``."""

    function = staticmethod(insertion_auc)
    higher_is_better = True


class DeletionAUC(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.deletion_auc`; ``update(model, x, maps, targets=None)``."""

    function = staticmethod(deletion_auc)
    higher_is_better = False


class Infidelity(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.infidelity`; pass ``sample_ids`` for batch-independent noise."""

    function = staticmethod(infidelity)
    higher_is_better = False

    def update(self, *args: Any, classes: Tensor | None = None, **kwargs: Any) -> None:
        """As :meth:`ExplanationMetric.update`, for one method's ``maps`` tensor.

        Raises:
            TypeError: If ``maps`` is a list (the functional form scores several methods at once; a twin
                accumulates one, so keep one twin per method).
        """
        maps = args[2] if len(args) > 2 else kwargs.get("maps")
        if isinstance(maps, (list, tuple)):
            raise TypeError(
                f"`maps` must be one [B, h, w] tensor, got a {type(maps).__name__} of {len(maps)}; an Infidelity "
                "twin accumulates one method's scores, so keep one twin per method."
            )
        super().update(*args, classes=classes, **kwargs)


class MaxSensitivity(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.max_sensitivity`; ``update(explainer, x, targets=None)``."""

    function = staticmethod(max_sensitivity)
    higher_is_better = False


class AverageDrop(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.average_drop` (a fraction; ×100 for percent)."""

    function = staticmethod(average_drop)
    higher_is_better = False


class IncreaseInConfidence(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.increase_in_confidence` (a fraction; ×100 for percent)."""

    function = staticmethod(increase_in_confidence)
    higher_is_better = True


class PointingGame(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.pointing_game`; TorchRay's aggregate with ``num_classes``."""

    function = staticmethod(pointing_game)
    higher_is_better = True


class EnergyPointingGame(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.energy_pointing_game`."""

    function = staticmethod(energy_pointing_game)
    higher_is_better = True


class RelevanceMass(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.relevance_mass`."""

    function = staticmethod(relevance_mass)
    higher_is_better = True


class RelevanceRank(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.relevance_rank`."""

    function = staticmethod(relevance_rank)
    higher_is_better = True


class Sparseness(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.sparseness` (Gini; higher is sparser)."""

    function = staticmethod(sparseness)
    higher_is_better = True


class Entropy(ExplanationMetric):
    """Twin of :func:`~lightning_xcam.metrics.entropy` (lower is simpler)."""

    function = staticmethod(entropy)
    higher_is_better = False
