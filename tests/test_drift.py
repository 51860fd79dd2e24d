"""Drift statistics against scipy/skimage oracles and hand-computed tiny cases (ALGORITHMS.md §5)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import rankdata, spearmanr
from skimage.metrics import structural_similarity

from lightning_xcam.drift import (
    STATISTICS,
    center_of_mass_shift,
    cosine_distance,
    drift_maps,
    drift_statistics,
    evaluation_drift,
    in_floor_units,
    jensen_shannon,
    noise_floor,
    spearman_distance,
    ssim_distance,
    summarize,
    tie_averaged_ranks,
    topk_iou_distance,
    total_variation,
    valid_pairs,
)
from lightning_xcam.maps import unit_mass


def _relu_maps(batch: int, h: int = 16, w: int = 16, levels: int | None = None) -> torch.Tensor:
    """Unit-mass ReLU'd random maps: about half the cells are exact zeros; ``levels`` adds ties above 0."""
    maps = torch.randn(batch, h, w).clamp_min(0)
    if levels is not None:
        maps = (maps * levels).round()
    maps[0, 0, 0] = 1.0  # never degenerate
    return unit_mass(maps)


def test_tie_averaged_ranks_equal_scipy_rankdata() -> None:
    x = (torch.randn(6, 50).clamp_min(0) * 3).round()
    ours = tie_averaged_ranks(x)
    for row, ranks in zip(x, ours):
        assert ranks.tolist() == rankdata(row.numpy(), method="average").tolist()


@pytest.mark.parametrize("levels", [None, 4])
def test_spearman_equals_scipy_with_ties(levels: int | None) -> None:
    p, q = _relu_maps(12, levels=levels), _relu_maps(12, levels=levels)
    q[3] = p[3]  # one identical pair
    ours = spearman_distance(p, q)
    for i in range(12):
        rho = spearmanr(p[i].flatten().double().numpy(), q[i].flatten().double().numpy()).statistic
        assert abs(float(ours[i]) - (1.0 - rho)) <= 1e-6
    assert float(ours[3]) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("shape", [(16, 16), (11, 9)])
def test_ssim_equals_skimage_defaults(shape: tuple[int, int]) -> None:
    p, q = _relu_maps(8, *shape), _relu_maps(8, *shape)
    q[1] = 0.5 * (p[1] + q[1])  # a similar pair as well as unrelated ones
    ours = ssim_distance(p, q)
    for i in range(8):
        a, b = p[i].double().numpy(), q[i].double().numpy()
        data_range = max(a.max(), b.max()) - min(a.min(), b.min())
        ref = structural_similarity(a, b, data_range=data_range)
        assert abs(float(ours[i]) - (1.0 - ref)) <= 1e-5


def test_ssim_is_not_skimage_with_first_map_range_only() -> None:
    """The data range spans both maps: a pair where it matters must differ from the one-map convention."""
    p = unit_mass(torch.rand(1, 16, 16))
    q = unit_mass(torch.rand(1, 16, 16) ** 8)  # far larger range than p
    a, b = p[0].double().numpy(), q[0].double().numpy()
    one_map = 1.0 - structural_similarity(a, b, data_range=a.max() - a.min())
    both = 1.0 - structural_similarity(a, b, data_range=max(a.max(), b.max()) - min(a.min(), b.min()))
    assert abs(one_map - both) > 1e-3
    assert float(ssim_distance(p, q)[0]) == pytest.approx(both, abs=1e-6)


def test_jensen_shannon_hand_computed_and_scipy() -> None:
    p = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    q = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    ours = jensen_shannon(p, q)
    # Second pair: m = (0.75, 0.25); KL(P‖m) = ½ln(2/3) + ½ln2, KL(Q‖m) = ln(4/3).
    expected = 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2) + math.log(4 / 3))
    assert ours.tolist() == pytest.approx([math.log(2), expected], abs=1e-6)
    a, b = _relu_maps(5), _relu_maps(5)
    ref = [jensenshannon(x.flatten().double().numpy(), y.flatten().double().numpy()) ** 2 for x, y in zip(a, b)]
    assert jensen_shannon(a, b).tolist() == pytest.approx(ref, abs=1e-6)


def test_total_variation_and_cosine_hand_computed() -> None:
    p = torch.tensor([[[3.0, 1.0]], [[1.0, 0.0]]])  # unit mass taken inside: (0.75, 0.25), (1, 0)
    q = torch.tensor([[[1.0, 1.0]], [[1.0, 1.0]]])
    assert total_variation(p, q).tolist() == pytest.approx([0.25, 0.5], abs=1e-7)
    cos0 = (0.75 * 0.5 + 0.25 * 0.5) / (math.hypot(0.75, 0.25) * math.hypot(0.5, 0.5))
    assert cosine_distance(p, q).tolist() == pytest.approx([1 - cos0, 1 - 1 / math.sqrt(2)], abs=1e-6)


def test_center_of_mass_shift_hand_computed() -> None:
    p = torch.zeros(1, 3, 4)
    p[0, 0, 0] = p[0, 2, 3] = 1.0  # centre of mass (row 1, col 1.5)
    q = torch.zeros(1, 3, 4)
    q[0, 2, 0] = 5.0  # (2, 0): the scale does not matter
    assert float(center_of_mass_shift(p, q)[0]) == pytest.approx(math.hypot(1.0, 1.5), abs=1e-6)


def test_topk_iou_hand_computed_with_raster_tie_break() -> None:
    # 4×5 = 20 cells, fraction 0.1 → k = 2.
    p = torch.zeros(1, 4, 5)
    p[0, 1, 2] = 1.0  # raster 7; the second slot goes to the first zero, raster 0
    q = torch.zeros(1, 4, 5)
    q[0, 0, 1] = q[0, 1, 2] = 1.0  # tie broken by raster index: {1, 7}
    # top sets {0, 7} and {1, 7}: IoU = 1/3.
    assert float(topk_iou_distance(p, q, fraction=0.1)[0]) == pytest.approx(2 / 3, abs=1e-7)
    # Default fraction on 16×16: k = 13; disjoint top sets give distance 1.
    a = torch.zeros(1, 16, 16)
    a[0, :1, :13] = 1.0
    b = torch.zeros(1, 16, 16)
    b[0, 15:, 3:] = 1.0
    assert float(topk_iou_distance(a, b)[0]) == 1.0


def test_identical_maps_give_zero_for_every_statistic() -> None:
    p = drift_maps(torch.randn(6, 7, 7).clamp_min(0) + torch.eye(7))
    stats = drift_statistics(p, p.clone())
    assert set(stats) == set(STATISTICS) | {"valid"}
    assert bool(stats["valid"].all())
    for name in STATISTICS:
        assert stats[name].abs().max().item() <= 1e-6, name


def test_distances_are_positive_for_different_maps_and_batch_independent() -> None:
    p, q = _relu_maps(6), _relu_maps(6)
    stats = drift_statistics(p, q)
    single = drift_statistics(p[2:3], q[2:3])
    for name in STATISTICS:
        assert bool((stats[name] > 0).all()), name
        assert float(single[name][0]) == pytest.approx(float(stats[name][2]), abs=1e-6), name


def test_degenerate_and_constant_maps_never_give_nan() -> None:
    live = _relu_maps(1)[0]
    zero = torch.zeros(16, 16)
    const = torch.full((16, 16), 3.0)
    nan = torch.full((16, 16), float("nan"))
    p = torch.stack([zero, zero, live, const, const, nan])
    q = torch.stack([zero, live, zero, const, live, live])
    stats = drift_statistics(p, q)
    assert stats["valid"].tolist() == [False, False, False, True, True, False]
    for name in STATISTICS:
        values = stats[name]
        assert bool(torch.isfinite(values).all()), name
        assert values[~stats["valid"]].tolist() == [0.0, 0.0, 0.0, 0.0], name
        assert float(values[3]) == pytest.approx(0.0, abs=1e-6), name  # two equal constant maps
    assert float(stats["spearman"][4]) == 1.0  # a constant map carries no rank order: ρ = 0
    assert drift_maps(torch.stack([zero, nan, live])).flatten(1).sum(1).tolist() == pytest.approx([0, 0, 1])
    spiked = live.clone()
    spiked[3, 4] = float("inf")  # one non-finite cell makes the whole map degenerate, not its finite rest
    assert drift_maps(torch.stack([spiked, live])).flatten(1).sum(1).tolist() == pytest.approx([0, 1])


def test_drift_maps_pool_and_normalise() -> None:
    raw = torch.rand(3, 32, 32)
    out = drift_maps(raw)
    assert out.shape == (3, 16, 16)
    manual = torch.nn.functional.avg_pool2d(raw.unsqueeze(1), 2).squeeze(1)
    assert torch.allclose(out, manual / manual.sum(dim=(1, 2), keepdim=True), atol=1e-7)
    small = drift_maps(torch.rand(2, 7, 7))
    assert small.shape == (2, 16, 16)
    assert small.sum(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        drift_statistics(torch.rand(2, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match="`p`"):
        spearman_distance([[0.0]], torch.rand(1, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 7"):
        ssim_distance(torch.rand(1, 5, 5), torch.rand(1, 5, 5))
    with pytest.raises(ValueError, match="fraction"):
        topk_iou_distance(torch.rand(1, 4, 4), torch.rand(1, 4, 4), fraction=0.0)
    with pytest.raises(ValueError, match="shape"):
        drift_maps(torch.rand(16, 16))
    with pytest.raises(ValueError, match="finite"):
        summarize(torch.tensor([0.1, float("nan")]))


def test_valid_pairs_mask() -> None:
    p = torch.stack([torch.ones(4, 4), torch.zeros(4, 4), torch.ones(4, 4)])
    q = torch.stack([torch.ones(4, 4), torch.ones(4, 4), -torch.ones(4, 4)])
    assert valid_pairs(p, q).tolist() == [True, False, False]


def test_noise_floor_units_and_summary() -> None:
    d = torch.tensor([0.4, 0.1, 0.3, 0.2, 9.0])
    valid = torch.tensor([True, True, True, True, False])
    assert noise_floor(d, valid) == pytest.approx(0.25)
    assert noise_floor(torch.zeros(8)) == 1e-6
    assert noise_floor(d, torch.zeros(5, dtype=torch.bool)) == 1e-6
    assert in_floor_units(torch.tensor([0.5, 0.25]), 0.25).tolist() == [2.0, 1.0]
    assert in_floor_units(torch.tensor([2e-6]), 0.0).tolist() == pytest.approx([2.0])
    with pytest.raises(ValueError, match="floor"):
        in_floor_units(d, float("nan"))

    import numpy as np

    values = torch.rand(31)
    summary = summarize(values)
    assert summary["median"] == pytest.approx(float(np.median(values.double().numpy())))
    assert summary["p90"] == pytest.approx(float(np.quantile(values.double().numpy(), 0.9)))
    assert summary["n_valid"] == 31.0
    assert summarize(d, valid) == pytest.approx({"median": 0.25, "p90": 0.37, "n_valid": 4.0})
    assert summarize(d, torch.zeros(5, dtype=torch.bool)) == {"median": 0.0, "p90": 0.0, "n_valid": 0.0}


def test_ssim_of_constant_maps_from_a_one_cell_layer_is_zero_not_infinite() -> None:
    # 1×1 CAMs (ResNet layer4 at 32×32) become constant 16×16 drift maps equal up to one rounding unit,
    # where E[x²] − E[x]² was pure noise against C2 ≈ 0 and SSIM came out infinite.
    torch.manual_seed(0)
    p, q = drift_maps(torch.rand(256, 1, 1) * 10), drift_maps(torch.rand(256, 1, 1) * 10)
    assert torch.equal(ssim_distance(p, q), torch.zeros(256))
    # maps equal up to one float32 rounding unit of their values are the same constant map
    base = torch.full((8, 16, 16), 3.0)
    jitter = torch.randint(0, 2, base.shape) * torch.finfo(torch.float32).eps * 6.0
    assert torch.equal(ssim_distance(base + jitter, base), torch.zeros(8))


def test_evaluation_drift_reports_medians_in_floor_units_and_skips_what_cannot_be_compared() -> None:
    gen = torch.Generator().manual_seed(7)
    before, now, again = (torch.rand(4, 8, 8, generator=gen) for _ in range(3))
    now[3] = 0.0  # a degenerate map: left out of every median
    previous, first = drift_maps(before), drift_maps(torch.rand(4, 8, 8, generator=gen))
    rows = torch.tensor([True, True, False, True])
    result = evaluation_drift(now, previous, first, (again, rows), torch.tensor([10, 11, 12, 13]))

    current = drift_maps(now)
    assert torch.equal(result.maps, current)
    floor_stats = drift_statistics(current[:2], drift_maps(again)[:2])  # row 3's pair is degenerate
    floor = noise_floor(floor_stats["spearman"])
    d = spearman_distance(previous[:3], current[:3])
    assert result.scalars["noise_floor"] == pytest.approx(floor)
    assert result.scalars["drift_spearman"] == pytest.approx(float(d.median()))  # 3 items: the middle one
    assert result.scalars["drift_floor_units"] == pytest.approx(float(d.median()) / floor)
    assert {"drift_js", "drift_spearman_first", "drift_js_first", "drift_floor_units_first"} < set(result.scalars)
    assert set(result.rows["floor"]["spearman"]) == {10, 11, 13}
    assert torch.equal(result.rows["previous"]["spearman"], spearman_distance(previous, current))

    # another probe (shape) is not compared; a deterministic explainer has no floor; all degenerate: no scalar
    assert evaluation_drift(now, previous[:2], None).scalars == {}
    assert evaluation_drift(torch.zeros(4, 8, 8), previous).scalars == {}
    assert "previous" in evaluation_drift(torch.zeros(4, 8, 8), previous).rows  # the rows still say "invalid"
