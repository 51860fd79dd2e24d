"""Look at the monitor's TensorBoard pages as a person would: headless Chromium screenshots, checked.

    python examples/tensorboard_check.py                        # quick demo fit into a temp dir, then check
    python examples/tensorboard_check.py --logdir runs/digits --out /tmp/xcam_shots

Starts TensorBoard on a free local port, opens SCALARS (filtered to the headline curves), CUSTOM SCALARS,
IMAGES, TEXT and an overview (IMAGES filtered to two probe items: the README picture) in headless Chromium
(Debian's ``chromium`` package), saves one PNG per page in ``--out``,
and checks each: the picture has the window's size and is not blank (pixel spread in the page's content
area); TensorBoard serves what the page should show (the xcam scalars, the layout, the heatmap panels,
the alerts); the IMAGES page shows colour (heatmaps) and the TEXT page shows text. Open the PNGs to see
what a person sees. TEXT is checked only when the run logged alerts.

Exit status: 0 every check passed; 1 a check failed or TensorBoard did not serve the run; 2 no browser
or a bad argument.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import torch
from PIL import Image

from lightning_xcam.tensorboard import custom_scalar_layout, scalars_url

WINDOW = (1400, 1000)
OVERVIEW_WINDOW = (1100, 740)  # the README picture: two probe items, every method
# TensorBoard's header bar and settings sidebar; the content area starts below and to the right of them.
CONTENT_TOP, CONTENT_LEFT = 70, 360
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DEMO_METHODS = ("expected_gradcam", "gradcam")


@dataclass
class Page:
    """One page to photograph: its name, its address, the plugin whose data it shows, the window size."""

    name: str
    url: str
    plugin: str
    window: tuple[int, int] = WINDOW


@dataclass
class Result:
    """The outcome of one page's checks."""

    page: str
    path: Path
    ok: bool
    notes: list[str]


def find_browser() -> str | None:
    """The first headless-capable Chromium on ``PATH``, or ``None``."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def demo_fit(root: Path, quick: bool = True) -> Path:
    """Train the digits demo with the monitor attached and return the run's log directory.

    Args:
        root: Where the TensorBoardLogger writes (the run goes to ``root/version_0``).
        quick: A few seconds' fit with small monitor settings (for tests) instead of the README demo's.

    Returns:
        The run's log directory.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_xcam import ExplanationMonitor
    from lightning_xcam.demos import DigitsClassifier, DigitsDataModule

    pl.seed_everything(0)
    data = DigitsDataModule()
    logger = TensorBoardLogger(str(root), name="", version=0)
    settings = (dict(num_probe=8, n_samples=2, steps=4, n_perturb=2, num_references=8, floor_size=4,
                     metrics=("insertion", "deletion", "infidelity"), log_images=4)
                if quick else dict(num_probe=16, n_samples=8))
    # every scalar at every epoch for the screenshots (these epochs are far too short for the 2 % budget)
    monitor = ExplanationMonitor(target_layer="net.features", methods=DEMO_METHODS, max_overhead=None, **settings)
    limits = dict(limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=0) if quick else {}
    trainer = pl.Trainer(
        max_epochs=2 if quick else 6, accelerator="cpu", logger=logger, callbacks=[monitor], log_every_n_steps=1,
        enable_model_summary=False, enable_progress_bar=False, enable_checkpointing=False, **limits,
    )
    trainer.fit(DigitsClassifier(), datamodule=data)
    return Path(logger.log_dir)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def serve(logdir: Path, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``logdir`` with TensorBoard on a free loopback port until the block ends; yield its address.

    Waits until the xcam scalars are loaded (TensorBoard reads event files in the background), and stops
    the server it started, and only that one, on exit.

    Raises:
        RuntimeError: If TensorBoard exits or has not loaded the run's xcam scalars within ``timeout``.
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
               "--host", "127.0.0.1", "--reload_interval", "1"]
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"TensorBoard exited with {server.returncode}: {log.read().decode()[-2000:]}")
            with contextlib.suppress(OSError, ValueError):
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
                if any("xcam/alert" in run_tags for run_tags in tags.values()):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"TensorBoard did not serve xcam scalars from {logdir} within {timeout:.0f} s.")
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def screenshot(browser: str, url: str, out: Path, profile: Path, window: tuple[int, int] = WINDOW) -> None:
    """Save ``url`` as rendered by headless Chromium in a ``window``-sized (width, height) window."""
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}",
        f"--window-size={window[0]},{window[1]}", "--virtual-time-budget=15000", f"--screenshot={out}", url,
    ]
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False)


def pixel_notes(path: Path, page: str, window: tuple[int, int] = WINDOW) -> list[str]:
    """What is wrong with a screenshot's pixels (empty list: nothing found).

    Blank: the content area (below the header, right of the sidebar) has almost no spread of grey levels,
    as when a page shows only its frame. IMAGES must show the heatmaps' colour; TEXT must show dark text.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return ["no screenshot was written"]
    with Image.open(path) as picture:
        rgb = picture.convert("RGB")
    if rgb.size != window:
        return [f"size {rgb.size}, expected {window} (width, height)"]
    image = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(window[1], window[0], 3)
    content = image[CONTENT_TOP:, CONTENT_LEFT:].permute(2, 0, 1).float() / 255
    notes = []
    spread = float(content.mean(0).std())
    if spread < 0.05:
        notes.append(f"content area is blank (grey-level std {spread:.3f} < 0.05)")
    colourful = float((content.amax(0) - content.amin(0) > 0.35).float().mean())
    dark = float((content.amax(0) < 0.35).float().mean())
    if page in ("images", "overview") and colourful < 0.02:
        notes.append(f"no heatmap colour ({colourful:.1%} saturated pixels < 2%)")
    if page == "text" and dark < 0.002:
        notes.append(f"no text ({dark:.2%} dark pixels < 0.2%)")
    return notes


def served_notes(base: str, page: Page, methods: Sequence[str]) -> list[str]:
    """What TensorBoard does not serve that the page should show (empty list: all there)."""
    listing = _get_json(f"{base}/data/plugins_listing")
    if not listing.get(page.plugin, {}).get("enabled", False):
        return [f"TensorBoard reports no {page.plugin} data"]
    if page.plugin == "custom_scalars":
        served = json.dumps(_get_json(f"{base}/data/plugin/custom_scalars/layout"))
        titles = [c.title for c in custom_scalar_layout(methods).category]
        return [f"layout category {t!r} not served" for t in titles if json.dumps(t)[1:-1] not in served]
    tags = _get_json(f"{base}/data/plugin/{page.plugin}/tags")
    prefix = {"scalars": "xcam/", "images": "xcam_images/", "text": "xcam_alerts/"}[page.plugin]
    found = any(str(tag).startswith(prefix) for run in tags.values() for tag in run)
    return [] if found else [f"no {prefix}* tags served"]


def served_methods(base: str) -> list[str]:
    """The monitor's methods, read from the scalar tags ``xcam/<method>/<name>`` TensorBoard serves."""
    tags = _get_json(f"{base}/data/plugin/scalars/tags")
    names = {tag for run in tags.values() for tag in run}
    return sorted({tag.split("/")[1] for tag in names if tag.startswith("xcam/") and tag.count("/") == 2})


def overview_filter(base: str) -> str:
    """An IMAGES tag filter showing the first two logged probe items, one row of panels per method."""
    tags = _get_json(f"{base}/data/plugin/images/tags")
    items = sorted({str(tag).rsplit("/", 1)[1] for run in tags.values() for tag in run
                    if str(tag).startswith("xcam_images/")})[:2]
    return quote(f"/({'|'.join(items)})$", safe="")


def check(logdir: Path, out: Path, browser: str) -> list[Result]:
    """Photograph and check every page of ``logdir``'s TensorBoard; the PNGs go to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with serve(logdir) as base, tempfile.TemporaryDirectory() as profile:
        methods = served_methods(base)
        pages = [
            Page("scalars", scalars_url(methods, base), "scalars"),
            Page("custom_scalars", f"{base}/#custom_scalars&_smoothingWeight=0", "custom_scalars"),
            Page("images", f"{base}/#images", "images"),
            Page("text", f"{base}/#text", "text"),
            Page("overview", f"{base}/#images&tagFilter={overview_filter(base)}", "images", OVERVIEW_WINDOW),
        ]
        for page in pages:
            path = out / f"{page.name}.png"
            path.unlink(missing_ok=True)
            served = served_notes(base, page, methods)
            if page.name == "text" and served:
                results.append(Result(page.name, path, True, ["skipped: the run logged no alerts"]))
                continue
            screenshot(browser, page.url, path, Path(profile), page.window)
            notes = served + pixel_notes(path, page.name, page.window)
            results.append(Result(page.name, path, not notes, notes))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; return the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, help="log directory to view (default: a quick demo fit in a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("tensorboard_check"), help="where the PNGs go")
    parser.add_argument("--rundir", type=Path, help="where the demo fit writes (default: a temp dir, removed after)")
    parser.add_argument("--full", action="store_true", help="demo with the README's monitor settings (slower)")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"no browser found (looked for {', '.join(BROWSERS)}); on Debian: apt-get install chromium",
              file=sys.stderr)
        return 2
    if args.logdir is not None and not args.logdir.is_dir():
        print(f"--logdir {args.logdir} is not a directory", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        logdir = args.logdir or demo_fit(args.rundir or Path(tmp), quick=not args.full)
        try:
            results = check(logdir, args.out, browser)
        except RuntimeError as err:
            print(f"FAIL: {err}", file=sys.stderr)
            return 1
    for result in results:
        status = "ok  " if result.ok else "FAIL"
        print(f"{status} {result.page:15s} {result.path}" + "".join(f"\n     {note}" for note in result.notes))
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
