"""Benchmark of the CAM engine: speed against plain forwards and peers, and samples-to-convergence.

Run it with ``python benchmarks/engine.py`` (about 3–4 minutes on 2 idle CPU cores, several times that on
a loaded machine; ``--quick`` for a smoke run, ``--samples 16`` to drop N = 50 from the speed table). It
prints markdown tables, all measured in one run:

1. **Speed** on a torchvision ResNet-18 (random weights, 10 classes, eval mode), CAM layer ``layer4``,
   a batch of 16 images 64×64, on CPU with the default thread count:

   - Expected Grad-CAM (EGC) against the plain forward passes it needs — the ``B·N`` path points, the
     ``B`` clean inputs and the ``|R|`` bank images, each once, as ``model(x)`` under ``torch.no_grad()``
     (goal ≤ 1.3: gradients through the head only should cost little on top of the forwards);
   - Captum ``LayerGradientShap`` at equal samples (same ``n_samples``, the same bank as baselines,
     ``stdevs`` = EGC's ``noise_std``) against EGC (goal ≥ 2);
   - pytorch-grad-cam ``GradCAM`` (on a deep copy of the model, per-sample ``ClassifierOutputTarget``)
     against our Grad-CAM (goal ≥ 2);
   - Captum ``LayerGradCam`` against our Grad-CAM (goal ≥ 1).

   Each method gets warm-up calls, then the methods run round-robin, in an order that rotates every
   round, for several repeats (so load from other processes hits them alike); the table reports the
   median ``time.perf_counter`` time.

2. **Samples to convergence** on a model whose head after the CAM layer is not linear: ResNet-18 at
   ``layer3`` with random BatchNorm shifts (``bias`` and ``running_mean`` ~ N(0, 0.5²) from a fixed
   generator; at initialisation ResNet is positively homogeneous, which would make the maps trivially
   stable), real digits (scikit-learn, expanded to 3 channels, 64×64) as inputs and as the 32-image
   reference bank, ``noise_std = 0.15``. The reference map is EGC with N = 512 (iid, seed 1000). For
   each N and sampling scheme the table gives the Spearman correlation (tie-averaged ranks,
   ``scipy.stats.spearmanr``) between the map and the reference map, per image on the maps upsampled to
   the input size, averaged over images and over 3 seeds, and the smallest N reaching 0.9 and 0.95 with
   the forward passes per image that costs. Images whose reference map is constant (all zero after the
   ReLU) have no ranking to converge to and are left out; constant maps at small N are counted.

Timings are wall-clock on a shared machine: the header prints the load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torchvision
from scipy.stats import spearmanr
from torch import Tensor, nn

from lightning_xcam.demos import load_digits_tensors
from lightning_xcam.maps import upsample
from lightning_xcam.methods.cam import ExpectedGradCAM, GradCAM

BATCH = 16
SIZE = 64
BANK = 32
NOISE_STD = 0.15
CONVERGENCE_NS = (4, 8, 16, 32, 64, 128)
REFERENCE_N = 512
REFERENCE_SEED = 1000
SEEDS = (0, 1, 2)
SAMPLINGS = ("iid", "stratified")


def _time_round_robin(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function; one call of each per round, so load drifts hit all alike.

    The order rotates every round: a call inherits the allocator state its predecessor leaves (a peer
    that keeps its autograd graph alive makes the next call's allocations cheaper), so no method may
    always follow the same neighbour.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _speed_model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _egc_points(egc: ExpectedGradCAM, x: Tensor) -> Tensor:
    """The ``B·N`` path points EGC visits, rebuilt from its own draws (for the plain-forward baseline)."""
    index, beta, noise = egc._draws(x, list(range(x.shape[0])), 0)
    owner = torch.arange(x.shape[0]).repeat_interleave(egc.n_samples)
    ref = egc.references[index]
    end = x[owner] if noise is None else x[owner] + noise
    return ref + beta.view(-1, 1, 1, 1) * (end - ref)


def speed(sample_counts: list[int], warmup: int, repeats: int) -> list[str]:
    """Markdown lines of the speed table."""
    from captum.attr import LayerGradCam, LayerGradientShap
    from pytorch_grad_cam import GradCAM as PytorchGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _speed_model()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
    bank = torch.randn(BANK, 3, SIZE, SIZE, generator=gen)
    with torch.no_grad():
        targets = model(x).argmax(dim=1)

    ours_gc = GradCAM(model, "layer4")
    captum_gc = LayerGradCam(model, model.layer4)
    pgc_model = copy.deepcopy(model)
    pgc = PytorchGradCAM(model=pgc_model, target_layers=[pgc_model.layer4[-1]])
    pgc_targets = [ClassifierOutputTarget(int(c)) for c in targets]

    # Grad-CAM calls are short, so they get their own, longer series of rounds.
    times = _time_round_robin(
        {
            "gc_ours": lambda: ours_gc(x, targets),
            "gc_captum": lambda: captum_gc.attribute(x, target=targets, relu_attributions=True),
            "gc_pgc": lambda: pgc(input_tensor=x, targets=pgc_targets),
        },
        warmup + 1,
        6 * repeats,
    )
    for n in sample_counts:
        egc = ExpectedGradCAM(model, "layer4", references=bank, n_samples=n, noise_std=NOISE_STD)
        points = _egc_points(egc, x)
        shap = LayerGradientShap(model, model.layer4)

        def plain(points: Tensor = points) -> None:
            with torch.no_grad():
                model(points)
                model(x)
                model(bank)

        def gradient_shap(shap: LayerGradientShap = shap, n: int = n) -> Tensor:
            return shap.attribute(x, baselines=bank, n_samples=n, stdevs=NOISE_STD, target=targets)

        times |= _time_round_robin(
            {f"plain_{n}": plain, f"egc_{n}": lambda egc=egc: egc(x, targets), f"shap_{n}": gradient_shap},
            warmup,
            repeats,
        )
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}

    def row(what: str, num: str, den: str, goal: str, ok: Callable[[float], bool]) -> str:
        # Ratios within a round compare neighbouring calls, so a slow drift of the machine's load cancels.
        ratios = [a / b for a, b in zip(times[num], times[den])]
        ratio = statistics.median(ratios)
        return (
            f"| {what} | {med[num]:.1f} | {med[den]:.1f} | {ratio:.2f} | {min(ratios):.2f}–{max(ratios):.2f} "
            f"| {goal} | {'yes' if ok(ratio) else 'NO'} |"
        )

    lines = [
        "| comparison | numerator ms | denominator ms | ratio | ratio range | goal | met |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for n in sample_counts:
        lines.append(row(f"EGC N={n} / plain forwards (B·N+B+R = {BATCH * n + BATCH + BANK} images)",
                         f"egc_{n}", f"plain_{n}", "≤ 1.3", lambda r: r <= 1.3))
        lines.append(row(f"Captum LayerGradientShap N={n} / EGC N={n}", f"shap_{n}", f"egc_{n}", "≥ 2",
                         lambda r: r >= 2))
    lines.append(row("pytorch-grad-cam GradCAM / ours Grad-CAM", "gc_pgc", "gc_ours", "≥ 2", lambda r: r >= 2))
    lines.append(row("Captum LayerGradCam / ours Grad-CAM", "gc_captum", "gc_ours", "≥ 1", lambda r: r >= 1))
    return lines


def _shifted_resnet18() -> nn.Module:
    """ResNet-18 with random BatchNorm shifts, so the network is no longer positively homogeneous."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.5 * torch.randn(module.running_mean.shape, generator=gen))
    return model


def _spearman_per_image(maps: Tensor, reference: Tensor) -> list[float]:
    """Tie-averaged Spearman correlation of each map with its reference; NaN where either is constant."""
    out = []
    for a, b in zip(maps.flatten(1).numpy(), reference.flatten(1).numpy()):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            out.append(math.nan)
        else:
            out.append(float(spearmanr(a, b).statistic))
    return out


def convergence(n_images: int, sample_counts: tuple[int, ...], batch_size: int) -> list[str]:
    """Markdown lines of the convergence table and its summary."""
    model = _shifted_resnet18()
    digits, _ = load_digits_tensors(SIZE)
    digits = digits.expand(-1, 3, -1, -1).contiguous()
    x, bank = digits[:n_images], digits[100 : 100 + BANK]
    size = (SIZE, SIZE)

    def egc_maps(n: int, sampling: str, seed: int) -> Tensor:
        egc = ExpectedGradCAM(model, "layer3", references=bank, n_samples=n, noise_std=NOISE_STD,
                              batch_size=batch_size, seed=seed, sampling=sampling)  # type: ignore[arg-type]
        return upsample(egc(x), size)

    start = time.perf_counter()
    reference = egc_maps(REFERENCE_N, "iid", REFERENCE_SEED)
    reference_seconds = time.perf_counter() - start
    # An image whose reference map is constant (all zero after the ReLU) has no ranking to converge to.
    usable = reference.flatten(1).amax(dim=1) > 0
    n_usable = int(usable.sum())

    table: dict[tuple[str, int], float] = {}
    degenerate: dict[tuple[str, int], int] = {}
    for sampling in SAMPLINGS:
        for n in sample_counts:
            values = []
            for seed in SEEDS:
                values += _spearman_per_image(egc_maps(n, sampling, seed)[usable], reference[usable])
            valid = [v for v in values if not math.isnan(v)]
            # Degenerate (constant, e.g. all-zero) maps have no ranking: counted, left out of the mean.
            degenerate[(sampling, n)] = len(values) - len(valid)
            table[(sampling, n)] = statistics.fmean(valid) if valid else math.nan

    def first_reaching(sampling: str, level: float) -> str:
        for n in sample_counts:
            if table[(sampling, n)] >= level:
                return f"N={n} ({n + 1} fwd/image + {BANK} bank)"
        return f"not reached by N={sample_counts[-1]}"

    runs = n_usable * len(SEEDS)
    lines = [
        "| N | forwards / image | Spearman iid | Spearman stratified | degenerate iid | degenerate stratified |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sample_counts:
        lines.append(
            f"| {n} | {n + 1} | {table[('iid', n)]:.3f} | {table[('stratified', n)]:.3f} "
            f"| {degenerate[('iid', n)]}/{runs} | {degenerate[('stratified', n)]}/{runs} |"
        )
    lines += [
        "",
        "| sampling | smallest N with Spearman ≥ 0.9 | smallest N with Spearman ≥ 0.95 |",
        "|---|---|---|",
    ]
    for sampling in SAMPLINGS:
        lines.append(f"| {sampling} | {first_reaching(sampling, 0.9)} | {first_reaching(sampling, 0.95)} |")
    lines += [
        "",
        f"Forwards / image = N path points + 1 clean pass; the {BANK} bank images add one pass each per call. "
        f"Degenerate = constant maps (all zero after the ReLU), left out of the means. The reference "
        f"(N={REFERENCE_N}) took {reference_seconds:.1f} s; {n_images - n_usable} of its {n_images} maps are "
        f"degenerate, so those images are left out ({n_usable} images × {len(SEEDS)} seeds per cell).",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 50], help="EGC n_samples in the speed table")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method first")
    parser.add_argument("--images", type=int, default=8, help="images in the convergence study")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, images and N")
    args = parser.parse_args()
    ns = CONVERGENCE_NS
    if args.quick:
        args.repeats, args.warmup, args.images, ns = 1, 1, 2, (4, 8)

    warnings.filterwarnings("ignore", category=UserWarning)
    import captum
    import pytorch_grad_cam

    load_before = os.getloadavg()
    started = time.perf_counter()
    print("# lightning_xcam engine benchmark\n")
    print(f"- torch {torch.__version__}, torchvision {torchvision.__version__}, captum {captum.__version__}, "
          f"pytorch-grad-cam {getattr(pytorch_grad_cam, '__version__', '1.5.x')}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"- speed: ResNet-18 (random weights, 10 classes, eval), layer4, batch {BATCH}, {SIZE}×{SIZE}, "
          f"bank {BANK} images, noise_std {NOISE_STD}, EGC weights='integrated' sampling='iid' batch_size=None; "
          f"{args.warmup} warm-up call(s), then {args.repeats} round-robin rounds per N ({6 * args.repeats} for Grad-CAM)")
    print(f"- convergence: ResNet-18 with BN shifts ~N(0, 0.5²), layer3 (4×4), {args.images} digits {SIZE}×{SIZE}×3, "
          f"bank {BANK} digits, noise_std {NOISE_STD}; reference EGC N={REFERENCE_N} iid seed {REFERENCE_SEED}; "
          f"Spearman on maps upsampled to {SIZE}×{SIZE}, mean over images and seeds {SEEDS}")
    print(f"- load average at start: {load_before[0]:.2f} (1 min), {load_before[1]:.2f} (5 min)\n")

    print("## Speed\n")
    print("\n".join(speed(args.samples, args.warmup, args.repeats)))
    print("\nms = median time per call; ratio = median over rounds of the within-round ratio (range = min–max).\n")
    print("## Samples to convergence (Spearman with the N=512 map)\n")
    print("\n".join(convergence(args.images, ns, batch_size=256)))
    load_after = os.getloadavg()
    print(f"\nTotal {time.perf_counter() - started:.0f} s; load average at end: {load_after[0]:.2f} (1 min), "
          f"{load_after[1]:.2f} (5 min).")


if __name__ == "__main__":
    main()
