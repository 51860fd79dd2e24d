r"""
TensorBoard layout
==================

A custom-scalars layout that opens TensorBoard's CUSTOM SCALARS page on the few curves to read first,
out of the two dozen scalars :class:`~lightning_xcam.ExplanationMonitor` logs:

1. **xcam: at a glance** — the shortcut alert, then per method insertion − deletion (faithfulness) and
   drift against the previous evaluation.
2. **xcam: <method>**, one category per method — insertion AUC, deletion AUC, infidelity and drift
   against the first evaluation.
3. **xcam: shortcut signals** (when the method the shortcut checks use is given) — the tiny-region
   reliance z (fill-in), its transplant z and the border mass, to watch a signal build up to an alert.

Scores are charted only when the monitor computes them (``metrics=``; insertion − deletion needs both),
so no chart waits for a scalar that never comes.

Every chart holds one scalar, because TensorBoard colours lines by run and not by tag: several tags in
one chart could only be told apart by hovering. Drift is charted in noise-floor units (``≈ 1``: as
different as two random draws of the same explainer) for stochastic methods; deterministic ones
(Grad-CAM, Integrated Grad-CAM) have no noise floor and are charted as the rank distance ``1 − ρ``.

The SCALARS page cannot be reordered from a run: it groups tags by their first path segment, sorts the
groups by name and opens only the first two, so ``xcam`` sits closed below ``epoch``, ``train_loss`` and
the like. :func:`scalars_url` gives a SCALARS address whose tag filter shows the curves of the first
category, unsmoothed.

Chart tags are regular expressions anchored at the start of the tag (TensorBoard uses ``re.match``);
every one ends in ``$`` so that ``drift_floor_units`` does not also pick up ``drift_floor_units_first``.

Example::

    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning_xcam.tensorboard import write_layout

    logger = TensorBoardLogger("runs")
    write_layout(logger.experiment, ["expected_gradcam", "gradcam"])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from tensorboard.plugins.custom_scalar import layout_pb2

__all__ = ["DETERMINISTIC_METHODS", "custom_scalar_layout", "scalars_url", "write_layout"]

#: Methods that log no noise floor (they are deterministic), so their drift is charted as ``1 − ρ``.
DETERMINISTIC_METHODS: frozenset[str] = frozenset({"gradcam", "integrated_gradcam"})

_ALERT_TAG = "xcam/alert"


def _check_methods(methods: object) -> list[str]:
    """``methods`` as a list of distinct non-empty names, or a clear error."""
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise TypeError(
            f"`methods` must be a sequence of method names such as ['expected_gradcam', 'gradcam'], "
            f"got {type(methods).__name__}."
        )
    names = list(methods)
    bad = [m for m in names if not isinstance(m, str)]
    if bad:
        raise TypeError(f"`methods` must hold strings, got {bad!r}.")
    if not names or not all(names) or len(set(names)) != len(names):
        raise ValueError(f"`methods` must be non-empty, distinct, non-empty names, got {names!r}.")
    return names


def _tag(method: str, name: str) -> str:
    """The anchored regex matching exactly the tag ``xcam/<method>/<name>``."""
    return f"{re.escape(f'xcam/{method}/{name}')}$"


def _chart(title: str, *tags: str) -> layout_pb2.Chart:
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(tags)))


def _drift_name(method: str, floors: bool) -> str:
    """The drift scalar a method is charted by: noise-floor units, or ``1 − ρ`` when it has no floor."""
    return "drift_floor_units" if floors and method not in DETERMINISTIC_METHODS else "drift_spearman"


def _drift_chart(method: str, reference: str, floors: bool) -> layout_pb2.Chart:
    """Drift against the ``"previous"`` or ``"first"`` evaluation, in the best unit the method has."""
    name = _drift_name(method, floors) + ("" if reference == "previous" else "_first")
    unit = ("noise-floor units (≈ 1 = resampling noise)" if name.startswith("drift_floor_units")
            else "rank distance 1 − ρ (0 = same ranking)")
    return _chart(f"{method}: drift vs {reference} evaluation, {unit}", _tag(method, name))


#: (metric, chart title, scalar name) of the scores charted per method.
_SCORE_CHARTS = (("insertion", "insertion AUC (higher is better)", "insertion_auc"),
                 ("deletion", "deletion AUC (lower is better)", "deletion_auc"),
                 ("infidelity", "infidelity (lower is better)", "infidelity"))
_CHARTED_METRICS = tuple(metric for metric, _, _ in _SCORE_CHARTS)


def _check_metrics(metrics: object) -> set[str]:
    """``metrics`` as a set of names, or a clear error (any names: those not charted are ignored)."""
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not all(isinstance(m, str) for m in metrics):
        raise TypeError(
            f"`metrics` must be a sequence of metric names such as ['insertion', 'deletion'], got {metrics!r}."
        )
    return set(metrics)


def custom_scalar_layout(
    methods: Sequence[str], *, floors: bool = True, shortcuts: str | None = None,
    metrics: Sequence[str] = _CHARTED_METRICS,
) -> layout_pb2.Layout:
    """The CUSTOM SCALARS layout for the monitor's scalars of ``methods``.

    Every chart holds one scalar: TensorBoard colours lines by run, not by tag, so two tags in one chart
    would be told apart only by hovering.

    Args:
        methods: The monitor's method names, in the order they should be shown, e.g.
            ``["expected_gradcam", "gradcam"]``.
        floors: Whether the stochastic methods have a noise floor (the monitor's ``floor_size > 0``); without
            one their drift is charted as ``1 − ρ``, like the deterministic methods'.
        shortcuts: The method whose maps feed the shortcut checks (one of ``methods``), or ``None`` for no
            shortcut category.
        metrics: The metrics the monitor computes (its ``metrics``): only their charts are laid out, so no
            chart stays empty (insertion − deletion needs both).

    Returns:
        A ``layout_pb2.Layout``: the category ``"xcam: at a glance"`` (the alert, then insertion − deletion
        and drift vs the previous evaluation of every method), then one category ``"xcam: <method>"`` per
        method (insertion, deletion, infidelity, drift vs the first evaluation), then with ``shortcuts``
        the category ``"xcam: shortcut signals"``; score charts only for the ``metrics`` given.

    Raises:
        TypeError: If ``methods`` is a string or holds something other than strings, or ``metrics`` is not
            a sequence of names.
        ValueError: If ``methods`` is empty, holds an empty name or a name twice, or ``shortcuts`` is not
            one of them.

    Example:
        >>> layout = custom_scalar_layout(["expected_gradcam", "gradcam"])
        >>> [c.title for c in layout.category]
        ['xcam: at a glance', 'xcam: expected_gradcam', 'xcam: gradcam']
    """
    methods = _check_methods(methods)
    computed = _check_metrics(metrics)
    glance = [_chart("shortcut alert: 1 = a new alert at this evaluation (details in TEXT)", f"{_ALERT_TAG}$")]
    for method in methods:
        if {"insertion", "deletion"} <= computed:
            glance.append(_chart(f"{method}: insertion − deletion (higher = more faithful)",
                                 _tag(method, "insertion_minus_deletion")))
        glance.append(_drift_chart(method, "previous", floors))
    categories = [layout_pb2.Category(title="xcam: at a glance", chart=glance)]
    for method in methods:
        charts = [_chart(f"{method}: {title}", _tag(method, tag))
                  for metric, title, tag in _SCORE_CHARTS if metric in computed]
        charts.append(_drift_chart(method, "first", floors))
        categories.append(layout_pb2.Category(title=f"xcam: {method}", chart=charts))
    if shortcuts is not None:
        if shortcuts not in methods:
            raise ValueError(f"`shortcuts` must be one of the methods {methods}, got {shortcuts!r}.")
        categories.append(layout_pb2.Category(title="xcam: shortcut signals", chart=[
            _chart(f"{shortcuts}: tiny-region reliance z, fill-in (an alert needs it, or the transplant z, "
                   "above 2.5 at consecutive evaluations)", _tag(shortcuts, "tiny_region_z")),
            _chart(f"{shortcuts}: tiny-region transplant z (pasted into other-class images)",
                   _tag(shortcuts, "tiny_region_transplant_z")),
            _chart(f"{shortcuts}: border mass (share of the maps in the 10 % border band)",
                   _tag(shortcuts, "border_mass")),
        ]))
    return layout_pb2.Layout(category=categories)


def write_layout(
    writer: Any, methods: Sequence[str], *, floors: bool = True, shortcuts: str | None = None,
    metrics: Sequence[str] = _CHARTED_METRICS,
) -> None:
    """Write :func:`custom_scalar_layout` into a run through its ``SummaryWriter``.

    Goes through the writer's public ``add_custom_scalars`` (torch's and tensorboardX's ``SummaryWriter``
    both have it); TensorBoard reads the last layout written to a run and merges categories across runs
    by title, so writing it again on resume is harmless.

    Args:
        writer: A ``SummaryWriter``, e.g. ``TensorBoardLogger(...).experiment``.
        methods: As :func:`custom_scalar_layout`.
        floors: As :func:`custom_scalar_layout`.
        shortcuts: As :func:`custom_scalar_layout`.
        metrics: As :func:`custom_scalar_layout`.

    Raises:
        TypeError: If ``writer`` has no ``add_custom_scalars`` method, or as :func:`custom_scalar_layout`.
        ValueError: As :func:`custom_scalar_layout`.

    Example::

        write_layout(trainer.logger.experiment, ["expected_gradcam", "gad"])
    """
    if not callable(getattr(writer, "add_custom_scalars", None)):
        raise TypeError(
            f"`writer` must be a SummaryWriter with `add_custom_scalars` (e.g. TensorBoardLogger.experiment), "
            f"got {type(writer).__name__}."
        )
    layout = custom_scalar_layout(methods, floors=floors, shortcuts=shortcuts, metrics=metrics)
    # add_custom_scalars takes {category: {chart: ["Multiline", [regex, ...]]}} and rebuilds this very proto.
    writer.add_custom_scalars({
        category.title: {chart.title: ["Multiline", list(chart.multiline.tag)] for chart in category.chart}
        for category in layout.category
    })


def scalars_url(methods: Sequence[str], base: str = "http://localhost:6006", *, floors: bool = True) -> str:
    """A SCALARS page address filtered to the "at a glance" curves, with smoothing off.

    TensorBoard's SCALARS page opens only the first two tag groups in name order, so ``xcam`` is closed
    below the training curves; its tag filter (which the address carries) lists the matches first, open.
    Smoothing is off because a monitor logs a handful of points, which the default smoothing distorts.

    Args:
        methods: As :func:`custom_scalar_layout`.
        base: TensorBoard's address.
        floors: As :func:`custom_scalar_layout`.

    Returns:
        ``<base>/#scalars&_smoothingWeight=0&tagFilter=<regex>``, the regex URL-quoted.

    Raises:
        TypeError: If ``base`` is not a string, or as :func:`custom_scalar_layout`.
        ValueError: As :func:`custom_scalar_layout`.

    Example:
        >>> scalars_url(["gradcam"]).split("&")[:2]
        ['http://localhost:6006/#scalars', '_smoothingWeight=0']
    """
    if not isinstance(base, str):
        raise TypeError(f"`base` must be a URL string such as 'http://localhost:6006', got {type(base).__name__}.")
    methods = _check_methods(methods)
    # The same tags as the layout's first category, as one short regex (the filter box shows it).
    per_method = "|".join(f"{re.escape(m)}/(insertion_minus_deletion|{_drift_name(m, floors)})" for m in methods)
    regex = f"^xcam/(alert|{per_method})$"
    return f"{base.rstrip('/')}/#scalars&_smoothingWeight=0&tagFilter={quote(regex, safe='')}"
