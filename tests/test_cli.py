"""The ``lightning-xcam`` command on a store from a real short fit and on hand-written stores and bad paths."""

from __future__ import annotations

import base64
import csv
import hashlib
import re
import sqlite3
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xcam import ExplanationMonitor
from lightning_xcam.callback import METRICS
from lightning_xcam.alerts import Alert
from lightning_xcam.cli import main
from lightning_xcam.demos import DigitsClassifier, DigitsDataModule
from lightning_xcam.maps import degenerate, unit_mass
from lightning_xcam.render import colormap, scale_maps
from lightning_xcam.render import DISPLAY_CONCENTRATION
from lightning_xcam.report import MAIN_COLUMNS, line_chart
from lightning_xcam.store import ExplanationStore

FAST = dict(methods=("expected_gradcam",), metrics=METRICS, num_probe=6, n_samples=3, num_references=8, num_fit=48, floor_size=6,
            steps=4, n_perturb=3, log_images=2, sensitivity_every=1, max_overhead=None)  # every metric every epoch
METHOD = "expected_gradcam"
ERROR = "lightning-xcam: error: "
BORDER = Alert(1, "border", 0.4125, 0.2, 7, (3, 9), "epoch 1: class 7 puts 41% of its mass on the border")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log directory of a real 3-epoch fit on digits with the monitor (its store at version_0/xcam.sqlite)."""
    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    trainer = pl.Trainer(
        default_root_dir=root, max_epochs=3, limit_val_batches=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(root, name="", version=0),
        callbacks=[ExplanationMonitor(target_layer="net.features", **FAST)],
    )
    trainer.fit(DigitsClassifier(width=8), datamodule=DigitsDataModule(size=16, num_train=192, batch_size=32))
    assert (root / "version_0" / "xcam.sqlite").is_file()
    return root


@pytest.fixture(scope="module")
def alert_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-written store: two methods, two epochs, one alert at epoch 1 about probe items 3 and 9."""
    path = tmp_path_factory.mktemp("alerts") / "xcam.sqlite"
    maps = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with ExplanationStore(path, run="shortcut") as store:
        store.write_config({"num_probe": 3, "methods": ["gradcam", "gad"]})
        for epoch in (0, 1):
            store.write_evaluation(
                epoch, [3, 7, 9], step=10 * (epoch + 1),
                metrics={"gradcam": {"insertion_auc": [0.5, 0.6, 0.7]}},
                summaries={"xcam/gradcam/insertion_auc": 0.6 + epoch, "xcam/gad/deletion_auc": 0.125 * (epoch + 1),
                           "xcam/alert": float(epoch)},
                maps={"gradcam": maps[epoch]},
                alerts=[BORDER, Alert(1, "intervention", 5.5, 2.5, None, (), "epoch 1: overall relies on a tiny region")] if epoch else [],
            )
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def method_table(out: str, method: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of one method's block of the printed report."""
    lines = out.splitlines()
    start = lines.index(f"[{method}]")
    end = lines.index("", start)
    header, *rows = (line.split() for line in lines[start + 1:end])
    return header, rows


def decode_png(data: bytes) -> torch.Tensor:
    """Decode the 8-bit RGB, filter-0 PNGs that render.to_png writes, as uint8 [3, H, W]."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, shape = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 2)
            shape = (height, width)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = torch.tensor(list(zlib.decompress(idat)), dtype=torch.uint8).view(shape[0], 1 + 3 * shape[1])
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(shape[0], shape[1], 3).permute(2, 0, 1)


def page_image(page: str, alt: str) -> torch.Tensor:
    match = re.search(rf'alt="{re.escape(alt)}"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match, f"no image with alt {alt!r}"
    return decode_png(base64.b64decode(match.group(1)))


def expected_image(store_map: torch.Tensor) -> torch.Tensor:
    concentration = unit_mass(store_map[None]) * store_map.numel()
    rgb = colormap(scale_maps(concentration, DISPLAY_CONCENTRATION))[0]
    return (rgb * 255).round().to(torch.uint8)


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (code, err)
    assert out == ""
    assert err.startswith(ERROR) and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


# --------------------------------------------------------------------------------------------------
# A real fit


def test_table_has_one_row_per_epoch_with_the_stored_numbers(fitted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "report", fitted)
    assert code == 0 and err == ""
    header, rows = method_table(out, METHOD)
    assert header == ["epoch", "step", *MAIN_COLUMNS, "alerts"]  # all recorded: every metric, sensitivity_every=1
    with ExplanationStore(fitted / "version_0" / "xcam.sqlite", create=False) as store:
        table = store.summary_table("default")
        per_item = store.metrics(method=METHOD, metric="insertion_auc")
    assert [int(r[0]) for r in rows] == [0, 1, 2] == [t["epoch"] for t in table]
    for row, stored in zip(rows, table):
        assert int(row[1]) == stored["step"]
        for name, cell in zip(MAIN_COLUMNS, row[2:]):
            value = stored[f"xcam/{METHOD}/{name}"]
            if value is None:
                assert cell == "-" and name.startswith("drift") and stored["epoch"] == 0
            else:
                assert float(cell) == pytest.approx(value, rel=5.1e-4), (name, stored["epoch"])
        assert row[-1] == "0"
        # the table's insertion AUC is the mean over the probe items the store holds per item, those with a
        # degenerate map left out
        with ExplanationStore(fitted / "version_0" / "xcam.sqlite", create=False) as store:
            empty = degenerate(store.maps(METHOD, stored["epoch"])).tolist()
        assert sum(empty) == stored[f"xcam/{METHOD}/degenerate"] < 6
        items = sorted((r["sample"], r["value"]) for r in per_item if r["epoch"] == stored["epoch"])
        kept = [value for (_, value), bad in zip(items, empty) if not bad]
        assert len(items) == 6
        assert float(row[2]) == pytest.approx(sum(kept) / len(kept), rel=5.1e-4)
    assert "Alerts: none." in out


def test_csv_round_trips_every_summary(fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_csv = tmp_path / "report.csv"
    code, out, _ = run_cli(capsys, "report", fitted / "version_0" / "xcam.sqlite", "--csv", out_csv)
    assert code == 0 and f"wrote {out_csv}" in out
    with out_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with ExplanationStore(fitted / "version_0" / "xcam.sqlite", create=False) as store:
        table = store.summary_table("default")
    assert len(rows) == len(table) == 3
    for row, stored in zip(rows, table):
        assert (row["run"], row["method"], int(row["epoch"]), int(row["step"])) == (
            "default", METHOD, stored["epoch"], stored["step"])
        tags = [t for t in stored if t not in ("epoch", "step")]
        assert len(row) == 4 + len(tags)  # one column per summary, nothing lost or invented
        for tag in tags:
            column = tag.split("/", 2)[-1] if tag.count("/") == 2 else tag.removeprefix("xcam/")
            expected = stored[tag]
            assert row[column] == ("" if expected is None else repr(expected))  # exact, not rounded
            if expected is not None:
                assert float(row[column]) == expected


def test_html_is_self_contained_with_charts_heatmaps_and_epochs(fitted: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out_html = tmp_path / "report.html"
    code, out, _ = run_cli(capsys, "report", fitted, "--html", out_html)
    assert code == 0 and f"wrote {out_html}" in out
    page = out_html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") >= 10  # 5 metric charts + 6 drift charts
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for link in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert link.startswith(("data:image/png;base64,", "#")), link
    with ExplanationStore(fitted / "version_0" / "xcam.sqlite", create=False) as store:
        probe = store.config("default")["probe_ids"]
        stored = {e: store.maps(METHOD, e, samples=probe) for e in (0, 1, 2)}
    # a heatmap grid: one image per epoch x probe item, drawing exactly the stored map
    assert page.count("data:image/png;base64,") == 1 + 3 * len(probe)  # + the colour bar
    for epoch in (0, 1, 2):
        assert re.search(rf'<th class="row">{epoch}</th>', page)
        for i, sample in enumerate(probe):
            label = f"{METHOD} epoch {epoch} probe {sample}"
            if not bool(stored[epoch][i].max() > 0):
                label += " (degenerate: all zero)"
            image = page_image(page, label)
            assert image.shape == (3, 16, 16)
            assert (image.int() - expected_image(stored[epoch][i]).int()).abs().max() <= 1
    assert "probe_ids" in page and "noise_std" in page  # the configuration


def test_report_only_reads_the_store(fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = fitted / "version_0"
    before = sorted(p.name for p in folder.iterdir())
    digest = hashlib.sha256((folder / "xcam.sqlite").read_bytes()).hexdigest()
    code, _, _ = run_cli(capsys, "report", folder, "--html", tmp_path / "r.html", "--csv", tmp_path / "r.csv")
    assert code == 0
    assert hashlib.sha256((folder / "xcam.sqlite").read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in folder.iterdir()) == before


def test_console_script(fitted: Path, tmp_path: Path) -> None:
    # the installed entry point (pyproject's [project.scripts]); `python -m lightning_xcam.cli` if not installed
    script = Path(sys.executable).parent / "lightning-xcam"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_xcam.cli"]
    done = subprocess.run([*command, "report", str(fitted), "--csv", str(tmp_path / "r.csv")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"[{METHOD}]" in done.stdout and done.stdout.endswith(f"wrote {tmp_path / 'r.csv'}\n")
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + 3


# --------------------------------------------------------------------------------------------------
# Alerts, several methods, several runs


def test_alerts_are_printed_with_their_numbers(alert_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "report", alert_store)
    assert code == 0
    assert "alerts: 2" in out.splitlines()[1]
    lines = out.splitlines()
    start = lines.index("Alerts (2):")
    assert lines[start + 1].split()[:5] == ["epoch", "kind", "class", "score", "/"]
    border, tiny = lines[start + 2], lines[start + 3]
    assert border.split()[:6] == ["1", "border", "7", "0.4125", "/", "0.2"]
    assert "3, 9" in border and border.endswith("epoch 1: class 7 puts 41% of its mass on the border")
    assert tiny.split()[:6] == ["1", "intervention", "all", "5.5", "/", "2.5"]
    assert tiny.endswith("epoch 1: overall relies on a tiny region")
    # one block per method; gad has summaries only, so the columns it lacks read "-"
    header, rows = method_table(out, "gad")
    assert header == ["epoch", "step", "insertion_auc", "deletion_auc", "alerts"]
    assert rows == [["0", "10", "-", "0.125", "0"], ["1", "20", "-", "0.25", "2"]]
    assert method_table(out, "gradcam")[1] == [["0", "10", "0.6", "-", "0"], ["1", "20", "1.6", "-", "2"]]


def test_html_shows_alert_evidence_maps(alert_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_csv, out_html = tmp_path / "a.csv", tmp_path / "a.html"
    assert run_cli(capsys, "report", alert_store, "--html", out_html, "--csv", out_csv)[0] == 0
    page = out_html.read_text(encoding="utf-8")
    assert "epoch 1: class 7 puts 41% of its mass on the border" in page
    assert "score <b>0.4125</b> / threshold 0.2" in page
    evidence = page[page.index('id="alerts"'):page.index('id="heatmaps"')]
    with ExplanationStore(alert_store, create=False) as store:
        flagged = store.maps("gradcam", 1, run="shortcut", samples=[3, 9])
    for sample, stored in zip((3, 9), flagged):
        shown = page_image(evidence, f"gradcam epoch 1 probe {sample}")
        assert (shown.int() - expected_image(stored).int()).abs().max() <= 1
    assert "gradcam epoch 1 probe 7" not in evidence  # only the flagged items
    assert evidence.count('class="mark"') == 0 and page.count('class="mark"') >= 1  # alert epochs on the charts
    with out_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["epoch"], r["method"], r["insertion_auc"], r["deletion_auc"], r["alert"]) for r in rows] == [
        ("0", "gad", "", "0.125", "0.0"), ("0", "gradcam", "0.6", "", "0.0"),
        ("1", "gad", "", "0.25", "1.0"), ("1", "gradcam", "1.6", "", "1.0"),
    ]


def test_store_with_several_runs_needs_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "shared.sqlite"
    for name, value in (("version_0", 0.25), ("version_1", 0.75)):
        with ExplanationStore(path, run=name) as store:
            store.write_evaluation(0, [0], summaries={"xcam/gradcam/deletion_auc": value})
    assert_one_line_error(*run_cli(capsys, "report", path), "holds 2 runs (version_0, version_1)", "--run")
    assert_one_line_error(*run_cli(capsys, "report", path, "--run", "version_7"),
                          "run 'version_7' is not in", "version_0, version_1")
    code, out, _ = run_cli(capsys, "report", path, "--run", "version_1")
    assert code == 0 and "run: version_1" in out
    assert method_table(out, "gradcam")[1] == [["0", "-", "0.75", "0"]]


def test_run_without_evaluations_reports_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ExplanationStore(tmp_path / "xcam.sqlite", run="fresh") as store:
        store.write_config({"num_probe": 4})
    code, out, _ = run_cli(capsys, "report", tmp_path, "--html", tmp_path / "r.html")
    assert code == 0 and "No completed evaluation in this run yet." in out
    assert "num_probe" in (tmp_path / "r.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Bad input


def _foreign_db(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.close()


def _blank_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 3")  # a valid SQLite file with no table
    conn.close()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: None, "no such file or directory"),
        (lambda p: p.mkdir(), "no xcam.sqlite under directory"),
        (lambda p: p.write_text("epoch,loss\n0,1.0\n"), "is not an SQLite file"),
        (lambda p: p.write_bytes(b""), "is an empty file"),
        (_foreign_db, "is an SQLite database but not a lightning_xcam store (tables: users)"),
        (_blank_db, "is an empty SQLite database"),
    ],
    ids=["missing", "empty-dir", "text-file", "empty-file", "foreign-sqlite", "blank-sqlite"],
)
def test_bad_paths_get_one_line_and_exit_2(
    make: Callable[[Path], object], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target"
    make(target)
    before = target.read_bytes() if target.is_file() else None
    assert_one_line_error(*run_cli(capsys, "report", target), needle, str(target))
    if before is not None:
        assert target.read_bytes() == before  # never turned into a store
    assert sorted(p.name for p in tmp_path.iterdir()) == (["target"] if target.exists() else [])


def test_directory_with_several_stores_lists_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for version in ("version_0", "version_1"):
        ExplanationStore(tmp_path / version / "xcam.sqlite").close()
    assert_one_line_error(*run_cli(capsys, "report", tmp_path), "holds 2 stores",
                          "version_0/xcam.sqlite, version_1/xcam.sqlite", "pass one of them")


def test_unwritable_output_exits_1(alert_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    code, _, err = run_cli(capsys, "report", alert_store, "--csv", tmp_path / "a_file" / "r.csv")
    assert code == 1 and err.startswith(ERROR + "cannot write the --csv file") and err.count("\n") == 1
    assert err.rstrip().endswith("Not a directory.")


def test_output_folders_are_created(alert_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page, table = tmp_path / "new" / "deeper" / "r.html", tmp_path / "other" / "r.csv"
    code, out, _ = run_cli(capsys, "report", alert_store, "--html", page, "--csv", table)
    assert code == 0 and page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>") and table.stat().st_size > 0
    assert f"wrote {page}" in out


def test_help_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "report" in out
    code, out, _ = run_cli(capsys, "report", "--help")
    assert code == 0 and all(option in out for option in ("RUN", "--run", "--html", "--csv", "--cmap"))
    code, _, err = run_cli(capsys)
    assert code == 2 and "usage: lightning-xcam" in err
    code, _, err = run_cli(capsys, "report")
    assert code == 2 and "the following arguments are required: RUN" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# The SVG chart


@pytest.mark.parametrize("scale", [1.0, 1e-16])  # float noise (drift of unchanged maps) is a range too
def test_line_chart_places_points_linearly_and_breaks_at_gaps(scale: float) -> None:
    svg = line_chart("t", {"a": [(0, 0.0), (1, scale), (2, 2 * scale)]}, {"a": "#000"})
    points = [(float(x), float(y)) for x, y in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg)]
    assert len(points) == 3
    (x0, y0), (x1, y1), (x2, y2) = points
    assert x2 - x1 == pytest.approx(x1 - x0) and x1 > x0
    assert y0 - y1 == pytest.approx(y1 - y2) and y1 < y0  # larger values drawn higher
    if scale != 1.0:
        return
    assert "<title>a, epoch 1: 1</title>" in svg
    gap = line_chart("t", {"a": [(0, 1.0), (1, None), (2, 3.0)]}, {"a": "#000"})
    assert gap.count("<circle") == 2 and "<polyline" not in gap
    assert "no data" in line_chart("t", {"a": [(0, None)]}, {"a": "#000"})
