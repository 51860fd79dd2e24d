"""GAD (Gradient Artificial Distancing; Rodrigues, Boutry, Najman 2024, arXiv 2401.14434).

GAD makes a gradient explanation concise. It trains ``k`` *support* regression models to mimic the
classifier ``f`` with every sample's class margin widened by ``α_i`` (*distanced targets*), explains
``f`` and every support with the same base method, keeps only the evidence present in all ``k + 1`` maps
and returns the original map inside that mask. The paper's text and code are not public; this follows
the reconstruction in ALGORITHMS.md §3:

- targets ``z̃_j = z_j − α_i·1[j ≠ ŷ]`` with ``ŷ = argmax f(x)`` (per-sample one-vs-rest, so the same
  ``k`` supports serve every class), ``α_i = λ_i·s`` and ``s`` the median margin of the fit set, floored;
- supports start from ``f``, are trained with MSE and Adam in eval mode;
- ``B_i = A_i ≥ τ·max A_i`` per map, ``B = ∧_i B_i``, ``GAD(x) = A_0 ⊙ B``.

**Shared trunk** (default, the cheap in-training variant of ALGORITHMS.md §3.4). The model is cut at a
*split* module: every module that completes before the split (and the split itself) is the frozen trunk,
shared by all models and run once per input point; everything that runs after it is the *tail*, copied
per support and trained on cached trunk activations. The head of each model is a structural copy of the
user's model in which the trunk modules are swapped for pass-throughs and the split for a module that
returns the cached trunk output; copy 0 shares every tensor with the original, so it *is* the original's
tail. This needs a self-contained tail: nothing after the split may read a trunk value other than the
split's output (true for ``nn.Sequential`` stages, ResNets, VGGs). :meth:`GAD.fit` checks that copy 0
reproduces the original logits on the first (at most 64) fit items and raises otherwise; then pass another ``split`` or
``shared_trunk=False``.

Automatic split: when the head after the CAM layer is non-linear, the split is the CAM layer itself and
only the head is copied. When supports trained there would collapse to one map (ALGORITHMS.md §3.4's
degenerate family) the split moves before the CAM layer: to the module that precedes the last parametrised
module of the CAM layer inside the nearest ``nn.Sequential`` (ResNet ``layer4`` → split ``layer4.0``, tail
``layer4.1`` + ``fc``). They collapse when the gradient at the CAM layer is the same for every input
(global pooling + a linear classifier) and also when the logits are affine in every parameter after the
CAM layer (a functional ``F.relu`` before pooling and a linear classifier, DenseNet's spelling). When no
module runs before the CAM layer to split at, the split stays at the layer with a warning.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xcam._checks import Targets, check_images, check_int
from lightning_xcam.maps import OutputSize, degenerate, resolve_output_size, upsample, zero_degenerate_stack
from lightning_xcam.methods._guard import explanation_context, fresh_input, hooked
from lightning_xcam.methods.cam import (
    ExpectedGradCAM,
    GradCAM,
    IntegratedGradCAM,
    _CAM,
    _LayerProbe,
    model_device,
)
from lightning_xcam.methods.input_gradients import INPUT_GRADIENT_METHODS, InputGradients
from lightning_xcam.methods.layers import LayerSpec, resolve_layer

__all__ = ["GAD", "GADResult"]

_CAM_BASES: dict[str, type[_CAM]] = {
    "gradcam": GradCAM,
    "expected_gradcam": ExpectedGradCAM,
    "integrated_gradcam": IntegratedGradCAM,
}
_DEFAULT_BANK = 64  # reference images taken from the fit set when an Expected Grad-CAM base has none


@dataclass(frozen=True)
class GADResult:
    """Output of :meth:`GAD.explain` for ``B`` images and ``M = 1 + active supports`` models.

    Attributes:
        maps: GAD maps ``[B, h, w]``: the original model's base map inside the fused mask.
        base_maps: The base maps of every model before fusion ``[M, B, h, w]`` (index 0: the original).
            In both, a map that would hold a non-finite value is all zeros (degenerate), never NaN.
        mask: The fused mask ``[B, h, w]`` (bool).
        targets: The explained class of every image ``[B]``.
    """

    maps: Tensor
    base_maps: Tensor
    mask: Tensor
    targets: Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "maps", zero_degenerate_stack(self.maps))
        object.__setattr__(self, "base_maps", zero_degenerate_stack(self.base_maps))


# --------------------------------------------------------------------------- the split and the heads


class _TrunkDone(BaseException):
    """Stops the user's forward at the split. A BaseException, so a broad ``except Exception`` in a
    user's forward cannot swallow it."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


class _Feed:
    """The trunk output handed to the heads' :class:`_Inject` module for one forward pass.

    ``copy``: whether each head gets its own copy. Needed only when the tail writes into its input in
    place (one head would corrupt the next head's input); :meth:`GAD.fit` measures it once per model.
    """

    value: Tensor | None = None
    copy: bool = True


class _PassThrough(nn.Module):
    """Stands in for a trunk module inside a head: returns its first input, computes nothing."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else None


class _Inject(nn.Module):
    """Stands in for the split module inside a head: returns (a copy of) the current trunk output."""

    def __init__(self, feed: _Feed) -> None:
        super().__init__()
        self.feed = feed

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.feed.value is None:
            raise RuntimeError("a GAD head ran without a trunk output; run it through the GAD ensemble.")
        return self.feed.value.clone() if self.feed.copy else self.feed.value


@dataclass(frozen=True)
class _Plan:
    """Where the model is cut.

    Attributes:
        split: Dotted name of the last trunk module, or ``None`` for full copies (nothing shared).
        trunk: Outermost modules that run only before the split ends (the split last); swapped in heads.
        tail_params: Names of the parameters the supports train.
        cut: The tail's last convolution when the supports train only what runs after it (its output is
            then the same for every support and every step, so a fit caches it once); else ``None``.
        cut_trunk: Outermost tail modules that finish by the end of ``cut`` (``cut`` last); swapped in the
            fit views of the heads.
    """

    split: str | None
    trunk: tuple[str, ...]
    tail_params: tuple[str, ...]
    cut: str | None = None
    cut_trunk: tuple[str, ...] = ()


def _is_within(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _execution(model: nn.Module, x: Tensor) -> dict[str, list[tuple[int, int]]]:
    """``(start, end)`` ticks of every call of every module in one forward pass of ``x[:1]``."""
    clock = [0]
    starts: dict[str, list[int]] = {}
    calls: dict[str, list[tuple[int, int]]] = {}

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    def begin(name: str) -> None:
        starts.setdefault(name, []).append(tick())

    def end(name: str) -> None:
        calls.setdefault(name, []).append((starts[name].pop(), tick()))

    with hooked(
        handle
        for name, module in model.named_modules()
        for handle in (module.register_forward_pre_hook(lambda *_a, n=name: begin(n)),
                       module.register_forward_hook(lambda *_a, n=name: end(n)))
    ), torch.no_grad():
        model(x[:1])
    return calls


def _auto_split(model: nn.Module, calls: dict[str, list[tuple[int, int]]], layer: str, linear_tail: bool) -> str:
    """The default split (see the module docstring)."""
    if not linear_tail:
        return layer
    layer_end = calls[layer][-1][1]
    owners = [
        name
        for name, module in model.named_modules()
        if name in calls and any(True for _ in module.parameters(recurse=False)) and calls[name][-1][1] <= layer_end
    ]
    last = max(owners, key=lambda n: calls[n][-1][1]) if owners else ""
    fallback: str | None = None
    node = last
    while node:
        parent_name = node.rsplit(".", 1)[0] if "." in node else ""
        parent = model.get_submodule(parent_name)
        begin = calls[node][0][0]
        before = [
            f"{parent_name}.{child}" if parent_name else child
            for child, _ in parent.named_children()
        ]
        before = [n for n in before if n in calls and calls[n][-1][1] < begin]
        if before:
            candidate = max(before, key=lambda n: calls[n][-1][1])
            # a cut inside a block of the CAM layer (a ResNet BasicBlock, its downsample branch) leaves the
            # residual sum reading a trunk value: inside the CAM layer only its own children are cuts
            if _outside_blocks_of(layer, candidate):
                if isinstance(parent, nn.Sequential):
                    return candidate
                fallback = fallback or candidate
        node = parent_name
    if fallback is None:
        warnings.warn(
            f"GAD: the head after the CAM layer `{layer}` is affine in its parameters, so supports trained there "
            "differ by one map only (ALGORITHMS.md §3.4: every support explains like ReLU(M_0 + λ·D)), and no "
            "module runs before the CAM layer to split at instead; the split stays at the CAM layer and GAD's maps "
            "will stay close to its base method's. A CAM layer with a stage before it (or `split=` a module before "
            "it) gives the supports something to learn.",
            stacklevel=4,
        )
        return layer
    return fallback


def _params_after(model: nn.Module, calls: dict[str, list[tuple[int, int]]], layer: str) -> list[str]:
    """Names of the parameters whose modules run only after the CAM layer's last call ends."""
    layer_end = calls[layer][-1][1]
    return [
        name
        for name, _ in model.named_parameters()
        if (owner := name.rpartition(".")[0]) in calls and all(start > layer_end for start, _ in calls[owner])
    ]


def _affine_in(model: nn.Module, x: Tensor, names: Sequence[str]) -> bool:
    """Whether the logits on ``x`` are affine in the parameters ``names`` (all others fixed).

    A second difference along a random direction ``d``: ``y(θ + d) + y(θ − d) − 2·y(θ)`` vanishes up to
    rounding for an affine map, and is of the order of the first difference ``y(θ + d) − y(θ − d)``
    otherwise, since ``d`` is as large as the parameters themselves (ReLU patterns change, products of
    parameters move).
    """
    if not names:
        return False
    params = dict(model.named_parameters())

    def moved(sign: float) -> Tensor:
        # the direction is drawn again for each sign (same seed) so that only one moved copy is held at a time
        generator = torch.Generator().manual_seed(0)
        values = {}
        for name in names:
            param = params[name].detach()
            noise = torch.randn(param.shape, generator=generator).to(param)
            values[name] = param + sign * noise * param.float().pow(2).mean().sqrt().clamp_min(1e-3).to(param)
        return torch.func.functional_call(model, values, (x,)).float()

    with torch.no_grad():
        plain = model(x).float()
        ahead, behind = moved(1.0), moved(-1.0)
    curvature = (ahead + behind - 2 * plain).abs().amax()
    slope = (ahead - behind).abs().amax()
    # Rounding leaves a relative curvature below ~3e-3 even in bfloat16 and TF32 matmuls; non-linear heads
    # (BatchNorm1d or LayerNorm + Linear, an MLP with every ReLU active) give 0.2 and more.
    return bool(slope > 0 and curvature <= 1e-2 * (slope + plain.abs().amax()))


def _outside_blocks_of(layer: str, name: str) -> bool:
    """Whether module ``name`` is outside ``layer`` or one of its direct children."""
    if not name.startswith(f"{layer}."):
        return True
    return "." not in name[len(layer) + 1 :]


def _plan(model: nn.Module, calls: dict[str, list[tuple[int, int]]], split: str, layer: str) -> _Plan:
    """Classify modules into trunk and tail around ``split`` and check the CAM layer is in the tail."""
    if split not in calls:
        raise ValueError(f"`split={split!r}` did not run in the model's forward pass; name a module the model calls.")
    if len(calls[split]) != 1:
        raise ValueError(f"`split={split!r}` runs {len(calls[split])} times per forward pass; pick a module used once.")
    split_end = calls[split][0][1]
    trunk: set[str] = set()
    tail: set[str] = set()
    for name, spans in calls.items():
        if _is_within(split, name) and name != split:
            continue  # containers of the split run on both sides; their glue code runs in every head
        if all(end <= split_end for _, end in spans):
            trunk.add(name)
        elif all(start > split_end for start, _ in spans):
            tail.add(name)
        elif any(True for _ in model.get_submodule(name).parameters()):
            raise ValueError(
                f"the module `{name}` runs both before and after `split={split!r}` and has parameters, so the trunk "
                "and the tail would share weights; pass another `split` or use `shared_trunk=False`."
            )
    if layer in trunk and layer != split:
        raise ValueError(
            f"the CAM layer `{layer}` runs before `split={split!r}` ends; the split must be the CAM layer or come "
            "before it."
        )
    if layer not in tail and not _is_within(split, layer):
        raise ValueError(f"the CAM layer `{layer}` does not run after `split={split!r}`; pick an earlier split.")
    outer = sorted(
        (n for n in trunk if (n.rsplit(".", 1)[0] if "." in n else "") not in trunk),
        key=lambda n: calls[n][0][1],
    )
    frozen = {id(p) for n in trunk for p in model.get_submodule(n).parameters()}
    tail_params = []
    for pname, param in model.named_parameters():
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        if owner in tail and id(param) not in frozen:
            tail_params.append(pname)
    if not tail_params:
        raise ValueError(f"nothing trainable runs after `split={split!r}`; pick an earlier split.")
    return _Plan(split=split, trunk=tuple(outer), tail_params=tuple(tail_params))


def _light_plan(model: nn.Module, calls: dict[str, list[tuple[int, int]]], plan: _Plan, layer: str) -> _Plan:
    """``plan`` with the supports training only the tail's parameters after its last convolution.

    Returns ``plan`` unchanged when the tail has no convolution, when a cut at it is not a clean stage
    (:func:`_plan` refuses it), or when nothing trained after it runs before the CAM layer ends although
    the split lies before the CAM layer: a support that only re-weights a linear head gives the degenerate
    family of ALGORITHMS.md §3.4.
    """
    assert plan.split is not None
    split_end = calls[plan.split][0][1]
    convs = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd) and len(calls.get(name, ())) == 1 and calls[name][0][0] > split_end
    ]
    if not convs:
        return plan
    cut = max(convs, key=lambda n: calls[n][0][1])
    try:
        after = _plan(model, calls, cut, layer)
    except ValueError:
        return plan
    trained = tuple(n for n in plan.tail_params if n in set(after.tail_params))
    layer_end = calls[layer][-1][1]
    owners = {n.rpartition(".")[0] for n in trained}
    shapes_layer = any(calls[o][-1][1] <= layer_end for o in owners if o in calls)
    if not trained or (plan.split != layer and not shapes_layer):
        return plan
    cut_trunk = tuple(n for n in after.trunk if calls[n][0][0] > split_end)
    return _Plan(split=plan.split, trunk=plan.trunk, tail_params=trained, cut=cut, cut_trunk=cut_trunk)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, module)


def _head(model: nn.Module, plan: _Plan, feed: _Feed, trainable: bool) -> nn.Module:
    """A copy of ``model`` as a head: trunk modules swapped, every tensor shared except (if ``trainable``)
    the tail parameters, which are fresh copies of the current values. The copy keeps the modules' hooks:
    a hook may be part of the computation (a temperature, a mask), so it runs on every support too."""
    own = set(plan.tail_params) if trainable else set()
    memo: dict[int, Any] = {id(p): p for n, p in model.named_parameters() if n not in own}
    memo.update({id(b): b for b in model.buffers()})
    head = copy.deepcopy(model, memo)
    for name in plan.trunk:
        _set_module(head, name, _Inject(feed) if name == plan.split else _PassThrough())
    for name, param in head.named_parameters():
        param.requires_grad_(name in own and trainable)
    return head


class _AffineNorm(nn.Module):
    """An eval-mode batch norm written as its per-channel affine map, on the same parameter and
    statistics tensors (so their names do not change). Same values; its backward is a few element-wise
    operations, where the native batch-norm backward dominated a fit step on cached activations."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.register_buffer("running_mean", norm.running_mean)
        self.register_buffer("running_var", norm.running_var)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        out = (x - self.running_mean.view(shape)) * scale.view(shape)
        return out if self.bias is None else out + self.bias.view(shape)


def _fit_view(head: nn.Module, plan: _Plan, cut_feed: _Feed) -> nn.Module:
    """``head`` with the frozen tail modules up to ``plan.cut`` skipped and the cut's output injected from
    ``cut_feed``: what a fit step runs (in eval mode, where batch norms with running statistics become
    :class:`_AffineNorm`). Shares every tensor and the trunk feed with ``head``, so training the view
    trains the head."""
    memo: dict[int, Any] = {id(t): t for t in (*head.parameters(), *head.buffers())}
    memo.update({id(m.feed): m.feed for m in head.modules() if isinstance(m, _Inject)})
    view = copy.deepcopy(head, memo)
    for name in plan.cut_trunk:
        _set_module(view, name, _Inject(cut_feed) if name == plan.cut else _PassThrough())
    for name, module in list(view.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            _set_module(view, name, _AffineNorm(module))
    return view


class _SharedActivations(_LayerProbe):
    """The engine's probe for an ensemble whose CAM layer *is* the split: every head's CAM activation is
    the same trunk output, so the activations are returned once (``[1, S, D, h, w]``; the engine's
    reductions broadcast them over the ``M`` heads) instead of ``M`` identical copies, which would make
    the reductions ``M`` times dearer. Each head keeps its own gradient leaf."""

    def activations(self, points: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        acts, logits = super().activations(points, batch_size)
        return acts[:1], logits

    def gradients(self, points: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        acts, grads, c = super().gradients(points, targets)
        return acts[:1], grads, c


class _Ensemble(nn.Module):
    """The original model and its supports on one trunk: logits ``[M, S, K]`` (see :class:`~lightning_xcam.
    methods.input_gradients.Heads`). Built and used only inside :func:`explanation_context`."""

    def __init__(
        self, model: nn.Module, plan: _Plan, heads: Sequence[nn.Module], feed: _Feed, cut_feed: _Feed | None = None
    ) -> None:
        super().__init__()
        self._model = [model]  # a list, so the user's model is not registered as a submodule
        self.plan = plan
        self.members = list(heads)
        self.feed = feed
        self.cut_feed = cut_feed

    @property
    def size(self) -> int:
        return len(self.members)

    def modules(self) -> list[nn.Module]:  # type: ignore[override]
        return [self._model[0], *self.members]

    def trunk(self, x: Tensor) -> Tensor:
        """The split output of ``x`` (``x`` itself for full copies); only the trunk runs."""
        if self.plan.split is None:
            return x

        def stop(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            raise _TrunkDone(output)

        with hooked([self._model[0].get_submodule(self.plan.split).register_forward_hook(stop)]):
            try:
                self._model[0](x)
            except _TrunkDone as done:
                return done.output
        raise RuntimeError(f"the split `{self.plan.split}` did not run in the model's forward pass.")

    def heads(
        self, x: Tensor, feeds: Sequence[Tensor], members: Sequence[nn.Module] | None = None, cut: Tensor | None = None
    ) -> Tensor:
        """Logits ``[M, S, K]`` of each head on its trunk output ``feeds[m]`` (fit views: and on the cut's
        output ``cut``, the same for every head)."""
        members = self.members if members is None else members
        if self.plan.split is None:
            return torch.stack([head(f) for head, f in zip(members, feeds)])
        outs = []
        if cut is not None:
            assert self.cut_feed is not None
            self.cut_feed.value = cut
        try:
            for head, f in zip(members, feeds):
                self.feed.value = f
                outs.append(head(x))
        finally:
            self.feed.value = None
            if self.cut_feed is not None:
                self.cut_feed.value = None
        return torch.stack(outs)

    def forward(self, x: Tensor) -> Tensor:
        shared = self.trunk(x)
        return self.heads(x, [shared] * self.size)


# --------------------------------------------------------------------------- fusion and diagnostics


def _masks(maps: Tensor, tau: float) -> Tensor:
    """``A ≥ τ·max A`` per map (``[..., h, w]``); a degenerate map gives an empty mask."""
    flat = maps.flatten(-2)
    peak = flat.amax(dim=-1, keepdim=True)
    bad = degenerate(flat.reshape(-1, flat.shape[-1])).view(peak.shape)
    return ((flat >= tau * peak) & ~bad).view_as(maps)


def _hull_fraction(mask: Tensor) -> Tensor:
    """Area of the convex hull of the cell centres in each mask over ``h·w`` (``[B]``); 0 for fewer than
    three non-collinear cells. Only each row's extreme cells can be hull vertices, so at most ``2h``
    points per map reach the (per-map, diagnostics-only) monotone-chain loop."""
    batch, h, w = mask.shape
    cols = torch.arange(w, device=mask.device).expand(batch, h, w)
    left = torch.where(mask, cols, w).amin(dim=-1).cpu()
    right = torch.where(mask, cols, -1).amax(dim=-1).cpu()
    areas = []
    for b in range(batch):
        rows = (right[b] >= 0).nonzero().flatten().tolist()
        points = sorted({(float(r), float(left[b, r])) for r in rows} | {(float(r), float(right[b, r])) for r in rows})
        areas.append(_polygon_area(_monotone_chain(points)) / (h * w))
    return torch.tensor(areas, dtype=torch.float32)


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _monotone_chain(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) < 3:
        return points
    lower: list[tuple[float, float]] = []
    upper: list[tuple[float, float]] = []
    for p in points:
        while len(lower) >= 2 and _cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(points):
        while len(upper) >= 2 and _cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def _polygon_area(vertices: list[tuple[float, float]]) -> float:
    if len(vertices) < 3:
        return 0.0
    twice = sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(vertices, vertices[1:] + vertices[:1]))
    return abs(twice) / 2


def _same_logits(replay: Tensor, logits: Tensor) -> bool:
    """Whether replayed logits equal the model's up to float error (relative to the logits' scale)."""
    tolerance = 1e-5 * max(1.0, float(logits.abs().max()))
    return replay.shape == logits.shape and torch.allclose(replay, logits, rtol=1e-5, atol=tolerance)


def _r2(pred: Tensor, target: Tensor, centered: bool = False, shift: Tensor | None = None) -> Tensor:
    """Multi-output R² per model: ``1 − Σ(pred − target)² / Σ(target − column mean)²`` over the last two
    dimensions of ``[M, N, K]`` inputs (``[M]``). ``centered``: the R² ``pred`` would have after adding its
    least-squares constant offset (the mean residual of each output).

    With ``shift`` (the requested change ``target − original``, exact): the share of that change ``pred``
    has made, ``1 − Σ(pred − target)² / Σ shift²`` (the shift column-centred when ``centered``, its constant
    part being free then). 0 for a support that still equals the original, whatever the logits' spread;
    1 where nothing is left to learn (a shift that is constant per output when ``centered``)."""
    error = pred - target
    if centered:
        error = error - error.mean(dim=-2, keepdim=True)
    residual = error.pow(2).sum(dim=(-2, -1))
    if shift is None:
        return 1 - residual / (target - target.mean(dim=-2, keepdim=True)).pow(2).sum(dim=(-2, -1)).clamp_min(1e-12)
    if centered:
        shift = shift - shift.mean(dim=-2, keepdim=True)
    total = shift.pow(2).sum(dim=(-2, -1))
    return torch.where(total > 0, 1 - residual / total.clamp_min(1e-12), torch.ones_like(total))


def _output_bias(model: nn.Module, x: Tensor, candidates: Sequence[str]) -> str | None:
    """Name of the bias among ``candidates`` that is added last to the logits: the bias of an ``nn.Linear``
    whose output tensor *is* the model's output. ``None`` when the logits come from anything else."""
    owners = {name.rpartition(".")[0]: name for name in candidates if name.rpartition(".")[2] == "bias"}
    outputs: dict[str, Tensor] = {}
    with hooked(
        module.register_forward_hook(lambda _m, _i, out, n=name: outputs.__setitem__(n, out))
        for name, module in model.named_modules()
        if name in owners and isinstance(module, nn.Linear)
    ), torch.no_grad():
        logits = model(x[:1])
    return next((owners[name] for name, out in outputs.items() if out is logits), None)


# --------------------------------------------------------------------------- GAD

_CHUNK = 256  # items per no-grad pass over the fit set (memory budget only; results do not depend on it)


@dataclass
class _Support:
    """One support model: its ``λ``, its head and its parameter offsets from the original (warm start)."""

    lam: float
    head: nn.Module | None = None
    delta: dict[str, Tensor] | None = None
    active: bool = False
    fit_r2: float = float("nan")
    shift_r2: float = float("nan")
    agreement: float = float("nan")
    refit: bool = False
    steps: int = 0
    moments: dict[str, dict[str, Any]] | None = None
    view: nn.Module | None = None  # the head as a fit step runs it (``_fit_view``), when the plan has a cut


class GAD:
    """Gradient Artificial Distancing over any base attribution (see the module docstring).

    **Fitting** (:meth:`fit`). One no-grad pass of the model over the fit set gives the logits and caches
    the trunk output at the split; every step after that runs only the support tails, full-batch on the
    cached outputs by default. With ``trainable="after_last_conv"`` (default) the supports train only the
    tail's parameters after its last convolution (ResNet ``layer4``: ``layer4.1.bn2`` and ``fc``; the
    convolutions stay shared), so that convolution's output is cached too and a step costs a few
    element-wise operations instead of a forward and backward pass through the tail's convolutions; the
    maps still differ in space, because the trained normalisation sets which cells of each channel pass
    the block's final ReLU. Each support starts from the original's current tail plus its offset from
    the previous fit (warm start; zero on the first fit). Adam steps follow until every support reaches
    ``r2_target`` and has made ``shift_target`` of its requested shift (checked before each step, so a fit
    whose supports still fit takes no step at all) or the budget runs out (``steps`` on the first fit,
    ``warm_steps`` after). When the logits come straight out of an ``nn.Linear`` with a bias, every fit
    ends by adding the least-squares output offset to that bias (a constant added to the logits changes
    no gradient, so this exact step costs nothing in the maps and fixes the constant part of the shift and
    of any staleness at once). A warm support still below ``r2_threshold`` is reset to the
    original's tail and refit with the ``steps`` budget; a support that ends below it is excluded with a
    warning and starts cold at the next fit.

    **Excluded supports.** The fusion runs over the original and the *active* supports only. When every
    support is excluded the fused mask is the original's own ``τ``-mask, so the GAD map is the base map
    thresholded at ``τ·max`` (``diagnostics["fallback"]`` is ``True``); it is never undefined.

    Args:
        model: The classifier ``f`` (any ``nn.Module`` returning logits ``[B, K]``; a LightningModule works).
        target_layer: The CAM layer (dotted name or module; ``None`` detects it at the first :meth:`fit`).
            Input-gradient bases use it only to place the automatic split.
        base: ``"gradcam"``, ``"expected_gradcam"``, ``"integrated_gradcam"``, one of ``"saliency"``,
            ``"input_x_gradient"``, ``"integrated_gradients"``, ``"guided_backprop"``, ``"deconvolution"``,
            or a CAM explainer instance on ``model`` (its configuration is used for every model).
        lambdas: Margin multipliers ``λ_i``, one support model each; ``α_i = λ_i·s``.
        tau: Mask threshold as a fraction of each map's maximum, in ``(0, 1]``.
        base_kwargs: Keyword arguments of the base explainer built from a string (e.g. ``n_samples``,
            ``noise_std``, ``references`` for Expected Grad-CAM; ``steps``, ``baseline`` for integrated
            gradients). An Expected Grad-CAM base without ``references`` uses up to 64 evenly spaced images
            of the first fit set as its bank.
        split: Dotted name of the last shared (frozen) module; the tail is every module that runs after
            it. ``None`` chooses automatically (module docstring).
        shared_trunk: ``False`` trains full copies of the model (every parameter; for offline use).
        trainable: ``"after_last_conv"`` (default): the supports train the tail's parameters that run after
            its last convolution, when those shape the CAM activations (otherwise, or without a
            convolution in the tail, every tail parameter); ``"tail"``: every tail parameter. [project]
        steps: Most Adam steps of a cold fit (first fit, or a support reset after a bad fit).
        warm_steps: Most Adam steps of a warm fit (later fits start from the previous supports' offsets).
        fit_batch_size: Minibatch size of the support fit; ``None`` (default) trains full-batch on the
            whole cached fit set, which also makes the early-stopping check exact.
        lr: Adam learning rate of the ``λ = 1`` support; support ``i`` uses ``lr·λ_i`` (the parameter change
            it needs grows with its shift).
        r2_threshold: A support whose fit R² ends below this is excluded (with a warning); ``-inf`` keeps
            every support whose R² is a number (a diverged fit, R² NaN, is always excluded).
        r2_target: A fit stops as soon as every support it trains reaches this R² (``inf``: never early)
            and ``shift_target``.
        shift_target: ...and has made this share of its requested shift ``−α_i·1[j ≠ ŷ]``
            (``diagnostics["shift_r2"]``). Needed because the R² counts the logits' own spread: when ``α``
            is small next to it, an unchanged copy of the original already scores R² ≥ 0.95, and its map is
            the original's. On a CNN trained on digits, 300 steps make 0.75–0.8 of the shift. A fit whose
            budget runs out first keeps its support (only ``r2_threshold`` excludes); read ``shift_r2``.
        min_margin: Floor of the median margin ``s`` in logits. The default 0 keeps ``α`` proportional to
            the model's own margins, so GAD does not depend on the logit scale and a barely trained model
            (margins of 0.01 logit) gets shifts it can fit; a floor of 1 asks such a model for shifts a
            hundred times its margins, which no tail fits.
        seed: Seed of the minibatch order (a private generator).

    Raises:
        TypeError: For a wrong ``model`` or ``base`` type.
        ValueError: For bad values (empty ``lambdas``, ``tau`` outside ``(0, 1]``, unknown base, a base
            explainer bound to another model or layer, non-positive step counts).

    Example:
        >>> from lightning_xcam.demos import SmallCNN
        >>> net = SmallCNN().eval()  # untrained here, so keep every support whatever its fit
        >>> gad = GAD(net, "features", base="gradcam", steps=5, r2_threshold=float("-inf"))
        >>> gad.fit(torch.randn(32, 1, 16, 16))
        >>> gad(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 4, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        base: str | _CAM = "expected_gradcam",
        lambdas: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
        tau: float = 0.1,
        *,
        base_kwargs: dict[str, Any] | None = None,
        split: str | None = None,
        shared_trunk: bool = True,
        trainable: Literal["after_last_conv", "tail"] = "after_last_conv",
        steps: int = 300,
        warm_steps: int = 30,
        fit_batch_size: int | None = None,
        lr: float = 1e-2,
        r2_threshold: float = 0.9,
        r2_target: float = 0.95,
        shift_target: float = 0.5,
        min_margin: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        try:  # any sequence of reals: a tuple, a range, a NumPy array
            items = [] if isinstance(lambdas, str) else list(lambdas)
        except TypeError:
            items = []
        values = tuple(float(v) for v in items if not isinstance(v, bool) and isinstance(v, numbers.Real))
        if not values or len(values) != len(items) or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"`lambdas` must be a non-empty sequence of positive numbers, got {lambdas!r}.")
        lambdas = values
        if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and 0 < tau <= 1):
            raise ValueError(f"`tau` must lie in (0, 1], got {tau!r}.")
        if not isinstance(shared_trunk, bool):
            raise TypeError(f"`shared_trunk` must be True or False, got {shared_trunk!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        for name, value, least in (("steps", steps, 1), ("warm_steps", warm_steps, 0), ("fit_batch_size", fit_batch_size, 1)):
            if value is None and name == "fit_batch_size":
                continue
            check_int(value, name, minimum=least)
        for name, value in (("lr", lr), ("min_margin", min_margin)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        for name, value in (("r2_threshold", r2_threshold), ("r2_target", r2_target), ("shift_target", shift_target)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"`{name}` must be a number (±inf allowed), got {value!r}.")
        if split is not None and not isinstance(split, str):
            raise TypeError(f"`split` must be a dotted module name or None, got {type(split).__name__}.")
        if trainable not in ("after_last_conv", "tail"):
            raise ValueError(f"`trainable` must be 'after_last_conv' or 'tail', got {trainable!r}.")
        self.model = model
        self.lambdas = lambdas
        self.tau = float(tau)
        self.shared_trunk = bool(shared_trunk)
        self.trainable = trainable
        self.steps, self.warm_steps, self.fit_batch_size = steps, warm_steps, fit_batch_size
        self.lr, self.min_margin, self.seed = float(lr), float(min_margin), seed
        self.r2_threshold, self.r2_target, self.shift_target = float(r2_threshold), float(r2_target), float(shift_target)
        self._split_spec = split
        self._layer_name = resolve_layer(model, target_layer)[0] if target_layer is not None else None
        self._base_kwargs = dict(base_kwargs or {})
        self._base: _CAM | InputGradients | None = self._make_base(base)
        self._supports = [_Support(lam=float(v)) for v in lambdas]
        self._feed = _Feed()
        self._cut_feed = _Feed()
        self._plan: _Plan | None = None
        self._original: nn.Module | None = None
        self._original_view: nn.Module | None = None
        self._bias: str | None = None
        self._structure: tuple[Any, ...] = ()
        self._versions: list[int] = []
        self._fits = 0
        self._previous_masks: dict[tuple[int, int], Tensor] = {}
        self.diagnostics: dict[str, Any] = {}

    # ----------------------------------------------------------------- configuration

    def _make_base(self, base: str | _CAM) -> _CAM | InputGradients | None:
        if isinstance(base, _CAM):
            if base.model is not self.model:
                raise ValueError("the `base` explainer is bound to another model; build it on the model given to GAD.")
            if base.target_layer is not None:
                if self._layer_name is not None and base.target_layer != self._layer_name:
                    raise ValueError(
                        f"the `base` explainer uses layer `{base.target_layer}` but GAD was given `{self._layer_name}`."
                    )
                self._layer_name = base.target_layer
            if self._base_kwargs:
                raise ValueError("`base_kwargs` only applies when `base` is a name; configure the instance instead.")
            return base
        if not isinstance(base, str):
            raise TypeError(f"`base` must be a method name or a CAM explainer instance, got {type(base).__name__}.")
        if base in INPUT_GRADIENT_METHODS:
            return InputGradients(base, **self._base_kwargs)  # type: ignore[arg-type]
        if base not in _CAM_BASES:
            raise ValueError(f"`base` must be one of {(*_CAM_BASES, *INPUT_GRADIENT_METHODS)} or an explainer, got {base!r}.")
        if base == "expected_gradcam" and "references" not in self._base_kwargs:
            return None  # the bank comes from the first fit set
        return _CAM_BASES[base](self.model, self._layer_name, **self._base_kwargs)

    @property
    def target_layer(self) -> str | None:
        """Dotted name of the CAM layer (``None`` until detected by the first :meth:`fit`)."""
        return self._layer_name

    @property
    def split(self) -> str | None:
        """Dotted name of the last shared module after :meth:`fit` (``None`` for full copies)."""
        return None if self._plan is None else self._plan.split

    @property
    def base(self) -> _CAM | InputGradients | None:
        """The base explainer applied to every model."""
        return self._base

    # ----------------------------------------------------------------- fit
    # ----------------------------------------------------------------- fit

    def fit(self, x_fit: Tensor) -> None:
        """Train (first call) or refresh (later calls, warm start) the support models on ``x_fit``.

        Cost: one no-grad forward pass of the model over ``x_fit`` plus, per Adam step, a forward and a
        backward pass of the ``k`` support tails (not of the trunk) over the cached trunk outputs. A
        refresh whose supports still fit their targets takes no step. The structural analysis (the split,
        the self-containment check) runs on the first call only, or again when the model's parameters or
        buffers are replaced by other tensors or its parameters move to another device.

        Args:
            x_fit: ``[N, C, H, W]`` training images in model-input space, disjoint from the images to
                explain. 256 is enough for ten classes (the fit is a low-dimensional regression of the
                tails' logits); the cost of a refresh grows linearly with ``N``.

        Raises:
            ValueError: If the trunk/tail split is not self-contained (the shared-trunk ensemble does not
                reproduce the model's logits), or on a bad split.
        """
        check_images(x_fit, "x_fit")
        with explanation_context(self.model):
            device = model_device(self.model)
            x = fresh_input(x_fit, device)
            if self._layer_name is None:
                self._layer_name = resolve_layer(self.model, None, x)[0]
            if self._base is None:
                bank = x[torch.linspace(0, x.shape[0] - 1, min(_DEFAULT_BANK, x.shape[0]), device=device).long()]
                self._base = ExpectedGradCAM(self.model, self._layer_name, references=bank, **self._base_kwargs)
            # Heads share the model's tensor objects and own copies of the tail on its device: a replaced
            # buffer (``model.to(device)`` makes new ones) or a moved parameter makes them stale.
            structure = (tuple((id(p), p.device) for p in self.model.parameters()),
                         tuple(id(b) for b in self.model.buffers()))
            rebuilt = self._plan is None or structure != self._structure
            try:
                if rebuilt:
                    self._build(self._make_plan(x), x)
                feeds, cuts, logits = self._trunk_and_logits(x)
                if rebuilt:
                    self._check_self_contained(x, feeds, logits)
                    if cuts is not None and not self._cut_reproduces(x, feeds, cuts, logits):
                        # something after the cut reads a skipped value: train the whole tail instead
                        self._build(self._make_plan(x, light=False), x)
                        cuts = None
            except Exception:
                if rebuilt:
                    self._plan = None  # a refused split must be analysed again, not reused
                raise
            self._structure = structure
            self._fit_supports(x, feeds, cuts, logits)
            self._versions = [p._version for p in self.model.parameters()]
            self._fits += 1

    def _build(self, plan: _Plan, x: Tensor) -> None:
        """The original's head, one trainable head per support (and their fit views when the plan has a
        cut) and the output bias; the supports start cold."""
        self._plan = plan
        self._original = _head(self.model, plan, self._feed, trainable=False) if plan.split else self.model
        self._original_view = _fit_view(self._original, plan, self._cut_feed) if plan.cut else None
        for support in self._supports:
            support.head = _head(self.model, plan, self._feed, trainable=True)
            for name, param in support.head.named_parameters():
                if name in plan.tail_params:
                    param.requires_grad_(False)  # only while its own fit runs
            support.view = _fit_view(support.head, plan, self._cut_feed) if plan.cut else None
            support.delta = None
            support.moments = None
        self._bias = _output_bias(self.model, x, plan.tail_params)

    def _make_plan(self, x: Tensor, light: bool = True) -> _Plan:
        if not self.shared_trunk:
            return _Plan(split=None, trunk=(), tail_params=tuple(n for n, _ in self.model.named_parameters()))
        calls = _execution(self.model, x)
        layer = self._layer_name
        assert layer is not None
        if layer not in calls:
            raise ValueError(f"the CAM layer `{layer}` did not run in the model's forward pass.")
        split = self._split_spec
        if split is None:
            split = _auto_split(self.model, calls, layer, self._linear_tail(x, layer, calls))
        plan = _plan(self.model, calls, split, layer)
        if light and self.trainable == "after_last_conv":
            plan = _light_plan(self.model, calls, plan, layer)
            convolutions = {n for n, m in self.model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
            if plan.cut is None and any(n.rpartition(".")[0] in convolutions for n in plan.tail_params):
                params = dict(self.model.named_parameters())
                warnings.warn(
                    f"GAD cannot limit its supports to what follows the last convolution after `split={plan.split!r}` "
                    "(that cut is not a clean stage, or would leave only a linear head to train), so they train the "
                    f"whole tail: {len(plan.tail_params)} tensors, "
                    f"{sum(params[n].numel() for n in plan.tail_params):,} values, and every fit step runs the tail's "
                    "convolutions, which can take minutes per fit. A CAM layer nearer the output (for the monitor: "
                    "`target_layer`) or a `split=` inside the last stage keeps fits cheap.",
                    stacklevel=3,
                )
        return plan

    def _linear_tail(self, x: Tensor, layer: str, calls: dict[str, list[tuple[int, int]]]) -> bool:
        """Whether supports trained after the CAM layer would form the degenerate family of ALGORITHMS §3.4.

        That is the case when ``∂y_0/∂A`` at the CAM layer is the same for every input (an affine head), and
        also when the logits are affine in every parameter that runs after the CAM layer although the head
        is not affine in ``A`` (a functional ``F.relu`` before global pooling and a linear classifier, as in
        DenseNet): the fitted deltas are then linear in the requested shift either way.
        """
        probe = _LayerProbe(self.model, [self.model.get_submodule(layer)])
        sample = x[: min(64, x.shape[0])]  # enough inputs to meet different ReLU patterns in a non-linear head
        _, grads, _ = probe.gradients(sample, torch.zeros(sample.shape[0], dtype=torch.long, device=x.device))
        spread = (grads - grads[:, :1]).abs().amax()
        # a few items suffice: the moves of the parameters change ReLU patterns on every item
        return bool(spread <= 1e-6 * grads.abs().amax().clamp_min(1e-12)) or _affine_in(
            self.model, sample[:8], _params_after(self.model, calls, layer)
        )

    def _trunk_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Cached trunk outputs (``x`` for full copies), cached cut outputs (``None`` without a cut) and
        the model's logits, from one forward pass."""
        assert self._plan is not None
        names = [n for n in (self._plan.split, self._plan.cut) if n is not None]
        captured: dict[str, list[Tensor]] = {n: [] for n in names}
        with hooked(
            self.model.get_submodule(n).register_forward_hook(
                lambda _m, _i, out, n=n: captured[n].append(out.detach().clone())
            )
            for n in names
        ), torch.no_grad():
            logits = [self.model(part) for part in x.split(_CHUNK)]
        feeds = torch.cat(captured[self._plan.split]) if self._plan.split is not None else x
        cuts = torch.cat(captured[self._plan.cut]) if self._plan.cut is not None else None
        return feeds, cuts, torch.cat(logits)

    def _ensemble(self, members: Sequence[nn.Module]) -> _Ensemble:
        assert self._plan is not None and self._original is not None
        return _Ensemble(self.model, self._plan, [self._original, *members], self._feed, self._cut_feed)

    def _predict(self, x: Tensor, feeds: Tensor, members: Sequence[nn.Module], cuts: Tensor | None = None) -> Tensor:
        """Logits ``[M, N, K]`` of ``members`` on cached trunk outputs (fit views: and cut outputs), without
        gradients."""
        ensemble = self._ensemble([])
        with torch.no_grad():
            parts = [
                ensemble.heads(
                    x[i : i + _CHUNK], [feeds[i : i + _CHUNK]] * len(members), members,
                    cut=None if cuts is None else cuts[i : i + _CHUNK],
                )
                for i in range(0, x.shape[0], _CHUNK)
            ]
        return torch.cat(parts, dim=1)

    def _cut_reproduces(self, x: Tensor, feeds: Tensor, cuts: Tensor, logits: Tensor) -> bool:
        """Whether the original's fit view reproduces the model's logits from the cached cut outputs."""
        assert self._original_view is not None
        try:
            replay, expected, (feed_written, cut_written) = self._replay(self._original_view, x, feeds, logits, cuts)
        except RuntimeError:
            return False
        # An in-place op on a skipped module's pass-through value (a ResNet block's `relu(inplace=True)`)
        # writes into the injected tensors, so the heads then need copies.
        self._feed.copy = self._feed.copy or feed_written
        self._cut_feed.copy = cut_written
        return _same_logits(replay, expected)

    def _replay(
        self, member: nn.Module, x: Tensor, feeds: Tensor, logits: Tensor, cuts: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[bool]]:
        """``member``'s logits on the cached outputs of the first (at most 64) fit items, the model's own
        logits there, and whether ``member`` wrote into each injected tensor (the trunk output, then the cut
        output). One chunk is enough to catch a tail that reads a value it was not given.

        Raises:
            RuntimeError: When ``member`` fails on the cached outputs.
        """
        n = min(x.shape[0], 64)
        injected = [feeds[:n].clone()] + ([] if cuts is None else [cuts[:n].clone()])
        versions = [t._version for t in injected]
        flags = self._feed.copy, self._cut_feed.copy
        self._feed.copy = self._cut_feed.copy = False  # hand over the tensors themselves, so a write shows
        try:
            replay = self._predict(x[:n], injected[0], [member], injected[1] if cuts is not None else None)[0]
        finally:
            self._feed.copy, self._cut_feed.copy = flags
        return replay, logits[:n], [t._version != v for t, v in zip(injected, versions)]

    def _check_self_contained(self, x: Tensor, feeds: Tensor, logits: Tensor) -> None:
        if self._plan is None or self._plan.split is None:
            return
        assert self._original is not None
        hint = (
            "Something after the split reads another trunk value (a skip connection?). Pass a `split` at a stage "
            "boundary, or `shared_trunk=False`."
        )
        try:
            replay, expected, (written,) = self._replay(self._original, x, feeds, logits)
        except RuntimeError as err:
            raise ValueError(
                f"the tail after `split={self._plan.split!r}` is not self-contained: it fails on the cached split "
                f"output ({err}). {hint}"
            ) from err
        self._feed.copy = written  # a tail that writes into its input needs a copy per head; else they share it
        if not _same_logits(replay, expected):
            raise ValueError(
                f"the tail after `split={self._plan.split!r}` is not self-contained: running it on the cached split "
                f"output does not reproduce the model's logits. {hint}"
            )

    def _targets(self, logits: Tensor) -> tuple[Tensor, Tensor, float]:
        """Predicted classes, the off-class indicator ``1[j ≠ ŷ]`` and the floored median margin ``s``."""
        predicted = logits.argmax(dim=1)
        others = 1 - F.one_hot(predicted, logits.shape[1]).to(logits.dtype)
        top = logits.gather(1, predicted[:, None])[:, 0]
        runner_up = (logits - 1e30 * (1 - others)).amax(dim=1)
        margin = max(float((top - runner_up).median()), self.min_margin)
        return predicted, others, margin

    def _fit_supports(self, x: Tensor, feeds: Tensor, cuts: Tensor | None, logits: Tensor) -> None:
        assert self._plan is not None
        predicted, others, margin = self._targets(logits)
        alphas = [s.lam * margin for s in self._supports]
        shifts = torch.stack([-a * others for a in alphas])
        goals = logits + shifts
        generator = torch.Generator(device=x.device)
        generator.manual_seed(hash((self.seed, self._fits)) & ((1 << 63) - 1))
        for support in self._supports:
            support.refit, support.steps = False, 0
            self._restart(support, support.delta)
        cold = [i for i, s in enumerate(self._supports) if s.delta is None]
        warm = [i for i, s in enumerate(self._supports) if s.delta is not None]
        self._train(cold, x, feeds, cuts, goals, shifts, predicted, self.steps, generator)
        self._train(warm, x, feeds, cuts, goals, shifts, predicted, self.warm_steps, generator)
        # A warm support that no longer fits restarts cold once (its offsets may be stale beyond repair); a
        # cold one is not retried: the same start and budget would give the same fit.
        bad = [i for i in warm if not self._supports[i].fit_r2 >= self.r2_threshold]  # NaN is bad too
        for i in bad:
            self._restart(self._supports[i], None)
            self._supports[i].refit = True
        self._train(bad, x, feeds, cuts, goals, shifts, predicted, self.steps, generator)
        current = dict(self.model.named_parameters())
        for support in self._supports:
            assert support.head is not None
            support.active = support.fit_r2 >= self.r2_threshold
            if support.active:
                # Offsets from the current original: the next fit starts from θ_f(then) + Δ.
                params = dict(support.head.named_parameters())
                support.delta = {n: (params[n] - current[n]).detach() for n in self._plan.tail_params}
            else:
                support.delta = None
                warnings.warn(
                    f"GAD support λ={support.lam} fits its distanced targets with R²={support.fit_r2:.3f} < "
                    f"{self.r2_threshold} after {support.steps} Adam steps; it is excluded from the fusion and restarts "
                    "cold at the next fit"
                    + (" (no support is left: GAD returns the thresholded base map)." if not any(
                        s.fit_r2 >= self.r2_threshold for s in self._supports) else "."),
                    stacklevel=3,
                )
        self.diagnostics = {
            "fit_r2": [s.fit_r2 for s in self._supports],
            "shift_r2": [s.shift_r2 for s in self._supports],
            "agreement": [s.agreement for s in self._supports],
            "alphas": alphas,
            "lambdas": list(self.lambdas),
            "margin": margin,
            "active": [s.active for s in self._supports],
            "fallback": not any(s.active for s in self._supports),
            "refit": [s.refit for s in self._supports],
            "steps": [s.steps for s in self._supports],
            "split": self._plan.split,
            "cut": self._plan.cut,
            "trained_parameters": len(self._plan.tail_params),
            "fits": self._fits + 1,
        }

    def _restart(self, support: _Support, delta: dict[str, Tensor] | None) -> None:
        """Set a support's tail to the original's current tail plus ``delta`` (zero when ``None``: a cold
        start, which also forgets the optimiser's moments)."""
        assert support.head is not None and self._plan is not None
        if delta is None:
            support.moments = None
        own = dict(support.head.named_parameters())
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self._plan.tail_params:
                    offset = None if delta is None else delta.get(name)
                    own[name].copy_(param if offset is None else param + offset.to(param.device))

    def _center(self, heads: Sequence[nn.Module], pred: Tensor, goals: Tensor) -> None:
        """Add the least-squares constant ``mean(goal − pred)`` to each head's output bias (and to
        ``pred``, in place). A constant on the logits changes no gradient, hence no map."""
        if self._bias is None:
            return
        offsets = (goals - pred).mean(dim=1)
        with torch.no_grad():
            for head, offset in zip(heads, offsets):
                dict(head.named_parameters())[self._bias].add_(offset)
        pred.add_(offsets[:, None])

    def _train(
        self,
        which: list[int],
        x: Tensor,
        feeds: Tensor,
        cuts: Tensor | None,
        goals: Tensor,
        shifts: Tensor,
        predicted: Tensor,
        budget: int,
        generator: torch.Generator,
    ) -> None:
        """Fit the tails of the supports ``which`` to their distanced targets (MSE, Adam, eval mode) and
        score them on the whole fit set.

        Only the supports' own parameters are optimised, with ``torch.autograd.grad``; the original's
        parameters and ``.grad`` are never part of it.
        """
        if not which:
            return
        # fit views share their parameters with the heads, so training a view trains its head
        heads: list[nn.Module] = [self._supports[i].view or self._supports[i].head for i in which]  # type: ignore[misc]
        targets, wanted = goals[which], shifts[which]
        n = x.shape[0]
        full = self.fit_batch_size is None or self.fit_batch_size >= n
        pred = self._predict(x, feeds, heads, cuts)
        steps = [0] * len(which)
        if budget > 0 and not bool(self._reached(pred, targets, wanted).all()):
            steps = self._adam(which, heads, x, feeds, cuts, targets, wanted, budget, generator, full)
            pred = self._predict(x, feeds, heads, cuts)
        self._center(heads, pred, targets)
        r2 = _r2(pred, targets)
        made = _r2(pred, targets, centered=self._bias is not None, shift=wanted)
        for j, i in enumerate(which):
            support = self._supports[i]
            support.fit_r2 = float(r2[j])
            support.shift_r2 = float(made[j])
            support.agreement = float((pred[j].argmax(dim=1) == predicted).float().mean())
            support.steps += steps[j]

    def _reached(self, pred: Tensor, targets: Tensor, shifts: Tensor) -> Tensor:
        """Per head (``[M]`` bool), whether it reaches ``r2_target`` and ``shift_target`` once its output
        offset is re-centred (as every fit ends); an exact bias step is free, so the check counts it, but
        training never takes it early: learning the shift through the weights is what makes the supports'
        maps differ from the original's."""
        centered = self._bias is not None
        return (_r2(pred, targets, centered) >= self.r2_target) & (
            _r2(pred, targets, centered, shift=shifts) >= self.shift_target)

    def _adam(
        self,
        which: list[int],
        heads: list[nn.Module],
        x: Tensor,
        feeds: Tensor,
        cuts: Tensor | None,
        targets: Tensor,
        shifts: Tensor,
        budget: int,
        generator: torch.Generator,
        full: bool,
    ) -> list[int]:
        """Adam steps until each head reaches ``r2_target`` and ``shift_target`` (checked on each step's
        own forward pass, exact when ``full``; a head that reaches them stops training) or ``budget``
        steps; returns the steps each head took."""
        assert self._plan is not None
        named = [{n: p for n, p in h.named_parameters() if n in self._plan.tail_params} for h in heads]
        groups = [
            # The parameter change needed grows with the shift α_i ∝ λ_i; Adam's steps do not, so scale them.
            {"params": list(own.values()), "lr": self.lr * self._supports[i].lam}
            for own, i in zip(named, which)
        ]
        params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.Adam(groups, lr=self.lr, foreach=True)
        # A warm fit continues the previous fit's Adam moments: a fresh Adam's first steps move every weight
        # by the full learning rate, which throws a support that nearly fits far off its fit.
        for own, i in zip(named, which):
            moments = self._supports[i].moments or {}
            for name, param in own.items():
                if name in moments:
                    optimizer.state[param] = moments[name]
        # Cosine decay to zero: large early steps reach the wide margins, small late steps settle the fit.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / budget)))
        ensemble = self._ensemble([])
        n = x.shape[0]
        batch = n if full else int(self.fit_batch_size)  # type: ignore[arg-type]
        order, cursor = torch.randperm(n, generator=generator, device=x.device), 0
        steps = [0] * len(heads)
        running = list(range(len(heads)))
        try:
            for p in params:
                p.requires_grad_(True)
            for _ in range(budget):
                if full:
                    xs, fs, cs, ts, ss = x, feeds, cuts, targets, shifts
                else:
                    if cursor + batch > n:
                        order, cursor = torch.randperm(n, generator=generator, device=x.device), 0
                    idx = order[cursor : cursor + batch]
                    cursor += batch
                    xs, fs, ts, ss = x[idx], feeds[idx], targets[:, idx], shifts[:, idx]
                    cs = None if cuts is None else cuts[idx]
                with torch.enable_grad():
                    out = ensemble.heads(xs, [fs] * len(running), [heads[j] for j in running], cut=cs)
                keep = ~self._reached(out.detach(), ts[running], ss[running])
                running = [j for j, k in zip(running, keep.tolist()) if k]
                if not running:
                    break
                loss = (out[keep] - ts[running]).pow(2).mean(dim=(1, 2)).sum()
                trained = [p for j in running for p in named[j].values()]
                for p, g in zip(trained, torch.autograd.grad(loss, trained)):
                    p.grad = g
                optimizer.step()  # Adam skips the parameters of finished heads: their grad is None
                schedule.step()
                for j in running:
                    steps[j] += 1
                    for p in named[j].values():
                        p.grad = None
        finally:
            for p in params:
                p.grad = None
                p.requires_grad_(False)
        for own, i in zip(named, which):
            self._supports[i].moments = {n: optimizer.state[p] for n, p in own.items() if p in optimizer.state}
        return steps

    def support_model(self, index: int) -> nn.Module:
        """A standalone copy of the original model carrying support ``index``'s trained tail (eval mode).

        For inspection and offline use; explanations never need it (they share the trunk).

        Args:
            index: Position in ``lambdas``.

        Raises:
            RuntimeError: Before :meth:`fit`, or for a support excluded by the last fit.
            IndexError: For an index outside ``lambdas``.
        """
        if self._plan is None:
            raise RuntimeError("GAD has no support models yet: call `gad.fit(x_fit)` first.")
        if not 0 <= index < len(self._supports):
            raise IndexError(f"`index` must lie in [0, {len(self._supports) - 1}], got {index}.")
        support = self._supports[index]
        if not support.active or support.head is None:
            raise RuntimeError(f"support {index} (λ={support.lam}) was excluded by the last fit (R² too low).")
        standalone = copy.deepcopy(self.model).eval()
        trained = dict(support.head.named_parameters())
        with torch.no_grad():
            for name, param in standalone.named_parameters():
                if name in trained:
                    param.copy_(trained[name])
        return standalone

    # ----------------------------------------------------------------- explain

    def __call__(
        self,
        x: Tensor,
        targets: Targets = None,
        output_size: OutputSize = None,
        *,
        sample_ids: Tensor | None = None,
        stream: int = 0,
    ) -> Tensor:
        """GAD maps of ``x``: the original model's base map inside the fused support mask.

        Args:
            x: ``[B, C, H, W]`` images in model-input space.
            targets: ``LongTensor [B]``, an int, or ``None`` for the original model's argmax.
            output_size: ``None`` (the base's native resolution: the layer for CAM bases, the input for
                input-gradient bases), ``"input"`` or ``(H, W)``: bilinear upsampling after fusion.
            sample_ids: ``[B]`` ids seeding the base's random draws (common random numbers across models,
                calls and batches); default ``0..B-1``.
            stream: Independent replicate stream (1 gives the noise-floor replicate).

        Returns:
            Non-negative float32 maps ``[B, h, w]`` (``[B, H, W]`` when upsampled). A degenerate base map
            gives an all-zero GAD map.

        Raises:
            RuntimeError: If :meth:`fit` has not been called.
        """
        maps = self.explain(x, targets, sample_ids=sample_ids, stream=stream).maps
        return upsample(maps, resolve_output_size(output_size, x))

    def explain(
        self, x: Tensor, targets: Targets = None, *, sample_ids: Tensor | None = None, stream: int = 0
    ) -> GADResult:
        """GAD maps with every model's base map, the fused mask and the targets (see :meth:`__call__`)."""
        if self._plan is None or self._base is None:
            raise RuntimeError("GAD has no support models yet: call `gad.fit(x_fit)` with training images first.")
        check_images(x)
        members = [s.head for s in self._supports if s.active]
        with explanation_context(self.model):
            x = fresh_input(x, model_device(self.model))
            self._note_stale()
            ensemble = self._ensemble(members)  # type: ignore[arg-type]
            if isinstance(self._base, InputGradients):
                maps, c = self._base.maps(ensemble, x, targets)
            else:
                assert self._layer_name is not None
                layers = [m.get_submodule(self._layer_name) for m in ensemble.members]
                shared = self._plan.split == self._layer_name
                probe = (_SharedActivations if shared else _LayerProbe)(ensemble, layers)
                result = self._base.run(probe, x, targets, sample_ids, stream)
                maps, c = result.maps, result.targets
        masks = _masks(maps, self.tau)
        fused = masks.all(dim=0)
        out = maps[0] * fused
        self._diagnose(masks[0], fused, x, sample_ids, stream)
        return GADResult(maps=out, base_maps=maps, mask=fused, targets=c)

    def _note_stale(self) -> None:
        stale = [p._version for p in self.model.parameters()] != self._versions
        self.diagnostics["stale"] = stale
        if stale:
            warnings.warn(
                "the model's parameters changed since the last `gad.fit`; the supports no longer mimic it. Call "
                "`fit` again before explaining.",
                stacklevel=4,
            )

    def _diagnose(self, plain: Tensor, fused: Tensor, x: Tensor, sample_ids: Tensor | None, stream: int) -> None:
        cells = plain[0].numel()
        self.diagnostics["plain_fraction"] = plain.flatten(1).sum(1).float().cpu() / cells
        self.diagnostics["kept_fraction"] = fused.flatten(1).sum(1).float().cpu() / cells
        self.diagnostics["hull_area"] = {"plain": _hull_fraction(plain), "gad": _hull_fraction(fused)}
        ids = _CAM._sample_ids(sample_ids, x)
        iou: dict[int, float] = {}
        for sid, mask in zip(ids, fused.cpu()):
            previous = self._previous_masks.get((stream, sid))
            if previous is not None and previous.shape == mask.shape:
                union = int((previous | mask).sum())
                iou[sid] = 1.0 if union == 0 else int((previous & mask).sum()) / union
            self._previous_masks[(stream, sid)] = mask
        self.diagnostics["mask_iou_prev"] = iou

    def __repr__(self) -> str:
        return (
            f"GAD(target_layer={self._layer_name!r}, base={self._base!r}, lambdas={self.lambdas}, tau={self.tau}, "
            f"split={self.split!r}, shared_trunk={self.shared_trunk})"
        )
