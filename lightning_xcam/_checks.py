"""Argument checks and target resolution shared by explainers and metrics.

Every error names the argument, says what came and what would work.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_images", "check_maps", "check_int", "grid_batch", "targets_tensor", "resolve_targets", "Targets"]

Targets = Tensor | int | None


def check_int(value: object, name: str, minimum: int = 1, maximum: int | None = None, why: str = "") -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``; the one check of every int argument.

    Args:
        value: The argument.
        name: Its name, for the message.
        minimum: Smallest allowed value.
        maximum: Largest allowed value, or ``None``.
        why: Words added to the message after the range, e.g. ``" (controls give a mean and a std)"``.

    Returns:
        ``value``.

    Raises:
        TypeError: If ``value`` is not an int.
        ValueError: If it lies outside the range.

    Example:
        >>> check_int(3, "steps")
        3
        >>> check_int(0, "steps")
        Traceback (most recent call last):
        ...
        ValueError: `steps` must be an int >= 1, got 0.
    """
    span = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int {span}{why}, got {type(value).__name__} {value!r:.40}.")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be an int {span}{why}, got {value}.")
    return value


def grid_batch(value: object, name: str, batch: int | None = None, axes: str = "h, w") -> Tensor:
    """``value`` as a ``[B, h, w]`` tensor, a ``[B, 1, h, w]`` one without its channel axis: the shape check of
    every batch of maps and masks.

    Args:
        value: The argument.
        name: Its name, for the message.
        batch: The required ``B``, or ``None`` for any.
        axes: The names of the two grid axes in the message (``"H, W"`` for input-resolution masks).

    Returns:
        The 3-D tensor (a view of ``value``).

    Raises:
        TypeError: If ``value`` is not a tensor.
        ValueError: On any other shape.

    Example:
        >>> grid_batch(torch.zeros(2, 1, 4, 4), "maps").shape
        torch.Size([2, 4, 4])
    """
    size = "B" if batch is None else str(batch)
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [{size}, {axes}], got {type(value).__name__}.")
    if value.ndim == 4 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim != 3 or (batch is not None and value.shape[0] != batch):
        raise ValueError(
            f"`{name}` must have shape [{size}, {axes}] (or [{size}, 1, {axes}]), got shape {tuple(value.shape)}."
        )
    return value


def check_images(x: object, name: str = "x") -> Tensor:
    """Check that ``x`` is a floating ``[B, C, H, W]`` tensor with ``B >= 1``.

    Args:
        x: The value to check.
        name: The argument name to use in the error message.

    Returns:
        ``x`` itself.

    Raises:
        TypeError: If ``x`` is not a floating-point tensor.
        ValueError: If ``x`` is not 4-D, has an empty batch or holds NaN or infinite values.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [B, C, H, W], got {type(x).__name__}.")
    if x.ndim != 4:
        raise ValueError(
            f"`{name}` must have shape [B, C, H, W], got shape {tuple(x.shape)}. "
            "Add a batch dimension with `x.unsqueeze(0)` for a single image."
        )
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` has an empty batch (shape {tuple(x.shape)}); pass at least one image.")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}. Use `x.float()`.")
    broken = nonfinite_rows(x)
    if broken:
        raise ValueError(f"`{name}` holds NaN or infinite values in images {broken[:8]}.")
    return x


def nonfinite_rows(x: Tensor) -> list[int]:
    """Indices of the rows of ``x`` (images, maps) that hold a NaN or an infinite value.

    Example:
        >>> nonfinite_rows(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))
        [1]
    """
    return (~torch.isfinite(x).flatten(1).all(dim=1)).nonzero().flatten().tolist()


def check_maps(maps: object, x: Tensor, name: str = "maps", nonnegative: bool = True) -> Tensor:
    """Check explanation maps against the images they explain.

    Args:
        maps: ``[B, h, w]`` (or ``[B, 1, h, w]``) maps, at layer or input resolution.
        x: The ``[B, C, H, W]`` images they belong to.
        name: The argument name to use in the error message.
        nonnegative: Require every value to be ``>= 0`` (raw CAM maps are ReLU'd).

    Returns:
        The maps as a float32 ``[B, h, w]`` tensor on ``x``'s device.

    Raises:
        TypeError: If ``maps`` is not a tensor.
        ValueError: On a wrong rank, a batch-size mismatch, non-finite values or negative values.
    """
    maps = grid_batch(maps, name)
    if maps.shape[0] != x.shape[0]:
        raise ValueError(
            f"`{name}` has batch size {maps.shape[0]} but the images have {x.shape[0]}; pass one map per image."
        )
    if maps.shape[1] == 0 or maps.shape[2] == 0:
        raise ValueError(f"`{name}` has no cells (shape {tuple(maps.shape)}); pass maps of at least 1 × 1.")
    maps = maps.detach().to(device=x.device, dtype=torch.float32)
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values; explanation maps must be finite.")
    if nonnegative and bool((maps < 0).any()):
        raise ValueError(
            f"`{name}` has negative values (min {maps.min().item():.4g}); this metric needs non-negative maps. "
            "Pass ReLU'd CAM maps or `maps.clamp_min(0)` / `maps.abs()`."
        )
    return maps


def targets_tensor(targets: Targets, batch: int, device: torch.device) -> Tensor | None:
    """Check the type and shape of ``targets`` and turn an int into a ``LongTensor [batch]``.

    Args:
        targets: ``None``, an ``int`` or an integer tensor of shape ``[batch]`` (or a scalar tensor).
        batch: Number of images.
        device: Device of the returned tensor.

    Returns:
        ``None`` (meaning: the model's argmax) or ``LongTensor [batch]``. The range is checked by
        :func:`resolve_targets` once the number of classes is known.

    Raises:
        TypeError: If ``targets`` has an unsupported type or dtype.
        ValueError: If a tensor has the wrong shape.
    """
    if targets is None:
        return None
    if isinstance(targets, bool) or not isinstance(targets, (int, Tensor)):
        raise TypeError(
            f"`targets` must be None, an int or a LongTensor of shape [B], got {type(targets).__name__}."
        )
    if isinstance(targets, int):
        return torch.full((batch,), targets, dtype=torch.long, device=device)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"`targets` must hold integer class indices, got dtype {targets.dtype}.")
    if targets.ndim == 0:
        targets = targets.expand(batch)
    if targets.shape != (batch,):
        raise ValueError(f"`targets` must have shape [{batch}] (one class per image), got {tuple(targets.shape)}.")
    return targets.to(device=device, dtype=torch.long)


def resolve_targets(targets: Targets, logits: Tensor) -> Tensor:
    """Turn the ``targets`` argument into a ``LongTensor [B]`` of class indices.

    Args:
        targets: ``None`` (the argmax of ``logits``), an ``int`` (the same class for every image) or an
            integer tensor of shape ``[B]``.
        logits: ``[B, K]`` model outputs on the clean images.

    Returns:
        ``LongTensor [B]`` on ``logits``' device.

    Raises:
        TypeError: If ``targets`` has an unsupported type or dtype.
        ValueError: If ``logits`` is not ``[B, K]``, or targets have a wrong shape or are out of range.

    Example:
        >>> resolve_targets(None, torch.tensor([[0.1, 2.0], [3.0, 0.0]]))
        tensor([1, 0])
    """
    if logits.ndim != 2:
        raise ValueError(
            f"the model must return logits of shape [B, K], got shape {tuple(logits.shape)}. "
            "Wrap the model so that it returns class scores."
        )
    batch, classes = logits.shape
    resolved = targets_tensor(targets, batch, logits.device)
    if resolved is None:
        return logits.detach().argmax(dim=1)
    if bool(((resolved < 0) | (resolved >= classes)).any()):
        raise ValueError(
            f"`targets` must lie in [0, {classes - 1}] for a model with {classes} classes, "
            f"got values {resolved.min().item()}..{resolved.max().item()}."
        )
    return resolved
