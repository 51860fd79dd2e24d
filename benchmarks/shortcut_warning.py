"""Benchmark of the shortcut early warning on a planted shortcut (ALGORITHMS.md §6.6).

Run it with ``python benchmarks/shortcut_warning.py`` (1–3 minutes on 2 CPU cores). Two
:class:`~lightning_xcam.demos.SmallCNN` models train on the same 1,200 real digits (scikit-learn, 32×32,
standardised) with the same seed: one on *decoy* digits (a 4×4 class-coded patch in a random corner,
``add_decoy_tags``, correlation 1), one on the clean twin. After every epoch, on 64 held-out probe digits
tagged with their label's code, Grad-CAM maps give the area-normalised ratio ρ on the tag, the border
mass, ``a50`` and the reliance z of the tag region (filled with the blur substrate, 8 equal-area random
controls), and :class:`~lightning_xcam.alerts.WarningRule` is fed ρ (per run, overall) with the reliance
check. The table prints, per run and epoch: accuracy with the label's code, accuracy with a random code
(bias-conflicting), ρ, border mass, ``a50``, mean Δp on the tag vs the controls, mean z, and alerts.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lightning_xcam.alerts import Observation, WarningRule, a50, area_ratio, border_mass, region_reliance
from lightning_xcam.demos import SmallCNN, add_decoy_tags, load_digits_tensors
from lightning_xcam.methods.cam import GradCAM

EPOCHS = 6
TRAIN = 1200
PROBE = 64


def _train_epoch(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator
) -> None:
    model.train()
    order = torch.randperm(x.shape[0], generator=gen)
    for start in range(0, x.shape[0], 32):
        idx = order[start : start + 32]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    torch.set_num_threads(2)
    images, labels = load_digits_tensors(32)
    train_x, train_y = images[:TRAIN], labels[:TRAIN]
    test_x, test_y = images[TRAIN:], labels[TRAIN:]
    tags = dict(size=4, position="corner")
    decoy_train, _ = add_decoy_tags(train_x, train_y, generator=torch.Generator().manual_seed(1), **tags)
    tagged_test, test_masks = add_decoy_tags(test_x, test_y, generator=torch.Generator().manual_seed(2), **tags)
    conflict_test, _ = add_decoy_tags(
        test_x, test_y, correlation=0.0, generator=torch.Generator().manual_seed(2), **tags
    )
    probe_x, probe_y, probe_masks = tagged_test[:PROBE], test_y[:PROBE], test_masks[:PROBE]

    rows = []
    for run, data in (("decoy", decoy_train), ("clean", train_x)):
        torch.manual_seed(0)
        model = SmallCNN()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        rule = WarningRule()
        cam = GradCAM(model, "features")
        for epoch in range(EPOCHS):
            _train_epoch(model, data, train_y, opt, gen)
            maps = cam(probe_x, probe_y)
            rho = area_ratio(maps, probe_masks)
            draws = torch.Generator().manual_seed(epoch)
            rel = region_reliance(model, probe_x, probe_masks, probe_y, generator=draws)
            alerts = rule.update(
                epoch,
                [
                    Observation(
                        "spurious_mass",
                        None,
                        rho.mean().item(),
                        drop_region=rel.drop_region.mean().item(),
                        drop_random=rel.drop_random.mean().item(),
                        z=rel.z.mean().item(),
                    )
                ],
            )
            rows.append(
                (
                    run,
                    epoch,
                    _accuracy(model, tagged_test, test_y),
                    _accuracy(model, conflict_test, test_y),
                    rho.mean().item(),
                    border_mass(maps).mean().item(),
                    a50(maps).mean().item(),
                    rel.drop_region.mean().item(),
                    rel.drop_random.mean().item(),
                    rel.z.mean().item(),
                    "; ".join(a.message for a in alerts) or "-",
                )
            )
    print(
        "| run | epoch | acc (code = label) | acc (random code) | ρ on tag | border mass | a50 "
        "| Δp tag | Δp random | z | alert |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| {} | {} | {:.3f} | {:.3f} | {:.2f} | {:.2f} | {:.3f} | {:.3f} | {:.3f} | {:.1f} | {} |".format(*row))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
