"""What the study runner costs on top of a plain loop, on the same 12 cells, side by side in one run.

The 12 cells are ``fit`` cells (``lens_laai.studies`` kind ``"fit"``) on the embedded SmolLM2-135M:
layers 8, 12, 16 × seeds 0, 1 × n = 10, 20, 10 steps at one λ₂, 50 test pairs each. Three ways:

* ``loop``: the model loaded once, then ``fit_cell`` called 12 times in a Python loop (no writes);
* ``serial``: ``run_study(..., workers=0)``: the same cells through the runner in this process
  (config hashing, one Parquet file per cell written atomically, the progress bar);
* ``ray``: ``run_study(..., workers=1)``: one Ray actor, timed from when the actor has loaded the
  model to the last row written (Ray's start-up and the model load are reported apart).

Every way uses one torch thread. The ratios are of wall seconds over the 12 cells; the runner's
target is within 10% of the loop (ratio ≤ 1.10) once the model is loaded.

    OMP_NUM_THREADS=1 python benchmarks/study_overhead.py --json
    python benchmarks/study_overhead.py --model lens-laai-tiny --quick --json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import TINY, machine, parser

from lens_laai.studies import CellContext, Study, run_study
from lens_laai.studies.cells import fit_cell
from lens_laai.studies.runner import LOCAL_RAY_CONFIG


def study(model: str, quick: bool, task: str) -> Study:
    layers = [0, 1, 2] if quick else [8, 12, 16]
    fixed = {"model": model, "task": task, "n_test": 8 if quick else 50, "steps": 3 if quick else 10}
    return Study(
        "overhead",
        "fit",
        axes={"layer": layers, "seed": [0, 1], "n": [6, 8] if quick else [10, 20]},
        fixed={**fixed, "group_l1_rel": 0.05},
    )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--task", default="antonym")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    quick = args.quick or args.model == TINY
    task = args.task
    if args.model == TINY:
        from lens_laai.testing import tiny_task

        task = str(tempfile.mkdtemp(prefix="overhead")) + "/tiny.json"
        tiny_task().to_json(task)
    grid = study(args.model, quick, task)
    cells = grid.cells()

    ctx = CellContext()
    start = time.perf_counter()
    ctx.model(args.model)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loop = [fit_cell(ctx, dict(c.config)) for c in cells]
    loop_seconds = time.perf_counter() - start

    start = time.perf_counter()
    serial = run_study(grid, tempfile.mkdtemp(prefix="overhead-serial"), progress=False, threads=1, context=ctx)
    serial_seconds = time.perf_counter() - start  # the same loaded model
    serial_cells = float(serial.seconds.sum())

    import ray

    marks: dict[str, float] = {}
    start = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_RAY_CONFIG)  # left up
    ray_table = run_study(
        grid,
        tempfile.mkdtemp(prefix="overhead-ray"),
        workers=1,
        progress=False,
        threads=1,
        on_worker_start=lambda actors: marks.setdefault("warm", time.perf_counter()),
    )
    end = time.perf_counter()  # the last row written and read back; Ray still up
    ray.shutdown()
    ray_seconds = end - marks["warm"]
    same = sorted(r["accuracy"] for r in loop) == sorted(serial.accuracy) == sorted(ray_table.accuracy)
    out = {
        "model": args.model,
        "cells": len(cells),
        "model_load_seconds": round(load_seconds, 2),
        "loop_seconds": round(loop_seconds, 2),
        "serial_runner_seconds": round(serial_seconds, 2),
        "serial_cell_seconds": round(serial_cells, 2),
        "ray_seconds_after_load": round(ray_seconds, 2),
        "ray_startup_and_load_seconds": round(marks["warm"] - start, 2),
        "ratio_serial": round(serial_seconds / loop_seconds, 3),
        "ratio_ray": round(ray_seconds / loop_seconds, 3),
        "same_accuracies": same,
        "machine": machine(),
    }
    print(
        f"{len(cells)} cells on {args.model}: loop {loop_seconds:.1f}s, runner in-process {serial_seconds:.1f}s "
        f"(×{out['ratio_serial']}), one Ray worker {ray_seconds:.1f}s after load (×{out['ratio_ray']}; "
        f"start-up and load {out['ray_startup_and_load_seconds']:.1f}s)"
    )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
