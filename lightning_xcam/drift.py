"""Paired epoch-to-epoch drift statistics, and the noise floor (ALGORITHMS.md §5).

Every statistic compares two batches of maps item by item and returns one *distance* per item
(``0`` = identical). Maps are first reduced to *drift maps*: bilinearly resized/adaptive-average-pooled
to 16×16 and divided by their mass (:func:`drift_maps`). Every statistic function also takes each map to
unit mass itself, so any non-negative ``[B, h, w]`` maps may be passed.

Degenerate pairs. A map whose maximum is ``<= 0`` or that holds a non-finite value is *degenerate*
(:func:`lightning_xcam.maps.degenerate`); after :func:`~lightning_xcam.maps.unit_mass` it is all zeros.
For a pair with at least one degenerate map every statistic returns the sentinel ``0.0`` and
:func:`valid_pairs` is ``False``; such pairs are counted and left out of :func:`summarize`, never
divided by zero. Valid but *constant* maps (all cells equal) are well defined everywhere except for
Spearman's ρ, which has no rank variance: two constant maps count as identical (distance 0), one
constant map against a varying one as uncorrelated (ρ = 0, distance 1).

Nothing here knows about Lightning: tensors in, tensors out, batched on the input's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xcam._checks import check_int, grid_batch
from lightning_xcam.maps import degenerate, pool, unit_mass, zero_degenerate

__all__ = [
    "STATISTICS",
    "drift_maps",
    "valid_pairs",
    "tie_averaged_ranks",
    "spearman_distance",
    "cosine_distance",
    "ssim_distance",
    "topk_iou_distance",
    "center_of_mass_shift",
    "jensen_shannon",
    "total_variation",
    "drift_statistics",
    "noise_floor",
    "in_floor_units",
    "summarize",
    "EvaluationDrift",
    "evaluation_drift",
]

#: Names of the statistics returned by :func:`drift_statistics` (all distances; 0 = identical maps).
STATISTICS: tuple[str, ...] = ("spearman", "cosine", "ssim", "topk_iou", "com_shift", "js", "tv")

_FLOOR_MIN = 1e-6


def _check_pair(p: object, q: object) -> tuple[Tensor, Tensor]:
    """Check two map batches of equal shape ``[B, h, w]`` and return them as unit-mass float tensors."""
    for name, value in (("p", p), ("q", q)):
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor of shape [B, h, w], got {type(value).__name__}.")
        if value.ndim != 3:
            raise ValueError(f"`{name}` must have shape [B, h, w], got shape {tuple(value.shape)}.")
    assert isinstance(p, Tensor) and isinstance(q, Tensor)
    if p.shape != q.shape:
        raise ValueError(
            f"`p` and `q` must have the same shape (paired by item), got {tuple(p.shape)} and {tuple(q.shape)}."
        )
    dtype = p.dtype if p.is_floating_point() else torch.float32
    return unit_mass(p.to(dtype)), unit_mass(q.to(dtype))


def _mask_invalid(values: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """Replace the statistic of pairs holding a degenerate (all-zero after unit mass) map by ``0.0``."""
    return torch.where(valid_pairs(p, q), values, torch.zeros_like(values))


def drift_maps(maps: Tensor, size: int = 16) -> Tensor:
    """Reduce raw maps to drift maps: ``size × size`` and unit mass (ALGORITHMS.md §5.1).

    Args:
        maps: Raw non-negative maps ``[B, h, w]`` at any resolution.
        size: Side of the pooled grid.

    Returns:
        Float ``[B, size, size]`` maps that sum to 1; degenerate maps become all zeros.

    Raises:
        TypeError: If ``maps`` is not a tensor.
        ValueError: If ``maps`` is not 3-D or ``size`` is not a positive int.

    Example:
        >>> drift_maps(torch.rand(2, 7, 7)).shape
        torch.Size([2, 16, 16])
    """
    maps = grid_batch(maps, "maps")
    check_int(size, "size")
    maps = maps.detach()
    if not maps.is_floating_point():
        maps = maps.float()
    # Zero degenerate maps before pooling so nothing of a non-finite one leaks into the grid.
    maps = zero_degenerate(maps)
    return unit_mass(pool(maps, size))


def valid_pairs(p: Tensor, q: Tensor) -> Tensor:
    """``BoolTensor [B]``: pairs in which neither map is degenerate (see the module docstring).

    Example:
        >>> valid_pairs(torch.ones(2, 4, 4), torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]))
        tensor([ True, False])
    """
    return ~(degenerate(p) | degenerate(q))


def tie_averaged_ranks(x: Tensor) -> Tensor:
    """Rank each row of ``x [B, N]`` from 1 to N, giving tied values the average of their ranks.

    Batched: one stable sort, then a segment mean over runs of equal sorted values, as
    ``scipy.stats.rankdata(method="average")`` does row by row.

    Args:
        x: ``[B, N]`` values.

    Returns:
        ``[B, N]`` float64 ranks.

    Example:
        >>> tie_averaged_ranks(torch.tensor([[0.0, 2.0, 0.0, 1.0]]))
        tensor([[1.5000, 4.0000, 1.5000, 3.0000]], dtype=torch.float64)
    """
    batch, n = x.shape
    sorted_x, order = torch.sort(x, dim=1, stable=True)
    starts = torch.ones_like(sorted_x, dtype=torch.bool)
    starts[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    segment = starts.long().cumsum(dim=1) - 1  # run id of each sorted position, 0-based within the row
    ordinal = torch.arange(1, n + 1, device=x.device, dtype=torch.float64).expand(batch, n)
    run_sum = torch.zeros(batch, n, dtype=torch.float64, device=x.device).scatter_add_(1, segment, ordinal)
    run_len = torch.zeros(batch, n, dtype=torch.float64, device=x.device).scatter_add_(
        1, segment, torch.ones_like(ordinal)
    )
    averaged = (run_sum / run_len.clamp_min(1)).gather(1, segment)
    return torch.empty_like(averaged).scatter_(1, order, averaged)


def spearman_distance(p: Tensor, q: Tensor) -> Tensor:
    """``1 − ρ`` with ρ Spearman's rank correlation (Pearson of tie-averaged ranks), per item.

    Args:
        p: Maps ``[B, h, w]``.
        q: Maps ``[B, h, w]`` paired with ``p``.

    Returns:
        ``[B]`` distances in ``[0, 2]`` (dtype of ``p``). Constant maps: see the module docstring.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes are not equal ``[B, h, w]``.

    Example:
        >>> spearman_distance(torch.rand(2, 8, 8), torch.rand(2, 8, 8)).shape
        torch.Size([2])
    """
    p, q = _check_pair(p, q)
    rp = tie_averaged_ranks(p.flatten(1))
    rq = tie_averaged_ranks(q.flatten(1))
    rp = rp - rp.mean(dim=1, keepdim=True)
    rq = rq - rq.mean(dim=1, keepdim=True)
    norm_p = rp.square().sum(dim=1).sqrt()
    norm_q = rq.square().sum(dim=1).sqrt()
    denom = norm_p * norm_q
    rho = (rp * rq).sum(dim=1) / denom.clamp_min(torch.finfo(torch.float64).tiny)
    # Without rank variance ρ is undefined: two constant maps are identical, one constant map carries no order.
    both_constant = (norm_p == 0) & (norm_q == 0)
    rho = torch.where(denom > 0, rho.clamp(-1.0, 1.0), both_constant.to(rho.dtype))
    return _mask_invalid((1.0 - rho).to(p.dtype), p, q)


def cosine_distance(p: Tensor, q: Tensor) -> Tensor:
    """``1 − P·Q / (‖P‖ ‖Q‖)`` per item.

    Args:
        p: Maps ``[B, h, w]``.
        q: Maps ``[B, h, w]`` paired with ``p``.

    Returns:
        ``[B]`` distances in ``[0, 1]`` for non-negative maps.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes are not equal ``[B, h, w]``.

    Example:
        >>> cosine_distance(torch.ones(1, 4, 4), torch.ones(1, 4, 4))
        tensor([0.])
    """
    p, q = _check_pair(p, q)
    cos = F.cosine_similarity(p.flatten(1), q.flatten(1), dim=1, eps=torch.finfo(p.dtype).tiny)
    return _mask_invalid((1.0 - cos).clamp_min(0.0), p, q)


def ssim_distance(p: Tensor, q: Tensor, win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """``1 − SSIM`` per item with scikit-image's defaults.

    Matches ``skimage.metrics.structural_similarity(P, Q, data_range=R)`` with ``R`` the range over both
    maps of the pair (``max(P ∪ Q) − min(P ∪ Q)``): a ``win_size²`` uniform window, sample covariance
    (``N / (N − 1)``), ``C1 = (k1 R)²``, ``C2 = (k2 R)²``, and the mean taken over the window centres
    whose window lies inside the map (skimage crops ``(win_size − 1) // 2`` cells at each border, so
    its border padding never enters the mean). A pair whose ``R`` is within a few rounding units of
    its values (``R ≤ 4·eps·max|P ∪ Q|``) is two equal constant maps: SSIM 1.

    Args:
        p: Maps ``[B, h, w]`` with ``h, w >= win_size``.
        q: Maps ``[B, h, w]`` paired with ``p``.
        win_size: Odd side of the uniform window.
        k1: Luminance constant.
        k2: Contrast constant.

    Returns:
        ``[B]`` distances (``1 − SSIM``, within ``[0, 2]``).

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes differ, ``win_size`` is not odd and >= 3, or the maps are smaller than it.

    Example:
        >>> ssim_distance(torch.rand(2, 16, 16), torch.rand(2, 16, 16)).shape
        torch.Size([2])
    """
    p, q = _check_pair(p, q)
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"`win_size` must be an odd int >= 3, got {win_size!r}.")
    if min(p.shape[-2:]) < win_size:
        raise ValueError(
            f"SSIM needs maps of at least {win_size}×{win_size} cells, got {tuple(p.shape[-2:])}; "
            "use drift_maps() (16×16) or a smaller `win_size`."
        )
    x = p.double().unsqueeze(1)
    y = q.double().unsqueeze(1)
    # Stride-1 pooling without padding visits exactly the window centres skimage keeps after cropping.
    def mean(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, win_size, stride=1)

    n = win_size * win_size
    cov_norm = n / (n - 1)
    both = torch.cat([p.flatten(1), q.flatten(1)], dim=1).double()
    data_range = (both.amax(dim=1) - both.amin(dim=1)).view(-1, 1, 1, 1)
    # (Co)variances are shift-invariant: taking them about the pair's mean keeps their rounding far below
    # C2 when the range is tiny next to the values (nearly constant maps), where E[x²] − E[x]² is noise.
    centre = both.mean(dim=1).view(-1, 1, 1, 1)
    xc, yc = x - centre, y - centre
    uxc, uyc = mean(xc), mean(yc)
    vx = cov_norm * (mean(xc * xc) - uxc * uxc).clamp_min(0)
    vy = cov_norm * (mean(yc * yc) - uyc * uyc).clamp_min(0)
    vxy = cov_norm * (mean(xc * yc) - uxc * uyc)
    ux, uy = uxc + centre, uyc + centre
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    ssim_map = num / den.clamp_min(torch.finfo(torch.float64).tiny)
    ssim = ssim_map.flatten(1).mean(dim=1)
    # Two maps equal up to the rounding of their own dtype are two equal constant maps: SSIM 1.
    scale = both.abs().amax(dim=1)
    constant = data_range.flatten() <= 4 * torch.finfo(p.dtype).eps * scale
    ssim = torch.where(constant, torch.ones_like(ssim), ssim)
    return _mask_invalid((1.0 - ssim).to(p.dtype), p, q)


def _topk_mask(flat: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest cells per row; ties break by raster index (lower first)."""
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)


def topk_iou_distance(p: Tensor, q: Tensor, fraction: float = 0.05) -> Tensor:
    """``1 − |top_k(P) ∩ top_k(Q)| / |top_k(P) ∪ top_k(Q)|`` per item.

    ``k = max(1, round(fraction · h · w))`` (13 of 256 cells at the default); ties break by raster index
    (a stable descending sort), so ReLU'd maps with many zeros give a defined set.

    Args:
        p: Maps ``[B, h, w]``.
        q: Maps ``[B, h, w]`` paired with ``p``.
        fraction: Share of cells in the top set, in ``(0, 1]``.

    Returns:
        ``[B]`` distances in ``[0, 1]``.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes differ or ``fraction`` is outside ``(0, 1]``.

    Example:
        >>> topk_iou_distance(torch.rand(2, 16, 16), torch.rand(2, 16, 16)).shape
        torch.Size([2])
    """
    p, q = _check_pair(p, q)
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must lie in (0, 1], got {fraction!r}.")
    cells = p.shape[-2] * p.shape[-1]
    k = max(1, round(fraction * cells))
    a = _topk_mask(p.flatten(1), k)
    b = _topk_mask(q.flatten(1), k)
    inter = (a & b).sum(dim=1).to(p.dtype)
    union = (a | b).sum(dim=1).to(p.dtype)  # >= k >= 1
    return _mask_invalid(1.0 - inter / union, p, q)


def center_of_mass_shift(p: Tensor, q: Tensor) -> Tensor:
    """Euclidean distance between the centres of mass of ``P`` and ``Q``, in cells, per item.

    Args:
        p: Maps ``[B, h, w]``.
        q: Maps ``[B, h, w]`` paired with ``p``.

    Returns:
        ``[B]`` shifts in cells (row and column index units).

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes are not equal ``[B, h, w]``.

    Example:
        >>> a = torch.zeros(1, 4, 4); a[0, 0, 0] = 1
        >>> b = torch.zeros(1, 4, 4); b[0, 3, 3] = 1
        >>> center_of_mass_shift(a, b)
        tensor([4.2426])
    """
    p, q = _check_pair(p, q)
    h, w = p.shape[-2:]
    rows = torch.arange(h, device=p.device, dtype=p.dtype)
    cols = torch.arange(w, device=p.device, dtype=p.dtype)

    def com(m: Tensor) -> Tensor:
        return torch.stack([(m.sum(dim=2) * rows).sum(dim=1), (m.sum(dim=1) * cols).sum(dim=1)], dim=1)

    return _mask_invalid((com(p) - com(q)).norm(dim=1), p, q)


def jensen_shannon(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence ``½ KL(P‖M) + ½ KL(Q‖M)``, ``M = (P + Q) / 2``, natural log, per item.

    Args:
        p: Maps ``[B, h, w]``.
        q: Maps ``[B, h, w]`` paired with ``p``.

    Returns:
        ``[B]`` divergences in ``[0, ln 2]``.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes are not equal ``[B, h, w]``.

    Example:
        >>> a = torch.tensor([[[1.0, 0.0]]]); b = torch.tensor([[[0.0, 1.0]]])
        >>> jensen_shannon(a, b)
        tensor([0.6931])
    """
    p, q = _check_pair(p, q)
    m = 0.5 * (p + q)
    # x·log(x/m) as xlogy(x, x) − xlogy(x, m): 0·log 0 = 0 and no 0/0 where both maps are empty.
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).flatten(1).sum(dim=1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).flatten(1).sum(dim=1)
    return _mask_invalid((0.5 * (kl_p + kl_q)).clamp_min(0.0), p, q)


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """Total variation distance ``½ Σ |P − Q|`` per item.

    Args:
        p: Maps ``[B, h, w]``.
        q: Maps ``[B, h, w]`` paired with ``p``.

    Returns:
        ``[B]`` distances in ``[0, 1]``.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes are not equal ``[B, h, w]``.

    Example:
        >>> total_variation(torch.tensor([[[3.0, 1.0]]]), torch.tensor([[[1.0, 1.0]]]))
        tensor([0.2500])
    """
    p, q = _check_pair(p, q)
    return _mask_invalid(0.5 * (p - q).abs().flatten(1).sum(dim=1), p, q)


_STATISTIC_FUNCTIONS = {
    "spearman": spearman_distance,
    "cosine": cosine_distance,
    "ssim": ssim_distance,
    "topk_iou": topk_iou_distance,
    "com_shift": center_of_mass_shift,
    "js": jensen_shannon,
    "tv": total_variation,
}


def drift_statistics(p: Tensor, q: Tensor) -> dict[str, Tensor]:
    """All drift statistics of :data:`STATISTICS` for paired maps, plus the ``valid`` mask.

    Args:
        p: Maps ``[B, h, w]`` (typically :func:`drift_maps` of the earlier evaluation).
        q: Maps ``[B, h, w]`` paired with ``p`` (the later evaluation).

    Returns:
        ``{name: Tensor [B]}`` for every name in :data:`STATISTICS` (distances, 0 = identical) and
        ``"valid"``: ``BoolTensor [B]``, ``False`` where a map is degenerate and every statistic holds the
        sentinel ``0.0``.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes are not equal ``[B, h, w]`` or smaller than 7×7 (SSIM's window).

    Example:
        >>> stats = drift_statistics(drift_maps(torch.rand(4, 7, 7)), drift_maps(torch.rand(4, 7, 7)))
        >>> sorted(stats)
        ['com_shift', 'cosine', 'js', 'spearman', 'ssim', 'topk_iou', 'tv', 'valid']
    """
    p, q = _check_pair(p, q)
    stats = {name: fn(p, q) for name, fn in _STATISTIC_FUNCTIONS.items()}
    stats["valid"] = valid_pairs(p, q)
    return stats


def _as_1d(d: object, name: str) -> Tensor:
    if not isinstance(d, Tensor):
        raise TypeError(f"`{name}` must be a 1-D torch.Tensor of per-item values, got {type(d).__name__}.")
    if d.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (one value per item), got shape {tuple(d.shape)}.")
    return d.detach()


def _select_valid(d: Tensor, valid: Tensor | None, name: str) -> Tensor:
    d = _as_1d(d, name).double()
    if valid is not None:
        valid = _as_1d(valid, "valid")
        if valid.shape != d.shape:
            raise ValueError(f"`valid` must have the shape of `{name}` {tuple(d.shape)}, got {tuple(valid.shape)}.")
        d = d[valid.to(device=d.device, dtype=torch.bool)]
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values; distances must be finite.")
    return d


def noise_floor(d_floor: Tensor, valid: Tensor | None = None) -> float:
    """The explainer's noise floor: the median replicate distance, at least ``1e-6`` (ALGORITHMS.md §5.3).

    Args:
        d_floor: ``[n]`` distances between two independent runs (streams 0 and 1) on the floor subset.
        valid: Optional ``BoolTensor [n]``; invalid (degenerate) pairs are left out.

    Returns:
        ``max(median, 1e-6)`` as a Python float (linear-interpolated median, as ``numpy.median``). With
        no valid pair the floor is ``1e-6``.

    Raises:
        TypeError: If ``d_floor`` is not a tensor.
        ValueError: If it is not 1-D or holds non-finite values.

    Example:
        >>> noise_floor(torch.tensor([0.25, 0.75, 0.5, 0.0]))
        0.375
    """
    d = _select_valid(d_floor, valid, "d_floor")
    if d.numel() == 0:
        return _FLOOR_MIN
    return max(float(torch.quantile(d, 0.5)), _FLOOR_MIN)


def in_floor_units(d: Tensor, floor: float) -> Tensor:
    """Drift in noise-floor units ``u = d / max(floor, 1e-6)``; ``u ≈ 1`` is indistinguishable from resampling.

    Args:
        d: ``[B]`` distances.
        floor: The noise floor from :func:`noise_floor`.

    Returns:
        ``[B]`` values in floor units, dtype of ``d``.

    Raises:
        ValueError: If ``floor`` is negative or not finite.

    Example:
        >>> in_floor_units(torch.tensor([0.2, 0.4]), 0.2)
        tensor([1., 2.])
    """
    floor = float(floor)
    if not math.isfinite(floor) or floor < 0:
        raise ValueError(f"`floor` must be a finite non-negative number, got {floor!r}.")
    return d / max(floor, _FLOOR_MIN)


def summarize(d: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """Per-evaluation summary of per-item distances: median, 90th percentile, count.

    ALGORITHMS.md §5.2 asks for "the median and 10th percentile over items", phrased for similarities.
    For distances the matching tail is the *90th* percentile of the distance (= the 10th percentile of
    the similarity ``1 − d``): the items that moved most. It is reported as ``"p90"`` so that the name
    says which tail it is. Quantiles interpolate linearly (``numpy.quantile``'s default).

    Args:
        d: ``[B]`` distances (or drift in floor units).
        valid: Optional ``BoolTensor [B]`` from :func:`drift_statistics`; invalid items are left out.

    Returns:
        ``{"median": float, "p90": float, "n_valid": float}``; with no valid item median and p90 are
        ``0.0`` and ``n_valid`` is ``0.0``.

    Raises:
        TypeError: If ``d`` is not a tensor.
        ValueError: If ``d`` is not 1-D, ``valid`` has another shape, or valid values are not finite.

    Example:
        >>> summarize(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
        {'median': 2.0, 'p90': 3.6, 'n_valid': 5.0}
    """
    d = _select_valid(d, valid, "d")
    if d.numel() == 0:
        return {"median": 0.0, "p90": 0.0, "n_valid": 0.0}
    q = torch.quantile(d, torch.tensor([0.5, 0.9], dtype=d.dtype, device=d.device))
    return {"median": float(q[0]), "p90": float(q[1]), "n_valid": float(d.numel())}


@dataclass
class EvaluationDrift:
    """One method's drift at one evaluation (see :func:`evaluation_drift`).

    Attributes:
        maps: ``[B, 16, 16]`` drift maps of this evaluation: the ``previous`` (and, the first time, ``first``)
            of the next one, and what the store keeps.
        scalars: Medians over valid items: ``noise_floor``; ``drift_spearman``, ``drift_js`` and, with a floor,
            ``drift_floor_units`` against the previous evaluation; the same with ``_first`` against the first.
            A comparison without a valid pair (or a floor without one) gives no scalar, never a made-up 0.
        rows: Per-item statistics by reference: ``"previous"`` and ``"first"`` hold :func:`drift_statistics`;
            ``"floor"`` maps each statistic to ``{sample id: value}`` for the replicate rows.
    """

    maps: Tensor
    scalars: dict[str, float]
    rows: dict[str, Any]


def evaluation_drift(
    maps: Tensor,
    previous: Tensor | None = None,
    first: Tensor | None = None,
    replicate: tuple[Tensor, Tensor] | None = None,
    sample_ids: Tensor | None = None,
) -> EvaluationDrift:
    """Drift of one evaluation's maps against the previous and the first one, raw and in floor units (§5.2–5.3).

    Args:
        maps: ``[B, h, w]`` raw maps of this evaluation.
        previous: ``[B, 16, 16]`` drift maps of the previous evaluation, or ``None``; earlier maps of another
            shape (another probe) are not compared.
        first: The same for the first evaluation.
        replicate: ``(maps, rows)``: the noise-floor replicate maps ``[B, h, w]`` (stream 1) and
            ``BoolTensor [B]`` of the rows that have one; ``None`` for deterministic explainers.
        sample_ids: ``[B]`` probe ids, the keys of ``rows["floor"]`` (``arange(B)`` when ``None``).

    Returns:
        An :class:`EvaluationDrift`.

    Raises:
        TypeError / ValueError: On maps that are not ``[B, h, w]`` tensors.

    Example:
        >>> current = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(0))
        >>> result = evaluation_drift(current, previous=drift_maps(current), first=drift_maps(current))
        >>> result.scalars["drift_spearman"], sorted(result.rows)
        (0.0, ['first', 'previous'])
    """
    current = drift_maps(maps)
    ids = torch.arange(current.shape[0]) if sample_ids is None else sample_ids.cpu()
    scalars: dict[str, float] = {}
    rows: dict[str, Any] = {}
    floor = None
    if replicate is not None:
        replicate_maps, flag = replicate
        flag = flag.to(current.device)
        stats = drift_statistics(current[flag], drift_maps(replicate_maps)[flag])
        floor_ids = ids[flag.cpu()].tolist()
        rows["floor"] = {name: dict(zip(floor_ids, values.tolist())) for name, values in stats.items()}
        if bool(stats["valid"].any()):  # no valid pair: no floor (its 1e-6 stand-in would inflate the units)
            floor = noise_floor(stats["spearman"], stats["valid"])
            scalars["noise_floor"] = floor
    for reference, earlier in (("previous", previous), ("first", first)):
        if earlier is None or earlier.shape != current.shape:
            continue
        stats = drift_statistics(earlier.to(current.device), current)
        rows[reference] = stats
        if not bool(stats["valid"].any()):
            continue  # every pair degenerate: no drift to report
        suffix = "" if reference == "previous" else "_first"
        for name in ("spearman", "js"):
            scalars[f"drift_{name}{suffix}"] = summarize(stats[name], stats["valid"])["median"]
        if floor is not None:
            units = in_floor_units(stats["spearman"], floor)
            scalars[f"drift_floor_units{suffix}"] = summarize(units, stats["valid"])["median"]
    return EvaluationDrift(current, scalars, rows)
