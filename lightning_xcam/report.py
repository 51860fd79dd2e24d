"""The report of one run read from an explanation store: a text table, a CSV file and a self-contained HTML page.

Everything is read through :class:`~lightning_xcam.store.ExplanationStore`'s public read methods; nothing
is written to the store. :func:`load_report` gathers the per-epoch scalars (the ``summaries`` table, as
logged to TensorBoard) into one row per ``epoch × method``; :func:`format_text`, :func:`write_csv` and
:func:`render_html` present that row set. The HTML page embeds everything it shows: line charts are
inline SVG drawn here, heatmaps are PNG data URIs (:func:`lightning_xcam.render.to_png`), the style
sheet is inline; it loads nothing from the network and runs no script.

Heatmap colour follows the TensorBoard images of :class:`~lightning_xcam.ExplanationMonitor`: a cell's
share of the map's mass relative to a uniform map, full colour at :data:`lightning_xcam.render.DISPLAY_CONCENTRATION` ×
uniform, so colours compare across epochs, samples and methods.

Example:
    >>> with ExplanationStore("lightning_logs/version_0/xcam.sqlite", create=False) as store:  # doctest: +SKIP
    ...     report = load_report(store, "default")
    ...     print(format_text(report))
    ...     Path("report.html").write_text(render_html(report, store), encoding="utf-8")
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_xcam.maps import degenerate
from lightning_xcam.render import DISPLAY_CONCENTRATION, colormap, relative_mass, scale_maps, to_png
from lightning_xcam.store import ExplanationStore

__all__ = [
    "MAIN_COLUMNS",
    "RunReport",
    "load_report",
    "format_text",
    "write_csv",
    "render_html",
    "line_chart",
]

#: The per-method scalars of the printed table, in order (those present in the run are shown).
MAIN_COLUMNS: tuple[str, ...] = (
    "insertion_auc", "deletion_auc", "infidelity", "max_sensitivity", "average_drop", "sparseness", "entropy",
    "drift_spearman", "drift_floor_units",
)

_METRIC_CHARTS = ("insertion_auc", "deletion_auc", "insertion_minus_deletion", "infidelity", "max_sensitivity",
                  "average_drop", "sparseness", "entropy")
_DRIFT_CHARTS = ("drift_spearman", "drift_floor_units", "drift_spearman_first", "drift_floor_units_first",
                 "noise_floor", "drift_js")
# Scalars whose value 1 means "indistinguishable from the explainer's own resampling noise".
_FLOOR_UNIT_COLUMNS = ("drift_floor_units", "drift_floor_units_first")

_MEANING = {
    "insertion_auc": "higher is better",
    "deletion_auc": "lower is better",
    "insertion_minus_deletion": "higher is better",
    "infidelity": "lower is better",
    "max_sensitivity": "lower is better",
    "average_drop": "lower is better (confidence lost on the map-weighted image)",
    "sparseness": "Gini index of the map: higher = more concentrated",
    "entropy": "Shannon entropy of the unit-mass map / log(cells), in [0, 1]: lower = more concentrated",
    "drift_spearman": "1 - Spearman rho to the previous evaluation (0 = same ranking)",
    "drift_spearman_first": "1 - Spearman rho to the first evaluation",
    "drift_floor_units": "drift_spearman / noise floor (about 1 = resampling noise)",
    "drift_floor_units_first": "drift_spearman_first / noise floor",
    "drift_js": "Jensen-Shannon divergence to the previous evaluation",
    "noise_floor": "Spearman distance between two random streams of the explainer",
}

# Colour-blind-friendly categorical palette, one colour per method.
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f")
_MAX_EVIDENCE = 16  # flagged samples whose maps an alert card shows

# Maps read for the heatmap grids, reused as alert evidence: (method, epoch) -> (sample ids or None, [B, h, w]).
_Loaded = dict[tuple[str, int], tuple[list[int] | None, Tensor]]


@dataclass(frozen=True)
class RunReport:
    """What the report shows of one run, as plain Python values.

    Attributes:
        path: The store file.
        run: The run's name.
        config: The run's recorded configuration.
        evaluations: Completed evaluations (``epoch``, ``step``, ``wall_time``, ``time_s``, ``num_samples``).
        methods: The explainers, sorted.
        method_columns: Per-method scalar names (``xcam/<method>/<name>``): :data:`MAIN_COLUMNS` present in
            the run first, then the others sorted.
        run_columns: Run-level scalar names (``xcam/<name>``, e.g. ``alert``, ``time_s``).
        rows: One dict per ``epoch × method``, by epoch then method: ``run``, ``epoch``, ``step``, ``method``,
            then every method and run column (``None`` where the store has no value).
        alerts: Alert rows as :meth:`ExplanationStore.alerts` returns them.
    """

    path: Path
    run: str
    config: dict[str, Any]
    evaluations: list[dict[str, Any]]
    methods: list[str]
    method_columns: list[str]
    run_columns: list[str]
    rows: list[dict[str, Any]]
    alerts: list[dict[str, Any]]

    @property
    def epochs(self) -> list[int]:
        """Epochs with a completed evaluation, ascending."""
        return [e["epoch"] for e in self.evaluations]

    @property
    def table_columns(self) -> list[str]:
        """The :data:`MAIN_COLUMNS` that the run holds, in that order."""
        return [c for c in MAIN_COLUMNS if c in self.method_columns]

    @property
    def csv_columns(self) -> list[str]:
        """Every column of :attr:`rows`, in order."""
        return ["run", "epoch", "step", "method", *self.method_columns, *self.run_columns]

    def series(self, method: str, column: str) -> list[tuple[int, float | None]]:
        """``(epoch, value)`` of one method's scalar over the run (``None`` where missing)."""
        return [(r["epoch"], r[column]) for r in self.rows if r["method"] == method]


def load_report(store: ExplanationStore, run: str) -> RunReport:
    """Read one run's scalars, evaluations and alerts from a store.

    Summary tags ``xcam/<method>/<name>`` become per-method columns ``<name>``; other tags are run-level
    columns (``xcam/<name>`` → ``<name>``; a tag outside ``xcam/``, or one whose name collides with a
    per-method column, keeps its full tag).

    Args:
        store: An open store.
        run: The run to read.

    Returns:
        The :class:`RunReport`.

    Raises:
        KeyError: If ``run`` is not in the store (the message lists the runs that are).

    Example:
        >>> report = load_report(store, "default")  # doctest: +SKIP
        >>> report.rows[0]["insertion_auc"]  # doctest: +SKIP
        0.1158
    """
    config = store.config(run)
    table = store.summary_table(run)
    per_method: dict[str, tuple[str, str]] = {}  # tag -> (method, column) for xcam/<method>/<name>
    run_tags: list[str] = []
    for tag in table[0] if table else ():
        parts = tag.split("/", 2)
        if len(parts) == 3 and parts[0] == "xcam":
            per_method[tag] = (parts[1], parts[2])
        elif tag not in ("epoch", "step"):
            run_tags.append(tag)
    method_names = {name for _, name in per_method.values()}
    taken = method_names | {"run", "epoch", "step", "method"}
    run_column = {t: t.removeprefix("xcam/") if t.removeprefix("xcam/") not in taken else t for t in run_tags}
    methods = sorted(set(store.methods(run)) | {method for method, _ in per_method.values()})
    method_columns = [c for c in MAIN_COLUMNS if c in method_names] + sorted(method_names - set(MAIN_COLUMNS))
    rows = []
    for entry in table:
        shared = {run_column[t]: entry[t] for t in run_tags}
        for method in methods:
            values = dict.fromkeys(method_columns)
            values.update({name: entry[t] for t, (m, name) in per_method.items() if m == method})
            rows.append({"run": run, "epoch": entry["epoch"], "step": entry["step"], "method": method, **values,
                         **shared})
    return RunReport(
        path=Path(store.path), run=run, config=config, evaluations=store.evaluations(run), methods=methods,
        method_columns=method_columns, run_columns=[run_column[t] for t in run_tags], rows=rows,
        alerts=store.alerts(run=run),
    )


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    """A cell: ``-`` for a missing value, ints (epochs, steps) in full, floats to 4 significant digits."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _class_name(class_index: int | None) -> str:
    return "all" if class_index is None else str(class_index)


def _samples(ids: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return (shown + f" (+{len(ids) - limit} more)" if len(ids) > limit else shown) or "-"


def _text_table(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 0) -> list[str]:
    """Aligned columns: the first ``left`` columns left-aligned, the rest right-aligned; the last not padded."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]
    lines = []
    for cells in (header, *body):
        padded = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        lines.append("  ".join(padded).rstrip())
    return lines


def format_text(report: RunReport) -> str:
    """The terminal report: a heading, one table per method (one row per epoch) and the alerts.

    Numbers are printed with 4 significant digits; ``-`` marks a scalar missing at that epoch (e.g. drift
    at the first evaluation, or max-sensitivity between its evaluations).

    Args:
        report: From :func:`load_report`.

    Returns:
        Plain ASCII text ending in a newline.

    Example:
        >>> print(format_text(load_report(store, "default")))  # doctest: +SKIP
        store: lightning_logs/version_0/xcam.sqlite  run: default  ...
    """
    epochs = report.epochs
    span = f"{len(epochs)} ({epochs[0]}..{epochs[-1]})" if epochs else "0"
    sizes = sorted({e["num_samples"] for e in report.evaluations})
    lines = [
        f"store: {report.path}  run: {report.run}",
        f"evaluations: {span}  methods: {', '.join(report.methods) or '-'}  "
        f"probe items: {', '.join(map(str, sizes)) or '-'}  alerts: {len(report.alerts)}",
    ]
    if not epochs:
        lines += ["", "No completed evaluation in this run yet."]
    alerts_at = {e: sum(a["epoch"] == e for a in report.alerts) for e in epochs}
    columns = report.table_columns
    for method in report.methods:
        body = [
            [*(_number(r[c]) for c in ("epoch", "step", *columns)), str(alerts_at[r["epoch"]])]
            for r in report.rows if r["method"] == method
        ]
        if body:
            lines += ["", f"[{method}]", *_text_table(["epoch", "step", *columns, "alerts"], body)]
    if columns and epochs:
        lines += ["", "Columns (xcam/<method>/<name> in TensorBoard):"]
        lines += [f"  {c}: {_MEANING[c]}" for c in columns if c in _MEANING]
    lines.append("")
    if report.alerts:
        lines.append(f"Alerts ({len(report.alerts)}):")
        body = [
            [str(a["epoch"]), a["kind"], _class_name(a["class_index"]),
             f"{_number(a['score'])} / {_number(a['threshold'])}", _samples(a["sample_indices"]), a["message"]]
            for a in report.alerts
        ]
        lines += _text_table(["epoch", "kind", "class", "score / threshold", "samples", "message"], body, left=6)
    else:
        lines.append("Alerts: none.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------


def write_csv(report: RunReport, path: str | Path) -> None:
    """Write :attr:`RunReport.rows` as CSV: one row per ``epoch × method``, a column per scalar.

    Numbers are written with full precision (``repr`` of the float, so they read back exactly); a missing
    value is an empty cell.

    Args:
        report: From :func:`load_report`.
        path: The output file (overwritten).

    Raises:
        OSError: If the file cannot be written.

    Example:
        >>> write_csv(load_report(store, "default"), "xcam.csv")  # doctest: +SKIP
    """
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=report.csv_columns)
        writer.writeheader()
        for row in report.rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


# --------------------------------------------------------------------------------------------------
# SVG charts
# --------------------------------------------------------------------------------------------------


def _nice_step(span: float, count: int) -> float:
    """The smallest of 1, 2, 5 × 10^k that cuts ``span`` into at most ``count`` intervals."""
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))


def _ticks(low: float, high: float, count: int = 4, integer: bool = False) -> list[float]:
    """Round tick values covering ``[low, high]`` (the first ``<= low``, the last ``>= high``).

    ``integer`` gives non-negative whole-number ticks (epochs). An empty range is widened by 10 % of its
    value (or by 1 around 0) so that a single point sits inside the axis.
    """
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    step = _nice_step(high - low, count)
    if integer:
        step = max(1.0, round(step))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    if integer:
        first = max(first, 0)  # no axis below epoch 0 around a single evaluation at epoch 0
    return [float(f"{i * step:.12g}") for i in range(first, last + 1)]  # 12 significant digits: no 0.30000000000000004


def line_chart(
    title: str,
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    colors: Mapping[str, str],
    *,
    marks: Sequence[float] = (),
    reference: float | None = None,
    width: int = 340,
    height: int = 190,
) -> str:
    """An inline SVG line chart of values over epochs, one polyline per series.

    Missing values (``None`` or non-finite) break the line. Every point carries an SVG ``<title>``
    tooltip with its exact value, so no script is needed.

    Args:
        title: Accessible name of the chart (``aria-label``).
        series: ``{name: [(epoch, value), ...]}``.
        colors: ``{name: CSS colour}`` for every series.
        marks: Epochs marked with a dashed red vertical line (alerts).
        reference: A value drawn as a dashed grey horizontal line (e.g. 1 noise-floor unit).
        width: Width in pixels.
        height: Height in pixels.

    Returns:
        ``<svg>...</svg>`` markup; a chart with a "no data" note when no series has a finite value.

    Example:
        >>> svg = line_chart("deletion_auc", {"gradcam": [(0, 0.3), (1, 0.2)]}, {"gradcam": "#4e79a7"})
        >>> svg.startswith("<svg") and svg.count("<circle") == 2
        True
    """
    left, right, top, bottom = 58, 12, 10, 30
    points = {name: [(x, y) for x, y in pts if y is not None and math.isfinite(y)] for name, pts in series.items()}
    xs = [x for pts in series.values() for x, _ in pts] + list(marks)
    ys = [y for pts in points.values() for _, y in pts] + ([] if reference is None else [reference])
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{html.escape(title)}">']
    if not xs or not any(points.values()):
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="note">no data</text></svg>')
        return "".join(parts)
    x_ticks = _ticks(min(xs), max(xs), 6, integer=True)
    y_ticks = _ticks(min(ys), max(ys), 4)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return round(left + (x - x0) / (x1 - x0) * (width - left - right), 2)

    def py(y: float) -> float:
        return round(height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom), 2)

    for y in y_ticks:
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{py(y)}" y2="{py(y)}"/>'
                     f'<text class="tick" x="{left - 6}" y="{py(y) + 4}" text-anchor="end">{y:.3g}</text>')
    for x in x_ticks:
        parts.append(f'<text class="tick" x="{px(x)}" y="{height - bottom + 16}" text-anchor="middle">{x:.0f}</text>')
    parts.append(f'<text class="tick" x="{width - right}" y="{height - 2}" text-anchor="end">epoch</text>')
    if reference is not None:
        parts.append(f'<line class="reference" x1="{left}" x2="{width - right}" y1="{py(reference)}" '
                     f'y2="{py(reference)}"/>')
    for x in marks:
        parts.append(f'<line class="mark" x1="{px(x)}" x2="{px(x)}" y1="{top}" y2="{height - bottom}"/>')
    for name, pts in series.items():
        color = html.escape(colors[name])
        segment: list[str] = []
        segments = [segment]
        for x, y in pts:
            if y is None or not math.isfinite(y):
                segment = []
                segments.append(segment)
            else:
                segment.append(f"{px(x)},{py(y)}")
        for seg in segments:
            if len(seg) > 1:
                parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(seg)}"/>')
        for x, y in points[name]:
            parts.append(f'<circle cx="{px(x)}" cy="{py(y)}" r="3" fill="{color}">'
                         f'<title>{html.escape(name)}, epoch {x:.0f}: {y:.6g}</title></circle>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}"/>'
                 f'<line class="axis" x1="{left}" x2="{width - right}" y1="{height - bottom}" '
                 f'y2="{height - bottom}"/></svg>')
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; --alert: #cf222e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); margin: 0 auto;
       max-width: 1200px; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid
var(--line); padding-bottom: 4px; } h3 { font-size: 15px; margin: 16px 0 6px; }
.meta, .note, figcaption { color: var(--muted); } nav a { margin-right: 14px; color: #0969da; }
table { border-collapse: collapse; margin: 4px 0 12px; } th, td { padding: 3px 10px; border-bottom: 1px solid
var(--line); text-align: right; white-space: nowrap; } th { background: var(--bg); font-weight: 600; }
td.text, th.text { text-align: left; white-space: normal; } code { font-size: 12px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; border: 1px solid var(--line);
border-radius: 6px; padding: 8px; } figcaption { font-size: 12px; max-width: 330px; }
figcaption b { color: var(--fg); }
.chart .grid { stroke: #eaeef2; } .chart .axis { stroke: #8c959f; } .chart .tick, .chart .note { font-size: 11px;
fill: var(--muted); } .chart .reference { stroke: #8c959f; stroke-dasharray: 4 3; }
.chart .mark { stroke: var(--alert); stroke-dasharray: 3 3; opacity: .6; }
.legend span { display: inline-block; margin-right: 14px; } .swatch { display: inline-block; width: 12px;
height: 12px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
.scroll { overflow-x: auto; } img.map { width: 48px; height: 48px; image-rendering: pixelated; display: block; }
img.degenerate { outline: 2px dashed var(--muted); outline-offset: -2px; }
.maps td, .maps th { padding: 2px; text-align: center; } .maps th.row { padding-right: 8px; }
.alert { border-left: 4px solid var(--alert); background: #fff8f8; padding: 8px 12px; margin: 10px 0;
border-radius: 0 6px 6px 0; } .alert p { margin: 4px 0; } .evidence { display: flex; gap: 6px; flex-wrap: wrap; }
.evidence figure { padding: 4px; border: 0; text-align: center; font-size: 11px; }
.colorbar { height: 12px; width: 240px; image-rendering: auto; vertical-align: middle; margin: 0 6px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(image: Tensor) -> str:
    return "data:image/png;base64," + base64.b64encode(to_png(image)).decode("ascii")


def _heat_images(maps: Tensor, cmap: str) -> list[str]:
    """PNG data URIs of maps on the fixed concentration scale (see the module docstring)."""
    concentration = relative_mass(maps)
    return [_data_uri(rgb) for rgb in colormap(scale_maps(concentration, DISPLAY_CONCENTRATION), cmap)]


def _map_samples(store: ExplanationStore, run: str, method: str, epoch: int) -> tuple[list[int], Tensor]:
    """The stored maps of ``(method, epoch)`` and their sample ids, ascending (``KeyError`` if none)."""
    return store.map_samples(method, epoch, run=run), store.maps(method, epoch, run=run)


def _maps_section(report: RunReport, store: ExplanationStore, cmap: str) -> tuple[str, _Loaded]:
    """Heatmap grids (rows = epochs, columns = samples) per method, and the maps by ``(method, epoch)``."""
    loaded: _Loaded = {}
    parts = []
    for method in report.methods:
        grid: list[tuple[int, list[int] | None, list[str], Tensor]] = []
        for epoch in report.epochs:
            try:
                ids, maps = _map_samples(store, report.run, method, epoch)
            except KeyError:
                continue
            loaded[(method, epoch)] = (ids, maps)
            grid.append((epoch, ids, _heat_images(maps, cmap), degenerate(maps)))
        if not grid:
            continue
        columns = grid[0][1] if all(g[1] == grid[0][1] for g in grid) else None
        width = max(len(g[2]) for g in grid)
        head = "".join(f"<th>{_e(s)}</th>" for s in (columns or [f"#{i}" for i in range(width)]))
        parts.append(f'<h3>{_e(method)}</h3><div class="scroll"><table class="maps"><tr><th class="row">epoch'
                     f' \\ probe</th>{head}</tr>')
        for epoch, ids, images, bad in grid:
            cells = []
            for i, uri in enumerate(images):
                sample = f"probe {ids[i]}" if ids is not None else f"#{i}"
                label = f"{method} epoch {epoch} {sample}" + (" (degenerate: all zero)" if bool(bad[i]) else "")
                css = "map degenerate" if bool(bad[i]) else "map"
                cells.append(f'<td><img class="{css}" alt="{_e(label)}" title="{_e(label)}" src="{uri}"></td>')
            parts.append(f'<tr><th class="row">{epoch}</th>{"".join(cells)}</tr>')
        parts.append("</table></div>")
    if not parts:
        return '<p class="note">The store holds no maps for this run.</p>', loaded
    return "".join(parts), loaded


def _colorbar(cmap: str) -> str:
    ramp = colormap(torch.linspace(0, 1, 256).view(1, 1, 256), cmap)[0]
    return (f'<p class="note">Colour: 0 <img class="colorbar" alt="colour scale" src="{_data_uri(ramp)}"> '
            f"&ge; {DISPLAY_CONCENTRATION:g}&times; a uniform map's cell mass (fixed across epochs and samples; "
            "dashed outline = degenerate all-zero map). The maps are the low-resolution drift maps the store "
            "keeps.</p>")


def _alerts_section(report: RunReport, loaded: _Loaded, cmap: str) -> str:
    if not report.alerts:
        return '<p class="note">No alerts in this run.</p>'
    parts = []
    for a in report.alerts:
        threshold = "-" if a["threshold"] is None else f"{a['threshold']:.4g}"
        concerned = "all classes" if a["class_index"] is None else f"class {a['class_index']}"
        parts.append(
            f'<div class="alert"><h3>epoch {a["epoch"]} &middot; {_e(a["kind"])} &middot; '
            f'{_e(concerned)}</h3><p>{_e(a["message"])}</p>'
            f'<p class="meta">score <b>{a["score"]:.4g}</b> / threshold {threshold} &middot; probe items: '
            f'{_e(", ".join(map(str, a["sample_indices"])) or "-")}</p>'
        )
        flagged = a["sample_indices"][:_MAX_EVIDENCE]
        which = "flagged items" if len(a["sample_indices"]) <= _MAX_EVIDENCE else f"first {_MAX_EVIDENCE} flagged items"
        for method in report.methods:
            ids, maps = loaded.get((method, a["epoch"]), (None, None))
            if ids is None or not flagged:
                continue
            rows = [ids.index(s) for s in flagged if s in ids]
            if not rows:
                continue
            images = _heat_images(maps[rows], cmap)
            figures = "".join(
                f'<figure><img class="map" alt="{_e(method)} epoch {a["epoch"]} probe {ids[r]}" src="{uri}">'
                f"probe {ids[r]}</figure>"
                for r, uri in zip(rows, images)
            )
            parts.append(f'<p class="meta">{_e(method)} maps of the {which} at epoch {a["epoch"]}:</p>'
                         f'<div class="evidence">{figures}</div>')
        parts.append("</div>")
    return "".join(parts)


def _html_table(report: RunReport, method: str) -> str:
    columns = report.table_columns
    head = "".join(f"<th>{_e(c)}</th>" for c in ["epoch", "step", *columns])
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_number(r[c]))}</td>" for c in ["epoch", "step", *columns])
        + "</tr>"
        for r in report.rows if r["method"] == method
    )
    return f'<h3>{_e(method)}</h3><div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _charts(report: RunReport, names: Sequence[str], colors: Mapping[str, str]) -> str:
    marks = sorted({a["epoch"] for a in report.alerts})
    figures = []
    for name in names:
        if name not in report.method_columns:
            continue
        series = {m: report.series(m, name) for m in report.methods}
        reference = 1.0 if name in _FLOOR_UNIT_COLUMNS else None
        svg = line_chart(name, series, colors, marks=marks, reference=reference)
        meaning = _MEANING.get(name, "")
        figures.append(f"<figure>{svg}<figcaption><b>{_e(name)}</b> {_e(meaning)}</figcaption></figure>")
    if not figures:
        return '<p class="note">Not recorded in this run.</p>'
    return f'<div class="charts">{"".join(figures)}</div>'


def _config_section(report: RunReport) -> str:
    rows = "".join(
        f'<tr><th class="text">{_e(k)}</th><td class="text"><code>'
        f"{_e(v if isinstance(v, str) else json.dumps(v))}</code></td></tr>"
        for k, v in sorted(report.config.items())
    )
    evaluations = "".join(
        f"<tr><td>{e['epoch']}</td><td>{_e(_number(e['step']))}</td><td>{_e(_number(e['time_s']))}</td>"
        f"<td>{e['num_samples']}</td><td>{_e(_utc(e['wall_time']))}</td></tr>"
        for e in report.evaluations
    )
    return (f"<table>{rows or '<tr><td>(no configuration recorded)</td></tr>'}</table><h3>Evaluations</h3>"
            "<table><tr><th>epoch</th><th>step</th><th>time_s</th><th>probe items</th><th>finished (UTC)</th></tr>"
            f"{evaluations}</table>")


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def render_html(report: RunReport, store: ExplanationStore, cmap: str = "turbo") -> str:
    """A self-contained HTML page: tables, metric and drift charts, alerts with evidence, heatmaps, config.

    The page references nothing outside itself: inline CSS, inline SVG charts, PNG data URIs, no script.

    Args:
        report: From :func:`load_report`.
        store: The open store the report was read from (the maps are read from it).
        cmap: A colormap of :data:`lightning_xcam.render.COLORMAPS`.

    Returns:
        The page as a string (UTF-8 text).

    Raises:
        ValueError: On an unknown ``cmap``.

    Example:
        >>> page = render_html(load_report(store, "default"), store)  # doctest: +SKIP
        >>> Path("report.html").write_text(page, encoding="utf-8")  # doctest: +SKIP
    """
    colors = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(report.methods)}
    legend = "".join(f'<span><i class="swatch" style="background:{c}"></i>{_e(m)}</span>'
                     for m, c in colors.items())
    maps_html, loaded = _maps_section(report, store, cmap)
    epochs = report.epochs
    span = f"epochs {epochs[0]}&ndash;{epochs[-1]} ({len(epochs)} evaluations)" if epochs else "no evaluations yet"
    alert_note = (' Dashed red lines mark epochs with alerts.' if report.alerts else "")
    tables = "".join(_html_table(report, m) for m in report.methods) or '<p class="note">No scalars recorded.</p>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lightning-xcam report: {_e(report.run)}</title><style>{_CSS}</style></head><body>
<h1>lightning-xcam report &middot; run {_e(report.run)}</h1>
<p class="meta">{_e(report.path)} &middot; {span} &middot; methods: {_e(", ".join(report.methods) or "-")}
&middot; alerts: {len(report.alerts)}</p>
<nav><a href="#summary">Summary</a><a href="#metrics">Metrics</a><a href="#drift">Drift</a>
<a href="#alerts">Alerts ({len(report.alerts)})</a><a href="#heatmaps">Heatmaps</a>
<a href="#config">Configuration</a></nav>
<h2 id="summary">Summary per epoch</h2>{tables}
<h2 id="metrics">Metrics over epochs</h2><p class="legend">{legend}</p>
<p class="note">Means over the probe items (degenerate maps left out).{alert_note}</p>
{_charts(report, _METRIC_CHARTS, colors)}
<h2 id="drift">Drift over epochs</h2><p class="note">Medians over the probe items of the 16&times;16 map distances;
the dashed grey line is 1 noise-floor unit.{alert_note}</p>{_charts(report, _DRIFT_CHARTS, colors)}
<h2 id="alerts">Alerts</h2>{_alerts_section(report, loaded, cmap)}
<h2 id="heatmaps">Heatmaps per epoch</h2>{_colorbar(cmap)}{maps_html}
<h2 id="config">Configuration</h2>{_config_section(report)}
</body></html>
"""
