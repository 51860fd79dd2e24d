"""The TensorBoard layout and the browser check of what TensorBoard shows (examples/tensorboard_check.py)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from lightning_xcam.tensorboard import custom_scalar_layout, scalars_url, write_layout

METHODS = ["expected_gradcam", "gradcam"]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tensorboard_check.py"


def _load_check():
    spec = importlib.util.spec_from_file_location("tensorboard_check", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tensorboard_check", module)
    spec.loader.exec_module(module)
    return module


check = _load_check()


def _charts(layout: layout_pb2.Layout) -> list[tuple[str, str, list[str]]]:
    return [(c.title, chart.title, list(chart.multiline.tag)) for c in layout.category for chart in c.chart]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-epoch fit of the digits demo with the monitor (Expected Grad-CAM and Grad-CAM)."""
    return check.demo_fit(tmp_path_factory.mktemp("tb"), quick=True)


@pytest.fixture(scope="module")
def real_tags(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_layout_without_noise_floors_charts_rank_drift_for_every_method() -> None:
    # floor_size=0: no stochastic method logs drift_floor_units, so no chart may wait for it
    drift = [(title, tags[0]) for _, title, tags in _charts(custom_scalar_layout(METHODS, floors=False))
             if "drift" in title]
    assert len(drift) == 2 * len(METHODS)
    for title, tag in drift:
        method = title.split(":")[0]
        assert tag.startswith(f"xcam/{method}/drift_spearman") and "1 − ρ" in title
    assert "drift_floor_units" not in scalars_url(METHODS, floors=False)


def test_layout_categories_charts_and_tags() -> None:
    charts = _charts(custom_scalar_layout(METHODS))
    tags = [(category, chart_tags) for category, _, chart_tags in charts]
    assert tags == [
        ("xcam: at a glance", ["xcam/alert$"]),
        ("xcam: at a glance", ["xcam/expected_gradcam/insertion_minus_deletion$"]),
        ("xcam: at a glance", ["xcam/expected_gradcam/drift_floor_units$"]),
        ("xcam: at a glance", ["xcam/gradcam/insertion_minus_deletion$"]),
        ("xcam: at a glance", ["xcam/gradcam/drift_spearman$"]),  # deterministic: no noise floor
        ("xcam: expected_gradcam", ["xcam/expected_gradcam/insertion_auc$"]),
        ("xcam: expected_gradcam", ["xcam/expected_gradcam/deletion_auc$"]),
        ("xcam: expected_gradcam", ["xcam/expected_gradcam/infidelity$"]),
        ("xcam: expected_gradcam", ["xcam/expected_gradcam/drift_floor_units_first$"]),
        ("xcam: gradcam", ["xcam/gradcam/insertion_auc$"]),
        ("xcam: gradcam", ["xcam/gradcam/deletion_auc$"]),
        ("xcam: gradcam", ["xcam/gradcam/infidelity$"]),
        ("xcam: gradcam", ["xcam/gradcam/drift_spearman_first$"]),
    ]
    titles = [title for _, title, _ in charts]
    assert titles[0].startswith("shortcut alert")
    assert titles[1] == "expected_gradcam: insertion − deletion (higher = more faithful)"
    assert "noise-floor units" in titles[2] and "1 − ρ" in titles[4]
    assert [t.split(":")[0] for t in titles[5:]] == ["expected_gradcam"] * 4 + ["gradcam"] * 4


def test_layout_charts_only_the_metrics_computed() -> None:
    def tags(**kwargs: object) -> list[str]:
        return [chart_tags[0] for _, _, chart_tags in _charts(custom_scalar_layout(["gradcam"], **kwargs))]

    assert tags() == tags(metrics=("insertion", "deletion", "infidelity", "max_sensitivity"))
    assert tags(metrics=("insertion", "deletion")) == [
        "xcam/alert$", "xcam/gradcam/insertion_minus_deletion$", "xcam/gradcam/drift_spearman$",
        "xcam/gradcam/insertion_auc$", "xcam/gradcam/deletion_auc$", "xcam/gradcam/drift_spearman_first$",
    ]
    assert tags(metrics=("deletion",)) == [  # insertion − deletion needs both
        "xcam/alert$", "xcam/gradcam/drift_spearman$", "xcam/gradcam/deletion_auc$",
        "xcam/gradcam/drift_spearman_first$",
    ]
    with pytest.raises(TypeError, match="`metrics` must be a sequence of metric names"):
        custom_scalar_layout(["gradcam"], metrics="insertion")


def test_every_chart_matches_exactly_one_logged_tag(real_tags: set[str]) -> None:
    assert "xcam/alert" in real_tags and "xcam/expected_gradcam/drift_floor_units_first" in real_tags
    for category, title, (regex,) in _charts(custom_scalar_layout(METHODS)):
        matches = [tag for tag in real_tags if re.match(regex, tag)]  # TensorBoard's own matching
        assert len(matches) == 1, (category, title, matches)


def test_shortcut_category_charts_the_signals_of_the_checked_method(real_tags: set[str]) -> None:
    layout = custom_scalar_layout(METHODS, shortcuts="expected_gradcam")
    assert layout.category[:-1] == custom_scalar_layout(METHODS).category  # added last, nothing else moves
    charts = [(title, regex) for category, title, (regex,) in _charts(layout) if category == "xcam: shortcut signals"]
    assert [regex for _, regex in charts] == [
        "xcam/expected_gradcam/tiny_region_z$", "xcam/expected_gradcam/tiny_region_transplant_z$",
        "xcam/expected_gradcam/border_mass$",
    ]
    for title, regex in charts:
        assert len([tag for tag in real_tags if re.match(regex, tag)]) == 1, title
    with pytest.raises(ValueError, match=r"`shortcuts` must be one of the methods.*'gad'"):
        custom_scalar_layout(METHODS, shortcuts="gad")


def test_scalars_url_filters_the_glance_tags(real_tags: set[str]) -> None:
    url = scalars_url(METHODS, "http://127.0.0.1:6006/")
    head, _, regex = url.partition("&tagFilter=")
    assert head == "http://127.0.0.1:6006/#scalars&_smoothingWeight=0"
    shown = sorted(tag for tag in real_tags if re.search(unquote(regex), tag))
    assert shown == sorted([
        "xcam/alert", "xcam/expected_gradcam/insertion_minus_deletion", "xcam/expected_gradcam/drift_floor_units",
        "xcam/gradcam/insertion_minus_deletion", "xcam/gradcam/drift_spearman",
    ])


def test_written_layout_reads_back_from_the_event_file(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    write_layout(writer, METHODS)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert list(events.PluginTagToContent("custom_scalars")) == ["custom_scalars__config__"]
    (event,) = events.Tensors("custom_scalars__config__")
    assert layout_pb2.Layout.FromString(event.tensor_proto.string_val[0]) == custom_scalar_layout(METHODS)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="methods"):
        custom_scalar_layout("gradcam")
    with pytest.raises(TypeError, match="strings"):
        custom_scalar_layout(["gradcam", 3])
    with pytest.raises(ValueError, match="distinct"):
        custom_scalar_layout(["gradcam", "gradcam"])
    with pytest.raises(ValueError, match="non-empty"):
        custom_scalar_layout([])
    with pytest.raises(TypeError, match="add_custom_scalars"):
        write_layout(object(), METHODS)
    with pytest.raises(TypeError, match="base"):
        scalars_url(METHODS, base=6006)


def test_pixel_check_flags_blank_and_colourless_pages(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", check.WINDOW, "white").save(blank)
    assert any("blank" in note for note in check.pixel_notes(blank, "scalars"))
    text_like = Image.new("RGB", check.WINDOW, "white")
    for y in range(200, 800, 20):  # dark lines: text, but no heatmap colour
        text_like.paste((0, 0, 0), (400, y, 1300, y + 1))
    page = tmp_path / "text.png"
    text_like.save(page)
    assert check.pixel_notes(page, "text") == []
    assert any("colour" in note for note in check.pixel_notes(page, "images"))
    heat = text_like.copy()
    heat.paste((230, 60, 20), (400, 100, 700, 300))  # a saturated block, as a heatmap panel
    heat.save(page)
    assert check.pixel_notes(page, "images") == []
    small = tmp_path / "small.png"
    Image.new("RGB", (10, 10), "white").save(small)
    assert "size" in check.pixel_notes(small, "images")[0]
    assert check.pixel_notes(tmp_path / "missing.png", "images") == ["no screenshot was written"]


@pytest.mark.skipif(check.find_browser() is None, reason="no chromium / chromium-browser binary on PATH")
def test_browser_screenshots_of_a_real_run(run_dir: Path, tmp_path: Path) -> None:
    # The quick fit raises no alert; one alert-shaped text makes the TEXT page part of the check.
    writer = SummaryWriter(str(run_dir))
    writer.add_text("xcam_alerts/border", "**epoch 1: a test alert**\n\n| kind | score |\n|---|---|\n| border | 0.4 |", 1)
    writer.close()
    assert check.main(["--logdir", str(run_dir), "--out", str(tmp_path)]) == 0
    for page in ("scalars", "custom_scalars", "images", "text", "overview"):
        assert (tmp_path / f"{page}.png").stat().st_size > 10_000
