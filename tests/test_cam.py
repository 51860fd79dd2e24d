"""The CAM engine: Grad-CAM, Integrated Grad-CAM and Expected Grad-CAM against peers and identities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import Tensor, nn

from lightning_xcam import ExpectedGradCAM, GradCAM, IntegratedGradCAM


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _layer_output_and_grad(model: nn.Module, layer: nn.Module, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Plain autograd oracle: layer output A, ∂y_c/∂A and logits on ``x`` (independent of the engine)."""
    store: dict[str, Tensor] = {}

    def hook(_m: nn.Module, _i: object, out: Tensor) -> None:
        out.retain_grad()
        store["A"] = out

    handle = layer.register_forward_hook(hook)
    try:
        x = x.clone().requires_grad_(True)
        logits = model(x)
        grad = torch.autograd.grad(logits.gather(1, c[:, None]).sum(), store["A"])[0]
    finally:
        handle.remove()
    return store["A"].detach(), grad, logits.detach()


@pytest.fixture
def images() -> Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# --- Grad-CAM -------------------------------------------------------------------------------------------


def test_gradcam_equals_captum_layergradcam_with_per_sample_targets(resnet18: nn.Module, images: Tensor) -> None:
    targets = torch.tensor([0, 3, 7, 9])
    ours = GradCAM(resnet18, "layer4")(images, targets)
    captum = LayerGradCam(resnet18, resnet18.layer4).attribute(images, target=targets, relu_attributions=True)[:, 0]
    assert ours.dtype == torch.float32 and ours.shape == (4, 2, 2)
    assert _rel_err(ours, captum.detach()) < 1e-4


def test_gradcam_upsampling_matches_captum_interpolate(resnet18: nn.Module, images: Tensor) -> None:
    from captum.attr import LayerAttribution

    ours = GradCAM(resnet18, "layer3")(images, 5, output_size="input")
    raw = LayerGradCam(resnet18, resnet18.layer3).attribute(images, target=5, relu_attributions=True)
    captum = LayerAttribution.interpolate(raw.detach(), (64, 64), "bilinear")[:, 0]
    assert ours.shape == (4, 64, 64)
    assert _rel_err(ours, captum) < 1e-4


def test_default_target_is_the_argmax(resnet18: nn.Module, images: Tensor) -> None:
    argmax = resnet18(images).argmax(1)
    cam = GradCAM(resnet18, "layer4")
    assert torch.equal(cam(images), cam(images, argmax))
    assert torch.equal(cam.explain(images).targets, argmax)


# --- Expected Grad-CAM on a GAP + linear head (ResNet layer4) ----------------------------------------


@pytest.mark.parametrize("noise_std", [0.0, 0.5])
def test_gradient_weights_equal_gradcam_exactly_on_linear_head(resnet18: nn.Module, images: Tensor, noise_std: float) -> None:
    bank = torch.randn(7, 3, 64, 64)
    egc = ExpectedGradCAM(resnet18, "layer4", references=bank, n_samples=5, noise_std=noise_std, weights="gradient")
    with pytest.warns(UserWarning, match="equals Grad-CAM exactly"):
        maps = egc(images)
    assert _rel_err(maps, GradCAM(resnet18, "layer4")(images)) < 1e-5


def test_integrated_weights_with_one_reference_are_complete(resnet18: nn.Module, images: Tensor) -> None:
    reference = torch.randn(1, 3, 64, 64)
    egc = ExpectedGradCAM(resnet18, "layer4", references=reference, n_samples=3, noise_std=0.0)
    result = egc.explain(images)
    c = result.targets
    acts_x, grad_x, logits_x = _layer_output_and_grad(resnet18, resnet18.layer4, images, c)
    acts_r, _, logits_r = _layer_output_and_grad(resnet18, resnet18.layer4, reference.expand_as(images), c)
    g = grad_x.mean(dim=(2, 3))  # the same at every input: W_c / (h·w)
    expected = g * (acts_x - acts_r).mean(dim=(2, 3))
    assert _rel_err(result.weights[0], expected) < 1e-4
    h, w = acts_x.shape[-2:]
    completeness = result.weights[0].sum(dim=1) * h * w
    gap = logits_x.gather(1, c[:, None])[:, 0] - logits_r.gather(1, c[:, None])[:, 0]
    torch.testing.assert_close(completeness, gap, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(result.maps[0], GradCAM(resnet18, "layer4")(images))


def test_difference_form_sums_to_the_logit_gap_before_relu(resnet18: nn.Module, images: Tensor) -> None:
    reference = torch.randn(1, 3, 64, 64)
    egc = ExpectedGradCAM(resnet18, "layer4", references=reference, n_samples=2, noise_std=0.0, form="difference")
    c = resnet18(images).argmax(1)
    acts_x, grad_x, logits_x = _layer_output_and_grad(resnet18, resnet18.layer4, images, c)
    acts_r, _, logits_r = _layer_output_and_grad(resnet18, resnet18.layer4, reference.expand_as(images), c)
    pre_relu = torch.einsum("bd,bdhw->bhw", grad_x.mean(dim=(2, 3)), acts_x - acts_r)
    torch.testing.assert_close(egc(images), pre_relu.relu(), rtol=1e-4, atol=1e-6)
    gap = logits_x.gather(1, c[:, None])[:, 0] - logits_r.gather(1, c[:, None])[:, 0]
    torch.testing.assert_close(pre_relu.sum(dim=(1, 2)), gap, rtol=1e-4, atol=1e-5)


def test_references_equal_to_the_input_give_all_zero_maps(resnet18: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    egc = ExpectedGradCAM(resnet18, "layer3", references=x, n_samples=4, noise_std=0.0)
    result = egc.explain(x)
    assert torch.equal(result.weights, torch.zeros_like(result.weights))
    assert torch.equal(result.maps, torch.zeros_like(result.maps))
    gradient_only = ExpectedGradCAM(resnet18, "layer3", references=x, n_samples=4, noise_std=0.0, weights="gradient")
    assert _rel_err(gradient_only(x), GradCAM(resnet18, "layer3")(x)) < 1e-5


# --- Expected Grad-CAM where the head is not linear (ResNet layer3) --------------------------------------


@pytest.fixture
def shifted_resnet18(resnet18: nn.Module) -> nn.Module:
    """ResNet-18 with non-zero BatchNorm shifts. At initialisation its convs have no bias and BN shifts are
    zero, so the network is positively homogeneous and the gradient along a ray from 0 is constant; the
    shifts make the head after ``layer3`` non-linear along the path."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in resnet18.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.5)
    return resnet18


def _midpoint_integrated_weights(model: nn.Module, x: Tensor, c: Tensor, m: int) -> Tensor:
    """GAP((A(x) − A(0)) ⊙ (1/m) Σ_j G(β_j x)), β_j = (j − ½)/m, by plain autograd, one point at a time."""
    acts_x, _, _ = _layer_output_and_grad(model, model.layer3, x, c)
    acts_0, _, _ = _layer_output_and_grad(model, model.layer3, torch.zeros_like(x), c)
    mean_grad = sum(
        _layer_output_and_grad(model, model.layer3, (j - 0.5) / m * x, c)[1] for j in range(1, m + 1)
    ) / m
    return ((acts_x - acts_0) * mean_grad).mean(dim=(2, 3))


def test_midpoint_sampling_equals_the_midpoint_rule(shifted_resnet18: nn.Module) -> None:
    resnet18 = shifted_resnet18
    x = torch.randn(2, 3, 32, 32)
    c = resnet18(x).argmax(1)
    oracle = _midpoint_integrated_weights(resnet18, x, c, m=6)
    egc = ExpectedGradCAM(resnet18, "layer3", references=torch.zeros(1, 3, 32, 32), n_samples=6, noise_std=0.0,
                          sampling="midpoint")
    assert _rel_err(egc.explain(x).weights[0], oracle) < 1e-4


def test_random_beta_converges_to_integrated_weights_and_differs_from_gradcam(shifted_resnet18: nn.Module) -> None:
    resnet18 = shifted_resnet18
    x = torch.randn(1, 3, 32, 32)
    c = resnet18(x).argmax(1)
    oracle = _midpoint_integrated_weights(resnet18, x, c, m=32)
    zero_bank = torch.zeros(1, 3, 32, 32)

    def error(n: int, sampling: str) -> float:
        egc = ExpectedGradCAM(resnet18, "layer3", references=zero_bank, n_samples=n, noise_std=0.0, sampling=sampling)
        return float((egc.explain(x).weights[0] - oracle).norm() / oracle.norm())

    assert error(256, "iid") < error(8, "iid")
    assert error(256, "iid") < 0.05
    assert error(32, "stratified") < 0.02  # stratified β: the same quality from far fewer passes
    egc_map = ExpectedGradCAM(resnet18, "layer3", references=zero_bank, n_samples=32, noise_std=0.0)(x)
    assert _rel_err(egc_map, GradCAM(resnet18, "layer3")(x)) > 0.1


def test_one_sample_with_supplied_draws_matches_plain_autograd(shifted_resnet18: nn.Module) -> None:
    """N = 1, gradient weights: ReLU(Σ_k GAP(G_k(x_t)) A_k(x)) with x_t rebuilt from the engine's own draws."""
    resnet18 = shifted_resnet18
    x, bank = torch.randn(3, 3, 32, 32), torch.randn(4, 3, 32, 32)
    egc = ExpectedGradCAM(resnet18, "layer3", references=bank, n_samples=1, noise_std=0.3, weights="gradient")
    index, beta, noise = egc._draws(x, [0, 1, 2], 0)
    x_t = bank[index] + beta.view(-1, 1, 1, 1) * (x + noise - bank[index])
    c = resnet18(x).argmax(1)
    acts_x, _, _ = _layer_output_and_grad(resnet18, resnet18.layer3, x, c)
    _, grad_t, _ = _layer_output_and_grad(resnet18, resnet18.layer3, x_t, c)
    expected = torch.einsum("bd,bdhw->bhw", grad_t.mean(dim=(2, 3)), acts_x).relu()
    assert _rel_err(egc(x), expected) < 1e-4


# --- Integrated Grad-CAM ---------------------------------------------------------------------------------


def _official_igcam(model: nn.Module, layer: nn.Module, x: Tensor, x0: Tensor, c: Tensor, m: int) -> Tensor:
    """Direct transcription of the official recipe: all interpolants in one batch, one forward, one
    backward; per step ReLU(Σ_k A_k · GAP(G_k)); summed over steps (left grid j/m, j = 0..m−1)."""
    maps = []
    for b in range(x.shape[0]):
        alphas = torch.arange(m, dtype=x.dtype) / m
        batch = x0[b] + alphas.view(-1, 1, 1, 1) * (x[b] - x0[b])
        acts, grads, _ = _layer_output_and_grad(model, layer, batch, c[b].repeat(m))
        step_maps = F.relu((acts * grads.mean(dim=(2, 3), keepdim=True)).sum(dim=1))
        maps.append(step_maps.sum(dim=0))
    return torch.stack(maps)


def test_integrated_gradcam_code_mode_equals_official_recipe(small_cnn: nn.Module) -> None:
    x = torch.randn(3, 1, 16, 16)
    black = torch.full_like(x, -1.0)
    c = small_cnn(x).argmax(1)
    ours = IntegratedGradCAM(small_cnn, "features", steps=7, baseline=black)(x)
    assert _rel_err(ours, _official_igcam(small_cnn, small_cnn.features, x, black, c, 7)) < 1e-5


def test_integrated_gradcam_one_step_identities(small_cnn: nn.Module) -> None:
    x = torch.randn(2, 1, 16, 16)
    baseline = torch.randn(1, 1, 16, 16)
    c = small_cnn(x).argmax(1)
    code = IntegratedGradCAM(small_cnn, "features", steps=1, baseline=baseline)(x, c)
    assert _rel_err(code, GradCAM(small_cnn, "features")(baseline.expand_as(x), c)) < 1e-5
    # figure mode, m = 1, A(x0) = 0 (bias-free conv + ReLU at a zero baseline): Grad-CAM of x
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    figure = IntegratedGradCAM(net, "1", steps=1, mode="figure")(x)
    assert _rel_err(figure, GradCAM(net, "1")(x)) < 1e-5


def test_figure_mode_subtracts_baseline_activations(small_cnn: nn.Module) -> None:
    x, x0 = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    c = small_cnn(x).argmax(1)
    m = 3
    expected = torch.zeros(2, 4, 4)
    acts_0, _, _ = _layer_output_and_grad(small_cnn, small_cnn.features, x0, c)
    for j in range(1, m + 1):
        acts, grads, _ = _layer_output_and_grad(small_cnn, small_cnn.features, x0 + j / m * (x - x0), c)
        expected += ((acts - acts_0) * grads.mean(dim=(2, 3), keepdim=True)).sum(dim=1).relu()
    ours = IntegratedGradCAM(small_cnn, "features", steps=m, baseline=x0, mode="figure")(x)
    assert _rel_err(ours, expected) < 1e-5


# --- chunking, seeds, batch composition ------------------------------------------------------------------


BANK = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize(
    "make",
    [
        lambda m, bs: GradCAM(m, "features", batch_size=bs),
        lambda m, bs: IntegratedGradCAM(m, "features", steps=6, batch_size=bs),
        lambda m, bs: ExpectedGradCAM(m, "features", references=BANK, n_samples=6, noise_std=0.3, batch_size=bs),
    ],
    ids=["gradcam", "integrated", "expected"],
)
def test_results_do_not_depend_on_batch_size(small_cnn: nn.Module, make) -> None:
    x = torch.randn(3, 1, 16, 16)
    maps = [make(small_cnn, bs)(x) for bs in (None, 1, 5)]
    assert maps[0].abs().sum() > 0
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0], rtol=1e-6, atol=1e-7)


def test_seeds_and_batch_composition(small_cnn: nn.Module) -> None:
    x, bank = torch.randn(4, 1, 16, 16), torch.randn(6, 1, 16, 16)

    def egc(seed: int) -> ExpectedGradCAM:
        return ExpectedGradCAM(small_cnn, "features", references=bank, n_samples=4, seed=seed)

    assert torch.equal(egc(0)(x), egc(0)(x))
    assert not torch.allclose(egc(0)(x), egc(1)(x))
    assert not torch.allclose(egc(0)(x), egc(0)(x, stream=1))
    # an image keeps its draws whatever batch it is in, given its id
    full = egc(0)(x, sample_ids=torch.tensor([10, 11, 12, 13]))
    part = egc(0)(x[2:], sample_ids=torch.tensor([12, 13]))
    torch.testing.assert_close(part, full[2:], rtol=1e-6, atol=1e-7)


# --- models and inputs -----------------------------------------------------------------------------------


def test_one_channel_batch_of_one_frozen_and_inplace(small_cnn: nn.Module) -> None:
    for p in small_cnn.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 1, 16, 16)
    maps = ExpectedGradCAM(small_cnn, "features.8", references=torch.randn(2, 1, 16, 16), n_samples=3)(x)
    assert maps.shape == (1, 4, 4) and torch.isfinite(maps).all()
    assert GradCAM(small_cnn, "features.8")(x).abs().sum() > 0  # conv followed by an in-place ReLU
    assert all(not p.requires_grad and p.grad is None for p in small_cnn.parameters())


def test_lightning_module_is_explained_like_its_network(small_cnn: nn.Module) -> None:
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_cnn

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(GradCAM(Module(), "net.features")(x), GradCAM(small_cnn, "features")(x))


def test_works_under_no_grad_and_inference_mode(small_cnn: nn.Module) -> None:
    x = torch.randn(2, 1, 16, 16)
    expected = GradCAM(small_cnn, "features")(x)
    with torch.no_grad():
        torch.testing.assert_close(GradCAM(small_cnn, "features")(x), expected)
    with torch.inference_mode():
        cached = x.clone()  # an inference tensor, as cached from a validation step
        torch.testing.assert_close(GradCAM(small_cnn, "features")(cached).clone(), expected)


# --- bad input -------------------------------------------------------------------------------------------


class _Reshaped(nn.Module):
    """SmallCNN whose logits get an extra dimension (``[B, 1, K]``), or whose CAM layer runs under no_grad."""

    def __init__(self, net: nn.Module, frozen_under_no_grad: bool) -> None:
        super().__init__()
        self.net, self.frozen_under_no_grad = net, frozen_under_no_grad

    def forward(self, x: Tensor) -> Tensor:
        if not self.frozen_under_no_grad:
            return self.net(x).unsqueeze(1)
        with torch.no_grad():  # a frozen backbone written the common way
            features = self.net.features(x)
        return self.net.head(self.net.pool(features).flatten(1))


@pytest.mark.parametrize("explainer", [GradCAM, IntegratedGradCAM, ExpectedGradCAM])
def test_logits_not_one_row_per_image_and_a_no_grad_backbone_are_named(small_cnn: nn.Module, explainer) -> None:
    x = torch.randn(3, 1, 16, 16)
    options = {"references": torch.randn(4, 1, 16, 16)} if explainer is ExpectedGradCAM else {}
    with pytest.raises(ValueError, match=r"one row per image\), got shape \(3, 1, 10\)"):
        explainer(_Reshaped(small_cnn, False), "net.features", **options)(x)
    with pytest.raises(ValueError, match=r"torch.no_grad\(\).*requires_grad_\(False\)"):
        explainer(_Reshaped(small_cnn, True), "net.features", **options)(x)


def test_bad_arguments_get_clear_errors(small_cnn: nn.Module) -> None:
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        GradCAM(small_cnn, "features")(x[0])
    with pytest.raises(ValueError, match=r"must lie in \[0, 9\]"):
        GradCAM(small_cnn, "features")(x, 10)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        GradCAM(small_cnn, "features")(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="references"):
        ExpectedGradCAM(small_cnn, "features", references=None)
    with pytest.raises(ValueError, match="image shape"):
        ExpectedGradCAM(small_cnn, "features", references=torch.randn(2, 1, 8, 8))(x)
    with pytest.raises(ValueError, match="mode"):
        IntegratedGradCAM(small_cnn, "features", mode="paper")
    with pytest.raises(ValueError, match="batch_size"):
        GradCAM(small_cnn, "features", batch_size=0)
    with pytest.raises(ValueError, match="spatial"):
        GradCAM(small_cnn, "head.0")(x)
    with pytest.raises(ValueError, match=r"`x` holds NaN or infinite values in images \[1\]"):
        GradCAM(small_cnn, "features")(torch.stack([x[0], x[1] * float("inf")]))
    with pytest.raises(ValueError, match=r"`output_size` must be None, 'input' or two positive ints"):
        GradCAM(small_cnn, "features")(x, output_size=32)
    with pytest.raises(TypeError, match="`seed` must be an int"):
        ExpectedGradCAM(small_cnn, "features", references=x, seed="a")
    with pytest.raises(TypeError, match="`stream` must be an int >= 0"):
        ExpectedGradCAM(small_cnn, "features", references=x)(x, stream="a")

    class DictOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_cnn

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.net(x)}

    with pytest.raises(TypeError, match=r"logits tensor \[B, K\], got dict; explain a wrapper.*\['logits'\]"):
        GradCAM(DictOutput(), "net.features")(x)
