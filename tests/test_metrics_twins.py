"""torchmetrics twins: same numbers as the functions when fed in several batches; degenerate items counted."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_xcam import metrics as M


def _feed(metric: M.ExplanationMetric, batches: list[tuple], **kwargs) -> Tensor:
    for args in batches:
        metric.update(*args, **kwargs)
    return metric.compute()


def _split(*tensors: Tensor, sizes=(3, 1, 4)) -> list[tuple[Tensor, ...]]:
    return list(zip(*(t.split(list(sizes)) for t in tensors)))


def test_model_metric_twins_match_the_functions(digits, small_cnn) -> None:
    x, maps = digits[0][:8], torch.rand(8, 8, 8)
    maps[2] = 0  # a degenerate map: left out of the mean and counted
    ids = torch.arange(8)
    cases = [
        (M.InsertionAUC, M.insertion_auc, {"steps": 4}),
        (M.DeletionAUC, M.deletion_auc, {"steps": 4, "substrate": "mean"}),
        (M.AverageDrop, M.average_drop, {}),
        (M.IncreaseInConfidence, M.increase_in_confidence, {}),
    ]
    for twin, function, options in cases:
        values, valid = function(small_cnn, x, maps, return_valid=True, **options)
        metric = twin(**options)
        result = _feed(metric, [(small_cnn, *b) for b in _split(x, maps)])
        assert torch.allclose(result, values[valid].mean(), rtol=1e-4, atol=1e-6), twin.__name__
        assert (metric.num_valid, metric.num_degenerate) == (7, 1)
    values = M.infidelity(small_cnn, x, maps, n_perturb=4, sample_ids=ids)
    metric = M.Infidelity(n_perturb=4)
    for xb, mb, ib in _split(x, maps, ids):
        metric.update(small_cnn, xb, mb, sample_ids=ib)
    assert torch.allclose(metric.compute(), values[torch.arange(8) != 2].mean(), rtol=1e-5)
    with pytest.raises(TypeError, match="one twin per method"):
        metric.update(small_cnn, x, [maps, maps], sample_ids=ids)


def test_explainer_twin_and_keyword_overrides() -> None:
    explain = lambda x, targets=None: x[:, 0].abs()  # noqa: E731
    x = torch.randn(8, 1, 4, 4)
    values = M.max_sensitivity(explain, x, radius=0.1, n_samples=3, sample_ids=torch.arange(8))
    metric = M.MaxSensitivity(radius=0.1, n_samples=3)
    for (xb, ib) in _split(x, torch.arange(8)):
        metric.update(explain, xb, sample_ids=ib)
    assert torch.allclose(metric.compute(), values.mean(), rtol=1e-5)
    # Per-call keywords override the constructor's defaults.
    metric = M.MaxSensitivity(radius=0.1, n_samples=3)
    metric.update(explain, x, radius=0.0)
    assert metric.compute().item() == 0.0


def test_map_metric_twins_and_per_class_aggregate() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(8, 6, 6, generator=generator)
    masks = torch.rand(8, 12, 12, generator=generator) > 0.7
    masks[5] = False  # an empty mask
    maps[1] = 0
    for twin, function in (
        (M.EnergyPointingGame, M.energy_pointing_game),
        (M.RelevanceMass, M.relevance_mass),
        (M.RelevanceRank, M.relevance_rank),
        (M.PointingGame, M.pointing_game),
    ):
        values, valid = function(maps, masks, return_valid=True)
        metric = twin()
        assert torch.allclose(_feed(metric, _split(maps, masks)), values[valid].mean(), rtol=1e-5)
        assert metric.num_degenerate == 2
    for twin, function in ((M.Sparseness, M.sparseness), (M.Entropy, M.entropy)):
        values, valid = function(maps, return_valid=True)
        assert torch.allclose(_feed(twin(), _split(maps)), values[valid].mean(), rtol=1e-5)
    # TorchRay's aggregate: accuracy per class, then the mean over classes.
    maps = torch.zeros(4, 20, 20)
    maps[:, 2, 2] = 1
    masks = torch.zeros(4, 20, 20, dtype=torch.bool)
    masks[[0, 1, 2], 3, 3] = True
    masks[3, 19, 19] = True
    classes = torch.tensor([0, 0, 0, 1])
    metric = M.PointingGame(num_classes=3)
    metric.update(maps[:2], masks[:2], classes=classes[:2])
    metric.update(maps[2:], masks[2:], classes=classes[2:])
    assert metric.compute().item() == pytest.approx(0.5)  # class 0: 3/3, class 1: 0/1, class 2 unseen


def test_twin_contract() -> None:
    metric = M.Sparseness()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute().item() == 0.0  # nothing valid seen: 0, never NaN
    metric.update(torch.zeros(2, 3, 3))  # degenerate only: the placeholder says it is not a score
    with pytest.warns(UserWarning, match=r"no valid item to average \(2 left out"):
        assert metric.compute().item() == 0.0
    metric.reset()
    assert M.InsertionAUC.higher_is_better and not M.DeletionAUC.higher_is_better
    assert not M.Infidelity.is_differentiable and M.Entropy.full_state_update is False
    from torchmetrics.utilities.data import dim_zero_sum

    assert all(metric._reductions[name] is dim_zero_sum for name in ("total", "count", "degenerate"))
    metric.update(torch.rand(2, 3, 3))
    metric.reset()
    assert metric.num_valid == 0
    with pytest.raises(ValueError, match="classes"):
        M.PointingGame(num_classes=2).update(torch.rand(1, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`classes` must be a LongTensor"):  # 1.7 is not silently class 1
        M.PointingGame(num_classes=2).update(torch.rand(1, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool),
                                             classes=torch.tensor([1.7]))
    with pytest.raises(ValueError, match="num_classes"):
        M.Sparseness(num_classes=0)
    with pytest.raises(ValueError):
        M.Sparseness(not_an_option=1)
