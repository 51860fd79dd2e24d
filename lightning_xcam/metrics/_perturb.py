"""Shared perturbation machinery: substrates and chunked target scores (ALGORITHMS.md §4.1).

Perturbation metrics change pixels of ``x`` towards a *substrate* (what a removed pixel looks like) and
read the target's score on many perturbed copies. Both live here, once: :func:`make_substrate` builds
the substrate in model-input space, :func:`target_probabilities` forwards any number of rows in chunks of
a memory budget under ``torch.inference_mode()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xcam._checks import check_images, check_int
from lightning_xcam.methods._guard import model_device, explanation_context, fresh_input

__all__ = ["SUBSTRATES", "Substrate", "blur_kernel", "make_substrate", "target_probabilities", "check_max_batch"]

Substrate = str | Tensor
SUBSTRATES = ("zero", "blur", "mean")

# RISE's blur (evaluation.py: gkern(11, 5) + conv2d(padding=5)).
_BLUR_SIZE = 11
_BLUR_SIGMA = 5.0
_SCIPY_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: radius = int(truncate * sigma + 0.5)


def blur_kernel(
    size: int = _BLUR_SIZE,
    sigma: float = _BLUR_SIGMA,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RISE's blur kernel: a ``size × size`` delta filtered by ``scipy.ndimage.gaussian_filter(sigma)``.

    scipy pads with ``mode="reflect"`` (``d c b a | a b c d``) and truncates its Gaussian at
    ``int(4 σ + 0.5)``; with σ = 5 on an 11 × 11 grid the reflections fold most of the Gaussian's tails
    back, which makes this kernel much flatter than a truncated Gaussian. Built here in torch (no scipy at
    run time). The 2-D filter of a delta is separable: ``outer(k, k)`` with ``k`` the 1-D filtered delta.

    Args:
        size: Side of the kernel (RISE: 11).
        sigma: Gaussian standard deviation in pixels (RISE: 5).
        device: Device of the result.
        dtype: Floating dtype of the result.

    Returns:
        ``[size, size]`` kernel summing to 1.

    Example:
        >>> k = blur_kernel()
        >>> k.shape, round(k.sum().item(), 6)
        (torch.Size([11, 11]), 1.0)
    """
    radius = int(_SCIPY_TRUNCATE * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * offsets**2 / sigma**2)
    weights = weights / weights.sum()
    # Output cell i reads input cell reflect(i + o); the input is a delta at the centre.
    positions = torch.arange(size).view(-1, 1) + offsets.long().view(1, -1)
    folded = positions.remainder(2 * size)
    folded = torch.where(folded >= size, 2 * size - 1 - folded, folded)
    one_d = torch.where(folded == size // 2, weights.view(1, -1), torch.zeros(())).sum(dim=1)
    return torch.outer(one_d, one_d).to(device=device, dtype=dtype)


def make_substrate(x: Tensor, substrate: Substrate) -> Tensor:
    """The image every removed pixel is replaced by (or every inserted pixel starts from).

    Args:
        x: ``[B, C, H, W]`` images in model-input space.
        substrate: ``"zero"`` (zeros in model-input space, i.e. the dataset's mean colour after
            Normalize), ``"blur"`` (RISE's blur: depthwise 11 × 11 convolution, zero padding 5, see
            :func:`blur_kernel`), ``"mean"`` (each image's per-channel mean colour) or a tensor
            broadcastable to ``x`` (e.g. ``[C, 1, 1]`` black in model-input units).

    Returns:
        A ``[B, C, H, W]`` tensor on ``x``'s device and dtype (a broadcast view for tensor substrates).

    Raises:
        TypeError: If ``substrate`` is neither a string nor a tensor.
        ValueError: On an unknown name, or a tensor that does not broadcast to ``x`` or is not finite.

    Example:
        >>> x = torch.ones(2, 3, 8, 8)
        >>> make_substrate(x, "mean").equal(x)
        True
    """
    check_images(x)
    if isinstance(substrate, Tensor):
        if not bool(torch.isfinite(substrate).all()):
            raise ValueError("`substrate` holds NaN or infinite values; pass a finite image or colour.")
        try:
            return torch.broadcast_to(substrate.to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError as err:
            raise ValueError(
                f"`substrate` of shape {tuple(substrate.shape)} does not broadcast to the images' shape "
                f"{tuple(x.shape)}; pass e.g. a [C, 1, 1] colour or a [B, C, H, W] image."
            ) from err
    if not isinstance(substrate, str):
        raise TypeError(
            f"`substrate` must be one of {SUBSTRATES} or a tensor broadcastable to x, got {type(substrate).__name__}."
        )
    if substrate == "zero":
        return torch.zeros_like(x)
    if substrate == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if substrate == "blur":
        channels = x.shape[1]
        kernel = blur_kernel(device=x.device, dtype=x.dtype).expand(channels, 1, _BLUR_SIZE, _BLUR_SIZE)
        return F.conv2d(x, kernel, padding=_BLUR_SIZE // 2, groups=channels)
    raise ValueError(f"`substrate` must be one of {SUBSTRATES} or a tensor broadcastable to x, got {substrate!r}.")


def check_max_batch(max_batch: int | None) -> int | None:
    """Validate a ``max_batch`` argument (a positive int, or ``None`` for a single pass).

    Raises:
        TypeError: If it is not an int or None.
        ValueError: If it is not positive.
    """
    if max_batch is None:
        return None
    return check_int(max_batch, "max_batch", why=" (rows per forward pass) or None")


def clean_logits(model: nn.Module, images: Tensor, max_batch: int | None) -> Tensor:
    """The model's float32 logits on ``images``, forwarded in chunks of ``max_batch`` (``None``: at once).

    Call it inside :func:`explanation_context` with ``images`` from :func:`fresh_input`; the forwards run
    under ``torch.inference_mode()`` and the result is a normal tensor.

    Raises:
        ValueError: If a row of logits is not finite (a diverged model: nothing computed from it would mean
            anything).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> clean_logits(net, torch.zeros(5, 1, 2, 2), 2).shape
        torch.Size([5, 3])
    """
    chunk = max_batch or images.shape[0]
    with torch.inference_mode():
        logits = torch.cat([model(part).float() for part in images.split(chunk)])
    logits = logits.clone()  # outside inference mode: a normal tensor
    broken = ~torch.isfinite(logits).flatten(1).all(dim=1)
    if bool(broken.any()):
        raise ValueError(
            f"the model returns non-finite logits for {int(broken.sum())} of {broken.numel()} images (rows "
            f"{broken.nonzero().flatten()[:8].tolist()}); a diverged model cannot be scored. Check its weights."
        )
    return logits


def chunked_scores(
    model: nn.Module,
    num_rows: int,
    build: Callable[[int, int], Tensor],
    targets: Tensor,
    max_batch: int | None,
    softmax: bool = True,
) -> Tensor:
    """Target scores of ``num_rows`` inputs that ``build(start, stop)`` materialises chunk by chunk.

    The caller must already be inside :func:`explanation_context`; the forwards run under
    ``torch.inference_mode()``, so no graph is built. Building inputs lazily keeps memory at
    ``max_batch`` images however many perturbed copies there are.

    Args:
        model: The model, in eval mode.
        num_rows: Total number of input rows.
        build: ``build(start, stop)`` returns the ``[stop - start, C, H, W]`` inputs of those rows.
        targets: ``LongTensor [num_rows]``: the class to read for each row.
        max_batch: Rows per forward pass; ``None`` forwards everything at once.
        softmax: Read softmax probabilities (``True``) or raw outputs (``False``).

    Returns:
        ``[num_rows]`` float32 scores (a normal tensor, usable outside inference mode).

    Raises:
        ValueError: If the model's output is not ``[N, K]``, or has one column when ``softmax`` is read.
    """
    chunk = max_batch or num_rows
    parts = []
    with torch.inference_mode():
        for start in range(0, num_rows, chunk):
            stop = min(start + chunk, num_rows)
            out = model(build(start, stop)).float()
            if out.ndim != 2:
                raise ValueError(
                    f"the model must return scores of shape [N, K], got shape {tuple(out.shape)}. "
                    "Wrap the model so that it returns class scores."
                )
            if softmax:
                if out.shape[1] < 2:
                    raise ValueError(
                        f"the model returns {out.shape[1]} score per image, whose softmax is always 1; return one "
                        "logit per class, e.g. `torch.cat([-z / 2, z / 2], dim=1)` for a binary logit `z` (its "
                        "softmax is sigmoid(z) for class 1)."
                    )
                out = out.softmax(dim=1)
            parts.append(out.gather(1, targets[start:stop].view(-1, 1).to(out.device)).squeeze(1))
    # A clone outside inference mode turns the inference tensor into a normal one.
    return torch.cat(parts).clone()


def target_probabilities(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    max_batch: int | None,
    softmax: bool = True,
) -> Tensor:
    """Forward ``inputs`` in chunks and return each row's score for its target.

    Safe to call from anywhere: it enters :func:`explanation_context` itself (nesting inside an outer
    context is harmless; the outer one restores its own snapshot), moves ``inputs`` to the model's device
    through :func:`fresh_input` and runs the forwards under ``torch.inference_mode()``.

    Args:
        model: Any classifier returning ``[N, K]`` scores.
        inputs: ``[N, C, H, W]`` images in model-input space (may be an inference tensor).
        targets: ``LongTensor [N]`` (or an int for all rows) of class indices.
        max_batch: Rows per forward pass (memory budget); ``None`` forwards all rows at once. The result
            does not depend on it.
        softmax: Return ``softmax(f(x))[target]`` (default) or the raw output ``f(x)[target]``.

    Returns:
        ``[N]`` float32 scores on the model's device.

    Raises:
        TypeError / ValueError: On bad ``inputs``, ``targets`` or ``max_batch``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> target_probabilities(net, torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.long), 2).shape
        torch.Size([5])
    """
    check_images(inputs, "inputs")
    check_max_batch(max_batch)
    num_rows = inputs.shape[0]
    if isinstance(targets, int) and not isinstance(targets, bool):
        targets = torch.full((num_rows,), targets, dtype=torch.long)
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"`targets` must be an int or a LongTensor of shape [{num_rows}], got {targets!r:.80}.")
    if targets.shape != (num_rows,):
        raise ValueError(f"`targets` must have shape [{num_rows}] (one class per row), got {tuple(targets.shape)}.")
    with explanation_context(model):
        device = model_device(model)
        rows = fresh_input(inputs, device=device)
        return chunked_scores(model, num_rows, lambda a, b: rows[a:b], targets.to(device).long(), max_batch, softmax)


def num_points(num_pixels: int, steps: int) -> tuple[int, int]:
    """``(step, T)``: pixels changed per step, ``⌈HW / steps⌉``, and the number of curve points."""
    step = math.ceil(num_pixels / steps)
    return step, math.ceil(num_pixels / step) + 1
