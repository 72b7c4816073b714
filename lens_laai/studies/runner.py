"""Run a study's cells: in this process, or on Ray actors (one per device), into the results table.

:func:`run_study` skips cells whose row is on disk with status ``"ok"`` (a failed cell runs again),
runs the rest and writes each row as soon as it arrives, so an interrupted study loses at most the
cells in flight. A cell that raises becomes a ``"failed"`` row with its error; the study goes on.

With ``workers > 0`` (or an ``address``) the cells go to Ray actors. Each actor loads the model once
and serves many cells; an actor whose process dies is restarted by Ray and its unfinished call
retried (``max_restarts=-1, max_task_retries=-1``), so a killed worker costs the cell it held, not
the study. Rows are written by this (the driving) process only, so every cell ends exactly once in
the table. Without an ``address`` a local Ray instance is started for the run and stopped after it.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from lens_laai.studies.cells import CellContext, check_settings, resolve_kind
from lens_laai.studies.spec import Cell, Study, StudyError, canonical_json
from lens_laai.studies.store import ResultStore, make_row, read_results

# Ray starts its workers at nice 15; a study's workers are the work, so on a machine shared with other
# jobs they run at normal priority, like the plain loop they replace.
LOCAL_RAY_CONFIG = {"worker_niceness": 0}


class CellRunner:
    """Runs cells one after another in one process (a Ray actor wraps one of these per device).

    Example:
        >>> import tempfile
        >>> from lens_laai.studies.spec import Study
        >>> from lens_laai.testing import tiny_task
        >>> task = tempfile.mkdtemp() + "/tiny.json"
        >>> tiny_task().to_json(task)
        >>> fixed = {"model": "lens-laai-tiny", "task": task, "n": 8}
        >>> study = Study("demo", "evaluate", axes={"shots": [0, 2]}, fixed=fixed)
        >>> runner = CellRunner(study)
        >>> row = runner.run(study.cells()[1])
        >>> row["status"], row["shots"], 0 <= row["accuracy"] <= 1, row["attempt"]
        ('ok', 2, True, 1)
    """

    def __init__(
        self,
        study: Study,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        context: CellContext | None = None,
    ):
        for p in study.paths:
            if p not in sys.path:
                sys.path.insert(0, p)
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.study, self.ctx = study, context or CellContext(device, dtype)
        self.kind = resolve_kind(study.kind)
        self.worker = f"{os.uname().nodename}:{os.getpid()}"
        self.attempts: dict[str, int] = {}

    def pid(self) -> int:
        return os.getpid()

    def warm(self, model: str | None) -> str | None:
        """Load ``model`` now (so the first cell's time does not include it)."""
        if model:
            self.ctx.model(model)
        return self.ctx.loaded

    def run(self, cell: Cell) -> dict[str, Any]:
        """The cell's row: metrics and cost, or ``status="failed"`` with the error."""
        self.attempts[cell.key] = self.attempts.get(cell.key, 0) + 1
        start = time.perf_counter()
        try:
            result = self.kind(self.ctx, dict(cell.config))
            if not isinstance(result, dict):
                raise StudyError(f"cell kind {cell.kind!r} returned {type(result).__name__}, not a dict of metrics")
            result = {k: v for k, v in result.items() if not k.startswith("_")}
            status, error = "ok", None
        except Exception as err:  # a cell's failure is data: recorded, and the study goes on
            result, status = None, "failed"
            error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}"
        return make_row(
            self.study.name,
            cell,
            status,
            result,
            error,
            seconds=time.perf_counter() - start,
            worker=self.worker,
            attempt=self.attempts[cell.key],
            finished_at=pd.Timestamp.now(tz="UTC").isoformat(),
        )


def pending(study: Study, out: str | os.PathLike) -> tuple[list[Cell], int]:
    """The cells still to run (grouped by model, so a worker rarely reloads) and how many are done.

    Example:
        >>> import tempfile
        >>> from lens_laai.studies.spec import Study
        >>> from lens_laai.testing import tiny_task
        >>> task = tempfile.mkdtemp() + "/tiny.json"
        >>> tiny_task().to_json(task)
        >>> fixed = {"model": "lens-laai-tiny", "task": task, "n": 8}
        >>> study = Study("demo", "evaluate", axes={"shots": [0, 2]}, fixed=fixed)
        >>> out = tempfile.mkdtemp()
        >>> todo, done = pending(study, out)
        >>> len(todo), done
        (2, 0)
        >>> _ = run_study(study, out, progress=False)
        >>> pending(study, out)
        ([], 2)
    """
    cells = study.cells()
    for cell in cells:
        check_settings(cell.kind, cell.config)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise StudyError(f"Study {study.name!r} has cells with the same config; remove the repeated axis values.")
    done = {k for k, status in ResultStore(out).finished().items() if status == "ok"}
    todo = [c for c in cells if c.key not in done]
    todo.sort(key=lambda c: canonical_json(c.model))
    return todo, len(cells) - len(todo)


def run_study(
    study: Study,
    out: str | os.PathLike,
    *,
    workers: int = 0,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    on_worker_start: Any = None,
    context: CellContext | None = None,
) -> pd.DataFrame:
    """Run every unfinished cell of ``study`` and return the whole results table (:func:`read_results`).

    Args:
        out: the output folder; rows go to ``out/cells/{key}.parquet`` and the study to ``out/study.json``.
        workers: 0 runs the cells here, in order; N > 0 runs them on N Ray actors. With ``address``
            and ``workers=0``: one actor per GPU of the cluster (``gpus_per_worker`` 1), else per CPU.
        address: a Ray cluster (``"auto"``, ``"ray://host:10001"``); without it a local instance.
        gpus_per_worker: GPUs each actor reserves (``1`` on a GPU cluster; ``device`` then defaults to ``"cuda"``).
        threads: torch threads per worker (default: 1 with Ray, torch's own choice here).
        on_worker_start: called with the list of actor handles once they are up (tests use it).
        context: for ``workers=0``: a :class:`CellContext` to run in, e.g. one holding a model you
            have loaded (``ctx = CellContext(); ctx.model("smollm2-135m")``), so it is not loaded again.

    Example:
        >>> import tempfile
        >>> from lens_laai.studies.spec import Study
        >>> from lens_laai.testing import tiny_task
        >>> task = tempfile.mkdtemp() + "/tiny.json"
        >>> tiny_task().to_json(task)
        >>> fixed = {"model": "lens-laai-tiny", "task": task, "n": 8}
        >>> study = Study("demo", "evaluate", axes={"shots": [0, 2]}, fixed=fixed)
        >>> table = run_study(study, tempfile.mkdtemp(), progress=False)
        >>> table[["shots", "status", "labelled_pairs"]].sort_values("shots").values.tolist()
        [[0, 'ok', 0], [2, 'ok', 8]]
        >>> bool(table.accuracy.between(0, 1).all()), bool((table.forward_equivalents > 0).all())
        (True, True)
    """
    todo, done = pending(study, out)  # checks every cell's settings before anything is written
    store = ResultStore(out)
    store.root.mkdir(parents=True, exist_ok=True)
    _record_study(study, store.root)
    total = done + len(todo)
    bar = tqdm(total=total, initial=done, desc=f"study {study.name}", unit="cell", disable=not progress)
    failed = 0
    rows = (
        _run_serial(study, todo, device, dtype, threads, context)
        if not (workers or address)
        else _run_ray(study, todo, workers, address, gpus_per_worker, device, dtype, threads, on_worker_start)
    )
    for row in rows:
        store.write(row)
        failed += row["status"] != "ok"
        bar.update(1)
        bar.set_postfix(failed=failed)
    bar.close()
    return read_results(out)


def _run_serial(study: Study, todo: list[Cell], device, dtype, threads, context) -> Iterator[dict[str, Any]]:
    if not todo:
        return
    runner = CellRunner(study, device, dtype, threads, context)
    for cell in todo:
        yield runner.run(cell)


def _run_ray(
    study: Study, todo: list[Cell], workers: int, address, gpus: float, device, dtype, threads, on_worker_start
) -> Iterator[dict[str, Any]]:
    import ray

    if not todo:
        return
    actors: list = []
    started = not ray.is_initialized()
    if started:
        local: dict[str, Any] = {"num_cpus": workers, "_system_config": LOCAL_RAY_CONFIG} if not address else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **local)
    try:
        n = workers or _cluster_workers(gpus)
        actor: Any = ray.remote(CellRunner).options(
            num_cpus=1, num_gpus=gpus, max_restarts=-1, max_task_retries=-1, max_concurrency=1
        )
        device = device or ("cuda" if gpus else None)
        actors += [actor.remote(study, device, dtype, threads or 1) for _ in range(min(n, len(todo)))]
        first_model = todo[0].model
        ray.get([a.warm.remote(first_model) for a in actors])
        if on_worker_start is not None:
            on_worker_start(actors)
        yield from _serve(study.name, actors, todo)
    finally:
        for a in actors:  # also after an error or Ctrl-C: free the workers' devices
            ray.kill(a, no_restart=True)
        if started:
            ray.shutdown()


def _serve(name: str, actors: list, todo: list[Cell]) -> Iterator[dict[str, Any]]:
    """Keep every actor busy with one cell at a time; yield rows as they finish.

    A call that Ray gives up on (an actor that cannot be restarted) becomes a failed row, so the
    cell is still accounted for; a cell whose actor was restarted is simply retried by Ray.
    """
    import ray

    queue, running = list(reversed(todo)), {}
    for a in actors:
        if queue:
            cell = queue.pop()
            running[a.run.remote(cell)] = (a, cell)
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, cell = running.pop(ref)
        try:
            yield ray.get(ref)
        except ray.exceptions.RayError as err:
            yield make_row(name, cell, "failed", None, f"{type(err).__name__}: {err}", worker="ray", attempt=-1)
        if queue:
            nxt = queue.pop()
            running[actor.run.remote(nxt)] = (actor, nxt)


def _cluster_workers(gpus: float) -> int:
    import ray

    resources = ray.cluster_resources()
    if gpus:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1)))


def _record_study(study: Study, root: Path) -> None:
    import json

    from lens_laai.storage.bundle import atomic_write_text

    path = root / "study.json"
    record = study.to_dict()
    if os.path.lexists(path):
        old = _read_record(path)
        if old.get("kind") != record["kind"]:
            raise StudyError(
                f"{root} holds results of a study of kind {old.get('kind')!r}; this one is {record['kind']!r}. "
                "Use another --out folder."
            )
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _read_record(path: Path) -> dict[str, Any]:
    """The study record a run left in its output folder, or a :class:`StudyError` naming the file and the fix."""
    from lens_laai.storage.safe_read import loads_json, read_regular_file

    fix = (
        f"If the results in {path.parent} are this study's, delete {path.name} there and run again "
        "(finished cells are kept); otherwise use another --out folder."
    )
    try:
        old = loads_json(read_regular_file(path, StudyError), f"Study record {path}", StudyError)
    except StudyError as err:
        raise StudyError(f"{err} {fix}") from None
    if not isinstance(old, dict):
        raise StudyError(f"Study record {path}: expected a JSON object, found {type(old).__name__}. {fix}")
    return old
