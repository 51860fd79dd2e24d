"""Localisation and complexity metrics: hand-computed tiny cases, scikit-image's horse mask, Quantus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_xcam.metrics import (
    energy_pointing_game,
    entropy,
    pointing_game,
    relevance_mass,
    relevance_rank,
    sparseness,
)


@pytest.fixture(scope="module")
def horse() -> torch.Tensor:
    """scikit-image's horse silhouette (``data.horse()`` is True on the background), 328 × 400."""
    from skimage import data

    return torch.as_tensor(~data.horse())


def _horse_batch(horse: torch.Tensor, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps at 41 × 50 (1/8 resolution) without ties, and the horse mask repeated."""
    generator = torch.Generator().manual_seed(5)
    low = F.avg_pool2d(horse[None, None].float(), 8)[0, 0]
    maps = torch.stack([low * (b + 1) + torch.rand(low.shape, generator=generator) * (0.5 + b) for b in range(batch)])
    return maps, horse.expand(batch, -1, -1).clone()


def test_pointing_game_by_hand() -> None:
    maps = torch.zeros(4, 40, 40)
    maps[:, 10, 10] = 1.0
    masks = torch.zeros(4, 40, 40, dtype=torch.bool)
    masks[0, 10, 10] = True  # the maximiser itself
    masks[1, 10, 24] = True  # 14 px away: inside the 15 px tolerance
    masks[2, 10, 25] = True  # 15 px away: d² = 225 is not < 225
    hits, valid = pointing_game(maps, masks, return_valid=True)
    assert torch.equal(hits, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(valid, torch.tensor([True, True, True, False]))  # empty mask: never a hit, excluded
    assert torch.equal(pointing_game(maps, masks, tolerance=0), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # Tied maxima: the first in raster order is the point.
    tied = torch.zeros(1, 5, 5)
    tied[0, 1, 3] = tied[0, 4, 0] = 2.0
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 1, 3] = True
    assert pointing_game(tied, mask, tolerance=0).item() == 1.0


def test_pointing_game_equals_a_dilated_mask(horse) -> None:
    """The batched distance check equals TorchRay's definition: the point lies in the mask dilated by the open disk."""
    from scipy.ndimage import binary_dilation

    maps, masks = _horse_batch(horse, 3)
    masks = masks.clone()
    masks[1] = torch.roll(masks[1], shifts=60, dims=1)  # move the mask off the maximiser for variety
    disk = np.add.outer(np.arange(-15, 16) ** 2, np.arange(-15, 16) ** 2) < 225
    up = F.interpolate(maps[:, None], size=tuple(horse.shape), mode="bilinear", align_corners=False)[:, 0]
    expected = []
    for b in range(3):
        point = np.unravel_index(int(up[b].argmax()), up[b].shape)
        expected.append(float(binary_dilation(masks[b].numpy(), structure=disk)[point]))
    assert pointing_game(maps, masks).tolist() == expected


def test_energy_mass_and_rank_by_hand() -> None:
    maps = torch.tensor([[[4.0, 1.0], [3.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, False], [False, True]], [[True, False], [False, False]]])
    energy, valid = energy_pointing_game(maps, masks, return_valid=True)
    assert torch.allclose(energy, torch.tensor([0.6, 0.0])) and torch.equal(valid, torch.tensor([True, False]))
    signed = torch.tensor([[[-4.0, 1.0], [3.0, -2.0]]])
    assert torch.allclose(relevance_mass(signed, masks[:1]), torch.tensor([0.6]))
    # K = 2: the top-2 cells are (0,0) and (1,0); one is in the mask.
    assert torch.allclose(relevance_rank(maps[:1], masks[:1]), torch.tensor([0.5]))
    # A constant map takes its top K in raster order: (0,0) for K = 1, a hit.
    assert relevance_rank(torch.ones(1, 2, 2), masks[1:]).item() == 1.0
    with pytest.raises(ValueError, match="negative"):
        energy_pointing_game(signed, masks[:1])


def test_localisation_maps_are_upsampled_to_the_masks() -> None:
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True
    up = F.interpolate(maps[:, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    assert energy_pointing_game(maps, masks).item() == pytest.approx(float(up[:4, :4].sum() / up.sum()), rel=1e-6)


def test_localisation_equals_quantus_on_the_horse(horse) -> None:
    quantus = pytest.importorskip("quantus")
    maps, masks = _horse_batch(horse, 3)
    up = F.interpolate(maps[:, None], size=tuple(horse.shape), mode="bilinear", align_corners=False).numpy()
    s = masks[:, None].numpy()
    x = np.zeros_like(up)
    assert all(len(np.unique(m)) > 0.9 * m.size for m in up)  # rank accuracy: Quantus breaks ties differently
    for ours, theirs in (
        (relevance_mass(maps, masks), quantus.RelevanceMassAccuracy().evaluate_batch(a_batch=up, s_batch=s)),
        (energy_pointing_game(maps, masks), quantus.AttributionLocalisation().evaluate_batch(x_batch=x, a_batch=up, s_batch=s)),
        (relevance_rank(maps, masks), quantus.RelevanceRankAccuracy().evaluate_batch(a_batch=up, s_batch=s)),
    ):
        assert np.allclose(ours.numpy(), np.asarray(theirs, dtype=np.float64), rtol=1e-5, atol=1e-6), (ours, theirs)
    # Quantus' strict pointing game (no tolerance) on non-empty masks; its empty-mask "hit" is not copied.
    theirs = quantus.PointingGame().evaluate_batch(x_batch=x, a_batch=up, s_batch=s)
    assert pointing_game(maps, masks, tolerance=0).tolist() == [float(v) for v in theirs]


def test_sparseness_and_entropy_by_hand() -> None:
    maps = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    gini, valid = sparseness(maps, return_valid=True)
    a = np.array([1.0, 2.0, 3.0, 4.0]) + 1e-7
    by_hand = ((2 * np.arange(1, 5) - 4 - 1) * a).sum() / (4 * a.sum())
    assert torch.allclose(gini, torch.tensor([0.75, 0.0, by_hand, 0.0], dtype=torch.float32), atol=1e-6)
    assert torch.equal(valid, torch.tensor([True, True, True, False]))
    values, valid = entropy(maps, return_valid=True)
    p = np.array([1, 2, 3, 4]) / 10
    assert torch.allclose(values, torch.tensor([0.0, math.log(4), -(p * np.log(p)).sum(), math.log(4)], dtype=torch.float32), atol=1e-6)
    assert torch.allclose(entropy(maps, normalized=True)[1:2], torch.ones(1))
    assert torch.equal(valid, torch.tensor([True, True, True, False]))
    # Scale invariance and signed maps (absolute values), up to float32's largest values (sums overflowed)
    assert torch.allclose(sparseness(-3 * maps[2:3]), gini[2:3], atol=1e-6)
    assert torch.allclose(entropy(7 * maps[2:3]), values[2:3], atol=1e-6)
    assert torch.allclose(sparseness(maps[2:3] * 7e37), gini[2:3], atol=1e-6)
    assert torch.allclose(entropy(maps[2:3] * 7e37), values[2:3], atol=1e-6)


def test_complexity_equals_quantus(horse) -> None:
    quantus = pytest.importorskip("quantus")
    maps, _ = _horse_batch(horse, 3)
    a = maps[:, None].numpy()
    x = np.zeros((3, 1, *maps.shape[1:]), dtype=np.float32)
    # Quantus edits a_batch in place (`a_batch += 1e-7`): give it copies.
    theirs_gini = quantus.Sparseness().evaluate_batch(x_batch=x, a_batch=a.copy())
    theirs_entropy = quantus.Complexity().evaluate_batch(x_batch=x, a_batch=a.copy())
    assert np.allclose(sparseness(maps).numpy(), theirs_gini, rtol=1e-4)
    assert np.allclose(entropy(maps).numpy(), theirs_entropy, rtol=1e-4)


def test_bad_arguments() -> None:
    maps = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="batch size 3"):
        relevance_mass(maps, torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        relevance_mass(maps, torch.full((2, 4, 4), 0.5))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        sparseness(torch.rand(4, 4))
    with pytest.raises(ValueError, match=r"no cells \(shape \(2, 0, 0\)\)"):
        entropy(torch.rand(2, 0, 0))
    with pytest.raises(TypeError, match="masks"):
        pointing_game(maps, [[0]])
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, maps > 0.5, tolerance=-1)
