"""The explanation guard and layer lookup: explanations leave no trace on the model, even after errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_xcam import ExpectedGradCAM, GradCAM, IntegratedGradCAM
from lightning_xcam.methods._guard import explanation_context, hooked
from lightning_xcam.methods.layers import detect_layer, resolve_layer


def _state(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["grad_ids"] == after["grad_ids"]
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    assert all(torch.equal(a, b) for a, b in zip(before["buffers"], after["buffers"]))
    assert before["hooks"] == after["hooks"]
    assert torch.equal(before["rng"], after["rng"])


def _mixed_state_model(small_cnn: nn.Module) -> nn.Module:
    """Train mode with one frozen-in-eval submodule, some frozen params and accumulated .grad."""
    small_cnn.train()
    small_cnn.features[1].eval()
    small_cnn.features[0].weight.requires_grad_(False)
    small_cnn(torch.randn(4, 1, 16, 16)).sum().backward()  # .grad present, as mid-accumulation
    return small_cnn


EXPLAINERS = {
    "gradcam": lambda m: GradCAM(m, "features"),
    "integrated": lambda m: IntegratedGradCAM(m, "features", steps=3),
    "expected": lambda m: ExpectedGradCAM(m, "features", references=torch.randn(3, 1, 16, 16), n_samples=3),
}


@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_explainers_leave_no_trace(small_cnn: nn.Module, name: str) -> None:
    model = _mixed_state_model(small_cnn)
    x = torch.randn(2, 1, 16, 16)
    explainer = EXPLAINERS[name](model)
    before = _state(model)
    maps = explainer(x)
    assert maps.abs().sum() > 0
    _assert_same(before, _state(model))


def test_state_restored_after_an_exception_inside_the_model(small_cnn: nn.Module) -> None:
    model = _mixed_state_model(small_cnn)
    before = _state(model)

    def explode(_m: nn.Module, _i: object, _o: Tensor) -> None:
        raise RuntimeError("boom inside the model")

    handle = model.head.register_forward_hook(explode)
    before_hooks = _state(model)["hooks"]
    x, bank = torch.randn(2, 1, 16, 16), torch.randn(3, 1, 16, 16)
    before["rng"] = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        ExpectedGradCAM(model, "features", references=bank, n_samples=3)(x)
    assert _state(model)["hooks"] == before_hooks  # the engine's own hook on `features` is gone
    handle.remove()
    _assert_same(before, _state(model))


def test_guard_restores_flags_buffers_hooks_and_rng_it_did_not_set(small_cnn: nn.Module) -> None:
    model = _mixed_state_model(small_cnn)
    before = _state(model)
    with pytest.raises(KeyError):
        with explanation_context(model):
            assert not any(m.training for m in model.modules())
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            model.features[1].running_mean.add_(1.0)  # a stray buffer update
            model.features[0].weight.requires_grad_(True)
            model.features[0].register_forward_hook(lambda *a: None)  # a leaked hook
            torch.rand(3)  # a global RNG draw
            raise KeyError("fail inside")
    _assert_same(before, _state(model))



def test_a_backward_inside_the_guard_leaves_the_users_gradients_untouched(small_cnn: nn.Module) -> None:
    small_cnn(torch.randn(2, 1, 16, 16)).sum().backward()
    grads = {n: p.grad for n, p in small_cnn.named_parameters()}
    values = {n: g.clone() for n, g in grads.items()}
    with pytest.raises(KeyError):
        with explanation_context(small_cnn):
            small_cnn(torch.randn(2, 1, 16, 16)).sum().backward()  # what a third-party explainer might do
            raise KeyError("fail inside")
    for name, param in small_cnn.named_parameters():
        assert param.grad is grads[name] and torch.equal(param.grad, values[name]), name


def test_a_half_precision_model_is_refused_with_the_fix(small_cnn: nn.Module) -> None:
    half = small_cnn.bfloat16()
    with pytest.raises(TypeError, match=r"bfloat16 parameters.*bf16-mixed"):
        with explanation_context(half):
            pass
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # refused, not converted


@pytest.mark.parametrize("method", [GradCAM, ExpectedGradCAM, IntegratedGradCAM])
def test_a_model_with_nan_weights_gets_degenerate_maps_not_nan(small_cnn: nn.Module, method: type) -> None:
    with torch.no_grad():
        small_cnn.features[0].weight[0, 0, 0, 0] = float("nan")
    x = torch.randn(2, 1, 16, 16)
    references = dict(references=torch.randn(4, 1, 16, 16)) if method is ExpectedGradCAM else {}
    explainer = method(small_cnn, "features", **references)
    maps = explainer(x, targets=0, output_size="input")
    assert maps.shape == (2, 16, 16) and bool((maps == 0).all())
    assert bool((explainer.explain(x, targets=0).maps == 0).all())  # the result itself, not only __call__


def test_gad_result_maps_holding_a_non_finite_value_are_zeroed_as_a_whole() -> None:
    from lightning_xcam.methods.gad import GADResult

    base = torch.ones(2, 3, 2, 2)
    base[1, 2, 0, 0] = float("inf")
    maps = torch.ones(3, 2, 2)
    maps[0, 1, 1] = float("nan")
    result = GADResult(maps=maps, base_maps=base, mask=torch.ones(3, 2, 2, dtype=torch.bool), targets=torch.zeros(3))
    assert result.maps.sum(dim=(1, 2)).tolist() == [0.0, 4.0, 4.0]
    assert result.base_maps.sum(dim=(2, 3)).tolist() == [[4.0, 4.0, 4.0], [4.0, 4.0, 0.0]]

def test_guard_inside_inference_mode_and_no_grad(small_cnn: nn.Module) -> None:
    with torch.inference_mode():
        with explanation_context(small_cnn):
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert torch.is_inference_mode_enabled()
    with torch.no_grad():
        with explanation_context(small_cnn):
            assert torch.is_grad_enabled()
        assert not torch.is_grad_enabled()


def test_repeated_calls_do_not_accumulate_hooks_or_memory(small_cnn: nn.Module) -> None:
    cam = GradCAM(small_cnn, "features")
    x = torch.randn(2, 1, 16, 16)
    for _ in range(20):
        cam(x)
    assert all(not m._forward_hooks and not m._backward_hooks for m in small_cnn.modules())



def test_hooked_removes_its_hooks_after_an_error_in_the_block_or_in_a_registration() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="inside"):
        with hooked(m.register_forward_hook(lambda _m, _i, _o, k=k: seen.append(k)) for k, m in enumerate(net)):
            net(torch.ones(1, 2))
            raise RuntimeError("inside")
    assert seen == [0, 1, 2]

    def registrations():
        yield net[0].register_forward_hook(lambda *_: None)
        yield net[1].register_forward_pre_hook(lambda *_: None)
        raise RuntimeError("half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        with hooked(registrations()):
            pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())

# --- layer lookup ----------------------------------------------------------------------------------------


def test_layer_by_name_module_and_detection(resnet18: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    assert resolve_layer(resnet18, "layer4.1.conv2")[0] == "layer4.1.conv2"
    assert resolve_layer(resnet18, resnet18.layer3)[0] == "layer3"
    assert detect_layer(resnet18, x)[0] == "layer4"
    cam = GradCAM(resnet18)
    assert cam.target_layer is None
    cam(x)
    assert cam.target_layer == "layer4"


def test_wrong_layer_name_lists_candidates(resnet18: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"'layer4'"):
        resolve_layer(resnet18, "layr4")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(resnet18, nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="target_layer"):
        resolve_layer(resnet18, 4)  # type: ignore[arg-type]


def test_model_without_spatial_layer_says_so() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="spatial"):
        detect_layer(mlp, torch.randn(1, 1, 4, 4))
