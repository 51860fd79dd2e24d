r"""
Explanation monitor
===================

Explain a fixed probe set every few epochs, score and store the explanations, and log them to TensorBoard,
without changing a single bit of training. The maths lives in :mod:`lightning_xcam.methods`,
:mod:`lightning_xcam.metrics`, :mod:`lightning_xcam.drift` and :mod:`lightning_xcam.alerts`; this module
only decides when to run, which data to use and where results go.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset
from typing_extensions import override

from lightning_xcam import drift as drift_stats
from lightning_xcam import metrics as xm
from lightning_xcam._checks import check_int, nonfinite_rows
from lightning_xcam.alerts import Alert, Observation, WarningRule, evidence_image, observe
from lightning_xcam.budget import CostBudget
from lightning_xcam.maps import degenerate
from lightning_xcam.metrics._perturb import target_probabilities
from lightning_xcam.methods._guard import explanation_context, fresh_input, require_float32
from lightning_xcam.methods.cam import ExpectedGradCAM, GradCAM, IntegratedGradCAM, _LayerProbe
from lightning_xcam.methods.layers import resolve_layer
from lightning_xcam.render import DISPLAY_CONCENTRATION, explanation_panel, relative_mass, stack_rows
from lightning_xcam.store import DEFAULT_FILENAME, ExplanationStore, StoreFormatError, store_file
from lightning_xcam.tensorboard import DETERMINISTIC_METHODS, write_layout

log = logging.getLogger(__name__)

__all__ = ["ExplanationMonitor"]

Method = Literal["expected_gradcam", "gad", "gradcam", "integrated_gradcam"]
MetricName = Literal[
    "insertion", "deletion", "infidelity", "max_sensitivity", "average_drop", "sparseness", "entropy"
]
METHODS: tuple[str, ...] = get_args(Method)
METRICS: tuple[str, ...] = get_args(MetricName)
# Logged names: direction is part of the name's documentation (README "What the scalars mean").
_METRIC_TAGS = {
    "insertion": "insertion_auc",
    "deletion": "deletion_auc",
    "infidelity": "infidelity",
    "max_sensitivity": "max_sensitivity",
    "average_drop": "average_drop",
    "sparseness": "sparseness",
    "entropy": "entropy",
}
_USES_REFERENCES = frozenset({"expected_gradcam", "gad"})  # built on the bank of training images (see `_build`)
_STATE_VERSION = 1
_MIN_MAP_CELLS = 16  # below 4×4 cells a map can hardly separate an object from a tag in a corner
_SENSITIVITY_SAMPLES = 5  # perturbed copies per item for max-sensitivity (plus the clean explanation)


class ExplanationMonitor(Callback):
    r"""Explain a fixed probe set during ``fit``; score, store and log the explanations; warn on shortcuts.

    Every ``every_n_epochs`` epochs, at the end of the epoch's validation (or of the training epoch when
    no validation ran), the monitor explains the probe set with each method, scores the maps, measures
    their drift against the previous and the first evaluation in units of the explainer's own noise floor
    (two random streams at the same epoch), logs scalars under ``xcam/<method>/<name>`` through
    ``pl_module.log`` (so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them), heatmap panels
    (image | map | overlay) to every ``TensorBoardLogger``, and writes everything to an SQLite store.

    Training is untouched: explanations run in eval mode with every flag, ``.grad``, buffer, hook and RNG
    state restored; randomness comes from the monitor's own generators; gradients are taken with
    ``torch.autograd.grad`` only.

    Cost per evaluation (``N = n_samples``, ``P`` probe items): Expected Grad-CAM ``≈ (N + 1)·P`` forward
    passes plus the reference bank; GAD the same with ``k + 1`` tails on each trunk pass, plus a refit of
    its supports (one forward pass over the fit set, then steps on cached activations). GAD explains the
    original model with the monitor's Expected Grad-CAM on the way, so the two methods together cost one
    pass;
    insertion + deletion ``2·(steps + 1)·P`` forwards per method; infidelity ``(n_perturb + 1)·P`` for all
    methods together (they share the perturbations); max-sensitivity ``1 + 5`` explanations of the ``P``
    items (the clean one and five perturbed copies).

    **Cost budget.** Explanations, drift and the shortcut checks run at every due evaluation; the metrics
    are the optional part. A metric runs when the monitor's total wall time, with that metric's last
    measured cost added, stays within ``max_overhead`` of the fit's training time so far (everything
    outside the monitor: steps, validation, checkpoints); otherwise it is deferred to a later evaluation
    (an info line says so, and its scalar is absent at that epoch). Before its first run a metric's cost
    is estimated from the evaluation's own timings: its forward passes (above) at the time of the
    prediction pass over the probe, and max-sensitivity's explanations at the time of the explanation
    pass. The metrics take turns (the longest-waiting first; the queue waits at the first that does
    not fit, so the dearest, max-sensitivity, still gets its turn). ``xcam/overhead`` logs the share
    reached. With ``max_overhead=None`` every metric runs at every evaluation (max-sensitivity at every
    ``sensitivity_every``-th): use that when an ``EarlyStopping`` or ``ModelCheckpoint`` monitors an ``xcam``
    score, or when epochs are so short that the budget would defer most scores.

    Args:
        target_layer: Dotted name of the CAM layer inside the LightningModule; ``None`` detects the last
            module with a spatial output.
        probe: A dataset of ``(x, y)`` or ``(x, y, mask)`` items to explain; ``None`` draws ``num_probe``
            items once from the validation dataset (else the training dataset) with the monitor's seed.
        num_probe: Probe size when drawn.
        every_n_epochs: Run every this many epochs (at epochs ``n−1, 2n−1, …``).
        methods: Explainers to run: ``"expected_gradcam"``, ``"gad"``, ``"gradcam"``, ``"integrated_gradcam"``.
        metrics: Scores to compute: ``"insertion"``, ``"deletion"``, ``"infidelity"``, ``"max_sensitivity"``,
            ``"average_drop"``, ``"sparseness"``, ``"entropy"``.
        log_images: Probe items whose heatmap panels are logged (0 = none).
        store: ``None`` (or ``True``) = ``<log_dir>/xcam.sqlite``; a file or directory path; or ``False`` for no
            store. A resumed fit keeps writing the store its checkpoint was written with, so a logger that
            starts a new version on resume does not split the history; a resumed or fresh fit first deletes
            the run's evaluations it is about to redo (a resume from an earlier checkpoint, a rerun of a run
            name), with a warning.
        on_alert: ``"warn"`` or ``"stop"`` (stop training through Lightning, agreed across ranks).
        seed: Seed of every random draw the monitor makes.
        n_samples: Expected Grad-CAM path samples per image.
        noise_std: Expected Grad-CAM input noise, model-input units.
        num_references: Reference images drawn from the training data (disjoint from the probe).
        num_fit: GAD fit-set size drawn from the training data (disjoint from the probe).
        floor_size: Probe items re-explained on a second random stream to measure the noise floor.
        sensitivity_every: With ``max_overhead=None``, max-sensitivity (the dearest metric) runs on every
            this-many-th evaluation only; under a budget it takes its turn with the other metrics.
        steps: Insertion/deletion steps.
        n_perturb: Infidelity perturbations per item.
        batch_size: Most inputs per forward pass inside the monitor (memory budget).
        spurious_masks: Optional ``[P, H, W]`` masks of a suspected shortcut region for the probe items
            (also read from probe items ``(x, y, mask)``).
        alert_patience: Consecutive evaluations a shortcut signal must rise (tiny-region reliance: be
            confirmed) before an alert.
        max_overhead: Largest share of training wall time the metrics may bring the monitor to (``0.02``
            = 2 %); ``None`` computes every metric at every evaluation (see *Cost budget*).

    Attributes:
        history: One dict of logged values per evaluation of the current run.
        alerts: The run's shortcut :class:`~lightning_xcam.alerts.Alert` s.
        layer_name: The CAM layer in use (``target_layer`` or the detected one), set when training starts.
        run_id: The run's name in the store.
        stopped_epoch: Epoch at which ``on_alert="stop"`` stopped training (``-1``: it did not).

    Each ``fit`` is a new run: this state starts afresh in ``setup`` and comes back from the checkpoint when
    a fit resumes. Several monitors (one per layer, say) need their own ``store`` paths, and their scalars
    share the ``xcam/`` names: give them different ``methods``, or read each one's ``history``.

    Raises:
        MisconfigurationException: On invalid arguments (at construction); a second monitor writing the
            same store run, an unknown or non-spatial layer, a model whose logits are not ``[B, K >= 2]`` or that
            fails on the probe, a probe that is empty, larger than the dataset or not finite, or a store
            that cannot be written (before the first training batch).

    Example::

        from lightning.pytorch import Trainer
        from lightning_xcam import ExplanationMonitor

        trainer = Trainer(callbacks=[ExplanationMonitor(target_layer="net.layer4", every_n_epochs=2)])
    """

    def __init__(
        self,
        target_layer: str | None = None,
        probe: Dataset | None = None,
        num_probe: int = 32,
        every_n_epochs: int = 1,
        methods: Sequence[Method] = ("expected_gradcam", "gad"),
        metrics: Sequence[MetricName] = ("insertion", "deletion", "infidelity", "max_sensitivity"),
        log_images: int = 8,
        store: str | bool | None = None,
        on_alert: Literal["warn", "stop"] = "warn",
        seed: int = 0,
        n_samples: int = 16,
        noise_std: float = 0.15,
        num_references: int = 64,
        num_fit: int = 256,
        floor_size: int = 8,
        sensitivity_every: int = 4,
        steps: int = 20,
        n_perturb: int = 10,
        batch_size: int | None = 256,
        spurious_masks: Tensor | None = None,
        alert_patience: int = 2,
        max_overhead: float | None = 0.02,
    ) -> None:
        super().__init__()
        _check_int("num_probe", num_probe, 1)
        _check_int("every_n_epochs", every_n_epochs, 1)
        _check_int("log_images", log_images, 0)
        _check_int("n_samples", n_samples, 1)
        _check_int("num_references", num_references, 1)
        _check_int("num_fit", num_fit, 2)
        _check_int("floor_size", floor_size, 0)
        _check_int("sensitivity_every", sensitivity_every, 1)
        _check_int("steps", steps, 1)
        _check_int("n_perturb", n_perturb, 1)
        _check_int("alert_patience", alert_patience, 1)
        _check_int("seed", seed, 0)
        if seed >= 2**64:
            raise MisconfigurationException(f"`seed` must be below 2**64 (a torch.Generator seed), got {seed}.")
        if batch_size is not None:
            _check_int("batch_size", batch_size, 1)
        methods = _check_names("methods", methods, METHODS)
        metrics = _check_names("metrics", metrics, METRICS)
        if on_alert not in ("warn", "stop"):
            raise MisconfigurationException(f"`on_alert` must be 'warn' or 'stop', got {on_alert!r}.")
        if isinstance(noise_std, bool) or not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std)
                                               and noise_std >= 0):
            raise MisconfigurationException(f"`noise_std` must be a finite float >= 0, got {noise_std!r}.")
        if not (target_layer is None or isinstance(target_layer, str)):
            raise MisconfigurationException(
                f"`target_layer` must be a module name such as 'layer4' (see model.named_modules()) or None to "
                f"detect it, got {type(target_layer).__name__}."
            )
        if store is True:
            store = None
        if not (store is None or store is False or isinstance(store, (str, Path))):
            raise MisconfigurationException(f"`store` must be None, a path or False, got {type(store).__name__}.")
        if probe is not None and not hasattr(probe, "__getitem__"):
            raise MisconfigurationException(f"`probe` must be a Dataset of (x, y[, mask]) items, got {type(probe).__name__}.")
        parts = (list(probe.values()) if isinstance(probe, Mapping)
                 else probe if isinstance(probe, (tuple, list)) else [])
        if parts and isinstance(parts[0], Tensor) and parts[0].ndim == 4:  # the whole image batch, not one item
            shapes = [tuple(getattr(t, "shape", ())) for t in parts]
            raise MisconfigurationException(
                f"`probe` must be a Dataset of (x, y[, mask]) items, got a {type(probe).__name__} of whole tensors "
                f"{shapes}; wrap the tensors: probe=TensorDataset(images, labels[, masks])."
            )
        if spurious_masks is not None:
            if not isinstance(spurious_masks, Tensor) or spurious_masks.ndim != 3:
                got = tuple(spurious_masks.shape) if isinstance(spurious_masks, Tensor) else type(spurious_masks).__name__
                hint = "" if isinstance(spurious_masks, Tensor) else " (torch.as_tensor(masks) converts an array)"
                raise MisconfigurationException(
                    f"`spurious_masks` must be a tensor [P, H, W] (one mask per probe item), got {got}{hint}."
                )
            spurious_masks = _binary_masks(spurious_masks, "`spurious_masks`", from_items=False)
            if probe is None:
                raise MisconfigurationException(
                    "`spurious_masks` needs an explicit `probe`: masks line up with probe items, and a drawn probe "
                    "is random. Pass `probe=` (or give the masks as the third item of each probe entry)."
                )
        self.target_layer = target_layer
        self.probe = probe
        self.num_probe = num_probe
        self.every_n_epochs = every_n_epochs
        self.methods = methods
        self.metrics = metrics
        self.log_images = log_images
        self.store_path = store
        self.on_alert = on_alert
        self.seed = seed
        self.n_samples = n_samples
        self.noise_std = float(noise_std)
        self.num_references = num_references
        self.num_fit = num_fit
        self.floor_size = floor_size
        self.sensitivity_every = sensitivity_every
        self.steps = steps
        self.n_perturb = n_perturb
        self.batch_size = batch_size
        self.spurious_masks = spurious_masks
        self.alert_patience = alert_patience
        try:
            self.budget = CostBudget(max_overhead)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self.max_overhead = max_overhead
        self._store: ExplanationStore | None = None
        self._stage: str | None = None  # the trainer's current stage, from `setup`
        self._start_run()

    def _start_run(self) -> None:
        """Fresh per-run state: each ``fit`` is a run (a resumed one gets its state back from the checkpoint)."""
        self.history: list[dict[str, Any]] = []
        self.alerts: list[Alert] = []
        self._warning_rule = WarningRule(patience=self.alert_patience)
        self.budget.reset()  # the same object: a clock given to it (benchmarks/overhead.py) stays
        self.run_id: str | None = None
        self._checkpoint_store: str | None = None  # the store a resumed fit's checkpoint was written with
        self._store_file: str | None = None  # this run's store, kept after closing for a checkpoint taken later
        self._restored = False  # state came back from a checkpoint
        self.stopped_epoch = -1
        self.layer_name: str | None = None
        self._data: _ProbeData | None = None
        self._explainers: dict[str, Any] = {}
        self._first: dict[str, Tensor] = {}
        self._previous: dict[str, Tensor] = {}
        self._last_run_epoch = -1
        self._after_scores = 0.0
        self._compared_with_batches = False

    # ---------------------------------------------------------------------------------------------------
    # Lightning plumbing

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            target_layer=self.target_layer, methods=self.methods, every_n_epochs=self.every_n_epochs,
            num_probe=self.num_probe,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        if stage == "fit":
            # before Lightning restores a checkpoint's callback state; a monitor reused for a second fit
            # must not explain the first fit's model nor count its epochs as done
            self._start_run()
        name = type(trainer.strategy).__name__
        if any(word in name for word in ("FSDP", "DeepSpeed")):
            raise MisconfigurationException(
                f"ExplanationMonitor supports single-device and DDP training, not {name}: every forward there is "
                "a collective. Remove the monitor or train with `strategy='ddp'`."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.target_layer is not None:
            try:
                resolve_layer(pl_module, self.target_layer)
            except (ValueError, TypeError) as err:
                raise MisconfigurationException(str(err)) from err
        if trainer.barebones:
            rank_zero_warn(
                "ExplanationMonitor under `Trainer(barebones=True)`: Lightning logs nothing, so the monitor's scalars, "
                "images and alert texts reach no logger; read `monitor.history`, `monitor.alerts` and the store.",
                category=UserWarning,
            )
        elif self.log_images and not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            rank_zero_warn(
                "ExplanationMonitor: no TensorBoardLogger in `trainer.loggers`; scalars are still logged, "
                "heatmap images are not.",
                category=UserWarning,
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            require_float32(pl_module)
        except TypeError as err:
            raise MisconfigurationException(f"ExplanationMonitor under `precision={trainer.precision!r}`: {err}") from err
        if self._data is None:
            self._data = _ProbeData.draw(self, trainer)
            self._check_layer(pl_module)
        if self.run_id is None:
            # the default store lives in the run's own log dir; a shared store path keeps runs apart by name
            self.run_id = "default" if self.store_path is None else _run_name(trainer)
        if self.store_path is not False and not trainer.fast_dev_run and self._store is None:
            path = self._resolve_store_path(trainer)  # on every rank: `trainer.log_dir` is a collective
            if trainer.is_global_zero:
                self._open_store(trainer, path)
        if trainer.is_global_zero:
            for logger in (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)):
                # CUSTOM SCALARS opens on the curves to read first
                write_layout(logger.experiment, self.methods, floors=self.floor_size > 0,
                             shortcuts=self._shortcut_method, metrics=self.metrics)
        self.budget.resume_training()
        missed = trainer.current_epoch - 1
        if self._restored and missed > self._last_run_epoch and (missed + 1) % self.every_n_epochs == 0:
            # a checkpoint saved on an epoch's last batch resumes at the next epoch, and Lightning runs no end-of-
            # epoch hook for the one it saved in: its weights are that epoch's final ones, so evaluate it now
            rank_zero_info(f"xcam: evaluating epoch {missed}, whose end the resumed checkpoint skips")
            self._evaluate(trainer, pl_module, in_train_hook=False, epoch=missed)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer) and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._evaluate(trainer, pl_module, in_train_hook=False)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # the probe is read from dataset items, before collate_fn and the transfer hooks: a normalisation done
        # there would be missing, and every explanation computed on images the model never sees
        if self._data is None or self._compared_with_batches:
            return
        self._compared_with_batches = True
        images = _image_batch(batch, self._data.x.shape[1:])
        difference = None if images is None else _scale_difference(self._data.x, images)
        if difference:
            rank_zero_warn(
                f"ExplanationMonitor: the probe images look unlike the training batches ({difference}). The monitor "
                "reads probe (and reference) images as dataset[i], before any collate_fn or batch transfer hook; "
                "if a hook normalises the images, normalise them in the dataset, or pass `probe=` images in "
                "model-input space.",
                category=UserWarning,
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self._evaluate(trainer, pl_module, in_train_hook=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "run_id": self.run_id,
            "store": self._store_file,
            "history": self.history,
            "alerts": [a.to_dict() for a in self.alerts],
            "shortcuts": self._warning_rule.state_dict(),
            "first_maps": {k: v.cpu() for k, v in self._first.items()},
            "previous_maps": {k: v.cpu() for k, v in self._previous.items()},
            "last_run_epoch": self._last_run_epoch,
            "stopped_epoch": self.stopped_epoch,
            "budget": self.budget.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage in ("validate", "test", "predict"):
            # `trainer.test(ckpt_path="best")` restores callbacks too: the monitor keeps the fit's history
            return
        self.run_id = state_dict["run_id"]
        self._checkpoint_store = state_dict.get("store")
        self._restored = True
        self.history = list(state_dict["history"])
        self.alerts = [Alert.from_dict(a) for a in state_dict["alerts"]]
        self._warning_rule.load_state_dict(state_dict["shortcuts"])
        self._first = dict(state_dict["first_maps"])
        self._previous = dict(state_dict["previous_maps"])
        self._last_run_epoch = state_dict["last_run_epoch"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.budget.load_state_dict(state_dict["budget"])

    def _check_layer(self, pl_module: pl.LightningModule) -> None:
        """Resolve (or detect) the CAM layer on a real probe item; fail before the first training batch."""
        assert self._data is not None
        with explanation_context(pl_module):
            x = fresh_input(self._data.x[:1], pl_module.device)
            try:
                name, layer = resolve_layer(pl_module, self.target_layer, x)
                # a gradient pass and a softmax read now, so that a layer the output does not depend on, or
                # logits that are not [B, K >= 2], fail before training rather than at the first evaluation
                height, width = _LayerProbe(pl_module, [layer]).gradients(x, None)[0].shape[-2:]
                target_probabilities(pl_module, x, 0, max_batch=None)
            except (ValueError, TypeError) as err:
                raise MisconfigurationException(f"ExplanationMonitor: {err}") from err
            except RuntimeError as err:  # the model itself fails on the probe (channels, size)
                raise MisconfigurationException(
                    f"ExplanationMonitor: the model fails on a probe image of shape {tuple(x.shape[1:])}: {err}. "
                    "The probe must be in model-input space, like the training batches after any transfer hook."
                ) from err
        if height * width < _MIN_MAP_CELLS:
            gad = " (and GAD's maps mostly equal Expected Grad-CAM's)" if "gad" in self.methods else ""
            rank_zero_warn(
                f"ExplanationMonitor: the CAM layer `{name}` gives maps of {height}×{width} cells on these images, too "
                f"coarse to locate much: heatmaps, metrics and the shortcut checks tell little apart at that "
                f"resolution{gad}. Pass an earlier `target_layer` (one stage before), or use larger images, for maps "
                f"of at least {_MIN_MAP_CELLS} cells.",
                category=UserWarning,
            )
        self.layer_name = name

    # ---------------------------------------------------------------------------------------------------
    # When

    def _due(self, trainer: pl.Trainer) -> bool:
        return (
            trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and trainer.current_epoch != self._last_run_epoch
        )

    # ---------------------------------------------------------------------------------------------------
    # One evaluation

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_train_hook: bool, epoch: int | None = None
    ) -> None:
        assert self._data is not None, "on_train_start draws the probe before the first evaluation"
        self.budget.begin()
        try:
            self._run_evaluation(trainer, pl_module, in_train_hook, trainer.current_epoch if epoch is None else epoch)
        finally:
            self.budget.end()

    def _run_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_train_hook: bool, epoch: int) -> None:
        assert self._data is not None
        started = time.perf_counter()
        self._last_run_epoch = epoch
        evaluation = len(self.history)
        minimal = bool(trainer.fast_dev_run)
        predicted = time.perf_counter()
        if not self._data.predict_targets(pl_module, self.batch_size):
            # every rank holds the same weights, so every rank skips: no collective is left waiting
            rank_zero_warn(
                f"ExplanationMonitor: the model's outputs on the probe are not finite at epoch {epoch} (has training "
                "diverged?); this evaluation is skipped and nothing is logged for it.",
                category=UserWarning,
            )
            # no signal was observed: the evaluations around this one are not consecutive
            self._warning_rule.update(epoch, [])
            return
        seconds_per_forward = (time.perf_counter() - predicted) / self._data.x.shape[0]
        data = self._data.shard(trainer, pl_module, limit=max(2, trainer.world_size) if minimal else None)
        per_sample: dict[str, dict[str, Tensor]] = {}
        maps_by_method: dict[str, Tensor] = {}
        floors: dict[str, tuple[Tensor, Tensor]] = {}
        rank_zero_info(f"xcam: explaining {data.total} probe items at epoch {epoch} with {', '.join(self.methods)}")
        explainers = self._explainers_for(pl_module)
        explaining = time.perf_counter()
        all_maps = self._explain(explainers, data.x, data.targets, data.ids)
        explanation_pass = time.perf_counter() - explaining
        stochastic = [m for m in self.methods if m not in DETERMINISTIC_METHODS]
        replicates = {}
        if stochastic and data.floor_rows:
            # the noise-floor replicate: the first items of every shard again, on random stream 1
            rows = slice(0, data.floor_rows)
            replicates = self._explain({m: explainers[m] for m in stochastic}, data.x[rows], data.targets[rows],
                                       data.ids[rows], stream=1)
        rank_zero_info(f"xcam: explained in {time.perf_counter() - started:.1f} s")
        planned_metrics = self._plan_scores(trainer, evaluation, minimal, data.x.shape[0] * seconds_per_forward,
                                              explanation_pass)
        values_by_method = self._scores(planned_metrics, explainers, pl_module, data, all_maps, minimal)
        scored = time.perf_counter()
        for method in self.methods:
            maps, values = all_maps[method], values_by_method[method]
            if method in replicates:
                replicate = torch.zeros_like(maps)
                replicate[: data.floor_rows] = replicates[method]
                flag = torch.arange(maps.shape[0], device=maps.device) < data.floor_rows
                values = {**values, "floor_maps": replicate, "floor_flag": flag.float()}
            gathered = data.gather(trainer, {"maps": maps, **values})
            maps_by_method[method] = gathered.pop("maps")
            if "floor_maps" in gathered:
                flag = gathered.pop("floor_flag").bool()
                floors[method] = (gathered.pop("floor_maps"), flag)
            per_sample[method] = gathered
        summaries, drift_rows, small_maps = self._drift(maps_by_method, floors, self._data.ids[: data.total])
        for method, values in per_sample.items():
            empty = degenerate(maps_by_method[method])
            for name, value in values.items():
                # a degenerate map's defined score (e.g. deletion AUC 0.1 for a map that ranks nothing) would
                # read as a good explanation; no valid item: no scalar, never NaN
                kept = value[~empty.to(value.device) & torch.isfinite(value)]
                if kept.numel():
                    summaries[f"xcam/{method}/{name}"] = float(kept.mean())
            summaries[f"xcam/{method}/degenerate"] = float(empty.sum())
        new_alerts, signals = self._check_shortcuts(pl_module, epoch, data.total, maps_by_method, floors)
        summaries.update(signals)
        summaries["xcam/alert"] = float(bool(new_alerts))
        summaries["xcam/overhead"] = self.budget.overhead
        summaries["xcam/time_s"] = time.perf_counter() - started
        step = trainer.fit_loop.epoch_loop._batches_that_stepped - int(in_train_hook)
        if epoch == trainer.current_epoch:
            for tag, value in summaries.items():
                pl_module.log(tag, value, on_step=False, on_epoch=True, logger=bool(trainer.loggers), sync_dist=False)
        elif trainer.is_global_zero:
            # a missed epoch evaluated at train start: `log` there would be folded into this epoch's values,
            # at its step; the loggers take it at its own step, and `callback_metrics` stay this epoch's
            for logger in trainer.loggers:
                logger.log_metrics(summaries, step=step)
        if trainer.is_global_zero:
            self._log_images(trainer, maps_by_method, step, new_alerts)
            if self._store is not None:
                self._store.write_evaluation(
                    epoch, self._data.ids[: data.total].tolist(), step=step, time_s=summaries["xcam/time_s"],
                    metrics=per_sample, drift=drift_rows, summaries=summaries, maps=small_maps, alerts=new_alerts,
                )
        self.history.append({"epoch": epoch, "step": step, **summaries})
        self._after_scores = time.perf_counter() - scored
        rank_zero_info(f"xcam: epoch {epoch} done in {summaries['xcam/time_s']:.1f} s, "
                       f"{len(new_alerts)} new shortcut alert(s)")
        self._maybe_stop(trainer, new_alerts)

    def _explainers_for(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Every method's explainer, built once (GAD after Expected Grad-CAM, which it takes as its base);
        GAD's supports are refit to the current model (a warm start after the first evaluation)."""
        assert self._data is not None
        if not self._explainers:
            for method in sorted(self.methods, key=lambda m: m == "gad"):
                self._explainers[method] = self._build(method, pl_module, self.layer_name)
        for explainer in self._explainers.values():
            if hasattr(explainer, "fit"):
                explainer.fit(self._data.fit.to(pl_module.device))
        return {method: self._explainers[method] for method in self.methods}

    @staticmethod
    def _explain(
        explainers: dict[str, Any], x: Tensor, targets: Tensor, ids: Tensor, stream: int = 0
    ) -> dict[str, Tensor]:
        """Maps of every method. GAD explains the original model with its base explainer on the way, so
        when that base is the monitor's own Expected Grad-CAM, its maps come from GAD's pass for free."""
        maps: dict[str, Tensor] = {}
        for method in sorted(explainers, key=lambda m: m != "gad"):
            if method in maps:
                continue
            explainer = explainers[method]
            if method == "gad":
                result = explainer.explain(x, targets, sample_ids=ids, stream=stream)
                maps[method] = result.maps
                if explainers.get("expected_gradcam") is explainer.base:
                    maps["expected_gradcam"] = result.base_maps[0]
            else:
                maps[method] = explainer(x, targets, sample_ids=ids, stream=stream)
        return {method: maps[method] for method in explainers}

    def _build(self, method: str, pl_module: pl.LightningModule, layer: str) -> Any:
        assert self._data is not None
        references = self._data.references.to(pl_module.device)
        egc = dict(references=references, n_samples=self.n_samples, noise_std=self.noise_std,
                   batch_size=self.batch_size, seed=self.seed)
        if method == "expected_gradcam":
            return ExpectedGradCAM(pl_module, layer, **egc)
        if method == "gad":
            from lightning_xcam.methods.gad import GAD  # support models cost memory only when GAD is used

            base = self._explainers.get("expected_gradcam") or ExpectedGradCAM(pl_module, layer, **egc)
            return GAD(pl_module, layer, base=base, seed=self.seed)
        if method == "gradcam":
            return GradCAM(pl_module, layer, batch_size=self.batch_size)
        return IntegratedGradCAM(pl_module, layer, steps=self.n_samples, batch_size=self.batch_size)

    def _plan_scores(
        self, trainer: pl.Trainer, evaluation: int, minimal: bool, probe_pass: float, explanation_pass: float
    ) -> list[str]:
        """The metrics this evaluation computes: without a budget every one, max-sensitivity only on every
        ``sensitivity_every``-th; under ``max_overhead`` those whose turn it is and that fit (decided on rank
        0, so every rank scores the same). A metric not run yet is estimated from this evaluation's own
        timings: its forward passes over the probe at ``probe_pass`` seconds each, and for max-sensitivity
        ``1 + _SENSITIVITY_SAMPLES`` explanations per method at ``explanation_pass`` seconds each (an upper
        estimate where methods share a pass)."""
        if self.max_overhead is None or minimal:
            return [m for m in self.metrics if m != "max_sensitivity" or evaluation % self.sensitivity_every == 0]
        due = list(self.metrics)
        passes = {
            "insertion": (self.steps + 1) * len(self.methods), "deletion": (self.steps + 1) * len(self.methods),
            "infidelity": self.n_perturb + 1,  # one perturbation set serves every method
            "average_drop": len(self.methods), "sparseness": 0, "entropy": 0,
        }
        estimates = {m: probe_pass * passes[m] for m in due if m != "max_sensitivity"}
        estimates["max_sensitivity"] = (1 + _SENSITIVITY_SAMPLES) * len(self.methods) * explanation_pass
        # the work after the scores (drift, shortcut checks, images, store) is reserved at its last duration
        planned = trainer.strategy.broadcast(self.budget.plan(due, estimates, self._after_scores), src=0)
        deferred = [m for m in due if m not in planned]
        if deferred:
            rank_zero_info(f"xcam: deferring {', '.join(deferred)} to keep the monitor within max_overhead="
                           f"{self.max_overhead:g} of training time (now {self.budget.overhead:.1%})")
        return planned

    def _scores(
        self, names: Sequence[str], explainers: dict[str, Any], pl_module: pl.LightningModule, data: _Shard,
        maps_by_method: dict[str, Tensor], minimal: bool,
    ) -> dict[str, dict[str, Tensor]]:
        """Per-sample values of the metrics ``names`` for every method; records each metric's cost."""
        model, x, c, ids, batch = pl_module, data.x, data.targets, data.ids, self.batch_size
        steps = 4 if minimal else self.steps
        values: dict[str, dict[str, Tensor]] = {method: {} for method in maps_by_method}
        per_map: dict[str, Callable[[str, Tensor], Tensor]] = {
            "insertion": lambda method, maps: xm.insertion_auc(model, x, maps, c, steps=steps, max_batch=batch),
            "deletion": lambda method, maps: xm.deletion_auc(model, x, maps, c, steps=steps, max_batch=batch),
            "max_sensitivity": lambda method, maps: xm.max_sensitivity(
                explainers[method], x, c, n_samples=2 if minimal else _SENSITIVITY_SAMPLES, seed=self.seed,
                sample_ids=ids, model=model, max_batch=batch,
            ),
            "average_drop": lambda method, maps: xm.average_drop(model, x, maps, c, max_batch=batch),
            "sparseness": lambda method, maps: xm.sparseness(maps),
            "entropy": lambda method, maps: xm.entropy(maps, normalized=True),
        }
        for name in names:
            started = time.perf_counter()
            tag = _METRIC_TAGS[name]
            if name == "infidelity":  # one perturbation set for every method: its forwards are the dear part
                shared = xm.infidelity(model, x, list(maps_by_method.values()), c, n_perturb=self.n_perturb,
                                       seed=self.seed, sample_ids=ids, max_batch=batch)
                for method, value in zip(maps_by_method, shared):
                    values[method][tag] = value
            else:
                for method, maps in maps_by_method.items():
                    values[method][tag] = per_map[name](method, maps)
            self.budget.record(name, time.perf_counter() - started)
        for scores in values.values():
            if "insertion_auc" in scores and "deletion_auc" in scores:
                scores["insertion_minus_deletion"] = scores["insertion_auc"] - scores["deletion_auc"]
        if names:
            rank_zero_info(f"xcam: scored {', '.join(names)}")
        return {method: {k: v.detach().float() for k, v in scores.items()} for method, scores in values.items()}

    def _drift(
        self, maps_by_method: dict[str, Tensor], floors: dict[str, tuple[Tensor, Tensor]], ids: Tensor
    ) -> tuple[dict[str, float], dict[str, Any], dict[str, Tensor]]:
        """Every method's drift (:func:`~lightning_xcam.drift.evaluation_drift`): scalars, store rows, small maps."""
        summaries: dict[str, float] = {}
        rows: dict[str, Any] = {}
        small: dict[str, Tensor] = {}
        for method, maps in maps_by_method.items():
            replicate = floors.get(method)
            result = drift_stats.evaluation_drift(
                maps.cpu(), self._previous.get(method), self._first.get(method),
                None if replicate is None else (replicate[0].cpu(), replicate[1].cpu()), ids,
            )
            summaries.update({f"xcam/{method}/{name}": value for name, value in result.scalars.items()})
            rows[method], small[method] = result.rows, result.maps
            self._previous[method] = result.maps
            self._first.setdefault(method, result.maps)
        return summaries, rows, small

    def _check_shortcuts(
        self, pl_module: pl.LightningModule, epoch: int, total: int,
        maps_by_method: dict[str, Tensor], floors: dict[str, tuple[Tensor, Tensor]],
    ) -> tuple[list[Alert], dict[str, float]]:
        """Feed this evaluation's shortcut signals (on the first stochastic method's maps) to the rule.

        Returns:
            The new alerts, and the overall signals as scalars under ``xcam/<method>/`` (so a user sees a
            signal build up before it alerts, and after an alert, which fires once per episode).
        """
        assert self._data is not None
        method = self._shortcut_method
        replicate, rows = floors.get(method, (None, None))
        observations = observe(
            pl_module, self._data.x[:total], maps_by_method[method], self._data.targets[:total], self._data.ids[:total],
            replicate=None if replicate is None else replicate[rows], replicate_rows=rows,
            masks=None if self._data.masks is None else self._data.masks[:total],
            generator=torch.Generator(device=pl_module.device).manual_seed(self.seed), max_batch=self.batch_size,
        )
        alerts = self._warning_rule.update(epoch, observations)
        for alert in alerts:
            rank_zero_warn(f"ExplanationMonitor: {alert.message}", category=UserWarning)
        self.alerts.extend(alerts)
        return alerts, {f"xcam/{method}/{name}": value for name, value in _signal_scalars(observations).items()}

    @property
    def _shortcut_method(self) -> str:
        """The method whose maps feed the shortcut signals: the first stochastic one (it has a noise floor)."""
        return next((m for m in self.methods if m not in DETERMINISTIC_METHODS), self.methods[0])

    def _maybe_stop(self, trainer: pl.Trainer, new_alerts: list[Alert]) -> None:
        if self.on_alert != "stop" or trainer.fast_dev_run:
            return
        decision = trainer.strategy.reduce_boolean_decision(bool(new_alerts), all=False)
        if decision and not trainer.should_stop:
            self.stopped_epoch = self._last_run_epoch
            rank_zero_info(f"ExplanationMonitor: stopping at epoch {self.stopped_epoch} after a shortcut alert.")
        trainer.should_stop = trainer.should_stop or decision

    # ---------------------------------------------------------------------------------------------------
    # Where results go

    def _log_images(self, trainer: pl.Trainer, maps_by_method: dict[str, Tensor], step: int, alerts: list[Alert]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or self._data is None:
            return
        count = min(self.log_images, self._data.x.shape[0])
        images = self._data.x[:count]
        for method, maps in maps_by_method.items():
            if not count:
                break
            shown = maps[:count].cpu()
            panels = explanation_panel(images, relative_mass(shown), vmax=DISPLAY_CONCENTRATION)
            panels[degenerate(shown), :, :, images.shape[-1]:] = 0.5  # grey: no map, not "no relevance"
            for logger in loggers:
                for i, panel in enumerate(panels):
                    tag = f"xcam_images/{method}/probe_{int(self._data.ids[i]):03d}"
                    logger.experiment.add_image(tag, panel, global_step=step)
        method = self._shortcut_method
        seen = maps_by_method[method].cpu()
        evidence = {alert: evidence_image(self._data.x[: len(seen)], seen, self._data.ids[: len(seen)],
                                          alert.sample_indices, vmax=DISPLAY_CONCENTRATION)
                    for alert in alerts if alert.sample_indices}
        # One text and one image per kind and step: alerts of one kind for several classes share the
        # kind's tags, and a second write to a tag at the same step would hide the first.
        by_kind: dict[str, list[Alert]] = {}
        for alert in alerts:
            by_kind.setdefault(alert.kind, []).append(alert)
        for logger in loggers:
            for kind, group in by_kind.items():
                text = "\n\n---\n\n".join(_alert_markdown(alert) for alert in group)
                logger.experiment.add_text(f"xcam_alerts/{kind}", text, global_step=step)
                shown = [evidence[alert] for alert in group if alert in evidence]
                if shown:
                    logger.experiment.add_image(f"xcam_alerts/{kind}/evidence", stack_rows(shown), global_step=step)

    def _refuse_a_shared_store_run(self, trainer: pl.Trainer, path: Path) -> None:
        """Two monitors writing one run of one store would replace each other's rows epoch by epoch."""
        for other in trainer.callbacks:
            if other is self or not isinstance(other, ExplanationMonitor) or other._store is None:
                continue
            if other._store.path.resolve() == path.resolve() and other.run_id == self.run_id:
                raise MisconfigurationException(
                    f"two ExplanationMonitors would write run {self.run_id!r} of the store '{path}' (the "
                    f"monitors on `{other.target_layer}` and `{self.target_layer}`); give each its own `store=` "
                    "path, or store=False to one."
                )

    def _resolve_store_path(self, trainer: pl.Trainer) -> Path:
        if isinstance(self.store_path, (str, Path)):
            return store_file(self.store_path)
        return Path(trainer.log_dir or trainer.default_root_dir) / DEFAULT_FILENAME  # every rank asks: a collective

    def _continued_store(self, default: Path, start: int) -> Path:
        """The default store, or the one the resumed checkpoint was written with when that is another file
        (a logger that starts a new version on resume) holding nothing of the run from ``start`` on, so that
        the history goes on in one file. Evaluations there from ``start`` on belong to another fit from the
        same checkpoint (or a rewind): they are kept, and this fit writes the default store."""
        old = self._checkpoint_store
        if old is None or not Path(old).is_file() or Path(old).resolve() == default.resolve():
            return default
        try:
            with ExplanationStore(old, run=str(self.run_id), create=False) as store:
                later = [epoch for epoch in store.epochs() if epoch >= start]
        except (StoreFormatError, OSError, sqlite3.Error):
            return default
        if later:
            rank_zero_warn(
                f"ExplanationMonitor: the store '{old}' of the checkpoint this fit resumes from holds evaluations "
                f"of epochs {later} of run {self.run_id!r}, after the checkpoint (another fit went on from it); "
                f"they are kept, and this fit writes '{default}'.",
                category=UserWarning,
            )
            return default
        return Path(old)

    def _open_store(self, trainer: pl.Trainer, path: Path) -> None:
        """Open the store on rank 0 and clear the run's evaluations this fit is about to redo."""
        # a resumed fit redoes what came after its checkpoint's last evaluation (rows of a run abandoned by a
        # resume from an earlier checkpoint, or written after the checkpoint and before a crash); a fresh fit
        # redoes everything from its first epoch
        resumed = trainer.ckpt_path is not None
        start = self._last_run_epoch + 1 if resumed and self.history else trainer.current_epoch
        if self.store_path is None and resumed:
            path = self._continued_store(path, start)
        self._refuse_a_shared_store_run(trainer, path)
        try:
            self._store = ExplanationStore(path, run=str(self.run_id))
        except sqlite3.OperationalError as err:
            raise MisconfigurationException(
                f"ExplanationMonitor cannot write its store: {err} Or pass store=False to keep no store."
            ) from err
        self._store_file = str(self._store.path.resolve())
        dropped = self._store.discard_from(start)
        if dropped:
            why = ("they come after the evaluations of the checkpoint this fit resumes from, and are redone" if resumed
                   else "this fresh fit replaces them. Give the run its own logger version or `store` path to keep both")
            rank_zero_warn(
                f"ExplanationMonitor: deleted the evaluations of epochs {dropped} of run {self.run_id!r} from the "
                f"store '{self._store.path}': {why}.",
                category=UserWarning,
            )
        self._store.write_config(self._config())

    def _config(self) -> dict[str, Any]:
        return {
            "target_layer": self.layer_name, "num_probe": self.num_probe, "every_n_epochs": self.every_n_epochs,
            "methods": list(self.methods), "metrics": list(self.metrics), "seed": self.seed,
            "n_samples": self.n_samples, "noise_std": self.noise_std, "num_references": self.num_references,
            "num_fit": self.num_fit, "floor_size": self.floor_size, "steps": self.steps,
            "n_perturb": self.n_perturb, "max_overhead": self.max_overhead, "targets": "predicted class (argmax on the clean probe image)",
            "probe_ids": self._data.ids.tolist() if self._data is not None else None,
        }


# -------------------------------------------------------------------------------------------------------
# Data: the probe, the reference bank and the GAD fit set, drawn once


class _Shard:
    """This rank's slice of the probe, on the model's device, plus what gathering needs."""

    def __init__(self, x: Tensor, targets: Tensor, ids: Tensor, total: int, per_rank: int, floor_rows: int) -> None:
        self.x, self.targets, self.ids = x, targets, ids
        self.total, self.per_rank, self.floor_rows = total, per_rank, floor_rows

    def gather(self, trainer: pl.Trainer, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """All ranks' per-sample values in probe order (D1: pad, all_gather, trim), on CPU."""
        if trainer.world_size == 1:
            return {k: v.detach().cpu() for k, v in values.items()}
        out = {}
        for key, value in values.items():
            padded = value.new_zeros((self.per_rank, *value.shape[1:]))
            padded[: value.shape[0]] = value
            stacked = trainer.strategy.all_gather(padded)
            out[key] = stacked.reshape(-1, *value.shape[1:])[: self.total].detach().cpu()
        return out


class _ProbeData:
    """The fixed probe, reference bank and GAD fit set, on CPU, drawn once with the monitor's generator."""

    def __init__(self, x: Tensor, targets: Tensor, ids: Tensor, masks: Tensor | None, references: Tensor,
                 fit: Tensor, floor_rows: int) -> None:
        self.x, self.targets, self.ids, self.masks = x, targets, ids, masks
        self.references, self.fit, self.floor_rows = references, fit, floor_rows

    @classmethod
    def draw(cls, monitor: ExplanationMonitor, trainer: pl.Trainer) -> _ProbeData:
        generator = torch.Generator().manual_seed(monitor.seed)
        train = _dataset(trainer.train_dataloader) if trainer.train_dataloader is not None else None
        with isolate_rng():  # dataset transforms may draw from global RNGs
            if monitor.probe is not None:
                probe_set, probe_idx = monitor.probe, None
                n = _length(monitor.probe, "`probe`")
                if n == 0:
                    raise MisconfigurationException("`probe` is empty; pass at least one (x, y) item.")
                indices = list(range(n))
            else:
                validation = _dataset(_validation_loaders(trainer))
                if isinstance(validation, IterableDataset):
                    rank_zero_info("xcam: the validation dataset is an IterableDataset (no items by index): the probe "
                                   "is drawn from the training dataset")
                    validation = None
                probe_set = validation or train
                if probe_set is None:
                    raise MisconfigurationException("ExplanationMonitor found no dataset to draw the probe from.")
                n = _length(probe_set, "the training dataset" if probe_set is train else "the validation dataset")
                if monitor.num_probe > n:
                    raise MisconfigurationException(
                        f"`num_probe={monitor.num_probe}` is larger than the dataset it is drawn from ({n} items); "
                        f"pass num_probe <= {n}."
                    )
                indices = torch.randperm(n, generator=generator)[: monitor.num_probe].tolist()
                probe_idx = set(indices) if probe_set is train else None
            source = ("`probe`" if monitor.probe is not None
                      else "the training dataset" if probe_set is train else "the validation dataset")
            rank_zero_info(f"xcam: the probe is {len(indices)} items of {source}")
            # explicit `spurious_masks` replace what the items carry, so their third element is not read
            x, masks = _stack([probe_set[i] for i in indices], source, with_masks=monitor.spurious_masks is None)
            broken = nonfinite_rows(x)
            if broken:
                raise MisconfigurationException(
                    f"the probe items {[indices[i] for i in broken][:8]} of {source} hold NaN or infinite pixels; "
                    "the model's outputs on them are not finite, so every evaluation would be skipped. Pass "
                    "`probe=` items with finite images."
                )
            world, count = trainer.world_size, x.shape[0]
            if (world - 1) * math.ceil(count / world) >= count:  # the ranks split the probe in ceil(P/W) rows
                raise MisconfigurationException(
                    f"the probe's {count} items leave some of the {world} ranks without an item to explain (each "
                    f"takes {math.ceil(count / world)}); pass a probe of a multiple of {world} items "
                    f"(num_probe={world * max(1, count // world)}, say)."
                )
            references = fit = x[:0]
            uses_bank = bool(_USES_REFERENCES & set(monitor.methods))
            if uses_bank:  # Grad-CAM and Integrated Grad-CAM read no training image
                if train is None:
                    raise MisconfigurationException(
                        "ExplanationMonitor needs the training dataset for Expected Grad-CAM's and GAD's bank of "
                        "training images; with no readable one, use methods=('gradcam', 'integrated_gradcam')."
                    )
                size = _length(train, "the training dataset")
                pool = [i for i in torch.randperm(size, generator=generator).tolist() if not probe_idx or i not in probe_idx]
                if not pool:
                    raise MisconfigurationException(
                        f"the probe takes all {size} items of the training dataset, and Expected Grad-CAM's and GAD's "
                        f"training images must be other items; pass num_probe < {size} or a validation set."
                    )
                references = _stack([train[i] for i in pool[: monitor.num_references]], "the training dataset")[0]
                fit = _stack([train[i] for i in pool[: monitor.num_fit]], "the training dataset")[0]
        if uses_bank and x.shape[1:] != references.shape[1:]:
            raise MisconfigurationException(
                f"the probe images from {source} have shape {tuple(x.shape[1:])} but the training images "
                f"{tuple(references.shape[1:])}; Expected Grad-CAM's references come from the training data, so "
                "the probe must have the same channels and size (resize it like the training data)."
            )
        if monitor.spurious_masks is not None:
            masks = monitor.spurious_masks.cpu()
            if masks.shape != (x.shape[0], *x.shape[-2:]):
                raise MisconfigurationException(
                    f"`spurious_masks` must hold one [H, W] mask per probe item, i.e. shape "
                    f"{[x.shape[0], *x.shape[-2:]]}, got {list(masks.shape)}."
                )
        if masks is not None and not bool(masks.any()):
            given = "`spurious_masks`" if monitor.spurious_masks is not None else f"the masks of {source}"
            rank_zero_warn(f"ExplanationMonitor: every one of {given} is empty, so no region is tested (no "
                           "spurious_mass signal); mark the suspect pixels True.", category=UserWarning)
        targets = torch.zeros(x.shape[0], dtype=torch.long)
        return cls(x, targets, torch.as_tensor(indices), masks, references, fit, min(monitor.floor_size, x.shape[0]))

    def predict_targets(self, pl_module: pl.LightningModule, batch_size: int | None) -> bool:
        """Set the explained classes to the model's current predictions (once per evaluation, §1.2).

        Returns:
            Whether every probe logit is finite (``False``: a diverged model, nothing to explain).
        """
        chunks = self.x.split(batch_size or self.x.shape[0])
        with explanation_context(pl_module), torch.no_grad():
            logits = torch.cat([pl_module(fresh_input(chunk, pl_module.device)).cpu() for chunk in chunks])
        self.targets = logits.argmax(1)
        return bool(torch.isfinite(logits).all())

    def shard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, limit: int | None = None) -> _Shard:
        total = self.x.shape[0] if limit is None else min(limit, self.x.shape[0])
        world, rank = trainer.world_size, trainer.global_rank
        per = math.ceil(total / world)
        rows = slice(min(rank * per, total), min((rank + 1) * per, total))
        x = trainer.precision_plugin.convert_input(self.x[rows]).to(pl_module.device)
        floor_rows = min(math.ceil(self.floor_rows / world), x.shape[0])
        return _Shard(x, self.targets[rows].to(pl_module.device), self.ids[rows], total, per, floor_rows)


def _length(dataset: Any, source: str) -> int:
    """The number of items of a dataset the monitor draws from by index; ``source`` names it in errors."""
    try:
        return len(dataset)
    except TypeError as error:
        raise MisconfigurationException(
            f"ExplanationMonitor draws items by index from {source}, which has no length "
            f"({type(dataset).__name__}, e.g. an IterableDataset). Pass `probe=` a map-style dataset such as "
            "TensorDataset(images, labels); Expected Grad-CAM and GAD also need a map-style training dataset."
        ) from error


def _validation_loaders(trainer: pl.Trainer) -> Any:
    """The fit's validation dataloaders. Lightning sets them up before training only when epoch 0 validates;
    with ``check_val_every_n_epoch > 1`` and no sanity check they are set up here, by the loop's own method,
    which does not run again at the first validation (the probe came from the training set instead)."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    source = getattr(loop, "_data_source", None)
    if trainer.val_dataloaders is None and source is not None and source.is_defined():
        loop.setup_data()
    return trainer.val_dataloaders


def _image_batch(batch: Any, shape: torch.Size) -> Tensor | None:
    """The first tensor in a training batch (tuple, list or dict, nested) holding images of ``shape``."""
    if isinstance(batch, Tensor):
        return batch if batch.ndim == 4 and batch.shape[1:] == shape else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    return next((found for item in items if (found := _image_batch(item, shape)) is not None), None)


def _scale_difference(probe: Tensor, images: Tensor) -> str | None:
    """How the probe's pixel scale differs from a training batch's, or ``None`` if it is alike: a spread 2.5
    times larger or smaller, or a centre off by more than 3 batch standard deviations (0–255 or [0, 1]
    pixels against standardised ones). A batch of constant pixels gives no comparison."""
    with torch.no_grad():
        batch = images.detach().float()
        probe = probe.to(batch.device)
        spread, centre = float(batch.std()), float(batch.mean())
        probe_spread, probe_centre = float(probe.std()), float(probe.mean())
    if not spread > 0:
        return None
    if probe_spread > 2.5 * spread or probe_spread < spread / 2.5 or abs(probe_centre - centre) > 3 * spread:
        return (f"probe mean {probe_centre:.3g}, std {probe_spread:.3g}; first training batch mean {centre:.3g}, "
                f"std {spread:.3g}")
    return None


def _dataset(loaders: Any) -> Any:
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return _dataset(loaders[0]) if loaders else None
    if isinstance(loaders, dict):
        return _dataset(next(iter(loaders.values()), None))
    return getattr(loaders, "dataset", None)


def _stack(items: list[Any], source: str, with_masks: bool = False) -> tuple[Tensor, Tensor | None]:
    """Images and, with ``with_masks`` and when the items carry them, masks; labels are not read (the
    explained class is the model's own prediction, ALGORITHMS.md §1.2, see ``predict_targets``). ``source``
    names the dataset in errors."""
    if not items:
        raise MisconfigurationException(f"ExplanationMonitor drew no items from {source}; it is empty.")
    first = items[0]
    if isinstance(first, Tensor):
        return torch.stack([i.float() for i in items]), None
    if not isinstance(first, (tuple, list)) or not first:
        raise _item_error(source, f"dict items with keys {sorted(map(str, first))[:8]}" if isinstance(first, Mapping)
                          else f"{type(first).__name__} items")
    columns = list(zip(*items))
    try:
        x = torch.stack([torch.as_tensor(v).float() for v in columns[0]])
    except (TypeError, ValueError, RuntimeError) as error:
        raise _item_error(source, f"{type(first).__name__} items whose first element is a {type(first[0]).__name__}") from error
    # A third column is a mask only when it has the images' size (a sample weight or a box is not).
    third = [torch.as_tensor(v) for v in columns[2]] if with_masks and len(columns) > 2 else []
    if third and all(t.squeeze().shape == x.shape[-2:] for t in third):
        return x, _binary_masks(torch.stack([t.squeeze() for t in third]), f"the masks of {source}")
    if third and all(t.squeeze().ndim == 2 for t in third):
        rank_zero_warn(
            f"ExplanationMonitor: the third elements of {source}'s items are 2-D, {tuple(third[0].squeeze().shape)}, "
            f"but the images are {tuple(x.shape[-2:])}: they are not used as suspect masks (no spurious_mass "
            "signal). Resize masks to the images' size, e.g. F.interpolate(..., mode='nearest').",
            category=UserWarning)
    return x, None


def _binary_masks(masks: Tensor, name: str, from_items: bool = True) -> Tensor:
    """``masks`` as booleans: integer masks are True where nonzero (0/255 images); a floating value other
    than 0/1 (a soft weight, NaN) is refused, not rounded. ``from_items``: they are the probe items' third
    elements (which may be something else than a mask)."""
    if masks.is_floating_point() and not bool(((masks == 0) | (masks == 1)).all()):
        raise MisconfigurationException(
            f"{name} must be boolean, integer or 0/1 (a suspect region per item), got values such as "
            f"{masks[(masks != 0) & (masks != 1)].flatten()[:3].tolist()}; threshold soft masks first, e.g. "
            "mask > 0.5." + (" If that item is not a mask, pass `spurious_masks=` or a dataset of (x, y) items."
                             if from_items else "")
        )
    return masks != 0


def _item_error(source: str, got: str) -> MisconfigurationException:
    """The error for dataset items the monitor cannot read as images."""
    fix = ("Pass `probe=` a dataset of such items, e.g. TensorDataset(images, labels)" if source != "the training dataset"
           else "Expected Grad-CAM and GAD draw their reference images from it: give it such items, or use "
                "methods=('gradcam', 'integrated_gradcam'), which read no training image (with `probe=` for the probe)")
    return MisconfigurationException(
        f"ExplanationMonitor reads the items of {source} (dataset[i], before any collate_fn or batch transfer "
        f"hook) as an image tensor or an (x, y[, mask]) tuple of equally shaped images, got {got}. {fix}."
    )


def _signal_scalars(observations: Sequence[Observation]) -> dict[str, float]:
    """The overall shortcut signals of one evaluation by logged name (README "What the scalars mean").

    Gaps are the region's effect minus the mean of its equal-area random controls, in probability. A
    transplant check that could not run (no probe item of another class) logs nothing.
    """
    scalars: dict[str, float] = {}
    for obs in observations:
        if obs.class_index is not None:
            continue
        if obs.kind == "border":
            scalars["border_mass"] = obs.value
        elif obs.kind == "cluster":
            scalars["cluster_focus"] = obs.value
        elif obs.kind == "spurious_mass":
            scalars["spurious_mass"] = obs.value
            if obs.drop_region is not None:
                # the drop itself, not its gap: a mask that no translation moves apart and that covers
                # more than half of the image is its own control, so its gap is 0 whatever the model does
                scalars["spurious_fill_drop"] = obs.drop_region
        elif obs.kind == "intervention":
            scalars["tiny_region_z"] = obs.value
            if obs.drop_region is not None and obs.drop_random is not None:
                scalars["tiny_region_fill_gap"] = obs.drop_region - obs.drop_random
            if obs.z_transplant is not None and obs.rise_region is not None and obs.rise_random is not None:
                scalars["tiny_region_transplant_z"] = obs.z_transplant
                scalars["tiny_region_transplant_gap"] = obs.rise_region - obs.rise_random
    return scalars


def _alert_markdown(alert: Alert) -> str:
    """An alert as TensorBoard TEXT: the message, then its numbers and the probe items that show it."""
    where = "all" if alert.class_index is None else str(alert.class_index)
    items = ", ".join(str(i) for i in alert.sample_indices[:16]) or "-"
    return (f"**{alert.message}**\n\n| kind | class | epoch | score | threshold | probe items |\n|---|---|---|---|---|---|\n"
            f"| {alert.kind} | {where} | {alert.epoch} | {alert.score:.4g} | {alert.threshold:.4g} | {items} |")


def _run_name(trainer: pl.Trainer) -> str:
    """``<logger name>/<version>`` (``version_N`` for integer versions), so that experiments sharing a store
    under different logger names stay apart; ``"default"`` without a versioned logger."""
    logger = trainer.logger
    version = getattr(logger, "version", None) if logger is not None else None
    if version is None:
        return "default"
    version = version if isinstance(version, str) else f"version_{version}"
    name = getattr(logger, "name", None)
    return f"{name}/{version}" if name else version


def _check_int(name: str, value: object, minimum: int) -> None:
    try:
        check_int(value, name, minimum)
    except (TypeError, ValueError) as err:
        raise MisconfigurationException(str(err)) from err


def _check_names(name: str, values: str | Sequence[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``values`` as a tuple of known names (a single name is a one-name tuple), each named once."""
    choices = ", ".join(repr(a) for a in allowed)
    if not isinstance(values, (str, Sequence)):
        raise MisconfigurationException(
            f"`{name}` must be a name or a sequence of names from {choices}, got {type(values).__name__}."
        )
    values = (values,) if isinstance(values, str) else tuple(values)
    if not values and name == "methods":
        raise MisconfigurationException(f"`methods` is empty; name at least one of {choices}.")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise MisconfigurationException(f"`{name}` has unknown entries {unknown}; choose from {choices}.")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise MisconfigurationException(f"`{name}` lists {repeated} more than once; name each entry once.")
    return values
