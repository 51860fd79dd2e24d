"""Shortcut early warning: spurious-feature signals, interventional confirmation and the warning rule.

The maths of ALGORITHMS.md §6, tensor in / tensor out, batched, device-agnostic, no Lightning:

* **Signals with a known suspect region** (§6.1): :func:`spurious_mass` and the area-normalised ratio
  :func:`area_ratio` (ρ).
* **Mask-free signals** (§6.2): :func:`border_mass`, same-location :func:`concentration` per group (per
  class or, better, per cluster), :func:`a50` (how small a region holds half the relevance) and
  SpRAy-style :func:`spectral_clusters` with flags for small, tight or focused clusters.
* **Interventional confirmation** (§6.3): :func:`region_reliance` fills a suspected region and compares
  the confidence drop with the same shape at random positions; :func:`top_region` turns maps into the
  "top few percent" region, so tiny-region reliance is ``region_reliance(..., top_region(maps))``. That
  is a *necessity* test; :func:`region_sufficiency` is its *sufficiency* twin (transplant): it pastes an
  item's region into images of other classes and compares the rise of the item's class with pasting
  random regions of the same item. An object that still decides once a tag is removed hides the tag from
  the first test but not from the second.
* **The warning rule** (§6.4): :class:`WarningRule` turns per-evaluation :class:`Observation` s into
  :class:`Alert` s. A signal must rise above its own noise floor for ``patience`` consecutive
  evaluations *and* sit at an abnormal level *and* (when supplied) be confirmed interventionally.
  Drift alone is never an alarm: explanations change most while the model learns (§5.6); it is logged
  and stored (:mod:`lightning_xcam.drift`), not judged.
* **One evaluation** (what :class:`~lightning_xcam.ExplanationMonitor` calls): :func:`observe` turns a
  probe's maps into observations (border mass, tiny-region reliance, the most suspicious spectral cluster,
  spurious mass with masks), each with its interventional check; :func:`evidence_image` draws an alert's
  flagged items and their mean map for TensorBoard.

Maps are raw non-negative ``[B, h, w]`` explanations at any resolution; every statistic uses unit-mass
maps (ALGORITHMS §1.4). Degenerate maps (max ≤ 0 or non-finite, :func:`lightning_xcam.maps.degenerate`)
never produce NaN: per-map signals give them a documented benign value (border mass 0, spurious mass 0,
ρ 0, ``a50`` 1) and group statistics leave them out and count them.

Limits (ALGORITHMS §6.5): spatial heatmaps only see *localised, visible* shortcuts (a tag, a watermark, a
border). Colour, texture, blur and global-statistics shortcuts (Colored MNIST, a dataset-wide tint, JPEG
artefacts) spread over the whole image and are invisible to every signal here; attributions can also miss
unknown artifacts or show reliance that is absent (Adebayo et al., 2022), which is why alerts ask for the
interventional check. A 7×7 CAM cannot outline a small patch: expect partial signals at low resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xcam._checks import Targets, check_images, check_int, grid_batch, resolve_targets
from lightning_xcam.maps import degenerate, pool, unit_mass, upsample
from lightning_xcam.methods._guard import model_device, explanation_context, fresh_input
from lightning_xcam.metrics._perturb import Substrate, check_max_batch, chunked_scores, clean_logits, make_substrate

__all__ = [
    "ALERT_KINDS",
    "Alert",
    "Observation",
    "WarningRule",
    "border_mass",
    "spurious_mass",
    "area_ratio",
    "a50",
    "Concentration",
    "concentration",
    "kmeans",
    "ClusterFlagRules",
    "SpectralClusters",
    "spectral_clusters",
    "top_region",
    "Reliance",
    "region_reliance",
    "Sufficiency",
    "region_sufficiency",
    "observe",
    "evidence_image",
]

ALERT_KINDS = ("spurious_mass", "border", "cluster", "intervention")

_FOCUS_GRID = 16  # concentration is measured at 16×16 (ALGORITHMS §6.2)
_SPECTRAL_GRID = 32  # SpRAy distances at 32×32 (ALGORITHMS §6.2)
_Z_FLOOR = 1e-3  # smallest standard error of a mean paired gap in p(class) taken seriously


# --------------------------------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """One shortcut warning.

    Attributes:
        epoch: The evaluation's training epoch.
        kind: One of :data:`ALERT_KINDS`.
        score: The signal value that raised it (ρ, border mass, focus, reliance z or transplant z).
        threshold: The level it had to exceed.
        class_index: The class concerned, or ``None`` for an overall signal.
        sample_indices: Probe items that show it (may be empty).
        message: One human line stating the numbers.

    Example:
        >>> Alert(3, "border", 0.41, 0.2, 7, (1, 4), "epoch 3: ...").to_dict()["sample_indices"]
        [1, 4]
    """

    epoch: int
    kind: str
    score: float
    threshold: float
    class_index: int | None
    sample_indices: tuple[int, ...]
    message: str

    def __post_init__(self) -> None:
        if self.kind not in ALERT_KINDS:
            raise ValueError(f"`kind` must be one of {ALERT_KINDS}, got {self.kind!r}.")
        # Plain Python types only, so the alert survives JSON, SQLite and a checkpoint's state_dict.
        object.__setattr__(self, "epoch", int(self.epoch))
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "class_index", None if self.class_index is None else int(self.class_index))
        object.__setattr__(self, "sample_indices", tuple(int(i) for i in self.sample_indices))
        object.__setattr__(self, "message", str(self.message))

    def to_dict(self) -> dict[str, Any]:
        """The alert as a dict of plain Python values (``sample_indices`` as a list)."""
        out = asdict(self)
        out["sample_indices"] = list(self.sample_indices)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------------------
# Signals on maps (§6.1-6.2)
# --------------------------------------------------------------------------------------------------


def _as_maps(maps: object, name: str = "maps") -> Tensor:
    maps = grid_batch(maps, name)
    if maps.shape[0] == 0:
        raise ValueError(f"`{name}` holds no map (shape {tuple(maps.shape)}); pass at least one.")
    if maps.is_complex() or maps.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold real numbers, got dtype {maps.dtype}.")
    return maps.detach().float()


def _as_masks(masks: object, batch: int, name: str = "masks") -> Tensor:
    """Masks as float32 ``[B, H, W]`` weights in [0, 1] (bool or 0/1 masks; soft masks allowed)."""
    masks = grid_batch(masks, name, batch, "H, W").detach().float()
    if not bool(torch.isfinite(masks).all()) or bool(((masks < 0) | (masks > 1)).any()):
        raise ValueError(f"`{name}` must be boolean or hold weights in [0, 1].")
    return masks


def _band_weights(length: int, band: float, device: torch.device) -> Tensor:
    """Share of each of ``length`` cells lying in a band of ``band·length`` cells at either end."""
    width = band * length
    start = torch.arange(length, device=device, dtype=torch.float32)
    head = (width - start).clamp(0, 1)
    tail = (start + 1 - (length - width)).clamp(0, 1)
    return (head + tail).clamp(max=1)


def border_mass(maps: Tensor, band: float = 0.1) -> Tensor:
    """Share of relevance in a border band of ``band`` of the height and width on each side (§6.2).

    The band is measured in cells of the map itself and may cut cells: a cell counts with the share of its
    area inside the band (``1 − (1 − r_i)(1 − c_j)`` for row and column shares ``r_i``, ``c_j``), so a
    uniform map scores exactly the band's area share ``1 − (1 − 2·band)²`` (0.36 at the default) at any
    resolution.

    Args:
        maps: ``[B, h, w]`` non-negative maps (any resolution; not normalised).
        band: Band width per side as a fraction of each side, in ``[0, 0.5]``.

    Returns:
        ``[B]`` float32 in ``[0, 1]``; 0 for degenerate maps.

    Raises:
        TypeError / ValueError: On a non-tensor, a wrong shape or a band outside ``[0, 0.5]``.

    Example:
        >>> m = torch.zeros(1, 10, 10); m[0, 0, 5] = 1; m[0, 5, 5] = 1
        >>> border_mass(m)
        tensor([0.5000])
    """
    maps = _as_maps(maps)
    if isinstance(band, bool) or not isinstance(band, (int, float)) or not 0 <= band <= 0.5:
        raise ValueError(f"`band` must be a fraction in [0, 0.5] of each side, got {band!r}.")
    rows = _band_weights(maps.shape[1], band, maps.device)
    cols = _band_weights(maps.shape[2], band, maps.device)
    weights = 1 - torch.outer(1 - rows, 1 - cols)
    return (unit_mass(maps) * weights).flatten(1).sum(dim=1)


def spurious_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of relevance inside a known suspect region ``S``: ``m = Σ_S M / Σ M`` (§6.1).

    Maps are bilinearly resized to the masks' resolution first (ALGORITHMS §1.4).

    Args:
        maps: ``[B, h, w]`` non-negative maps.
        masks: ``[B, H, W]`` boolean (or 0/1, or soft weights in [0, 1]) suspect regions.

    Returns:
        ``[B]`` float32 in ``[0, 1]``; 0 for degenerate maps.

    Raises:
        TypeError / ValueError: On maps or masks of the wrong type or shape, or masks outside ``[0, 1]``.

    Example:
        >>> spurious_mass(torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[False, True]]]))
        tensor([0.7500])
    """
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps.shape[0]).to(maps.device)
    return (unit_mass(upsample(maps, tuple(masks.shape[-2:]))) * masks).flatten(1).sum(dim=1)


def area_ratio(maps: Tensor, masks: Tensor) -> Tensor:
    """Area-normalised spurious mass ``ρ = m / (|S| / HW)`` (§6.1); ``ρ > 1``: more than the area share.

    Args:
        maps: ``[B, h, w]`` non-negative maps.
        masks: ``[B, H, W]`` suspect regions (see :func:`spurious_mass`).

    Returns:
        ``[B]`` float32 ``≥ 0``; 0 for degenerate maps and for empty masks.

    Raises:
        TypeError / ValueError: As :func:`spurious_mass`.

    Example:
        >>> area_ratio(torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[False, True]]]))
        tensor([1.5000])
    """
    mass = spurious_mass(maps, masks)
    share = _as_masks(masks, mass.shape[0]).to(mass.device).flatten(1).mean(dim=1)
    return torch.where(share > 0, mass / share.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(mass))


def a50(maps: Tensor) -> Tensor:
    """Smallest fraction of cells holding half of the relevance (§6.2; small = a tiny region).

    Cells are the map's own cells; ranks use a stable descending sort. A relative tolerance of 1e-6 on the
    half keeps exact halves (e.g. two equal cells) from depending on rounding.

    Args:
        maps: ``[B, h, w]`` non-negative maps.

    Returns:
        ``[B]`` float32 in ``(0, 1]``; 1 for degenerate maps (nothing concentrated).

    Raises:
        TypeError / ValueError: On maps that are not a real ``[B, h, w]`` tensor with ``B >= 1``.

    Example:
        >>> a50(torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]))
        tensor([0.2500, 0.5000])
    """
    maps = _as_maps(maps)
    mass = unit_mass(maps).flatten(1).sort(dim=1, descending=True, stable=True).values
    cells = (mass.cumsum(dim=1) < 0.5 * (1 - 1e-6)).sum(dim=1) + 1
    fraction = cells.float() / mass.shape[1]
    return torch.where(degenerate(maps), torch.ones_like(fraction), fraction)


@dataclass
class Concentration:
    """Same-location concentration per group (see :func:`concentration`).

    Attributes:
        groups: ``LongTensor [G]``: the sorted group ids.
        focus: ``[G]``: ``1 − H(mean map)/log n`` at 16×16 (1 = all mass in one cell, 0 = uniform).
        coherence: ``[G]``: mean cosine of the group's maps to its mean map.
        count: ``LongTensor [G]``: non-degenerate maps per group.
        num_degenerate: ``LongTensor [G]``: degenerate maps left out per group.
    """

    groups: Tensor
    focus: Tensor
    coherence: Tensor
    count: Tensor
    num_degenerate: Tensor


def concentration(maps: Tensor, groups: Tensor) -> Concentration:
    """Same-location concentration of each group's maps (§6.2).

    Maps are pooled to 16×16 and normalised to unit mass. Per group, the mean map ``P̄`` gives
    ``focus = 1 − H(P̄)/log 256`` (natural log) and ``coherence = mean_i cos(P_i, P̄)``. Pass cluster
    assignments as ``groups`` rather than classes: a shortcut minority hides in a class mean.

    Args:
        maps: ``[B, h, w]`` non-negative maps.
        groups: ``LongTensor [B]`` group id per map (class, cluster, ...).

    Returns:
        A :class:`Concentration`; groups without a valid map get focus 0 and coherence 0.

    Raises:
        TypeError / ValueError: On bad maps or groups.

    Example:
        >>> m = torch.zeros(2, 16, 16); m[:, 0, 0] = 1
        >>> concentration(m, torch.tensor([0, 0])).focus
        tensor([1.])
    """
    maps = _as_maps(maps)
    groups = _int_vector(groups, maps.shape[0], "groups")
    valid = ~degenerate(maps)
    mass = unit_mass(pool(torch.where(valid.view(-1, 1, 1), maps, torch.zeros_like(maps)), _FOCUS_GRID)).flatten(1)
    ids, inverse = torch.unique(groups.to(maps.device), return_inverse=True)
    weight = valid.float()
    count = torch.zeros(len(ids), device=maps.device).index_add_(0, inverse, weight)
    mean = torch.zeros(len(ids), mass.shape[1], device=maps.device).index_add_(0, inverse, mass * weight[:, None])
    mean = mean / count.clamp_min(1)[:, None]
    entropy = -torch.special.xlogy(mean, mean).sum(dim=1)
    focus = torch.where(count > 0, 1 - entropy / math.log(mass.shape[1]), torch.zeros_like(entropy))
    own = mean[inverse]
    tiny = torch.finfo(torch.float32).tiny
    cosine = (mass * own).sum(dim=1) / (mass.norm(dim=1) * own.norm(dim=1)).clamp_min(tiny)
    coherence = torch.zeros(len(ids), device=maps.device).index_add_(0, inverse, cosine * weight) / count.clamp_min(1)
    bad = torch.zeros(len(ids), device=maps.device).index_add_(0, inverse, 1 - weight)
    return Concentration(ids, focus.clamp(0, 1), coherence, count.long(), bad.long())


# --------------------------------------------------------------------------------------------------
# SpRAy-style spectral clustering (§6.2)
# --------------------------------------------------------------------------------------------------


def _default_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def kmeans(
    points: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    n_init: int = 8,
    max_iter: int = 100,
) -> Tensor:
    """Deterministic k-means (Lloyd) with k-means++ seeding, ``n_init`` restarts run as one batch.

    Seeding draws only from ``generator`` (k-means++: the next centre with probability ∝ squared distance
    to the nearest chosen one). Ties in assignment go to the lowest cluster index; an empty cluster keeps
    its centre; the restart with the lowest inertia wins (the first on ties).

    Args:
        points: ``[n, d]`` floating points.
        k: Number of clusters, ``1 <= k <= n``.
        generator: Source of randomness; ``None`` uses a fresh generator seeded 0.
        n_init: Restarts.
        max_iter: Lloyd iterations per restart at most.

    Returns:
        ``LongTensor [n]`` cluster index per point.

    Raises:
        TypeError: If ``points`` is not a floating ``[n, d]`` tensor, or ``k``, ``n_init`` or ``max_iter``
            not an int.
        ValueError: If ``k`` is outside ``[1, n]``, or ``n_init`` or ``max_iter`` below 1.

    Example:
        >>> kmeans(torch.tensor([[0.0], [0.1], [5.0], [5.1]]), 2).unique(return_counts=True)[1].tolist()
        [2, 2]
    """
    if not isinstance(points, Tensor) or points.ndim != 2 or not points.is_floating_point():
        raise TypeError("`points` must be a floating tensor of shape [n, d].")
    n = points.shape[0]
    check_int(k, "k", maximum=n, why=" (at most the number of points)")
    check_int(n_init, "n_init")
    check_int(max_iter, "max_iter")
    generator = generator or _default_generator(points.device)
    draw_device = generator.device
    batch = points.unsqueeze(0).expand(n_init, n, points.shape[1])
    first = torch.randint(n, (n_init,), generator=generator, device=draw_device).to(points.device)
    centres = points[first].unsqueeze(1)
    for _ in range(1, k):
        nearest = torch.cdist(batch, centres).amin(dim=2).square()
        total = nearest.sum(dim=1, keepdim=True)
        weights = torch.where(total > 0, nearest, torch.ones_like(nearest))  # all points taken: uniform
        # an MPS generator (the maps' device) cannot hold float64 weights: draw from float32 ones there
        draw_dtype = torch.float32 if draw_device.type == "mps" else weights.dtype
        pick = torch.multinomial(weights.to(draw_device, draw_dtype), 1, generator=generator).to(points.device)
        centres = torch.cat([centres, points[pick]], dim=1)
    assign = torch.full((n_init, n), -1, dtype=torch.long, device=points.device)
    for _ in range(max_iter):
        new = torch.cdist(batch, centres).argmin(dim=2)
        if torch.equal(new, assign):
            break
        assign = new
        onehot = torch.nn.functional.one_hot(assign, k).to(points.dtype)
        counts = onehot.sum(dim=1)
        sums = onehot.transpose(1, 2) @ batch
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    inertia = torch.cdist(batch, centres).amin(dim=2).square().sum(dim=1)
    return assign[int(inertia.argmin())]


@dataclass(frozen=True)
class ClusterFlagRules:
    """When a spectral cluster is flagged (defaults from ShortKit-ML's SpRAy detector, ALGORITHMS §6.2).

    A cluster is flagged when any rule holds:

    * ``small``: ``fraction < small_fraction`` and ``purity >= min_purity`` and at least
      ``min_size`` maps (one or two odd maps are outliers, not a pattern);
    * ``focused``: ``focus >= focus_min`` and ``purity >= min_purity`` (a tight same-location cluster);
    * ``mixed``: ``silhouette >= silhouette_min`` and ``purity < mixed_purity`` (a well separated cluster
      that cuts across the ``groups`` labels; only meaningful when ``groups`` are given);
    * ``isolated`` [project]: at least ``isolation_min`` of the members' kNN edges stay inside the cluster
      (a near-separate component of the graph: a distinct explanation strategy), the cluster is a
      minority (``fraction <= minority_max``) of at least ``min_size`` maps. This is what catches a
      30 % corner-shortcut minority whose maps are noisy enough that its focus stays low.

    A flag is a candidate for inspection and for the interventional check, not yet an alarm.
    """

    small_fraction: float = 0.05
    min_purity: float = 0.8
    min_size: int = 3
    focus_min: float = 0.6
    silhouette_min: float = 0.3
    mixed_purity: float = 0.6
    isolation_min: float = 0.95
    minority_max: float = 0.5


@dataclass
class SpectralClusters:
    """Result of :func:`spectral_clusters`. Cluster ids are global (unique across classes).

    Attributes:
        assignments: ``LongTensor [B]``: cluster id per map; -1 for degenerate maps and skipped classes.
        cluster_class: ``LongTensor [K]``: the class of each cluster.
        size: ``LongTensor [K]``: maps per cluster.
        fraction: ``[K]``: size over the class's valid maps.
        focus: ``[K]``: same-location focus of the cluster (see :func:`concentration`).
        coherence: ``[K]``: mean cosine of members to the cluster mean map.
        purity: ``[K]``: share of the most common ``groups`` value (1 without ``groups``).
        silhouette: ``[K]``: mean silhouette of the members (Euclidean, 32×32 unit-mass maps).
        isolation: ``[K]``: share of the members' kNN-graph edges that stay inside the cluster.
        flagged: ``BoolTensor [K]``.
        reasons: Per cluster, the rules of :class:`ClusterFlagRules` that fired (``""`` if none).
        num_clusters: ``{class: number of clusters}`` for the classes clustered.
        eigenvalues: ``{class: the smallest Laplacian eigenvalues, float64}`` (on the CPU for MPS maps).
        skipped_classes: Classes with fewer than ``min_maps`` valid maps.
        num_degenerate: Degenerate maps left out.
    """

    assignments: Tensor
    cluster_class: Tensor
    size: Tensor
    fraction: Tensor
    focus: Tensor
    coherence: Tensor
    purity: Tensor
    silhouette: Tensor
    isolation: Tensor
    flagged: Tensor
    reasons: list[str]
    num_clusters: dict[int, int]
    eigenvalues: dict[int, Tensor]
    skipped_classes: list[int]
    num_degenerate: int

    def members(self, cluster: int) -> Tensor:
        """``LongTensor``: indices of the maps in ``cluster``."""
        return (self.assignments == cluster).nonzero().flatten()


def _knn_laplacian_spectrum(points: Tensor, k_nn: int, n_eigen: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Distances, adjacency, eigenvalues and eigenvectors of the normalised Laplacian of the kNN graph."""
    n = points.shape[0]
    distances = torch.cdist(points, points)
    others = distances + torch.diag(torch.full((n,), math.inf, dtype=points.dtype, device=points.device))
    neighbours = others.sort(dim=1, stable=True).indices[:, : min(k_nn, n - 1)]
    adjacency = torch.zeros_like(distances).scatter_(1, neighbours, 1.0)
    adjacency = torch.maximum(adjacency, adjacency.T)  # symmetric: i~j if either is among the other's kNN
    scale = adjacency.sum(dim=1).rsqrt()
    laplacian = torch.eye(n, dtype=points.dtype, device=points.device) - scale[:, None] * adjacency * scale[None]
    values, vectors = torch.linalg.eigh(laplacian)
    return distances, adjacency, values[:n_eigen], vectors[:, :n_eigen]


def _silhouette(distances: Tensor, assign: Tensor, k: int) -> Tensor:
    """Per-point silhouette ``(b − a)/max(a, b)``; 0 for singletons and when there is one cluster."""
    if k == 1:
        return torch.zeros(distances.shape[0], dtype=distances.dtype, device=distances.device)
    onehot = torch.nn.functional.one_hot(assign, k).to(distances.dtype)
    counts = onehot.sum(dim=0)
    sums = distances @ onehot
    own = counts[assign]
    a = sums.gather(1, assign[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    mean_other = torch.where(onehot.bool() | (counts == 0), math.inf, sums / counts.clamp_min(1))
    b = mean_other.amin(dim=1)
    denom = torch.maximum(a, b)
    value = torch.where(denom > 0, (b - a) / denom.clamp_min(torch.finfo(distances.dtype).tiny), torch.zeros_like(a))
    return torch.where(own > 1, value, torch.zeros_like(value))


def _int_vector(value: object, batch: int, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.is_floating_point() or value.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor of shape [{batch}], got {type(value).__name__}.")
    if value.shape != (batch,):
        raise ValueError(f"`{name}` must have shape [{batch}] (one per map), got {tuple(value.shape)}.")
    return value.long()


def spectral_clusters(
    maps: Tensor,
    labels: Tensor,
    *,
    k_nn: int = 10,
    max_clusters: int = 32,
    min_maps: int = 50,
    groups: Tensor | None = None,
    rules: ClusterFlagRules = ClusterFlagRules(),
    zero_tol: float = 1e-8,
    n_init: int = 8,
    generator: torch.Generator | None = None,
) -> SpectralClusters:
    """SpRAy-style spectral clustering of explanations, per class, with shortcut flags (§6.2).

    Per class (a Python loop over classes, never over maps): pool the valid maps to 32×32, unit sum,
    Euclidean distances, binary symmetric kNN graph (``i ~ j`` if either is among the other's ``k_nn``
    nearest), symmetric normalised Laplacian ``I − D^{-1/2} A D^{-1/2}``, its ``max_clusters`` smallest
    eigenvalues (``torch.linalg.eigh`` in float64). Number of clusters = max(eigenvalues below
    ``zero_tol`` = connected components, eigengap position); the eigengap alone under-counts separated
    components when the clean maps are spread out. k-means (:func:`kmeans`) on the row-normalised
    spectral embedding (Ng-Jordan-Weiss). Then per cluster: size, fraction, focus and coherence
    (:func:`concentration`), purity against ``groups`` and mean silhouette; flags per :class:`ClusterFlagRules`.

    SpRAy needs many maps per class (``min_maps``, default 50): run it on a screening set every few
    evaluations, with a cheap explainer.

    Args:
        maps: ``[B, h, w]`` non-negative maps.
        labels: ``LongTensor [B]``: the partition to cluster within (predicted or true class).
        k_nn: Neighbours in the kNN graph.
        max_clusters: Eigenvalues examined, hence the largest number of clusters per class.
        min_maps: Classes with fewer valid maps are skipped (and listed).
        groups: Optional ``LongTensor [B]`` for purity (e.g. true labels, a known attribute).
        rules: Flag thresholds.
        zero_tol: Eigenvalues below this count as zero (one per connected component).
        n_init: k-means restarts.
        generator: Source of k-means++ randomness; ``None`` uses a fresh generator seeded 0.

    Returns:
        A :class:`SpectralClusters`.

    Raises:
        TypeError / ValueError: On bad maps, labels, groups or parameters.

    Example:
        >>> res = spectral_clusters(torch.rand(60, 8, 8), torch.zeros(60, dtype=torch.long))
        >>> int(res.size.sum())
        60
    """
    maps = _as_maps(maps)
    batch, device = maps.shape[0], maps.device
    labels = _int_vector(labels, batch, "labels").to(device)
    if groups is not None:
        groups = _int_vector(groups, batch, "groups").to(device)
    for name, value, low in (("k_nn", k_nn, 1), ("max_clusters", max_clusters, 2), ("min_maps", min_maps, 3)):
        check_int(value, name, minimum=low)
    generator = generator or _default_generator(device)
    valid = ~degenerate(maps)
    # float64 for the spectrum; MPS has no float64, so that (small, [n, n]) part runs on the CPU there.
    work = torch.device("cpu") if device.type == "mps" else device
    points_all = unit_mass(pool(torch.where(valid.view(-1, 1, 1), maps, torch.zeros_like(maps)), _SPECTRAL_GRID))
    points_all = points_all.flatten(1).to(work, torch.float64)
    assignments = torch.full((batch,), -1, dtype=torch.long, device=device)
    rows: list[Tensor] = []
    num_clusters: dict[int, int] = {}
    eigenvalues: dict[int, Tensor] = {}
    skipped: list[int] = []
    offset = 0
    for cls in torch.unique(labels).tolist():
        index = ((labels == cls) & valid).nonzero().flatten()
        n = index.numel()
        if n < min_maps:
            skipped.append(int(cls))
            continue
        spectrum = _knn_laplacian_spectrum(points_all[index.to(work)], k_nn, min(max_clusters, n))
        distances, adjacency, values, vectors = spectrum
        zeros = int((values < zero_tol).sum())
        gap = int((values[1:] - values[:-1]).argmax()) + 1
        k = min(max(zeros, gap), values.numel())
        embedding = vectors[:, :k]
        embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
        local = kmeans(embedding, k, generator, n_init=n_init)
        # Renumber by first appearance so ids do not depend on k-means' arbitrary labels.
        first_seen = torch.full((k,), n, dtype=torch.long, device=local.device)
        first_seen.scatter_reduce_(0, local, torch.arange(n, device=local.device), reduce="amin")
        order = first_seen.argsort(stable=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(k, device=order.device))
        present = int((first_seen < n).sum())
        local = rank[local]
        sil = _silhouette(distances, local, present)
        onehot = torch.nn.functional.one_hot(local, present).to(torch.float64)
        size = onehot.sum(dim=0)
        mean_sil = (onehot.T @ sil) / size
        isolation = (onehot * (adjacency @ onehot)).sum(dim=0) / (onehot.T @ adjacency.sum(dim=1))
        assignments[index] = (local + offset).to(device)
        conc = concentration(maps[index], local.to(device))
        if groups is not None:
            member_groups = torch.unique(groups[index], return_inverse=True)[1].to(local.device)
            tally = torch.zeros(present, int(member_groups.max()) + 1, dtype=torch.float64, device=local.device)
            ones = torch.ones(n, dtype=torch.float64, device=local.device)
            tally.index_put_((local, member_groups), ones, accumulate=True)
            purity = tally.amax(dim=1) / size
        else:
            purity = torch.ones(present, dtype=torch.float64, device=local.device)
        rows.append(
            torch.stack(
                [
                    torch.full((present,), float(cls), dtype=torch.float64, device=local.device),
                    size,
                    size / n,
                    conc.focus.to(local.device, torch.float64),
                    conc.coherence.to(local.device, torch.float64),
                    purity,
                    mean_sil,
                    isolation,
                ],
                dim=1,
            )
        )
        num_clusters[int(cls)] = present
        eigenvalues[int(cls)] = values
        offset += present
    # the per-cluster table stays float64 on `work`; only its final (float32, long, bool) columns reach `device`
    table = torch.cat(rows) if rows else torch.zeros(0, 8, dtype=torch.float64, device=work)
    cluster_class, size, fraction, focus, coherence, purity, silhouette, isolation = table.T
    small = (fraction < rules.small_fraction) & (purity >= rules.min_purity) & (size >= rules.min_size)
    focused = (focus >= rules.focus_min) & (purity >= rules.min_purity)
    mixed = (silhouette >= rules.silhouette_min) & (purity < rules.mixed_purity)
    isolated = (isolation >= rules.isolation_min) & (fraction <= rules.minority_max) & (size >= rules.min_size)
    hits = {"small": small, "focused": focused, "mixed": mixed, "isolated": isolated}
    reasons = [",".join(name for name, hit in hits.items() if hit[i]) for i in range(table.shape[0])]
    return SpectralClusters(
        assignments=assignments,
        cluster_class=cluster_class.long().to(device),
        size=size.long().to(device),
        fraction=fraction.float().to(device),
        focus=focus.float().to(device),
        coherence=coherence.float().to(device),
        purity=purity.float().to(device),
        silhouette=silhouette.float().to(device),
        isolation=isolation.float().to(device),
        flagged=(small | focused | mixed | isolated).to(device),
        reasons=reasons,
        num_clusters=num_clusters,
        eigenvalues=eigenvalues,
        skipped_classes=skipped,
        num_degenerate=int((~valid).sum()),
    )


# --------------------------------------------------------------------------------------------------
# Interventional confirmation (§6.3)
# --------------------------------------------------------------------------------------------------


def top_region(maps: Tensor, fraction: float = 0.05, size: tuple[int, int] | None = None) -> Tensor:
    """The top ``fraction`` of cells of each (upsampled) map as a boolean region.

    ``k = max(1, ⌈fraction·H·W⌉)`` cells with the largest values; ties break by raster index (stable
    descending sort, ALGORITHMS §1.6). Degenerate maps give an empty region (so their reliance is 0).

    Args:
        maps: ``[B, h, w]`` non-negative maps.
        fraction: Share of cells in ``(0, 1]``.
        size: ``(H, W)`` to upsample to first (bilinear), e.g. the input size; ``None`` keeps ``(h, w)``.

    Returns:
        ``BoolTensor [B, H, W]``.

    Raises:
        TypeError / ValueError: On bad maps, a ``fraction`` outside ``(0, 1]`` or a bad ``size``.

    Example:
        >>> top_region(torch.tensor([[[0.0, 2.0], [1.0, 1.0]]]), fraction=0.5)
        tensor([[[False,  True],
                 [ True, False]]])
    """
    maps = _as_maps(maps)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be a share of cells in (0, 1], got {fraction!r}.")
    if size is not None:
        size = tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"`size` must be None or two positive ints (H, W), got {size!r}.")
    up = upsample(maps, size)
    flat = up.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1] - 1e-9))
    order = flat.sort(dim=1, descending=True, stable=True).indices
    region = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order[:, :k], True)
    region &= ~degenerate(maps)[:, None]
    return region.view_as(up)


@dataclass
class Reliance:
    """Result of :func:`region_reliance` (probabilities of the target class).

    Attributes:
        drop_region: ``[B]``: ``Δp_R = p_c(x) − p_c(x_R)``.
        drop_random: ``[B, n_random]``: the same for the region's shape at random positions.
        z: ``[B]``: ``(Δp_R − mean Δp_rand)/(std Δp_rand + 1e-6)`` (sample std).
        p_clean: ``[B]``: ``p_c(x)``.
        targets: ``LongTensor [B]``: the classes ``c``.
        controls_overlap: ``BoolTensor [B]``: some controls overlap the region or repeat (the image has no
            room for ``n_random`` copies disjoint from it, even wrapped around, or for as many rings).
    """

    drop_region: Tensor
    drop_random: Tensor
    z: Tensor
    p_clean: Tensor
    targets: Tensor
    controls_overlap: Tensor


def _bounding_boxes(masks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per mask: first and last occupied row and column (an empty mask gives first 0, last -1)."""

    def span(occupied: Tensor) -> tuple[Tensor, Tensor]:
        length = occupied.shape[1]
        index = torch.arange(length, device=occupied.device).expand_as(occupied)
        first = torch.where(occupied, index, length).amin(dim=1)
        last = torch.where(occupied, index, -1).amax(dim=1)
        return torch.where(last >= 0, first, torch.zeros_like(first)), last

    top, bottom = span(masks.any(dim=2))
    left, right = span(masks.any(dim=1))
    return top, bottom, left, right


def _random_offsets(masks: Tensor, n_random: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n_random`` shifts ``(dy, dx)`` per mask, apart from the region whenever the image allows.

    Every shift of the grid ``[-(H-1), H-1] × [-(W-1), W-1]`` gets a tier: 4 if the shifted bounding box
    stays in the image and is disjoint from the original one (``|dy| ≥ height`` or ``|dx| ≥ width``); 3 if
    the shifted region, wrapped around the image (:func:`_shift_masks`), shares no pixel with the original
    (regions whose bounding box spans the image, such as all four corners, which become a central block);
    2 if it only stays in the image; 1 for the null shift; 0 otherwise. Shifts are drawn uniformly without
    replacement from the best tier available (uniform keys from ``generator``, top-k); when fewer than
    ``n_random`` shifts of tier ≥ 2 exist they are reused in turn, and a region with none (one covering the
    image, or a frame) gets the null shift (:func:`_control_masks` then turns to :func:`_ring_controls`).
    """
    batch, height, width = masks.shape
    device = masks.device
    top, bottom, left, right = _bounding_boxes(masks)
    dy = torch.arange(-(height - 1), height, device=device)
    dx = torch.arange(-(width - 1), width, device=device)
    inside_y = (top[:, None] + dy >= 0) & (bottom[:, None] + dy <= height - 1)
    inside_x = (left[:, None] + dx >= 0) & (right[:, None] + dx <= width - 1)
    apart_y = dy.abs()[None] >= (bottom - top + 1)[:, None]
    apart_x = dx.abs()[None] >= (right - left + 1)[:, None]
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    apart = apart_y[:, :, None] | apart_x[:, None, :]
    null = (dy[:, None] == 0) & (dx[None, :] == 0)
    # pixels shared by the region and its cyclic shift: the circular autocorrelation, via the FFT
    spectrum = torch.fft.rfft2(masks.float())
    shared = torch.fft.irfft2(spectrum * spectrum.conj(), s=(height, width))
    shared = shared[:, dy % height][:, :, dx % width]
    disjoint = (shared < 0.5) & ~null
    tier = torch.where(
        inside & apart, 4, torch.where(disjoint, 3, torch.where(inside & ~null, 2, torch.where(null, 1, 0)))
    ).flatten(1)
    keys = torch.rand(tier.shape, generator=generator, device=generator.device).to(device)
    order = (2 * tier + keys).topk(min(n_random, tier.shape[1]), dim=1).indices
    usable = (tier >= 2).sum(dim=1).clamp_min(1)
    pick = order.gather(1, torch.arange(n_random, device=device)[None] % usable[:, None].clamp(max=order.shape[1]))
    overlap = (tier >= 3).sum(dim=1) < n_random
    return dy[pick // dx.numel()], dx[pick % dx.numel()], overlap


def _shift_masks(masks: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """``out[b, r, i, j] = masks[b, (i − dy[b, r]) mod H, (j − dx[b, r]) mod W]``: shifts that wrap around
    the image (a shift that keeps the region inside moves it without wrapping)."""
    batch, height, width = masks.shape
    rounds = dy.shape[1]
    rows = (torch.arange(height, device=masks.device)[None, None] - dy[..., None]) % height
    cols = (torch.arange(width, device=masks.device)[None, None] - dx[..., None]) % width
    source = masks[:, None].expand(batch, rounds, height, width).to(torch.uint8)
    out = source.gather(2, rows[..., None].expand(batch, rounds, height, width))
    out = out.gather(3, cols[:, :, None, :].expand(batch, rounds, height, width))
    return out.bool()


def _ring_controls(masks: Tensor, n_random: int) -> tuple[Tensor, Tensor]:
    """Controls for regions that no translation moves apart (a frame around the image): the other pixels,
    ranked by chessboard distance to the region (ties by raster index) and cut into ``n_random`` sets of the
    region's area, nearest first; a frame's controls are the rings inside it. When the rest of the image
    holds fewer such sets they are reused in turn, and a region with no room for one set (it covers more
    than half of the image) is its own control.

    Returns:
        ``[B, n_random, H, W]`` controls and ``BoolTensor [B]``: some control repeats or is the region.
    """
    batch, height, width = masks.shape
    area = masks.flatten(1).sum(dim=1)
    distance = torch.where(masks, 0, height + width).flatten(1)
    grown = masks[:, None].float()
    for step in range(1, max(height, width)):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        distance = torch.minimum(distance, torch.where(grown.flatten(1) > 0, step, height + width))
        if bool((grown > 0).all()):
            break
    raster = torch.arange(height * width, device=masks.device)
    key = torch.where(masks.flatten(1), (height + width + 1) * height * width, distance * height * width + raster)
    rank = key.argsort(dim=1, stable=True).argsort(dim=1)  # position of each pixel in the nearest-first order
    sets = (height * width - area) // area.clamp_min(1)
    ring = torch.arange(n_random, device=masks.device)[None] % sets.clamp_min(1)[:, None]
    start = (ring * area[:, None])[..., None]
    controls = (rank[:, None] >= start) & (rank[:, None] < start + area[:, None, None])
    controls = torch.where((sets > 0)[:, None, None], controls, masks.flatten(1)[:, None])
    return controls.view(batch, n_random, height, width), sets < n_random


def _control_masks(masks: Tensor, n_random: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The ``n_random`` equal-area controls of each region: moved copies (:func:`_random_offsets`), or
    rings (:func:`_ring_controls`) for a region that no translation moves.

    Returns:
        ``[B, n_random, H, W]`` controls and ``BoolTensor [B]``: some control overlaps the region or repeats.
    """
    dy, dx, overlap = _random_offsets(masks, n_random, generator)
    controls = _shift_masks(masks, dy, dx)
    unmoved = ((dy == 0) & (dx == 0)).all(dim=1) & masks.flatten(1).any(dim=1)
    if bool(unmoved.any()):
        rings, repeated = _ring_controls(masks[unmoved], n_random)
        controls[unmoved], overlap[unmoved] = rings, repeated
    return controls, overlap


def _check_regions(x: Tensor, region_masks: object, n_random: object, max_batch: int | None) -> Tensor:
    """Validate the shared arguments of :func:`region_reliance` and :func:`region_sufficiency`."""
    check_images(x)
    batch, _, height, width = x.shape
    region_masks = grid_batch(region_masks, "region_masks", batch, "H, W")
    if region_masks.shape != (batch, height, width):
        raise ValueError(
            f"`region_masks` must have shape [{batch}, {height}, {width}] (the images' batch and size), "
            f"got {tuple(region_masks.shape)}; upsample maps with `top_region(maps, size=(H, W))`."
        )
    check_int(n_random, "n_random", minimum=2, why=" (controls give a mean and a std)")
    check_max_batch(max_batch)
    return region_masks


def region_reliance(
    model: nn.Module,
    x: Tensor,
    region_masks: Tensor,
    targets: Targets = None,
    *,
    n_random: int = 8,
    fill: Substrate = "blur",
    generator: torch.Generator | None = None,
    max_batch: int | None = 256,
) -> Reliance:
    """How much the target's confidence depends on a region, against the same shape elsewhere (§6.3).

    ``x_R`` replaces the pixels of ``R`` (all channels) by the substrate ``fill`` (RISE blur, per-image
    mean colour, zero = dataset mean in model-input space, or a tensor). Controls: ``R`` translated to
    ``n_random`` random positions inside the image, disjoint from ``R``'s bounding box when the image
    leaves room; else wrapped around the image so that they share no pixel with ``R`` (all four corners
    become a central block); else overlapping ``R`` (see ``controls_overlap``; shifts reuse when fewer
    positions exist). A region that every translation meets (a frame around the image) is compared with
    equal-area rings of the other pixels, nearest first (the rings inside the frame); such a region covering
    more than half of the image has no such ring and is its own control, giving ``z = 0``. All
    ``B·(1 + n_random)`` filled inputs are built lazily and forwarded in chunks of ``max_batch`` inside
    :func:`explanation_context`; the model is left exactly as found.

    Args:
        model: Classifier returning ``[N, K]`` logits.
        x: ``[B, C, H, W]`` images in model-input space.
        region_masks: ``[B, H, W]`` boolean regions (0/1 accepted).
        targets: ``None`` (clean argmax), an int or ``LongTensor [B]``.
        n_random: Random controls per image (>= 2, for a standard deviation).
        fill: Substrate: ``"blur"``, ``"mean"``, ``"zero"`` or a tensor broadcastable to ``x``.
        generator: Source of the random positions; ``None`` uses a fresh generator seeded 0.
        max_batch: Rows per forward pass (``None``: all at once). Results do not depend on it.

    Returns:
        A :class:`Reliance` on the model's device.

    Raises:
        TypeError / ValueError: On bad images, masks, targets or parameters.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> region = torch.zeros(2, 4, 4, dtype=torch.bool); region[:, :2, :2] = True
        >>> region_reliance(net, torch.randn(2, 1, 4, 4), region, n_random=2).z.shape
        torch.Size([2])
    """
    region_masks = _check_regions(x, region_masks, n_random, max_batch)
    batch = x.shape[0]
    rows_per_image = 1 + n_random
    with explanation_context(model):
        device = model_device(model)
        images = fresh_input(x, device=device)
        generator = generator or _default_generator(device)
        logits = clean_logits(model, images, max_batch)
        targets = resolve_targets(targets, logits)
        p_clean = logits.softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
        region = region_masks.to(device) != 0
        controls, overlap = _control_masks(region, n_random, generator)
        regions = torch.cat([region[:, None], controls], dim=1).flatten(0, 1)
        substrate = make_substrate(images, fill)
        owner = torch.arange(batch, device=device).repeat_interleave(rows_per_image)

        def build(start: int, stop: int) -> Tensor:
            items = owner[start:stop]
            return torch.where(regions[start:stop, None], substrate[items], images[items])

        scores = chunked_scores(model, batch * rows_per_image, build, targets[owner], max_batch)
    drops = p_clean[:, None] - scores.view(batch, rows_per_image)
    drop_region, drop_random = drops[:, 0], drops[:, 1:]
    z = (drop_region - drop_random.mean(dim=1)) / (drop_random.std(dim=1) + 1e-6)
    return Reliance(drop_region, drop_random, z, p_clean, targets, overlap)


@dataclass
class Sufficiency:
    """Result of :func:`region_sufficiency` (probabilities of the donor's class).

    Attributes:
        rise_region: ``[B]``: mean over recipients ``j`` of ``p_c(x_j ← R_i) − p_c(x_j)``, with ``c`` the
            donor ``i``'s class and ``x_j ← R_i`` the recipient with the donor's pixels pasted in ``R_i``.
        rise_random: ``[B, n_random]``: the same for the region's shape at random positions of the donor.
        recipients: ``LongTensor [B, n_recipients]``: the recipients' rows (``-1``: no recipient left).
        valid: ``BoolTensor [B]``: the donor has at least one recipient (else its rises are 0).
        targets: ``LongTensor [B]``: the classes ``c``.
    """

    rise_region: Tensor
    rise_random: Tensor
    recipients: Tensor
    valid: Tensor
    targets: Tensor


def _recipients(targets: Tensor, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per item, ``count`` other items of another class, drawn without replacement; ``-1`` when none are left."""
    batch = targets.shape[0]
    keys = torch.rand(batch, batch, generator=generator, device=generator.device).to(targets.device)
    other = targets[None, :] != targets[:, None]
    pick = (other.float() * 2 + keys).topk(min(count, batch), dim=1).indices
    ok = other.gather(1, pick)
    return torch.where(ok, pick, torch.full_like(pick, -1)), ok


def region_sufficiency(
    model: nn.Module,
    x: Tensor,
    region_masks: Tensor,
    targets: Targets = None,
    *,
    n_recipients: int = 4,
    n_random: int = 8,
    generator: torch.Generator | None = None,
    max_batch: int | None = 256,
) -> Sufficiency:
    """Transplant check: does a region *carry* the decision into other images? (sufficiency, §6.3)

    :func:`region_reliance` asks whether the decision *needs* a region; when the object still decides
    once a tag is removed (a face next to a face-coded tag) that drop is ~0 although the tag can override
    the decision. Here the donor ``i``'s pixels inside ``R_i`` are pasted at the same place into
    ``n_recipients`` other probe images ``j`` whose class differs from ``c = targets[i]``, and the rise of
    ``p_c`` on ``j`` is compared with pasting the donor's pixels under the same shape at ``n_random``
    random positions (the controls of :func:`region_reliance`). On a clean model a piece of the object
    also lends some ``p_c``, which is why the paired gap, not the rise, is what confirms.

    Recipients are drawn per donor without replacement among the other-class items (uniform keys from
    ``generator``); a donor with fewer such items uses what there is, and one with none gets rises 0 and
    ``valid = False``. All ``B·n_recipients·(1 + n_random)`` pasted inputs are built lazily and forwarded
    in chunks of ``max_batch`` inside :func:`explanation_context`; the model is left exactly as found.

    Args:
        model: Classifier returning ``[N, K]`` logits.
        x: ``[B, C, H, W]`` images in model-input space.
        region_masks: ``[B, H, W]`` boolean regions of the donors (0/1 accepted).
        targets: ``None`` (clean argmax), an int or ``LongTensor [B]``: the donors' classes.
        n_recipients: Recipients per donor (>= 1).
        n_random: Random controls per donor (>= 2).
        generator: Source of the recipients and of the random positions; ``None``: a generator seeded 0.
        max_batch: Rows per forward pass (``None``: all at once). Results do not depend on it.

    Returns:
        A :class:`Sufficiency` on the model's device.

    Raises:
        TypeError / ValueError: On bad images, masks, targets or parameters.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        >>> region = torch.zeros(4, 4, 4, dtype=torch.bool); region[:, :2, :2] = True
        >>> res = region_sufficiency(net, torch.randn(4, 1, 4, 4), region, torch.tensor([0, 0, 1, 1]), n_random=2)
        >>> res.rise_random.shape
        torch.Size([4, 2])
    """
    region_masks = _check_regions(x, region_masks, n_random, max_batch)
    check_int(n_recipients, "n_recipients")
    batch = x.shape[0]
    with explanation_context(model):
        device = model_device(model)
        images = fresh_input(x, device=device)
        generator = generator or _default_generator(device)
        logits = clean_logits(model, images, max_batch)
        targets = resolve_targets(targets, logits)
        probs = logits.softmax(dim=1)
        recipients, ok = _recipients(targets, n_recipients, generator)
        count = recipients.shape[1]
        region = region_masks.to(device) != 0
        controls, _ = _control_masks(region, n_random, generator)
        regions = torch.cat([region[:, None], controls], dim=1)  # [B, 1 + n_random, H, W]
        shapes = 1 + n_random
        rows = torch.arange(batch * count * shapes, device=device)
        donor, recipient = rows // (count * shapes), recipients.clamp_min(0).flatten()[rows // shapes]
        shape = rows % shapes

        def build(start: int, stop: int) -> Tensor:
            i, j, k = donor[start:stop], recipient[start:stop], shape[start:stop]
            return torch.where(regions[i, k][:, None], images[i], images[j])

        scores = chunked_scores(model, rows.numel(), build, targets[donor], max_batch)
    before = probs[recipients.clamp_min(0), targets[:, None]]  # [B, count]: p_c of the untouched recipients
    rises = scores.view(batch, count, shapes) - before[..., None]
    weight = ok.float()[..., None]
    mean = (rises * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1)
    return Sufficiency(mean[:, 0], mean[:, 1:], recipients, ok.any(dim=1), targets)


# --------------------------------------------------------------------------------------------------
# The warning rule (§6.4)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One signal of one evaluation, for :meth:`WarningRule.update`.

    Attributes:
        kind: ``"spurious_mass"`` (value = ρ), ``"border"`` (border mass), ``"cluster"`` (top-cluster
            focus or concentration) or ``"intervention"`` (tiny-region reliance z).
        class_index: The class, or ``None`` for an overall signal.
        value: The signal on stream 0 (the main run).
        replicate: The same signal on stream 1 (the noise-floor replicate), or ``None``.
        sample_indices: Probe items that show the signal.
        drop_region: Interventional check: mean ``Δp_R`` (see :func:`region_reliance`), or ``None``.
        drop_random: Mean ``Δp`` of the equal-area random controls, or ``None``.
        z: Paired reliance ``z``; when given, ``z >= confirm_z`` and (with the drops) a drop gap of at least
            ``min_drop`` confirm by necessity. ``None``: no check run.
        rise_region: Transplant check (see :func:`region_sufficiency`): mean rise ``Δp`` when the region is
            pasted into other-class images, or ``None``.
        rise_random: Mean rise for the equal-area random controls, or ``None``.
        z_transplant: Paired transplant z; when given, ``z_transplant >= confirm_z`` and a rise gap of at least
            ``min_rise`` also confirm (an alert needs necessity *or* sufficiency). ``None``: no check run.
        flagged: A SpRAy flag is up for this class (kind ``"cluster"``): warns without a rise.
        detail: Extra words for the message (e.g. the flag's reasons).
    """

    kind: str
    class_index: int | None
    value: float
    replicate: float | None = None
    sample_indices: tuple[int, ...] = ()
    drop_region: float | None = None
    drop_random: float | None = None
    z: float | None = None
    rise_region: float | None = None
    rise_random: float | None = None
    z_transplant: float | None = None
    flagged: bool = False
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ALERT_KINDS:
            raise ValueError(f"`kind` must be one of {ALERT_KINDS}, got {self.kind!r}.")
        for name in ("value", "replicate", "drop_region", "drop_random", "z", "rise_region", "rise_random",
                     "z_transplant"):
            number = getattr(self, name)
            if number is None:
                continue
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ValueError(f"`{name}` of a {self.kind!r} observation must be a finite number, got {number!r}.")
            object.__setattr__(self, name, float(number))
        object.__setattr__(self, "sample_indices", tuple(int(i) for i in self.sample_indices))


def _key(kind: str, class_index: int | None) -> str:
    return f"{kind}:{'overall' if class_index is None else int(class_index)}"


@dataclass
class _Series:
    """State of one (kind, class) signal; plain Python values only."""

    first_epoch: int
    first: float
    last: float | None = None
    floor: list[float] = field(default_factory=list)  # recent (S0 − S1)² / 2
    streak: int = 0
    pending: bool = False
    armed: bool = True


class WarningRule:
    """The shortcut warning rule of ALGORITHMS §6.4, one small state machine per (kind, class).

    At each evaluation, for each observed signal ``S_t`` with noise-floor replicate ``S_t^(1)``:

    * floor scale ``σ̂ = max(sqrt(mean over the last floor_window evaluations of (S^(0) − S^(1))²/2),
      min_sigma)``. ``min_sigma`` (in the signal's units) keeps σ̂ positive and is the smallest change
      taken seriously: deterministic explainers (Grad-CAM) have a zero replicate floor;
    * rise ``(S_t − S_{t−1})/σ̂ > z_rise`` for ``patience`` consecutive evaluations makes the signal
      *pending*, provided the level is abnormal: ``ρ > level`` (``spurious_mass``), else ``S_t`` above its
      first-evaluation value by more than ``z_rise`` σ̂ (``border``, ``cluster``);
    * ``intervention`` observations carry a reliance z, already measured in units of their own floor (the
      equal-area random controls of the same evaluation): they become pending after ``patience``
      consecutive *confirmed* evaluations, with no rise needed, so a shortcut learned within the first
      epoch still warns;
    * a pending signal raises an :class:`Alert` when its interventional check confirms. Two checks may be
      supplied and either one confirms: *necessity* (``z >= confirm_z`` and, when the drops are supplied
      too, ``drop_region − drop_random >= min_drop``) or *sufficiency* (``z_transplant >= confirm_z`` and
      ``rise_region − rise_random >= min_rise``). The gaps matter because z alone is ill-conditioned when
      the model is unsure and every drop is ~0. A signal stays pending while the level stays abnormal, so
      a check that confirms one evaluation later still raises. A ``cluster``
      observation with ``flagged=True`` (a SpRAy flag) raises without a rise, subject to the same check.
    * **One alert per episode**: after raising, a (kind, class) is disarmed; it re-arms at the first
      evaluation whose level is normal again (and, for clusters, not flagged).

    Drift is not an input: ALGORITHMS §5.5's informational CUSUM on the median drift in floor units is not
    built, because that median stays at 2–22 floor units through whole runs of ``examples/digits.py`` (the
    floor itself moves 0.01–0.08), so the CUSUM would fire every other evaluation and say nothing. Drift is
    logged and stored; TensorBoard's smoothing slider draws §5.5's EWMA trend.

    Defaults (one configuration, measured by ``benchmarks/shortcuts.py``): ``z`` is the paired reliance of
    :func:`observe` (a t-statistic over probe items, not ALGORITHMS §6.3's per-item mean, hence 2.5 rather
    than 3); ``min_drop = 0.1`` because a faithful map of a clean but unsure model already costs more when
    its own top region is filled than random regions do (gaps up to ~0.06 were measured on clean twins),
    while real tag reliance costs 0.15–0.45. ``min_rise = 0.15`` plays the same part for the transplant gap:
    on clean twins a piece of the object lends its class too (the stroke of a "1" pasted into another
    digit: single-evaluation gaps up to ~0.17, never two in a row above 0.15), while a face-coded tag
    pasted into non-faces gave 0.19–0.74 for the face class.

    Args:
        z_rise: Rise threshold in noise-floor units.
        patience: Consecutive rising (``intervention``: confirmed) evaluations required.
        level: Abnormal ρ for ``spurious_mass``.
        confirm_z: Reliance z that confirms (and abnormal level for ``intervention``).
        min_drop: Smallest confirming necessity gap ``drop_region − drop_random`` in probability.
        min_rise: Smallest confirming sufficiency gap ``rise_region − rise_random`` in probability.
        floor_window: Evaluations in the floor estimate.
        min_sigma: Lower bound of σ̂, in the signal's units.

    Example:
        >>> rule = WarningRule(z_rise=2.0, patience=2, min_sigma=0.01)
        >>> series = [0.10, 0.20, 0.30, 0.40]  # border mass of class 7, rising by 10 floor units each time
        >>> raised = [a for e, v in enumerate(series) for a in rule.update(e, [Observation("border", 7, v)])]
        >>> [(a.epoch, a.kind, a.class_index) for a in raised]
        [(2, 'border', 7)]
    """

    def __init__(
        self,
        z_rise: float = 2.0,
        patience: int = 2,
        level: float = 1.5,
        confirm_z: float = 2.5,
        min_drop: float = 0.1,
        min_rise: float = 0.15,
        floor_window: int = 5,
        min_sigma: float = 1e-2,
    ) -> None:
        for name, value in (("z_rise", z_rise), ("level", level), ("confirm_z", confirm_z), ("min_drop", min_drop),
                            ("min_rise", min_rise), ("min_sigma", min_sigma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if min_sigma <= 0:
            raise ValueError(f"`min_sigma` must be > 0 (it keeps the noise floor from being zero), got {min_sigma}.")
        for name, value in (("patience", patience), ("floor_window", floor_window)):
            check_int(value, name)
        self.z_rise = float(z_rise)
        self.patience = patience
        self.level = float(level)
        self.confirm_z = float(confirm_z)
        self.min_drop = float(min_drop)
        self.min_rise = float(min_rise)
        self.floor_window = floor_window
        self.min_sigma = float(min_sigma)
        self._series: dict[str, _Series] = {}

    def update(self, epoch: int, observations: Iterable[Observation]) -> list[Alert]:
        """Feed one evaluation's observations; return the alerts it raises (possibly none).

        Args:
            epoch: The evaluation's epoch (only reported; evaluations are counted by calls).
            observations: At most one :class:`Observation` per (kind, class).

        A (kind, class) missing from this evaluation (a class predicted for too few probe items, a clustering
        without enough valid maps, an evaluation skipped: pass no observations) starts its streak and rise
        over: evaluations that count as consecutive must each have observed the signal. A pending signal
        stays pending, as it does while its level stays abnormal.

        Returns:
            New :class:`Alert` s, in the order of the observations.

        Raises:
            TypeError: If an item is not an :class:`Observation`, or ``epoch`` not an int.
            ValueError: On two observations of the same (kind, class), or a negative ``epoch``. The rule's
                state is left untouched.
        """
        check_int(epoch, "epoch", minimum=0)
        keyed: dict[str, Observation] = {}
        for obs in observations:
            if not isinstance(obs, Observation):
                raise TypeError(f"`observations` must hold Observation objects, got {type(obs).__name__}.")
            key = _key(obs.kind, obs.class_index)
            if key in keyed:
                raise ValueError(f"two observations for {key!r} in one evaluation; pass one per (kind, class).")
            keyed[key] = obs
        for key, series in self._series.items():
            if key not in keyed:
                series.streak, series.last = 0, None
        alerts = [self._signal(epoch, key, obs) for key, obs in keyed.items()]
        return [alert for alert in alerts if alert is not None]

    def _signal(self, epoch: int, key: str, obs: Observation) -> Alert | None:
        series = self._series.setdefault(key, _Series(first_epoch=int(epoch), first=obs.value))
        if obs.replicate is not None:
            series.floor = (series.floor + [(obs.value - obs.replicate) ** 2 / 2])[-self.floor_window :]
        sigma = max(math.sqrt(sum(series.floor) / len(series.floor)) if series.floor else 0.0, self.min_sigma)
        rise = 0.0 if series.last is None else (obs.value - series.last) / sigma
        series.last = obs.value
        threshold = self._threshold(obs.kind, series, sigma)
        necessary = self._confirms(obs.z, obs.drop_region, obs.drop_random, self.min_drop)
        sufficient = self._confirms(obs.z_transplant, obs.rise_region, obs.rise_random, self.min_rise)
        checked = obs.z is not None or obs.z_transplant is not None
        confirmed = not checked or bool(necessary) or bool(sufficient)
        if obs.kind == "intervention":
            # Both z are already in units of their own floor (the equal-area random controls of this evaluation),
            # so the streak counts confirmed evaluations; a reliance present from the first evaluation on (a
            # shortcut learned within one epoch) still warns. Without a check the value is the z to judge.
            abnormal = confirmed if checked else obs.value >= self.confirm_z
            series.streak = series.streak + 1 if abnormal else 0
        else:
            abnormal = obs.value > threshold
            series.streak = series.streak + 1 if rise > self.z_rise else 0
        if not abnormal:
            series.pending = False
            if not obs.flagged:
                series.armed = True
        elif series.streak >= self.patience:
            series.pending = True
        if not (series.armed and confirmed and (series.pending or obs.flagged)):
            return None
        series.armed = False
        series.pending = False
        units = (obs.value - series.first) / sigma
        message = f"epoch {int(epoch)}: {self._describe(obs, series, units, threshold)}"
        if obs.drop_region is not None and obs.drop_random is not None:
            message += (
                f"; filling in that region drops p(class) by {obs.drop_region:.2f} vs {obs.drop_random:.2f} "
                "for random regions of equal area"
            )
        if obs.z is not None and obs.kind != "intervention":  # an intervention's value is its z, already stated
            message += f" (reliance z {obs.z:.1f}{' >= %g' % self.confirm_z if necessary else ''})"
        if obs.rise_region is not None and obs.rise_random is not None:
            message += (
                f"; pasting it into images of other classes raises p(class) by {obs.rise_region:.2f} vs "
                f"{obs.rise_random:.2f} for random regions of equal area"
            )
        if obs.z_transplant is not None and obs.kind != "intervention":
            message += f" (transplant z {obs.z_transplant:.1f}{' >= %g' % self.confirm_z if sufficient else ''})"
        if obs.detail:
            message += f"; {obs.detail}"
        score = obs.value
        if obs.kind == "intervention" and not necessary and obs.z_transplant is not None:
            score = obs.z_transplant  # confirmed by sufficiency: its z is the number that raised the alert
        return Alert(epoch, obs.kind, score, threshold, obs.class_index, obs.sample_indices, message)

    def _confirms(self, z: float | None, effect: float | None, control: float | None, min_gap: float) -> bool | None:
        """A check's verdict: ``z >= confirm_z`` and (with both means) ``effect − control >= min_gap``."""
        if z is None:
            return None
        if effect is not None and control is not None and effect - control < min_gap:
            return False
        return z >= self.confirm_z

    def _threshold(self, kind: str, series: _Series, sigma: float) -> float:
        if kind == "spurious_mass":
            return self.level
        if kind == "intervention":
            return self.confirm_z
        return series.first + self.z_rise * sigma

    def _describe(self, obs: Observation, series: _Series, units: float, threshold: float) -> str:
        who = "overall" if obs.class_index is None else f"class {obs.class_index}"
        since = f"{units:.1f} noise-floor units above epoch {series.first_epoch}"
        if obs.kind == "spurious_mass":
            return (
                f"{who} explanations put {obs.value:.2f}x their area share of relevance on the suspected region "
                f"(ratio {obs.value:.2f} > {threshold:g}, {since})"
            )
        if obs.kind == "border":
            return f"{who} explanations concentrate on the image border (border mass {obs.value:.2f}, {since})"
        if obs.kind == "intervention":
            transplant = "" if obs.z_transplant is None else f", transplant z {obs.z_transplant:.1f}"
            times = f"{series.streak} consecutive evaluation{'s' * (series.streak != 1)}"
            return (f"{who} relies on a tiny region of the input (paired reliance z {obs.value:.1f}{transplant} "
                    f"vs {threshold:g}; confirmed at {times})")
        if obs.flagged:
            return f"{who} explanations form a flagged cluster (spectral clustering; focus {obs.value:.2f})"
        return f"{who} explanations concentrate on one location across images (focus {obs.value:.2f}, {since})"

    def state_dict(self) -> dict[str, Any]:
        """The rule's state as plain Python values (JSON-safe), for checkpoints."""
        return {
            "version": 1,
            "series": {key: asdict(series) for key, series in self._series.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a resumed run continues exactly where it stopped.

        Raises:
            ValueError: If ``state`` is not a state of this class.
        """
        message = "`state` must come from WarningRule.state_dict() (version 1)."
        if not isinstance(state, dict) or state.get("version") != 1 or "series" not in state:
            raise ValueError(message)
        try:
            self._series = {
                key: _Series(**{**value, "floor": [float(v) for v in value["floor"]]})
                for key, value in state["series"].items()
            }
        except (TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"{message} Its 'series' do not have the fields of this version: {err!r}.") from err


# --------------------------------------------------------------------------------------------------
# One evaluation's observations
# --------------------------------------------------------------------------------------------------


def _paired(effect: Tensor, control: Tensor, rows: Tensor) -> tuple[float, float, float]:
    """Paired z of ``effect − mean(control)`` over the items ``rows``, and the two means (all 0 without items)."""
    effect, control = effect.cpu()[rows].double(), control.cpu()[rows].double()
    if effect.numel() == 0:
        return 0.0, 0.0, 0.0
    gap = effect - control.mean(dim=1)
    spread = float(gap.std()) if gap.numel() > 1 else 0.0
    z = float(gap.mean()) / max(spread / math.sqrt(gap.numel()), _Z_FLOOR)
    return z, float(effect.mean()), float(control.mean())


def _pooled(reliance: Reliance, rows: Tensor) -> dict[str, float]:
    """Mean drops and the paired reliance z of a group of probe items (see :func:`observe`)."""
    z, drop_region, drop_random = _paired(reliance.drop_region, reliance.drop_random, rows)
    return {"z": z, "drop_region": drop_region, "drop_random": drop_random}


def _pooled_transplant(sufficiency: Sufficiency, rows: Tensor) -> dict[str, float | None]:
    """Mean rises and the paired transplant z of a group's donors that have recipients (see :func:`observe`);
    all ``None`` (no check) when no donor has one, e.g. when every item is of one class."""
    donors = rows & sufficiency.valid.cpu()
    if not bool(donors.any()):
        return {"z_transplant": None, "rise_region": None, "rise_random": None}
    z, rise_region, rise_random = _paired(sufficiency.rise_region, sufficiency.rise_random, donors)
    return {"z_transplant": z, "rise_region": rise_region, "rise_random": rise_random}


def _telling(reliance: Reliance, rows: Tensor, sample_ids: Tensor) -> tuple[int, ...]:
    """The group's probe ids, the items whose region matters most (largest paired gap) first."""
    gap = (reliance.drop_region - reliance.drop_random.mean(dim=1)).cpu()
    index = rows.nonzero().flatten()
    order = gap[index].argsort(descending=True, stable=True)
    return tuple(sample_ids.cpu()[index[order]].tolist())


def _cluster_regions(maps: Tensor, clusters: SpectralClusters, fraction: float, size: tuple[int, int]) -> Tensor:
    """Per item, the top ``fraction`` of its cluster's mean (unit-mass) map; an empty region if unclustered."""
    assign = clusters.assignments
    count = int(clusters.size.numel())
    mass = unit_mass(maps)
    clustered = assign >= 0
    means = torch.zeros(max(count, 1), *maps.shape[1:], device=maps.device)
    means.index_add_(0, assign[clustered], mass[clustered])
    means = means / clusters.size.clamp_min(1).to(maps.device, torch.float32).view(-1, 1, 1)[: means.shape[0]]
    region = top_region(means, fraction, size)[assign.clamp_min(0)]
    return region & clustered.view(-1, 1, 1)


def observe(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Tensor,
    sample_ids: Tensor,
    *,
    replicate: Tensor | None = None,
    replicate_rows: Tensor | None = None,
    masks: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_batch: int | None = 256,
    top_fraction: float = 0.05,
    min_group: int = 4,
    min_cluster_maps: int = 16,
    n_recipients: int = 2,
    n_random: int = 4,
) -> list[Observation]:
    """The shortcut signals of one evaluation of a probe set, ready for :meth:`WarningRule.update`.

    Every signal comes with its interventional check (§6.3): the region its maps point at is filled with
    the RISE blur and the drop of ``p(class)`` is compared with the same shape at ``n_random`` random
    positions. For a group of ``n`` items with paired gaps ``g_i = Δp_R,i − mean_r Δp_rand,i,r`` the check
    reports the two mean drops and the *paired* reliance ``z = mean(g) / max(sd(g)/√n, 1e-3)`` (a
    t-statistic over items; a per-item mean of z explodes when an item's random drops are all ~0). The top
    regions also get the transplant check (:func:`region_sufficiency`, ``n_recipients`` other-class
    recipients per item, ``n_random`` random controls each): the mean rises and the paired
    ``z_transplant`` of the same form over the items that have a recipient, so an alert can be confirmed
    by necessity or by sufficiency.

    Signals (overall, class ``None``, and per explained class with at least ``min_group`` items). Items with
    a degenerate map are left out of the means of map values (border mass, ρ), and a group without a valid
    map gives no signal; the checks keep them: an item whose map points at nothing has an empty region,
    whose fill-in and transplant change nothing, so a group relies on its regions only as much as its items do:

    * ``border``: mean border mass, its replicate shift from ``replicate``; both checks on each item's top
      ``top_fraction`` region.
    * ``intervention`` (tiny-region reliance): value = the paired z of each item's top ``top_fraction``
      region, with the transplant check of the same regions; ``sample_indices`` put the items whose region matters most first.
    * ``cluster`` (overall only): SpRAy-style :func:`spectral_clusters` of all probe maps (one partition,
      purity against the explained classes) when there are at least ``min_cluster_maps`` valid maps. The
      reported cluster is the most focused flagged cluster, else the most focused one; value = its
      same-location focus, ``flagged`` = a SpRAy flag, check on the top ``top_fraction`` of the cluster's
      mean map applied to its members.
    * ``spurious_mass`` (with ``masks``): mean ρ, check on the mask, over the items whose mask is not empty
      (mark only the items that carry the suspect feature).

    Cost: ``(2 + n_recipients)·P·(1 + n_random)`` forwards (top regions, their transplants and cluster
    regions; ``P·(1 + n_random)`` more with masks) plus one clean pass per check, and one eigen-
    decomposition of a ``P × P`` matrix; no gradients.

    Args:
        model: Classifier returning ``[N, K]`` logits.
        x: ``[P, C, H, W]`` probe images in model-input space.
        maps: ``[P, h, w]`` raw non-negative maps of the probe (main random stream).
        targets: ``LongTensor [P]`` explained classes.
        sample_ids: ``LongTensor [P]`` probe-item ids, reported in the observations.
        replicate: ``[R, h, w]`` maps of the probe rows ``replicate_rows`` on the noise-floor stream.
        replicate_rows: ``BoolTensor [P]`` rows that have a replicate (``R`` of them).
        masks: ``[P, H, W]`` boolean suspect regions, or ``None``.
        generator: Source of the random control positions and of k-means seeding.
        max_batch: Most inputs per forward pass.
        top_fraction: Share of the input's pixels in a "tiny region".
        min_group: Fewest items for a per-class observation.
        min_cluster_maps: Fewest valid maps for the spectral clustering.
        n_recipients: Other-class probe images each item's top region is pasted into (transplant check).
        n_random: Random-position controls per region and per transplant. The defaults (2 and 4) gave
            the same alerts as 4 and 8 on all 153 recorded runs of ``benchmarks/shortcuts.py`` (replayed
            offline; training does not depend on the monitor) at 40 % of the forward passes.

    Returns:
        One :class:`Observation` per signal and group.

    Raises:
        TypeError: On maps, targets or ids of the wrong type, or a count that is not an int.
        ValueError: On maps, targets or ids that do not match the probe, or a count out of range.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
        >>> observations = observe(net, torch.randn(8, 1, 8, 8), torch.rand(8, 4, 4), torch.tensor([0, 1] * 4),
        ...                        torch.arange(8))
        >>> sorted({o.kind for o in observations}), WarningRule().update(0, observations)  # no rise yet: no alert
        (['border', 'intervention'], [])
    """
    maps = _as_maps(maps)
    check_int(min_group, "min_group")
    check_int(min_cluster_maps, "min_cluster_maps", minimum=3, why=" (each map needs neighbours to cluster)")
    count = x.shape[0]
    if maps.shape[0] != count:
        raise ValueError(f"`maps` must hold one map per probe image ({count}), got {maps.shape[0]}.")
    targets = _int_vector(targets, count, "targets")
    sample_ids = _int_vector(sample_ids, count, "sample_ids")
    device = model_device(model)
    x, targets = x.to(device), targets.to(device)
    size = (x.shape[-2], x.shape[-1])

    def check(region: Tensor) -> Reliance:
        return region_reliance(model, x, region.to(device), targets, n_random=n_random, generator=generator,
                               max_batch=max_batch)

    valid = ~degenerate(maps).cpu()  # left out of the means of map values (ALGORITHMS §1), kept in the checks
    border = border_mass(maps).cpu()
    replicate_shift = 0.0
    if replicate is not None and replicate_rows is not None:
        rows = replicate_rows.cpu()
        pair = valid[rows] & ~degenerate(replicate).cpu()
        if bool(pair.any()):
            replicate_shift = float(border_mass(replicate).cpu()[pair].mean() - border[rows][pair].mean())
    top_regions = top_region(maps, top_fraction, size).to(device)
    top = check(top_regions)
    transplant = region_sufficiency(model, x, top_regions, targets, n_recipients=n_recipients, n_random=n_random,
                                    generator=generator, max_batch=max_batch)
    masked = rho = None
    marked = torch.zeros(count, dtype=torch.bool)
    if masks is not None:
        rho = area_ratio(upsample(maps, size), masks.to(maps.device)).cpu()
        masked = check(masks)
        marked = masks.flatten(1).any(dim=1).cpu()  # an item without a suspect region says nothing about it
    classes = targets.cpu()
    groups: list[tuple[int | None, Tensor]] = [(None, torch.ones_like(classes, dtype=torch.bool))]
    for class_index in sorted(set(classes.tolist())):
        rows = classes == class_index
        if int(rows.sum()) >= min_group:
            groups.append((class_index, rows))
    observations = []
    for class_index, rows in groups:
        located = rows & valid
        if not bool(located.any()):
            continue  # no map locates anything: no signal, and every region is empty
        members = tuple(sample_ids.cpu()[rows].tolist())
        value = float(border[located].mean())
        checked = {**_pooled(top, rows), **_pooled_transplant(transplant, rows)}
        observations.append(Observation("border", class_index, value, value + replicate_shift, members, **checked))
        observations.append(Observation("intervention", class_index, checked["z"], None,
                                        _telling(top, rows, sample_ids), **checked))
        if masked is not None and rho is not None and bool((located & marked).any()):
            observations.append(Observation("spurious_mass", class_index, float(rho[located & marked].mean()), None,
                                            members, **_pooled(masked, rows & marked)))
    if int(valid.sum()) >= min_cluster_maps:
        observations.append(_cluster_observation(maps, targets, sample_ids, check, top_fraction, size,
                                                 min_cluster_maps, generator))
    return observations


def _cluster_observation(
    maps: Tensor, targets: Tensor, sample_ids: Tensor, check: Callable[[Tensor], Reliance],
    fraction: float, size: tuple[int, int], min_maps: int, generator: torch.Generator | None,
) -> Observation:
    """The ``cluster`` observation of :func:`observe`: the most suspicious spectral cluster, checked."""
    labels = torch.zeros(maps.shape[0], dtype=torch.long, device=maps.device)
    clusters = spectral_clusters(maps, labels, min_maps=min_maps, groups=targets.to(maps.device),
                                 k_nn=min(10, min_maps - 1), generator=generator)
    reliance = check(_cluster_regions(maps, clusters, fraction, size))
    big = clusters.size >= ClusterFlagRules().min_size
    candidates = clusters.flagged & big if bool((clusters.flagged & big).any()) else big
    focus = torch.where(candidates, clusters.focus, torch.full_like(clusters.focus, -1.0))
    chosen = int(focus.argmax())
    rows = (clusters.assignments == chosen).cpu()
    flagged = bool(clusters.flagged[chosen])
    classes = torch.unique(targets.cpu()[rows]).tolist()
    detail = (
        f"spectral cluster of {int(rows.sum())} of {maps.shape[0]} maps (classes {classes}; "
        f"focus {float(clusters.focus[chosen]):.2f}, coherence {float(clusters.coherence[chosen]):.2f}"
        + (f"; flagged: {clusters.reasons[chosen]})" if flagged else ")")
    )
    return Observation("cluster", None, float(clusters.focus[chosen]), None, _telling(reliance, rows, sample_ids),
                       flagged=flagged, detail=detail, **_pooled(reliance, rows))


# --------------------------------------------------------------------------------------------------
# Evidence images
# --------------------------------------------------------------------------------------------------


def evidence_image(
    images: Tensor,
    maps: Tensor,
    sample_ids: Tensor,
    sample_indices: Iterable[int],
    *,
    max_items: int = 8,
    vmax: float = 4.0,
) -> Tensor:
    """The picture that goes with an alert: the group's mean map, then the flagged samples' overlays.

    Row 0 is the mean image of the shown items | their mean unit-mass map | the overlay; each further row is one item's image | map | overlay
    (:func:`lightning_xcam.render.explanation_panel`). Maps are drawn on the monitor's fixed colour scale: a
    cell's share of its map's mass relative to a uniform map, full colour at ``vmax`` times, so a shortcut
    tag shows as a saturated spot whatever the raw scale.

    Args:
        images: ``[P, C, H, W]`` probe images (``C`` 1 or 3).
        maps: ``[P, h, w]`` raw non-negative maps of those images.
        sample_ids: ``LongTensor [P]`` probe-item ids of the rows.
        sample_indices: Probe ids to show, most telling first (an :class:`Alert`'s ``sample_indices``);
            ids not in ``sample_ids`` are ignored.
        max_items: Most items shown.
        vmax: Colour scale (multiples of the uniform share).

    Returns:
        Float32 ``[3, H', W']`` in ``[0, 1]`` (a :func:`lightning_xcam.render.grid` of panels, one per row).

    Raises:
        TypeError / ValueError: On mismatched shapes, ``max_items < 1``, or when no shown id is in
            ``sample_ids``.

    Example:
        >>> img = evidence_image(torch.randn(4, 1, 8, 8), torch.rand(4, 2, 2), torch.arange(4), (2, 0))
        >>> img.shape  # three rows (mean, item 2, item 0) of 8x24 panels, 2-pixel padding
        torch.Size([3, 32, 28])
    """
    from lightning_xcam.render import explanation_panel, grid  # rendering only when an alert is drawn

    images = check_images(images, "images")
    maps = _as_maps(maps)
    sample_ids = _int_vector(sample_ids, images.shape[0], "sample_ids")
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"`maps` must hold one map per image ({images.shape[0]}), got {maps.shape[0]}.")
    check_int(max_items, "max_items")
    position = {int(i): row for row, i in enumerate(sample_ids.tolist())}
    rows = [position[int(i)] for i in sample_indices if int(i) in position][:max_items]
    if not rows:
        raise ValueError("none of `sample_indices` is among `sample_ids`; pass the alert's probe ids.")
    index = torch.tensor(rows, device=images.device)
    shown = images.detach().float()[index]
    cells = maps.shape[-2] * maps.shape[-1]
    scaled = unit_mass(maps[index.to(maps.device)]) * cells
    mean_map = scaled.mean(dim=0, keepdim=True)
    panels = explanation_panel(torch.cat([shown.mean(dim=0, keepdim=True), shown]),
                               torch.cat([mean_map, scaled]).to(images.device), vmax=vmax)
    return grid(panels, nrow=1)
