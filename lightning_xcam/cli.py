"""The ``lightning-xcam`` command: read what :class:`~lightning_xcam.ExplanationMonitor` stored during a fit.

Usage::

    lightning-xcam report RUN [--run NAME] [--html OUT] [--csv OUT] [--cmap {turbo,viridis}]

``RUN`` is a store file (``xcam.sqlite``) or a log directory searched for one (e.g.
``lightning_logs/version_0``). The command prints one table per method with a row per evaluated epoch
(the metrics the monitor computed, :data:`~lightning_xcam.report.MAIN_COLUMNS`, and the Spearman drift
against the previous evaluation, raw and in noise-floor units, where recorded), then the shortcut alerts. ``--html``
writes a self-contained page (charts, heatmap grids, alerts with the flagged items' maps, the run's
configuration) that needs no network; ``--csv`` writes every per-epoch scalar, one row per
``epoch × method``. The store is only read: no row is added or changed (SQLite may fold a crashed
writer's ``-wal`` file into it when the last connection closes).

A path that does not lead to exactly one readable store, or a run that is not in it, ends with one line
``lightning-xcam: error: ...`` on stderr and exit code 2; a report that cannot be written exits with 1.

Example:
    >>> main(["report", "lightning_logs/version_0", "--html", "report.html"])  # doctest: +SKIP
    0

    From a shell::

        lightning-xcam report lightning_logs/version_0 --html report.html --csv report.csv
        python -m lightning_xcam.cli report lightning_logs/version_0/xcam.sqlite --run version_1
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from lightning_xcam import __version__
from lightning_xcam import report as rep
from lightning_xcam.render import COLORMAPS
from lightning_xcam.store import DEFAULT_FILENAME, STORE_HINT, ExplanationStore, StoreFormatError, find_store, listing

__all__ = ["main", "build_parser", "CliError"]

_PROG = "lightning-xcam"


class CliError(Exception):
    """A problem with the command's input, reported as one line on stderr.

    Args:
        message: What was wrong and what would work.
        code: The exit code (2 for bad input, 1 for a report that could not be written).
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: a ``report`` subcommand (room for more).

    Returns:
        The parser; ``parse_args`` gives ``command`` and the subcommand's options.

    Example:
        >>> build_parser().parse_args(["report", "logs", "--csv", "out.csv"]).csv
        'out.csv'
    """
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Read the explanation history that ExplanationMonitor stored during training.",
        epilog=f"Run '{_PROG} report --help' for the report's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="print the per-epoch metrics, drift and alerts of a run; optionally write HTML or CSV",
        description=(  # line breaks kept by RawDescriptionHelpFormatter (for the examples below)
            "Print one table per explanation method with a row per evaluated epoch (the metrics the\n"
            "monitor computed, Spearman drift vs the previous evaluation and in noise-floor units),\n"
            "then the shortcut alerts. The store is only read: no row is added or changed."
        ),
        epilog=(
            "examples:\n"
            f"  {_PROG} report lightning_logs/version_0\n"
            f"  {_PROG} report lightning_logs/version_0/xcam.sqlite --html report.html --csv report.csv\n"
            f"  {_PROG} report shared_xcam.sqlite --run version_3"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "path", metavar="RUN",
        help=f"a store file ({DEFAULT_FILENAME}) or a log directory holding one (searched recursively)",
    )
    report.add_argument("--run", metavar="NAME", help="the run inside the store (needed when it holds several)")
    report.add_argument("--html", metavar="OUT", help="write a self-contained HTML page (charts, heatmaps, alerts)")
    report.add_argument("--csv", metavar="OUT", help="write the per-epoch scalars, one row per epoch x method")
    report.add_argument(
        "--cmap", choices=COLORMAPS, default="turbo", help="heatmap colormap of --html (default: turbo)"
    )
    return parser


def _resolve_store(path: Path) -> Path:
    """The one store file at ``path`` (a file or a directory searched recursively)."""
    try:
        return find_store(path)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from None
    except OSError as err:  # e.g. an unreadable subdirectory, or a file deleted while the tree is walked
        raise CliError(f"could not search '{path}' ({err}); pass the {DEFAULT_FILENAME} file itself.") from None


def _choose_run(store: ExplanationStore, wanted: str | None) -> str:
    names = [r["run"] for r in store.runs()]
    if not names:
        raise CliError(f"'{store.path}' holds no run yet; train with ExplanationMonitor first.")
    if wanted is not None:
        if wanted not in names:
            raise CliError(
                f"run '{wanted}' is not in '{store.path}'; its runs: {listing(names)}; pass one with --run."
            )
        return wanted
    if len(names) > 1:
        raise CliError(f"'{store.path}' holds {len(names)} runs ({listing(names)}); choose one with --run NAME.")
    return names[0]


def _read_failure(path: Path, err: Exception) -> str:
    if isinstance(err, StoreFormatError):
        return str(err)
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return f"could not read '{path}' ({reason}); {STORE_HINT}."


def _write(out: str, option: str, write: Callable[[str], object]) -> None:
    try:
        folder = Path(out).parent
        if not folder.exists():  # an existing file in its place is left to the write's own error
            folder.mkdir(parents=True)
        write(out)
    except OSError as err:
        raise CliError(f"cannot write the {option} file '{out}': {err.strerror or err}.", code=1) from None
    print(f"wrote {out}")


def _report(args: argparse.Namespace) -> int:
    path = _resolve_store(Path(args.path))
    try:
        store = ExplanationStore(path, create=False)
    except (StoreFormatError, OSError, sqlite3.Error) as err:
        raise CliError(_read_failure(path, err)) from None
    with store:
        try:
            run = _choose_run(store, args.run)
            report = rep.load_report(store, run)
            page = rep.render_html(report, store, args.cmap) if args.html else None
        except sqlite3.Error as err:
            raise CliError(_read_failure(path, err)) from None
    sys.stdout.write(rep.format_text(report))
    if page is not None:
        _write(args.html, "--html", lambda out: Path(out).write_text(page, encoding="utf-8"))
    if args.csv is not None:
        _write(args.csv, "--csv", lambda out: rep.write_csv(report, out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; ``None`` = ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 2 on bad input (usage, path, store or run), 1 when an output file
        cannot be written. Errors are one line ``lightning-xcam: error: ...`` on stderr, never a traceback.

    Example:
        >>> main(["report", "lightning_logs/version_0", "--csv", "xcam.csv"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors (argparse already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _report(args)
    except CliError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return err.code
    except BrokenPipeError:
        # stdout closed early (`lightning-xcam report ... | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
