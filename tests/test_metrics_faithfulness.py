"""Faithfulness metrics: RISE transcription, hand-computed AUCs, Captum's infidelity, substrates."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xcam.demos import SmallCNN
from lightning_xcam.metrics import (
    average_drop,
    deletion_auc,
    increase_in_confidence,
    infidelity,
    insertion_auc,
    make_substrate,
    target_probabilities,
)
from lightning_xcam.maps import upsample
from lightning_xcam.metrics._perturb import blur_kernel


def _sharp(model: nn.Module, scale: float = 30.0) -> nn.Module:
    """Scale the last layer so that random weights give confident, input-sensitive softmax outputs."""
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(scale)
    return model


class PixelSum(nn.Module):
    """Two logits: ``[Σ w·x, 0]``, so p_0 = sigmoid(Σ w·x) is computable by hand."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.weights = nn.Parameter(weights)

    def forward(self, x: Tensor) -> Tensor:
        first = (x.flatten(1) * self.weights.flatten()).sum(dim=1)
        return torch.stack([first, torch.zeros_like(first)], dim=1)


# --- an independent, per-image transcription of RISE's CausalMetric (evaluation.py) -------------------


def _rise_blur(img: Tensor) -> Tensor:
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kernel = torch.tensor(gaussian_filter(delta, 5), dtype=img.dtype)
    channels = img.shape[1]
    weight = torch.zeros(channels, channels, 11, 11, dtype=img.dtype)
    for c in range(channels):
        weight[c, c] = kernel
    return F.conv2d(img, weight, padding=5)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Single-image forwards on one thread: OpenMP spin-waits make them ~100× slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rise_curve(
    model: nn.Module, img: Tensor, explanation: np.ndarray, mode: str, step: int, substrate, stable: bool = False
) -> np.ndarray:
    _, channels, height, width = img.shape
    pixels = height * width
    with torch.no_grad(), _one_thread():
        c = int(model(img).argmax(1))
        n_steps = (pixels + step - 1) // step
        if mode == "del":
            start, finish = img.clone(), substrate(img)
        else:
            start, finish = substrate(img), img.clone()
        scores = np.empty(n_steps + 1)
        if stable:  # the documented tie-break: equal values in raster order
            salient_order = np.argsort(-explanation.reshape(-1, pixels), axis=1, kind="stable")
        else:  # RISE's own ordering (ties in reverse raster order)
            salient_order = np.flip(np.argsort(explanation.reshape(-1, pixels), axis=1), axis=-1)
        for i in range(n_steps + 1):
            scores[i] = float(torch.softmax(model(start), dim=1)[0, c])
            if i < n_steps:
                coords = torch.as_tensor(salient_order[:, step * i : step * (i + 1)].copy())[0]
                flat = start.view(1, channels, pixels)
                flat[0, :, coords] = finish.reshape(1, channels, pixels)[0, :, coords]
    return scores


def _rise_auc(scores: np.ndarray) -> float:
    return float((scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.shape[0] - 1))


def _trapezoid_over_fractions(scores: np.ndarray, step: int, pixels: int) -> float:
    fractions = np.minimum(np.arange(len(scores)) * step, pixels) / pixels
    return float(((scores[1:] + scores[:-1]) * np.diff(fractions)).sum() / 2)


# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def sharp_cnn() -> nn.Module:
    torch.manual_seed(0)
    return _sharp(SmallCNN(in_channels=1, num_classes=10).eval())


@pytest.mark.parametrize("substrate", ["blur", "zero"])
@pytest.mark.parametrize("layer_resolution", [True, False])
def test_insertion_deletion_equal_rise_transcription(digits, sharp_cnn, substrate, layer_resolution) -> None:
    x = digits[0][:4]
    maps = torch.rand(4, 8, 8) if layer_resolution else torch.rand(4, 32, 32)
    up = F.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    # Bilinear upsampling repeats border values (ties): there the reference takes ties in raster order.
    has_ties = not all(len(torch.unique(m)) == m.numel() for m in up)
    assert has_ties is layer_resolution
    reference_substrate = _rise_blur if substrate == "blur" else torch.zeros_like
    steps, step = 16, 64  # 64 divides 1024: RISE's AUC rule applies as is
    for fn, mode in ((insertion_auc, "ins"), (deletion_auc, "del")):
        ours = fn(sharp_cnn, x, maps, steps=steps, substrate=substrate, max_batch=13)
        expected = torch.tensor(
            [_rise_auc(_rise_curve(sharp_cnn, x[b : b + 1], up[b].numpy(), mode, step, reference_substrate, has_ties))
             for b in range(4)]
        )
        assert torch.allclose(ours, expected.float(), rtol=1e-4, atol=0), (mode, ours, expected)
        assert float((expected.max() - expected.min())) > 1e-3, "the model must react to the perturbation"


def test_auc_with_a_step_that_does_not_divide_uses_actual_fractions(digits, sharp_cnn) -> None:
    x, maps = digits[0][4:7], torch.rand(3, 32, 32)
    step = math.ceil(1024 / 20)  # 52: the last interval covers 36 pixels
    ours = deletion_auc(sharp_cnn, x, maps, steps=20, substrate="zero")
    expected = [
        _trapezoid_over_fractions(_rise_curve(sharp_cnn, x[b : b + 1], maps[b].numpy(), "del", step, torch.zeros_like), step, 1024)
        for b in range(3)
    ]
    assert torch.allclose(ours, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=0)


def test_rgb_pixels_change_all_channels() -> None:
    torch.manual_seed(1)
    model = _sharp(SmallCNN(in_channels=3, num_classes=5).eval())
    x, maps = torch.randn(2, 3, 16, 16), torch.rand(2, 16, 16)
    ours = insertion_auc(model, x, maps, steps=16, substrate="blur")
    expected = [_rise_auc(_rise_curve(model, x[b : b + 1], maps[b].numpy(), "ins", 16, _rise_blur)) for b in range(2)]
    assert torch.allclose(ours, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=0)


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_hand_computed_auc_and_raster_tie_break() -> None:
    model = PixelSum(torch.full((2, 2), 0.5))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    trapezoid = lambda s: sum((a + b) / 2 * 0.25 for a, b in zip(s[:-1], s[1:]))  # noqa: E731
    # Ranking (0,1), (1,0), (1,1), (0,0): the kept pixel sums are 10, 8, 5, 1, 0 (times w = 0.5).
    maps = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])
    expected = trapezoid([_sigmoid(0.5 * s) for s in (10, 8, 5, 1, 0)])
    assert deletion_auc(model, x, maps, targets=0, steps=4).item() == pytest.approx(expected, rel=1e-6)
    # Insertion from zeros in the same order: inserted sums 0, 2, 5, 9, 10.
    expected = trapezoid([_sigmoid(0.5 * s) for s in (0, 2, 5, 9, 10)])
    assert insertion_auc(model, x, maps, targets=0, steps=4, substrate="zero").item() == pytest.approx(expected, rel=1e-6)
    # All-equal (and all-zero) maps delete in raster order: 10, 9, 7, 4, 0; the zero map is flagged.
    expected = trapezoid([_sigmoid(0.5 * s) for s in (10, 9, 7, 4, 0)])
    for constant, is_valid in ((torch.ones(1, 2, 2), True), (torch.zeros(1, 2, 2), False)):
        value, valid = deletion_auc(model, x, constant, targets=0, steps=4, return_valid=True)
        assert value.item() == pytest.approx(expected, rel=1e-6)
        assert bool(valid) is is_valid
    # Ties among the zeros of a ReLU'd map: the top pixel first, then the others in raster order.
    relu_map = torch.tensor([[[0.0, 0.0], [0.0, 5.0]]])
    expected = trapezoid([_sigmoid(0.5 * s) for s in (10, 6, 5, 3, 0)])
    assert deletion_auc(model, x, relu_map, targets=0, steps=4).item() == pytest.approx(expected, rel=1e-6)


def test_results_do_not_depend_on_chunking_and_model_state_is_restored(digits, sharp_cnn) -> None:
    x, maps = digits[0][:5], torch.rand(5, 8, 8)
    sharp_cnn.train()
    running = sharp_cnn.features[1].running_mean.clone()
    reference = insertion_auc(sharp_cnn, x, maps, max_batch=None)
    for max_batch in (4, 17):
        assert torch.allclose(insertion_auc(sharp_cnn, x, maps, max_batch=max_batch), reference, rtol=1e-5, atol=1e-7)
    assert sharp_cnn.training and torch.equal(sharp_cnn.features[1].running_mean, running)
    with torch.inference_mode():
        cached = x.clone()
    assert torch.allclose(insertion_auc(sharp_cnn, cached, maps, max_batch=None), reference)


def test_substrates() -> None:
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    assert np.abs(blur_kernel(dtype=torch.float64).numpy() - gaussian_filter(delta, 5)).max() < 1e-15
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(make_substrate(x, "blur"), _rise_blur(x), atol=1e-6)
    assert torch.equal(make_substrate(x, "zero"), torch.zeros_like(x))
    mean = make_substrate(x, "mean")
    assert torch.allclose(mean[1, 2], x[1, 2].mean().expand(9, 9))
    black = torch.tensor([-1.0, -2.0, -3.0]).view(3, 1, 1)
    assert torch.equal(make_substrate(x, black)[1, :, 4, 4], black.flatten())
    with pytest.raises(ValueError, match="substrate"):
        make_substrate(x, "gray")
    with pytest.raises(ValueError, match="broadcast"):
        make_substrate(x, torch.zeros(2, 1, 1))
    with pytest.raises(TypeError, match="substrate"):
        make_substrate(x, 0.0)


def test_target_probabilities(sharp_cnn) -> None:
    x = torch.randn(7, 1, 16, 16)
    targets = torch.arange(7) % 10
    with torch.no_grad():
        expected = sharp_cnn(x).softmax(1)[torch.arange(7), targets]
        logits = sharp_cnn(x)[torch.arange(7), targets]
    assert torch.allclose(target_probabilities(sharp_cnn, x, targets, 3), expected, atol=1e-6)
    assert torch.allclose(target_probabilities(sharp_cnn, x, targets, None, softmax=False), logits, atol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        target_probabilities(sharp_cnn, x, targets[:3], 3)
    with pytest.raises(ValueError, match="max_batch"):
        target_probabilities(sharp_cnn, x, targets, 0)


# --- infidelity vs Captum ----------------------------------------------------------------------------------


def _deterministic_perturb(inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Noise that depends on the values and the row, identical for any caller that sees the same rows."""
    row = torch.arange(inputs.shape[0], dtype=inputs.dtype).view(-1, 1, 1, 1)
    noise = 0.2 * torch.sin(13.0 * inputs + 0.7 * row + 0.1 * torch.arange(inputs[0].numel()).view(inputs.shape[1:]))
    return noise, inputs - noise


@pytest.mark.parametrize("normalize", [True, False])
def test_infidelity_equals_captum(digits, sharp_cnn, normalize) -> None:
    from captum.metrics import infidelity as captum_infidelity

    x, maps = digits[0][:6], torch.rand(6, 8, 8)
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    attributions = F.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False).expand_as(x)
    expected = captum_infidelity(
        sharp_cnn, _deterministic_perturb, x, attributions, target=targets, n_perturb_samples=7, normalize=normalize
    )
    ours = infidelity(sharp_cnn, x, maps, targets, n_perturb=7, perturb_fn=_deterministic_perturb, normalize=normalize, max_batch=None)
    assert torch.allclose(ours, expected.float(), rtol=1e-3, atol=0)
    assert float(expected.min()) > 0


def test_infidelity_default_noise_is_chunk_and_batch_independent(digits, sharp_cnn) -> None:
    x, maps = digits[0][:5], torch.rand(5, 8, 8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    whole = infidelity(sharp_cnn, x, maps, n_perturb=6, max_batch=None, seed=3)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be used"
    chunked = infidelity(sharp_cnn, x, maps, n_perturb=6, max_batch=13, seed=3)
    assert torch.allclose(whole, chunked, rtol=1e-5)
    alone = infidelity(sharp_cnn, x[3:4], maps[3:4], n_perturb=6, seed=3, sample_ids=torch.tensor([3]))
    assert torch.allclose(alone, whole[3:4], rtol=1e-5)
    assert not torch.allclose(infidelity(sharp_cnn, x, maps, n_perturb=6, seed=4), whole)


def test_infidelity_of_a_zero_map_is_the_mean_squared_output_change(digits, sharp_cnn) -> None:
    x = digits[0][:3]
    targets = torch.tensor([2, 2, 7])
    values, valid = infidelity(sharp_cnn, x, torch.zeros(3, 8, 8), targets, n_perturb=5, perturb_fn=_deterministic_perturb, return_valid=True)
    assert not bool(valid.any())
    with torch.no_grad():
        clean = sharp_cnn(x)[torch.arange(3), targets]
        _, perturbed = _deterministic_perturb(x.repeat_interleave(5, 0))
        change = clean.repeat_interleave(5) - sharp_cnn(perturbed)[torch.arange(15), targets.repeat_interleave(5)]
    assert torch.allclose(values, (change**2).view(3, 5).mean(1), rtol=1e-4)


def test_infidelity_of_several_maps_shares_the_perturbations_and_equals_each_alone(digits, sharp_cnn) -> None:
    x, targets = digits[0][:4], torch.tensor([1, 2, 3, 4])
    layer_maps, input_maps, zero = torch.rand(4, 8, 8), torch.rand(4, 1, 32, 32), torch.zeros(4, 8, 8)
    calls = []
    counter = sharp_cnn.register_forward_pre_hook(lambda _module, inputs: calls.append(inputs[0].shape[0]))
    both = infidelity(sharp_cnn, x, [layer_maps, input_maps, zero], targets, n_perturb=6, seed=2, return_valid=True)
    counter.remove()
    assert sum(calls) == 4 + 4 * 6  # one clean pass and one perturbation set for all three maps
    for maps, (values, valid) in zip((layer_maps, input_maps, zero), both):
        alone, alone_valid = infidelity(sharp_cnn, x, maps, targets, n_perturb=6, seed=2, return_valid=True)
        assert torch.equal(values, alone) and torch.equal(valid, alone_valid)


def test_infidelity_rejects_an_empty_list_and_names_the_bad_map(digits, sharp_cnn) -> None:
    x = digits[0][:2]
    with pytest.raises(ValueError, match="non-empty list"):
        infidelity(sharp_cnn, x, [])
    with pytest.raises(ValueError, match=r"maps\[1\]"):
        infidelity(sharp_cnn, x, [torch.rand(2, 8, 8), torch.rand(3, 8, 8)])


# --- average drop / increase -------------------------------------------------------------------------------


def test_average_drop_and_increase_by_hand() -> None:
    model = PixelSum(torch.ones(2, 2))
    x = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]])
    maps = torch.tensor([[[0.0, 2.0], [2.0, 1.0]], [[3.0, 3.0], [1.0, 2.0]]])
    # Min-max normalised maps [[0, 1], [1, .5]] and [[1, 1], [0, .5]]: E ⊙ x sums to 2.5 and -2.5.
    y = torch.tensor([_sigmoid(4.0), _sigmoid(-4.0)])
    o = torch.tensor([_sigmoid(2.5), _sigmoid(-2.5)])
    drop = average_drop(model, x, maps, targets=0)
    assert torch.allclose(drop, (y - o).clamp_min(0) / (y + 1e-7), rtol=1e-6)
    assert torch.equal(increase_in_confidence(model, x, maps, targets=0), torch.tensor([0.0, 1.0]))
    _, valid = average_drop(model, x, torch.zeros(2, 2, 2), targets=0, return_valid=True)
    assert not bool(valid.any())


def test_bad_arguments_raise_clear_errors(sharp_cnn) -> None:
    x, maps = torch.randn(2, 1, 16, 16), torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="batch size 3"):
        deletion_auc(sharp_cnn, x, torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="negative"):
        insertion_auc(sharp_cnn, x, maps - 0.5)
    with pytest.raises(ValueError, match="shape"):
        insertion_auc(sharp_cnn, x[0], maps)
    with pytest.raises(ValueError, match="steps"):
        insertion_auc(sharp_cnn, x, maps, steps=0)
    with pytest.raises(TypeError, match="steps"):
        insertion_auc(sharp_cnn, x, maps, steps=2.5)
    with pytest.raises(ValueError, match="targets"):
        deletion_auc(sharp_cnn, x, maps, targets=10)
    with pytest.raises(ValueError, match="perturb_fn"):
        infidelity(sharp_cnn, x, maps, perturb_fn=lambda v: (v[:1], v))
    with pytest.raises(TypeError, match="pair"):
        infidelity(sharp_cnn, x, maps, perturb_fn=lambda v: v)
    # Signed maps are fine for infidelity.
    assert torch.isfinite(infidelity(sharp_cnn, x, maps - 0.5, n_perturb=3)).all()
    # A perturb_fn computing in float64 is brought back to the images' dtype (same values as in float32).
    in_double = lambda v: tuple(t.double() for t in _deterministic_perturb(v))  # noqa: E731
    torch.testing.assert_close(infidelity(sharp_cnn, x, maps, n_perturb=3, perturb_fn=in_double),
                               infidelity(sharp_cnn, x, maps, n_perturb=3, perturb_fn=_deterministic_perturb))


def test_constant_maps_upsample_exactly_and_mask_nothing() -> None:
    # a 1×1 CAM (ResNet layer4 on 32×32) and a constant 7×7 map: bilinear rounding noise (~1e-7) must not
    # become a min-max mask of 0, 0.5 and 1
    assert bool((upsample(torch.full((2, 1, 1), 0.3), (32, 32)) == 0.3).all())
    assert bool((upsample(torch.full((2, 7, 7), 0.1), (32, 32)) == 0.1).all())
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    x = torch.randn(2, 3, 32, 32)
    drop = average_drop(model, x, torch.full((2, 1, 1), 0.3), targets=1)
    blank = model(torch.zeros(1, 3, 32, 32)).softmax(1)[0, 1]
    before = model(x).softmax(1)[:, 1]
    torch.testing.assert_close(drop, ((before - blank).clamp_min(0) / (before + 1e-7)).detach())


def test_non_finite_user_inputs_are_named_not_reported_as_internal_errors(digits, sharp_cnn) -> None:
    x, maps = digits[0][:2], torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="`substrate` holds NaN"):
        deletion_auc(sharp_cnn, x, maps, substrate=torch.full((1, 1, 1), float("nan")))
    with pytest.raises(ValueError, match="`perturb_fn` returned perturbations with NaN"):
        infidelity(sharp_cnn, x, maps, perturb_fn=lambda v: (v * float("nan"), v))


def test_a_single_logit_model_is_refused_with_the_two_logit_wrapper() -> None:
    # softmax over one score is 1 whatever the image: every curve would be flat and read as a result
    model = SmallCNN(in_channels=1, num_classes=1).eval()
    x, maps = torch.randn(2, 1, 16, 16), torch.rand(2, 4, 4)
    for metric in (insertion_auc, deletion_auc):
        with pytest.raises(ValueError, match=r"returns 1 score per image.*torch.cat\(\[-z / 2, z / 2\], dim=1\)"):
            metric(model, x, maps, 0)


def test_a_diverged_model_is_refused_by_name_not_as_an_internal_error() -> None:
    x, maps = torch.randn(2, 1, 8, 8), torch.rand(2, 8, 8)
    broken = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        broken[1].bias[1] = float("inf")
    for metric in (deletion_auc, insertion_auc, average_drop, infidelity):
        with pytest.raises(ValueError, match="non-finite logits for 2 of 2 images"):
            metric(broken, x, maps)
