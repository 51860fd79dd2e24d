"""Shortcut early-warning benchmark: planted shortcuts on packaged data, each with a clean twin.

Run ``python benchmarks/shortcuts.py`` (full: 153 runs, 5 minutes on the idle 2-core machine, 15 on shared cores) or
``--quick`` (15 runs, under a minute); ``--select TEXT`` (repeatable) keeps only the runs whose label
contains one of the texts, e.g. ``--select "digits-4 random 5px" --select "digits-4 untagged"``, to iterate
on a few runs (the tables then describe that subset only). ``--record DIR`` also saves every input the
monitor gives :func:`~lightning_xcam.alerts.observe` (weights, probe, maps; about 0.6 MB a run);
``--replay DIR`` then rebuilds the table from those files without training, running the current
``observe`` and :class:`~lightning_xcam.alerts.WarningRule` on them: training does not depend on the
monitor, so a change to the checks or the rule is measured on the same 153 runs in under two minutes.

Every run trains :class:`~lightning_xcam.demos.SmallCNN` (width 8, Adam 3e-3, batch 16) with the real
:class:`~lightning_xcam.ExplanationMonitor` inside ``Trainer.fit`` (Expected Grad-CAM, 48 probe items
drawn from the validation set, one evaluation per epoch, default :class:`~lightning_xcam.alerts.WarningRule`
and :func:`~lightning_xcam.alerts.observe` settings: the product as shipped, no per-task tuning; an alert is
confirmed by necessity (filling the top region) or sufficiency (pasting it into other-class probe images),
and the settings are printed under the table).

Tasks (data that ships inside packages, no downloads; 32×32, standardised):

* ``digits-2``: scikit-learn digits, 0–4 vs 5–9; ``digits-4``: digits 0–3 (four classes);
* ``faces-2``: scikit-image ``lfw_subset``, face vs non-face (200 images: 120 train, 80 held out).

Variants: a class-coded square tag (:func:`~lightning_xcam.demos.add_decoy_tags`) in a random corner or at a
random position, side 3 or 5 pixels, contrast 0.5 or 1. Each tagged run (tag code = label) has two clean
twins trained with the same seed: the same tags with codes drawn independently of the label (the tag is
visible but useless) and, once per task and seed, the untagged images.

Ground truth, measured independently of the monitor after every epoch on held-out images: the accuracy
with the tag code equal to the label minus the accuracy with the code scrambled (same positions). A run
*relies* on the shortcut when that gap is at least ``RELIANCE_GAP`` at the last epoch; reliance *appears*
at the first epoch from which the gap stays at or above it. Runs between ``PARTIAL_GAP`` and ``RELIANCE_GAP`` are partial
and reported apart (an alert there is neither a hit nor a false alarm).

Reported per task and overall: detection rate (relying runs with an alert), false-alarm rate (clean-twin
runs with any alert), evaluations from reliance to the first alert (negative = before the accuracy gap
reached the threshold), and the alert kinds that fired.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import itertools
import logging
import multiprocessing
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import lightning_xcam.callback
from lightning_xcam import ExplanationMonitor
from lightning_xcam.alerts import WarningRule, observe
from lightning_xcam.demos import SmallCNN, add_decoy_tags, load_digits_tensors, load_lfw_tensors

RELIANCE_GAP = 0.15
PARTIAL_GAP = 0.05
EPOCHS = 10
NOISE = {"digits-2": 0.5, "digits-4": 0.5, "faces-2": 1.5}  # pixel noise (std, standardised units) per task
HELD_OUT = 400  # held-out images per run: the probe pool (first half) and the ground truth (all)
TASKS = ("digits-2", "digits-4", "faces-2")
MONITOR = dict(target_layer="net.features", methods=("expected_gradcam",), metrics=(), num_probe=48,
               n_samples=8, num_references=32, num_fit=2, floor_size=8, log_images=0, store=False)


@dataclass(frozen=True)
class Run:
    """One training run: a task, a tag variant (``None`` = untagged), its tag-label correlation and seed."""

    task: str
    seed: int
    position: str | None = None
    size: int = 0
    contrast: float = 0.0
    correlation: float = 0.0

    @property
    def kind(self) -> str:
        return "tagged" if self.correlation > 0 else "clean"

    def label(self) -> str:
        if self.position is None:
            return f"{self.task} untagged s{self.seed}"
        return f"{self.task} {self.position} {self.size}px c{self.contrast:g} r{self.correlation:g} s{self.seed}"


@dataclass
class Outcome:
    run: Run
    gaps: list[float]
    accuracy: list[float]
    alerts: list[tuple[int, str, int | None]] = field(default_factory=list)
    seconds: float = 0.0
    recorded_alerts: list[tuple[int, str, int | None]] | None = None  # a replay's: what the recorded fit raised


class Classifier(pl.LightningModule):
    """SmallCNN (CAM layer ``net.features``) with Adam; module level so worker processes can build it."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = SmallCNN(in_channels=1, num_classes=num_classes, width=8)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], _index: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], _index: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class Reliance(pl.Callback):
    """Ground truth after every training epoch: accuracy with the tag = label, scrambled, and untagged."""

    def __init__(self, tagged: Tensor, scrambled: Tensor, clean: Tensor, labels: Tensor) -> None:
        self.sets = (tagged, scrambled, clean)
        self.labels = labels
        self.gaps: list[float] = []
        self.accuracy: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            acc = [(pl_module(x).argmax(1) == self.labels).float().mean().item() for x in self.sets]
        pl_module.train(was_training)
        self.gaps.append(acc[0] - acc[1])
        self.accuracy.append(acc[2])


def _task_data(task: str) -> tuple[Tensor, Tensor, int, int]:
    """Images, labels, number of classes and number of training images of a task."""
    if task == "faces-2":
        x, y = load_lfw_tensors(32)
        return x, y, 2, 120
    x, y = load_digits_tensors(32)
    if task == "digits-2":
        return x, (y >= 5).long(), 2, 400
    keep = y < 4
    return x[keep], y[keep], 4, 400


@contextlib.contextmanager
def _recording(evaluations: list[dict]) -> Iterator[None]:
    """Append the inputs of every :func:`observe` call the monitor makes to ``evaluations``."""
    shipped = lightning_xcam.callback.observe

    def spy(model: pl.LightningModule, x: Tensor, maps: Tensor, targets: Tensor, sample_ids: Tensor,
            **options: object) -> list:
        kept = ("replicate", "replicate_rows", "masks", "max_batch")
        evaluations.append({
            "epoch": model.current_epoch,
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "inputs": {"x": x.cpu(), "maps": maps.cpu(), "targets": targets.cpu(), "sample_ids": sample_ids.cpu(),
                       **{k: v.cpu() if isinstance(v, Tensor) else v for k, v in options.items() if k in kept}},
        })
        return shipped(model, x, maps, targets, sample_ids, **options)

    lightning_xcam.callback.observe = spy
    try:
        yield
    finally:
        lightning_xcam.callback.observe = shipped


def _recording_path(folder: Path, run: Run) -> Path:
    return folder / f"{run.label().replace(' ', '_')}.pt"


def _quiet_worker() -> None:
    """Worker processes: one thread each (the pool runs one per core), no warnings or Lightning chatter."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _execute(run: Run, record: Path | None = None) -> Outcome:
    """Train one run with the monitor and the ground truth; with ``record``, save what the monitor observed."""
    started = time.perf_counter()
    x, y, classes, n_train = _task_data(run.task)
    gen = torch.Generator().manual_seed(run.seed)
    order = torch.randperm(x.shape[0], generator=gen)
    # Pixel noise makes the object harder than the tag, so that tagged runs do learn the shortcut (§6.6).
    x, y = x[order] + NOISE[run.task] * torch.randn(x.shape, generator=gen), y[order]
    held = slice(n_train, n_train + HELD_OUT)

    def tag(correlation: float, seed: int) -> Tensor:
        if run.position is None:
            return x
        gen = torch.Generator().manual_seed(seed)
        return add_decoy_tags(x, y, size=run.size, position=run.position, contrast=run.contrast,
                              correlation=correlation, num_classes=classes, generator=gen)[0]

    data = tag(run.correlation, 1000 + run.seed)
    probe_pool = slice(n_train, n_train + max(48, min(HELD_OUT, x.shape[0] - n_train) // 2))
    truth = Reliance(tag(1.0, 2000 + run.seed)[held], tag(0.0, 2000 + run.seed)[held], x[held], y[held])
    train = DataLoader(TensorDataset(data[:n_train], y[:n_train]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(run.seed))
    val = DataLoader(TensorDataset(data[probe_pool], y[probe_pool]), batch_size=256)
    pl.seed_everything(run.seed, verbose=False)
    monitor = ExplanationMonitor(seed=run.seed, **MONITOR)
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[truth, monitor])
    evaluations: list[dict] = []
    with _recording(evaluations) if record else contextlib.nullcontext():
        trainer.fit(Classifier(classes), train, val)
    alerts = [(a.epoch, a.kind, a.class_index) for a in monitor.alerts]
    outcome = Outcome(run, truth.gaps, truth.accuracy, alerts, time.perf_counter() - started)
    if record:
        torch.save({"run": asdict(run), "seed": monitor.seed, "classes": classes, "gaps": outcome.gaps,
                    "accuracy": outcome.accuracy, "alerts": alerts, "evaluations": evaluations},
                   _recording_path(record, run))
    return outcome


def _replay(path: Path) -> Outcome:
    """The outcome of a recorded run with the current :func:`observe` and the shipped :class:`WarningRule`.

    The monitor seeds each evaluation's checks with ``torch.Generator().manual_seed(seed)`` (CPU here); the
    replay does the same, so unchanged code gives the recorded alerts exactly.
    """
    started = time.perf_counter()
    saved = torch.load(path, weights_only=True)
    model = Classifier(saved["classes"])
    rule = WarningRule()
    alerts = []
    for evaluation in saved["evaluations"]:
        model.load_state_dict(evaluation["state"])
        observations = observe(model, **evaluation["inputs"], generator=torch.Generator().manual_seed(saved["seed"]))
        alerts += [(a.epoch, a.kind, a.class_index) for a in rule.update(evaluation["epoch"], observations)]
    run = Run(**saved["run"])
    recorded = [tuple(alert) for alert in saved["alerts"]]
    return Outcome(run, saved["gaps"], saved["accuracy"], alerts, time.perf_counter() - started, recorded)


def _plan(quick: bool) -> list[Run]:
    seeds = (0,) if quick else (0, 1, 2)
    variants = [("corner", 3, 1.0), ("random", 5, 0.5)] if quick else list(
        itertools.product(("corner", "random"), (3, 5), (0.5, 1.0)))
    runs = []
    for task, seed in itertools.product(TASKS, seeds):
        runs.append(Run(task, seed))
        for position, size, contrast in variants:
            for correlation in (1.0, 0.0):
                runs.append(Run(task, seed, position, size, contrast, correlation))
    return runs


def _select(plan: list[Run], texts: list[str]) -> list[Run]:
    """The runs whose label contains one of ``texts`` (all runs without texts); an empty selection is an error."""
    if not texts:
        return plan
    kept = [run for run in plan if any(text in run.label() for text in texts)]
    if not kept:
        raise SystemExit(f"--select {texts} matches no run; labels look like {plan[1].label()!r}.")
    return kept


def _onset(gaps: list[float]) -> int:
    """First epoch from which the accuracy gap stays at or above ``RELIANCE_GAP`` (early spikes are noise)."""
    onset = len(gaps) - 1
    while onset > 0 and gaps[onset - 1] >= RELIANCE_GAP:
        onset -= 1
    return onset


def _rate(hits: int, total: int) -> str:
    return f"{hits}/{total} ({100 * hits / total:.0f}%)" if total else "-"


def _summary(name: str, outcomes: list[Outcome]) -> str:
    relying = [o for o in outcomes if o.run.kind == "tagged" and o.gaps[-1] >= RELIANCE_GAP]
    partial = [o for o in outcomes if o.run.kind == "tagged" and PARTIAL_GAP <= o.gaps[-1] < RELIANCE_GAP]
    unused = [o for o in outcomes if o.run.kind == "tagged" and o.gaps[-1] < PARTIAL_GAP]
    clean = [o for o in outcomes if o.run.kind == "clean"]
    delays = []
    for o in relying:
        if o.alerts:
            onset = _onset(o.gaps)
            delays.append(min(e for e, _, _ in o.alerts) - onset)
    within = sum(d <= 2 for d in delays)
    delay = (f"median {statistics.median(delays):+g}, max {max(delays):+d}; ≤ 2: {_rate(within, len(delays))}"
             if delays else "-")
    return (f"| {name} | {_rate(sum(bool(o.alerts) for o in relying), len(relying))} "
            f"| {_rate(sum(bool(o.alerts) for o in clean), len(clean))} | {delay} "
            f"| {_rate(sum(bool(o.alerts) for o in partial), len(partial))} "
            f"| {_rate(sum(bool(o.alerts) for o in unused), len(unused))} |")


def _kinds(outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        for kind in sorted({k for _, k, _ in o.alerts}):
            counts[f"{o.run.kind}:{kind}"] = counts.get(f"{o.run.kind}:{kind}", 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _settings() -> str:
    """The shipped rule and check settings the runs used (read from the code, not restated)."""
    rule = WarningRule()
    checks = {name: p.default for name, p in inspect.signature(observe).parameters.items()
              if p.default is not inspect.Parameter.empty and name in ("top_fraction", "n_recipients", "n_random")}
    return (f"Settings: WarningRule(confirm_z={rule.confirm_z:g}, min_drop={rule.min_drop:g}, "
            f"min_rise={rule.min_rise:g}, patience={rule.patience}); observe({', '.join(f'{k}={v}' for k, v in checks.items())}); "
            "an alert needs necessity (fill) or sufficiency (transplant) confirmed.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, two tag variants (a few minutes)")
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes (one thread each)")
    parser.add_argument("--runs", action="store_true", help="also print one line per run")
    parser.add_argument("--select", action="append", default=[], metavar="TEXT",
                        help="keep only runs whose label (as printed by --runs) contains TEXT; repeatable")
    sources = parser.add_mutually_exclusive_group()
    sources.add_argument("--record", type=Path, metavar="DIR",
                         help="also save every observe() input of every run into DIR (one file per run)")
    sources.add_argument("--replay", type=Path, metavar="DIR",
                         help="no training: rerun observe() and WarningRule on the runs recorded in DIR")
    args = parser.parse_args()
    plan = _select(_plan(args.quick), args.select)
    if args.replay:
        missing = [run.label() for run in plan if not _recording_path(args.replay, run).exists()]
        if missing:
            raise SystemExit(f"--replay {args.replay}: no recording of {len(missing)} planned runs (e.g. "
                             f"{missing[0]!r}); record them first with --record {args.replay} (and the same "
                             "--quick/--select).")
    elif args.record:
        args.record.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers, initializer=_quiet_worker) as pool:
        if args.replay:
            outcomes = pool.map(_replay, [_recording_path(args.replay, run) for run in plan], chunksize=1)
        else:
            outcomes = pool.map(functools.partial(_execute, record=args.record), plan, chunksize=1)
    header = ("| task | detection (relying runs) | false alarms (clean twins) | evaluations to first alert "
              "| alerts on partial reliance | alerts on tagged runs without reliance |\n|---|---|---|---|---|---|")
    scope = (("quick" if args.quick else "full") + (f", subset {args.select}" if args.select else "")
             + (f", replayed from {args.replay}" if args.replay else ""))
    print(f"Shortcut benchmark ({scope}): {len(plan)} runs, {EPOCHS} evaluations each; "
          f"reliance = accuracy gap (tag = label vs scrambled) >= {RELIANCE_GAP} at the last epoch.\n")
    print(header)
    for task in TASKS:
        print(_summary(task, [o for o in outcomes if o.run.task == task]))
    print(_summary("**overall**", outcomes))
    print(f"\nAlert kinds (runs): {_kinds(outcomes)}")
    if args.replay:
        changed = [o.run.label() for o in outcomes if o.alerts != o.recorded_alerts]
        print(f"Alerts differ from the recorded fits on {len(changed)} of {len(outcomes)} runs"
              + (f": {', '.join(changed)}" if changed else "."))
    print(_settings())
    if args.runs:
        print("\n| run | gap per epoch | clean acc | alerts (epoch kind class) | s |\n|---|---|---|---|---|")
        for o in outcomes:
            gaps = " ".join(f"{g:+.2f}" for g in o.gaps)
            alerts = "; ".join(f"{e} {k} {c}" for e, k, c in o.alerts) or "-"
            print(f"| {o.run.label()} | {gaps} | {o.accuracy[-1]:.2f} | {alerts} | {o.seconds:.0f} |")
    print(f"\n(total {time.perf_counter() - started:.0f} s with {args.workers} workers; load average at start "
          f"{load[0]:.2f} (1 min))")


if __name__ == "__main__":
    main()
