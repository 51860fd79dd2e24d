"""ExplanationMonitor inside real Trainer.fit runs on real digits: logging, store, no side effects, resume, DDP."""

from __future__ import annotations

import itertools

import math
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.data import DataLoader, TensorDataset

from lightning_xcam import ExplanationMonitor
from lightning_xcam.alerts import WarningRule
from lightning_xcam.budget import CostBudget
from lightning_xcam.callback import _ProbeData
from lightning_xcam.demos import DigitsClassifier, SmallCNN, load_digits_tensors
from lightning_xcam.methods.cam import ExpectedGradCAM
from lightning_xcam.methods.gad import GAD
from lightning_xcam.store import ExplanationStore
from lightning_xcam.tensorboard import custom_scalar_layout

# max_overhead=None: these tests check what each evaluation stores, so every metric runs every time
FAST = dict(methods=("expected_gradcam",), num_probe=6, n_samples=3, num_references=8, num_fit=48, floor_size=3, steps=4, n_perturb=3,
            log_images=2, sensitivity_every=1, max_overhead=None)


def DigitsModule() -> pl.LightningModule:  # noqa: N802 - reads like the class it builds
    return DigitsClassifier(width=8)


class DigitsData(pl.LightningDataModule):
    """192 training and 64 validation digits at 16×16: small enough for several fits per test session."""

    def __init__(self) -> None:
        super().__init__()
        x, y = load_digits_tensors(16)
        self.train_set = TensorDataset(x[:192], y[:192])
        self.val_set = TensorDataset(x[1500:1564], y[1500:1564])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)


def _trainer(tmp_path: Path, callbacks: list, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    options = dict(default_root_dir=tmp_path, max_epochs=max_epochs, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                   logger=TensorBoardLogger(tmp_path, name="", version=0), deterministic=True)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _weights(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_fit_logs_scalars_images_and_store_without_nan(tmp_path: Path) -> None:
    pl.seed_everything(0)
    methods = ("expected_gradcam", "gad")  # the default methods
    monitor = ExplanationMonitor(target_layer="net.features", **{**FAST, "methods": methods})
    trainer = _trainer(tmp_path, [monitor])
    model = DigitsModule()
    trainer.fit(model, datamodule=DigitsData())

    assert [h["epoch"] for h in monitor.history] == [0, 1]
    gad = monitor._explainers["gad"]
    assert gad.diagnostics["fits"] == 2 and not gad.diagnostics["stale"]  # refit before each evaluation
    events = EventAccumulator(str(tmp_path / "version_0"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for method in methods:
        for name in ("insertion_auc", "deletion_auc", "infidelity", "max_sensitivity", "drift_spearman", "noise_floor"):
            tag = f"xcam/{method}/{name}"
            assert tag in scalars, tag
            assert all(math.isfinite(e.value) for e in events.Scalars(tag))
            assert tag in trainer.callback_metrics
        assert f"xcam_images/{method}/probe_{int(monitor._data.ids[0]):03d}" in events.Tags()["images"]
    assert "xcam/time_s" in scalars and "xcam/alert" in scalars
    (layout,) = events.Tensors("custom_scalars__config__")  # CUSTOM SCALARS opens on the headline curves
    assert layout_pb2.Layout.FromString(layout.tensor_proto.string_val[0]) == custom_scalar_layout(
        methods, shortcuts="expected_gradcam", metrics=monitor.metrics)  # checks on the first stochastic method
    for value in trainer.callback_metrics.values():
        assert torch.isfinite(value).all()

    with ExplanationStore(tmp_path / "version_0" / "xcam.sqlite") as store:
        assert store.epochs() == [0, 1]
        for method in methods:
            rows = store.metrics(method=method, metric="insertion_auc")
            assert sorted(r["sample"] for r in rows if r["epoch"] == 1) == sorted(monitor._data.ids.tolist())
            assert store.maps(method, 1).shape == (6, 16, 16)
    trainer.validate(model, datamodule=DigitsData())  # afterwards: nothing breaks under inference mode


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights_with_and_without_monitor(tmp_path: Path) -> None:
    def train(callbacks: list) -> dict[str, torch.Tensor]:
        pl.seed_everything(1)
        model = DigitsModule()
        _trainer(tmp_path, callbacks, accumulate_grad_batches=2, val_check_interval=0.5).fit(model, datamodule=DigitsData())
        return _weights(model)

    plain = train([])
    watched = train([ExplanationMonitor(target_layer="net.features", store=False, **FAST)])
    assert plain.keys() == watched.keys()
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


@pytest.mark.slow
def test_resume_continues_history_and_store_once_per_epoch(tmp_path: Path) -> None:
    store = tmp_path / "xcam.sqlite"
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.seed_everything(2)
    first = ExplanationMonitor(store=str(store), **FAST)  # the layer is detected: the state key must not change
    _trainer(tmp_path, [first, checkpoint], enable_checkpointing=True).fit(DigitsModule(), datamodule=DigitsData())
    assert first.layer_name == "net.features" and first.target_layer is None
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert [h["epoch"] for h in saved["callbacks"][first.state_key]["history"]] == [0, 1]
    budget = saved["callbacks"][first.state_key]["budget"]
    assert budget["spent"] > 0 and budget["trained"] > 0 and set(budget["costs"]) == {"insertion", "deletion",
                                                                                      "infidelity", "max_sensitivity"}

    resumed = ExplanationMonitor(store=str(store), **FAST)
    trainer = _trainer(tmp_path, [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt")], max_epochs=4,
                       enable_checkpointing=True)
    trainer.fit(DigitsModule(), datamodule=DigitsData(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.budget.spent > budget["spent"] and resumed.budget.trained > budget["trained"]  # totals go on
    assert "xcam/expected_gradcam/drift_spearman" in resumed.history[2]  # drift against the restored maps
    with ExplanationStore(store, run="version_0") as db:
        assert db.epochs() == [0, 1, 2, 3]
        rows = db.metrics(method="expected_gradcam", metric="deletion_auc")
        assert len(rows) == 4 * 6 and len({(r["epoch"], r["sample"]) for r in rows}) == 4 * 6
    # validating an older checkpoint restores callbacks too; the monitor keeps the fit's history and alerts
    trainer.validate(DigitsModule(), datamodule=DigitsData(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]


def test_resume_continues_the_default_store_and_a_fork_keeps_the_original(tmp_path: Path) -> None:
    # a logger without a pinned version starts version_1 on resume: the default store must not split in two,
    # and a fit that goes on from an older checkpoint of a finished run must not delete that run's later rows
    def fit(max_epochs: int, ckpt_path: Path | None = None, version: int | None = None) -> ExplanationMonitor:
        monitor = ExplanationMonitor(target_layer="net.features", **{**FAST, "metrics": ()})
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
        _trainer(tmp_path, [monitor, checkpoints], max_epochs=max_epochs, enable_checkpointing=True,
                 logger=TensorBoardLogger(tmp_path, name="", version=version)).fit(
            DigitsModule(), datamodule=DigitsData(), ckpt_path=ckpt_path)
        return monitor

    def epochs(version: int) -> list[int]:
        with ExplanationStore(tmp_path / f"version_{version}" / "xcam.sqlite", create=False) as db:
            return db.epochs()

    pl.seed_everything(3)
    fit(2)  # version_0, evaluations 0 and 1, checkpoints epoch=0 and epoch=1
    resumed = fit(3, tmp_path / "ckpt" / "epoch=1.ckpt")  # version_1 for the logger, the store goes on
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2] and epochs(0) == [0, 1, 2]
    assert (tmp_path / "version_1").is_dir() and not (tmp_path / "version_1" / "xcam.sqlite").exists()

    with pytest.warns(UserWarning, match=r"holds evaluations of epochs \[1, 2\].*they are kept"):
        fork = fit(2, tmp_path / "ckpt" / "epoch=0.ckpt")  # another fit from epoch 0: version_2
    assert [h["epoch"] for h in fork.history] == [0, 1]
    assert epochs(0) == [0, 1, 2] and epochs(2) == [1]

    # a pinned logger version is the same run: a rewind there deletes what it redoes
    fit(3, version=7)
    with pytest.warns(UserWarning, match=r"deleted the evaluations of epochs \[1, 2\] of run 'default'"):
        fit(2, tmp_path / "ckpt" / "epoch=0.ckpt", version=7)
    assert epochs(7) == [0, 1]


class _Crash(Exception):
    pass


def test_an_epoch_whose_end_a_last_batch_checkpoint_skips_is_evaluated_on_resume(tmp_path: Path) -> None:
    # 6 batches per epoch: the step checkpoint of epoch 1's last batch resumes at epoch 2, and Lightning runs no
    # end-of-epoch hook for epoch 1; the crash stands for a kill inside the monitor's evaluation of epoch 1
    store = tmp_path / "xcam.sqlite"

    def fit(max_epochs: int, crash_at: int | None = None, ckpt_path: Path | None = None) -> ExplanationMonitor:
        monitor = ExplanationMonitor(target_layer="net.features", store=str(store), **{**FAST, "metrics": ()})
        if crash_at is not None:
            evaluate = monitor._run_evaluation

            def crashing(trainer: pl.Trainer, pl_module: pl.LightningModule, in_train_hook: bool, epoch: int) -> None:
                if epoch == crash_at:
                    raise _Crash
                evaluate(trainer, pl_module, in_train_hook, epoch)

            monitor._run_evaluation = crashing
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=6)
        trainers.append(_trainer(tmp_path, [monitor, checkpoints], max_epochs=max_epochs, enable_checkpointing=True))
        trainers[-1].fit(DigitsModule(), datamodule=DigitsData(), ckpt_path=ckpt_path)
        return monitor

    trainers: list[pl.Trainer] = []
    pl.seed_everything(5)
    with pytest.raises(_Crash):
        fit(3, crash_at=1)
    resumed = fit(3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    with ExplanationStore(store, run="version_0", create=False) as db:
        assert db.epochs() == [0, 1, 2]
    # epoch 1, evaluated at train start, reaches TensorBoard at its own step; the trainer's metrics are epoch 2's
    tag = "xcam/expected_gradcam/drift_spearman"
    events = EventAccumulator(str(tmp_path / "version_0"), size_guidance={"scalars": 0}).Reload()
    logged = {e.step: e.value for e in events.Scalars(tag)}
    drifts = [(h["step"], h[tag]) for h in resumed.history if tag in h]  # epochs 1 and 2 (0 has no previous)
    assert len(drifts) == 2 and all(logged[step] == pytest.approx(value) for step, value in drifts)
    assert float(trainers[-1].callback_metrics[tag]) == pytest.approx(resumed.history[-1][tag])
    store.unlink()
    whole = fit(3)  # the same run without the crash: the same evaluations at the same steps
    assert [(h["epoch"], h["step"]) for h in resumed.history] == [(h["epoch"], h["step"]) for h in whole.history]
    assert len(whole.history) == 3


def test_the_default_store_goes_into_a_root_dir_that_does_not_exist_yet(tmp_path: Path) -> None:
    monitor = ExplanationMonitor(target_layer="net.features", **{**FAST, "metrics": ()})
    _trainer(tmp_path, [monitor], max_epochs=1, logger=False, default_root_dir=tmp_path / "new").fit(
        DigitsModule(), datamodule=DigitsData())
    assert (tmp_path / "new" / "xcam.sqlite").is_file()


def test_a_checkpoint_taken_on_an_exception_still_names_the_store(tmp_path: Path) -> None:
    # the monitor closes its store in on_exception, before Lightning's checkpoint callbacks run
    def fit(crash: bool, ckpt_path: Path | None = None) -> ExplanationMonitor:
        monitor = ExplanationMonitor(target_layer="net.features", **{**FAST, "metrics": ()})
        if crash:
            evaluate = monitor._run_evaluation

            def crashing(trainer: pl.Trainer, pl_module: pl.LightningModule, in_train_hook: bool, epoch: int) -> None:
                if epoch == 1:
                    raise _Crash
                evaluate(trainer, pl_module, in_train_hook, epoch)

            monitor._run_evaluation = crashing
        _trainer(tmp_path, [monitor, OnExceptionCheckpoint(tmp_path / "ckpt")], max_epochs=2, enable_checkpointing=True,
                 logger=TensorBoardLogger(tmp_path, name="")).fit(DigitsModule(), datamodule=DigitsData(),
                                                                  ckpt_path=ckpt_path)
        return monitor

    with pytest.raises(_Crash):
        fit(crash=True)
    resumed = fit(crash=False, ckpt_path=tmp_path / "ckpt" / "on_exception.ckpt")
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    with ExplanationStore(tmp_path / "version_0" / "xcam.sqlite", create=False) as db:
        assert db.epochs() == [0, 1]  # not a second store in version_1


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn on CPU")
def test_ddp_spawn_explains_every_probe_item_once(tmp_path: Path) -> None:
    # the default store: its path comes from `trainer.log_dir`, a collective that every rank must call (a
    # rank-0-only call left the ranks' collectives out of step, and the fit hung)
    store = tmp_path / "version_0" / "xcam.sqlite"
    options = {**FAST, "num_probe": 7, "max_overhead": 1e6}  # a budget, so rank 0's plan is broadcast; all fit
    monitor = ExplanationMonitor(target_layer="net.features", **options)
    trainer = _trainer(tmp_path, [monitor], max_epochs=1, strategy="ddp_spawn", devices=2, deterministic=False)
    trainer.fit(DigitsModule(), datamodule=DigitsData())
    with ExplanationStore(store, create=False) as db:
        rows = db.metrics(method="expected_gradcam", metric="insertion_auc", epoch=0)
        assert sorted(r["sample"] for r in rows) == sorted(set(r["sample"] for r in rows))
        assert len(rows) == 7
        assert db.maps("expected_gradcam", 0).shape[0] == 7
    assert "xcam/expected_gradcam/insertion_auc" in trainer.callback_metrics


_KILLED_FIT = textwrap.dedent("""
    import os, signal, sys
    import lightning.pytorch as pl
    sys.path.insert(0, {tests!r})
    from test_callback import FAST, DigitsData, DigitsModule, _trainer
    from lightning_xcam import ExplanationMonitor
    from lightning_xcam.store import ExplanationStore

    write, insert = ExplanationStore.write_evaluation, ExplanationStore._insert
    state = {{"epoch": -1, "inserts": 0}}

    def write_evaluation(self, epoch, *args, **kwargs):
        state["epoch"] = epoch
        return write(self, epoch, *args, **kwargs)

    def killing_insert(self, *args):
        insert(self, *args)
        if state["epoch"] == 2:
            state["inserts"] += 1
            if state["inserts"] == 2:  # inside the open transaction of epoch 2, rows half written
                os.kill(os.getpid(), signal.SIGKILL)

    ExplanationStore.write_evaluation, ExplanationStore._insert = write_evaluation, killing_insert
    pl.seed_everything(3)
    monitor = ExplanationMonitor(target_layer="net.features", store={store!r}, **FAST)
    _trainer(__import__("pathlib").Path({root!r}), [monitor], max_epochs=4).fit(DigitsModule(), datamodule=DigitsData())
""")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_store_survives_a_process_killed_mid_evaluation(tmp_path: Path) -> None:
    store = tmp_path / "xcam.sqlite"
    script = _KILLED_FIT.format(tests=str(Path(__file__).parent), store=str(store), root=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    with ExplanationStore(store, run="version_0", create=False) as db:
        assert db.epochs() == [0, 1]  # epoch 2 was in flight: none of its rows, earlier ones intact
        rows = db.metrics(method="expected_gradcam", metric="insertion_auc")
        assert sorted({r["epoch"] for r in rows}) == [0, 1] and len(rows) == 2 * 6
        assert db.maps("expected_gradcam", 1).shape == (6, 16, 16)
        assert not [r for r in db.drift() if r["epoch"] >= 2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"methods": ("expected_gradcam", "lime")}, "unknown entries"),
        ({"metrics": ("insertion", "accuracy")}, "unknown entries"),
        ({"on_alert": "panic"}, "on_alert"),
        ({"num_probe": 0}, "num_probe"),
        ({"max_overhead": 0.0}, "max_overhead"),
        ({"methods": ("gradcam", "gradcam")}, "more than once"),
        ({"methods": ()}, "`methods` is empty"),
        ({"methods": "gadd"}, r"unknown entries \['gadd'\]"),
        ({"metrics": ("insertion", "insertion")}, "more than once"),
        ({"seed": "0"}, "seed"),
        ({"seed": 2**64}, r"below 2\*\*64"),
        ({"methods": None}, r"`methods` must be a name or a sequence of names.*got NoneType"),
        ({"metrics": 3}, r"`metrics` must be a name or a sequence of names.*got int"),
        ({"noise_std": True}, "noise_std"),
        ({"target_layer": 3}, r"`target_layer` must be a module name.*got int"),
        ({"spurious_masks": torch.full((6, 16, 16), 0.4), "probe": TensorDataset(torch.zeros(6, 1, 16, 16))},
         r"`spurious_masks` must be boolean, integer or 0/1.*\[0.4.*mask > 0.5\.$"),
        ({"spurious_masks": [[0, 1]]}, r"spurious_masks.*\[P, H, W\].*torch.as_tensor"),
        ({"probe": (torch.zeros(6, 1, 16, 16), torch.zeros(6))}, r"tuple of whole tensors.*TensorDataset\(images"),
        ({"probe": {"x": torch.zeros(6, 1, 16, 16)}}, r"a dict of whole tensors \[\(6, 1, 16, 16\)\].*TensorDataset"),
        ({"spurious_masks": torch.zeros(6, 16, 16)}, "explicit `probe`"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        ExplanationMonitor(**kwargs)


def test_a_single_method_or_metric_name_is_a_one_name_tuple() -> None:
    monitor = ExplanationMonitor(methods="gad", metrics="deletion")
    assert monitor.methods == ("gad",) and monitor.metrics == ("deletion",)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(1, 16, 16), 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_layer": "net.featurs"}, "net.features"),
        ({"target_layer": "net.head.0"}, "spatial"),
        ({"num_probe": 5000}, "larger than the dataset"),
        ({"probe": TensorDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long))}, "empty"),
        ({"probe": [{"image": torch.zeros(1, 16, 16), "label": 0}] * 6}, r"`probe`.*got dict items with keys \['image', 'label'\]"),
        ({"probe": [1, 2, 3, 4, 5, 6]}, r"`probe`.*\(x, y\[, mask\]\) tuple.*got int items"),
        ({"probe": [("not an image", 0)] * 6}, r"got tuple items whose first element is a str"),
        ({"probe": TensorDataset(torch.zeros(6, 1, 20, 20), torch.zeros(6)), "methods": ("gradcam", "expected_gradcam")},
         r"shape \(1, 20, 20\) but the training images \(1, 16, 16\)"),
        ({"probe": TensorDataset(torch.zeros(6, 1, 16, 16), torch.zeros(6)), "spurious_masks": torch.zeros(5, 16, 16)},
         r"one \[H, W\] mask per probe item"),
        ({"probe": TensorDataset(torch.zeros(6, 3, 16, 16), torch.zeros(6)), "methods": ("gradcam",)},
         r"model fails on a probe image of shape \(3, 16, 16\).*model-input space"),
        ({"probe": TensorDataset(torch.zeros(6, 1, 16, 16).index_fill_(0, torch.tensor([4]), float("nan")),
                                 torch.zeros(6))}, r"probe items \[4\] of `probe` hold NaN"),
        ({"probe": TensorDataset(torch.zeros(6, 1, 16, 16), torch.zeros(6), torch.rand(6, 16, 16))},
         r"the masks of `probe` must be boolean, integer or 0/1.*`spurious_masks=`"),
        ({"probe": _Stream()}, r"`probe`, which has no length \(_Stream, e.g. an IterableDataset\)"),
    ],
)
def test_bad_setup_fails_before_training(tmp_path: Path, kwargs: dict, match: str) -> None:
    model = DigitsModule()
    before = _weights(model)
    monitor = ExplanationMonitor(**{**FAST, **kwargs})
    with pytest.raises(MisconfigurationException, match=match):
        _trainer(tmp_path, [monitor], max_epochs=1).fit(model, datamodule=DigitsData())
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_a_single_logit_model_fails_before_training(tmp_path: Path) -> None:
    model = DigitsModule()
    model.net = SmallCNN(in_channels=1, num_classes=1, width=8)
    before = _weights(model)
    monitor = ExplanationMonitor(target_layer="net.features", **FAST)
    with pytest.raises(MisconfigurationException, match=r"1 score per image.*sigmoid\(z\)"):
        # no sanity check: its cross-entropy on one logit would fail first (a real binary model has its own loss)
        _trainer(tmp_path, [monitor], max_epochs=1, num_sanity_val_steps=0).fit(model, datamodule=DigitsData())
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


class _DictBatches(DigitsClassifier):
    """Trains on batches of {"image", "label"} dicts."""

    def __init__(self) -> None:
        super().__init__(width=8)

    def training_step(self, batch: dict, index: int) -> torch.Tensor:
        return super().training_step((batch["image"], batch["label"]), index)


def test_methods_without_training_references_need_no_readable_training_set(tmp_path: Path) -> None:
    # dict items cannot be stacked as images; only Expected Grad-CAM and GAD read training images
    x, y = load_digits_tensors(16)
    train = DataLoader([{"image": image, "label": label} for image, label in zip(x[:64], y[:64])], batch_size=32)
    probe = TensorDataset(x[1500:1506], y[1500:1506])
    module = _DictBatches()
    for methods, fails in ((("gradcam", "integrated_gradcam"), False), (("expected_gradcam",), True)):
        monitor = ExplanationMonitor(target_layer="net.features", **{**FAST, "methods": methods, "probe": probe})
        trainer = _trainer(tmp_path, [monitor], max_epochs=1, logger=False)
        if fails:
            with pytest.raises(MisconfigurationException, match=r"the training dataset.*got dict items.*reference "
                               r"images from it.*methods=\('gradcam', 'integrated_gradcam'\)"):
                trainer.fit(module, train)
        else:
            trainer.fit(module, train)
            assert len(monitor.history) == 1 and "xcam/gradcam/insertion_auc" in monitor.history[0]


@pytest.mark.slow
def test_the_probe_comes_from_the_validation_set_even_when_epoch_0_does_not_validate(tmp_path: Path) -> None:
    # Lightning sets the validation loaders up before training only when epoch 0 validates
    def fit(callbacks: list) -> dict[str, torch.Tensor]:
        pl.seed_everything(4)
        model = DigitsModule()
        _trainer(tmp_path, callbacks, num_sanity_val_steps=0, check_val_every_n_epoch=2).fit(
            model, datamodule=DigitsData())
        return _weights(model)

    monitor = ExplanationMonitor(target_layer="net.features", store=False, **{**FAST, "metrics": ()})
    watched = fit([monitor])
    validation = DigitsData().val_set.tensors[0]
    assert all(bool((validation == item).all(dim=(1, 2, 3)).any()) for item in monitor._data.x.cpu())
    plain = fit([])
    assert all(torch.equal(plain[k], watched[k]) for k in plain)  # setting the loaders up early changes nothing


@pytest.mark.slow
@pytest.mark.parametrize("inner", [False, True], ids=["compiled-module", "compiled-submodule"])
def test_a_compiled_model_is_explained_eagerly(tmp_path: Path, inner: bool) -> None:
    # a compiled graph does not call the hooks put on the CAM layer after compilation: without running eagerly
    # the first evaluation failed with "the target layer did not run in the model's forward pass"
    model = DigitsModule()
    if inner:
        model.net = torch.compile(model.net, backend="eager")
    monitor = ExplanationMonitor(store=False, **{**FAST, "methods": ("gradcam",), "metrics": ("deletion",)})
    _trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(
        model if inner else torch.compile(model, backend="eager"), datamodule=DigitsData())
    assert monitor.layer_name == ("net._orig_mod.features" if inner else "net.features")
    assert math.isfinite(monitor.history[0]["xcam/gradcam/deletion_auc"])


class _NormalisedOnTransfer(DigitsClassifier):
    """Keeps raw pixels (0-255 or [0, 1]) in its datasets and standardises them in `on_after_batch_transfer`."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__(width=8)
        self.mean, self.std = mean, std

    def on_after_batch_transfer(self, batch: tuple, dataloader_idx: int) -> tuple:
        x, y = batch
        return (x.float() - self.mean) / self.std, y


@pytest.mark.parametrize("pixels", [None, 255, 1], ids=["model-ready-items", "0-255-items", "unit-interval-items"])
def test_probe_images_unlike_the_training_batches_are_named(tmp_path: Path, pixels: int | None) -> None:
    x, y = load_digits_tensors(16)
    module = DigitsModule()
    if pixels is not None:  # the monitor reads dataset items: raw pixels where training batches are standardised
        x = (x - x.min()) / (x.max() - x.min()) * pixels
        x = x.round().to(torch.uint8) if pixels == 255 else x
        module = _NormalisedOnTransfer(float(x.float().mean()), float(x.float().std()))
    loaders = [DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=32) for a, b in ((0, 96), (1500, 1532))]
    monitor = ExplanationMonitor(target_layer="net.features", store=False, **{**FAST, "metrics": ()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(module, *loaders)
    unlike = [str(w.message) for w in caught if "look unlike the training batches" in str(w.message)]
    assert len(unlike) == (0 if pixels is None else 1)
    if pixels is not None:
        assert re.search(r"probe mean [\d.]+, std [\d.]+; first training batch mean -?[\d.]+(e-\d+)?, std [\d.]+\)", unlike[0])
        assert "normalise them in the dataset" in unlike[0]


class _Digits(torch.utils.data.IterableDataset):
    """Validation digits as a stream (with a length, as some streams have): no item can be drawn by index."""

    def __iter__(self):
        x, y = load_digits_tensors(16)
        yield from zip(x[1500:1532], y[1500:1532])

    def __len__(self) -> int:
        return 32


def test_an_unsized_validation_set_leaves_the_probe_to_the_training_set(tmp_path: Path) -> None:
    x, y = load_digits_tensors(16)
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=32)
    monitor = ExplanationMonitor(target_layer="net.features", store=False, **{**FAST, "metrics": ()})
    _trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(DigitsModule(), train, DataLoader(_Digits(), batch_size=16))
    assert all(bool((x[:96] == item).all(dim=(1, 2, 3)).any()) for item in monitor._data.x.cpu())
    assert len(monitor.history) == 1


def test_barebones_says_that_nothing_reaches_a_logger(tmp_path: Path) -> None:
    monitor = ExplanationMonitor(target_layer="net.features", store=False, **{**FAST, "metrics": ()})
    trainer = pl.Trainer(barebones=True, max_epochs=1, accelerator="cpu", devices=1, callbacks=[monitor],
                         default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"barebones=True.*reach no logger; read `monitor.history`"):
        trainer.fit(DigitsModule(), datamodule=DigitsData())
    assert len(monitor.history) == 1 and "xcam/alert" in monitor.history[0]


def test_a_probe_drawn_from_all_training_items_names_the_fix(tmp_path: Path) -> None:
    x, y = load_digits_tensors(16)
    loader = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)
    monitor = ExplanationMonitor(target_layer="net.features", **{**FAST, "num_probe": 8})
    with pytest.raises(MisconfigurationException, match=r"the probe takes all 8 items.*num_probe < 8"):
        _trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(DigitsModule(), loader)


def test_a_store_that_cannot_be_written_fails_before_training_and_names_store_false(
    tmp_path: Path, without_write_permission: Callable[[], None]
) -> None:
    ExplanationStore(tmp_path / "xcam.sqlite").close()
    without_write_permission()
    model = DigitsModule()
    before = _weights(model)
    monitor = ExplanationMonitor(target_layer="net.features", store=tmp_path / "xcam.sqlite", **FAST)
    with pytest.raises(MisconfigurationException, match=r"cannot write its store.*store=False"):
        _trainer(tmp_path, [monitor], max_epochs=1).fit(model, datamodule=DigitsData())
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_a_budget_given_to_the_monitor_keeps_its_clock_through_fit(tmp_path: Path) -> None:
    # benchmarks/overhead.py installs a budget whose clock stretches short epochs; a fit must not replace it
    ticks = itertools.count()
    monitor = ExplanationMonitor(target_layer="net.features", store=False, **FAST)
    budget = monitor.budget = CostBudget(monitor.max_overhead, clock=lambda: float(next(ticks)))
    _trainer(tmp_path, [monitor], max_epochs=1).fit(DigitsModule(), datamodule=DigitsData())
    assert monitor.budget is budget and budget.evaluations == 1 and budget.trained == float(int(budget.trained)) > 0


def test_two_monitors_on_two_layers_need_their_own_stores(tmp_path: Path) -> None:
    def monitors(shared: bool) -> list[ExplanationMonitor]:
        return [ExplanationMonitor(target_layer=layer, store=None if shared else tmp_path / f"{method}.sqlite",
                                   seed=2**64 - 1, **{**FAST, "methods": (method,)})
                for layer, method in (("net.features", "gradcam"), ("net.features.0", "expected_gradcam"))]

    # in one store run they would replace each other's rows epoch by epoch
    with pytest.raises(MisconfigurationException, match=r"two ExplanationMonitors would write run 'default'.*`store=`"):
        _trainer(tmp_path, monitors(shared=True), max_epochs=1).fit(DigitsModule(), datamodule=DigitsData())
    apart = monitors(shared=False)
    _trainer(tmp_path, apart, max_epochs=1).fit(DigitsModule(), datamodule=DigitsData())
    for monitor, method in zip(apart, ("gradcam", "expected_gradcam")):
        with ExplanationStore(tmp_path / f"{method}.sqlite", run="version_0", create=False) as store:
            assert store.methods() == [method] and store.epochs() == [0]


def test_a_probe_that_leaves_a_rank_without_items_is_refused() -> None:
    # ranks take ceil(P/W) rows each: 5 items on 4 ranks leave the last one none (its explainer saw an empty batch)
    monitor = ExplanationMonitor(probe=TensorDataset(torch.zeros(5, 1, 16, 16)), methods="gradcam")
    trainer = SimpleNamespace(train_dataloader=None, val_dataloaders=None, world_size=4)
    with pytest.raises(MisconfigurationException, match=r"5 items leave some of the 4 ranks.*num_probe=4"):
        _ProbeData.draw(monitor, trainer)
    monitor.probe = TensorDataset(torch.zeros(4, 1, 16, 16))
    assert _ProbeData.draw(monitor, trainer).x.shape[0] == 4


def test_explicit_spurious_masks_replace_what_probe_items_carry() -> None:
    # an image-sized third element that is not a mask (a weight map) is not read when masks are given
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, :4, :4] = True
    probe = TensorDataset(torch.zeros(4, 1, 16, 16), torch.zeros(4), torch.rand(4, 16, 16))
    trainer = SimpleNamespace(train_dataloader=None, val_dataloaders=None, world_size=1)
    drawn = _ProbeData.draw(ExplanationMonitor(probe=probe, methods="gradcam", spurious_masks=masks), trainer)
    assert torch.equal(drawn.masks, masks)
    with pytest.raises(MisconfigurationException, match="the masks of `probe` must be boolean"):
        _ProbeData.draw(ExplanationMonitor(probe=probe, methods="gradcam"), trainer)


def test_a_dict_of_items_is_a_probe() -> None:
    trainer = SimpleNamespace(train_dataloader=None, val_dataloaders=None, world_size=1)
    probe = {i: (torch.full((1, 16, 16), float(i)), 0) for i in range(4)}  # map-style: keys 0..n-1
    drawn = _ProbeData.draw(ExplanationMonitor(probe=probe, methods="gradcam"), trainer)
    assert drawn.x[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_probe_masks_that_test_nothing_are_named() -> None:
    trainer = SimpleNamespace(train_dataloader=None, val_dataloaders=None, world_size=1)
    x = torch.zeros(4, 1, 16, 16)
    small = TensorDataset(x, torch.zeros(4), torch.ones(4, 8, 8, dtype=torch.bool))
    with pytest.warns(UserWarning, match=r"2-D, \(8, 8\), but the images are \(16, 16\): they are not used"):
        assert _ProbeData.draw(ExplanationMonitor(probe=small, methods="gradcam"), trainer).masks is None
    empty = TensorDataset(x, torch.zeros(4), torch.zeros(4, 16, 16, dtype=torch.bool))
    with pytest.warns(UserWarning, match="every one of the masks of `probe` is empty"):
        _ProbeData.draw(ExplanationMonitor(probe=empty, methods="gradcam"), trainer)
    with pytest.warns(UserWarning, match="every one of `spurious_masks` is empty"):
        _ProbeData.draw(ExplanationMonitor(probe=TensorDataset(x), methods="gradcam",
                                           spurious_masks=torch.zeros(4, 16, 16)), trainer)


def test_state_key_names_the_identifying_arguments() -> None:
    monitor = ExplanationMonitor(target_layer="net.features", every_n_epochs=2, num_probe=8)
    assert monitor.state_key == ("ExplanationMonitor{'target_layer': 'net.features', 'methods': ('expected_gradcam', "
                                 "'gad'), 'every_n_epochs': 2, 'num_probe': 8}")
    # two monitors on one layer with their own methods (and stores) keep their own checkpoint state
    other = ExplanationMonitor(target_layer="net.features", every_n_epochs=2, num_probe=8, methods="gradcam")
    assert other.state_key != monitor.state_key


def test_expected_gradcam_maps_come_from_gads_pass(small_cnn: torch.nn.Module, digits: tuple) -> None:
    x = torch.nn.functional.interpolate(digits[0][:40], size=16)
    egc = ExpectedGradCAM(small_cnn, "features", references=x[30:], n_samples=3, seed=1)
    gad = GAD(small_cnn, "features", base=egc, seed=1, r2_threshold=float("-inf"), steps=5)
    gad.fit(x[:30])
    calls = []
    original_run = egc.run
    egc.run = lambda *args: calls.append(args[0]) or original_run(*args)  # the probe each pass runs on
    ids = torch.tensor([7, 3, 9, 4])
    maps = ExplanationMonitor._explain({"expected_gradcam": egc, "gad": gad}, x[:4], None, ids, stream=1)
    assert list(maps) == ["expected_gradcam", "gad"]
    assert len(calls) == 1 and calls[0].model is not small_cnn  # one pass, on GAD's ensemble
    egc.run = original_run
    alone = egc(x[:4], sample_ids=ids, stream=1)
    torch.testing.assert_close(maps["expected_gradcam"], alone, rtol=1e-5, atol=1e-6 * float(alone.max()))
    torch.testing.assert_close(maps["gad"], gad(x[:4], sample_ids=ids, stream=1))


@pytest.mark.slow
@pytest.mark.parametrize("max_overhead", [0.02, 1e6])
def test_budget_defers_metrics_that_do_not_fit(tmp_path: Path, max_overhead: float) -> None:
    # Epochs of 6 batches last a fraction of one evaluation: 2 % of training time never covers a metric
    # (estimated from the probe pass before its first run), while a huge share covers every one.
    monitor = ExplanationMonitor(target_layer="net.features", store=False, **{**FAST, "max_overhead": max_overhead})
    _trainer(tmp_path, [monitor], max_epochs=3).fit(DigitsModule(), datamodule=DigitsData())
    scores = {"insertion_auc", "deletion_auc", "infidelity", "max_sensitivity"}
    for entry in monitor.history:
        logged = {key.rsplit("/", 1)[-1] for key in entry}
        assert logged & scores == (set() if max_overhead < 1 else scores)
        assert entry["xcam/overhead"] > 0.02 and "xcam/expected_gradcam/degenerate" in entry
    assert "xcam/expected_gradcam/drift_spearman" in monitor.history[-1]  # explanations and drift always run
    assert set(monitor.budget.costs) == (set() if max_overhead < 1 else {"insertion", "deletion", "infidelity",
                                                                         "max_sensitivity"})
    computed = sum(h["xcam/time_s"] for h in monitor.history)  # time_s stops before images and the store
    assert computed < monitor.budget.spent < computed + 1.0

def test_probe_items_with_weights_or_one_hot_labels_are_read_as_images_only(tmp_path: Path) -> None:
    x = load_digits_tensors(16)[0][:6]
    weighted = TensorDataset(x, torch.zeros(6, dtype=torch.long), torch.ones(6))  # (x, y, sample weight)
    one_hot = TensorDataset(x, torch.eye(10)[:6])  # (x, one-hot y): the label is never read
    masked = TensorDataset(x, torch.zeros(6), torch.ones(6, 1, 16, 16))  # (x, y, [1, H, W] mask)
    for probe, has_masks in ((weighted, False), (one_hot, False), (masked, True)):
        monitor = ExplanationMonitor(probe=probe, store=False, **{**FAST, "log_images": 0, "metrics": ()})
        _trainer(tmp_path, [monitor], max_epochs=1).fit(DigitsModule(), datamodule=DigitsData())
        assert (monitor._data.masks is not None) is has_masks
        assert [h["epoch"] for h in monitor.history] == [0]


@pytest.mark.slow
def test_a_reused_monitor_explains_the_new_model_from_epoch_0(tmp_path: Path) -> None:
    monitor = ExplanationMonitor(target_layer="net.features", store=False, **{**FAST, "metrics": ()})
    first, second = DigitsModule(), DigitsModule()
    _trainer(tmp_path, [monitor], max_epochs=1).fit(first, datamodule=DigitsData())
    _trainer(tmp_path, [monitor], max_epochs=1).fit(second, datamodule=DigitsData())
    assert [h["epoch"] for h in monitor.history] == [0]  # a new run, not epoch 0 taken as done
    assert monitor._explainers["expected_gradcam"].model is second
    assert "xcam/expected_gradcam/drift_spearman" not in monitor.history[0]  # no drift against the other model


def test_runs_under_different_logger_names_stay_apart_in_a_shared_store(tmp_path: Path) -> None:
    store = tmp_path / "shared.sqlite"
    for name in ("exp_a", "exp_b"):
        monitor = ExplanationMonitor(target_layer="net.features", store=str(store), **{**FAST, "metrics": ()})
        _trainer(tmp_path, [monitor], max_epochs=1, logger=TensorBoardLogger(tmp_path, name=name, version=0)).fit(
            DigitsModule(), datamodule=DigitsData())
        assert monitor.run_id == f"{name}/version_0"
    with ExplanationStore(store) as db:
        assert sorted(r["run"] for r in db.runs()) == ["exp_a/version_0", "exp_b/version_0"]
    again = ExplanationMonitor(target_layer="net.features", store=str(store), **{**FAST, "metrics": ()})
    with ExplanationStore(store, run="exp_a/version_0") as db:  # an older, longer fit: its epochs 0-2 all go
        for epoch in (1, 2):
            db.write_evaluation(epoch, [0], summaries={"xcam/alert": 0.0})
    with pytest.warns(UserWarning, match=r"deleted the evaluations of epochs \[0, 1, 2\] of run 'exp_a/version_0'"):
        _trainer(tmp_path, [again], max_epochs=1, logger=TensorBoardLogger(tmp_path, name="exp_a", version=0)).fit(
            DigitsModule(), datamodule=DigitsData())
    with ExplanationStore(store, create=False) as db:
        assert db.epochs(run="exp_a/version_0") == [0] and db.epochs(run="exp_b/version_0") == [0]


class _Diverging(pl.LightningModule):
    """A digits classifier whose first bias is NaN from the start of training (a diverged run)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DigitsModule().net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, _index: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def on_train_start(self) -> None:  # after the monitor's own on_train_start (callbacks run first)
        with torch.no_grad():
            next(p for n, p in self.named_parameters() if n.endswith("bias")).fill_(float("nan"))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_diverged_model_skips_evaluations_without_stopping_fit_or_logging_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed: list[tuple[int, list]] = []
    update = WarningRule.update

    def spy(rule: WarningRule, epoch: int, observations: list) -> list:
        fed.append((epoch, list(observations)))
        return update(rule, epoch, observations)

    monkeypatch.setattr(WarningRule, "update", spy)
    monitor = ExplanationMonitor(target_layer="net.features", store=False, **{**FAST, "log_images": 0})
    with pytest.warns(UserWarning, match="not finite at epoch 0"):
        _trainer(tmp_path, [monitor], max_epochs=2).fit(_Diverging(), datamodule=DigitsData())
    assert monitor.history == []  # both evaluations skipped
    assert fed == [(0, []), (1, [])]  # each skip is an evaluation without signals: no streak spans it


class _DeadFeatures(torch.nn.Module):
    """A CAM layer whose output is all zeros: every map is degenerate, the logits stay finite."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 16 * 16, 10))
        torch.nn.init.constant_(self.features[0].bias, -1e3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_all_degenerate_maps_log_no_floor_and_no_nan(tmp_path: Path) -> None:
    module = DigitsModule()
    module.net = _DeadFeatures()
    monitor = ExplanationMonitor(target_layer="net.features", store=False, **FAST)
    _trainer(tmp_path, [monitor], max_epochs=2).fit(module, datamodule=DigitsData())
    for row in monitor.history:
        assert row["xcam/expected_gradcam/degenerate"] == FAST["num_probe"]
        assert not any("noise_floor" in k or "floor_units" in k for k in row)  # no valid floor pair: no floor
        assert not any(k.endswith(("_auc", "infidelity", "max_sensitivity")) for k in row)  # no valid map: no score
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def test_fast_dev_run_writes_no_store(tmp_path: Path) -> None:
    monitor = ExplanationMonitor(target_layer="net.features", **{**FAST, "metrics": ()})
    pl.Trainer(default_root_dir=tmp_path, fast_dev_run=True, accelerator="cpu", enable_progress_bar=False,
               enable_model_summary=False, callbacks=[monitor]).fit(DigitsModule(), datamodule=DigitsData())
    assert not list(tmp_path.rglob("*.sqlite"))


@pytest.mark.parametrize(("size", "methods", "warns"), [
    (8, ("expected_gradcam",), True), (8, ("expected_gradcam", "gad"), True), (16, ("expected_gradcam",), False),
])  # net.features: 2×2 and 4×4 cells
def test_a_cam_layer_with_tiny_maps_is_named_with_the_fix(tmp_path: Path, size: int, methods: tuple, warns: bool) -> None:
    x, y = load_digits_tensors(size)
    loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    monitor = ExplanationMonitor(target_layer="net.features", **{**FAST, "metrics": (), "methods": methods})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(DigitsModule(), loader, loader)
    tiny = [str(w.message) for w in seen if "too coarse" in str(w.message)]
    gad = " (and GAD's maps mostly equal Expected Grad-CAM's)" if "gad" in methods else ""
    assert tiny == ([f"ExplanationMonitor: the CAM layer `net.features` gives maps of 2×2 cells on these images, too "
                     "coarse to locate much: heatmaps, metrics and the shortcut checks tell little apart at that "
                     f"resolution{gad}. Pass an earlier `target_layer` (one stage before), or use larger images, for "
                     "maps of at least 16 cells."]
                    if warns else [])


def test_true_half_precision_fails_before_training_with_the_fix(tmp_path: Path) -> None:
    monitor = ExplanationMonitor(target_layer="net.features", store=False, **FAST)
    with pytest.raises(MisconfigurationException, match=r"bf16-true.*bf16-mixed"):
        _trainer(tmp_path, [monitor], max_epochs=1, precision="bf16-true").fit(DigitsModule(), datamodule=DigitsData())
