"""The explanation history as an embedded SQLite file (standard-library ``sqlite3``).

One file (default ``<log_dir>/xcam.sqlite``) holds every evaluation of one or more runs. The column
names are a contract so that anyone can query the file with plain SQL:

==============  ===========================================================================================
table           columns (primary key in brackets)
==============  ===========================================================================================
``meta``        [key], value: ``format = lightning_xcam``, ``schema_version``
``runs``        [run], created (unix time), config (JSON)
``evaluations`` [run, epoch], step, wall_time (unix time), time_s (seconds spent), num_samples
``metrics``     [run, epoch, method, sample, metric], value
``drift``       [run, epoch, method, sample, reference, metric], value
``summaries``   [run, epoch, tag], value: the per-epoch scalars as logged (``xcam/<method>/<name>``)
``maps``        [run, epoch, method, sample], height, width, data (row-major little-endian float16 BLOB)
``alerts``      [run, epoch, kind, class_index], score, threshold, sample_indices (JSON list), message
==============  ===========================================================================================

``epoch`` is the 0-based training epoch, ``method`` the explainer name (``expected_gradcam``, ``gad``,
...), ``sample`` the probe item index, ``metric`` the metric or statistic name and ``value`` a finite
float. ``reference`` names what drift is measured against: by convention ``"previous"`` (the previous
evaluation), ``"first"`` (the anchor evaluation) and ``"floor"`` (the explainer's own replicate, on the
floor subset). ``class_index`` is ``-1`` in the table for alerts about no particular class (SQLite
treats NULLs in a primary key as distinct, which would break idempotency); readers get ``None`` back.

Guarantees:

- **One transaction per evaluation.** :meth:`ExplanationStore.write_evaluation` replaces everything
  stored for ``(run, epoch)`` in one ``BEGIN IMMEDIATE … COMMIT``; the ``evaluations`` row is written
  last and marks the evaluation complete. Writing an evaluation twice leaves one copy (idempotent),
  so a resumed run simply rewrites the epochs it repeats.
- **Crash safety.** WAL journal with ``synchronous=FULL``: a process killed at any point loses at most
  the evaluation in flight, and a committed evaluation also survives a power cut (``NORMAL`` would be
  safe against process crashes only; one fsync per evaluation costs nothing next to the explanation work).
- **Nothing non-finite** is written: NaN or infinite values raise ``ValueError`` naming the entry.
"""

from __future__ import annotations

import enum
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_xcam._checks import grid_batch

__all__ = ["ExplanationStore", "StoreFormatError", "find_store", "find_stores", "DEFAULT_FILENAME", "SCHEMA_VERSION"]

DEFAULT_FILENAME = "xcam.sqlite"
STORE_HINT = f"pass a store file ({DEFAULT_FILENAME}) or the log directory of a run trained with ExplanationMonitor"
_MAX_LISTED = 6
SCHEMA_VERSION = 1
_FORMAT = "lightning_xcam"
# SQLite's messages for SQLITE_CANTOPEN and SQLITE_READONLY (error codes reach Python only from 3.11 on):
# the store cannot be written here, so a reader falls back to a read-only connection.
_CANNOT_WRITE = ("unable to open database file", "readonly database")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_NO_CLASS = -1

#: Per-sample values: a tensor or sequence aligned with ``sample_ids``, or ``{sample_id: value}`` for a subset.
Values = Tensor | Sequence[float] | Mapping[int, float]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (run TEXT PRIMARY KEY, created REAL NOT NULL, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    run TEXT NOT NULL, epoch INTEGER NOT NULL, step INTEGER, wall_time REAL NOT NULL, time_s REAL,
    num_samples INTEGER NOT NULL, PRIMARY KEY (run, epoch));
CREATE TABLE IF NOT EXISTS metrics (
    run TEXT NOT NULL, epoch INTEGER NOT NULL, method TEXT NOT NULL, sample INTEGER NOT NULL,
    metric TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (run, epoch, method, sample, metric));
CREATE TABLE IF NOT EXISTS drift (
    run TEXT NOT NULL, epoch INTEGER NOT NULL, method TEXT NOT NULL, sample INTEGER NOT NULL,
    reference TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (run, epoch, method, sample, reference, metric));
CREATE TABLE IF NOT EXISTS summaries (
    run TEXT NOT NULL, epoch INTEGER NOT NULL, tag TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (run, epoch, tag));
CREATE TABLE IF NOT EXISTS maps (
    run TEXT NOT NULL, epoch INTEGER NOT NULL, method TEXT NOT NULL, sample INTEGER NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (run, epoch, method, sample));
CREATE TABLE IF NOT EXISTS alerts (
    run TEXT NOT NULL, epoch INTEGER NOT NULL, kind TEXT NOT NULL, class_index INTEGER NOT NULL,
    score REAL NOT NULL, threshold REAL, sample_indices TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (run, epoch, kind, class_index));
"""

# Tables holding rows of one evaluation, in write order; ``evaluations`` last marks it complete.
_EVALUATION_TABLES = ("metrics", "drift", "summaries", "maps", "alerts", "evaluations")


class StoreFormatError(ValueError):
    """The file exists but is not a (compatible) lightning_xcam store."""


# --------------------------------------------------------------------------------------------------
# Locating stores
# --------------------------------------------------------------------------------------------------


def store_file(path: str | os.PathLike[str]) -> Path:
    """The store file a ``path`` names: ``~`` expanded; a directory, or a str written with a trailing
    separator (a directory still to be created), holds ``xcam.sqlite``. A ``Path`` has no trailing
    separator: name a directory still to be created as a str, or the file itself.

    Example:
        >>> store_file("runs/exp1/").as_posix(), store_file("runs/a.sqlite").as_posix()
        ('runs/exp1/xcam.sqlite', 'runs/a.sqlite')
    """
    text = os.fspath(path)
    file = Path(text).expanduser()
    if file.is_dir() or text.endswith(("/", os.sep)):
        file = file / DEFAULT_FILENAME
    return file


def find_stores(path: str | Path) -> list[Path]:
    """All stores at ``path``: the file itself, or every ``xcam.sqlite`` below a directory (sorted).

    Args:
        path: A store file or a log directory.

    Returns:
        Sorted list of paths (possibly empty for a directory).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: '{path}'; {STORE_HINT}.")
    if path.is_dir():
        # os.walk skips what vanishes mid-search (a busy /tmp); Path.rglob raises on it
        return sorted(Path(root) / DEFAULT_FILENAME for root, _, files in os.walk(path) if DEFAULT_FILENAME in files)
    return [path]


def find_store(path: str | Path) -> Path:
    """Resolve a store file from a file path or a log directory searched recursively for ``xcam.sqlite``.

    Args:
        path: A store file, or a directory holding exactly one ``xcam.sqlite`` at any depth.

    Returns:
        The store's path.

    Raises:
        FileNotFoundError: If ``path`` does not exist or a directory holds no store.
        ValueError: If a directory holds several stores (the message lists them, relative to ``path``).

    Example:
        >>> find_store("lightning_logs/version_0")  # doctest: +SKIP
        PosixPath('lightning_logs/version_0/xcam.sqlite')
    """
    found = find_stores(path)
    if not found:
        raise FileNotFoundError(
            f"no {DEFAULT_FILENAME} under directory '{path}'; {STORE_HINT} (the monitor writes "
            f"<log_dir>/{DEFAULT_FILENAME} unless store=False)."
        )
    if len(found) > 1:
        names = [str(p.relative_to(path)) for p in found]
        raise ValueError(f"'{path}' holds {len(found)} stores ({listing(names)}); pass one of them.")
    return found[0]


def listing(names: Sequence[object]) -> str:
    """``names`` joined by commas, at most six of them and a count of the rest (for one-line messages)."""
    shown = ", ".join(str(name) for name in names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


# --------------------------------------------------------------------------------------------------
# Conversion of inputs to plain rows
# --------------------------------------------------------------------------------------------------


def _finite(value: object, what: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a single number, got a tensor of shape {tuple(value.shape)}.")
        value = value.item()
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} is {number}; the store never holds NaN or infinite values.")
    return number


def _index(value: object, what: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} ({value!r}).")
    return int(value)


def _sample_ids(sample_ids: object) -> list[int]:
    if isinstance(sample_ids, Tensor):
        if sample_ids.ndim != 1 or sample_ids.is_floating_point():
            raise TypeError(
                f"`sample_ids` must be a 1-D integer tensor or a list of ints, got a {sample_ids.dtype} "
                f"tensor of shape {tuple(sample_ids.shape)}."
            )
        ids = [int(i) for i in sample_ids.tolist()]
    elif isinstance(sample_ids, Iterable) and not isinstance(sample_ids, (str, bytes)):
        ids = [_index(i, "every entry of `sample_ids`") for i in sample_ids]
    else:
        raise TypeError(f"`sample_ids` must be a list of ints or a LongTensor [B], got {type(sample_ids).__name__}.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"`sample_ids` must be unique (one row per probe item), got {ids}.")
    if any(i < 0 for i in ids):
        raise ValueError(f"`sample_ids` must be non-negative probe indices, got {ids}.")
    return ids


def _per_sample(values: Values, ids: list[int], what: str) -> list[tuple[int, float]]:
    """``(sample, value)`` pairs from values aligned with ``ids`` or a ``{sample: value}`` mapping."""
    if isinstance(values, Mapping):
        known = set(ids)
        pairs = [(_index(s, f"a sample id of {what}"), v) for s, v in values.items()]
        unknown = sorted(s for s, _ in pairs if s not in known)
        if unknown:
            raise ValueError(f"{what} has samples {unknown} that are not in `sample_ids`.")
    else:
        if isinstance(values, Tensor):
            flat = values.detach().cpu().double().reshape(-1).tolist() if values.ndim <= 1 else None
            if flat is None:
                raise ValueError(f"{what} must be a 1-D tensor [B], got shape {tuple(values.shape)}.")
        elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
            flat = list(values)
        else:
            raise TypeError(
                f"{what} must be a Tensor [B], a list of B numbers or a {{sample_id: value}} dict, "
                f"got {type(values).__name__}."
            )
        if len(flat) != len(ids):
            raise ValueError(f"{what} has {len(flat)} values but `sample_ids` has {len(ids)}; pass one per item.")
        pairs = list(zip(ids, flat))
    return [(s, _finite(v, f"{what} for sample {s}")) for s, v in pairs]


def _nested(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}.")
    for key in value:
        if not isinstance(key, str) or not key:
            raise TypeError(f"{what} must have non-empty str keys, got {key!r}.")
    return value


def _encode_map(m: Tensor, what: str) -> tuple[int, int, bytes]:
    half = m.detach().to(device="cpu", dtype=torch.float16).contiguous()
    if not bool(torch.isfinite(half).all()):
        raise ValueError(
            f"{what} holds NaN or values beyond float16's range (±65504); store unit-mass or "
            "low-resolution drift maps (lightning_xcam.drift.drift_maps)."
        )
    return int(half.shape[0]), int(half.shape[1]), half.numpy().astype("<f2", copy=False).tobytes()


def _decode_map(height: int, width: int, data: bytes) -> Tensor:
    array = np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(height, width)
    return torch.from_numpy(array)


def _alert_fields(alert: object, index: int) -> dict[str, Any]:
    if isinstance(alert, Mapping):
        fields = dict(alert)
    elif hasattr(alert, "to_dict"):
        fields = alert.to_dict()
    else:
        raise TypeError(f"`alerts[{index}]` must be an Alert or a dict, got {type(alert).__name__}.")
    for key in ("kind", "score"):
        if key not in fields:
            raise ValueError(f"`alerts[{index}]` has no {key!r}; an alert needs at least 'kind' and 'score'.")
    return fields


def _json(value: Any) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            return obj.detach().cpu().tolist()
        if isinstance(obj, enum.Enum):
            return obj.value
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=repr)
        if isinstance(obj, np.generic):
            return obj.item()
        return str(obj)  # paths, dtypes, modules: recorded by name

    try:
        return json.dumps(value, default=default, sort_keys=True, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"`config` holds a NaN or infinite number, which the store does not record: {err}") from None


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


class ExplanationStore:
    """Open (or create) an explanation history file and read or write one run's evaluations.

    The read methods (:meth:`metrics`, :meth:`drift`, :meth:`summaries`, :meth:`alerts`, ...) return plain
    rows and take optional filters named after their columns (``method``, ``metric``, ``reference``,
    ``tag``, ``kind``, ``epoch``, ``sample``): ``None`` matches any value; ``run=None`` reads this store's run.

    Args:
        path: The SQLite file, or a directory (then ``<path>/xcam.sqlite``; see :func:`store_file`). Parent
            directories are created.
        run: The run this object writes, and reads when a read method gets ``run=None``.
        create: Create the file if missing and check at once that it can be written (a file without write
            permission is refused here, not at the first write); with ``False`` (for readers such as the
            CLI, which add and change no row, and lay out no schema: every write raises ``PermissionError``)
            a missing file raises
            ``FileNotFoundError``, and a store that cannot be opened for writing (a read-only file
            system: SQLite's WAL mode needs to create ``xcam.sqlite-shm``) is opened read-only instead, as
            a finished run's snapshot (``read_only`` is then ``True``; transactions left in a ``-wal``
            file by a crashed writer are not seen).
        timeout: Seconds to wait for another connection's write lock.

    Raises:
        FileNotFoundError: If the file is missing and ``create`` is false.
        StoreFormatError: If the file is not an SQLite database, is an SQLite database of something else,
            was written by a newer schema version, is damaged (``create=True`` runs SQLite's ``quick_check``),
            or (``create=False``) holds no table yet.
        sqlite3.OperationalError: If the file cannot be opened, or (``create=True``) cannot be written.
        TypeError: If ``run`` is not a non-empty string.

    Example:
        >>> with ExplanationStore(tmp_path / "xcam.sqlite", run="demo") as store:  # doctest: +SKIP
        ...     store.write_config({"num_probe": 2})
        ...     store.write_evaluation(0, [0, 1], metrics={"gradcam": {"deletion_auc": torch.tensor([0.2, 0.3])}})
        ...     [row["sample"] for row in store.metrics(metric="deletion_auc")]
        [0, 1]
    """

    def __init__(self, path: str | Path, run: str = "default", *, create: bool = True, timeout: float = 30.0) -> None:
        if not isinstance(run, str) or not run:
            raise TypeError(f"`run` must be a non-empty str, got {run!r}.")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"`path` must be a file or directory path, got {type(path).__name__}.")
        path = store_file(path)
        if path.exists():
            _check_sqlite_header(path)
        elif not create:
            below = find_stores(path.parent) if path.name == DEFAULT_FILENAME and path.parent.is_dir() else []
            names = [str(p.relative_to(path.parent)) for p in below]
            raise FileNotFoundError(f"No store at '{path}' (create=False)" + (
                f"; the directory holds {listing(names)} below it: open one of them (find_store(directory) "
                "returns the only one)." if names else "."))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.run = run
        self.read_only = False
        self._writer = create  # readers (the report) add and change nothing
        try:
            self._connect(str(path), timeout)
        except sqlite3.OperationalError as err:
            raise sqlite3.OperationalError(
                f"cannot open '{path}' ({err}); pass a path whose directory you can write (SQLite keeps "
                "-wal and -shm files next to the store)."
            ) from err
        try:
            self._open_schema()
        except sqlite3.OperationalError as err:
            self._conn.close()
            if not any(text in str(err) for text in _CANNOT_WRITE):
                raise
            if create:
                raise sqlite3.OperationalError(
                    f"cannot open '{path}' for writing ({err}); pass a writable `store` path, or create=False to read it."
                ) from err
            self._open_read_only(timeout)
        except BaseException:
            self._conn.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> ExplanationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExplanationStore('{self.path}', run={self.run!r})"

    def _connect(self, database: str, timeout: float, uri: bool = False) -> None:
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE … COMMIT) opened by `_begin`.
        self._conn = sqlite3.connect(database, timeout=timeout, isolation_level=None, uri=uri)
        self._conn.row_factory = sqlite3.Row

    def _open_read_only(self, timeout: float) -> None:
        self._connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", timeout, uri=True)
        self.read_only = True
        try:
            self._check_meta(self._tables())
        except BaseException:
            self._conn.close()
            raise

    def _tables(self) -> set[str]:
        try:
            return {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.OperationalError:
            raise  # cannot open (permissions, a read-only file system): not a format problem
        except sqlite3.DatabaseError as err:
            raise StoreFormatError(f"'{self.path}' is not an SQLite database ({err}).") from None

    def _open_schema(self) -> None:
        tables = self._tables()
        if tables:
            self._check_meta(tables)  # before any PRAGMA that would modify a foreign file
        elif not self._writer:
            what = "an empty file" if self.path.stat().st_size == 0 else "an empty SQLite database"
            raise StoreFormatError(f"'{self.path}' is {what}, not a lightning_xcam store (create=False only reads).")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        if not tables:
            with self._transaction():
                # One statement at a time: executescript() would commit the open transaction first.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._conn.execute(statement)
                self._conn.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [("format", _FORMAT), ("schema_version", str(SCHEMA_VERSION))],
                )
        if self._writer:
            # a file without write permission opens and reads fine and fails only at the first write: write
            # now (the same value back), so that it is refused at open, not after an epoch of training
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            self._conn.execute(f"PRAGMA user_version = {int(version)}")
            # a damaged file (a disk fault, a copy cut short) would take a fit's evaluations and fail at reading
            problems = [" ".join(row[0].split()) for row in self._conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise StoreFormatError(
                    f"'{self.path}' is damaged (SQLite quick_check: {'; '.join(problems)}); move it away and "
                    "pass a new `store` path (the readable part may be recovered with the sqlite3 shell's .recover)."
                )

    def _check_meta(self, tables: set[str]) -> None:
        foreign = StoreFormatError(
            f"'{self.path}' is an SQLite database but not a lightning_xcam store "
            f"(tables: {', '.join(sorted(tables))}). Pass the xcam.sqlite written by ExplanationMonitor."
        )
        if "meta" not in tables:
            raise foreign
        meta = {r["key"]: r["value"] for r in self._conn.execute("SELECT key, value FROM meta")}
        if meta.get("format") != _FORMAT:
            raise foreign
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise StoreFormatError(
                f"'{self.path}' has store schema version {version}, newer than this lightning_xcam "
                f"supports ({SCHEMA_VERSION}); upgrade lightning_xcam to read it."
            )

    # -- writing -----------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (``BEGIN IMMEDIATE`` … ``COMMIT``), rolled back on any exception."""
        if self.read_only:
            raise PermissionError(f"'{self.path}' was opened read-only (it cannot be written here); nothing was written.")
        if not self._writer:
            raise PermissionError(f"'{self.path}' was opened with create=False, as a reader, which adds and changes "
                                  "nothing; open it with create=True to write. Nothing was written.")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _add_run(self) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO runs (run, created, config) VALUES (?, ?, '{}')", (self.run, time.time())
        )

    def _insert(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        if rows:
            marks = ", ".join("?" * len(columns))
            self._conn.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Record (or replace) the run's configuration as JSON.

        Tensors become lists, enums their values, other non-JSON objects (paths, dtypes) their ``str``.

        Args:
            config: A dict of settings.

        Raises:
            TypeError: If ``config`` is not a dict.
            ValueError: If it holds NaN or infinite numbers.
            PermissionError: If the store was opened read-only or with ``create=False``.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"`config` must be a dict, got {type(config).__name__}.")
        text = _json(dict(config))
        with self._transaction():
            self._add_run()
            self._conn.execute("UPDATE runs SET config = ? WHERE run = ?", (text, self.run))

    def discard_from(self, epoch: int) -> list[int]:
        """Delete the run's evaluations of ``epoch`` and later (a resumed fit redoes them; a fresh one replaces them).

        Args:
            epoch: The first epoch to delete (0 = the whole history of the run; its configuration stays).

        Returns:
            The epochs that had an evaluation, sorted.

        Raises:
            TypeError: If ``epoch`` is not an int.
            PermissionError: If the store was opened read-only or with ``create=False``.

        Example:
            >>> store.discard_from(3)  # a fit resumed from its epoch-2 checkpoint  # doctest: +SKIP
            [3, 4]
        """
        epoch = _index(epoch, "`epoch`")
        with self._transaction():
            gone = [row[0] for row in self._conn.execute(
                "SELECT epoch FROM evaluations WHERE run = ? AND epoch >= ? ORDER BY epoch", (self.run, epoch))]
            for table in _EVALUATION_TABLES:
                self._conn.execute(f"DELETE FROM {table} WHERE run = ? AND epoch >= ?", (self.run, epoch))
        return gone

    def write_evaluation(
        self,
        epoch: int,
        sample_ids: Sequence[int] | Tensor,
        *,
        step: int | None = None,
        time_s: float | None = None,
        metrics: Mapping[str, Mapping[str, Values]] | None = None,
        drift: Mapping[str, Mapping[str, Mapping[str, Values]]] | None = None,
        summaries: Mapping[str, float | Tensor] | None = None,
        maps: Mapping[str, Tensor] | None = None,
        alerts: Sequence[Any] = (),
    ) -> None:
        """Write one whole evaluation in one transaction, replacing whatever ``(run, epoch)`` held.

        Everything is validated and converted to plain Python values before the transaction starts, so
        a bad argument writes nothing.

        Args:
            epoch: The 0-based training epoch.
            sample_ids: The probe indices of the ``B`` items, in the order of every per-sample tensor.
            step: The global step the evaluation's scalars were logged at.
            time_s: Seconds the evaluation took.
            metrics: ``{method: {metric: values}}``; values are a ``Tensor [B]``, a list of ``B`` numbers
                or ``{sample_id: value}`` for a subset.
            drift: ``{method: {reference: {statistic: values}}}``; references by convention
                ``"previous"``, ``"first"``, ``"floor"``. A bool ``valid`` mask is stored as 1.0/0.0.
            summaries: ``{tag: value}``, the per-epoch scalars as logged (e.g.
                ``"xcam/gad/drift_spearman"``, ``"xcam/alert"``).
            maps: ``{method: Tensor [B, h, w]}`` low-resolution maps (e.g. drift maps), stored as float16.
            alerts: :class:`~lightning_xcam.alerts.Alert` objects or dicts with ``kind``, ``score`` and
                optionally ``threshold``, ``class_index``, ``sample_indices``, ``message``, ``epoch``.

        Raises:
            TypeError: On wrongly typed arguments.
            ValueError: On NaN or infinite values (the message names the entry), length mismatches,
                duplicate ``sample_ids`` or alerts, or an alert whose ``epoch`` differs.
            PermissionError: If the store was opened read-only or with ``create=False``.
        """
        epoch = _index(epoch, "`epoch`")
        if epoch < 0:
            raise ValueError(f"`epoch` must be >= 0 (0-based training epoch), got {epoch}.")
        step = None if step is None else _index(step, "`step`")
        time_s = None if time_s is None else _finite(time_s, "`time_s`")
        ids = _sample_ids(sample_ids)
        run = self.run

        metric_rows = [
            (run, epoch, method, s, name, v)
            for method, per_metric in _nested(metrics, "`metrics`").items()
            for name, values in _nested(per_metric, f"`metrics[{method!r}]`").items()
            for s, v in _per_sample(values, ids, f"metrics[{method!r}][{name!r}]")
        ]
        drift_rows = [
            (run, epoch, method, s, reference, name, v)
            for method, per_ref in _nested(drift, "`drift`").items()
            for reference, per_stat in _nested(per_ref, f"`drift[{method!r}]`").items()
            for name, values in _nested(per_stat, f"`drift[{method!r}][{reference!r}]`").items()
            for s, v in _per_sample(values, ids, f"drift[{method!r}][{reference!r}][{name!r}]")
        ]
        summary_rows = [
            (run, epoch, tag, _finite(value, f"summaries[{tag!r}]"))
            for tag, value in _nested(summaries, "`summaries`").items()
        ]
        map_rows = []
        for method, batch in _nested(maps, "`maps`").items():
            batch = grid_batch(batch, f"maps[{method!r}] (one map per sample id)", len(ids))
            for s, m in zip(ids, batch):
                map_rows.append((run, epoch, method, s, *_encode_map(m, f"maps[{method!r}] for sample {s}")))
        alert_rows = self._alert_rows(epoch, alerts)
        evaluation_row = (run, epoch, step, time.time(), time_s, len(ids))

        with self._transaction():
            self._add_run()
            for table in _EVALUATION_TABLES:
                self._conn.execute(f"DELETE FROM {table} WHERE run = ? AND epoch = ?", (run, epoch))
            self._insert("metrics", ("run", "epoch", "method", "sample", "metric", "value"), metric_rows)
            self._insert(
                "drift", ("run", "epoch", "method", "sample", "reference", "metric", "value"), drift_rows
            )
            self._insert("summaries", ("run", "epoch", "tag", "value"), summary_rows)
            self._insert("maps", ("run", "epoch", "method", "sample", "height", "width", "data"), map_rows)
            self._insert(
                "alerts",
                ("run", "epoch", "kind", "class_index", "score", "threshold", "sample_indices", "message"),
                alert_rows,
            )
            self._insert(
                "evaluations", ("run", "epoch", "step", "wall_time", "time_s", "num_samples"), [evaluation_row]
            )

    def _alert_rows(self, epoch: int, alerts: Sequence[Any]) -> list[tuple[Any, ...]]:
        if isinstance(alerts, (str, bytes, Mapping)) or not isinstance(alerts, Iterable):
            raise TypeError(f"`alerts` must be a list of Alert objects or dicts, got {type(alerts).__name__}.")
        rows, keys = [], set()
        for i, alert in enumerate(alerts):
            fields = _alert_fields(alert, i)
            if fields.get("epoch") is not None and _index(fields["epoch"], f"alerts[{i}].epoch") != epoch:
                raise ValueError(f"alerts[{i}] is for epoch {fields['epoch']} but the evaluation is epoch {epoch}.")
            kind = fields["kind"]
            if not isinstance(kind, str) or not kind:
                raise TypeError(f"alerts[{i}].kind must be a non-empty str, got {kind!r}.")
            cls = fields.get("class_index")
            cls = _NO_CLASS if cls is None else _index(cls, f"alerts[{i}].class_index")
            if (kind, cls) in keys:
                raise ValueError(f"alerts[{i}] repeats kind {kind!r} for class {fields.get('class_index')}.")
            keys.add((kind, cls))
            threshold = fields.get("threshold")
            rows.append((
                self.run,
                epoch,
                kind,
                cls,
                _finite(fields["score"], f"alerts[{i}].score"),
                None if threshold is None else _finite(threshold, f"alerts[{i}].threshold"),
                json.dumps([_index(s, f"alerts[{i}].sample_indices") for s in fields.get("sample_indices", ())]),
                str(fields.get("message", "")),
            ))
        return rows

    # -- reading -----------------------------------------------------------------------------------

    def _select(self, table: str, columns: str, order: str, run: str | None, **filters: Any) -> list[dict[str, Any]]:
        where = {"run": self.run if run is None else run, **{k: v for k, v in filters.items() if v is not None}}
        clause = " AND ".join(f"{k} = ?" for k in where)
        sql = f"SELECT {columns} FROM {table} WHERE {clause} ORDER BY {order}"
        return [dict(r) for r in self._conn.execute(sql, tuple(where.values()))]

    def runs(self) -> list[dict[str, Any]]:
        """Every run in the file: ``{"run", "created", "config"}`` (config as a dict), oldest first."""
        rows = self._conn.execute("SELECT run, created, config FROM runs ORDER BY created, run")
        return [{"run": r["run"], "created": r["created"], "config": json.loads(r["config"])} for r in rows]

    def config(self, run: str | None = None) -> dict[str, Any]:
        """The configuration recorded by :meth:`write_config` (``{}`` if none was).

        Raises:
            KeyError: If the run is not in the file (the message lists the runs that are).
        """
        name = self.run if run is None else run
        row = self._conn.execute("SELECT config FROM runs WHERE run = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(f"run {name!r} is not in '{self.path}'; runs: {[r['run'] for r in self.runs()]}")
        return json.loads(row["config"])

    def evaluations(self, run: str | None = None) -> list[dict[str, Any]]:
        """Completed evaluations: ``{"run", "epoch", "step", "wall_time", "time_s", "num_samples"}`` by epoch."""
        return self._select("evaluations", "*", "epoch", run)

    def epochs(self, run: str | None = None) -> list[int]:
        """The epochs with a completed evaluation, ascending."""
        return [r["epoch"] for r in self.evaluations(run)]

    def methods(self, run: str | None = None) -> list[str]:
        """The methods with metrics, drift or maps in the run, sorted."""
        name = self.run if run is None else run
        sql = " UNION ".join(f"SELECT DISTINCT method FROM {t} WHERE run = ?" for t in ("metrics", "drift", "maps"))
        return sorted(r[0] for r in self._conn.execute(sql, (name,) * 3))

    def metrics(
        self,
        method: str | None = None,
        metric: str | None = None,
        epoch: int | None = None,
        sample: int | None = None,
        run: str | None = None,
    ) -> list[dict[str, Any]]:
        """Per-sample metric rows ``{"run", "epoch", "method", "sample", "metric", "value"}``; ``None`` = any."""
        return self._select(
            "metrics", "*", "epoch, method, metric, sample", run, method=method, metric=metric, epoch=epoch,
            sample=sample,
        )

    def drift(
        self,
        method: str | None = None,
        reference: str | None = None,
        metric: str | None = None,
        epoch: int | None = None,
        sample: int | None = None,
        run: str | None = None,
    ) -> list[dict[str, Any]]:
        """Per-sample drift rows ``{"run", "epoch", "method", "sample", "reference", "metric", "value"}``."""
        return self._select(
            "drift", "*", "epoch, method, reference, metric, sample", run, method=method, reference=reference,
            metric=metric, epoch=epoch, sample=sample,
        )

    def summaries(
        self, tag: str | None = None, epoch: int | None = None, run: str | None = None
    ) -> list[dict[str, Any]]:
        """Per-epoch scalar rows ``{"run", "epoch", "tag", "value"}``."""
        return self._select("summaries", "*", "epoch, tag", run, tag=tag, epoch=epoch)

    def summary_table(self, run: str | None = None) -> list[dict[str, Any]]:
        """The summaries pivoted to one row per completed evaluation: ``{"epoch", "step", <tag>: value, ...}``.

        Every row has the same keys (``epoch``, ``step``, then the run's tags sorted); a tag missing at an
        epoch is ``None``.
        """
        values: dict[int, dict[str, float]] = {}
        for r in self.summaries(run=run):
            values.setdefault(r["epoch"], {})[r["tag"]] = r["value"]
        tags = sorted({t for per_epoch in values.values() for t in per_epoch})
        return [
            {"epoch": e["epoch"], "step": e["step"], **{t: values.get(e["epoch"], {}).get(t) for t in tags}}
            for e in self.evaluations(run)
        ]

    def alerts(
        self, kind: str | None = None, epoch: int | None = None, run: str | None = None
    ) -> list[dict[str, Any]]:
        """Alert rows with the fields of :class:`~lightning_xcam.alerts.Alert` plus ``run``.

        ``class_index`` is ``None`` for alerts about no particular class, ``sample_indices`` a list of ints,
        so ``Alert.from_dict(row)`` rebuilds the alert.
        """
        rows = self._select("alerts", "*", "epoch, kind, class_index", run, kind=kind, epoch=epoch)
        for r in rows:
            r["class_index"] = None if r["class_index"] == _NO_CLASS else r["class_index"]
            r["sample_indices"] = json.loads(r["sample_indices"])
        return rows

    def map_samples(self, method: str, epoch: int, run: str | None = None) -> list[int]:
        """The sample ids with a stored map of ``(method, epoch)``, ascending: the rows of :meth:`maps`.

        Raises:
            KeyError: If nothing is stored for ``(method, epoch)``.
        """
        rows = self._select("maps", "sample", "sample", run, method=method, epoch=epoch)
        if not rows:
            raise KeyError(f"no maps for method {method!r} at epoch {epoch}.")
        return [r["sample"] for r in rows]

    def maps(
        self, method: str, epoch: int, run: str | None = None, samples: Sequence[int] | Tensor | None = None
    ) -> Tensor:
        """Decode the stored maps of one method and epoch.

        Args:
            method: The method name.
            epoch: The epoch.
            run: The run (``None`` = this store's run).
            samples: Sample ids to return, in this order; ``None`` = all stored, ascending by sample.

        Returns:
            Float32 ``[B, h, w]`` CPU tensor (float16 precision).

        Raises:
            KeyError: If nothing is stored for ``(method, epoch)`` or a requested sample is missing.
        """
        rows = self._select("maps", "sample, height, width, data", "sample", run, method=method, epoch=epoch)
        if not rows:
            stored = sorted({r["epoch"] for r in self._select("maps", "epoch", "epoch", run, method=method)})
            raise KeyError(f"no maps for method {method!r} at epoch {epoch}; epochs with {method!r} maps: {stored}")
        by_sample = {r["sample"]: r for r in rows}
        order = sorted(by_sample) if samples is None else _sample_ids(samples)
        missing = [s for s in order if s not in by_sample]
        if missing:
            raise KeyError(f"no maps for samples {missing} (method {method!r}, epoch {epoch}).")
        return torch.stack([_decode_map(*(by_sample[s][k] for k in ("height", "width", "data"))) for s in order])


def _check_sqlite_header(path: Path) -> None:
    """Refuse a non-SQLite file up front, with a clear message (an empty file is a fresh database)."""
    if path.is_dir() or path.stat().st_size == 0:
        return
    with path.open("rb") as handle:
        head = handle.read(len(_SQLITE_MAGIC))
    if head != _SQLITE_MAGIC:
        raise StoreFormatError(
            f"'{path}' is not an SQLite file, so not a lightning_xcam store. "
            "Pass the xcam.sqlite written by ExplanationMonitor, or its log directory."
        )
