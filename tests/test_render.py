"""Rendering: colormaps against matplotlib, overlay/panel layout and scaling, grids, PNG round trips."""

from __future__ import annotations

import io
import warnings

import matplotlib
import pytest
import torch
from PIL import Image

from lightning_xcam.render import COLORMAPS, colormap, explanation_panel, grid, overlay, relative_mass, scale_maps, stack_rows, to_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LUMA = torch.tensor([0.2126, 0.7152, 0.0722])


def _ramp(n: int = 1001) -> torch.Tensor:
    return torch.linspace(0, 1, n).view(1, 1, n)


def _colours(name: str, n: int = 1001) -> torch.Tensor:
    """``[n, 3]`` colours of an evenly spaced ramp."""
    return colormap(_ramp(n), name)[0, :, 0].T


@pytest.mark.parametrize("name", COLORMAPS)
def test_colormap_follows_matplotlib_and_hits_its_endpoints(name: str) -> None:
    ours = _colours(name)
    ref = torch.tensor(matplotlib.colormaps[name](_ramp().flatten().numpy())[:, :3], dtype=torch.float32)
    assert (ours - ref).abs().max().item() < 0.035
    assert torch.allclose(ours[[0, -1]], ref[[0, -1]], atol=1e-4)


def test_colormap_endpoints_published_values_and_clipping() -> None:
    ends = colormap(torch.tensor([[[-3.0, 0.0, 1.0, 7.0, float("nan")]]]), "viridis")[0, :, 0].T
    assert torch.allclose(ends[1], torch.tensor([0.267004, 0.004874, 0.329415]), atol=1e-4)
    assert torch.allclose(ends[2], torch.tensor([0.993248, 0.906157, 0.143936]), atol=1e-4)
    assert torch.equal(ends[0], ends[1]) and torch.equal(ends[3], ends[2]) and torch.equal(ends[4], ends[1])
    turbo = _colours("turbo", 2)
    assert torch.allclose(turbo, torch.tensor([[0.18995, 0.07176, 0.23217], [0.4796, 0.01583, 0.01055]]), atol=1e-4)


def test_viridis_luminance_increases_monotonically() -> None:
    rgb = _colours("viridis")
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    assert bool(((rgb @ _LUMA).diff() > 0).all())  # luma on gamma-encoded values
    assert bool(((linear @ _LUMA).diff() > 0).all())  # relative luminance (linear light)


def test_colormap_shape_and_errors() -> None:
    out = colormap(torch.rand(2, 5, 7))
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(colormap(torch.full((1, 1, 2, 2), 0.3)), colormap(torch.full((1, 2, 2), 0.3)))
    with pytest.raises(ValueError, match="one of \\('viridis', 'turbo'\\)"):
        colormap(torch.rand(1, 2, 2), "jet")
    with pytest.raises(ValueError, match="\\[B, H, W\\]"):
        colormap(torch.rand(4, 4))


@pytest.mark.parametrize("channels", [1, 3])
def test_overlay_shapes_ranges_and_blend(channels: int) -> None:
    images = torch.randn(3, channels, 20, 24) * 40 + 7  # any range
    maps = torch.rand(3, 5, 6)
    out = overlay(images, maps, alpha=0.5)
    assert out.shape == (3, 3, 20, 24) and 0 <= out.min() and out.max() <= 1
    # alpha = 0 shows the image min-max scaled per image (grey repeated over RGB), alpha = 1 the heatmap.
    plain = overlay(images, maps, alpha=0.0)
    flat = images.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    assert torch.allclose(plain, ((images - low) / (high - low)).expand(-1, 3, -1, -1), atol=1e-6)
    heat = overlay(images, maps, alpha=1.0)
    upsampled = torch.nn.functional.interpolate(maps.unsqueeze(1), (20, 24), mode="bilinear", align_corners=False)
    expected = colormap(upsampled[:, 0] / maps.flatten(1).max(1).values.view(-1, 1, 1))
    assert torch.allclose(heat, expected, atol=1e-6)
    assert torch.allclose(out, 0.5 * plain + 0.5 * heat, atol=1e-6)
    # Display scaling makes the image's range irrelevant.
    assert torch.allclose(overlay(images * 0.01 - 3, maps), out, atol=1e-5)


def test_shared_vmax_renders_a_weaker_map_dimmer() -> None:
    strong = torch.rand(1, 8, 8) + 0.1
    weak = strong / 2
    vmax = float(strong.max())
    bright = scale_maps(strong, vmax)
    dim = scale_maps(weak, vmax)
    assert torch.allclose(dim, bright / 2, atol=1e-7)
    images = torch.zeros(1, 1, 8, 8)
    lum_strong = explanation_panel(images, strong, vmax=vmax, cmap="viridis")[:, :, :, 8:16]
    lum_weak = explanation_panel(images, weak, vmax=vmax, cmap="viridis")[:, :, :, 8:16]
    assert bool(((lum_weak.permute(0, 2, 3, 1) @ _LUMA) < (lum_strong.permute(0, 2, 3, 1) @ _LUMA)).all())
    # Without a shared scale each map is stretched to its own maximum and the difference disappears.
    assert torch.allclose(overlay(images, weak, cmap="viridis"), overlay(images, strong, cmap="viridis"), atol=1e-6)


def test_vmax_clips_and_can_be_per_sample() -> None:
    maps = torch.tensor([[[0.0, 1.0, 2.0, 4.0]], [[0.0, 1.0, 2.0, 4.0]]])
    assert scale_maps(maps, 2.0)[0].tolist() == [[0.0, 0.5, 1.0, 1.0]]
    per_sample = scale_maps(maps, torch.tensor([4.0, 1.0]))
    assert per_sample.tolist() == [[[0.0, 0.25, 0.5, 1.0]], [[0.0, 1.0, 1.0, 1.0]]]
    assert scale_maps(maps, torch.tensor([0.0, 4.0]))[0].tolist() == [[0.0] * 4]  # vmax 0: nothing to show
    assert scale_maps(torch.zeros(1, 2, 2)).tolist() == [[[0.0, 0.0], [0.0, 0.0]]]  # degenerate, no NaN
    with pytest.raises(ValueError, match="positive finite"):
        scale_maps(maps, 0.0)
    with pytest.raises(ValueError, match="shape \\[2\\]"):
        scale_maps(maps, torch.ones(3))
    with pytest.raises(TypeError, match="`vmax`"):
        scale_maps(maps, "max")  # type: ignore[arg-type]


def test_panel_layout() -> None:
    images = torch.randn(2, 3, 16, 16)
    maps = torch.rand(2, 4, 4)
    panel = explanation_panel(images, maps, vmax=0.8, alpha=0.4, cmap="viridis")
    assert panel.shape == (2, 3, 16, 48)
    assert torch.allclose(panel[..., :16], overlay(images, maps, alpha=0.0), atol=1e-7)
    assert torch.allclose(panel[..., 16:32], overlay(images, maps, vmax=0.8, alpha=1.0, cmap="viridis"), atol=1e-7)
    assert torch.equal(panel[..., 32:], overlay(images, maps, vmax=0.8, alpha=0.4, cmap="viridis"))


def test_overlay_errors() -> None:
    with pytest.raises(ValueError, match="1 or 3 channels, got 2"):
        overlay(torch.rand(1, 2, 8, 8), torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="batch size 2"):
        overlay(torch.rand(1, 3, 8, 8), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="negative"):
        overlay(torch.rand(1, 3, 8, 8), -torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="`alpha`"):
        overlay(torch.rand(1, 3, 8, 8), torch.rand(1, 4, 4), alpha=1.5)


def test_grid_layout() -> None:
    images = torch.stack([torch.full((3, 8, 8), i / 10) for i in range(5)])
    out = grid(images, nrow=3)
    assert out.shape == (3, 2 * 8 + 3 * 2, 3 * 8 + 4 * 2)
    assert torch.equal(out[:, 12:20, 12:20], images[4])  # second row, second column
    assert bool((out[:, :2] == 1.0).all()) and bool((out[:, 12:20, 22:32] == 1.0).all())  # padding, empty slot
    with pytest.raises(ValueError, match="nrow"):
        grid(images, nrow=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip(channels: int) -> None:
    image = torch.rand(channels, 13, 17)
    data = to_png(image)
    assert data.startswith(PNG_SIGNATURE)
    expected = (image * 255).round().to(torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io image codecs are deprecated
        from torchvision.io import decode_png

        decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert torch.equal(decoded, expected)
    pil = Image.open(io.BytesIO(data))
    assert pil.size == (17, 13) and pil.mode == ("L" if channels == 1 else "RGB")
    assert pil.tobytes() == bytes(expected.permute(1, 2, 0).flatten().tolist())  # a second, independent decoder
    assert to_png(expected) == data  # uint8 input is written as is
    with pytest.raises(ValueError, match="\\[3, H, W\\]"):
        to_png(torch.rand(2, 4, 4))


def test_relative_mass_is_the_share_of_a_uniform_map() -> None:
    maps = torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert relative_mass(maps).tolist() == [[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
    assert relative_mass(torch.full((1, 3, 3), 7.0)).allclose(torch.ones(1, 3, 3))


def test_stack_rows_puts_images_of_any_height_below_each_other_on_white() -> None:
    top, bottom = torch.zeros(3, 2, 5), torch.full((3, 1, 3), 0.5)
    stacked = stack_rows([top, bottom], gap=2)
    assert stacked.shape == (3, 5, 5)
    assert torch.equal(stacked[:, :2], top)
    assert bool((stacked[:, 2:4] == 1).all())  # the gap
    assert torch.equal(stacked[:, 4:, :3], bottom) and bool((stacked[:, 4:, 3:] == 1).all())  # padded right
