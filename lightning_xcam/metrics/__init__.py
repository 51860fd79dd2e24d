"""Explanation metrics: functional maths (tensor in, ``[B]`` tensor out) and torchmetrics twins."""

from __future__ import annotations

from lightning_xcam.metrics._perturb import make_substrate, target_probabilities

__all__ = ["make_substrate", "target_probabilities"]
