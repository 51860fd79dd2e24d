"""Explanation metrics: functional maths (tensor in, ``[B]`` tensor out) and torchmetrics twins.

Functional metrics take a model (or an explainer) and a batch and return one value per item on the
model's device; ``return_valid=True`` adds a ``BoolTensor [B]`` that flags items whose value is a
documented convention (degenerate maps, empty masks). Each has a :class:`torchmetrics.Metric` twin
(``update``/``compute``) that averages valid items across batches and DDP ranks (ALGORITHMS.md §4).
"""

from __future__ import annotations

from lightning_xcam.metrics._perturb import make_substrate, target_probabilities
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
from lightning_xcam.metrics.twins import (
    AverageDrop,
    DeletionAUC,
    EnergyPointingGame,
    Entropy,
    ExplanationMetric,
    IncreaseInConfidence,
    Infidelity,
    InsertionAUC,
    MaxSensitivity,
    PointingGame,
    RelevanceMass,
    RelevanceRank,
    Sparseness,
)

__all__ = [
    "make_substrate",
    "target_probabilities",
    "insertion_auc",
    "deletion_auc",
    "infidelity",
    "max_sensitivity",
    "average_drop",
    "increase_in_confidence",
    "pointing_game",
    "energy_pointing_game",
    "relevance_mass",
    "relevance_rank",
    "sparseness",
    "entropy",
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
