"""Shared plumbing for the benchmark scripts: arguments, task loading, output files."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lens_laai import Task, TaskSplits, load_model, load_task
from lens_laai.storage.bundle import atomic_write_text
from lens_laai.tasks.provenance import loose_pair_hash
from lens_laai.testing import tiny_task

TASKS = ["antonym", "synonym", "english-french", "english-german"]
TINY = "lens-laai-tiny"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help=f"model to load ('{TINY}' for a smoke run)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder of FV-format {task}.json files (default: lens_laai's bundled tasks), "
        "e.g. ../shared/datasets/function_vectors",
    )
    p.add_argument("--out-dir", default=None, help="write CSV + markdown (+ PNG) here")
    p.add_argument("--quick", action="store_true", help="smoke settings (seconds, meaningless numbers)")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_study_args(p: argparse.ArgumentParser) -> None:
    """Where and how the benchmark's grid runs (lens_laai.studies): resumable, on Ray workers if asked."""
    p.add_argument(
        "--study-dir",
        default=None,
        help="results folder of the grid (Parquet, one file per cell; a rerun skips finished cells); "
        "default: OUT_DIR/NAME.study, or a temporary folder without --out-dir",
    )
    p.add_argument("--workers", type=int, default=0, help="Ray workers (0: run the cells in this process)")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. 'auto'); default: local")


def run_grid(name: str, kind: str, axes: dict[str, list], fixed: dict[str, Any], args: argparse.Namespace):
    """Run the benchmark's grid as a study (cell kind ``kind`` in this folder) and return its ok rows.

    Failed cells are printed with their error and left out of the tables (a rerun retries them).
    """
    import tempfile

    from lens_laai.studies import Study, run_study

    folder = args.study_dir or (
        str(Path(args.out_dir) / f"{name}.study") if args.out_dir else tempfile.mkdtemp(prefix=name)
    )
    study = Study(name, kind, axes=axes, fixed=fixed, paths=(str(Path(__file__).resolve().parent),))
    table = run_study(
        study,
        folder,
        workers=args.workers,
        address=args.address,
        progress=not args.no_progress,
    )
    # keep only this study's cells: the folder may hold rows of a larger grid
    table = table[table.cell.isin({c.key for c in study.cells()})]
    for row in table[table.status != "ok"].itertuples():
        print(f"cell {row.cell} failed: {str(row.error).splitlines()[0]}", file=sys.stderr)
    return table[table.status == "ok"].reset_index(drop=True)


def get_task(name: str, data_dir: str | None, model_name: str) -> Task:
    if model_name == TINY:
        return Task(name, tiny_task().pairs)
    if data_dir:
        return Task.from_json(Path(data_dir) / f"{name}.json", name=name)
    return load_task(name)


def loosely_unique(task: Task) -> Task:
    """``task`` without pairs that repeat an earlier one up to whitespace and letter case.

    ``next_item`` and ``prev_item`` hold both ``("N", "O")`` and ``("n", "o")``; evaluation refuses
    to score a test pair that matches a training pair that way (it would overstate accuracy), so
    such repeats are dropped before splitting. Tasks without them are unchanged.
    """
    seen, pairs = set(), []
    for pair in task.pairs:
        key = loose_pair_hash(pair)
        if key not in seen:
            seen.add(key)
            pairs.append(pair)
    return task if len(pairs) == len(task.pairs) else Task(task.name, pairs)


def nested_splits(task: Task, seed: int, n_train: int, n_valid: int, n_test: int, n_train_max: int) -> TaskSplits:
    """Test first, then valid, then a train pool: every n shares the seed's test and valid sets."""
    cut = task.split(seed, 0, 0)  # a seeded shuffle of everything into `test`
    pairs = cut.test.pairs
    need = n_test + n_valid + n_train_max
    if need > len(pairs):
        n_test = len(pairs) - n_valid - n_train_max
        if n_test < 1:
            raise ValueError(
                f"{task.name}: {len(pairs)} pairs cannot give n_valid={n_valid} and n_train={n_train_max}."
            )
    test, valid = pairs[:n_test], pairs[n_test : n_test + n_valid]
    train = pairs[n_test + n_valid : n_test + n_valid + n_train]
    return TaskSplits(Task(task.name, train), Task(task.name, valid), Task(task.name, test), seed)


def load(args: argparse.Namespace):
    return load_model(args.model)


def write_outputs(out_dir: str | None, stem: str, table: pd.DataFrame, meta: dict[str, Any]) -> None:
    if not out_dir:
        return
    folder = Path(out_dir)
    atomic_write_text(folder / f"{stem}.csv", table.to_csv(index=False))
    atomic_write_text(folder / f"{stem}.md", to_markdown(table) + "\n")
    atomic_write_text(folder / f"{stem}.meta.json", json.dumps(meta, indent=2) + "\n")


def old_default_layers(n_layers: int) -> list[int]:
    """The candidate layers of the earlier release's default search: every third layer of the middle 70%."""
    lo, hi = round(0.15 * n_layers), round(0.85 * n_layers)
    return list(range(lo, max(hi, lo + 1), 3 if n_layers >= 12 else 1))


def appended_meta(out_dir: str | None, stem: str, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` added to the record already in ``{stem}.meta.json`` (a ``jobs`` list), so a resumed
    job never erases how the earlier rows were made."""
    path = Path(out_dir or ".") / f"{stem}.meta.json"
    if not out_dir or not path.exists():
        return meta
    old = json.loads(path.read_text())
    record = old if "jobs" in old else {"jobs": [old]}
    if not record["jobs"] or record["jobs"][-1] != meta:
        record["jobs"] = [*record["jobs"], meta]
    return record


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub table without needing `tabulate`."""

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import os

    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
