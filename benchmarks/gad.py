"""Cost of GAD relative to one Expected Grad-CAM pass at the same settings, as inside a training run.

Run: ``python benchmarks/gad.py [--threads N]`` (default 1 thread: on a shared 2-core machine small ops
under thread contention distort the ratios; the ratios hold for any thread count the machine really has).

Settings: the monitor's defaults — B = 32 probe images explained (at 64×64), EGC ``n_samples=16``, a bank
of 64 references, four supports, GAD's defaults otherwise; fit sets of 256 (the monitor's ``num_fit``)
and 128 images. Models, trained on the real digits at 64×64: SmallCNN (300 SGD steps) and
ResNet-18 (30 SGD steps, the digits as 3 channels).

Protocol: a cold fit on the first model state; then, ``REPEATS`` times, the model takes a few SGD steps
of ordinary training (not timed) and GAD refreshes (warm fit, timed), as before every evaluation of the
monitor. Every cost is a median wall time divided by the median time of one EGC call on the same model,
measured in the same run. ``steps``: Adam steps of the warm fits (median, all supports train together).
``tail``: share of the forward multiply-adds that run after the split; the ``k + 1`` tails on one trunk
pass make an explanation cost at least ``(1 − tail) + (k + 1)·tail`` EGC passes. ``supports train``: what
the support fits optimise (GAD's default ``trainable="after_last_conv"``: what follows the tail's last
convolution, whose output a fit caches; ``--whole-tail`` adds a ResNet-18 row with every tail parameter).
The goal of ALGORITHMS.md §3.4-3.5 is warm fit + explain ≤ 2× EGC.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from lightning_xcam import GAD, ExpectedGradCAM
from lightning_xcam.demos import SmallCNN, load_digits_tensors
from lightning_xcam.methods._guard import hooked
from lightning_xcam.methods.gad import _execution

SIZE, BATCH, N_SAMPLES, N_BANK, REPEATS = 64, 32, 16, 64, 3


def _median_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train(net: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float, start: int = 0) -> None:
    """``steps`` SGD steps of batch 32 (the model moves between two evaluations)."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for step in range(steps):
        i = ((start + step) * 32) % (x.shape[0] - 32)
        loss = F.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def _tail_share(net: nn.Module, split: str, x: Tensor) -> float:
    """Share of the convolution and linear multiply-adds of one forward pass that run after ``split``."""
    macs: dict[str, int] = {}

    def count(name: str) -> Callable:
        def hook(module: nn.Module, _inputs: object, out: Tensor) -> None:
            per_output = module.weight[0].numel()  # in_channels/groups × kernel, or in_features
            macs[name] = macs.get(name, 0) + out[0].numel() * per_output

        return hook

    with hooked(m.register_forward_hook(count(n)) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))), \
            torch.no_grad():
        net(x[:1])
    calls = _execution(net, x)
    split_end = calls[split][-1][1]
    tail = sum(v for n, v in macs.items() if calls[n][0][0] > split_end)
    return tail / sum(macs.values())


def _row(name: str, net: nn.Module, layer: str, x: Tensor, y: Tensor, n_fit: int, lr: float, **gad_kwargs: Any) -> str:
    x_fit, bank, probe = x[:n_fit], x[-N_BANK - BATCH : -BATCH], x[-BATCH:]
    settings = {"references": bank, "n_samples": N_SAMPLES, "noise_std": 0.1}
    egc = ExpectedGradCAM(net, layer, **settings)
    gad = GAD(net, layer, base=ExpectedGradCAM(net, layer, **settings), **gad_kwargs)
    egc_times = [_median_time(lambda: egc(probe))]
    start = time.perf_counter()
    gad.fit(x_fit)
    cold = time.perf_counter() - start
    warm, steps = [], []
    for r in range(REPEATS):
        _train(net, x, y, steps=5, lr=lr, start=100 + 5 * r)
        start = time.perf_counter()
        gad.fit(x_fit)
        warm.append(time.perf_counter() - start)
        steps.append(max(gad.diagnostics["steps"]))
    egc_times.append(_median_time(lambda: egc(probe)))
    explain = _median_time(lambda: gad(probe))
    egc_times.append(_median_time(lambda: egc(probe)))
    egc_time, warm_time = statistics.median(egc_times), statistics.median(warm)
    d = gad.diagnostics
    share = _tail_share(net, gad.split, probe) if gad.split else 1.0
    trained = f"after `{d['cut']}` ({d['trained_parameters']} tensors)" if d["cut"] else f"whole tail ({d['trained_parameters']} tensors)"
    k = len(gad.lambdas)
    return (
        f"| {name} | {n_fit} | `{gad.split}` | {trained} | {share:.1%} ({1 - share + (k + 1) * share:.2f}×) | "
        f"{egc_time * 1000:.0f} ms | {cold / egc_time:.1f}× | {warm_time / egc_time:.2f}× "
        f"({statistics.median(steps):.0f}) | {explain / egc_time:.2f}× | **{(warm_time + explain) / egc_time:.2f}×** | "
        f"{min(d['fit_r2']):.3f} | {sum(d['active'])}/{k} |"
    )


def _blank_drop(net: nn.Module, x: Tensor, cells: Tensor, targets: Tensor) -> Tensor:
    """Drop of p(target) per image when the cells of ``cells`` ([B, h, w], 0/1) are set to zero."""
    pixels = F.interpolate(cells[:, None], size=x.shape[-2:], mode="nearest")
    with torch.no_grad():
        before = net(x).softmax(1).gather(1, targets[:, None])[:, 0]
        after = net(x * (1 - pixels)).softmax(1).gather(1, targets[:, None])[:, 0]
    return before - after


def quality() -> list[str]:
    """Conciseness and faithfulness of GAD's fused mask per ``trainable`` setting, on one trained ResNet-18
    (the CIFAR variant at 32×32, so ``layer4`` has 4×4 cells: a 2×2 map leaves too few cells to compare)."""
    from overhead import cifar_resnet18

    torch.manual_seed(0)
    images, labels = load_digits_tensors(32)
    order = torch.randperm(images.shape[0])
    rgb, labels = images[order].expand(-1, 3, -1, -1).contiguous(), labels[order]
    net = cifar_resnet18()
    _train(net, rgb, labels, steps=150, lr=0.01)
    with torch.no_grad():
        accuracy = float((net(rgb[1400:1600]).argmax(1) == labels[1400:1600]).float().mean())
    x_fit, probe = rgb[:256], rgb[1600:1664]
    lines = [
        f"CIFAR ResNet-18 trained 150 SGD steps on the digits (held-out accuracy {accuracy:.1%}), `layer4` (4×4 at 32×32), Grad-CAM "
        f"base, fit set {x_fit.shape[0]}, {probe.shape[0]} probe images\n",
        "| trainable | cold fit s | steps per support | min fit R² | cells kept (plain τ-mask) | blanking drop "
        "| random same-area drop (± s.e., 16 draws) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for trainable in ("after_last_conv", "tail"):
        gad = GAD(net, "layer4", base="gradcam", trainable=trainable)
        start = time.perf_counter()
        gad.fit(x_fit)
        seconds = time.perf_counter() - start
        result = gad.explain(probe)
        d = gad.diagnostics
        mask = result.mask.float()
        area = mask.flatten(1).sum(1)
        kept = area > 0
        generator = torch.Generator().manual_seed(0)
        random_drops = []
        for _ in range(16):
            ranks = torch.rand(mask.shape[0], mask[0].numel(), generator=generator).argsort(1).argsort(1)
            cells = (ranks < area[:, None]).float().view_as(mask)
            random_drops.append(_blank_drop(net, probe, cells, result.targets)[kept].mean())
        spread = torch.stack(random_drops)
        drop = _blank_drop(net, probe, mask, result.targets)[kept].mean()
        lines.append(
            f"| `{trainable}` | {seconds:.1f} | {d['steps']} | {min(d['fit_r2']):.3f} | "
            f"{d['kept_fraction'].mean():.0%} ({d['plain_fraction'].mean():.0%}) | {drop:.3f} | "
            f"{spread.mean():.3f} ± {spread.std() / 4:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="smallcnn,resnet18", help="comma-separated subset of the rows")
    parser.add_argument("--whole-tail", action="store_true",
                        help="also time ResNet-18 with trainable='tail' (every tail parameter; its cold fit is long)")
    parser.add_argument("--quality", action="store_true",
                        help="instead: mask size and blanking drop per `trainable` on a trained ResNet-18 (~7 min)")
    args = parser.parse_args()
    load = os.getloadavg()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, labels = load_digits_tensors(SIZE)
    order = torch.randperm(images.shape[0])
    images, labels = images[order], labels[order]
    if args.quality:
        print("\n".join(quality()))
        return
    rows = []
    models = args.models.split(",")
    for n_fit in (256, 128) if "smallcnn" in models else ():
        torch.manual_seed(0)
        small = SmallCNN()
        _train(small, images, labels, steps=300, lr=0.02)
        rows.append(_row("SmallCNN", small, "features", images, labels, n_fit, lr=0.02))
    rgb = images.expand(-1, 3, -1, -1).contiguous()
    for n_fit in (256, 128) if "resnet18" in models else ():
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18(num_classes=10)
        _train(resnet, rgb, labels, steps=30, lr=0.01)
        state = copy.deepcopy(resnet.state_dict())
        rows.append(_row("ResNet-18", resnet, "layer4", rgb, labels, n_fit, lr=0.01))
        if args.whole_tail:
            resnet.load_state_dict(state)  # the same starting point and training steps as the row above
            rows.append(_row("ResNet-18", resnet, "layer4", rgb, labels, n_fit, lr=0.01, trainable="tail"))
    print(
        f"GAD cost relative to one Expected Grad-CAM pass (B={BATCH}, N={N_SAMPLES}, bank {N_BANK}, {SIZE}×{SIZE}, "
        f"4 supports, {torch.get_num_threads()} thread(s)); warm fits after 5 SGD steps of training each; "
        f"load average at start {load[0]:.2f} (1 min)\n"
    )
    print(
        "| model | fit set | split | supports train | tail (explain floor) | EGC pass | cold fit | warm fit (steps) "
        "| explain | warm fit + explain | min fit R² | active |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
