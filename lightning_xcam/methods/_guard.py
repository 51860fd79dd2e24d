"""The explanation context: run explanation work on a live model without leaving a trace.

Every explainer and metric enters :func:`explanation_context` before touching the model. Inside it the
model is in eval mode, autograd is enabled, inference mode and autocast are off; on exit (also after an
exception) every submodule's ``training`` flag, every parameter's ``requires_grad`` and ``.grad``, every
buffer, the global RNG states (CPU and any initialised CUDA device) and the set of registered hooks are
exactly as they were found.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.utils.hooks import RemovableHandle

__all__ = ["explanation_context", "fresh_input", "hooked", "model_device", "require_float32"]

# Per-module hook dictionaries that explanation code could register into (by handle) and must leave clean.
_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


@dataclass
class _ModelSnapshot:
    modules: list[nn.Module]
    training: list[bool]
    params: list[nn.Parameter]
    requires_grad: list[bool]
    grads: list[Tensor | None]
    buffers: list[tuple[Tensor, Tensor]]
    hooks: list[tuple[dict, set]]

    @classmethod
    def take(cls, model: nn.Module) -> _ModelSnapshot:
        modules = list(model.modules())
        params = list(model.parameters())
        with torch.no_grad():
            buffers = [(b, b.detach().clone()) for b in model.buffers()]
        hook_dicts = [getattr(m, name, None) for m in modules for name in _MODULE_HOOK_DICTS]
        hook_dicts += [getattr(_module_globals, name, None) for name in _GLOBAL_HOOK_DICTS]
        return cls(
            modules=modules,
            training=[m.training for m in modules],
            params=params,
            requires_grad=[p.requires_grad for p in params],
            grads=[p.grad for p in params],
            buffers=buffers,
            hooks=[(hooks, set(hooks)) for hooks in hook_dicts if isinstance(hooks, dict)],
        )

    def park_grads(self) -> None:
        """Take the ``.grad`` tensors out of the parameters: a ``.backward()`` inside the context then fills
        fresh tensors that ``restore`` drops, instead of accumulating into the user's gradients in place."""
        for p, grad in zip(self.params, self.grads):
            if grad is not None:
                p.grad = None

    def restore(self) -> None:
        # Compare before writing: restoring an untouched model is the common case and stays cheap.
        for hooks, keys in self.hooks:
            if len(hooks) != len(keys) or not keys.issuperset(hooks):
                for key in [k for k in hooks if k not in keys]:
                    del hooks[key]
        for m, flag in zip(self.modules, self.training):
            if m.training is not flag:
                m.training = flag
        for p, flag, grad in zip(self.params, self.requires_grad, self.grads):
            if p.requires_grad is not flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
        with torch.no_grad():
            # Not version counters: batch norm updates its running statistics without bumping them.
            for buffer, saved in self.buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)


@contextmanager
def _preserved_rng() -> Iterator[None]:
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextmanager
def hooked(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Keep hooks registered while the context is open; remove them on exit, also after an exception.

    ``handles`` is consumed inside the protected block, so a generator that registers hooks as it goes
    leaves none behind when a registration fails half-way.

    Args:
        handles: Handles returned by ``register_*_hook`` calls (a lazy iterable is fine).

    Example:
        >>> net, shapes = nn.Linear(2, 3), []
        >>> with hooked([net.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))]):
        ...     _ = net(torch.ones(1, 2))
        >>> shapes, len(net._forward_hooks)
        ([(1, 3)], 0)
    """
    held: list[RemovableHandle] = []
    try:
        for handle in handles:
            held.append(handle)
        yield
    finally:
        for handle in held:
            handle.remove()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer); CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def require_float32(model: nn.Module) -> None:
    """Refuse a model whose floating-point parameters are not float32 (explanations run in float32, and
    converting the user's model would be a side effect).

    Raises:
        TypeError: Naming the dtypes found and the mixed precisions that keep float32 weights.
    """
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()} - {"float32"})
    if dtypes:
        raise TypeError(
            f"explanations need a float32 model; this one has {', '.join(dtypes)} parameters. Train with a mixed "
            "precision (precision='bf16-mixed' or '16-mixed' keep float32 weights) or explain a float32 copy."
        )


@contextmanager
def explanation_context(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in a state fit for explanation and restore everything on exit.

    Inside the context: every submodule in eval mode, gradients enabled, inference mode and autocast
    disabled, and ``torch.compile``'d code run eagerly (a compiled graph does not call the hooks that
    explanations put on a layer, and explaining must not recompile the training graph). Explanation code must still take gradients with ``torch.autograd.grad`` only (never
    ``.backward()``) and draw randomness from its own ``torch.Generator``; the context is the safety net
    that puts back whatever it touched anyway.

    Args:
        model: The live model (an ``nn.Module`` or a ``LightningModule``).

    Yields:
        The same ``model``, in eval mode.

    Raises:
        TypeError: If the model's floating-point parameters are not float32 (a model trained with
            ``precision="bf16-true"``/``"16-true"``/``"64-true"``), see :func:`require_float32`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout()).train()
        >>> with explanation_context(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    require_float32(model)
    snapshot = _ModelSnapshot.take(model)
    device = model_device(model)
    with ExitStack() as stack:
        stack.callback(snapshot.restore)
        snapshot.park_grads()
        stack.enter_context(_preserved_rng())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        if hasattr(torch.compiler, "set_stance"):  # torch >= 2.6; older versions cannot skip compiled code
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        if any(snapshot.training):
            model.eval()
        yield model


def fresh_input(x: Tensor, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A detached copy of ``x`` that autograd may save, even if ``x`` was made under inference mode.

    Call it inside :func:`explanation_context`: a copy taken while inference mode is on is still an
    inference tensor and cannot be saved for backward.

    Args:
        x: Any tensor, possibly an inference tensor cached from a validation step.
        device: Where to put the copy; ``None`` keeps ``x.device``.
        dtype: Floating dtype of the copy.

    Returns:
        A new, normal tensor that does not require grad.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("fresh_input must be called inside explanation_context (inference mode is on).")
    return x.detach().to(device=device or x.device, dtype=dtype).clone()
