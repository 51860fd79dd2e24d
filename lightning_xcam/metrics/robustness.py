"""Robustness: max-sensitivity of an explainer (ALGORITHMS.md §4.3, Captum's ``sensitivity_max``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_xcam._checks import Targets, check_images, check_int, resolve_targets
from lightning_xcam.methods._guard import model_device, explanation_context, fresh_input
from lightning_xcam.metrics._common import Result, check_sample_ids, finish, item_noise
from lightning_xcam.metrics._perturb import check_max_batch

__all__ = ["max_sensitivity"]

Explainer = Callable[..., Tensor]
SensitivityPerturbFn = Callable[[Tensor, float], Tensor]


def _accepts_sample_ids(explainer: Explainer) -> bool:
    try:
        parameters = inspect.signature(explainer).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "sample_ids" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _explain(explainer: Explainer, x: Tensor, targets: Tensor | None, ids: Tensor, with_ids: bool) -> Tensor:
    """Call ``explainer`` with gradients enabled and check that it returns one map per image."""
    kwargs = {"sample_ids": ids} if with_ids else {}
    with torch.inference_mode(False), torch.enable_grad():
        maps = explainer(x, targets=targets, **kwargs)
    if not isinstance(maps, Tensor):
        raise TypeError(f"the explainer must return a tensor of maps [N, h, w], got {type(maps).__name__}.")
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim < 2 or maps.shape[0] != x.shape[0]:
        raise ValueError(
            f"the explainer returned shape {tuple(maps.shape)} for {x.shape[0]} images; "
            "it must return one map per image."
        )
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("the explainer returned maps with NaN or infinite values; explanation maps must be finite.")
    return maps.detach().float().flatten(1)


def _resolve(targets: Targets, x: Tensor, model: nn.Module | None) -> Tensor | None:
    """Targets shared by the clean and the perturbed explanations (argmax of ``model`` when ``None``)."""
    if targets is None and model is None:
        return None
    if model is None:
        if isinstance(targets, int) and not isinstance(targets, bool):
            return torch.full((x.shape[0],), targets, dtype=torch.long, device=x.device)
        # No model to read the number of classes from: a stand-in with enough columns checks type and shape.
        high = int(targets.max()) + 1 if isinstance(targets, Tensor) and targets.numel() else 1
        return resolve_targets(targets, x.new_zeros(x.shape[0], max(high, 1)))
    with explanation_context(model):
        clean = fresh_input(x, device=model_device(model))
        with torch.inference_mode():
            logits = model(clean).float()
        return resolve_targets(targets, logits.clone()).to(x.device)


def max_sensitivity(
    explainer: Explainer,
    x: Tensor,
    targets: Targets = None,
    radius: float = 0.02,
    n_samples: int = 10,
    perturb_fn: SensitivityPerturbFn | None = None,
    *,
    model: nn.Module | None = None,
    seed: int = 0,
    sample_ids: Tensor | None = None,
    max_batch: int | None = None,
    return_valid: bool = False,
) -> Result:
    """Max-sensitivity ``max_n ‖e(x + δ_n) − e(x)‖_F / ‖e(x)‖_F`` (lower is better), as Captum computes it.

    The explainer is called once on the clean images and once on all ``n_samples · B`` perturbed copies
    (``repeat_interleave`` layout, chunked by whole items only when ``max_batch`` is given), with the
    same targets repeated, and, if its signature accepts ``sample_ids``, the item ids repeated, so a
    stochastic explainer reuses each item's random draws and its Monte Carlo noise does not count as
    sensitivity. Maps are compared at the resolution the explainer returns. Gradients are enabled for
    the explainer (Captum runs it under ``no_grad``).

    Default perturbation: ``δ ~ U(−radius, radius)`` per input value, in model-input units, drawn from a
    per-item generator seeded by ``(seed, sample_ids[b])`` (never the global RNG). Defaults ``radius=0.02``
    and ``n_samples=10`` are Captum's. A zero clean explanation has norm 0; as in Captum the denominator
    becomes 1, so its value is ``max_n ‖e(x + δ_n)‖_F`` and ``valid`` is ``False``.

    Args:
        explainer: ``explainer(x, targets=..., [sample_ids=...]) -> [N, h, w]`` maps, e.g. a
            :class:`~lightning_xcam.GradCAM`, or any callable with that signature.
        x: ``[B, C, H, W]`` images in model-input space.
        targets: ``None``, an int or ``LongTensor [B]``. ``None`` resolves to the argmax of ``model`` (or of
            ``explainer.model`` if present) on the clean images; without any model, ``None`` is passed
            through and the explainer picks each copy's own argmax (Captum's behaviour).
        radius: Half-width of the uniform perturbation (``L∞`` radius).
        n_samples: Perturbed copies per image.
        perturb_fn: ``perturb_fn(inputs, radius) -> perturbed_inputs``, called on the repeat_interleaved
            inputs; ``None`` uses the uniform default.
        model: Model used to resolve ``targets=None``.
        seed: Seed of the default perturbation.
        sample_ids: ``LongTensor [B]`` item ids (default ``arange(B)``), for the noise and the explainer.
        max_batch: Perturbed images per explainer call (whole items); ``None`` = one call.
        return_valid: Also return ``BoolTensor [B]``, ``False`` for zero clean explanations.

    Returns:
        ``[B]`` max-sensitivities on ``x``'s device (and the validity mask).

    Raises:
        TypeError / ValueError: On bad arguments or an explainer / ``perturb_fn`` returning wrong shapes.

    Example:
        >>> explain = lambda x, targets=None: x.abs().sum(1)
        >>> max_sensitivity(explain, torch.randn(2, 3, 4, 4), n_samples=3).shape
        torch.Size([2])
    """
    check_images(x)
    if not callable(explainer):
        raise TypeError(f"`explainer` must be callable (x, targets=...) -> maps, got {type(explainer).__name__}.")
    if perturb_fn is not None and not callable(perturb_fn):
        raise TypeError(
            f"`perturb_fn` must be callable (inputs, radius) -> perturbed inputs, got {type(perturb_fn).__name__}."
        )
    check_int(n_samples, "n_samples")
    check_max_batch(max_batch)
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or radius < 0:
        raise ValueError(f"`radius` must be a non-negative number, got {radius!r}.")
    with torch.inference_mode(False):
        x = fresh_input(x)
    batch = x.shape[0]
    ids = check_sample_ids(sample_ids, batch, x.device)
    resolved = _resolve(targets, x, model if model is not None else getattr(explainer, "model", None))
    with_ids = _accepts_sample_ids(explainer)

    clean = _explain(explainer, x, resolved, ids, with_ids)
    repeated = x.repeat_interleave(n_samples, dim=0)
    if perturb_fn is None:
        perturbed = repeated + item_noise((n_samples, *x.shape[1:]), seed, ids, x.device, "uniform", float(radius))
    else:
        perturbed = perturb_fn(repeated, radius)
        if isinstance(perturbed, tuple) and len(perturbed) == 1:
            perturbed = perturbed[0]
        if not isinstance(perturbed, Tensor) or perturbed.shape != repeated.shape:
            raise ValueError(
                f"`perturb_fn` must return perturbed inputs of shape {tuple(repeated.shape)}, got "
                f"{tuple(perturbed.shape) if isinstance(perturbed, Tensor) else type(perturbed).__name__}."
            )
        if not bool(torch.isfinite(perturbed).all()):
            raise ValueError("`perturb_fn` returned perturbed inputs with NaN or infinite values.")
    row_targets = None if resolved is None else resolved.repeat_interleave(n_samples)
    row_ids = ids.repeat_interleave(n_samples)
    rows = perturbed.shape[0]
    chunk = rows if max_batch is None else max(1, max_batch // n_samples) * n_samples
    parts = [
        _explain(
            explainer,
            perturbed[first : first + chunk],
            None if row_targets is None else row_targets[first : first + chunk],
            row_ids[first : first + chunk],
            with_ids,
        )
        for first in range(0, rows, chunk)
    ]
    noisy = torch.cat(parts)
    if noisy.shape != (rows, clean.shape[1]):
        raise ValueError(
            f"the explainer returned maps of {noisy.shape[1]} cells on perturbed images "
            f"but {clean.shape[1]} on clean ones."
        )
    distance = (noisy - clean.repeat_interleave(n_samples, dim=0)).norm(dim=1).view(batch, n_samples)
    norm = clean.norm(dim=1)
    values = (distance / torch.where(norm == 0, torch.ones_like(norm), norm).unsqueeze(1)).amax(dim=1)
    return finish(values.to(x.device), norm > 0, return_valid)
