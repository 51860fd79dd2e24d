"""Shortcut early warning (ALGORITHMS.md §6): signals, intervention, the warning rule, decoy data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

import lightning_xcam
from lightning_xcam.alerts import (
    Alert,
    Observation,
    WarningRule,
    a50,
    area_ratio,
    border_mass,
    concentration,
    evidence_image,
    kmeans,
    observe,
    region_reliance,
    region_sufficiency,
    spectral_clusters,
    spurious_mass,
    top_region,
)
from lightning_xcam.alerts import _control_masks, _random_offsets, _shift_masks
from lightning_xcam.demos import add_decoy_tags, load_lfw_tensors
from lightning_xcam.render import explanation_panel, grid

# ------------------------------------------------------------------------------------------------ signals


def test_border_mass_hand_computed() -> None:
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, 5], maps[0, 5, 5], maps[0, 9, 9] = 1.0, 1.0, 2.0  # band = 1 cell: 3 of 4 units on the border
    maps[1, 4:6, 4:6] = 1.0  # all inside
    assert border_mass(maps).tolist() == pytest.approx([0.75, 0.0])


def test_border_mass_cuts_cells_by_area() -> None:
    # 5x5 with a 10 % band: 0.5 cell per side. A uniform map gives the band's area share 1 - 0.8^2.
    assert border_mass(torch.ones(1, 5, 5)).item() == pytest.approx(0.36)
    edge = torch.zeros(1, 5, 5)
    edge[0, 0, 2] = 1.0  # half of this cell is in the band
    corner = torch.zeros(1, 5, 5)
    corner[0, 0, 0] = 1.0  # 1 - (1 - 0.5)(1 - 0.5)
    assert border_mass(torch.cat([edge, corner])).tolist() == pytest.approx([0.5, 0.75])
    assert border_mass(torch.ones(1, 7, 9), band=0.5).item() == pytest.approx(1.0)


def test_spurious_mass_and_area_ratio_hand_computed() -> None:
    maps = torch.tensor([[[4.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # holds 6 of 8 units on 4 of 16 cells
    assert spurious_mass(maps, mask).item() == pytest.approx(0.75)
    assert area_ratio(maps, mask).item() == pytest.approx(3.0)
    # A constant 2x2 map, upsampled to the 4x4 mask: uniform, so rho = 1 for any region.
    assert area_ratio(torch.ones(1, 2, 2), mask).item() == pytest.approx(1.0)
    # Empty region and degenerate map: defined zeros, not NaN.
    assert area_ratio(maps, torch.zeros_like(mask)).item() == 0.0
    assert area_ratio(torch.zeros(1, 4, 4), mask).item() == 0.0
    assert spurious_mass(torch.full((1, 4, 4), float("nan")), mask).item() == 0.0


def test_a50_hand_computed() -> None:
    maps = torch.tensor(
        [
            [[4.0, 0.0], [0.0, 0.0]],  # one cell holds everything
            [[1.0, 1.0], [1.0, 1.0]],  # two cells of four
            [[2.0, 2.0], [1.0, 1.0]],  # 2/6 < 1/2, 4/6 >= 1/2: two cells
            [[3.0, 1.0], [0.0, 0.0]],  # 3/4 >= 1/2
            [[0.0, 0.0], [0.0, 0.0]],  # degenerate: 1 by convention
        ]
    )
    assert a50(maps).tolist() == pytest.approx([0.25, 0.5, 0.5, 0.25, 1.0])


def test_concentration_hand_computed_per_group() -> None:
    maps = torch.zeros(7, 16, 16)
    maps[0, 3, 3] = maps[1, 3, 3] = 1.0  # group 0: same cell twice
    maps[2, 0, 0] = maps[3, 15, 15] = 1.0  # group 1: two different cells
    maps[4] = 1.0  # group 2: uniform map + one degenerate map
    maps[5] = 0.0
    maps[6] = -1.0  # group 5: only a degenerate map
    res = concentration(maps, torch.tensor([0, 0, 1, 1, 2, 2, 5]))
    assert res.groups.tolist() == [0, 1, 2, 5]
    # Group 1: mean map (1/2, 1/2): H = log 2, focus = 1 - log 2 / log 256 = 7/8; cos(e_a, mean) = 1/sqrt 2.
    assert res.focus.tolist() == pytest.approx([1.0, 0.875, 0.0, 0.0], abs=1e-6)
    assert res.coherence.tolist() == pytest.approx([1.0, 1 / math.sqrt(2), 1.0, 0.0], abs=1e-6)
    assert res.count.tolist() == [2, 2, 1, 0]
    assert res.num_degenerate.tolist() == [0, 0, 1, 1]


def test_concentration_matches_scipy_entropy_on_random_maps() -> None:
    from scipy.stats import entropy

    maps = torch.rand(9, 16, 16) ** 4
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    res = concentration(maps, groups)
    unit = maps / maps.sum(dim=(1, 2), keepdim=True)
    for g in range(3):
        mean = unit[groups == g].mean(dim=0).flatten().double().numpy()
        assert res.focus[g].item() == pytest.approx(1 - entropy(mean) / math.log(256), abs=1e-5)


# ------------------------------------------------------------------------------------------- clustering


def _blobs(centres: Tensor, sigma: Tensor, size: int = 32) -> Tensor:
    grid = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    dist2 = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    return torch.exp(-dist2 / (2 * sigma[:, None, None] ** 2))


def _planted_maps(seed: int = 0) -> Tensor:
    """60 CAM-like maps: 42 object blobs near the centre, then 18 corner-shortcut blobs; sparse noise."""
    gen = torch.Generator().manual_seed(seed)
    clean = _blobs(16 + 3 * torch.randn(42, 2, generator=gen), 3 + 2 * torch.rand(42, generator=gen))
    short = _blobs(1 + 2 * torch.rand(18, 2, generator=gen), 1 + 0.5 * torch.rand(18, generator=gen))
    noise = (0.05 * torch.randn(60, 32, 32, generator=gen)).clamp_min(0)
    return torch.cat([clean, short]) + noise


def test_spectral_clusters_isolates_and_flags_a_planted_corner_cluster() -> None:
    maps = _planted_maps()
    planted = torch.arange(60) >= 42
    assert border_mass(maps[planted]).mean() > 0.5 > 0.1 > border_mass(maps[~planted]).mean()
    res = spectral_clusters(maps, torch.zeros(60, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    # The kNN graph has two components (two zero eigenvalues) and one cluster is exactly the 18 maps.
    assert int((res.eigenvalues[0] < 1e-8).sum()) == 2
    exact = [c for c in range(len(res.size)) if torch.equal(res.assignments == c, planted)]
    assert len(exact) == 1
    shortcut = exact[0]
    assert res.flagged.tolist() == [c == shortcut for c in range(len(res.size))]
    assert "isolated" in res.reasons[shortcut]
    assert res.isolation[shortcut].item() == 1.0
    assert res.fraction[shortcut].item() == pytest.approx(0.3)
    assert torch.equal(res.members(shortcut), planted.nonzero().flatten())
    # Purity against a known attribute: the shortcut cluster is pure.
    res_g = spectral_clusters(maps, torch.zeros(60, dtype=torch.long), groups=planted.long())
    shortcut_g = int(res_g.assignments[-1])
    assert res_g.purity[shortcut_g].item() == 1.0


def test_spectral_clusters_does_not_flag_clean_maps() -> None:
    gen = torch.Generator().manual_seed(5)
    clean = _blobs(16 + 3 * torch.randn(60, 2, generator=gen), 3 + 2 * torch.rand(60, generator=gen))
    maps = clean + (0.05 * torch.randn(60, 32, 32, generator=gen)).clamp_min(0)
    res = spectral_clusters(maps, torch.zeros(60, dtype=torch.long))
    assert int((res.eigenvalues[0] < 1e-8).sum()) == 1
    assert not bool(res.flagged.any())
    assert int(res.size.sum()) == 60


def test_spectral_clusters_skips_small_classes_and_degenerate_maps_without_nan() -> None:
    maps = torch.cat([_planted_maps(), torch.zeros(3, 32, 32), torch.rand(10, 32, 32)])
    labels = torch.cat([torch.zeros(63, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    res = spectral_clusters(maps, labels)
    assert res.num_degenerate == 3 and res.skipped_classes == [1]
    assert (res.assignments[60:] == -1).all() and (res.assignments[:60] >= 0).all()
    for stat in (res.fraction, res.focus, res.coherence, res.purity, res.silhouette, res.isolation):
        assert torch.isfinite(stat).all()


def test_kmeans_is_deterministic_and_recovers_separated_groups() -> None:
    gen = torch.Generator().manual_seed(3)
    points = torch.cat([torch.randn(20, 2, generator=gen) + 10 * i for i in range(3)])
    first = kmeans(points, 3, torch.Generator().manual_seed(1))
    again = kmeans(points, 3, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert all(first[20 * i : 20 * (i + 1)].unique().numel() == 1 for i in range(3))
    assert first.unique().numel() == 3


# ----------------------------------------------------------------------------------------- intervention


class _PatchModel(nn.Module):
    """Class 0's logit reads the mean of a fixed patch (strongly) and of the whole image (weakly)."""

    def __init__(self, patch: Tensor) -> None:
        super().__init__()
        self.register_buffer("patch", patch.float())
        self.dropout = nn.Dropout(0.5)  # must be off during the checks

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(x)
        local = (x[:, 0] * self.patch).sum(dim=(1, 2)) / self.patch.sum()
        score = 2.0 * (local - 1.0) + 0.3 * x[:, 0].mean(dim=(1, 2))  # p ~ 0.6: not saturated
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def _regions(size: int = 16) -> tuple[Tensor, Tensor]:
    corner = torch.zeros(size, size, dtype=torch.bool)
    corner[:4, :4] = True
    centre = torch.zeros(size, size, dtype=torch.bool)
    centre[6:10, 6:10] = True
    return corner, centre


def _bright_images(batch: int = 6, size: int = 16) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return 1.0 + 0.5 * torch.rand(batch, 1, size, size, generator=gen)


@pytest.mark.parametrize("looks_at", ["corner", "centre"])
def test_region_reliance_separates_the_region_the_model_uses(looks_at: str) -> None:
    corner, centre = _regions()
    used, unused = (corner, centre) if looks_at == "corner" else (centre, corner)
    model = _PatchModel(used).train()
    x = _bright_images()
    targets = torch.zeros(6, dtype=torch.long)
    hit = region_reliance(model, x, used.expand(6, -1, -1), targets, fill="zero", generator=torch.Generator())
    miss = region_reliance(model, x, unused.expand(6, -1, -1), targets, fill="zero", generator=torch.Generator())
    assert model.training  # the model is left as found
    assert (hit.z > 10).all() and (hit.drop_region > 0.2).all()
    assert (hit.drop_random.abs() < 0.05).all()  # the controls never touch the used region
    # Filling an unused region only moves the weak global term; controls may hit the used patch.
    assert (miss.drop_region < 0.05).all() and (miss.z < 3).all()  # never confirmed
    assert not hit.controls_overlap.any()


def test_region_reliance_is_chunk_invariant_and_matches_a_direct_forward() -> None:
    corner, _ = _regions()
    model = _PatchModel(corner)
    x = _bright_images(5)
    masks = corner.expand(5, -1, -1)
    one = region_reliance(model, x, masks, n_random=4, fill="mean", generator=torch.Generator().manual_seed(2))
    chunked = region_reliance(
        model, x, masks, n_random=4, fill="mean", generator=torch.Generator().manual_seed(2), max_batch=3
    )
    torch.testing.assert_close(one.drop_random, chunked.drop_random)
    torch.testing.assert_close(one.z, chunked.z)
    # Direct oracle for the region itself: fill with each image's mean colour, forward, compare.
    filled = torch.where(masks[:, None], x.mean(dim=(2, 3), keepdim=True), x)
    with torch.no_grad():
        p = model.eval()(x).softmax(1)[:, 0]
        p_filled = model(filled).softmax(1)[:, 0]
    torch.testing.assert_close(one.drop_region, p - p_filled)
    assert one.targets.tolist() == [0] * 5


def test_random_controls_keep_shape_stay_inside_and_avoid_the_region() -> None:
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[0, :3, :3] = True
    masks[1, 5:8, 2:9] = True
    masks[1, 4, 4] = True  # irregular shape
    masks[2] = True  # covers the image: it is its own control
    dy, dx, overlap = _random_offsets(masks, 8, torch.Generator().manual_seed(0))
    shifted = _shift_masks(masks, dy, dx)
    for i in range(2):  # inside: the moved bounding box stays in the image (no copy wraps around it)
        rows, cols = masks[i].any(dim=1).nonzero().flatten(), masks[i].any(dim=0).nonzero().flatten()
        assert ((rows.min() + dy[i] >= 0) & (rows.max() + dy[i] <= 11)).all()
        assert ((cols.min() + dx[i] >= 0) & (cols.max() + dx[i] <= 11)).all()
        for r in range(8):  # the same shape: the control is the region moved by (dy, dx)
            assert torch.equal(shifted[i, r].nonzero(), masks[i].nonzero() + torch.stack([dy[i, r], dx[i, r]]))
    assert torch.equal(shifted.sum(dim=(2, 3))[:2], masks[:2, None].sum(dim=(2, 3)).expand(2, 8))
    assert not (shifted[:2] & masks[:2, None]).any()
    assert overlap.tolist() == [False, False, True]
    assert torch.equal(shifted[2], masks[2].expand(8, -1, -1))
    # Distinct positions when there is room.
    assert all(len(set(zip(dy[i].tolist(), dx[i].tolist()))) == 8 for i in range(2))


def test_regions_spanning_the_image_get_wrapped_controls_unless_none_is_apart() -> None:
    masks = torch.zeros(2, 12, 12, dtype=torch.bool)
    for rows in (slice(0, 3), slice(9, 12)):
        for cols in (slice(0, 3), slice(9, 12)):
            masks[0, rows, cols] = True  # all four corners: no translation stays inside
    masks[1] = True
    masks[1, 1:-1, 1:-1] = False  # a one-pixel frame: every position meets it
    dy, dx, overlap = _random_offsets(masks, 8, torch.Generator().manual_seed(0))
    shifted = _shift_masks(masks, dy, dx)
    assert shifted[0].sum(dim=(1, 2)).eq(36).all() and not (shifted[0] & masks[0]).any()
    assert len(set(zip(dy[0].tolist(), dx[0].tolist()))) == 8
    # the shift by half the image turns the corners into one central block (checked by hand)
    block = torch.zeros(12, 12, dtype=torch.bool)
    block[3:9, 3:9] = True
    assert torch.equal(_shift_masks(masks[:1], torch.tensor([[6]]), torch.tensor([[6]]))[0, 0], block)
    assert overlap.tolist() == [False, True] and torch.equal(shifted[1], masks[1].expand(8, -1, -1))
    # so a model reading one corner is caught through a four-corner suspect mask (it was its own control: z 0)
    corner, _ = _regions()
    corners = corner | corner.flip(0) | corner.flip(1) | corner.flip(0, 1)
    res = region_reliance(_PatchModel(corner), _bright_images(), corners.expand(6, 16, 16), n_random=4)
    assert not res.controls_overlap.any() and (res.z > 10).all()


def test_a_frame_that_no_translation_moves_apart_is_compared_with_the_rings_inside_it() -> None:
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[0] = True
    masks[0, 1:-1, 1:-1] = False  # 44 pixels; the 100 inside hold two sets of 44
    masks[1] = True  # covers the image: no pixel left for a control
    masks[2, :3, :3] = True  # a corner keeps its moved copies
    controls, overlap = _control_masks(masks, 4, torch.Generator().manual_seed(0))
    assert overlap.tolist() == [True, True, False]  # the frame's two rings are reused in turn
    assert controls[0].sum(dim=(1, 2)).eq(44).all() and not (controls[0] & masks[0]).any()
    first = torch.zeros(12, 12, dtype=torch.bool)  # by hand: the ring next to the frame (36 pixels) and
    first[1:-1, 1:-1] = True  # the first 8 pixels, in raster order, of the ring after it
    first[2:-2, 2:-2] = False
    first[2, 2:10] = True
    assert torch.equal(controls[0, 0], first) and torch.equal(controls[0, 2], first)
    second = torch.zeros(12, 12, dtype=torch.bool)  # the rest of that ring, the next one (rows and columns
    second[3:10, 2:10] = True  # 3..8), and the first 4 pixels of the one after (row 4, columns 4..7)
    second[4:8, 4:8] = False
    second[4, 4:8] = True
    assert torch.equal(controls[0, 1], second) and torch.equal(controls[0, 3], second)
    assert torch.equal(controls[1], masks[1].expand(4, -1, -1))
    dy, dx, _ = _random_offsets(masks, 4, torch.Generator().manual_seed(0))
    assert torch.equal(controls[2], _shift_masks(masks, dy, dx)[2])
    # so a model reading the image border is caught through a frame mask (it was its own control: z 0),
    # and one reading the centre is not
    frame = torch.ones(16, 16, dtype=torch.bool)
    frame[2:-2, 2:-2] = False
    for used, relies in ((frame, True), (_regions()[1], False)):
        res = region_reliance(_PatchModel(used), _bright_images(), frame.expand(6, 16, 16), fill="zero", n_random=4)
        gap = res.drop_region - res.drop_random.mean(dim=1)
        assert bool((gap > 0.2).all() and (res.z > 10).all()) if relies else bool((gap.abs() < 0.05).all())


def test_tiny_region_reliance_through_top_region() -> None:
    corner, _ = _regions()
    model = _PatchModel(corner)
    maps = torch.zeros(6, 4, 4)
    maps[:, 0, 0] = 1.0  # explanations point at the corner cell of a 4x4 CAM
    region = top_region(maps, fraction=1 / 16, size=(16, 16))
    assert region.sum(dim=(1, 2)).tolist() == [16] * 6
    res = region_reliance(model, _bright_images(), region, fill="zero")
    assert (res.z > 10).all()


class _CornerLogit(nn.Module):
    """Logits ``[4·mean(2×2 corner) − 2, 0]``: only the corner decides (dropout must be off in the checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        score = 4 * self.dropout(x)[:, 0, :2, :2].mean(dim=(1, 2)) - 2
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_region_sufficiency_hand_computed_transplant() -> None:
    model = _CornerLogit().train()
    x = torch.zeros(4, 1, 4, 4)
    x[:2, :, :2, :2] = 1.0  # items 0, 1: corner 1 -> logit 2 (class 0); items 2, 3: corner 0 -> logit -2 (class 1)
    region = torch.zeros(4, 4, 4, dtype=torch.bool)
    region[:, :2, :2] = True
    targets = torch.tensor([0, 0, 1, 1])
    res = region_sufficiency(model, x, region, targets, n_recipients=3, n_random=2,
                             generator=torch.Generator().manual_seed(0))
    assert model.training  # the model is left as found
    # Pasting a class-0 corner into a class-1 image moves p_0 from σ(−2) to σ(2) (and symmetrically for class 1):
    # a rise of σ(2) − σ(−2) = tanh(1). Only two other-class items exist, so the third recipient slot is empty.
    torch.testing.assert_close(res.rise_region, torch.full((4,), math.tanh(1.0)))
    assert [sorted(r) for r in res.recipients.tolist()] == [[-1, 2, 3]] * 2 + [[-1, 0, 1]] * 2
    # The controls are the same shape off the corner: both images are 0 there, so nothing moves.
    assert torch.equal(res.rise_random, torch.zeros(4, 2)) and res.valid.all()
    chunked = region_sufficiency(model, x, region, targets, n_recipients=3, n_random=2,
                                 generator=torch.Generator().manual_seed(0), max_batch=5)
    torch.testing.assert_close(chunked.rise_region, res.rise_region)
    # One class only: no recipient, rises 0 (defined, never NaN).
    alone = region_sufficiency(model, x, region, torch.zeros(4, dtype=torch.long), n_random=2)
    assert not alone.valid.any() and torch.equal(alone.rise_region, torch.zeros(4))
    assert torch.equal(alone.rise_random, torch.zeros(4, 2))


def test_region_sufficiency_matches_a_direct_paste_on_a_random_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    x = torch.randn(5, 1, 6, 6)
    region = torch.rand(5, 6, 6) > 0.8
    targets = torch.tensor([0, 1, 2, 0, 1])
    res = region_sufficiency(model, x, region, targets, n_recipients=2, n_random=3,
                             generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = model(x).softmax(1)
        for i in range(5):  # oracle: paste item i's region into each recipient, average the rise of p(target_i)
            js = res.recipients[i].tolist()
            pasted = torch.where(region[i], x[i], x[js])
            rise = (model(pasted).softmax(1)[:, targets[i]] - p[js, targets[i]]).mean()
            torch.testing.assert_close(res.rise_region[i], rise)
            assert all(targets[j] != targets[i] for j in js)


def test_top_region_counts_and_breaks_ties_by_raster_order() -> None:
    maps = torch.zeros(2, 32, 32)
    maps[0] = torch.arange(1024, dtype=torch.float32).view(32, 32)
    maps[1] = 1.0  # all tied
    region = top_region(maps, fraction=0.05)
    assert region.sum(dim=(1, 2)).tolist() == [52, 52]  # ceil(0.05 * 1024)
    assert region[0].flatten()[-52:].all()
    assert region[1].flatten()[:52].all()
    assert not top_region(torch.zeros(1, 4, 4)).any()


# ------------------------------------------------------------------------------------------------- rule


def _noise(n: int, seed: int, scale: float = 0.02) -> list[float]:
    return (scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))).tolist()


def test_rule_stays_silent_on_pure_noise() -> None:
    rule = WarningRule()
    raised = []
    for t in range(25):
        obs = []
        for c in range(4):
            e0, e1 = _noise(2, 1000 * c + t)
            obs.append(Observation("border", c, 0.2 + e0, replicate=0.2 + e1))
            obs.append(Observation("spurious_mass", c, 1.0 + 5 * e0, replicate=1.0 + 5 * e1))
        raised += rule.update(t, obs)
    assert raised == []


def test_rule_never_alarms_on_change_alone() -> None:
    rule = WarningRule()
    raised = []
    for t in range(8):
        raised += rule.update(
            t,
            [
                Observation("border", 0, 0.6 - 0.07 * t, replicate=0.6 - 0.07 * t),  # falling: learning
                Observation("spurious_mass", 1, 0.5 + 0.12 * t, replicate=0.5 + 0.12 * t),  # rising, rho < 1.5
            ],
        )
    assert raised == []
    with pytest.raises(ValueError, match="kind"):
        Observation("drift", None, 4.0)  # drift is logged, never judged


def _rising_border(rule: WarningRule, zs: list[float | None] | None = None) -> list[Alert]:
    values = [0.10, 0.11, 0.10, 0.18, 0.26, 0.34, 0.35]
    raised = []
    for t, v in enumerate(values):
        z = None if zs is None else zs[t]
        obs = Observation("border", 7, v, replicate=v + 0.01, sample_indices=(2, 5), drop_region=0.38,
                          drop_random=0.03, z=z)
        raised += rule.update(t, [obs])
    return raised


def test_rule_alerts_after_patience_consecutive_rises() -> None:
    # Floor: sigma = sqrt(0.01^2 / 2) ~ 0.007 < min_sigma 0.01, so sigma = 0.01: each +0.08 is 8 units.
    raised = _rising_border(WarningRule(patience=2))
    assert [(a.epoch, a.kind, a.class_index) for a in raised] == [(4, "border", 7)]
    alert = raised[0]
    assert alert.score == pytest.approx(0.26) and alert.threshold == pytest.approx(0.10 + 2 * 0.01)
    assert alert.sample_indices == (2, 5)
    assert alert.message.startswith("epoch 4: class 7 explanations concentrate on the image border")
    assert "border mass 0.26, 16.0 noise-floor units above epoch 0" in alert.message
    assert "drops p(class) by 0.38 vs 0.03 for random regions of equal area" in alert.message
    assert "\n" not in alert.message
    assert [a.epoch for a in _rising_border(WarningRule(patience=3))] == [5]


def test_rule_needs_confirmation_when_supplied_and_stays_pending() -> None:
    assert _rising_border(WarningRule(), zs=[1.0] * 7) == []
    # Confirmation arrives one evaluation after the rises stop: the level is still abnormal, so it raises.
    late = _rising_border(WarningRule(), zs=[1.0] * 6 + [4.5])
    assert [a.epoch for a in late] == [6]
    assert "(reliance z 4.5 >= 2.5)" in late[0].message
    # A large z on negligible drops (an unsure model: every drop ~0) does not confirm.
    assert _rising_border(WarningRule(min_drop=0.4), zs=[9.0] * 7) == []


def test_rule_alerts_once_per_episode_and_rearms() -> None:
    rule = WarningRule()
    values = [0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.1, 0.1, 0.2, 0.3]
    epochs = [a.epoch for t, v in enumerate(values) for a in rule.update(t, [Observation("border", 0, v)])]
    assert epochs == [3, 9]  # silent while high; re-armed when back to normal at epoch 6


def test_rule_spurious_mass_level_and_cluster_flags() -> None:
    rule = WarningRule()
    rhos = [1.0, 1.3, 1.6, 1.9]
    raised = [a for t, r in enumerate(rhos) for a in rule.update(t, [Observation("spurious_mass", 3, r)])]
    assert [(a.epoch, a.score, a.threshold) for a in raised] == [(2, 1.6, 1.5)]
    flag = Observation("cluster", 2, 0.21, flagged=True, detail="isolated cluster of 18 maps")
    assert WarningRule().update(0, [Observation("cluster", 2, 0.21, flagged=True, z=1.0)]) == []
    (alert,) = WarningRule().update(0, [flag])
    assert alert.kind == "cluster" and "isolated cluster of 18 maps" in alert.message


def test_rule_state_dict_round_trip_continues_identically() -> None:
    def stream(t: int) -> list[Observation]:
        e0, e1 = _noise(2, t, 0.005)
        v = 0.1 + max(0, t - 3) * 0.05
        return [
            Observation("border", 1, v + e0, replicate=v + e1, z=4.0),
            Observation("spurious_mass", None, 1.0 + 0.2 * max(0, t - 5) + e0, z=4.0),
        ]

    whole = WarningRule()
    expected = [a.to_dict() for t in range(10) for a in whole.update(t, stream(t))]
    first = WarningRule()
    got = [a.to_dict() for t in range(5) for a in first.update(t, stream(t))]
    state = json.loads(json.dumps(first.state_dict()))  # plain Python types only
    resumed = WarningRule()
    resumed.load_state_dict(state)
    got += [a.to_dict() for t in range(5, 10) for a in resumed.update(t, stream(t))]
    assert got == expected and {a["kind"] for a in expected} == {"border", "spurious_mass"}
    assert resumed.state_dict() == whole.state_dict()
    with pytest.raises(ValueError, match="state_dict"):
        WarningRule().load_state_dict({"series": {}})
    damaged = json.loads(json.dumps(first.state_dict()))
    del next(iter(damaged["series"].values()))["floor"]
    for broken in (damaged, {"version": 1, "series": []}):
        with pytest.raises(ValueError, match="state_dict"):
            WarningRule().load_state_dict(broken)


def test_alert_is_public_and_converts_to_plain_dict() -> None:
    assert lightning_xcam.Alert is Alert
    alert = Alert(torch.tensor(3), "border", torch.tensor(0.41), 0.2, torch.tensor(7), torch.tensor([1, 4]), "m")
    as_dict = alert.to_dict()
    assert as_dict == {
        "epoch": 3, "kind": "border", "score": pytest.approx(0.41), "threshold": 0.2,
        "class_index": 7, "sample_indices": [1, 4], "message": "m",
    }
    assert json.loads(json.dumps(as_dict))["sample_indices"] == [1, 4]
    assert Alert.from_dict(as_dict) == alert
    with pytest.raises(ValueError, match="kind"):
        Alert(0, "colour", 0.0, 0.0, None, (), "")


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(TypeError, match="maps"):
        border_mass([[0.0]])
    with pytest.raises(ValueError, match="band"):
        border_mass(torch.ones(1, 4, 4), band=0.7)
    with pytest.raises(ValueError, match="masks"):
        area_ratio(torch.ones(2, 4, 4), torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_random"):
        region_reliance(nn.Flatten(), torch.ones(1, 1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), n_random=1)
    with pytest.raises(ValueError, match="region_masks"):
        region_reliance(nn.Flatten(), torch.ones(1, 1, 4, 4), torch.ones(1, 8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"`n_random` must be an int >= 2 \(controls give a mean and a std\), got str"):
        region_reliance(nn.Flatten(), torch.ones(1, 1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), n_random="4")
    with pytest.raises(ValueError, match="n_recipients"):
        region_sufficiency(nn.Flatten(), torch.ones(1, 1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), n_recipients=0)
    with pytest.raises(ValueError, match="region_masks"):
        region_sufficiency(nn.Flatten(), torch.ones(1, 1, 4, 4), torch.ones(1, 8, 8, dtype=torch.bool))
    diverged = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    nn.init.constant_(diverged[1].bias, float("nan"))
    region = torch.zeros(2, 4, 4, dtype=torch.bool)
    region[:, 0, 0] = True
    for check in (region_reliance, region_sufficiency):  # NaN probabilities would pass as "no effect"
        with pytest.raises(ValueError, match=r"non-finite logits for 2 of 2 images.*diverged"):
            check(diverged, torch.ones(2, 1, 4, 4), region, torch.tensor([0, 1]), n_random=2)
    with pytest.raises(ValueError, match="min_rise"):
        WarningRule(min_rise=float("inf"))
    with pytest.raises(ValueError, match="value"):
        Observation("border", 0, float("nan"))
    with pytest.raises(ValueError, match="two observations"):
        WarningRule().update(0, [Observation("border", 0, 0.1), Observation("border", 0, 0.2)])


# ------------------------------------------------------------------------------------------- decoy data


def test_add_decoy_tags_puts_the_class_coded_patch_where_the_mask_says(digits: tuple[Tensor, Tensor]) -> None:
    images, labels = digits[0][:200], digits[1][:200]
    tagged, masks = add_decoy_tags(images, labels, size=3, generator=torch.Generator().manual_seed(0))
    low, high = images.min(), images.max()
    expected = low + (high - low) * (1 - labels.float() / 10)
    assert masks.sum(dim=(1, 2)).eq(9).all()
    patch = tagged[:, 0][masks].view(200, 9)
    torch.testing.assert_close(patch, expected[:, None].expand(200, 9))
    assert torch.equal(tagged[:, 0][~masks], images[:, 0][~masks])  # nothing else changes
    # Corner placement: every patch touches two image borders.
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    assert ((rows[:, 0] | rows[:, -1]) & (cols[:, 0] | cols[:, -1])).all()
    # Same seed, correlation 0: same positions, codes no longer follow labels.
    shuffled, masks0 = add_decoy_tags(images, labels, correlation=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks0, masks)
    codes = torch.round((1 - (shuffled[:, 0][masks0].view(200, 9)[:, 0] - low) / (high - low)) * 10).long()
    assert 0.02 < (codes == labels).float().mean() < 0.3


def test_decoy_tags_plant_a_detectable_area_ratio_on_lfw() -> None:
    images, labels = load_lfw_tensors()
    assert images.shape == (200, 1, 25, 25) and labels[:100].eq(1).all() and labels[100:].eq(0).all()
    tagged, masks = add_decoy_tags(images, labels, position="random", num_classes=2, contrast=0.5)
    assert masks.sum(dim=(1, 2)).eq(9).all()
    # An "explanation" equal to the image's deviation from the patch-free mean puts mass on the tag.
    deviation = (tagged[:, 0] - images[:, 0]).abs()
    torch.testing.assert_close(area_ratio(deviation, masks), torch.full((200,), 625 / 9))


# ------------------------------------------------------------------------------------- observe, evidence


def test_observe_reports_the_paired_reliance_of_the_top_region_per_class() -> None:
    corner, _ = _regions()
    model = _PatchModel(corner)
    x = _bright_images(8)
    maps = torch.zeros(8, 4, 4)
    maps[:, 0, 0] = 1.0  # every map points at the corner cell the model reads
    maps[4:, 3, 3] += 2.0  # the last four point elsewhere
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ids = torch.arange(10, 18)
    obs = observe(model, x, maps, targets, ids, generator=torch.Generator().manual_seed(0), min_cluster_maps=64,
                  n_recipients=2, n_random=4)
    assert [(o.kind, o.class_index) for o in obs] == [
        ("border", None), ("intervention", None), ("border", 0), ("intervention", 0), ("border", 1),
        ("intervention", 1),
    ]  # no cluster observation below min_cluster_maps
    ref = region_reliance(model, x, top_region(maps, 0.05, (16, 16)), targets, n_random=4,
                          generator=torch.Generator().manual_seed(0))
    gap = (ref.drop_region - ref.drop_random.mean(dim=1)).double()
    for o in obs[1::2]:
        rows = slice(None) if o.class_index is None else targets == o.class_index
        g = gap[rows]
        assert o.value == o.z == pytest.approx(float(g.mean() / max(float(g.std()) / math.sqrt(g.numel()), 1e-3)))
        assert o.drop_region == pytest.approx(float(ref.drop_region[rows].mean()))
        assert o.drop_random == pytest.approx(float(ref.drop_random[rows].mean()))
    # The transplant check: the same top regions pasted into other-class items, pooled like the drops.
    gen = torch.Generator().manual_seed(0)
    region_reliance(model, x, top_region(maps, 0.05, (16, 16)), targets, n_random=4, generator=gen)  # observe's draws
    moved = region_sufficiency(model, x, top_region(maps, 0.05, (16, 16)), targets, n_recipients=2, n_random=4,
                               generator=gen)
    rises = (moved.rise_region - moved.rise_random.mean(dim=1)).double()
    for o in obs[1::2]:
        rows = slice(None) if o.class_index is None else targets == o.class_index
        r = rises[rows]
        assert o.z_transplant == pytest.approx(float(r.mean() / max(float(r.std()) / math.sqrt(r.numel()), 1e-3)))
        assert o.rise_region == pytest.approx(float(moved.rise_region[rows].mean()))
    # The items whose region matters most come first.
    assert set(obs[1].sample_indices[:4]) == {10, 11, 12, 13}
    assert obs[3].z > 10 and obs[3].drop_region > 0.2 > 0.05 > abs(obs[5].drop_region)


def test_observe_leaves_degenerate_maps_out_of_its_means_and_reports_no_transplant_without_recipients() -> None:
    corner, _ = _regions()
    model = _PatchModel(corner)
    x = _bright_images(8)
    maps = torch.zeros(8, 4, 4)
    maps[:5, 0, 0] = 1.0  # five maps all in the corner cell (border mass 1), three degenerate
    masks = corner.expand(8, 16, 16)
    obs = observe(model, x, maps, torch.zeros(8, dtype=torch.long), torch.arange(8), masks=masks,
                  generator=torch.Generator().manual_seed(0), min_cluster_maps=64)
    by_kind = {o.kind: o for o in obs if o.class_index is None}
    # a corner cell of a 4-cell-wide map lies 1 − (1 − 0.4)² inside the 10 % band; the mean is over the
    # five valid maps, not 5/8 of it: a map that locates nothing has no border mass
    assert by_kind["border"].value == pytest.approx(1 - 0.6**2)
    assert by_kind["spurious_mass"].value == pytest.approx(float(area_ratio(maps[:5], masks[:5]).mean()))
    # one class only: no item has a recipient of another class, so no transplant check (not "no effect")
    assert by_kind["intervention"].z_transplant is None and by_kind["intervention"].rise_region is None
    none_valid = observe(model, x, torch.zeros(8, 4, 4), torch.zeros(8, dtype=torch.long), torch.arange(8),
                         generator=torch.Generator().manual_seed(0), min_cluster_maps=64)
    assert none_valid == []


def test_observe_clusters_the_probe_and_checks_the_cluster_mean_region() -> None:
    maps = _planted_maps()  # 42 centre blobs, then 18 corner blobs (a corner at (0, 0) of a 32x32 map)
    corner = torch.zeros(32, 32, dtype=torch.bool)
    corner[:4, :4] = True
    model = _PatchModel(corner)
    x = _bright_images(60, 32)
    targets = torch.zeros(60, dtype=torch.long)
    # The planted corner blobs are sharp (about ten cells above the noise): a 1 % region keeps to the corner.
    obs = observe(model, x, maps, targets, torch.arange(60), generator=torch.Generator().manual_seed(0),
                  top_fraction=0.01)
    (cluster,) = [o for o in obs if o.kind == "cluster"]
    assert cluster.class_index is None and cluster.flagged and "isolated" in cluster.detail
    assert set(cluster.sample_indices) == set(range(42, 60))
    assert cluster.drop_region - cluster.drop_random > 0.15 and abs(cluster.drop_random) < 0.01 and cluster.z > 10
    (alert,) = WarningRule().update(0, [cluster])  # a confirmed SpRAy flag warns at once
    assert alert.kind == "cluster" and "spectral cluster of 18 of 60 maps" in alert.message


def test_rule_intervention_warns_after_patience_confirmed_levels_without_a_rise() -> None:
    def obs(z: float, gap: float) -> Observation:
        return Observation("intervention", 3, z, drop_region=0.02 + gap, drop_random=0.02, z=z, sample_indices=(1,))

    rule = WarningRule(patience=2)
    flat = [obs(6.0, 0.3)] * 4  # the same high level from the first evaluation on
    assert [a.epoch for t, o in enumerate(flat) for a in rule.update(t, [o])] == [1]
    gaps = [0.3, 0.05, 0.3, 0.3]  # the gap dips under min_drop: the streak restarts
    rule = WarningRule()
    assert [a.epoch for t, g in enumerate(gaps) for a in rule.update(t, [obs(6.0, g)])] == [3]
    rule = WarningRule()
    assert [a.epoch for t, g in enumerate(gaps[:3]) for a in rule.update(t, [obs(6.0, g)])] == []
    low_z = WarningRule()
    assert [a for t in range(4) for a in low_z.update(t, [obs(2.0, 0.3)])] == []


def test_rule_sufficiency_alone_confirms_with_its_own_gap() -> None:
    def obs(z_transplant: float, rise_gap: float) -> Observation:
        # Necessity fails (z 0.5, no drop gap); the transplant check decides.
        return Observation("intervention", 3, 0.5, drop_region=0.02, drop_random=0.02, z=0.5, sample_indices=(1,),
                           rise_region=0.05 + rise_gap, rise_random=0.05, z_transplant=z_transplant)

    def run(rule: WarningRule, observation: Observation) -> list[Alert]:
        return [a for t in range(3) for a in rule.update(t, [observation])]

    raised = run(WarningRule(), obs(6.0, 0.3))
    assert [(a.epoch, a.score) for a in raised] == [(1, 6.0)]  # the confirming z is the alert's score
    assert "transplant z 6.0" in raised[0].message and "raises p(class) by 0.35 vs 0.05" in raised[0].message
    assert run(WarningRule(), obs(6.0, 0.08)) == []  # gap under min_rise (0.15)
    assert [a.epoch for a in run(WarningRule(min_rise=0.05), obs(6.0, 0.08))] == [1]
    assert run(WarningRule(), obs(2.0, 0.3)) == []  # z under confirm_z


def test_evidence_image_stacks_the_mean_map_then_the_items_in_order() -> None:
    images = torch.randn(4, 1, 8, 8)
    maps = torch.rand(4, 2, 2)
    ids = torch.tensor([7, 8, 9, 10])
    image = evidence_image(images, maps, ids, (9, 99, 7), vmax=4.0)
    scaled = maps / maps.sum(dim=(1, 2), keepdim=True) * 4
    rows = [2, 0]
    expected = grid(explanation_panel(torch.cat([images[rows].mean(0, keepdim=True), images[rows]]),
                                      torch.cat([scaled[rows].mean(0, keepdim=True), scaled[rows]]), vmax=4.0), nrow=1)
    torch.testing.assert_close(image, expected)
    assert image.shape == (3, 3 * 8 + 4 * 2, 24 + 4)
    assert evidence_image(images, maps, ids, range(7, 11), max_items=2).shape[1] == 3 * 8 + 4 * 2
    with pytest.raises(ValueError, match="sample_indices"):
        evidence_image(images, maps, ids, (1, 2))


def test_rule_counts_only_evaluations_that_observed_the_signal_as_consecutive() -> None:
    confirmed = Observation("intervention", 3, 6.0, drop_region=0.32, drop_random=0.02, z=6.0)
    other = Observation("border", None, 0.1)
    rule = WarningRule(patience=2)
    # class 3 is missing at evaluation 1 (too few items predicted as it): evaluations 0 and 2 are not consecutive
    got = [a.epoch for t, obs in enumerate([[confirmed, other], [other], [confirmed, other], [confirmed, other]])
           for a in rule.update(t, obs)]
    assert got == [3]


def test_rule_update_that_raises_leaves_the_state_untouched() -> None:
    rule = WarningRule()
    rule.update(0, [Observation("border", 0, 0.1)])
    before = rule.state_dict()
    with pytest.raises(ValueError, match="two observations"):
        rule.update(1, [Observation("border", 0, 0.5), Observation("border", 1, 0.2), Observation("border", 1, 0.3)])
    with pytest.raises(TypeError, match="Observation"):
        rule.update(1, [Observation("border", 0, 0.5), {"kind": "border"}])
    assert rule.state_dict() == before


def test_rule_intervention_without_a_check_judges_its_value_as_the_z() -> None:
    rule = WarningRule(patience=2)
    assert [a for t in range(4) for a in rule.update(t, [Observation("intervention", 3, -4.0)])] == []
    assert [a.epoch for t in range(4) for a in rule.update(t, [Observation("intervention", 3, 3.0)])] == [1]


def test_observe_and_kmeans_name_their_bad_counts_before_any_work() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    args = (net, torch.randn(8, 1, 8, 8), torch.rand(8, 4, 4), torch.tensor([0, 1] * 4), torch.arange(8))
    with pytest.raises(ValueError, match="`min_cluster_maps` must be an int >= 3"):
        observe(*args, min_cluster_maps=2)
    with pytest.raises(ValueError, match="`min_group` must be an int >= 1"):
        observe(*args, min_group=0)
    points = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    for name in ("n_init", "max_iter"):
        with pytest.raises(ValueError, match=f"`{name}` must be an int >= 1"):
            kmeans(points, 2, **{name: 0})


def test_rule_pending_signal_survives_an_evaluation_that_missed_it() -> None:
    def border(value: float, z: float) -> list[Observation]:
        return [Observation("border", 7, value, z=z)]

    rule = WarningRule(patience=2)
    # rises to pending at evaluation 2 (unconfirmed), missing at 3, confirmed at 4 while still abnormal
    evaluations = [border(0.1, 0.0), border(0.2, 0.0), border(0.3, 0.0), [], border(0.3, 5.0)]
    assert [a.epoch for t, obs in enumerate(evaluations) for a in rule.update(t, obs)] == [4]
    with pytest.raises(TypeError, match="`epoch` must be an int"):
        rule.update("5", [])
