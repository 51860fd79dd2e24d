"""GAD: support fits, fusion identities, shared-trunk machinery, input-gradient bases vs Captum, no side effects."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum import attr as captum_attr
from torch import Tensor, nn

from lightning_xcam import GAD
from lightning_xcam.demos import SmallCNN, load_digits_tensors
from lightning_xcam.methods.cam import ExpectedGradCAM, GradCAM
from lightning_xcam.methods.gad import _affine_in, _AffineNorm, _hull_fraction, _r2
from lightning_xcam.methods.input_gradients import INPUT_GRADIENT_METHODS, InputGradients, SingleModel

SIZE = 16
N_FIT = 1024



@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SmallCNN trained on real digits at 16×16 (~99% held-out accuracy): ``(net, x_fit, x_probe, y_probe)``."""
    torch.manual_seed(0)
    x, y = load_digits_tensors(SIZE)
    perm = torch.randperm(x.shape[0])
    x, y = x[perm], y[perm]
    net = SmallCNN()
    epochs, batch, train = 12, 32, 1400
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=epochs * ((train + batch - 1) // batch))
    for _ in range(epochs):
        net.train()
        for i in range(0, train, batch):
            loss = F.cross_entropy(net(x[i : i + batch]), y[i : i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert (net(x[train:]).argmax(1) == y[train:]).float().mean() > 0.97
    return net, x[:N_FIT], x[train : train + 64], y[train : train + 64]


@pytest.fixture(scope="module")
def gad_gradcam(trained) -> GAD:
    net, x_fit, _, _ = trained
    gad = GAD(net, "features", base="gradcam")
    gad.fit(x_fit)
    return gad


def _margin(net: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        top2 = net(x).topk(2, dim=1).values
    return max(float((top2[:, 0] - top2[:, 1]).median()), 1.0)


def _last_active(gad: GAD) -> tuple[int, int]:
    """The largest-λ support kept by the last fit and its row in ``base_maps`` (row 0 is the original)."""
    active = gad.diagnostics["active"]
    index = max(i for i, a in enumerate(active) if a)
    return index, sum(active[: index + 1])


# ----------------------------------------------------------------------------- supports


def test_supports_fit_distanced_targets_and_keep_decisions(trained, gad_gradcam) -> None:
    net, x_fit, _, _ = trained
    d = gad_gradcam.diagnostics
    assert gad_gradcam.split == "features"  # non-linear head after the CAM layer: the head is the tail
    assert len(d["fit_r2"]) == 4 and min(d["fit_r2"]) >= 0.9
    assert min(d["agreement"]) >= 0.99
    assert all(d["active"])
    s = _margin(net, x_fit)
    assert d["margin"] == pytest.approx(s, rel=1e-6)
    assert d["alphas"] == pytest.approx([lam * s for lam in (0.5, 1, 2, 4)], rel=1e-6)
    # Recompute R² and agreement from standalone support models (independent of the shared-trunk code).
    with torch.no_grad():
        z = net(x_fit)
        yhat = z.argmax(1)
        others = 1 - F.one_hot(yhat, 10).float()
        for i, alpha in enumerate(d["alphas"]):
            g = gad_gradcam.support_model(i)(x_fit)
            goal = z - alpha * others
            r2 = 1 - (g - goal).pow(2).sum() / (goal - goal.mean(0)).pow(2).sum()
            assert float(r2) == pytest.approx(d["fit_r2"][i], abs=1e-4)
            assert float((g.argmax(1) == yhat).float().mean()) == pytest.approx(d["agreement"][i])


def test_warm_fit_restarts_from_previous_offsets(trained) -> None:
    net, x_fit, _, _ = trained
    net = copy.deepcopy(net)
    gad = GAD(net, "features", base="gradcam", steps=150, warm_steps=0, r2_threshold=0.0)
    gad.fit(x_fit[:512])
    first = [dict(gad.support_model(i).named_parameters())["head.2.weight"].detach().clone() for i in range(4)]
    r2 = list(gad.diagnostics["fit_r2"])
    gad.fit(x_fit[:512])  # zero warm steps, unchanged model: θ_f + Δ gives back the same supports
    assert gad.diagnostics["fit_r2"] == pytest.approx(r2, abs=1e-6)
    with torch.no_grad():
        net.head[2].weight.add_(0.01)  # the model moves: the supports follow with the same offsets
    gad.fit(x_fit[:512])
    for i in range(4):
        now = dict(gad.support_model(i).named_parameters())["head.2.weight"]
        torch.testing.assert_close(now, first[i] + 0.01, rtol=0, atol=1e-6)


def test_bad_support_is_excluded_with_warning_and_a_stale_one_is_refit(trained) -> None:
    net, x_fit, x_probe, _ = trained
    net = copy.deepcopy(net)
    gad = GAD(net, "features", base="gradcam", lambdas=(1.0, 64.0), steps=100, warm_steps=0, r2_threshold=0.95)
    with pytest.warns(UserWarning, match="excluded"):
        gad.fit(x_fit[:256])
    d = gad.diagnostics
    assert d["active"] == [True, False] and d["fit_r2"][1] < 0.95 and d["refit"] == [False, False]
    # each support trains until it reaches its targets: the one that cannot spends the whole budget
    assert d["steps"][1] == 100 and d["steps"][0] < 100 and not d["fallback"]
    result = gad.explain(x_probe[:8])
    assert result.base_maps.shape[0] == 1 + sum(d["active"])
    with pytest.raises(RuntimeError, match="excluded"):
        gad.support_model(1)
    with torch.no_grad():  # the model moves far: the kept offsets no longer fit, so the support restarts cold
        net.head[0].reset_parameters()
        net.head[2].reset_parameters()
    with pytest.warns(UserWarning, match="excluded"):
        gad.fit(x_fit[:256])
    d = gad.diagnostics
    assert d["refit"] == [True, False] and d["active"][0] and d["fit_r2"][0] >= 0.95


def test_every_support_learns_its_shift_even_when_the_r2_is_high_from_the_start(trained) -> None:
    """On a well-trained model the small-λ shift is tiny next to the logits' spread: an unchanged copy of
    the original already scores R² ≥ 0.95. The early stop also asks for ``shift_target`` of the shift, so
    every support trains and explains differently from the original."""
    net, x_fit, x_probe, _ = trained
    gad = GAD(net, "features", base="gradcam")
    before = _r2_of_unchanged_copy(gad, net, x_fit[:256])
    assert before[0] >= 0.95  # the trap: the λ = 0.5 support would "fit" without a single step
    gad.fit(x_fit[:256])
    d = gad.diagnostics
    assert min(d["steps"]) > 0 and min(d["shift_r2"]) >= 0.5 and all(d["active"])
    maps = gad.explain(x_probe).base_maps
    change = (maps[1:] - maps[0]).abs().amax(dim=(1, 2, 3)) / maps[0].abs().max()
    assert bool((change > 0.05).all())


def _r2_of_unchanged_copy(gad: GAD, net: nn.Module, x: torch.Tensor) -> list[float]:
    """The R² (output offset free) each support's targets give the original itself."""
    with torch.no_grad():
        z = net(x)
    _, others, margin = gad._targets(z)
    goals = torch.stack([z - lam * margin * others for lam in gad.lambdas])
    return _r2(z.expand_as(goals), goals, centered=True).tolist()


def test_shift_r2_hand_cases() -> None:
    original = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]])
    shift = torch.tensor([[[0.0, -1.0], [-1.0, 0.0], [0.0, -1.0]]])
    target = original + shift
    assert _r2(original, target, shift=shift).item() == pytest.approx(0.0)  # nothing made
    assert _r2(target, target, shift=shift).item() == pytest.approx(1.0)  # all of it
    # half of it: residual Σ(shift/2)² = 4·0.25 = 1 of Σshift² = 4 (uncentred: no free constant)
    assert _r2(original + shift / 2, target, shift=shift).item() == pytest.approx(0.75)
    # centred: column means (-1/3, -2/3) are free, Σ(shift − mean)² = 2/3 + 2/3 = 4/3; made: all but the constant
    assert _r2(original + shift - 5.0, target, centered=True, shift=shift).item() == pytest.approx(1.0)
    assert _r2(original, target, centered=True, shift=shift).item() == pytest.approx(0.0, abs=1e-6)
    constant = torch.full_like(shift, -1.0)  # a shift that is constant per output: nothing left to learn
    assert _r2(original, original + constant, centered=True, shift=constant).item() == 1.0


def test_unchanged_model_refresh_takes_no_step(trained) -> None:
    net, x_fit, _, _ = trained
    gad = GAD(net, "features", base="gradcam", r2_target=0.9)
    gad.fit(x_fit[:256])
    first = gad.diagnostics
    assert all(0 <= s <= 300 for s in first["steps"]) and max(first["steps"]) > 0 and min(first["fit_r2"]) >= 0.9
    gad.fit(x_fit[:256])  # early stop: every support still reaches r2_target before any step
    assert gad.diagnostics["steps"] == [0, 0, 0, 0]
    assert gad.diagnostics["fit_r2"] == pytest.approx(first["fit_r2"], abs=1e-6)


def test_warm_fit_follows_a_training_epoch_within_its_budget(trained) -> None:
    net, x_fit, _, _ = trained
    net = copy.deepcopy(net)
    gad = GAD(net, "features", base="gradcam")  # the default warm budget: 30 steps
    gad.fit(x_fit[:256])
    assert all(gad.diagnostics["active"])
    x, y = load_digits_tensors(SIZE)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for i in range(0, 256, 32):  # part of an epoch of ordinary training moves every weight
        loss = F.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    gad.fit(x_fit[:256])
    d = gad.diagnostics
    assert all(d["active"]) and not any(d["refit"]) and min(d["fit_r2"]) >= 0.9
    assert max(d["steps"]) <= 30


def test_barely_trained_model_supports_fit_without_steps(trained) -> None:
    """A model that predicts one class with near-constant logits (as after a fraction of an epoch): its
    distanced targets are a constant shift of its logits, fitted exactly by the output-bias step, so every
    support fits with no Adam step and explains like the original."""
    net, x_fit, x_probe, _ = trained
    net = copy.deepcopy(net)
    with torch.no_grad():
        net.head[2].weight.mul_(1e-4)
        net.head[2].bias.copy_(torch.arange(10.0) * 0.05)
        z = net(x_fit[:256])
    assert set(z.argmax(1).tolist()) == {9} and float(z.std(0).max()) < 0.02
    gad = GAD(net, "features", base="gradcam")
    gad.fit(x_fit[:256])
    d = gad.diagnostics
    assert d["steps"] == [0, 0, 0, 0] and all(d["active"]) and min(d["fit_r2"]) > 0.999
    assert d["margin"] == pytest.approx(float((z[:, 9] - z[:, 8]).median()), rel=1e-4)  # no floor: α = λ·s
    result = gad.explain(x_probe[:8])
    for row in result.base_maps[1:]:  # a constant on the logits changes no gradient
        torch.testing.assert_close(row, result.base_maps[0], rtol=1e-4, atol=1e-6)


def test_all_supports_excluded_falls_back_to_thresholded_base_map(trained) -> None:
    net, x_fit, x_probe, _ = trained
    gad = GAD(net, "features", base="gradcam", steps=5, r2_threshold=1.5)  # an R² no fit reaches
    with pytest.warns(UserWarning, match="no support is left"):
        gad.fit(x_fit[:128])
    assert gad.diagnostics["fallback"] and not any(gad.diagnostics["active"])
    result = gad.explain(x_probe[:8])
    base = GradCAM(net, "features")(x_probe[:8])
    assert result.base_maps.shape[0] == 1
    expected = base * (base >= 0.1 * base.amax(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(result.maps, expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- fusion


def test_gad_is_original_map_inside_intersection_of_thresholded_maps(trained, gad_gradcam) -> None:
    net, _, x_probe, _ = trained
    result = gad_gradcam.explain(x_probe)
    maps, base = result.maps, result.base_maps
    assert base.shape == (5, x_probe.shape[0], 4, 4)
    # Model 0 of the ensemble is the original; models 1..k are the standalone supports, explained for the
    # original's class (a support may disagree with the original's argmax on a few images).
    torch.testing.assert_close(base[0], GradCAM(net, "features")(x_probe), rtol=1e-5, atol=1e-6)
    for i in range(4):
        support = GradCAM(gad_gradcam.support_model(i), "features")(x_probe, result.targets)
        torch.testing.assert_close(base[i + 1], support, rtol=1e-4, atol=1e-5)
    peak = base.amax(dim=(2, 3), keepdim=True)
    expected_mask = ((base >= 0.1 * peak) & (peak > 0)).all(dim=0)
    assert torch.equal(result.mask, expected_mask)
    plain = base[0] >= 0.1 * base[0].amax(dim=(1, 2), keepdim=True)
    assert not bool(((maps > 0) & ~plain).any())  # GAD's support ⊆ the thresholded original map
    assert torch.equal(maps[result.mask], base[0][result.mask])  # exactly the original inside the mask
    assert bool((maps[~result.mask] == 0).all())
    assert torch.equal(gad_gradcam(x_probe), maps)
    assert gad_gradcam(x_probe, output_size="input").shape == (x_probe.shape[0], SIZE, SIZE)


def test_fused_mask_is_smaller_and_more_faithful_than_random(trained, gad_gradcam) -> None:
    net, _, x_probe, _ = trained
    result = gad_gradcam.explain(x_probe)
    d = gad_gradcam.diagnostics
    assert bool((d["kept_fraction"] <= d["plain_fraction"]).all())
    assert d["kept_fraction"].mean() < d["plain_fraction"].mean()
    assert bool((d["hull_area"]["gad"] <= d["hull_area"]["plain"] + 1e-6).all())
    mask, c = result.mask.float(), result.targets
    area = mask.flatten(1).sum(1)
    keep = area > 0
    assert keep.float().mean() > 0.9

    def drop(cell_mask: torch.Tensor) -> torch.Tensor:
        pixels = F.interpolate(cell_mask[:, None], size=(SIZE, SIZE), mode="nearest")
        with torch.no_grad():
            p0 = net(x_probe).softmax(1).gather(1, c[:, None])[:, 0]
            p1 = net(x_probe * (1 - pixels)).softmax(1).gather(1, c[:, None])[:, 0]
        return (p0 - p1)[keep]

    generator = torch.Generator().manual_seed(0)
    random_drops = []
    for _ in range(16):
        scores = torch.rand(mask.shape[0], mask[0].numel(), generator=generator)
        ranks = scores.argsort(1).argsort(1)
        random_drops.append(drop((ranks < area[:, None]).float().view_as(mask)).mean())
    random_drops = torch.stack(random_drops)
    # above the random baseline by more than two standard errors of that baseline's 16 draws
    assert drop(mask).mean() > random_drops.mean() + 2 * random_drops.std() / len(random_drops) ** 0.5


def test_multiclass_same_k_supports_cover_all_ten_classes(trained, gad_gradcam) -> None:
    net, x_fit, x_probe, _ = trained
    with torch.no_grad():
        yhat = net(x_fit).argmax(1)
        supports = [gad_gradcam.support_model(i)(x_fit).argmax(1) for i in range(4)]
    assert set(yhat.tolist()) == set(range(10))
    for pred in supports:  # one support per α serves every class
        per_class = torch.stack([(pred[yhat == k] == k).float().mean() for k in range(10)])
        assert float(per_class.min()) >= 0.97
    # Every class gets non-empty GAD explanations (an image whose k + 1 maps share no cell legitimately gets
    # an empty one), also for an explicitly requested non-argmax class.
    result = gad_gradcam.explain(x_probe)
    nonempty = result.maps.flatten(1).amax(1) > 0
    assert nonempty.float().mean() >= 0.9
    assert set(result.targets[nonempty].tolist()) == set(range(10))
    with torch.no_grad():
        runner_up = net(x_probe).topk(2, dim=1).indices[:, 1]
    other = gad_gradcam.explain(x_probe, targets=runner_up)
    assert torch.equal(other.targets, runner_up)
    torch.testing.assert_close(other.base_maps[0], GradCAM(net, "features")(x_probe, runner_up), rtol=1e-5, atol=1e-6)
    assert torch.equal(other.maps[other.mask], other.base_maps[0][other.mask])


# ----------------------------------------------------------------------------- Expected Grad-CAM base


def test_expected_gradcam_base_costs_one_trunk_pass_per_path_point(trained) -> None:
    net, x_fit, x_probe, _ = trained
    bank = x_fit[:16]
    kwargs = {"references": bank, "n_samples": 6, "noise_std": 0.1, "seed": 3}
    gad = GAD(net, "features", base="expected_gradcam", base_kwargs=kwargs)
    gad.fit(x_fit[:512])
    rows = []
    handle = net.features[0].register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].shape[0]))
    try:
        egc_maps = ExpectedGradCAM(net, "features", **kwargs)(x_probe[:8], sample_ids=torch.arange(10, 18))
        egc_rows = sum(rows)
        rows.clear()
        result = gad.explain(x_probe[:8], sample_ids=torch.arange(10, 18))
        gad_rows = sum(rows)
    finally:
        handle.remove()
    assert gad_rows == egc_rows  # the k + 1 models share every trunk pass
    torch.testing.assert_close(result.base_maps[0], egc_maps, rtol=1e-5, atol=1e-6)
    index, row = _last_active(gad)
    support = ExpectedGradCAM(gad.support_model(index), "features", **kwargs)(
        x_probe[:8], result.targets, sample_ids=torch.arange(10, 18)
    )
    torch.testing.assert_close(result.base_maps[row], support, rtol=1e-4, atol=1e-5)  # common random numbers


def test_explainer_instance_and_default_bank(trained) -> None:
    net, x_fit, x_probe, _ = trained
    egc = ExpectedGradCAM(net, "features", references=x_fit[:8], n_samples=4, noise_std=0.0)
    gad = GAD(net, base=egc, steps=100, r2_threshold=0.0)
    assert gad.target_layer == "features"
    gad.fit(x_fit[:256])
    torch.testing.assert_close(gad.explain(x_probe[:4]).base_maps[0], egc(x_probe[:4]), rtol=1e-5, atol=1e-6)
    default = GAD(net, "features", base_kwargs={"n_samples": 2}, steps=20, r2_threshold=0.0)
    default.fit(x_fit[:100])
    assert isinstance(default.base, ExpectedGradCAM) and default.base.references.shape[0] == 64


# ----------------------------------------------------------------------------- input-gradient bases


def _captum_oracle(net: nn.Module) -> nn.Module:
    oracle = copy.deepcopy(net)
    for module in oracle.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # Captum's ReLU backward hooks refuse in-place ReLUs
    return oracle


_CAPTUM = {
    "saliency": captum_attr.Saliency,
    "input_x_gradient": captum_attr.InputXGradient,
    "integrated_gradients": captum_attr.IntegratedGradients,
    "guided_backprop": captum_attr.GuidedBackprop,
    "deconvolution": captum_attr.Deconvolution,
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", INPUT_GRADIENT_METHODS)
def test_input_gradient_attributions_equal_captum(method: str) -> None:
    net = SmallCNN(in_channels=3).eval()  # in-place ReLUs, random weights, 3 channels
    x = torch.randn(3, 3, 16, 16)
    c = torch.tensor([2, 5, 7])
    ours, chosen = InputGradients(method, steps=12, batch_size=10).attributions(SingleModel(net), x, c)
    kwargs = {"n_steps": 12} if method == "integrated_gradients" else {}
    reference = _CAPTUM[method](_captum_oracle(net)).attribute(x.clone(), target=c, **kwargs)
    assert torch.equal(chosen, c)
    torch.testing.assert_close(ours[0], reference, rtol=1e-5, atol=1e-7)
    assert float(reference.abs().max()) > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", INPUT_GRADIENT_METHODS)
def test_gad_input_gradient_bases_match_captum_before_fusion(trained, method: str) -> None:
    net, x_fit, x_probe, _ = trained
    gad = GAD(net, "features", base=method, base_kwargs={"steps": 8} if method == "integrated_gradients" else None, steps=150)
    gad.fit(x_fit[:384])
    x = x_probe[:6]
    result = gad.explain(x)
    kwargs = {"n_steps": 8} if method == "integrated_gradients" else {}
    reference = _CAPTUM[method](_captum_oracle(net)).attribute(x.clone(), target=result.targets, **kwargs)
    torch.testing.assert_close(result.base_maps[0], reference.mean(1).clamp_min(0), rtol=1e-5, atol=1e-7)
    assert result.maps.shape == (6, SIZE, SIZE)
    assert torch.equal(result.maps[result.mask], result.base_maps[0][result.mask])
    if method in ("guided_backprop", "integrated_gradients"):  # each support's own gradient, not a sum of heads
        index, row = _last_active(gad)
        oracle = _captum_oracle(gad.support_model(index))
        support = _CAPTUM[method](oracle).attribute(x.clone(), target=result.targets, **kwargs)
        torch.testing.assert_close(result.base_maps[row], support.mean(1).clamp_min(0), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    ("trainable", "trained"), [("after_last_conv", ("layer4.1.bn2.", "fc.")), ("tail", ("layer4.1.", "fc."))]
)
def test_linear_head_moves_split_before_cam_layer(trainable: str, trained: tuple[str, ...]) -> None:
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(32, 3, 32, 32)
    gad = GAD(net, "layer4", base="gradcam", steps=3, lr=1e-3, r2_threshold=float("-inf"), r2_target=float("inf"),
              trainable=trainable)
    gad.fit(x)
    d = gad.diagnostics
    assert gad.split == "layer4.0"  # tail: layer4.1 + fc, as ALGORITHMS.md §3.4
    assert set(gad._plan.tail_params) == {n for n, _ in net.named_parameters() if n.startswith(trained)}
    assert d["cut"] == ("layer4.1.conv2" if trainable == "after_last_conv" else None) and d["steps"] == [3] * 4
    # The fit ran on cached cut outputs (a view of each head); standalone copies of the supports must
    # reproduce its R², and they share every parameter outside the trained set with the original.
    original = dict(net.named_parameters())
    with torch.no_grad():
        z = net(x)
        goal_shift = 1 - F.one_hot(z.argmax(1), 10).float()
        for i, alpha in enumerate(d["alphas"]):
            support = gad.support_model(i)
            goal = z - alpha * goal_shift
            g = support(x)
            r2 = 1 - (g - goal).pow(2).sum() / (goal - goal.mean(0)).pow(2).sum()
            assert float(r2) == pytest.approx(d["fit_r2"][i], abs=1e-4)
            for name, param in support.named_parameters():
                assert torch.equal(param, original[name]) == (not name.startswith(trained)), name
    result = gad.explain(x[:4])
    torch.testing.assert_close(result.base_maps[0], GradCAM(net, "layer4")(x[:4]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        result.base_maps[2], GradCAM(gad.support_model(1), "layer4")(x[:4], result.targets), rtol=1e-4, atol=1e-6
    )


class _ReluAfterLayer(nn.Module):
    """A CAM layer (conv + BN) and a linear classifier, with the ReLU between them as a module at the end of
    the layer or as a functional ``F.relu`` in ``forward`` (DenseNet's spelling): the same function."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      *([] if functional else [nn.ReLU()]))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        a = self.features(self.stem(x))
        return self.fc((F.relu(a) if self.functional else a).mean((2, 3)))


def test_functional_relu_before_a_linear_classifier_still_moves_the_split() -> None:
    # With the split at the CAM layer only `fc` would train: deltas linear in the shift (§3.4's degenerate family).
    x = torch.randn(64, 1, 8, 8)
    plans = []
    for functional in (False, True):
        torch.manual_seed(0)
        gad = GAD(_ReluAfterLayer(functional).eval(), "features", base="gradcam", steps=2,
                  r2_threshold=float("-inf"))
        gad.fit(x)
        plans.append((gad.split, gad._plan.tail_params))
    assert plans[0] == plans[1] == ("features.0", ("features.1.weight", "features.1.bias", "fc.weight", "fc.bias"))


def test_affine_in_parameters_tells_a_linear_head_from_a_nonlinear_one() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    linear = nn.Sequential(nn.ReLU(), nn.Linear(6, 3))
    bilinear = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))  # affine in each layer, not in both together
    mlp = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    assert _affine_in(linear, x, ["1.weight", "1.bias"])
    assert _affine_in(bilinear, x, ["1.weight", "1.bias"]) and not _affine_in(bilinear, x, ["0.weight", "1.weight"])
    assert not _affine_in(mlp, x, ["0.weight", "0.bias", "2.weight", "2.bias"])
    assert not _affine_in(mlp, x, [])  # nothing to train: no family at all
    # rounding is not curvature: a bfloat16 head (rounding like TF32/half on accelerators) is still affine
    wide = nn.Sequential(nn.ReLU(), nn.Linear(512, 100)).to(torch.bfloat16)
    assert _affine_in(wide, torch.randn(8, 512, dtype=torch.bfloat16), ["1.weight", "1.bias"])


@pytest.mark.parametrize("functional", [False, True])
def test_an_affine_head_with_no_module_before_the_cam_layer_warns_and_keeps_the_split(functional: bool) -> None:
    class OneStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *([] if functional else [nn.ReLU()]))
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            a = self.features(x)
            return self.fc((F.relu(a) if functional else a).mean((2, 3)))

    torch.manual_seed(0)
    gad = GAD(OneStage().eval(), "features", base="gradcam", steps=2, r2_threshold=float("-inf"))
    with pytest.warns(UserWarning, match=r"no module runs before the CAM layer.*split stays at the CAM layer"):
        gad.fit(torch.randn(16, 1, 8, 8))
    assert gad.split == "features" and gad._plan.tail_params == ("fc.weight", "fc.bias")


class _Wrapper(nn.Module):
    """The network as a LightningModule holds it: an attribute ``net`` of a non-Sequential module."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@pytest.mark.parametrize(("blocks", "split"), [([1, 1, 1, 1], "layer3"), ([2, 2, 2, 2], "layer4.0")])
@pytest.mark.parametrize("prefix", ["", "net."])
def test_split_is_a_stage_boundary_never_inside_a_block(blocks: list[int], split: str, prefix: str) -> None:
    # with one BasicBlock per stage the last parametrised module before the CAM layer's end is
    # layer4.0.downsample.1; a cut inside the block would leave the residual sum reading a trunk value
    net = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, blocks, num_classes=10).eval()
    model = _Wrapper(net).eval() if prefix else net
    gad = GAD(model, f"{prefix}layer4", base="gradcam", steps=2, lr=1e-3, r2_threshold=float("-inf"))
    gad.fit(torch.randn(16, 3, 32, 32))
    assert gad.split == f"{prefix}{split}"
    # Two blocks: the supports train what follows the last convolution. One block: the last convolution
    # is the downsample branch's, after which the residual sum still reads the skipped `bn2` output, so
    # the cut fails its replay check and the whole tail trains.
    tail = ("layer4.", "fc.") if split == "layer3" else ("layer4.1.bn2.", "fc.")
    assert set(gad._plan.tail_params) == {n for n, _ in model.named_parameters() if n.startswith(tuple(prefix + t for t in tail))}
    assert gad.diagnostics["cut"] == (None if split == "layer3" else f"{prefix}layer4.1.conv2")


class _SkipNet(nn.Module):
    """A tail that reads a trunk value other than the split output (a long skip connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        a = torch.relu(self.body(torch.relu(self.mid(s)))) + s  # `s` is not the split's (`mid`) output
        return self.head(a.mean(dim=(2, 3)))


def test_tail_that_is_not_self_contained_is_refused_and_full_copies_work() -> None:
    net = _SkipNet().eval()
    x = torch.randn(32, 1, 8, 8)
    with pytest.raises(ValueError, match="not self-contained"):
        GAD(net, "body", base="gradcam", split="mid", steps=5).fit(x)
    shared = GAD(net, "body", base="gradcam", split="stem", steps=5, r2_threshold=float("-inf"))
    shared.fit(x)  # the skip reads the split output itself: self-contained
    torch.testing.assert_close(shared.explain(x[:4]).base_maps[0], GradCAM(net, "body")(x[:4]), rtol=1e-5, atol=1e-7)
    gad = GAD(net, "body", base="gradcam", shared_trunk=False, steps=30, r2_threshold=float("-inf"))
    gad.fit(x)
    assert gad.split is None
    result = gad.explain(x[:4])
    torch.testing.assert_close(result.base_maps[0], GradCAM(net, "body")(x[:4]), rtol=1e-5, atol=1e-7)
    support = GradCAM(gad.support_model(0), "body")(x[:4], result.targets)
    torch.testing.assert_close(result.base_maps[1], support, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- guard, diagnostics, errors


def test_fit_and_explain_leave_no_trace(trained) -> None:
    net, x_fit, x_probe, _ = trained
    net = copy.deepcopy(net).train()
    net.features[1].eval()  # a user-frozen BatchNorm must stay frozen
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    net.head[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [m.training for m in net.modules()]
    rng = torch.get_rng_state()
    gad = GAD(net, "features", base="guided_backprop", steps=20, r2_threshold=0.0)
    gad.fit(x_fit[:128])
    gad(x_probe[:4], output_size="input")
    gad2 = GAD(net, "features", base_kwargs={"n_samples": 3}, steps=20, r2_threshold=0.0)
    gad2.fit(x_fit[:128])
    gad2(x_probe[:4])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert [m.training for m in net.modules()] == flags
    assert all(bool((p.grad == 0.5).all()) for p in net.parameters())
    assert not net.head[0].weight.requires_grad and net.head[2].weight.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_a_hook_that_changes_the_output_runs_on_every_support(trained) -> None:
    net, x_fit, x_probe, _ = trained
    net = copy.deepcopy(net)
    net.head[2].register_forward_hook(lambda _m, _i, out: out / 2)  # a temperature: part of the model
    gad = GAD(net, "features", base="gradcam", steps=5, r2_threshold=float("-inf"))
    gad.fit(x_fit[:64])  # copy 0 reproduces the logits only with the hook: no "not self-contained" error
    torch.testing.assert_close(gad.explain(x_probe[:4]).base_maps[0], GradCAM(net, "features")(x_probe[:4]))


class _BatchNormHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_refit_after_the_model_moved_uses_its_new_buffers() -> None:
    net = _BatchNormHead().eval()
    with torch.no_grad():
        net.head[1].running_var.uniform_(0.5, 2)
    x = torch.randn(64, 1, 8, 8)
    gad = GAD(net, "features", base="gradcam", split="features", steps=5, r2_threshold=float("-inf"))
    gad.fit(x)
    net._apply(lambda t: t.clone())  # what ``net.to(device)`` does: parameters keep their objects, buffers do not
    with torch.no_grad():
        net.head[1].running_mean.add_(1.0)  # statistics that move with later training
    gad.fit(x)
    torch.testing.assert_close(gad.explain(x[:4]).base_maps[0], GradCAM(net, "features")(x[:4]), rtol=1e-5, atol=1e-9)


def test_a_failed_fit_keeps_the_previous_supports(trained) -> None:
    net, x_fit, x_probe, _ = trained
    gad = GAD(net, "features", base="gradcam", steps=5, r2_threshold=float("-inf"))
    gad.fit(x_fit[:64])
    before = gad(x_probe[:2])
    with pytest.raises(RuntimeError):
        gad.fit(x_fit[:8].repeat(1, 3, 1, 1))  # wrong channel count: the model itself refuses it
    torch.testing.assert_close(gad(x_probe[:2]), before)


def test_diagnostics_keys_and_mask_stability(trained, gad_gradcam) -> None:
    _, _, x_probe, _ = trained
    ids = torch.arange(100, 108)
    gad_gradcam(x_probe[:8], sample_ids=ids)
    gad_gradcam(x_probe[:8], sample_ids=ids)
    d = gad_gradcam.diagnostics
    for key in ("fit_r2", "agreement", "alphas", "margin", "active", "fallback", "refit", "steps", "kept_fraction",
                "plain_fraction", "hull_area", "mask_iou_prev", "stale"):
        assert key in d
    assert d["mask_iou_prev"] == {i: 1.0 for i in range(100, 108)}
    assert d["stale"] is False


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(5), nn.BatchNorm2d(5, affine=False), nn.BatchNorm1d(5)])
def test_affine_norm_equals_eval_batch_norm_and_shares_its_tensors(norm: nn.Module) -> None:
    # what a fit step runs in place of a batch norm: the same values and gradients from the same tensors
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        if norm.affine:
            norm.weight.normal_()
            norm.bias.normal_()
    norm.eval()
    affine = _AffineNorm(norm)
    assert dict(affine.named_parameters()).keys() == dict(norm.named_parameters()).keys()
    assert all(a is b for a, b in zip(affine.parameters(), norm.parameters()))
    x = torch.randn(4, 5, 3, 3) if isinstance(norm, nn.BatchNorm2d) else torch.randn(4, 5)
    torch.testing.assert_close(affine(x), norm(x), rtol=1e-5, atol=1e-6)
    if norm.affine:
        weight = torch.randn_like(x)
        expected = torch.autograd.grad((norm(x) * weight).sum(), [norm.weight, norm.bias])
        torch.testing.assert_close(torch.autograd.grad((affine(x) * weight).sum(), [norm.weight, norm.bias]), expected)


def test_hull_fraction_hand_cases() -> None:
    mask = torch.zeros(4, 5, 5, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 0, 4] = mask[0, 4, 0] = True  # right triangle with legs 4: area 8
    mask[1, 2, :] = True  # collinear: 0
    mask[2, 1:4, 1:4] = True  # 3×3 block of centres: a 2×2 square
    torch.testing.assert_close(_hull_fraction(mask), torch.tensor([8 / 25, 0.0, 4 / 25, 0.0]))


def test_errors(trained) -> None:
    net, x_fit, x_probe, _ = trained
    with pytest.raises(RuntimeError, match="fit"):
        GAD(net, "features", base="gradcam")(x_probe[:2])
    with pytest.raises(ValueError, match="tau"):
        GAD(net, "features", tau=0.0)
    with pytest.raises(ValueError, match="lambdas"):
        GAD(net, "features", lambdas=())
    with pytest.raises(ValueError, match="`lambdas` must be a non-empty sequence"):
        GAD(net, "features", lambdas=1.0)  # type: ignore[arg-type]
    assert GAD(net, "features", lambdas=range(1, 3)).lambdas == (1.0, 2.0)  # any sequence of reals
    assert GAD(net, "features", lambdas=np.array([0.5, 4.0])).lambdas == (0.5, 4.0)
    with pytest.raises(ValueError, match="tau"):
        GAD(net, "features", tau=True)
    with pytest.raises(TypeError, match="`shared_trunk` must be True or False"):
        GAD(net, "features", shared_trunk="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`seed` must be an int"):
        GAD(net, "features", seed="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base"):
        GAD(net, "features", base="lime")
    with pytest.raises(TypeError, match="base"):
        GAD(net, "features", base=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="another model"):
        GAD(net, "features", base=GradCAM(SmallCNN(), "features"))
    with pytest.raises(ValueError, match="split"):
        GAD(net, "features.4", base="gradcam", split="features.8").fit(x_fit[:32])
    with pytest.raises(TypeError, match="x_fit"):
        GAD(net, "features", base="gradcam").fit([1, 2])  # type: ignore[arg-type]


def test_a_whole_tail_fallback_is_announced() -> None:
    # ResNet-18's layer3 as CAM layer: the last convolution after it sits inside a residual block, no clean
    # cut, so the supports train all of layer4 + fc: slow fits the user should hear about.
    net = torchvision.models.resnet18(num_classes=5).eval()
    with pytest.warns(UserWarning, match=r"train the whole tail: 17 tensors"):
        GAD(net, "layer3", base="gradcam", steps=1, r2_threshold=float("-inf")).fit(torch.randn(8, 3, 32, 32))
