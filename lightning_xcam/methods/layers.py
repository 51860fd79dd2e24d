"""Target-layer lookup: by dotted name, by module, or detected from one real forward pass."""

from __future__ import annotations

import difflib

import torch
from torch import Tensor, nn

from lightning_xcam.methods._guard import hooked

__all__ = ["LayerSpec", "resolve_layer", "detect_layer", "layer_name"]

LayerSpec = str | nn.Module | None


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """The dotted name of ``layer`` inside ``model``.

    Raises:
        ValueError: If ``layer`` is not a submodule of ``model``.
    """
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise ValueError(
        f"`target_layer` is a {type(layer).__name__} that is not a submodule of the model; "
        "pass a module of the model being explained, or its dotted name."
    )


def resolve_layer(model: nn.Module, target_layer: LayerSpec, example: Tensor | None = None) -> tuple[str, nn.Module]:
    """Find the CAM layer.

    Args:
        model: The model to explain.
        target_layer: A dotted name (``"layer4"``, ``"net.features.10"``), a submodule, or ``None`` to
            detect the last module with a spatial 4-D output on ``example``.
        example: A real input batch, needed when ``target_layer`` is ``None``.

    Returns:
        ``(dotted_name, module)``.

    Raises:
        ValueError: For a name that does not exist (the message lists close candidates), a module that is
            not part of ``model``, or ``None`` without an example.
        TypeError: For any other type.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> resolve_layer(net, "1")[0]
        '1'
    """
    if isinstance(target_layer, nn.Module):
        return layer_name(model, target_layer), target_layer
    if isinstance(target_layer, str):
        modules = dict(model.named_modules())
        if target_layer in modules and target_layer != "":
            return target_layer, modules[target_layer]
        names = [n for n in modules if n]
        close = difflib.get_close_matches(target_layer, names, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(repr(c) for c in close)}." if close else ""
        raise ValueError(
            f"`target_layer={target_layer!r}` is not a submodule of {type(model).__name__}.{hint} "
            "Use a dotted name from `dict(model.named_modules())`, or None to detect the last spatial layer."
        )
    if target_layer is None:
        if example is None:
            raise ValueError("`target_layer=None` needs an example input to detect the layer; pass a name instead.")
        return detect_layer(model, example)
    raise TypeError(f"`target_layer` must be a dotted name, an nn.Module or None, got {type(target_layer).__name__}.")


def _spatial(output: object) -> bool:
    return isinstance(output, Tensor) and output.ndim == 4 and output.shape[-2] * output.shape[-1] > 1


def detect_layer(model: nn.Module, example: Tensor) -> tuple[str, nn.Module]:
    """The last module (in completion order) whose output is a spatial ``[B, D, h, w]`` tensor.

    One forward pass on ``example`` under ``no_grad`` (no guessed input shape). A container finishes after
    its children, so for a ResNet this returns ``layer4`` rather than its last ReLU. Call it inside
    :func:`~lightning_xcam.methods._guard.explanation_context` so the pass leaves no trace.

    Raises:
        ValueError: If no module produces a spatial output.
    """
    finished: list[str] = []
    with hooked(
        module.register_forward_hook(lambda _m, _i, out, name=name: finished.append(name) if _spatial(out) else None)
        for name, module in model.named_modules()
        if name
    ), torch.no_grad():
        model(example[:1])
    if not finished:
        raise ValueError(
            f"no submodule of {type(model).__name__} returns a spatial [B, D, h, w] tensor with h·w > 1 on an input "
            f"of shape {tuple(example.shape)}; CAM methods need a convolutional layer. Pass `target_layer` explicitly."
        )
    name = finished[-1]
    return name, model.get_submodule(name)
