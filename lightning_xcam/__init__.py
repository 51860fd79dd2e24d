"""lightning_xcam: watch why a vision model decides what it decides, while it trains.

Public API (stable names)::

    from lightning_xcam import ExplanationMonitor, GradCAM, IntegratedGradCAM, ExpectedGradCAM, GAD
    from lightning_xcam import metrics
    from lightning_xcam.store import ExplanationStore

Imports are lazy so that the maths can be used without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "GradCAM": "lightning_xcam.methods.cam",
    "IntegratedGradCAM": "lightning_xcam.methods.cam",
    "ExpectedGradCAM": "lightning_xcam.methods.cam",
    "GAD": "lightning_xcam.methods.gad",
    "ExplanationMonitor": "lightning_xcam.callback",
    "Alert": "lightning_xcam.alerts",
    "ExplanationStore": "lightning_xcam.store",
    "metrics": "lightning_xcam.metrics",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from lightning_xcam import metrics
    from lightning_xcam.alerts import Alert
    from lightning_xcam.callback import ExplanationMonitor
    from lightning_xcam.methods.cam import ExpectedGradCAM, GradCAM, IntegratedGradCAM
    from lightning_xcam.methods.gad import GAD
    from lightning_xcam.store import ExplanationStore


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lightning_xcam' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "metrics" else getattr(module, name)
    globals()[name] = value
    return value
