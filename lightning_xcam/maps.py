"""Map conventions shared by explainers, metrics, drift and alerts (ALGORITHMS.md §1.4–1.5).

*Raw* maps are non-negative float32 ``[B, h, w]`` at the CAM layer's resolution. Everything else
(upsampled, unit-mass, pooled, display-normalised) is derived here, in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OutputSize", "resolve_output_size", "upsample", "degenerate", "unit_mass", "pool", "display_normalize"]

OutputSize = tuple[int, int] | Sequence[int] | str | None


def resolve_output_size(output_size: OutputSize, x: Tensor) -> tuple[int, int] | None:
    """Resolve the ``output_size`` argument of an explainer call.

    Args:
        output_size: ``None`` (layer resolution), ``"input"`` (the input's ``(H, W)``) or ``(H, W)``.
        x: The ``[B, C, H, W]`` input.

    Returns:
        ``None`` or an ``(H, W)`` tuple of positive ints.

    Raises:
        ValueError: On any other value.
    """
    if output_size is None:
        return None
    if isinstance(output_size, str):
        if output_size != "input":
            raise ValueError(f"`output_size` must be None, 'input' or (H, W), got {output_size!r}.")
        return int(x.shape[-2]), int(x.shape[-1])
    size = tuple(output_size) if isinstance(output_size, (tuple, list)) else ()
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"`output_size` must be None, 'input' or two positive ints (H, W), got {output_size!r}.")
    return size  # type: ignore[return-value]


def upsample(maps: Tensor, size: tuple[int, int] | None) -> Tensor:
    """Bilinearly resize ``[B, h, w]`` maps to ``size`` (``align_corners=False``); ``None`` is a no-op.

    Bilinear weights are convex, so non-negative maps stay non-negative. Constant maps (a ``1 × 1`` CAM,
    an all-zero map) stay exactly constant: interpolation would add rounding noise of ~1e-7 that
    rankings and min-max normalisation would then take for structure.

    Example:
        >>> upsample(torch.ones(2, 7, 7), (28, 28)).shape
        torch.Size([2, 28, 28])
    """
    if size is None or tuple(maps.shape[-2:]) == tuple(size):
        return maps
    resized = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = maps.flatten(1)
    constant = (flat.amax(dim=1) == flat.amin(dim=1)).view(-1, 1, 1)
    return torch.where(constant, flat[:, :1, None].expand_as(resized), resized)


def degenerate(maps: Tensor) -> Tensor:
    """``BoolTensor [B]``: maps whose maximum is ``<= 0`` or that hold a non-finite value."""
    flat = maps.flatten(1)
    return ~torch.isfinite(flat).all(dim=1) | (flat.amax(dim=1) <= 0)


def zero_degenerate(maps: Tensor) -> Tensor:
    """``maps`` with every degenerate map (see :func:`degenerate`) replaced by zeros, as a whole: a map
    holding one non-finite value is not rescued by dropping that value.

    Example:
        >>> zero_degenerate(torch.tensor([[[1.0, float("nan")]], [[1.0, 2.0]]]))
        tensor([[[0., 0.]],
        <BLANKLINE>
                [[1., 2.]]])
    """
    return torch.where(degenerate(maps).view(-1, *([1] * (maps.ndim - 1))), torch.zeros_like(maps), maps)


def zero_degenerate_stack(maps: Tensor) -> Tensor:
    """:func:`zero_degenerate` over every ``[h, w]`` map of a ``[..., h, w]`` stack (e.g. ``[M, B, h, w]``)."""
    return zero_degenerate(maps.reshape(-1, *maps.shape[-2:])).view_as(maps)


def unit_mass(maps: Tensor) -> Tensor:
    """Divide each map by its sum; degenerate maps (see :func:`degenerate`) become all zeros.

    Example:
        >>> unit_mass(torch.tensor([[[1.0, 3.0]], [[0.0, 0.0]]]))
        tensor([[[0.2500, 0.7500]],
        <BLANKLINE>
                [[0.0000, 0.0000]]])
    """
    clean = zero_degenerate(maps).clamp_min(0)
    total = clean.flatten(1).sum(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)
    return clean / total.view(-1, *([1] * (maps.ndim - 1)))


def pool(maps: Tensor, size: int = 16) -> Tensor:
    """Adaptive-average-pool ``[B, h, w]`` maps to ``[B, size, size]`` (upsampling small maps first).

    Maps smaller than ``size`` are first upsampled bilinearly so that every cell is defined.
    """
    if maps.shape[-1] < size or maps.shape[-2] < size:
        maps = upsample(maps, (max(size, maps.shape[-2]), max(size, maps.shape[-1])))
    return F.adaptive_avg_pool2d(maps.unsqueeze(1), size).squeeze(1)


def display_normalize(maps: Tensor) -> Tensor:
    """Per-image min-max to ``[0, 1]`` for display; constant maps become all zeros."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1)
    span = (flat.amax(dim=1) - flat.amin(dim=1)).view(-1, 1, 1)
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
