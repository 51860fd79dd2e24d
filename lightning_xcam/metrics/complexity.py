"""Complexity of a map: Gini sparseness and Shannon entropy (ALGORITHMS.md §4.7).

Computed on the maps as given, meant for raw maps at layer resolution (values depend on the
resolution; both are invariant to the map's scale). An all-zero map reads as uniform in both: Gini 0
and entropy ``log n`` (the constant map's values), with ``valid = False``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_xcam.maps import degenerate
from lightning_xcam.metrics._common import Result, check_lone_maps, finish

__all__ = ["sparseness", "entropy"]

_GINI_EPS = 1e-7  # Chalasani et al. / ALGORITHMS §4.7: a = |M| + 1e-7 keeps the all-zero map defined
_LOG_EPS = 1e-12


def sparseness(maps: Tensor, return_valid: bool = False) -> Result:
    """Gini index of ``|M|`` (higher is sparser): ``Σ_i (2i − n − 1) a_i / (n Σ a_i)``, ``a = sort(|M| + 1e-7)``.

    Args:
        maps: ``[B, h, w]`` maps (absolute values are used).
        return_valid: Also return ``BoolTensor [B]``, ``False`` for all-zero maps.

    Returns:
        ``[B]`` values in ``[0, 1)``; 0 for constant and all-zero maps.

    Raises:
        TypeError / ValueError: On bad maps.

    Example:
        >>> sparseness(torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])).round(decimals=4)
        tensor([0.7500])
    """
    maps = check_lone_maps(maps, nonnegative=False)
    values = torch.sort(maps.abs().flatten(1) + _GINI_EPS, dim=1).values
    # the index is scale-free in `a`: dividing by the largest value keeps maps near 3e38 from summing to inf
    values = values / values[:, -1:]
    n = values.shape[1]
    weights = 2 * torch.arange(1, n + 1, device=values.device, dtype=values.dtype) - n - 1
    gini = (values * weights).sum(dim=1) / (n * values.sum(dim=1))
    return finish(gini, ~degenerate(maps.abs()), return_valid)


def entropy(maps: Tensor, normalized: bool = False, return_valid: bool = False) -> Result:
    """Shannon entropy of ``P = |M| / Σ|M|`` (lower is simpler): ``−Σ P log(P + 1e-12)`` in nats.

    Args:
        maps: ``[B, h, w]`` maps (absolute values are used).
        normalized: Divide by ``log n`` (``n`` cells) to land in ``[0, 1]``; with one cell the value is 0.
        return_valid: Also return ``BoolTensor [B]``, ``False`` for all-zero maps.

    Returns:
        ``[B]`` entropies; ``log n`` (or 1 when normalised) for all-zero maps, read as uniform.

    Raises:
        TypeError / ValueError: On bad maps.

    Example:
        >>> entropy(torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])).round(decimals=4)
        tensor([0.6931])
    """
    maps = check_lone_maps(maps, nonnegative=False)
    magnitude = maps.abs().flatten(1)
    valid = ~degenerate(magnitude)
    # P is scale-free too (see sparseness)
    magnitude = magnitude / magnitude.amax(dim=1, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
    # An all-zero map becomes uniform: the same reading Gini's epsilon gives it.
    magnitude = torch.where(valid.unsqueeze(1), magnitude, torch.ones_like(magnitude))
    p = magnitude / magnitude.sum(dim=1, keepdim=True)
    values = -(p * torch.log(p + _LOG_EPS)).sum(dim=1)
    if normalized:
        n = magnitude.shape[1]
        values = values / math.log(n) if n > 1 else torch.zeros_like(values)
    return finish(values, valid, return_valid)
