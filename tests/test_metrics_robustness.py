"""Max-sensitivity: equality with Captum's sensitivity_max, shared draws for stochastic explainers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_xcam.metrics import max_sensitivity


class CaptumGradCAM:
    """A differentiable explainer with the project's call convention, built on Captum's LayerGradCam."""

    def __init__(self, model: nn.Module) -> None:
        from captum.attr import LayerGradCam

        self.model = model
        self.cam = LayerGradCam(model, model.features)

    def __call__(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        return self.cam.attribute(x, target=targets, relu_attributions=True)[:, 0].detach()


def _deterministic_perturb(inputs: Tensor, radius: float) -> Tensor:
    row = torch.arange(inputs.shape[0], dtype=inputs.dtype).view(-1, 1, 1, 1)
    return inputs + radius * torch.sin(11.0 * inputs + 0.9 * row)


def test_max_sensitivity_equals_captum(digits, small_cnn) -> None:
    from captum.metrics import sensitivity_max

    explain = CaptumGradCAM(small_cnn)
    x = digits[0][:5]
    targets = torch.tensor([0, 3, 3, 7, 9])

    def for_captum(inputs, target):
        # Captum passes a tuple on its first call, iterates over the clean output as a tuple of
        # per-input tensors, and runs the explainer under no_grad.
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        with torch.enable_grad():
            return (explain(inputs, targets=target),)

    expected = sensitivity_max(for_captum, x, perturb_func=_deterministic_perturb, perturb_radius=0.05, n_perturb_samples=6, target=targets)
    ours = max_sensitivity(explain, x, targets, radius=0.05, n_samples=6, perturb_fn=_deterministic_perturb)
    assert torch.allclose(ours, expected.float(), rtol=1e-3, atol=0)
    assert int((ours > 0).sum()) >= 4  # (a random-weight Grad-CAM may be all zeros for one target)
    # Chunking by whole items calls the explainer on the same rows: same values.
    chunked = max_sensitivity(explain, x, targets, radius=0.05, n_samples=6, perturb_fn=_deterministic_perturb, max_batch=13)
    assert torch.allclose(chunked, ours, rtol=1e-5)


def test_targets_none_resolves_to_the_clean_argmax_once(digits, small_cnn) -> None:
    seen: list[Tensor] = []

    def explain(x: Tensor, targets: Tensor | None = None) -> Tensor:
        seen.append(targets)
        return x[:, 0].abs()

    x = digits[0][:3]
    max_sensitivity(explain, x, model=small_cnn, n_samples=4)
    with torch.no_grad():
        argmax = small_cnn(x).argmax(1)
    assert torch.equal(seen[0], argmax) and torch.equal(seen[1], argmax.repeat_interleave(4))
    # Without a model, None is passed through (Captum's behaviour).
    seen.clear()
    max_sensitivity(explain, x, n_samples=2)
    assert seen == [None, None]


def test_stochastic_explainers_reuse_each_items_draws() -> None:
    def stochastic(x: Tensor, targets: Tensor | None = None, sample_ids: Tensor | None = None) -> Tensor:
        noise = torch.stack([torch.rand(4, 4, generator=torch.Generator().manual_seed(int(i))) for i in sample_ids])
        return x[:, 0].abs() + noise

    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(max_sensitivity(stochastic, x, radius=0.0, n_samples=5), torch.zeros(3))
    assert float(max_sensitivity(stochastic, x, radius=0.1, n_samples=5).min()) > 0


def test_default_noise_is_uniform_in_radius_and_independent_of_global_rng() -> None:
    captured: list[Tensor] = []

    def explain(x: Tensor, targets: Tensor | None = None) -> Tensor:
        captured.append(x)
        return x.sum(1) + 1

    x = torch.randn(4, 2, 5, 5)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = max_sensitivity(explain, x, radius=0.3, n_samples=8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    delta = captured[1] - x.repeat_interleave(8, 0)
    assert float(delta.abs().max()) <= 0.3 and float(delta.abs().max()) > 0.25
    alone = max_sensitivity(explain, x[2:3], radius=0.3, n_samples=8, seed=1, sample_ids=torch.tensor([2]))
    assert torch.allclose(alone, first[2:3])


def test_zero_explanation_uses_captums_unit_denominator() -> None:
    def explain(x: Tensor, targets: Tensor | None = None) -> Tensor:
        return (x[:, 0] - 1).clamp_min(0)  # zero on the clean image, positive after a push

    x = torch.full((2, 1, 3, 3), 1.0)
    push = lambda inputs, radius: inputs + radius  # noqa: E731
    values, valid = max_sensitivity(explain, x, radius=0.5, n_samples=2, perturb_fn=push, return_valid=True)
    assert torch.allclose(values, torch.full((2,), 0.5 * 3)) and not bool(valid.any())


def test_bad_arguments() -> None:
    explain = lambda x, targets=None: x[:, 0]  # noqa: E731
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(TypeError, match="explainer"):
        max_sensitivity("gradcam", x)
    with pytest.raises(ValueError, match="n_samples"):
        max_sensitivity(explain, x, n_samples=0)
    with pytest.raises(ValueError, match="radius"):
        max_sensitivity(explain, x, radius=-1.0)
    with pytest.raises(ValueError, match="one map per image"):
        max_sensitivity(lambda x, targets=None: x[:1, 0], x)
    with pytest.raises(ValueError, match="perturb_fn"):
        max_sensitivity(explain, x, perturb_fn=lambda v, r: v[:1])
    # a user's NaN is named as theirs, not reported as an internal error
    with pytest.raises(ValueError, match="`perturb_fn` returned perturbed inputs with NaN"):
        max_sensitivity(explain, x, perturb_fn=lambda v, r: v * float("nan"))
    with pytest.raises(ValueError, match="the explainer returned maps with NaN"):
        max_sensitivity(lambda x, targets=None: x[:, 0] * float("nan"), x)
