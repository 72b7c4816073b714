"""``lens-laai study``: run a grid of cells (fits, evaluations, analyses) on this machine or a Ray cluster.

    lens-laai study run STUDY.toml --out runs/study                 # local: one Ray worker per core (or GPU)
    lens-laai study run STUDY.toml --out runs/study --address auto  # on a running Ray cluster
    lens-laai study run STUDY.toml --out runs/study --workers 0     # in this process, no Ray
    lens-laai study status STUDY.toml --out runs/study              # cells done, failed, to run

Results: ``runs/study/cells/*.parquet``, one row per cell (``pd.read_parquet``, DuckDB, or
``lens_laai.studies.read_results``). A rerun skips the cells already done and retries failed ones.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from lens_laai.cli.args import nonnegative_int, positive_int
from lens_laai.errors import LensLaaiError


def add_parser(sub: Any) -> None:
    """Register ``study run`` and ``study status`` on the top-level subparsers.

    Example:
        >>> import argparse
        >>> from lens_laai.cli.study import add_parser
        >>> parser = argparse.ArgumentParser(prog="lens-laai")
        >>> add_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["study", "run", "grid.toml", "--out", "runs/grid", "--workers", "0"])
        >>> args.study_command, args.study, args.out, args.workers, args.func.__name__
        ('run', 'grid.toml', 'runs/grid', 0, 'run_command')
        >>> parser.parse_args(["study", "status", "grid.toml", "--out", "runs/grid"]).func.__name__
        'status_command'
    """
    p = sub.add_parser("study", help="run a grid of fits / evaluations / analyses (locally or on Ray)")
    inner = p.add_subparsers(dest="study_command", required=True)
    run = inner.add_parser("run", help="run every unfinished cell of a study file")
    status = inner.add_parser("status", help="how many cells are done, failed and still to run")
    for q in (run, status):
        q.add_argument("study", help="study TOML file (name, kind, [axes], [fixed])")
        q.add_argument("--out", required=True, help="results folder (Parquet, one file per cell)")
        q.add_argument("--json", action="store_true", help="end with one JSON line")
    run.add_argument("--address", default=None, help="Ray cluster address ('auto', 'ray://head:10001'); default: local")
    run.add_argument(
        "--workers",
        type=nonnegative_int,
        default=None,
        help="Ray workers (default: one per GPU, else per core; on a cluster, one per GPU or CPU); 0: run here, no Ray",
    )
    run.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default 1 when GPUs exist)")
    run.add_argument("--device", default=None, help="device each worker loads the model on (default: cuda with GPUs)")
    run.add_argument("--dtype", default=None, help="model dtype (e.g. bf16)")
    run.add_argument("--threads", type=positive_int, default=None, help="torch threads per worker (default 1 with Ray)")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=run_command)
    status.set_defaults(func=status_command)


def run_command(args: argparse.Namespace) -> int:
    """``lens-laai study run``: run every unfinished cell of a study file; exit 1 if any cell failed.

    Example (two evaluation cells, 0-shot and 2-shot, run in this process; a rerun has nothing to do):
        >>> import contextlib, io, json, os, shutil, tempfile
        >>> from lens_laai.cli.main import main
        >>> from lens_laai.testing import tiny_task
        >>> folder = tempfile.mkdtemp()
        >>> task, study = os.path.join(folder, "tiny.json"), os.path.join(folder, "shots.toml")
        >>> tiny_task().to_json(task)
        >>> lines = ['name = "shots"', 'kind = "evaluate"', "[fixed]", 'model = "lens-laai-tiny"', f'task = "{task}"',
        ...          "n = 6", "n_test = 8", "[axes]", "shots = [0, 2]"]
        >>> with open(study, "w") as f:
        ...     _ = f.write("\\n".join(lines))
        >>> out = os.path.join(folder, "results")
        >>> main(["study", "run", study, "--out", out, "--workers", "0", "--no-progress"])
        /.../results: 2 cells, 2 done, 0 failed, 0 to run
        0
        >>> from lens_laai.studies import read_results
        >>> sorted(read_results(out).shots.tolist())
        [0, 2]
        >>> shutil.rmtree(folder)
    """
    from lens_laai.studies import load_study, run_study

    study = load_study(args.study)
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if _local_gpus() else 0.0)
    workers = args.workers
    if workers is None:
        workers = 0 if args.address else (_local_gpus() if gpus else os.cpu_count() or 1)
        if args.address is None and workers == 0:
            workers = 1
    if workers < 0:
        raise LensLaaiError(f"--workers must be ≥ 0, got {workers}.")
    if workers or args.address:
        try:
            import ray  # noqa: F401
        except ImportError as err:
            raise LensLaaiError(
                "Running a study on workers needs Ray: pip install 'lens-laai[study]' (or --workers 0 to run here)."
            ) from err
    table = run_study(
        study,
        args.out,
        workers=workers,
        address=args.address,
        gpus_per_worker=gpus,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        progress=not args.no_progress,
    )
    return _summary(args, table, len(study.cells()))


def status_command(args: argparse.Namespace) -> int:
    """``lens-laai study status``: how many of a study's cells are done, failed and still to run.

    Example (before and after the study ran):
        >>> import contextlib, io, json, os, shutil, tempfile
        >>> from lens_laai.cli.main import main
        >>> from lens_laai.testing import tiny_task
        >>> folder = tempfile.mkdtemp()
        >>> task, study = os.path.join(folder, "tiny.json"), os.path.join(folder, "shots.toml")
        >>> tiny_task().to_json(task)
        >>> lines = ['name = "shots"', 'kind = "evaluate"', "[fixed]", 'model = "lens-laai-tiny"', f'task = "{task}"',
        ...          "n = 6", "n_test = 8", "[axes]", "shots = [0, 2]"]
        >>> with open(study, "w") as f:
        ...     _ = f.write("\\n".join(lines))
        >>> out = os.path.join(folder, "results")
        >>> main(["study", "status", study, "--out", out, "--json"])
        /.../results: 2 cells, 0 done, 0 failed, 2 to run
        {"out": "/.../results", "cells": 2, "ok": 0, "failed": 0, "to_run": 2}
        0
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     main(["study", "run", study, "--out", out, "--workers", "0", "--no-progress"])
        >>> main(["study", "status", study, "--out", out])
        /.../results: 2 cells, 2 done, 0 failed, 0 to run
        0
        >>> shutil.rmtree(folder)
    """
    from lens_laai.studies import load_study, pending, read_results

    study = load_study(args.study)
    todo, _ = pending(study, args.out)
    return _summary(args, read_results(args.out), len(study.cells()), len(todo))


def _summary(args: argparse.Namespace, table: Any, total: int, todo: int | None = None) -> int:
    ok = int((table["status"] == "ok").sum()) if len(table) else 0
    failed = int((table["status"] == "failed").sum()) if len(table) else 0
    todo = total - ok if todo is None else todo
    print(f"{args.out}: {total} cells, {ok} done, {failed} failed, {todo} to run")
    if failed:
        for row in table[table["status"] == "failed"].head(5).itertuples():
            print(f"  failed {row.cell}: {str(row.error).splitlines()[0]}")
    if args.json:
        print(json.dumps({"out": args.out, "cells": total, "ok": ok, "failed": failed, "to_run": todo}))
    return 1 if failed else 0


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
