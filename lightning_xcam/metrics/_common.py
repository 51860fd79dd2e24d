"""Plumbing shared by the functional metrics: argument checks, the clean pass, per-item noise.

Every functional metric returns a ``[B]`` value tensor; with ``return_valid=True`` it also returns a
``BoolTensor [B]`` that is ``False`` for items whose value is a documented convention rather than a
measurement (degenerate maps, empty masks). The torchmetrics twins leave those items out of their means
and count them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_xcam._checks import Targets, check_images, check_maps, grid_batch, resolve_targets
from lightning_xcam.maps import upsample
from lightning_xcam.methods._guard import model_device, fresh_input
from lightning_xcam.metrics._perturb import clean_logits

__all__ = [
    "Clean",
    "Result",
    "check_lone_maps",
    "check_masks",
    "check_sample_ids",
    "clean_pass",
    "finish",
    "item_noise",
    "stable_rank",
]

Result = Tensor | tuple[Tensor, Tensor]


def finish(values: Tensor, valid: Tensor, return_valid: bool) -> Result:
    """``values`` or ``(values, valid)``; one place that enforces the never-NaN rule."""
    if not bool(torch.isfinite(values).all()):  # pragma: no cover - a bug, not a user error
        raise RuntimeError("internal error: a metric produced a non-finite value; please report it.")
    return (values, valid) if return_valid else values


def check_lone_maps(maps: object, nonnegative: bool = True, name: str = "maps") -> Tensor:
    """:func:`check_maps` for metrics that take maps without images; returns float32 ``[B, h, w]``."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [B, h, w], got {type(maps).__name__}.")
    if maps.shape[:1] == (0,):
        raise ValueError(f"`{name}` has an empty batch (shape {tuple(maps.shape)}); pass at least one map.")
    # check_maps only reads the batch size and device of its reference tensor.
    return check_maps(maps, maps, name=name, nonnegative=nonnegative)


def check_masks(masks: object, maps: Tensor, name: str = "masks") -> Tensor:
    """Check ground-truth masks against their maps.

    Args:
        masks: ``[B, H, W]`` (or ``[B, 1, H, W]``) boolean masks, or 0/1 numbers.
        maps: The checked ``[B, h, w]`` maps they belong to.
        name: The argument name for error messages.

    Returns:
        ``BoolTensor [B, H, W]`` on the maps' device.

    Raises:
        TypeError: If ``masks`` is not a tensor.
        ValueError: On a wrong rank, a batch-size mismatch or values other than 0 and 1.
    """
    masks = grid_batch(masks, name, axes="H, W")
    if masks.shape[0] != maps.shape[0]:
        raise ValueError(
            f"`{name}` has batch size {masks.shape[0]} but the maps have {maps.shape[0]}; pass one mask per map."
        )
    if masks.dtype != torch.bool:
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError(f"`{name}` must be boolean (or hold only 0 and 1); threshold it, e.g. `masks > 0.5`.")
        masks = masks != 0
    return masks.to(maps.device)


def check_sample_ids(sample_ids: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """``LongTensor [B]`` of item ids (``arange(B)`` when ``None``) on ``device``.

    Raises:
        TypeError: If ``sample_ids`` is not an integer tensor.
        ValueError: If it does not have shape ``[B]`` or holds negative ids.
    """
    if sample_ids is None:
        return torch.arange(batch, device=device)
    if not isinstance(sample_ids, Tensor) or sample_ids.is_floating_point() or sample_ids.dtype == torch.bool:
        raise TypeError(f"`sample_ids` must be None or an integer tensor of shape [{batch}], got {sample_ids!r:.80}.")
    if sample_ids.shape != (batch,):
        raise ValueError(f"`sample_ids` must have shape [{batch}] (one id per image), got {tuple(sample_ids.shape)}.")
    if bool((sample_ids < 0).any()):
        raise ValueError("`sample_ids` must be non-negative item indices.")
    return sample_ids.to(device=device, dtype=torch.long)


def item_noise(
    shape: tuple[int, ...],
    seed: int,
    sample_ids: Tensor,
    device: torch.device,
    kind: str,
    scale: float,
) -> Tensor:
    """Noise ``[B * shape[0], *shape[1:]]``: item ``b`` draws its block from a generator seeded by ``(seed, id_b)``.

    Each item owns its generator (ALGORITHMS.md §1.8), so the draws do not depend on the batch layout,
    the chunk size or the global RNG. The loop runs once per item and only draws random numbers.

    Args:
        shape: Shape of one item's block, e.g. ``(n, C, H, W)``.
        seed: Base seed.
        sample_ids: ``LongTensor [B]`` item ids.
        device: Where to draw.
        kind: ``"normal"`` (``N(0, scale²)``) or ``"uniform"`` (``U(-scale, scale)``).
        scale: Standard deviation or half-width.

    Returns:
        The stacked blocks, items in the order of ``sample_ids``.
    """
    generator = torch.Generator(device=device)
    blocks = []
    for item in sample_ids.tolist():
        # Large odd multiplier: distinct (seed, item) pairs map to distinct streams.
        generator.manual_seed((int(seed) * 0x9E3779B97F4A7C15 + item) % (2**63))
        if kind == "normal":
            blocks.append(torch.randn(shape, generator=generator, device=device) * scale)
        else:
            blocks.append((torch.rand(shape, generator=generator, device=device) * 2 - 1) * scale)
    return torch.cat(blocks)


def stable_rank(values: Tensor) -> Tensor:
    """``LongTensor [B, N]``: each cell's position in its row sorted in descending order (0 = largest).

    The sort is stable, so ties are ranked in raster (index) order (ALGORITHMS.md §1.6).
    """
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    positions = torch.arange(values.shape[1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


@dataclass
class Clean:
    """The clean pass of one metric call: images, maps, targets and logits on the model's device."""

    x: Tensor
    maps: Tensor
    targets: Tensor
    logits: Tensor

    def scores(self, softmax: bool) -> Tensor:
        """``[B]`` target score on the clean images: softmax probability or raw output."""
        out = self.logits.softmax(dim=1) if softmax else self.logits
        return out.gather(1, self.targets.view(-1, 1)).squeeze(1)


def clean_pass(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Targets,
    nonnegative: bool = True,
) -> Clean:
    """Check the arguments, forward the clean images once and resolve the targets.

    Call it inside :func:`~lightning_xcam.methods._guard.explanation_context`. Maps are upsampled
    (bilinear) to the images' resolution.

    Args:
        model: The classifier.
        x: ``[B, C, H, W]`` images in model-input space.
        maps: ``[B, h, w]`` maps at layer or input resolution.
        targets: ``None`` (argmax on the clean images), an int or ``LongTensor [B]``.
        nonnegative: Reject maps with negative values.

    Returns:
        The :class:`Clean` bundle.

    Raises:
        ValueError: If the model's logits on the clean images are not finite (a diverged model: no score
            of it would mean anything).
    """
    check_images(x)
    maps = check_maps(maps, x, nonnegative=nonnegative)
    device = model_device(model)
    x = fresh_input(x, device=device)
    logits = clean_logits(model, x, None)
    resolved = resolve_targets(targets, logits)
    return Clean(x=x, maps=upsample(maps.to(device), tuple(x.shape[-2:])), targets=resolved, logits=logits)
