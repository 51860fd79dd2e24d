"""Colormaps, heatmap overlays, panels, grids and PNG bytes in torch alone (no matplotlib, OpenCV or numpy).

Colours come from a small table of anchor colours per colormap, interpolated linearly in sRGB. The
anchors are the colormaps sampled at 17 evenly spaced points (``t = i / 16``), rounded to 4 decimals;
between anchors they stay within 0.03 of the reference curves, which is invisible in a heatmap.

Scaling. Maps are shown on a *fixed* colour scale when the caller passes ``vmax``: a value ``v`` is
drawn at ``clip(v / vmax, 0, 1)``. Keeping ``vmax`` across epochs (per sample or global) makes a map
that loses mass look dimmer instead of being re-stretched. Without ``vmax`` each map is scaled by its
own maximum.

Example:
    >>> panel = explanation_panel(torch.randn(2, 1, 32, 32), torch.rand(2, 7, 7))
    >>> panel.shape
    torch.Size([2, 3, 32, 96])
"""

from __future__ import annotations

import struct
import zlib

import torch
from torch import Tensor

from lightning_xcam._checks import check_images, check_int, check_maps, grid_batch
from lightning_xcam.maps import display_normalize, unit_mass, upsample

#: The fixed colour scale of the monitor's heatmaps (TensorBoard, report, alert evidence): a cell at this
#: many times a uniform map's share of the mass is drawn at full colour (see :func:`relative_mass`).
DISPLAY_CONCENTRATION = 4.0

__all__ = ["COLORMAPS", "DISPLAY_CONCENTRATION", "colormap", "relative_mass", "scale_maps", "overlay", "explanation_panel", "grid", "stack_rows", "to_png"]

# Anchor colours (sRGB in [0, 1]) at t = 0, 1/16, ..., 1.
_ANCHORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "viridis": (
        (0.2670, 0.0049, 0.3294), (0.2823, 0.0950, 0.4173), (0.2788, 0.1755, 0.4834), (0.2590, 0.2515, 0.5247),
        (0.2297, 0.3224, 0.5457), (0.1994, 0.3876, 0.5546), (0.1727, 0.4488, 0.5579), (0.1490, 0.5081, 0.5572),
        (0.1276, 0.5669, 0.5506), (0.1206, 0.6258, 0.5335), (0.1579, 0.6838, 0.5017), (0.2461, 0.7389, 0.4520),
        (0.3692, 0.7889, 0.3829), (0.5160, 0.8312, 0.2943), (0.6785, 0.8637, 0.1895), (0.8456, 0.8873, 0.0997),
        (0.9932, 0.9062, 0.1439),
    ),
    "turbo": (
        (0.1900, 0.0718, 0.2322), (0.2511, 0.2524, 0.6337), (0.2763, 0.4212, 0.8912), (0.2586, 0.5796, 0.9988),
        (0.1584, 0.7355, 0.9230), (0.0927, 0.8655, 0.7623), (0.1966, 0.9490, 0.5947), (0.4278, 0.9942, 0.3858),
        (0.6436, 0.9900, 0.2336), (0.8047, 0.9245, 0.2046), (0.9330, 0.8124, 0.2267), (0.9931, 0.6741, 0.2035),
        (0.9836, 0.4929, 0.1285), (0.9210, 0.3149, 0.0548), (0.8161, 0.1846, 0.0181), (0.6645, 0.0844, 0.0042),
        (0.4796, 0.0158, 0.0106),
    ),
}

#: Names accepted by :func:`colormap`.
COLORMAPS: tuple[str, ...] = tuple(_ANCHORS)


def colormap(values: Tensor, name: str = "turbo") -> Tensor:
    """Map values in ``[0, 1]`` to RGB colours.

    Args:
        values: ``[B, H, W]`` (or ``[B, 1, H, W]``) values; clipped to ``[0, 1]``, NaN drawn as 0.
        name: One of :data:`COLORMAPS` (``"turbo"`` or ``"viridis"``).

    Returns:
        Float32 ``[B, 3, H, W]`` colours in ``[0, 1]`` on ``values``' device.

    Raises:
        TypeError: If ``values`` is not a tensor.
        ValueError: On an unknown ``name`` or a wrong shape.

    Example:
        >>> colormap(torch.tensor([[[0.0, 1.0]]]), "viridis")[0, :, 0, 1]
        tensor([0.9932, 0.9062, 0.1439])
    """
    values = grid_batch(values, "values", axes="H, W")
    if name not in _ANCHORS:
        raise ValueError(f"`name` must be one of {COLORMAPS}, got {name!r}.")
    lut = torch.tensor(_ANCHORS[name], dtype=torch.float32, device=values.device)  # [n, 3]
    t = torch.nan_to_num(values.float(), nan=0.0).clamp(0.0, 1.0) * (lut.shape[0] - 1)
    low = t.floor().long().clamp_max(lut.shape[0] - 2)
    frac = (t - low).unsqueeze(-1)
    rgb = lut[low] * (1 - frac) + lut[low + 1] * frac  # [B, H, W, 3]
    return rgb.permute(0, 3, 1, 2).clamp(0.0, 1.0)


def scale_maps(maps: Tensor, vmax: Tensor | float | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """Put raw maps on a colour scale: ``clip(upsample(maps) / vmax, 0, 1)``.

    Args:
        maps: Raw non-negative maps ``[B, h, w]``.
        vmax: The value drawn at the top of the scale: a positive float shared by all maps, a tensor of
            shape ``[]`` or ``[B]`` (per sample; a 0 entry draws that map at 0), or ``None`` for each map's
            own maximum (all-zero maps stay 0).
        size: ``(H, W)`` to upsample to (bilinear), or ``None``.

    Returns:
        Float32 ``[B, H, W]`` in ``[0, 1]``.

    Raises:
        TypeError: If ``vmax`` has an unsupported type.
        ValueError: If ``vmax`` is not positive and finite, or a tensor of the wrong shape.

    Example:
        >>> scale_maps(torch.tensor([[[1.0, 4.0]]]), vmax=2.0)
        tensor([[[0.5000, 1.0000]]])
    """
    batch = maps.shape[0]
    if vmax is None:
        top = maps.flatten(1).amax(dim=1)
    elif isinstance(vmax, Tensor):
        top = vmax.detach().to(device=maps.device, dtype=torch.float32).reshape(-1)
        if top.numel() not in (1, batch):
            raise ValueError(f"`vmax` must be a scalar or have shape [{batch}] (one per map), got {tuple(vmax.shape)}.")
        if not bool(torch.isfinite(top).all()) or bool((top < 0).any()):
            raise ValueError("`vmax` must hold finite non-negative values.")
        top = top.expand(batch)
    elif isinstance(vmax, (int, float)) and not isinstance(vmax, bool):
        if not 0 < vmax < float("inf"):
            raise ValueError(f"`vmax` must be a positive finite number, got {vmax!r}.")
        top = torch.full((batch,), float(vmax), device=maps.device)
    else:
        raise TypeError(f"`vmax` must be None, a positive float or a Tensor [B], got {type(vmax).__name__}.")
    top = top.view(-1, 1, 1)
    scaled = upsample(maps, size) / top.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(top > 0, scaled, torch.zeros_like(scaled)).clamp(0.0, 1.0)


def _layers(
    images: Tensor, maps: Tensor, vmax: Tensor | float | None, alpha: float, cmap: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The three renderings behind :func:`overlay` and :func:`explanation_panel`: image, heatmap, blend."""
    images = check_images(images, "images")
    batch, channels, height, width = images.shape
    if channels not in (1, 3):
        raise ValueError(
            f"`images` must have 1 or 3 channels, got {channels} (shape {tuple(images.shape)}); "
            "pass grey or RGB images, e.g. `images[:, :3]`."
        )
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha!r}.")
    maps = check_maps(maps, images, "maps")
    # Per-image min-max over all channels together, so colours keep their balance.
    display = display_normalize(images.detach().float().reshape(batch, channels * height, width))
    display = display.reshape(batch, channels, height, width).expand(batch, 3, height, width)
    heat = colormap(scale_maps(maps, vmax, (height, width)), cmap)
    return display, heat, (1 - alpha) * display + alpha * heat


def overlay(
    images: Tensor, maps: Tensor, vmax: Tensor | float | None = None, alpha: float = 0.5, cmap: str = "turbo"
) -> Tensor:
    """Blend colour-mapped heatmaps over the images they explain.

    Args:
        images: ``[B, C, H, W]`` with ``C`` 1 or 3, any range (each image is min-max scaled for display).
        maps: Raw non-negative maps ``[B, h, w]`` (upsampled bilinearly to ``(H, W)``).
        vmax: Colour scale, see :func:`scale_maps`.
        alpha: Weight of the heatmap in the blend.
        cmap: One of :data:`COLORMAPS`.

    Returns:
        Float32 ``[B, 3, H, W]`` in ``[0, 1]``: ``(1 − alpha) · image + alpha · colormap(map)``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: On wrong shapes or channel counts, negative or non-finite maps, bad ``vmax`` or ``alpha``.

    Example:
        >>> overlay(torch.randn(2, 3, 32, 32), torch.rand(2, 7, 7), vmax=1.0).shape
        torch.Size([2, 3, 32, 32])
    """
    return _layers(images, maps, vmax, alpha, cmap)[2]


def explanation_panel(
    images: Tensor, maps: Tensor, vmax: Tensor | float | None = None, alpha: float = 0.5, cmap: str = "turbo"
) -> Tensor:
    """Image | heatmap | overlay side by side, one panel per sample (what TensorBoard shows).

    Args:
        images: ``[B, C, H, W]`` with ``C`` 1 or 3, any range.
        maps: Raw non-negative maps ``[B, h, w]``.
        vmax: Colour scale, see :func:`scale_maps`.
        alpha: Weight of the heatmap in the overlay.
        cmap: One of :data:`COLORMAPS`.

    Returns:
        Float32 ``[B, 3, H, 3W]`` in ``[0, 1]``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: As :func:`overlay`.

    Example:
        >>> explanation_panel(torch.randn(4, 1, 28, 28), torch.rand(4, 7, 7)).shape
        torch.Size([4, 3, 28, 84])
    """
    return torch.cat(_layers(images, maps, vmax, alpha, cmap), dim=3)


def grid(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile ``[N, C, H, W]`` images into one ``[3, H', W']`` image, ``nrow`` per row (torchvision's make_grid).

    Args:
        images: ``[N, 3, H, W]`` (or 1-channel) images in ``[0, 1]``.
        nrow: Images per row.
        padding: Pixels between and around images.
        pad_value: Colour of the padding (1.0 = white).

    Returns:
        ``[3, H', W']`` with ``H' = rows·(H + padding) + padding`` and ``W' = ncol·(W + padding) + padding``.

    Raises:
        TypeError: If ``images`` is not a tensor.
        ValueError: If ``images`` is not 4-D or ``nrow``/``padding`` are invalid.

    Example:
        >>> grid(torch.zeros(5, 3, 8, 8), nrow=3).shape
        torch.Size([3, 22, 32])
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"`images` must be a torch.Tensor of shape [N, 3, H, W], got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
        raise ValueError(f"`images` must have shape [N, 3, H, W] with N >= 1, got {tuple(images.shape)}.")
    check_int(nrow, "nrow")
    check_int(padding, "padding", minimum=0)
    from torchvision.utils import make_grid  # deferred: torchvision costs a second at import (CLI start-up)

    return make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)


def stack_rows(images: list[Tensor], gap: int = 4, pad_value: float = 1.0) -> Tensor:
    """Put ``[C, H_i, W_i]`` images of any height one below the other, left-aligned, ``gap`` pixels apart
    (:func:`grid` needs images of one size).

    Args:
        images: A non-empty list of ``[C, H_i, W_i]`` images with the same ``C``.
        gap: Pixels between two images.
        pad_value: Colour of the gap and of the padding right of narrower images (1.0 = white).

    Returns:
        ``[C, ΣH_i + gap·(n − 1), max W_i]``.

    Example:
        >>> stack_rows([torch.zeros(3, 2, 5), torch.zeros(3, 4, 3)], gap=1).shape
        torch.Size([3, 7, 5])
    """
    width = max(image.shape[-1] for image in images)
    rows = []
    for image in images:
        rows.append(torch.nn.functional.pad(image, (0, width - image.shape[-1]), value=pad_value))
        rows.append(torch.full((image.shape[0], gap, width), pad_value, dtype=image.dtype, device=image.device))
    return torch.cat(rows[:-1], dim=1)


def to_png(image: Tensor, compression_level: int = 6) -> bytes:
    """Encode one image as PNG bytes (8-bit greyscale or RGB, written with the standard library's zlib).

    torchvision's ``encode_png`` is deprecated since torchvision 0.29, and the format is small enough to
    write directly: signature, ``IHDR``, one ``IDAT`` of filter-0 scanlines, ``IEND``.

    Args:
        image: ``[3, H, W]`` or ``[1, H, W]``: floats in ``[0, 1]`` (clipped, rounded to 8 bits) or uint8.
        compression_level: zlib level 0-9.

    Returns:
        The PNG file's bytes.

    Raises:
        TypeError: If ``image`` is not a tensor.
        ValueError: If ``image`` is not ``[1 or 3, H, W]`` with ``H, W >= 1``, or the level is not 0-9.

    Example:
        >>> to_png(torch.zeros(3, 4, 4))[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"`image` must be a torch.Tensor of shape [3, H, W], got {type(image).__name__}.")
    if image.ndim != 3 or image.shape[0] not in (1, 3) or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"`image` must have shape [3, H, W] or [1, H, W], got {tuple(image.shape)}.")
    if not 0 <= compression_level <= 9:
        raise ValueError(f"`compression_level` must lie in 0..9, got {compression_level!r}.")
    if image.dtype != torch.uint8:
        image = (torch.nan_to_num(image.detach().float(), nan=0.0).clamp(0, 1) * 255).round().to(torch.uint8)
    channels, height, width = image.shape
    rows = image.detach().cpu().permute(1, 2, 0).reshape(height, width * channels)
    # Every scanline starts with its filter type; 0 = none.
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour_type = 2 if channels == 3 else 0  # truecolour or greyscale, 8 bits per sample
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(raw.flatten().tolist()), compression_level))
        + chunk(b"IEND", b"")
    )


def relative_mass(maps: Tensor) -> Tensor:
    """Each cell's share of its map's mass relative to a uniform map (1 = uniform; all-zero maps stay 0).

    Comparable across epochs and samples whatever the explainer's raw scale; draw it with
    ``scale_maps(relative_mass(maps), vmax=DISPLAY_CONCENTRATION)``.

    Args:
        maps: Raw non-negative maps ``[B, h, w]``.

    Returns:
        Float32 ``[B, h, w]`` summing to ``h·w`` per non-degenerate map.

    Example:
        >>> relative_mass(torch.tensor([[[1.0, 3.0]]]))
        tensor([[[0.5000, 1.5000]]])
    """
    return unit_mass(maps.float()) * (maps.shape[-2] * maps.shape[-1])
