"""Benchmark: batched insertion + deletion AUC against the forwards they need, a per-image loop and Quantus.

ResNet-18 (random weights, 10 classes) on 16 random 3 × 64 × 64 images, 20 steps (21 points per curve).

- (a) overhead: time of ``insertion_auc + deletion_auc`` / time of the plain forward passes of the same
  number of pre-built images in the same chunk size (goal ≤ 1.2);
- (b) speed-up over a straightforward per-image loop (one image and one step per forward, as RISE's
  ``CausalMetric.single_run``) (goal ≥ 5×);
- (c) speed-up over Quantus' ``PixelFlipping`` (its deletion-style curve, batched over images, one forward
  per step; it perturbs single channel values, so a 3-channel image needs 3× the steps), if installed.

Run: ``python benchmarks/metrics.py``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable

import torch
import torchvision

from lightning_xcam.maps import upsample
from lightning_xcam.metrics import deletion_auc, insertion_auc, make_substrate

BATCH, SIZE, STEPS, MAX_BATCH = 16, 64, 20, 112
ROUNDS = 4  # metric and plain forwards are timed alternately, best of ROUNDS each (robust to a busy machine)
LOOP_IMAGES = 4  # the per-image loop is timed on this many images and scaled to BATCH (its cost is linear)


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class _ForwardClock:
    """Accumulates the wall time spent inside ``model.forward`` (hooks registered before the metric runs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.total, self._start = 0.0, 0.0
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._leave)

    def _enter(self, *_: object) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_: object) -> None:
        self.total += time.perf_counter() - self._start


def _plain_forwards(model: torch.nn.Module, x: torch.Tensor, rows: int) -> None:
    """Forward ``rows`` pre-built images (copies of x) in chunks of MAX_BATCH: the floor of the metric."""
    images = x.repeat((rows + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:rows]
    with torch.inference_mode():
        for first in range(0, rows, MAX_BATCH):
            model(images[first : first + MAX_BATCH]).softmax(1)


def _per_image_loop(model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor) -> list[float]:
    """The naive transcription: per image, per step, one forward of one image."""
    pixels = SIZE * SIZE
    step = -(-pixels // STEPS)
    up = upsample(maps, (SIZE, SIZE))
    aucs = []
    with torch.inference_mode():
        for b in range(x.shape[0]):
            image = x[b : b + 1]
            target = int(model(image).argmax())
            order = torch.argsort(up[b].flatten(), descending=True, stable=True)
            for start, finish in ((make_substrate(image, "blur"), image), (image, torch.zeros_like(image))):
                current = start.clone().view(1, 3, pixels)
                scores = []
                for i in range(-(-pixels // step) + 1):
                    scores.append(float(model(current.view_as(image)).softmax(1)[0, target]))
                    index = order[i * step : (i + 1) * step]
                    current[0, :, index] = finish.reshape(1, 3, pixels)[0, :, index]
                aucs.append(sum((a + c) / 2 for a, c in zip(scores[:-1], scores[1:])) / (len(scores) - 1))
    return aucs


def _quantus_pixel_flipping(model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor) -> Callable[[], object] | None:
    try:
        import quantus
    except ImportError:
        return None
    targets = model(x).argmax(1).numpy()
    a_batch = upsample(maps, (SIZE, SIZE))[:, None].numpy()
    metric = quantus.PixelFlipping(
        features_in_step=SIZE * SIZE // 16, perturb_baseline="black", disable_warnings=True, display_progressbar=False
    )
    return lambda: metric(model=model, x_batch=x.numpy(), y_batch=targets, a_batch=a_batch, softmax=True, device="cpu")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help describes it
    load = os.getloadavg()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    maps = torch.rand(BATCH, 2, 2) + torch.rand(BATCH, SIZE // 32, SIZE // 32)  # ResNet-18's layer4 is 2 × 2

    def both() -> None:
        insertion_auc(model, x, maps, steps=STEPS, max_batch=MAX_BATCH)
        deletion_auc(model, x, maps, steps=STEPS, max_batch=MAX_BATCH)

    both()  # warm-up
    points = STEPS + 1
    rows = 2 * BATCH * points  # the clean forward of each call replaces one point of its curve
    t_metric, t_forward, in_run = float("inf"), float("inf"), float("inf")
    clock = _ForwardClock(model)
    for _ in range(ROUNDS):
        clock.total = 0.0
        elapsed = _best_of(both, 1)
        # Same-run ratio: wall time / time inside the model's forwards, insensitive to load between runs.
        in_run = min(in_run, elapsed / clock.total)
        t_metric = min(t_metric, elapsed)
        t_forward = min(t_forward, _best_of(lambda: _plain_forwards(model, x, rows), 1))
    t_loop = _best_of(lambda: _per_image_loop(model, x[:LOOP_IMAGES], maps[:LOOP_IMAGES]), 1) * BATCH / LOOP_IMAGES

    print(f"ResNet-18 (random weights), {BATCH} × 3 × {SIZE} × {SIZE}, {STEPS} steps, max_batch {MAX_BATCH}, "
          f"{torch.get_num_threads()} threads; load average at start {load[0]:.2f} (1 min)\n")
    print("| measurement | time (s) | ratio |")
    print("|---|---|---|")
    print(f"| insertion + deletion, batched | {t_metric:.3f} | 1.00 |")
    print(f"| plain forwards of the same {rows} images | {t_forward:.3f} | overhead {t_metric / t_forward:.2f}× (goal ≤ 1.2) |")
    print(f"| same run: metric wall time / time inside the model's forwards | | overhead {in_run:.2f}× |")
    print(
        f"| per-image loop (RISE-style; {LOOP_IMAGES} images, scaled) | {t_loop:.3f} | "
        f"speed-up {t_loop / t_metric:.1f}× (goal ≥ 5) |"
    )
    quantus_run = _quantus_pixel_flipping(model, x, maps)
    if quantus_run is None:
        print("| Quantus PixelFlipping | not installed | |")
        return
    t_quantus = _best_of(quantus_run, 1)

    def deletion_16() -> None:
        deletion_auc(model, x, maps, steps=16, max_batch=MAX_BATCH)

    t_deletion = _best_of(deletion_16, ROUNDS)
    print(f"| deletion only, 16 steps (ours) | {t_deletion:.3f} | 1.00 |")
    print(
        f"| Quantus PixelFlipping, 16 pixel steps × 3 channels | {t_quantus:.3f} | "
        f"speed-up {t_quantus / t_deletion:.1f}× (Quantus needs 3× the forwards on RGB) |"
    )


if __name__ == "__main__":
    main()
