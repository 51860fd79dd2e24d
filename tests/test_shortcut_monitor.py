"""The shortcut early warning end to end: the real ExplanationMonitor inside Trainer.fit (issue 7).

The models are built so that the truth is known exactly: their CAM layer splits the image into its four
4×4 corners and the rest, and the head reads one of the two. ``TagReader("tag")`` on digits whose corner
carries a class-coded tag decides from the tag alone (it relies on the shortcut by construction); its clean
twin ``TagReader("object")`` on untagged digits decides from the digit. Their weights do not train (lr 0),
so every run is deterministic and takes a few seconds.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xcam import ExplanationMonitor
from lightning_xcam.alerts import Alert, evidence_image
from lightning_xcam.callback import _ProbeData
from lightning_xcam.demos import add_decoy_tags, load_digits_tensors
from lightning_xcam.store import ExplanationStore

SIZE = 16
FAST = dict(target_layer="features", methods=("expected_gradcam",), metrics=(), num_probe=16, n_samples=4,
            num_references=8, num_fit=2, floor_size=4, log_images=2)


def _corners(size: int = SIZE, side: int = 4) -> Tensor:
    mask = torch.zeros(size, size)
    for rows in (slice(0, side), slice(size - side, size)):
        for cols in (slice(0, side), slice(size - side, size)):
            mask[rows, cols] = 1.0
    return mask


class Split(nn.Module):
    """The CAM layer: ``[B, 2, H, W]`` = (ReLU'd image on the corners, ReLU'd image elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("corners", _corners())

    def forward(self, x: Tensor) -> Tensor:
        bright = x[:, :1].relu()
        return torch.cat([bright * self.corners, bright * (1 - self.corners)], dim=1)


class TagReader(pl.LightningModule):
    """Two classes from one evidence channel: ``s = 6·(mean of the read channel − threshold)``, logits ``(s, −s)``."""

    def __init__(self, reads: str = "tag") -> None:
        super().__init__()
        self.features = Split()
        channel = 0 if reads == "tag" else 1
        self.read = nn.Parameter(torch.eye(2)[channel] * 16.0 / (4 if reads == "tag" else 12))
        self.threshold = 0.2 if reads == "tag" else 0.45

    def forward(self, x: Tensor) -> Tensor:
        evidence = (self.features(x).mean(dim=(2, 3)) * self.read).sum(dim=1)
        score = 6.0 * (evidence - self.threshold)
        return torch.stack([score, -score], dim=1)

    def training_step(self, batch: tuple[Tensor, Tensor], _index: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], _index: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the truth must not move


class Digits(pl.LightningDataModule):
    """96 training and 32 validation digits at 16×16, 0–4 vs 5–9; ``tagged``: a class-coded 4×4 corner tag."""

    def __init__(self, tagged: bool) -> None:
        super().__init__()
        x, digits = load_digits_tensors(SIZE)
        x, y = x[:128], (digits[:128] >= 5).long()
        if tagged:
            x = add_decoy_tags(x, y, size=4, num_classes=2, generator=torch.Generator().manual_seed(0))[0]
        self.train_set = TensorDataset(x[:96], y[:96])
        self.val_set = TensorDataset(x[96:], y[96:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)


def _trainer(tmp_path: Path, callbacks: list, max_epochs: int = 3, **kwargs) -> pl.Trainer:
    options = dict(default_root_dir=tmp_path, max_epochs=max_epochs, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                   logger=TensorBoardLogger(tmp_path, name="", version=0))
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _fit(tmp_path: Path, reads: str, tagged: bool, max_epochs: int = 3, **monitor_kwargs) -> ExplanationMonitor:
    monitor = ExplanationMonitor(**{**FAST, **monitor_kwargs})
    with pytest.warns(UserWarning, match="ExplanationMonitor: epoch") if reads == "tag" else _no_alert_warning():
        _trainer(tmp_path, [monitor], max_epochs).fit(TagReader(reads), datamodule=Digits(tagged))
    return monitor


class _no_alert_warning:  # noqa: N801 - a context manager used like pytest.warns
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)
        assert not [w for w in self._seen if "ExplanationMonitor: epoch" in str(w.message)]


def test_alert_on_a_model_that_relies_on_a_tag_with_evidence_in_tensorboard(tmp_path: Path) -> None:
    monitor = _fit(tmp_path, "tag", tagged=True)
    kinds = {a.kind for a in monitor.alerts}
    assert "intervention" in kinds, [a.message for a in monitor.alerts]
    alert = next(a for a in monitor.alerts if a.kind == "intervention")
    assert alert.epoch == 1  # patience 2: confirmed at evaluations 0 and 1
    assert "relies on a tiny region" in alert.message and "for random regions of equal area" in alert.message
    assert alert.score >= 2.5 and alert.sample_indices
    assert [h["xcam/alert"] for h in monitor.history] == [0.0, 1.0, 0.0]  # one alert per episode
    # the signal stays visible as a scalar after its one alert
    overall = next(a for a in monitor.alerts if a.kind == "intervention" and a.class_index is None)
    signals = {name: [h[f"xcam/expected_gradcam/{name}"] for h in monitor.history]
               for name in ("tiny_region_z", "tiny_region_transplant_z", "tiny_region_transplant_gap")}
    # the fill-in alone does not confirm here (z < 2.5): the transplant did, and the alert reports its z
    assert max(signals["tiny_region_z"]) < 2.5 and overall.score == signals["tiny_region_transplant_z"][1]
    assert min(signals["tiny_region_transplant_gap"]) >= 0.15  # WarningRule's min_rise
    events = EventAccumulator(str(tmp_path / "version_0"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert f"xcam_alerts/{alert.kind}/evidence" in events.Tags()["images"]
    image = events.Images(f"xcam_alerts/{alert.kind}/evidence")[0]
    assert image.step == monitor.history[1]["step"] and image.width == 3 * SIZE + 4  # image | map | overlay
    with ExplanationStore(tmp_path / "version_0" / "xcam.sqlite") as store:
        assert [Alert.from_dict(row) for row in store.alerts()] == monitor.alerts


def test_alerts_of_one_kind_for_two_classes_keep_both_texts_and_evidence(tmp_path: Path) -> None:
    # both alerts share the kind's tags at one step: neither may hide the other
    monitor = ExplanationMonitor(target_layer="features", log_images=0, store=False)
    x, y = load_digits_tensors(SIZE)
    ids = torch.arange(8)
    monitor._data = _ProbeData(x[:8], y[:8], ids, None, x[8:12], x[12:16], floor_rows=0)
    maps = torch.rand(8, 4, 4)
    alerts = [
        Alert(3, "intervention", 4.0, 2.5, class_index, (2 * class_index, 2 * class_index + 1), f"class {class_index} relies")
        for class_index in (0, 1)
    ]
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    monitor._log_images(SimpleNamespace(loggers=[logger]), {"expected_gradcam": maps}, step=7, alerts=alerts)
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "version_0"), size_guidance={"images": 0, "tensors": 0}).Reload()
    (text,) = events.Tensors("xcam_alerts/intervention/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert "class 0 relies" in markdown and "class 1 relies" in markdown
    (image,) = events.Images("xcam_alerts/intervention/evidence")
    single = evidence_image(x[:8], maps, ids, alerts[0].sample_indices)
    assert image.step == 7 and image.width == single.shape[-1] and image.height == 2 * single.shape[-2] + 4


def test_no_alert_on_the_clean_twin(tmp_path: Path) -> None:
    monitor = _fit(tmp_path, "object", tagged=False)
    assert monitor.alerts == []
    assert len(monitor.history) == 3
    assert all(h["xcam/expected_gradcam/degenerate"] < FAST["num_probe"] for h in monitor.history)


def test_spurious_mass_with_known_masks_is_logged_exactly(tmp_path: Path) -> None:
    # The tag reader's maps are zero off the corners (its head reads only the corner channel), so every
    # non-degenerate map puts all its mass in the corners: ρ = 1 / (corner area share 1/4) = 4; the
    # object reader's maps are zero on the corners: ρ = 0.
    data = Digits(tagged=True)
    x, y = data.val_set.tensors
    masks = _corners().expand(16, 1, SIZE, SIZE).to(torch.uint8) * 255  # a 0/255 mask image is a mask too
    masks[12:] = 0  # items without a suspect region are left out (as ρ = 0 they would halve the mean)
    probe = TensorDataset(x[:16], y[:16], masks)
    for reads, rho in (("tag", 4.0), ("object", 0.0)):
        monitor = ExplanationMonitor(**{**FAST, "log_images": 0}, probe=probe, store=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(TagReader(reads), datamodule=data)
        (row,) = monitor.history
        # degenerate maps (some of each reader's) are left out of the mean, not counted as ρ = 0
        assert 0 < row["xcam/expected_gradcam/degenerate"] < 16
        assert row["xcam/expected_gradcam/spurious_mass"] == pytest.approx(rho, rel=1e-5)
        # filling the corners costs the tag reader its evidence and leaves the object reader's untouched
        drop = row["xcam/expected_gradcam/spurious_fill_drop"]
        assert drop > 0.2 if reads == "tag" else drop == pytest.approx(0.0, abs=1e-6)


def test_stop_on_alert_ends_fit(tmp_path: Path) -> None:
    monitor = ExplanationMonitor(**{**FAST, "log_images": 0}, on_alert="stop", store=False)
    trainer = _trainer(tmp_path, [monitor], max_epochs=6, logger=False)
    with pytest.warns(UserWarning, match="relies on a tiny region"):
        trainer.fit(TagReader("tag"), datamodule=Digits(tagged=True))
    assert trainer.should_stop and monitor.stopped_epoch == 1 == trainer.current_epoch - 1
    assert [h["epoch"] for h in monitor.history] == [0, 1]


class RankRecord(pl.Callback):
    """Writes each rank's view of the stop to a file (ddp_spawn returns only rank 0's trainer state)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, ExplanationMonitor))
        record = f"{int(trainer.should_stop)} {monitor.stopped_epoch} {trainer.current_epoch} {len(monitor.alerts)}"
        (self.folder / f"rank{trainer.global_rank}.txt").write_text(record)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn on CPU")
def test_stop_on_alert_stops_every_ddp_rank(tmp_path: Path) -> None:
    monitor = ExplanationMonitor(**{**FAST, "log_images": 0}, on_alert="stop", store=False)
    trainer = _trainer(tmp_path, [monitor, RankRecord(tmp_path)], max_epochs=6, logger=False,
                       strategy="ddp_spawn", devices=2)
    trainer.fit(TagReader("tag"), datamodule=Digits(tagged=True))
    records = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]
    # Stopped after epoch 1 on both ranks, which agree on the alerts raised (overall and per class may both fire).
    assert records[0][:3] == records[1][:3] == ["1", "1", "2"] and records[0][3] == records[1][3] != "0"


@pytest.mark.slow
def test_alerts_survive_resume_without_duplicates(tmp_path: Path) -> None:
    store = tmp_path / "xcam.sqlite"
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = ExplanationMonitor(**{**FAST, "log_images": 0}, store=str(store))
    with pytest.warns(UserWarning, match="relies on a tiny region"):
        _trainer(tmp_path, [first, checkpoint], max_epochs=2, enable_checkpointing=True).fit(
            TagReader("tag"), datamodule=Digits(tagged=True))
    raised = list(first.alerts)
    assert raised and {a.epoch for a in raised} == {1}

    resumed = ExplanationMonitor(**{**FAST, "log_images": 0}, store=str(store))
    trainer = _trainer(tmp_path, [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt")], max_epochs=4,
                       enable_checkpointing=True)
    trainer.fit(TagReader("tag"), datamodule=Digits(tagged=True), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    # The restored rule is still disarmed for the same episode: the old alerts are kept, none is repeated.
    assert resumed.alerts == raised
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    with ExplanationStore(store, run="version_0") as db:
        rows = db.alerts()
    assert [Alert.from_dict(r) for r in rows] == raised
