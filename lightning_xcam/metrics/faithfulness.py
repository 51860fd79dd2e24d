"""Faithfulness: deletion / insertion AUC, infidelity, average drop and increase in confidence.

ALGORITHMS.md §4.1, §4.2, §4.4. Every function runs the model inside :func:`explanation_context`
(eval mode, everything restored on exit), forwards under ``torch.inference_mode()`` in chunks of
``max_batch`` rows, and returns a ``[B]`` float32 tensor on the model's device. ``targets=None`` means
the argmax of the model on the clean images. Results do not depend on ``max_batch`` (up to the
floating-point effects of batch size inside the model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_xcam._checks import Targets, check_int, check_maps
from lightning_xcam.maps import degenerate, display_normalize, upsample
from lightning_xcam.methods._guard import explanation_context
from lightning_xcam.metrics._common import (
    Clean,
    Result,
    check_sample_ids,
    clean_pass,
    finish,
    item_noise,
    stable_rank,
)
from lightning_xcam.metrics._perturb import Substrate, check_max_batch, chunked_scores, make_substrate, num_points

__all__ = ["insertion_auc", "deletion_auc", "infidelity", "average_drop", "increase_in_confidence"]

PerturbFn = Callable[[Tensor], tuple[Tensor, Tensor]]

DEFAULT_STEPS = 20
DEFAULT_MAX_BATCH = 128
_DROP_EPS = 1e-7  # Grad-CAM++ / torchcam: drop = max(0, Y - O) / (Y + eps)


def _causal_auc(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Targets,
    steps: int,
    substrate: Substrate,
    insertion: bool,
    max_batch: int | None,
    return_valid: bool,
) -> Result:
    """One engine for both RISE curves; ``insertion`` swaps the start and finish images."""
    check_int(steps, "steps")
    check_max_batch(max_batch)
    with explanation_context(model):
        clean = clean_pass(model, x, maps, targets)
        batch, _, height, width = clean.x.shape
        pixels = height * width
        step, points = num_points(pixels, steps)
        device = clean.x.device
        counts = (torch.arange(points, device=device) * step).clamp_max(pixels)

        # Stable descending sort: ties (e.g. the exact zeros of a ReLU'd map) go in raster order.
        rank = stable_rank(clean.maps.flatten(1)).view(batch, 1, height, width)

        substrate_images = make_substrate(clean.x, substrate)
        start, final = (substrate_images, clean.x) if insertion else (clean.x, substrate_images)
        # The clean image is one point of each curve (insertion's last, deletion's first): reuse its score.
        clean_point = points - 1 if insertion else 0
        todo = torch.tensor([i for i in range(points) if i != clean_point], device=device, dtype=torch.long)
        per_image = todo.numel()

        def build(first: int, stop: int) -> Tensor:
            rows = torch.arange(first, stop, device=device)
            image, point = rows // per_image, todo[rows % per_image]
            changed = rank[image] < counts[point].view(-1, 1, 1, 1)
            return torch.where(changed, final[image], start[image])

        row_targets = clean.targets.repeat_interleave(per_image)
        scores = chunked_scores(model, batch * per_image, build, row_targets, max_batch, softmax=True)
        curve = torch.empty(batch, points, device=device)
        curve[:, todo] = scores.view(batch, per_image)
        curve[:, clean_point] = clean.scores(softmax=True)

        fractions = counts.float() / pixels
        auc = ((curve[:, 1:] + curve[:, :-1]) * fractions.diff()).sum(dim=1) / 2
        return finish(auc, ~degenerate(clean.maps), return_valid)


_AUC_DOC = """

    RISE's protocol (ALGORITHMS.md §4.1): pixels (all channels at a location) are ranked by the map
    (upsampled bilinearly to the image), ``step = ⌈HW / steps⌉`` pixels change per step, the curve has
    ``⌈HW / step⌉ + 1`` points (usually ``steps + 1``, e.g. 21 at 16 × 16 or 64 × 64 with 20 steps; fewer
    when rounding ``step`` up leaves fewer intervals, e.g. 26 at 10 × 10 with 30 steps), point ``i`` after ``min(i · step, HW)`` changed pixels; the score is the
    softmax probability of the target; the AUC is the trapezoid over the actual fractions ``count_i / HW``
    (RISE's rule whenever ``step`` divides ``HW``). All points of all images go through the model in
    batched, lazily built chunks; the clean image's score is shared with the target resolution pass,
    so the cost is ``B · (T − 1) + B`` forwards.

    Ties are broken by a stable descending sort: equal values are taken in raster order (row by row).
    A degenerate map (all zeros) or a constant map therefore ranks pixels in raster order; its value
    is that raster-order curve's AUC, and ``valid`` is ``False`` for all-zero maps.

    Args:
        model: Classifier returning ``[B, K]`` logits.
        x: ``[B, C, H, W]`` images in model-input space.
        maps: ``[B, h, w]`` non-negative maps at layer or input resolution.
        targets: ``None`` (argmax on ``x``), an int or ``LongTensor [B]``.
        steps: Number of intervals of the curve.
        substrate: ``"zero"``, ``"blur"`` (RISE's blur), ``"mean"`` or a tensor broadcastable to ``x``;
            see :func:`~lightning_xcam.metrics.make_substrate`.
        max_batch: Images per forward pass (memory budget); ``None`` forwards everything at once.
        return_valid: Also return ``BoolTensor [B]``, ``False`` for degenerate maps.

    Returns:
        ``[B]`` AUCs in ``[0, 1]`` (and the validity mask).

    Raises:
        TypeError / ValueError: On bad images, maps (shape, batch size, negative values), targets,
            ``steps``, ``substrate`` or ``max_batch``.
"""


def insertion_auc(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Targets = None,
    steps: int = DEFAULT_STEPS,
    substrate: Substrate = "blur",
    max_batch: int | None = DEFAULT_MAX_BATCH,
    return_valid: bool = False,
) -> Result:
    return _causal_auc(model, x, maps, targets, steps, substrate, True, max_batch, return_valid)


def deletion_auc(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Targets = None,
    steps: int = DEFAULT_STEPS,
    substrate: Substrate = "zero",
    max_batch: int | None = DEFAULT_MAX_BATCH,
    return_valid: bool = False,
) -> Result:
    return _causal_auc(model, x, maps, targets, steps, substrate, False, max_batch, return_valid)


insertion_auc.__doc__ = (
    "Insertion AUC (higher is better): start from the substrate (default RISE's blur) and insert the most"
    " salient pixels of ``x`` first."
    + _AUC_DOC
    + """
    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> insertion_auc(net, torch.randn(2, 1, 4, 4), torch.rand(2, 4, 4), steps=4).shape
        torch.Size([2])
"""
)
deletion_auc.__doc__ = (
    "Deletion AUC (lower is better): replace the most salient pixels of ``x`` by the substrate (default"
    " zeros in model-input space) first."
    + _AUC_DOC
    + """
    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> deletion_auc(net, torch.randn(2, 1, 4, 4), torch.rand(2, 4, 4), steps=4).shape
        torch.Size([2])
"""
)


def _unwrap(value: object, name: str) -> Tensor:
    """Accept Captum's single-tensor tuples from a ``perturb_fn``."""
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if not isinstance(value, Tensor):
        raise TypeError(
            f"`perturb_fn` must return two tensors (perturbations, perturbed_inputs); {name} is {type(value).__name__}."
        )
    return value


def infidelity(
    model: nn.Module,
    x: Tensor,
    maps: Tensor | Sequence[Tensor],
    targets: Targets = None,
    n_perturb: int = 10,
    perturb_fn: PerturbFn | None = None,
    normalize: bool = True,
    *,
    noise_std: float = 0.2,
    seed: int = 0,
    sample_ids: Tensor | None = None,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    return_valid: bool = False,
) -> Result | list[Result]:
    """Infidelity of Yeh et al., as Captum computes it, on the target logit (lower is better).

    ``INFD = mean_n (β a_n − b_n)²`` with ``a_n = Σ φ ⊙ I_n`` (the upsampled map ``φ`` broadcast over
    channels), ``b_n = f_c(x) − f_c(x̃_n)`` on the raw model output (no softmax) and, with ``normalize``,
    ``β = Σ a_n b_n / Σ a_n²`` (ALGORITHMS.md §4.2; ``β = 1`` without it). A zero map gives ``a_n = 0``,
    ``β = 0`` (Captum's ``safe_div``), so its value is the mean squared output change ``mean_n b_n²``
    (``valid`` is ``False``).

    Default perturbation: ``I ~ N(0, noise_std²)`` in model-input units, ``x̃ = x − I``; item ``b`` draws
    from its own generator seeded by ``(seed, sample_ids[b])`` (never the global RNG), so values do not
    depend on ``max_batch`` or on the other items of the batch. A custom ``perturb_fn(inputs) ->
    (perturbations, perturbed_inputs)`` is called as Captum calls it: on inputs repeated ``n_perturb``
    times with ``repeat_interleave``, whole items per call (all of them when ``max_batch`` is ``None``).

    Several explanations of the same images (a list of maps, e.g. one per method) share the perturbations
    and their forward passes, which are the dear part: each gets exactly the value it gets alone.

    Args:
        model: Classifier returning ``[B, K]`` scores.
        x: ``[B, C, H, W]`` images in model-input space.
        maps: ``[B, h, w]`` maps at layer or input resolution (signed values allowed), or a non-empty
            list of them.
        targets: ``None`` (argmax on ``x``), an int or ``LongTensor [B]``.
        n_perturb: Perturbations per image.
        perturb_fn: Captum-style perturbation function; ``None`` uses the Gaussian default.
        normalize: Rescale the attribution sums by the least-squares ``β`` (maps have arbitrary scale).
        noise_std: Standard deviation of the default perturbation.
        seed: Seed of the default perturbation.
        sample_ids: ``LongTensor [B]`` item ids for the per-item generators (default ``arange(B)``);
            pass stable ids to get the same draws for the same item across calls and batch layouts.
        max_batch: Perturbed rows per forward pass (rounded down to whole items, at least one item).
        return_valid: Also return ``BoolTensor [B]``, ``False`` for all-zero maps.

    Returns:
        ``[B]`` infidelities (and the validity mask); a list of them for a list of maps.

    Raises:
        TypeError / ValueError: On bad arguments or a ``perturb_fn`` returning wrong shapes.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> infidelity(net, torch.randn(2, 1, 4, 4), torch.rand(2, 4, 4), n_perturb=5).shape
        torch.Size([2])
        >>> x, a, b = torch.randn(2, 1, 4, 4), torch.rand(2, 4, 4), torch.rand(2, 2, 2)
        >>> [v.shape for v in infidelity(net, x, [a, b], n_perturb=5)]  # one perturbation set, two values
        [torch.Size([2]), torch.Size([2])]
    """
    check_int(n_perturb, "n_perturb")
    check_max_batch(max_batch)
    if perturb_fn is not None and not callable(perturb_fn):
        raise TypeError(
            "`perturb_fn` must be callable (inputs -> (perturbations, perturbed_inputs)), "
            f"got {type(perturb_fn).__name__}."
        )
    several = not isinstance(maps, Tensor)
    map_list = list(maps) if several else [maps]  # type: ignore[arg-type]
    if not map_list:
        raise ValueError("`maps` must be a [B, h, w] tensor or a non-empty list of them, got an empty list.")
    with explanation_context(model):
        clean = clean_pass(model, x, map_list[0], targets, nonnegative=False)
        batch = clean.x.shape[0]
        ids = check_sample_ids(sample_ids, batch, clean.x.device)
        size = tuple(clean.x.shape[-2:])
        phis = [clean.maps] + [
            upsample(check_maps(m, x, f"maps[{k}]", nonnegative=False).to(clean.x.device), size)
            for k, m in enumerate(map_list[1:], start=1)
        ]
        clean_scores = clean.scores(softmax=False)
        item_shape = (n_perturb, *clean.x.shape[1:])
        items_per_call = batch if max_batch is None else max(1, max_batch // n_perturb)
        a_parts: list[list[Tensor]] = [[] for _ in phis]
        b_parts = []
        for first in range(0, batch, items_per_call):
            part = slice(first, min(first + items_per_call, batch))
            repeated = clean.x[part].repeat_interleave(n_perturb, dim=0)
            if perturb_fn is None:
                noise = item_noise(item_shape, seed, ids[part], clean.x.device, "normal", noise_std)
                perturbed = repeated - noise
            else:
                returned = perturb_fn(repeated)
                if not isinstance(returned, (tuple, list)) or len(returned) != 2:
                    raise TypeError(
                        "`perturb_fn` must return a pair (perturbations, perturbed_inputs), "
                        f"got {type(returned).__name__}."
                    )
                noise, perturbed = (_unwrap(v, n) for v, n in zip(returned, ("perturbations", "perturbed_inputs")))
                for value, name in ((noise, "perturbations"), (perturbed, "perturbed_inputs")):
                    if value.shape != repeated.shape:
                        raise ValueError(
                            f"`perturb_fn` returned {name} of shape {tuple(value.shape)}; expected the shape of "
                            f"its input {tuple(repeated.shape)}."
                        )
                    if not bool(torch.isfinite(value).all()):
                        raise ValueError(f"`perturb_fn` returned {name} with NaN or infinite values.")
                noise, perturbed = noise.to(repeated), perturbed.to(repeated)  # the device and dtype of the images
            rows = repeated.shape[0]
            for phi, parts in zip(phis, a_parts):
                weighted = phi[part].unsqueeze(1).repeat_interleave(n_perturb, dim=0) * noise.float()
                parts.append(weighted.flatten(1).sum(dim=1))
            row_targets = clean.targets[part].repeat_interleave(n_perturb)
            build = lambda a, b, chunk=perturbed: chunk[a:b]  # noqa: E731
            perturbed_scores = chunked_scores(model, rows, build, row_targets, None, softmax=False)
            b_parts.append(clean_scores[part].repeat_interleave(n_perturb) - perturbed_scores)
        b = torch.cat(b_parts).view(batch, n_perturb)
        results = []
        for phi, parts in zip(phis, a_parts):
            a = torch.cat(parts).view(batch, n_perturb)
            if normalize:
                a_squared = (a * a).sum(dim=1)
                beta = (a * b).sum(dim=1) / torch.where(a_squared == 0, torch.ones_like(a_squared), a_squared)
                a = beta.unsqueeze(1) * a
            values = ((a - b) ** 2).mean(dim=1)
            results.append(finish(values, phi.flatten(1).abs().amax(dim=1) > 0, return_valid))
        return results if several else results[0]


def _confidence(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Targets, max_batch: int | None
) -> tuple[Clean, Tensor, Tensor]:
    """``(clean, Y, O)``: target probability on ``x`` and on ``E ⊙ x`` (display-normalised map ``E``)."""
    check_max_batch(max_batch)
    clean = clean_pass(model, x, maps, targets)
    masked = display_normalize(clean.maps).unsqueeze(1) * clean.x
    explained = chunked_scores(model, masked.shape[0], lambda a, b: masked[a:b], clean.targets, max_batch, softmax=True)
    return clean, clean.scores(softmax=True), explained


_CONFIDENCE_DOC = """
    ``E`` is the map upsampled and min-max normalised per image; ``Y = p_c(x)``, ``O = p_c(E ⊙ x)`` on
    the model-input tensor (ALGORITHMS.md §4.4, Grad-CAM++ / torchcam). One extra forward per image. The
    mean over items, times 100, is the percentage usually reported. A degenerate or constant map (a
    ``1 × 1`` CAM) gives ``E = 0`` (the all-zero input) and its value is computed on that input; ``valid``
    is ``False`` for degenerate maps.

    Args:
        model: Classifier returning ``[B, K]`` logits.
        x: ``[B, C, H, W]`` images in model-input space.
        maps: ``[B, h, w]`` non-negative maps at layer or input resolution.
        targets: ``None`` (argmax on ``x``), an int or ``LongTensor [B]``.
        max_batch: Images per forward pass; ``None`` forwards everything at once.
        return_valid: Also return ``BoolTensor [B]``, ``False`` for degenerate maps.

    Raises:
        TypeError / ValueError: On bad images, maps, targets or ``max_batch``.
"""


def average_drop(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Targets = None,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    return_valid: bool = False,
) -> Result:
    with explanation_context(model):
        clean, before, after = _confidence(model, x, maps, targets, max_batch)
        return finish((before - after).clamp_min(0) / (before + _DROP_EPS), ~degenerate(clean.maps), return_valid)


def increase_in_confidence(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Targets = None,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    return_valid: bool = False,
) -> Result:
    with explanation_context(model):
        clean, before, after = _confidence(model, x, maps, targets, max_batch)
        return finish((before < after).float(), ~degenerate(clean.maps), return_valid)


average_drop.__doc__ = (
    "Average drop (lower is better): ``max(0, Y − O) / (Y + 1e-7)`` per item, in ``[0, 1]``.\n"
    + _CONFIDENCE_DOC
    + """
    Returns:
        ``[B]`` drops (and the validity mask).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> average_drop(net, torch.randn(2, 1, 4, 4), torch.rand(2, 4, 4)).shape
        torch.Size([2])
"""
)
increase_in_confidence.__doc__ = (
    "Increase in confidence (higher is better): ``1[Y < O]`` per item, as float.\n"
    + _CONFIDENCE_DOC
    + """
    Returns:
        ``[B]`` indicators (and the validity mask).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> increase_in_confidence(net, torch.randn(2, 1, 4, 4), torch.rand(2, 4, 4)).shape
        torch.Size([2])
"""
)
