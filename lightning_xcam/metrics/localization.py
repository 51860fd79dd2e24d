"""Localisation against ground-truth masks: pointing game, energy, relevance mass and rank (ALGORITHMS.md §4.6).

Maps ``[B, h, w]`` are upsampled bilinearly to the masks' ``[B, H, W]`` resolution. No model is run.
An empty mask has nothing to point at: its value is 0 (never a hit) and ``valid`` is ``False``, so the
torchmetrics twins leave it out of their means and count it. A degenerate map (all zeros) also gets
``valid = False``; its value is the one the definition gives on the raster-order maximiser (pointing
game) or 0 (the ratios, whose denominator is zero).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_xcam.maps import degenerate, upsample
from lightning_xcam.metrics._common import Result, check_lone_maps, check_masks, finish, stable_rank

__all__ = ["pointing_game", "energy_pointing_game", "relevance_mass", "relevance_rank"]

DEFAULT_TOLERANCE = 15


def _prepare(maps: Tensor, masks: Tensor, nonnegative: bool) -> tuple[Tensor, Tensor]:
    maps = check_lone_maps(maps, nonnegative=nonnegative)
    masks = check_masks(masks, maps)
    return upsample(maps, tuple(masks.shape[-2:])), masks


def _ratio(inside: Tensor, total: Tensor) -> Tensor:
    positive = total > 0
    return torch.where(positive, inside / torch.where(positive, total, torch.ones_like(total)), torch.zeros_like(total))


def pointing_game(
    maps: Tensor, masks: Tensor, tolerance: float = DEFAULT_TOLERANCE, return_valid: bool = False
) -> Result:
    """Pointing game (TorchRay): a hit when a mask pixel lies within ``tolerance`` px of the map's maximiser.

    Within means Euclidean distance ``< tolerance`` (TorchRay's ``d² < tol²``), i.e. the point falls in the
    mask dilated by that open disk; computed batched as "any mask pixel at distance ``< tolerance``".
    The maximiser is the first maximum in raster order (``argmax``). ``tolerance=0`` is the strict
    variant: the maximiser itself must be in the mask. The benchmark aggregate (accuracy per class, then
    averaged) is :class:`~lightning_xcam.metrics.PointingGame` with ``num_classes``.

    Args:
        maps: ``[B, h, w]`` non-negative maps.
        masks: ``[B, H, W]`` boolean masks.
        tolerance: Radius in pixels of the masks' resolution (TorchRay: 15).
        return_valid: Also return ``BoolTensor [B]``, ``False`` for empty masks and degenerate maps.

    Returns:
        ``[B]`` hits as float (1.0 or 0.0).

    Raises:
        TypeError / ValueError: On bad maps or masks, or a negative ``tolerance``.

    Example:
        >>> maps = torch.zeros(1, 8, 8); maps[0, 2, 2] = 1
        >>> masks = torch.zeros(1, 8, 8, dtype=torch.bool); masks[0, 2, 5] = True
        >>> pointing_game(maps, masks, tolerance=3), pointing_game(maps, masks, tolerance=4)
        (tensor([0.]), tensor([1.]))
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"`tolerance` must be a non-negative number of pixels, got {tolerance!r}.")
    maps, masks = _prepare(maps, masks, nonnegative=True)
    batch, height, width = maps.shape
    peak = maps.flatten(1).argmax(dim=1)
    rows = torch.arange(height, device=maps.device).view(1, -1, 1) - (peak // width).view(-1, 1, 1)
    cols = torch.arange(width, device=maps.device).view(1, 1, -1) - (peak % width).view(-1, 1, 1)
    near = (rows**2 + cols**2) < tolerance**2
    if tolerance == 0:
        near = (rows == 0) & (cols == 0)
    hits = (masks & near).flatten(1).any(dim=1)
    nonempty = masks.flatten(1).any(dim=1)
    return finish(hits.float(), nonempty & ~degenerate(maps), return_valid)


def energy_pointing_game(maps: Tensor, masks: Tensor, return_valid: bool = False) -> Result:
    """Energy-based pointing game (Score-CAM): the share of the map's energy inside the mask, ``Σ_mask M / Σ M``.

    Args:
        maps: ``[B, h, w]`` non-negative maps.
        masks: ``[B, H, W]`` boolean masks.
        return_valid: Also return ``BoolTensor [B]``, ``False`` for empty masks and degenerate maps.

    Returns:
        ``[B]`` values in ``[0, 1]``; 0 for degenerate maps.

    Raises:
        TypeError / ValueError: On bad maps or masks.

    Example:
        >>> energy_pointing_game(torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[False, True]]]))
        tensor([0.7500])
    """
    maps, masks = _prepare(maps, masks, nonnegative=True)
    inside = (maps * masks).flatten(1).sum(dim=1)
    values = _ratio(inside, maps.flatten(1).sum(dim=1))
    return finish(values, masks.flatten(1).any(dim=1) & ~degenerate(maps), return_valid)


def relevance_mass(maps: Tensor, masks: Tensor, return_valid: bool = False) -> Result:
    """Relevance mass accuracy (CLEVR-XAI): ``Σ_mask |R| / Σ |R|``; signed maps allowed.

    Args:
        maps: ``[B, h, w]`` maps (absolute values are used).
        masks: ``[B, H, W]`` boolean masks.
        return_valid: Also return ``BoolTensor [B]``, ``False`` for empty masks and all-zero maps.

    Returns:
        ``[B]`` values in ``[0, 1]``; 0 for all-zero maps.

    Raises:
        TypeError / ValueError: On bad maps or masks.

    Example:
        >>> relevance_mass(torch.tensor([[[-1.0, 3.0]]]), torch.tensor([[[True, False]]]))
        tensor([0.2500])
    """
    maps, masks = _prepare(maps, masks, nonnegative=False)
    magnitude = maps.abs()
    values = _ratio((magnitude * masks).flatten(1).sum(dim=1), magnitude.flatten(1).sum(dim=1))
    return finish(values, masks.flatten(1).any(dim=1) & ~degenerate(magnitude), return_valid)


def relevance_rank(maps: Tensor, masks: Tensor, return_valid: bool = False) -> Result:
    """Relevance rank accuracy (CLEVR-XAI): ``|top-K(M) ∩ mask| / K`` with ``K = |mask|``.

    The top ``K`` cells are taken by a stable descending sort of the upsampled map: ties go in raster
    order, so a constant or all-zero map selects the first ``K`` pixels row by row.

    Args:
        maps: ``[B, h, w]`` maps (absolute values are used).
        masks: ``[B, H, W]`` boolean masks.
        return_valid: Also return ``BoolTensor [B]``, ``False`` for empty masks and all-zero maps.

    Returns:
        ``[B]`` values in ``[0, 1]``; 0 for empty masks.

    Raises:
        TypeError / ValueError: On bad maps or masks.

    Example:
        >>> relevance_rank(torch.tensor([[[0.1, 0.9, 0.5, 0.2]]]), torch.tensor([[[True, True, False, False]]]))
        tensor([0.5000])
    """
    maps, masks = _prepare(maps, masks, nonnegative=False)
    magnitude = maps.abs().flatten(1)
    flat_masks = masks.flatten(1)
    rank = stable_rank(magnitude)
    size = flat_masks.sum(dim=1)
    hits = (flat_masks & (rank < size.unsqueeze(1))).sum(dim=1)
    values = _ratio(hits.float(), size.float())
    return finish(values, (size > 0) & ~degenerate(magnitude), return_valid)
