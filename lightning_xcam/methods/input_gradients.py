"""The five input-gradient attributions the GAD paper builds on, for one model or several heads at once.

``saliency`` (|∂y_c/∂x|), ``input_x_gradient`` (``x ⊙ ∂y_c/∂x``), ``integrated_gradients`` (Gauss-Legendre
path integral from a baseline, Captum's default rule), ``guided_backprop`` and ``deconvolution`` (the
gradient through every ``nn.ReLU`` replaced by Springenberg's and Zeiler's rules). Each gives the same
per-pixel, per-channel attributions as Captum's method of the same name; :meth:`InputGradients.maps`
reduces them to ``[.., H, W]`` maps as GAD needs (ALGORITHMS.md §3.3: channel mean, clamped at 0;
saliency is the channel mean of ``|∂y_c/∂x|``).

The attributions run over *heads*: ``M`` models that share a trunk (see :class:`Heads`), so GAD's
original model and its support models are explained from one trunk forward pass per input point. A plain
model is the one-head case (:class:`SingleModel`).

The ReLU rules are applied with temporary module hooks, never by editing the user's modules, and work
with ``nn.ReLU(inplace=True)``. ``F.relu`` / ``torch.relu`` calls inside a ``forward`` are invisible to
module hooks and keep the plain gradient (Captum has the same limit).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from lightning_xcam._checks import Targets, check_int, resolve_targets
from lightning_xcam.methods._guard import hooked

__all__ = ["INPUT_GRADIENT_METHODS", "InputGradients", "Heads", "SingleModel", "relu_rule"]

InputGradientMethod = Literal["saliency", "input_x_gradient", "integrated_gradients", "guided_backprop", "deconvolution"]
INPUT_GRADIENT_METHODS: tuple[str, ...] = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "guided_backprop",
    "deconvolution",
)


class Heads(Protocol):
    """``M`` models on one shared trunk.

    ``trunk(x)`` returns the shared tensor (``x`` itself when nothing is shared); ``heads(x, feeds)``
    runs head ``m`` on ``feeds[m]`` (a replica of the trunk output) and returns logits ``[M, S, K]``;
    ``modules()`` lists every module that may run, for the ReLU rules.
    """

    def trunk(self, x: Tensor) -> Tensor: ...

    def heads(self, x: Tensor, feeds: Sequence[Tensor]) -> Tensor: ...

    def modules(self) -> list[nn.Module]: ...

    @property
    def size(self) -> int: ...


class SingleModel:
    """A plain classifier as a one-head :class:`Heads` (no shared trunk).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> SingleModel(net).heads(torch.zeros(2, 1, 2, 2), [torch.zeros(2, 1, 2, 2)]).shape
        torch.Size([1, 2, 3])
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def trunk(self, x: Tensor) -> Tensor:
        return x

    def heads(self, x: Tensor, feeds: Sequence[Tensor]) -> Tensor:
        return self.model(feeds[0]).unsqueeze(0)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    @property
    def size(self) -> int:
        return 1


class _ReLURule(torch.autograd.Function):
    """``ReLU`` forward; backward ``ReLU(g)`` (deconvolution) or ``ReLU(g)·1[input > 0]`` (guided)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, inp: Tensor, guided: bool) -> Tensor:
        ctx.guided = guided
        ctx.save_for_backward(inp)
        return inp.clamp_min(0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (inp,) = ctx.saved_tensors
        grad = grad.clamp_min(0)
        return (grad * (inp > 0).to(grad.dtype) if ctx.guided else grad), None


@contextmanager
def relu_rule(modules: Iterable[nn.Module], rule: Literal["guided_backprop", "deconvolution"]) -> Iterator[None]:
    """Replace the backward rule of every ``nn.ReLU`` inside ``modules`` while the context is open.

    A forward pre-hook keeps the ReLU's input (an in-place ReLU is given a copy to overwrite); a forward
    hook returns :class:`_ReLURule` applied to that input, so autograd never sees the plain ReLU. The
    modules themselves are not changed and the hooks are removed on exit.

    Args:
        modules: Module trees to search for ``nn.ReLU`` (a module found twice is hooked once).
        rule: ``"guided_backprop"`` or ``"deconvolution"``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True))
        >>> with relu_rule([net], "deconvolution"):
        ...     net(torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """
    guided = rule == "guided_backprop"
    relus = {id(m): m for tree in modules for m in tree.modules() if isinstance(m, nn.ReLU)}
    pending: dict[int, list[Tensor]] = {key: [] for key in relus}

    def before(module: nn.Module, args: tuple) -> tuple | None:
        pending[id(module)].append(args[0])
        return (args[0].clone(), *args[1:]) if module.inplace else None

    def after(module: nn.Module, _args: tuple, _output: Tensor) -> Tensor:
        return _ReLURule.apply(pending[id(module)].pop(), guided)

    with hooked(
        handle
        for module in relus.values()
        for handle in (module.register_forward_pre_hook(before), module.register_forward_hook(after))
    ):
        yield


def _gauss_legendre(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Nodes in (0, 1) and weights of the ``n``-point Gauss-Legendre rule (Golub-Welsch, float64)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4 * k * k - 1)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    weights = 2 * vectors[0] ** 2
    return ((nodes + 1) / 2).to(device=device, dtype=dtype), (weights / 2).to(device=device, dtype=dtype)


class InputGradients:
    """Input-gradient attributions of ``M`` heads (one trunk pass per point, separate gradients per head).

    Args:
        method: One of :data:`INPUT_GRADIENT_METHODS`.
        steps: Integrated gradients: number of Gauss-Legendre points (Captum's ``n_steps``, default 50).
        baseline: Integrated gradients: ``None`` (zeros in model-input space) or a tensor broadcastable
            to the input.
        batch_size: Most input points per forward pass (integrated gradients); results do not depend on it.

    Raises:
        TypeError: On a non-int ``steps`` or ``batch_size``.
        ValueError: On an unknown method or ``steps < 1``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
        >>> InputGradients("saliency").maps(SingleModel(net), torch.randn(4, 1, 4, 4))[0].shape
        torch.Size([1, 4, 4, 4])
    """

    def __init__(
        self,
        method: InputGradientMethod,
        steps: int = 50,
        baseline: Tensor | None = None,
        batch_size: int | None = None,
    ) -> None:
        if method not in INPUT_GRADIENT_METHODS:
            raise ValueError(f"`method` must be one of {INPUT_GRADIENT_METHODS}, got {method!r}.")
        check_int(steps, "steps")
        if batch_size is not None:
            check_int(batch_size, "batch_size", why=" or None")
        if baseline is not None and not isinstance(baseline, Tensor):
            raise TypeError(f"`baseline` must be None or a tensor, got {type(baseline).__name__}.")
        self.method = method
        self.steps = steps
        self.baseline = baseline
        self.batch_size = batch_size

    def _gradients(self, heads: Heads, points: Tensor, c: Tensor) -> Tensor:
        """``∂y_c/∂x`` of every head at ``points``: ``[M, S, C, H, W]``."""
        x = points.detach().requires_grad_()
        shared = heads.trunk(x)
        leaves = [shared.detach().requires_grad_() for _ in range(heads.size)]
        logits = heads.heads(x.detach(), leaves)
        score = logits.gather(2, c.view(1, -1, 1).expand(logits.shape[0], -1, 1)).sum()
        at_split = torch.autograd.grad(score, leaves, allow_unused=True)
        at_split = [torch.zeros_like(a) if g is None else g for a, g in zip(leaves, at_split)]
        if shared is x:
            return torch.stack(at_split)
        # One trunk forward, one trunk backward per head: a single backward would sum the heads' gradients.
        grads = [
            torch.autograd.grad(shared, x, g, retain_graph=m < len(at_split) - 1)[0] for m, g in enumerate(at_split)
        ]
        return torch.stack(grads)

    def _chunked_gradients(self, heads: Heads, points: Tensor, c: Tensor) -> Tensor:
        step = points.shape[0] if self.batch_size is None else self.batch_size
        parts = [self._gradients(heads, points[i : i + step], c[i : i + step]) for i in range(0, points.shape[0], step)]
        return torch.cat(parts, dim=1)

    def attributions(self, heads: Heads, x: Tensor, targets: Targets = None) -> tuple[Tensor, Tensor]:
        """Per-channel attributions ``[M, B, C, H, W]`` and the explained classes ``[B]``.

        Call inside :func:`~lightning_xcam.methods._guard.explanation_context`. ``targets=None`` explains
        the first head's argmax.
        """
        with torch.no_grad():
            clean = heads.heads(x, [heads.trunk(x)] * heads.size)
        c = resolve_targets(targets, clean[0])
        rule = self.method if self.method in ("guided_backprop", "deconvolution") else None
        with relu_rule(heads.modules(), rule) if rule else nullcontext():  # type: ignore[arg-type]
            if self.method != "integrated_gradients":
                grads = self._chunked_gradients(heads, x, c)
                if self.method == "saliency":
                    return grads.abs(), c
                return (x * grads if self.method == "input_x_gradient" else grads), c
            return self._integrated(heads, x, c), c

    def _integrated(self, heads: Heads, x: Tensor, c: Tensor) -> Tensor:
        batch, m = x.shape[0], self.steps
        base = torch.zeros_like(x) if self.baseline is None else self.baseline.to(x).expand_as(x)
        alphas, weights = _gauss_legendre(m, x.dtype, x.device)
        # Step-major order, as Captum stacks its scaled inputs.
        points = base.unsqueeze(0) + alphas.view(m, 1, 1, 1, 1) * (x - base).unsqueeze(0)
        grads = self._chunked_gradients(heads, points.flatten(0, 1), c.repeat(m))
        grads = grads.unflatten(1, (m, batch))
        total = (grads * weights.view(1, m, 1, 1, 1, 1)).sum(dim=1)
        return total * (x - base)

    def maps(self, heads: Heads, x: Tensor, targets: Targets = None) -> tuple[Tensor, Tensor]:
        """2-D maps ``[M, B, H, W]`` (channel mean, clamped at 0; saliency: mean of ``|∂y_c/∂x|``) and targets."""
        attributions, c = self.attributions(heads, x, targets)
        return attributions.mean(dim=2).clamp_min(0).float(), c

    def __repr__(self) -> str:
        return f"InputGradients(method={self.method!r}, steps={self.steps}, batch_size={self.batch_size})"
