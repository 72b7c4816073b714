"""The results table: a Parquet dataset, one file per finished cell, each written atomically.

``DIR/cells/{key}.parquet`` holds one row; the file appears by a rename after it is complete, so a
crash leaves either the whole row or nothing. :func:`read_results` (or ``pd.read_parquet(DIR /
"cells")``, or DuckDB's ``read_parquet('DIR/cells/*.parquet', union_by_name=true)``) reads them.
A cell's row is replaced only by a rerun of a cell that failed.

Columns: ``cell`` (the config hash), ``study``, ``kind``, ``status`` (``"ok"`` or ``"failed"``),
``error``, one column per axis, the kind's metrics, ``forward_equivalents``, ``seconds``,
``labelled_pairs``, ``config`` (JSON), ``worker`` and ``attempt``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lens_laai.storage.bundle import atomic_write_bytes
from lens_laai.studies.spec import Cell, canonical_json

RUN_COLUMNS = ("worker", "attempt", "seconds", "finished_at")  # how a row was made, not what it found


class ResultStore:
    """The ``cells/`` folder of a study's output directory.

    Example:
        >>> import tempfile
        >>> from lens_laai.studies.spec import Cell
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> cell = Cell("evaluate", {"model": "lens-laai-tiny", "shots": 2}, ("shots",))
        >>> path = store.write(make_row("demo", cell, "ok", {"accuracy": 0.5}, None))
        >>> path.name == f"{cell.key}.parquet", store.finished() == {cell.key: "ok"}
        (True, True)
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.root = Path(out)
        self.cells = self.root / "cells"

    def finished(self) -> dict[str, str]:
        """``{cell key: status}`` of every row on disk (temp files of an interrupted write are ignored)."""
        if not self.cells.is_dir():
            return {}
        out = {}
        for f in self.cells.glob("*.parquet"):
            status = pq.read_table(f, columns=["status"]).column("status")[0].as_py()
            out[f.stem] = status
        return out

    def write(self, row: Mapping[str, Any]) -> Path:
        """Write one cell's row as ``cells/{row['cell']}.parquet``, atomically."""
        table = pa.Table.from_pylist([_plain(dict(row))])
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        path = self.cells / f"{row['cell']}.parquet"
        atomic_write_bytes(path, buffer.getvalue())
        return path


def make_row(
    study: str, cell: Cell, status: str, result: Mapping[str, Any] | None, error: str | None, **run: Any
) -> dict[str, Any]:
    """A row: identity, axis values, metrics, cost, config.

    Axis values that are lists or tables become JSON text; a metric whose name is also a setting or
    a column of its own (``seconds``...) gets the prefix ``result_``.

    Example:
        >>> from lens_laai.studies.spec import Cell
        >>> cell = Cell("evaluate", {"model": "lens-laai-tiny", "shots": 2}, ("shots",))
        >>> row = make_row("demo", cell, "ok", {"accuracy": 0.5, "shots": 9, "labelled_pairs": 2}, None, seconds=1.5)
        >>> {k: row[k] for k in ("status", "shots", "accuracy", "result_shots", "labelled_pairs", "seconds")}
        {'status': 'ok', 'shots': 2, 'accuracy': 0.5, 'result_shots': 9, 'labelled_pairs': 2, 'seconds': 1.5}
    """
    row: dict[str, Any] = {"cell": cell.key, "study": study, "kind": cell.kind, "status": status, "error": error}
    for axis in cell.axes:
        value = cell.config[axis]
        row[axis] = canonical_json(value) if isinstance(value, list | dict) else value
    result = dict(result or {})
    for name in ("forward_equivalents", "labelled_pairs"):
        row[name] = result.pop(name, None)
    for name, value in result.items():
        row[f"result_{name}" if name in row or name in cell.config or name in RUN_COLUMNS else name] = value
    row["config"] = canonical_json(cell.config)
    row.update(run)
    return row


def read_results(out: str | os.PathLike) -> pd.DataFrame:
    """Every row under ``out`` (a study's ``--out`` folder or its ``cells/``), one per cell, as a DataFrame.

    Files are read with their schemas unified by name, so rows of failed cells (no metric columns)
    and of different kinds sit in one table; sorted by cell key.

    Example:
        >>> import tempfile
        >>> from lens_laai.studies.spec import Cell
        >>> out = tempfile.mkdtemp()
        >>> for shots in (0, 2):
        ...     cell = Cell("evaluate", {"model": "lens-laai-tiny", "shots": shots}, ("shots",))
        ...     _ = ResultStore(out).write(make_row("demo", cell, "ok", {"accuracy": shots / 4}, None))
        >>> table = read_results(out)
        >>> sorted(zip(table.shots, table.accuracy)), list(table.columns[:4])
        ([(0, 0.0), (2, 0.5)], ['cell', 'study', 'kind', 'status'])
    """
    root = Path(out)
    folder = root / "cells" if (root / "cells").is_dir() else root
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return pd.DataFrame()
    tables = [pq.read_table(f) for f in files]
    schema = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
    tables = [_conform(t, schema) for t in tables]
    return pa.concat_tables(tables).to_pandas().sort_values("cell", kind="stable").reset_index(drop=True)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        else:
            columns.append(pa.nulls(len(table), f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """Values Parquet holds as columns: scalars as they are, anything else as JSON text."""
    out = {}
    for k, v in row.items():
        if v is None or isinstance(v, bool | int | float | str):
            out[k] = v
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            out[k] = v.item()
        else:
            out[k] = json.dumps(v, default=str)
    return out
