"""ExplanationStore: round trips, idempotency, resume, foreign files, NaN refusal and crash safety."""

from __future__ import annotations

import os
import signal
import sqlite3
from contextlib import closing
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_xcam.alerts import Alert
from lightning_xcam.store import ExplanationStore, StoreFormatError, find_store, find_stores

B = 4


def _evaluation(epoch: int, scale: float = 1.0, ids: tuple[int, ...] = tuple(range(B))) -> dict:
    """A full evaluation's arguments for probe items ``ids``, with values that depend on the epoch."""
    gen = torch.Generator().manual_seed(epoch)
    return dict(
        step=10 * epoch + 9,
        time_s=1.25,
        metrics={
            "expected_gradcam": {
                "deletion_auc": scale * torch.rand(B, generator=gen),
                "insertion_auc": [0.5, 0.25, 0.125, float(epoch)],
            },
            "gad": {"deletion_auc": torch.rand(B, generator=gen, dtype=torch.float64)},
        },
        drift={
            "expected_gradcam": {
                "previous": {
                    "spearman": torch.rand(B, generator=gen),
                    "valid": torch.tensor([True, True, False, True]),
                },
                "floor": {"spearman": {ids[1]: 0.03, ids[2]: 0.04}},  # the floor subset only
            }
        },
        summaries={"xcam/expected_gradcam/deletion_auc": 0.3 + epoch, "xcam/alert": 0.0},
        maps={"expected_gradcam": torch.rand(B, 16, 16, generator=gen), "gad": torch.rand(B, 1, 8, 8, generator=gen)},
        alerts=[
            Alert(epoch, "border", 0.41, 0.2, None, (1, 3), f"epoch {epoch}: border"),
            {"kind": "spurious_mass", "score": 0.9, "threshold": 0.5, "class_index": 7, "message": "mass"},
        ],
    )


def _count(path: Path, table: str, epoch: int | None = None) -> int:
    conn = sqlite3.connect(str(path))
    try:
        if epoch is None:
            return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        return conn.execute(f"SELECT COUNT(*) FROM {table} WHERE epoch = ?", (epoch,)).fetchone()[0]
    finally:
        conn.close()


def test_round_trip_of_every_table(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "version_0" / "xcam.sqlite"
    ev = _evaluation(2, ids=(10, 11, 12, 13))
    with ExplanationStore(path, run="r1") as store:
        store.write_config({"num_probe": 4, "methods": ("expected_gradcam", "gad"), "root": tmp_path})
        store.write_evaluation(2, torch.tensor([10, 11, 12, 13]), **ev)

    with ExplanationStore(path, run="r1", create=False) as store:
        assert store.config() == {"num_probe": 4, "methods": ["expected_gradcam", "gad"], "root": str(tmp_path)}
        assert [r["run"] for r in store.runs()] == ["r1"]
        [evaluation] = store.evaluations()
        assert evaluation["epoch"] == 2 and evaluation["step"] == 29 and evaluation["time_s"] == 1.25
        assert evaluation["num_samples"] == B and store.epochs() == [2]
        assert store.methods() == ["expected_gradcam", "gad"]

        rows = store.metrics(method="expected_gradcam", metric="deletion_auc")
        assert [r["sample"] for r in rows] == [10, 11, 12, 13]
        assert [r["value"] for r in rows] == ev["metrics"]["expected_gradcam"]["deletion_auc"].double().tolist()
        assert set(rows[0]) == {"run", "epoch", "method", "sample", "metric", "value"}
        assert [r["value"] for r in store.metrics(metric="insertion_auc")] == [0.5, 0.25, 0.125, 2.0]
        assert [r["value"] for r in store.metrics(method="gad")] == ev["metrics"]["gad"]["deletion_auc"].tolist()
        assert len(store.metrics()) == 3 * B and store.metrics(sample=11, method="gad")[0]["sample"] == 11

        valid = store.drift(reference="previous", metric="valid")
        assert [r["value"] for r in valid] == [1.0, 1.0, 0.0, 1.0]
        assert [(r["sample"], r["value"]) for r in store.drift(reference="floor")] == [(11, 0.03), (12, 0.04)]
        assert set(valid[0]) == {"run", "epoch", "method", "sample", "reference", "metric", "value"}

        assert store.summary_table() == [
            {"epoch": 2, "step": 29, "xcam/alert": 0.0, "xcam/expected_gradcam/deletion_auc": 2.3}
        ]
        assert len(store.summaries(tag="xcam/alert")) == 1

        maps = store.maps("expected_gradcam", 2)
        assert maps.dtype == torch.float32 and maps.shape == (B, 16, 16)
        assert torch.equal(maps, ev["maps"]["expected_gradcam"].half().float())
        assert torch.equal(store.maps("gad", 2, samples=[13, 10]), ev["maps"]["gad"][[3, 0], 0].half().float())
        assert store.map_samples("gad", 2) == [10, 11, 12, 13]  # the rows of store.maps("gad", 2)
        with pytest.raises(KeyError, match="no maps for method 'gad' at epoch 5"):
            store.map_samples("gad", 5)

        alerts = store.alerts()
        assert [Alert.from_dict(a) for a in alerts if a["kind"] == "border"] == [ev["alerts"][0]]
        mass = store.alerts(kind="spurious_mass")[0]
        assert (mass["class_index"], mass["sample_indices"], mass["threshold"]) == (7, [], 0.5)

        with pytest.raises(KeyError, match="epochs with 'gad' maps: \\[2\\]"):
            store.maps("gad", 5)
        with pytest.raises(KeyError, match="samples \\[99\\]"):
            store.maps("gad", 2, samples=[99])
        with pytest.raises(KeyError, match="runs: \\['r1'\\]"):
            store.config(run="other")

    # Plain SQL sees the contract's column names.
    conn = sqlite3.connect(str(path))
    sql = "SELECT COUNT(*) FROM metrics WHERE epoch = 2 AND method = 'gad' AND metric = 'deletion_auc'"
    assert conn.execute(sql).fetchone() == (B,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


def test_writing_an_evaluation_twice_keeps_one_copy(tmp_path: Path) -> None:
    with ExplanationStore(tmp_path, run="r") as store:  # a directory: <dir>/xcam.sqlite
        store.write_evaluation(0, range(B), **_evaluation(0))
        store.write_evaluation(0, range(B), **_evaluation(0, scale=2.0))
        assert store.path == tmp_path / "xcam.sqlite"
        assert len(store.metrics()) == 3 * B and len(store.evaluations()) == 1 and len(store.alerts()) == 2
        assert len(store.summaries()) == 2 and store.maps("gad", 0).shape == (B, 8, 8)
        expected = (2.0 * _evaluation(0)["metrics"]["expected_gradcam"]["deletion_auc"]).double().tolist()
        assert [r["value"] for r in store.metrics(method="expected_gradcam", metric="deletion_auc")] == expected
        # A rewrite replaces the evaluation: entries it no longer has disappear.
        store.write_evaluation(0, range(B), metrics={"gad": {"deletion_auc": [0.0] * B}})
        assert len(store.metrics()) == B and store.alerts() == [] and store.drift() == []


def test_resume_continues_the_history_and_runs_are_separate(tmp_path: Path) -> None:
    path = tmp_path / "xcam.sqlite"
    with ExplanationStore(path, run="a") as store:
        store.write_config({"seed": 0})
        for epoch in (0, 1):
            store.write_evaluation(epoch, range(B), **_evaluation(epoch))
    with ExplanationStore(path, run="a") as store:
        assert store.epochs() == [0, 1] and store.config() == {"seed": 0}
        store.write_evaluation(1, range(B), **_evaluation(1))  # the resumed run repeats epoch 1
        store.write_evaluation(2, range(B), **_evaluation(2))
        assert store.epochs() == [0, 1, 2] and len(store.metrics()) == 3 * 3 * B
    with ExplanationStore(path, run="b") as other:
        other.write_evaluation(0, [0], metrics={"gad": {"x": [1.0]}})
        assert other.epochs() == [0] and len(other.metrics()) == 1
        assert other.epochs(run="a") == [0, 1, 2]
        assert [r["run"] for r in other.runs()] == ["a", "b"]
    with ExplanationStore(path, run="a") as store:  # a fit resumed from its epoch-0 checkpoint
        assert store.discard_from(1) == [1, 2] and store.discard_from(1) == []
        assert store.epochs() == [0] and len(store.metrics()) == 3 * B and store.config() == {"seed": 0}
        assert store.epochs(run="b") == [0]  # other runs are left alone


def test_a_damaged_store_is_refused_before_a_fit_writes_to_it(tmp_path: Path) -> None:
    path = tmp_path / "xcam.sqlite"
    with ExplanationStore(path) as store:
        for epoch in range(8):
            store.write_evaluation(epoch, range(B), **_evaluation(epoch))
    data = bytearray(path.read_bytes())  # closing folded the WAL into the file
    middle = len(data) // 2 // 4096 * 4096
    data[middle:middle + 4096] = bytes(range(256)) * 16  # a page overwritten: the header is intact
    path.write_bytes(bytes(data))
    with pytest.raises(StoreFormatError, match="is damaged .*quick_check.*new `store` path"):
        ExplanationStore(path)


def test_foreign_and_missing_files_raise_clear_errors(tmp_path: Path) -> None:
    foreign = tmp_path / "other.sqlite"
    conn = sqlite3.connect(str(foreign))
    conn.execute("CREATE TABLE metrics (a INTEGER)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    with pytest.raises(StoreFormatError, match="not a lightning_xcam store.*metrics"):
        ExplanationStore(foreign)
    assert foreign.read_bytes() == before  # not switched to WAL, not written

    text = tmp_path / "notes.txt"
    text.write_text("hello, not a database\n" * 10)
    with pytest.raises(StoreFormatError, match="not an SQLite file"):
        ExplanationStore(text)
    with pytest.raises(FileNotFoundError, match="create=False"):
        ExplanationStore(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()
    for name, what in (("empty.sqlite", "an empty file"), ("blank.sqlite", "an empty SQLite database")):
        blank = tmp_path / name
        blank.touch()
        if name == "blank.sqlite":
            with closing(sqlite3.connect(blank)) as conn:
                conn.execute("PRAGMA user_version = 3")  # a valid SQLite header, no table
        before = blank.read_bytes()
        with pytest.raises(StoreFormatError, match=f"is {what}, not a lightning_xcam store"):
            ExplanationStore(blank, create=False)
        assert blank.read_bytes() == before  # a reader lays out no schema

    newer = tmp_path / "newer.sqlite"
    ExplanationStore(newer).close()
    conn = sqlite3.connect(str(newer))
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreFormatError, match="version 99"):
        ExplanationStore(newer)


def test_non_finite_values_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with ExplanationStore(tmp_path / "s.sqlite") as store:
        bad_metric = _evaluation(0)
        bad_metric["metrics"]["gad"]["deletion_auc"][2] = float("nan")
        with pytest.raises(ValueError, match=r"metrics\['gad'\]\['deletion_auc'\] for sample 2 is nan"):
            store.write_evaluation(0, range(B), **bad_metric)
        cases = [
            dict(summaries={"xcam/alert": float("inf")}),
            dict(drift={"gad": {"previous": {"js": {0: float("nan")}}}}),
            dict(alerts=[{"kind": "border", "score": float("nan")}]),
            dict(maps={"gad": torch.full((B, 2, 2), 1e6)}),  # beyond float16
            dict(time_s=float("nan")),
        ]
        for kwargs in cases:
            with pytest.raises(ValueError, match="NaN|nan|inf"):
                store.write_evaluation(0, range(B), **kwargs)
        assert store.epochs() == [] and store.metrics() == [] and store.runs() == []


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="`path` must be a file or directory path, got NoneType"):
        ExplanationStore(None)  # type: ignore[arg-type]
    with ExplanationStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(ValueError, match="3 values but `sample_ids` has 4"):
            store.write_evaluation(0, range(B), metrics={"gad": {"x": [1.0, 2.0, 3.0]}})
        with pytest.raises(ValueError, match="unique"):
            store.write_evaluation(0, [0, 0], metrics={})
        with pytest.raises(ValueError, match=r"samples \[9\] that are not in `sample_ids`"):
            store.write_evaluation(0, range(B), drift={"gad": {"floor": {"tv": {9: 0.1}}}})
        with pytest.raises(ValueError, match="epoch 1 but the evaluation is epoch 0"):
            store.write_evaluation(0, range(B), alerts=[Alert(1, "border", 0.6, 0.5, None, (), "")])
        with pytest.raises(ValueError, match="repeats kind 'border'"):
            store.write_evaluation(0, range(B), alerts=[{"kind": "border", "score": 1.0}] * 2)
        with pytest.raises(ValueError, match=r"one map per sample id\)` must have shape \[4, h, w\]"):
            store.write_evaluation(0, range(B), maps={"gad": torch.rand(3, 4, 4)})
        with pytest.raises(ValueError, match="`epoch` must be >= 0"):
            store.write_evaluation(-1, range(B))
        with pytest.raises(TypeError, match="`sample_ids`"):
            store.write_evaluation(0, torch.rand(B))
        with pytest.raises(TypeError, match="`config` must be a dict"):
            store.write_config([1, 2])  # type: ignore[arg-type]
        assert store.epochs() == []


def test_find_store(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no xcam.sqlite under directory"):
        find_store(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_store(tmp_path / "nope")
    first = tmp_path / "lightning_logs" / "version_0" / "xcam.sqlite"
    ExplanationStore(first).close()
    assert find_store(tmp_path) == first and find_store(first) == first
    second = tmp_path / "lightning_logs" / "version_1" / "xcam.sqlite"
    ExplanationStore(second).close()
    with pytest.raises(ValueError, match="holds 2 stores"):
        find_store(tmp_path)
    assert find_stores(tmp_path / "lightning_logs") == [first, second]


_DYING_WRITER = r"""
import os, signal, sys
import torch
from lightning_xcam.store import ExplanationStore

class DiesInsideTheTransaction(ExplanationStore):
    def _insert(self, table, columns, rows):
        super()._insert(table, columns, rows)
        if table == "maps" and rows and rows[0][1] == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # metrics, drift and maps of epoch 3 are written, not committed

store = DiesInsideTheTransaction(sys.argv[1], run="crash")
store._conn.execute("PRAGMA cache_size = 8")  # spill uncommitted pages into the WAL before the kill
n = 64
for epoch in range(5):
    store.write_evaluation(
        epoch, range(n), step=epoch,
        metrics={"gad": {"deletion_auc": torch.full((n,), float(epoch))}},
        maps={"gad": torch.rand(n, 32, 32)},
    )
"""

_ENDLESS_WRITER = r"""
import sys
import torch
from lightning_xcam.store import ExplanationStore

store = ExplanationStore(sys.argv[1], run="crash")
store._conn.execute("PRAGMA cache_size = 8")
n = 64
for epoch in range(100000):
    store.write_evaluation(
        epoch,
        range(n),
        metrics={"gad": {m: torch.rand(n) for m in ("a", "b", "c")}},
        maps={"gad": torch.rand(n, 16, 16)},
    )
"""


def _assert_complete_or_absent(path: Path, n: int, metrics_per_sample: int) -> list[int]:
    with ExplanationStore(path, run="crash", create=False) as store:
        epochs = store.epochs()
        for table, per_epoch in (("metrics", n * metrics_per_sample), ("maps", n)):
            conn = sqlite3.connect(str(path))
            counts = dict(conn.execute(f"SELECT epoch, COUNT(*) FROM {table} GROUP BY epoch").fetchall())
            conn.close()
            assert sorted(counts) == epochs, table  # no rows of an epoch that did not complete
            assert set(counts.values()) <= {per_epoch}, table  # and complete epochs are whole
        return epochs


def test_sigkill_inside_an_evaluation_loses_only_that_evaluation(tmp_path: Path) -> None:
    path = tmp_path / "xcam.sqlite"
    proc = subprocess.run([sys.executable, "-c", _DYING_WRITER, str(path)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (tmp_path / "xcam.sqlite-wal").exists()  # the kill left a WAL behind, to be recovered
    assert _assert_complete_or_absent(path, 64, 1) == [0, 1, 2]
    with ExplanationStore(path, run="crash") as store:
        assert [r["value"] for r in store.metrics(epoch=2)] == [2.0] * 64
        assert store.maps("gad", 1).shape == (64, 32, 32)
        store.write_evaluation(3, range(2), metrics={"gad": {"deletion_auc": [3.0, 3.0]}})  # the run resumes
        assert store.epochs() == [0, 1, 2, 3]


def test_sigkill_at_an_arbitrary_moment_leaves_whole_evaluations(tmp_path: Path) -> None:
    path = tmp_path / "xcam.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _ENDLESS_WRITER, str(path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and proc.poll() is None:
                try:
                    if _count(path, "evaluations") >= 3:
                        break
                except sqlite3.OperationalError:  # schema not created yet
                    pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(_assert_complete_or_absent(path, 64, 3)) >= 3


def test_a_store_on_a_read_only_file_system_is_read_and_refuses_writes(tmp_path: Path) -> None:
    source, mounted = tmp_path / "source", tmp_path / "mounted"
    source.mkdir()
    mounted.mkdir()
    with ExplanationStore(source / "xcam.sqlite", run="r") as store:
        store.write_evaluation(0, [0, 1], metrics={"gradcam": {"deletion_auc": torch.tensor([0.2, 0.3])}})
    mount = subprocess.run(["mount", "--bind", str(source), str(mounted)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("needs `mount --bind` (root in a container that allows it) to make a read-only file system")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(mounted)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        with pytest.raises(sqlite3.OperationalError, match="for writing"):
            ExplanationStore(mounted / "xcam.sqlite", run="r")
        with ExplanationStore(mounted / "xcam.sqlite", run="r", create=False) as store:
            assert store.read_only
            assert [row["value"] for row in store.metrics()] == pytest.approx([0.2, 0.3])
            with pytest.raises(PermissionError, match="read-only"):
                store.write_config({"num_probe": 2})
    finally:
        subprocess.run(["umount", str(mounted)], capture_output=True)


def test_a_file_without_write_permission_is_refused_at_open_not_at_the_first_write(
    tmp_path: Path, without_write_permission: Callable[[], None]
) -> None:
    with ExplanationStore(tmp_path / "xcam.sqlite", run="r") as store:
        store.write_evaluation(0, [0, 1], metrics={"gradcam": {"deletion_auc": torch.tensor([0.2, 0.3])}})
    without_write_permission()
    with pytest.raises(sqlite3.OperationalError, match="for writing.*readonly database.*writable `store` path"):
        ExplanationStore(tmp_path / "xcam.sqlite", run="r")
    with ExplanationStore(tmp_path / "xcam.sqlite", run="r", create=False) as store:  # a reader writes nothing
        assert [row["value"] for row in store.metrics()] == pytest.approx([0.2, 0.3])


def test_a_reader_refuses_every_write_and_leaves_the_file_as_found(tmp_path: Path) -> None:
    path = tmp_path / "version_0" / "xcam.sqlite"
    with ExplanationStore(path, run="r") as store:
        store.write_evaluation(0, [0, 1], metrics={"gradcam": {"deletion_auc": torch.tensor([0.2, 0.3])}})
    before = path.read_bytes()
    with ExplanationStore(path, run="r", create=False) as store:
        for write in (lambda: store.write_config({"num_probe": 2}), lambda: store.discard_from(0),
                      lambda: store.write_evaluation(1, [0, 1])):
            with pytest.raises(PermissionError, match="create=False, as a reader.*create=True to write"):
                write()
        assert store.epochs() == [0]
    assert path.read_bytes() == before


def test_a_reader_given_a_log_root_names_the_stores_below_it(tmp_path: Path) -> None:
    for version in ("version_0", "version_1"):
        ExplanationStore(tmp_path / version / "xcam.sqlite").close()
    with pytest.raises(FileNotFoundError, match=r"holds version_0/xcam.sqlite, version_1/xcam.sqlite below it"):
        ExplanationStore(tmp_path, create=False)
    with pytest.raises(FileNotFoundError, match=r"create=False\)\.$"):
        ExplanationStore(tmp_path / "version_0" / "other.sqlite", create=False)
