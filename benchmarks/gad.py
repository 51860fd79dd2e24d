"""Cost of GAD relative to one Expected Grad-CAM pass at the same settings.

Run: ``python benchmarks/gad.py``. Models: SmallCNN (trained for a few seconds on real digits at 16×16;
global pooling makes it resolution-agnostic) and a ResNet-18 (random weights, digits as 3 channels), both
explained at 64×64. Settings: B = 16 images, EGC ``n_samples=16``, a bank of 64 references, a fit set of
512 images, four supports. Every cost is a median wall time divided by the median time of one EGC call.
The goal of ALGORITHMS.md §3.4-3.5 is warm fit + explain ≤ 2× EGC.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_xcam import GAD, ExpectedGradCAM
from lightning_xcam.demos import SmallCNN, load_digits_tensors

SIZE, BATCH, N_SAMPLES, N_BANK, N_FIT, REPEATS = 64, 16, 16, 64, 512, 3


def _median_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _trained_small_cnn() -> nn.Module:
    x, y = load_digits_tensors(16)
    net = SmallCNN()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(8):
        net.train()
        for i in range(0, 1400, 32):
            loss = F.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _row(name: str, net: nn.Module, layer: str, x: torch.Tensor, **gad_kwargs: object) -> str:
    x_fit, bank, probe = x[:N_FIT], x[N_FIT : N_FIT + N_BANK], x[-BATCH:]
    settings = {"references": bank, "n_samples": N_SAMPLES, "noise_std": 0.1}
    egc = ExpectedGradCAM(net, layer, **settings)
    gad = GAD(net, layer, base_kwargs=settings, r2_threshold=float("-inf"), **gad_kwargs)  # cost only
    egc_time = _median_time(lambda: egc(probe))
    start = time.perf_counter()
    gad.fit(x_fit)
    cold = time.perf_counter() - start
    warm = _median_time(lambda: gad.fit(x_fit), repeats=2)
    explain = _median_time(lambda: gad(probe))
    r2 = min(gad.diagnostics["fit_r2"])
    return (
        f"| {name} | `{gad.split}` | {egc_time * 1000:.0f} ms | {cold / egc_time:.1f}× | {warm / egc_time:.2f}× | "
        f"{explain / egc_time:.2f}× | **{(warm + explain) / egc_time:.2f}×** | {r2:.3f} |"
    )


def main() -> None:
    torch.manual_seed(0)
    images, _ = load_digits_tensors(SIZE)
    images = images[torch.randperm(images.shape[0])][: N_FIT + N_BANK + BATCH]
    rows = [
        _row("SmallCNN", _trained_small_cnn(), "features", images),
        _row(
            "ResNet-18",
            torchvision.models.resnet18(num_classes=10).eval(),
            "layer4",
            images.expand(-1, 3, -1, -1).contiguous(),
            lr=1e-3,
        ),
        _row(
            "ResNet-18, 10 warm steps",
            torchvision.models.resnet18(num_classes=10).eval(),
            "layer4",
            images.expand(-1, 3, -1, -1).contiguous(),
            lr=1e-3,
            warm_steps=10,
        ),
    ]
    print(
        f"GAD cost relative to one Expected Grad-CAM pass (B={BATCH}, N={N_SAMPLES}, bank {N_BANK}, {SIZE}×{SIZE}, "
        f"fit set {N_FIT}, 4 supports, {torch.get_num_threads()} threads)\n"
    )
    print("| model | split | EGC pass | cold fit | warm fit | explain | warm fit + explain | min fit R² |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
