"""One batched CAM engine; Grad-CAM, Integrated Grad-CAM and Expected Grad-CAM are samplers of it.

The engine (:class:`_LayerProbe` + :meth:`_CAM.explain`) takes a model, one or more hooked layers and a
*path* — the input points to visit, the class to differentiate at each point, how to reduce the layer
activations ``A`` and gradients ``G = ∂y_c/∂A`` of each point, and how to combine the reduced terms into
maps. The three explainers differ only in their path:

=====================  ==========================  =====================================  =======================
explainer              points per image            reduction per point                    combination
=====================  ==========================  =====================================  =======================
Grad-CAM               ``x``                       ``GAP(G)``                             ``ReLU(Σ_k g_k A_k(x))``
Integrated Grad-CAM    ``m`` on a straight path    step map ``ReLU(Σ_k A_k GAP(G_k))``    sum of step maps
Expected Grad-CAM      ``N`` random path points    ``GAP((A(x) − A(x')) ⊙ G)``            ``ReLU(Σ_k ḡ_k A_k(x))``
=====================  ==========================  =====================================  =======================

Everything before the hooked layer runs without building an autograd graph; gradients are taken with
``torch.autograd.grad`` with respect to the hooked layer output only, so parameter ``.grad`` is never
touched. Points are pushed through the model in chunks of at most ``batch_size``; every reduction is per
point and combined after the last chunk, so results do not depend on the chunk size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_xcam._checks import Targets, check_images, check_int, resolve_targets, targets_tensor
from lightning_xcam.maps import OutputSize, resolve_output_size, upsample, zero_degenerate_stack
from lightning_xcam.methods._guard import explanation_context, fresh_input, hooked, model_device
from lightning_xcam.methods.layers import LayerSpec, resolve_layer

__all__ = ["GradCAM", "IntegratedGradCAM", "ExpectedGradCAM", "CAMResult"]


def _gap(t: Tensor) -> Tensor:
    return t.mean(dim=(-2, -1))


def _weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """``Σ_k w_k A_k`` for weights ``[..., D]`` and activations ``[..., D, h, w]``."""
    return torch.einsum("...d,...dhw->...hw", weights, activations)


def _chunks(total: int, batch_size: int | None) -> Iterator[slice]:
    step = total if batch_size is None else batch_size
    for start in range(0, total, max(step, 1)):
        yield slice(start, min(start + step, total))


def _item_seed(seed: int, sample_id: int, stream: int) -> int:
    # Tuples of ints hash the same in every process, so draws are reproducible across runs and ranks.
    return hash((seed, sample_id, stream)) & ((1 << 63) - 1)


class _LayerProbe:
    """Activations and gradients at ``M`` hooked layers of one forward pass.

    ``M > 1`` serves ensembles that run several heads on one shared trunk (GAD's support models): the
    model then returns logits ``[M, S, K]`` and layer ``m`` belongs to head ``m``. A plain classifier has
    ``M = 1`` and returns ``[S, K]``. Each hooked output becomes its own leaf, so the gradients of the
    heads never mix.
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module]) -> None:
        self.model = model
        self.layers = list(layers)

    def _forward(self, points: Tensor, with_grad: bool) -> tuple[Tensor, list[Tensor]]:
        captured: list[Tensor | None] = [None] * len(self.layers)

        def hook_for(index: int) -> Callable:
            def hook(module: nn.Module, _inputs: object, output: object) -> Tensor | None:
                if not isinstance(output, Tensor) or output.ndim != 4:
                    shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                    raise ValueError(
                        f"the target layer {type(module).__name__} returned {shape}; CAM methods need a spatial "
                        "[B, D, h, w] output. Pick a convolutional layer (see `target_layer`)."
                    )
                if captured[index] is not None:
                    raise ValueError(
                        f"the target layer {type(module).__name__} runs more than once per forward pass; "
                        "pick a layer that is used once."
                    )
                if not with_grad:
                    captured[index] = output.detach().clone()  # later in-place ops must not change it
                    return None
                torch.set_grad_enabled(True)  # the head after the layer records a graph; the stem did not
                leaf = output.detach().requires_grad_()
                captured[index] = leaf
                return leaf.clone()  # an in-place op downstream (ReLU(inplace=True)) must not hit the leaf

            return hook

        with hooked(layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(self.layers)), torch.no_grad():
            output = self.model(points)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"the model must return a logits tensor [B, K], got {type(output).__name__}; explain a wrapper whose "
                "forward returns the logits alone (e.g. `return self.model(x)['logits']`)."
            )
        if any(a is None for a in captured):
            raise ValueError("the target layer did not run in the model's forward pass; pick a layer the model uses.")
        logits = output if output.ndim == 3 else output.unsqueeze(0)
        if logits.ndim != 3 or logits.shape[:2] != (len(self.layers), points.shape[0]):
            raise ValueError(
                f"the model must return logits of shape [B, K] (one row per image), got shape {tuple(output.shape)} "
                f"for {points.shape[0]} images. Wrap the model so that it returns class scores, e.g. squeeze an extra "
                "dimension."
            )
        return logits, captured  # type: ignore[return-value]

    def activations(self, points: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Layer outputs ``[M, S, D, h, w]`` and logits ``[M, S, K]`` of ``points``, without gradients."""
        outs = [self._forward(points[sl], with_grad=False) for sl in _chunks(points.shape[0], batch_size)]
        logits = torch.cat([o[0] for o in outs], dim=1)
        acts = torch.cat([torch.stack(o[1]) for o in outs], dim=1)
        return acts, logits.detach()

    def gradients(self, points: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Activations ``A``, gradients ``G = ∂y_c/∂A`` (both ``[M, S, D, h, w]``) and targets ``[S]``.

        ``targets=None`` differentiates each point's own argmax under the first head.
        """
        logits, leaves = self._forward(points, with_grad=True)
        if not logits.requires_grad:
            raise ValueError(
                "the model's output does not depend on the target layer with gradients: the layer comes after the "
                "head, or the forward runs the layer or what follows it under `torch.no_grad()`/`inference_mode` "
                "(a frozen backbone in a `with torch.no_grad():` block). Pick a layer before the head, or freeze "
                "with `requires_grad_(False)` instead."
            )
        c = resolve_targets(targets, logits[0])
        score = logits.gather(2, c.view(1, -1, 1).expand(logits.shape[0], -1, 1)).sum()
        grads = torch.autograd.grad(score, leaves, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(leaves, grads)]
        return torch.stack([a.detach() for a in leaves]), torch.stack(grads), c


@dataclass(frozen=True)
class _Path:
    """What one explainer asks of the engine for a batch of ``B`` images.

    Attributes:
        rows: Number of path points ``S`` over all images.
        points: Builds the input points of a slice of rows.
        targets: ``[S]`` class per point, or ``None`` for each point's own argmax (Grad-CAM).
        reduce: ``(A [M,s,D,h,w], G [M,s,D,h,w], rows) -> tuple of per-point tensors [M, s, ...]``.
        combine: ``(per-point tensors [M, S, ...], targets [S]) -> CAMResult``.
    """

    rows: int
    points: Callable[[slice], Tensor]
    targets: Tensor | None
    reduce: Callable[[Tensor, Tensor, slice], tuple[Tensor, ...]]
    combine: Callable[[tuple[Tensor, ...], Tensor], CAMResult]


@dataclass(frozen=True)
class CAMResult:
    """Output of :meth:`_CAM.explain` for ``M`` hooked heads and ``B`` images.

    Attributes:
        maps: Raw non-negative float32 maps ``[M, B, h, w]`` at layer resolution; a map that would hold a
            non-finite value (NaN weights, overflowing gradients) is all zeros, i.e. degenerate, never NaN.
        weights: Channel weights ``[M, B, D]`` where the method has one weight per channel, else ``None``.
        targets: The explained class of every image ``[B]``.
    """

    maps: Tensor
    weights: Tensor | None
    targets: Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "maps", zero_degenerate_stack(self.maps))


class _CAM:
    """Base of the CAM explainers: argument handling, the guard, the chunked engine loop.

    Subclasses implement :meth:`_path` only.
    """

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, batch_size: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if batch_size is not None:
            check_int(batch_size, "batch_size", why=" or None")
        self.model = model
        self.batch_size = batch_size
        self._layer_spec = target_layer
        self._layer_name: str | None = None
        if target_layer is not None:
            self._layer_name, _ = resolve_layer(model, target_layer)

    @property
    def target_layer(self) -> str | None:
        """Dotted name of the CAM layer (``None`` until detected on the first call when not given)."""
        return self._layer_name

    def layer(self, x: Tensor | None = None) -> nn.Module:
        """The CAM layer module, detected on ``x`` (inside the guard) when it was not given."""
        if self._layer_name is None:
            if x is None:
                raise ValueError("the target layer is detected on the first input; call the explainer first.")
            self._layer_name, _ = resolve_layer(self.model, None, x)
        return self.model.get_submodule(self._layer_name)

    def __call__(
        self,
        x: Tensor,
        targets: Targets = None,
        output_size: OutputSize = None,
        *,
        sample_ids: Tensor | None = None,
        stream: int = 0,
    ) -> Tensor:
        """Explain ``x``.

        Args:
            x: ``[B, C, H, W]`` images in model-input space (after normalisation).
            targets: ``LongTensor [B]``, an int, or ``None`` for the model's argmax.
            output_size: ``None`` (layer resolution), ``"input"`` or ``(H, W)``: bilinear upsampling.
            sample_ids: ``[B]`` ids of the images (e.g. probe indices) that seed stochastic draws, so that
                an image gets the same draws whatever batch it is in; default ``0..B-1``.
            stream: Independent replicate stream (1 gives the noise-floor replicate).

        Returns:
            Raw non-negative float32 maps ``[B, h, w]`` (or ``[B, H, W]`` when upsampled); a map that would
            hold a non-finite value (a model with NaN weights, overflowing gradients) is all zeros, i.e.
            degenerate, never NaN.
        """
        maps = self.explain(x, targets, sample_ids=sample_ids, stream=stream).maps[0]
        return upsample(maps, resolve_output_size(output_size, x))

    def explain(
        self, x: Tensor, targets: Targets = None, *, sample_ids: Tensor | None = None, stream: int = 0
    ) -> CAMResult:
        """Maps, channel weights and targets of ``x`` (see :meth:`__call__` for the arguments)."""
        check_images(x)
        with explanation_context(self.model):
            x = fresh_input(x, model_device(self.model))
            probe = _LayerProbe(self.model, [self.layer(x)])
            return self.run(probe, x, targets, sample_ids, stream)

    def run(
        self, probe: _LayerProbe, x: Tensor, targets: Targets, sample_ids: Tensor | None, stream: int
    ) -> CAMResult:
        """The engine loop on a prepared probe; the caller is inside the guard (GAD reuses it).

        Args:
            probe: The hooked model (one or several heads).
            x: Images on the model's device, made inside the guard.
            targets: As in :meth:`__call__`; with several heads, ``None`` means the first head's argmax.
            sample_ids: As in :meth:`__call__`.
            stream: As in :meth:`__call__`.
        """
        check_int(stream, "stream", minimum=0, why=" (0: the main draws, 1: the replicate)")
        ids = self._sample_ids(sample_ids, x)
        path = self._path(probe, x, targets, ids, stream)
        parts: list[tuple[Tensor, ...]] = []
        chosen: list[Tensor] = []
        for rows in _chunks(path.rows, self.batch_size):
            chunk_targets = None if path.targets is None else path.targets[rows]
            acts, grads, c = probe.gradients(path.points(rows), chunk_targets)
            parts.append(path.reduce(acts, grads, rows))
            chosen.append(c)
        terms = tuple(torch.cat(group, dim=1) for group in zip(*parts))
        return path.combine(terms, torch.cat(chosen))

    @staticmethod
    def _sample_ids(sample_ids: Tensor | None, x: Tensor) -> list[int]:
        if sample_ids is None:
            return list(range(x.shape[0]))
        ids = torch.as_tensor(sample_ids).flatten()
        if ids.numel() != x.shape[0] or ids.is_floating_point():
            raise ValueError(f"`sample_ids` must hold {x.shape[0]} integer ids (one per image), got {tuple(ids.shape)}.")
        return [int(i) for i in ids.tolist()]

    def _path(
        self, probe: _LayerProbe, x: Tensor, targets: Targets, sample_ids: list[int], stream: int
    ) -> _Path:
        raise NotImplementedError

    def rebind(self, model: nn.Module) -> _CAM:
        """The same explainer configuration on another model with the same layer names (GAD's supports)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.model = model
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_layer={self._layer_name!r}, batch_size={self.batch_size})"


class GradCAM(_CAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017): ``ReLU(Σ_k GAP(∂y_c/∂A_k) A_k)``.

    One forward pass per image (the clean pass is the gradient pass) and a backward through the head only.
    Equals Captum's ``LayerGradCam(..., relu_attributions=True)`` at layer resolution.

    Args:
        model: Any ``nn.Module`` returning logits ``[B, K]`` (a ``LightningModule`` works).
        target_layer: Dotted name, module, or ``None`` to detect the last spatial layer on the first call.
        batch_size: Most images pushed through the model at once (memory budget); ``None`` = all.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> cam = GradCAM(net, "layer4")
        >>> cam(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 2, 2])
    """

    def _path(self, probe: _LayerProbe, x: Tensor, targets: Targets, sample_ids: list[int], stream: int) -> _Path:
        chosen = targets_tensor(targets, x.shape[0], x.device)  # range checked per chunk on real logits

        def reduce(acts: Tensor, grads: Tensor, rows: slice) -> tuple[Tensor, ...]:
            weights = _gap(grads)
            return weights, _weighted_sum(weights, acts).relu()

        def combine(terms: tuple[Tensor, ...], c: Tensor) -> CAMResult:
            weights, maps = terms
            return CAMResult(maps=maps.float(), weights=weights.float(), targets=c)

        return _Path(rows=x.shape[0], points=lambda rows: x[rows], targets=chosen, reduce=reduce, combine=combine)


def _images_like(value: Tensor | None, x: Tensor, name: str) -> Tensor:
    """A baseline / reference broadcast to ``x``'s ``[B, C, H, W]``: zeros, ``[C,H,W]``, ``[1,...]`` or ``[B,...]``."""
    if value is None:
        return torch.zeros_like(x)
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be None or a tensor shaped like the input, got {type(value).__name__}.")
    value = value.detach().to(device=x.device, dtype=x.dtype)
    if value.ndim == 3:
        value = value.unsqueeze(0)
    if value.ndim != 4 or value.shape[1:] != x.shape[1:] or value.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"`{name}` must have shape [C, H, W], [1, C, H, W] or [B, C, H, W] matching the input "
            f"{tuple(x.shape)}, got {tuple(value.shape)}."
        )
    return value.expand_as(x)


def _clean_targets(probe: _LayerProbe, x: Tensor, targets: Targets, batch_size: int | None) -> tuple[Tensor, Tensor]:
    """Clean activations ``A(x)`` ``[M, B, D, h, w]`` and the explained classes ``[B]`` (first head's argmax)."""
    acts, logits = probe.activations(x, batch_size)
    return acts, resolve_targets(targets, logits[0])


class IntegratedGradCAM(_CAM):
    """Integrated Grad-CAM (Sattarzadeh et al., ICASSP 2021, arXiv 2102.07805).

    Straight path in input space from ``baseline`` to ``x`` with ``m = steps`` points
    ``x_j = x0 + α_j (x − x0)``, a ReLU'd Grad-CAM-like map per step, **summed** (no ``1/m``), as the
    official code and figure do:

    - ``mode="code"`` (the official runnable demo): left Riemann grid ``α_j = j/m, j = 0..m−1``; step map
      ``ReLU(Σ_k A_k(x_j) GAP(G_k(x_j)))``. It equals the sum of Grad-CAMs of the interpolants.
    - ``mode="figure"`` (the paper's architecture figure): right grid ``j = 1..m``; step map
      ``ReLU(Σ_k (A_k(x_j) − A_k(x0)) GAP(G_k(x_j)))``, one extra pass for ``x0``.

    The target class is the clean image's (argmax of ``f(x)`` unless given).

    Args:
        model: Any ``nn.Module`` returning logits ``[B, K]``.
        target_layer: Dotted name, module, or ``None`` to detect.
        steps: Number of path points ``m`` (official: 50).
        baseline: ``None`` (zeros in model-input space, i.e. the mean colour), or a tensor ``[C,H,W]`` /
            ``[1|B, C, H, W]``. Pass the normalised black image to match the paper's black baseline.
        mode: ``"code"`` or ``"figure"``.
        batch_size: Most path points per forward pass; results do not depend on it.

    Raises:
        TypeError: On a non-int ``steps``.
        ValueError: On ``steps < 1`` or an unknown ``mode``.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> IntegratedGradCAM(net, "layer4", steps=8)(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 2, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        steps: int = 50,
        baseline: Tensor | None = None,
        mode: Literal["code", "figure"] = "code",
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, target_layer, batch_size)
        check_int(steps, "steps")
        if mode not in ("code", "figure"):
            raise ValueError(f"`mode` must be 'code' (official implementation) or 'figure' (paper figure), got {mode!r}.")
        self.steps = steps
        self.baseline = baseline
        self.mode = mode

    def _path(self, probe: _LayerProbe, x: Tensor, targets: Targets, sample_ids: list[int], stream: int) -> _Path:
        batch, m = x.shape[0], self.steps
        x0 = _images_like(self.baseline, x, "baseline")
        _, c = _clean_targets(probe, x, targets, self.batch_size)
        first = 0 if self.mode == "code" else 1
        alphas = torch.arange(first, first + m, device=x.device, dtype=x.dtype) / m
        owner = torch.arange(batch, device=x.device).repeat_interleave(m)
        alpha = alphas.repeat(batch)
        base_acts = probe.activations(x0, self.batch_size)[0] if self.mode == "figure" else None

        def points(rows: slice) -> Tensor:
            b, a = owner[rows], alpha[rows].view(-1, 1, 1, 1)
            return x0[b] + a * (x[b] - x0[b])

        def reduce(acts: Tensor, grads: Tensor, rows: slice) -> tuple[Tensor, ...]:
            if base_acts is not None:
                acts = acts - base_acts[:, owner[rows]]
            return (_weighted_sum(_gap(grads), acts).relu(),)

        def combine(terms: tuple[Tensor, ...], _c: Tensor) -> CAMResult:
            (step_maps,) = terms
            maps = step_maps.unflatten(1, (batch, m)).sum(dim=2)
            return CAMResult(maps=maps.float(), weights=None, targets=c)

        return _Path(rows=batch * m, points=points, targets=c[owner], reduce=reduce, combine=combine)


class ExpectedGradCAM(_CAM):
    """Expected Grad-CAM (Buono et al., arXiv 2406.01274): CAM weights as the smoothed expectation of
    perturbed integrated gradients.

    **Reconstruction.** The paper's full text and code are not public. This follows its abstract ("the
    smoothed expectation of the perturbed integrated gradients", Expected Gradients + kernel smoothing) and
    the reference implementations of Expected Gradients (``attributionpriors``: one training reference and
    one ``β ~ U(0, 1)`` per sample) and of SmoothGrad (Gaussian input noise). Per image and sample ``n``:
    a reference ``x'_n`` drawn with replacement from ``references``, ``β_n ~ U(0, 1)``,
    ``ε_n ~ N(0, noise_std² I)``, path point ``x_t = x'_n + β_n (x + ε_n − x'_n)`` and
    ``G_n = ∂y_c/∂A`` there. Then

    - ``weights="integrated"`` (default): ``α_k = mean_n GAP((A_k(x) − A_k(x'_n)) ⊙ G_{n,k})``;
    - ``weights="gradient"``: ``α_k = mean_n GAP(G_{n,k})`` (expected gradients only);

    and the map is ``ReLU(Σ_k α_k A_k(x))`` on the clean activations. ``form="difference"`` instead returns
    ``ReLU(mean_n Σ_k (A_k(x) − A_k(x'_n)) GAP(G_{n,k}))``, the completeness-style analogue.

    Why the default matters: when everything after the layer is global pooling plus a linear classifier
    (ResNet ``layer4``), ``G`` is the same for every input, so every gradient-only variant equals Grad-CAM
    exactly; the integrated weights do not, and they are complete there:
    ``Σ_k α_k·h·w = y_c(x) − mean_n y_c(x'_n)``.

    Randomness comes only from a private ``torch.Generator`` re-seeded per ``(seed, sample_id, stream)``,
    so an image gets the same draws whatever batch it is in, and the bank's activations are computed once
    per call.

    Args:
        model: Any ``nn.Module`` returning logits ``[B, K]``.
        target_layer: Dotted name, module, or ``None`` to detect.
        references: ``[N_ref, C, H, W]`` reference images in model-input space (a bank of training images).
        n_samples: Path samples ``N`` per image.
        noise_std: Standard deviation of the input noise in model-input units (0 = pure expected gradients).
        batch_size: Most path points per forward pass; results do not depend on it.
        seed: Seed of the explainer's own generator.
        weights: ``"integrated"`` or ``"gradient"``.
        form: ``"weights"`` (default) or ``"difference"``.
        sampling: ``"iid"`` (default); ``"stratified"`` (β stratified over ``N`` equal bins, references
            cycled through a random permutation of the bank, antithetic noise pairs ``±ε``) for lower
            variance at equal ``N``; or ``"midpoint"`` (deterministic ``β_n = (n + ½)/N``, for verification).

    Raises:
        TypeError: On a non-int ``n_samples`` or ``seed``.
        ValueError: On an empty or mis-shaped bank, ``n_samples < 1``, ``noise_std < 0`` or unknown options.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> bank = torch.randn(8, 3, 64, 64)
        >>> egc = ExpectedGradCAM(net, "layer4", references=bank, n_samples=4)
        >>> egc(torch.randn(2, 3, 64, 64), output_size="input").shape
        torch.Size([2, 64, 64])
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        references: Tensor | None = None,
        n_samples: int = 50,
        noise_std: float = 0.15,
        batch_size: int | None = None,
        seed: int = 0,
        weights: Literal["integrated", "gradient"] = "integrated",
        form: Literal["weights", "difference"] = "weights",
        sampling: Literal["iid", "stratified", "midpoint"] = "iid",
    ) -> None:
        super().__init__(model, target_layer, batch_size)
        if not isinstance(references, Tensor) or references.ndim != 4 or references.shape[0] < 1:
            shape = tuple(references.shape) if isinstance(references, Tensor) else type(references).__name__
            raise ValueError(
                f"`references` must be a [N_ref, C, H, W] tensor of reference images (N_ref >= 1), got {shape}. "
                "Pass a bank of training images in model-input space."
            )
        check_int(n_samples, "n_samples")
        if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"`noise_std` must be a finite float >= 0, got {noise_std!r}.")
        for name, value, allowed in (
            ("weights", weights, ("integrated", "gradient")),
            ("form", form, ("weights", "difference")),
            ("sampling", sampling, ("iid", "stratified", "midpoint")),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        self.references = references.detach()
        self.n_samples = n_samples
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.weights = weights
        self.form = form
        self.sampling = sampling
        self._warned_constant_gradient = False

    def _draws(self, x: Tensor, sample_ids: list[int], stream: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Reference indices ``[B·N]``, betas ``[B·N]`` and noise ``[B·N, C, H, W]`` (or ``None``), drawn
        before chunking, one generator seed per image."""
        n, n_ref, device = self.n_samples, self.references.shape[0], x.device
        generator = torch.Generator(device=device)
        index, beta, noise = [], [], []
        for sample_id in sample_ids:
            generator.manual_seed(_item_seed(self.seed, sample_id, stream))
            if self.sampling == "stratified":
                index.append(torch.randperm(n_ref, generator=generator, device=device).repeat(math.ceil(n / n_ref))[:n])
                strata = torch.randperm(n, generator=generator, device=device)
                beta.append((strata + torch.rand(n, generator=generator, device=device)) / n)
            else:
                index.append(torch.randint(n_ref, (n,), generator=generator, device=device))
                if self.sampling == "midpoint":
                    beta.append((torch.arange(n, device=device) + 0.5) / n)
                else:
                    beta.append(torch.rand(n, generator=generator, device=device))
            if self.noise_std > 0:
                shape = ((n + 1) // 2 if self.sampling == "stratified" else n, *x.shape[1:])
                eps = torch.randn(shape, generator=generator, device=device, dtype=x.dtype) * self.noise_std
                noise.append(torch.cat([eps, -eps])[:n] if self.sampling == "stratified" else eps)
        return (
            torch.cat(index),
            torch.cat(beta).to(x.dtype),
            torch.cat(noise) if noise else None,
        )

    def _path(self, probe: _LayerProbe, x: Tensor, targets: Targets, sample_ids: list[int], stream: int) -> _Path:
        batch, n = x.shape[0], self.n_samples
        bank = self.references.to(device=x.device, dtype=x.dtype)
        if bank.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"`references` have image shape {tuple(bank.shape[1:])} but the input has {tuple(x.shape[1:])}."
            )
        clean_acts, c = _clean_targets(probe, x, targets, self.batch_size)
        bank_acts = probe.activations(bank, self.batch_size)[0]  # once per call, not once per sample
        index, beta, noise = self._draws(x, sample_ids, stream)
        owner = torch.arange(batch, device=x.device).repeat_interleave(n)

        def points(rows: slice) -> Tensor:
            ref, b = bank[index[rows]], owner[rows]
            end = x[b] if noise is None else x[b] + noise[rows]
            return ref + beta[rows].view(-1, 1, 1, 1) * (end - ref)

        def reduce(acts: Tensor, grads: Tensor, rows: slice) -> tuple[Tensor, ...]:
            pooled = _gap(grads)
            if self.form == "difference":
                delta = clean_acts[:, owner[rows]] - bank_acts[:, index[rows]]
                return (_weighted_sum(pooled, delta),)
            if self.weights == "gradient":
                return (pooled,)
            return (_gap((clean_acts[:, owner[rows]] - bank_acts[:, index[rows]]) * grads),)

        def combine(terms: tuple[Tensor, ...], _c: Tensor) -> CAMResult:
            (per_point,) = terms
            per_point = per_point.unflatten(1, (batch, n))
            if self.form == "difference":
                return CAMResult(maps=per_point.mean(dim=2).relu().float(), weights=None, targets=c)
            if self.weights == "gradient":
                self._note_constant_gradient(per_point)
            weights = per_point.mean(dim=2)
            maps = _weighted_sum(weights, clean_acts).relu()
            return CAMResult(maps=maps.float(), weights=weights.float(), targets=c)

        return _Path(rows=batch * n, points=points, targets=c[owner], reduce=reduce, combine=combine)

    def _note_constant_gradient(self, pooled: Tensor) -> None:
        """Warn once when every path point of an image has the same pooled gradient (a GAP + linear head)."""
        if self._warned_constant_gradient or pooled.shape[2] < 2:
            return
        spread = (pooled - pooled[:, :, :1]).abs().amax()
        if spread <= 1e-6 * pooled.abs().amax().clamp_min(1e-12):
            self._warned_constant_gradient = True
            warnings.warn(
                f"the layer gradient at `{self._layer_name}` is the same at every path point (a global-pooling + "
                "linear head follows the layer, or the references equal the input), so weights='gradient' equals "
                "Grad-CAM exactly; use weights='integrated'.",
                stacklevel=6,
            )
