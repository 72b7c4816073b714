"""What the study runner costs on top of a plain loop, on the same 12 cells, side by side in one run.

The 12 cells are ``fit`` cells (``lens_laai.studies`` kind ``"fit"``) on the embedded SmolLM2-135M:
layers 8, 12, 16 × seeds 0, 1 × n = 10, 20, 10 steps at one λ₂, 50 test pairs each. Three ways:

* ``loop``: the model loaded once, then ``fit_cell`` called 12 times in a Python loop (no writes);
* ``serial``: ``run_study(..., workers=0)``: the same cells through the runner in this process
  (config hashing, one Parquet file per cell written atomically, the progress bar);
* ``ray``: ``run_study(..., workers=1)``: one Ray actor, timed from when the actor has loaded the
  model to the last row written (Ray's start-up and the model load are reported apart).

Every way uses one torch thread. Beside the side-by-side ratios, each runner's own share is reported
as wall seconds over the sum of its rows' ``seconds`` (time inside the cells), minus one: on a machine
shared with other jobs, whose speed drifts between the runs, that is the steadier number. The ways run in the order loop, serial, ray, ray, serial, loop (so a
machine load that drifts during the run weighs on each alike; ``--quick``: once each) and the ratios
are of the mean wall seconds over the 12 cells; the runner's target is within 10% of the loop
(ratio ≤ 1.10) once the model is loaded.

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


ORDER = ["loop", "serial", "ray", "ray", "serial", "loop"]


def run_loop(ctx: CellContext, cells) -> tuple[float, list[float]]:
    start = time.perf_counter()
    rows = [fit_cell(ctx, dict(c.config)) for c in cells]
    return time.perf_counter() - start, [r["accuracy"] for r in rows]


IN_CELLS: dict[str, list[float]] = {"serial": [], "ray": []}  # Σ of the rows' own `seconds` per run


def run_serial(grid: Study, ctx: CellContext) -> tuple[float, list[float]]:
    start = time.perf_counter()
    table = run_study(grid, tempfile.mkdtemp(prefix="overhead-serial"), progress=False, threads=1, context=ctx)
    IN_CELLS["serial"].append(float(table.seconds.sum()))
    return time.perf_counter() - start, table.accuracy.tolist()


def run_ray(grid: Study) -> tuple[float, list[float], float]:
    """One actor; timed from the moment it has loaded the model to the table read back (Ray stays up)."""
    marks: dict[str, float] = {}
    start = time.perf_counter()
    table = run_study(
        grid,
        tempfile.mkdtemp(prefix="overhead-ray"),
        workers=1,
        progress=False,
        threads=1,
        on_worker_start=lambda actors: marks.setdefault("warm", time.perf_counter()),
    )
    end = time.perf_counter()
    IN_CELLS["ray"].append(float(table.seconds.sum()))
    return end - marks["warm"], table.accuracy.tolist(), marks["warm"] - start


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

    import ray

    ctx = CellContext()
    start = time.perf_counter()
    ctx.model(args.model)
    load_seconds = time.perf_counter() - start
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_RAY_CONFIG)  # left up
    ways = {"loop": lambda: run_loop(ctx, cells), "serial": lambda: run_serial(grid, ctx), "ray": lambda: run_ray(grid)}
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    accuracies: dict[str, list[list[float]]] = {w: [] for w in ways}
    startup: list[float] = []
    for way in (
        ORDER[:3] if quick else ORDER
    ):  # A B C C B A: a load that drifts during the run weighs on every way alike
        took, acc, *extra = ways[way]()
        seconds[way].append(took)
        accuracies[way].append(sorted(acc))
        startup += extra
    ray.shutdown()
    mean = {w: sum(v) / len(v) for w, v in seconds.items()}
    out = {
        "model": args.model,
        "cells": len(cells),
        "order": ORDER[:3] if quick else ORDER,
        "model_load_seconds": round(load_seconds, 2),
        "loop_seconds": [round(x, 2) for x in seconds["loop"]],
        "serial_runner_seconds": [round(x, 2) for x in seconds["serial"]],
        "ray_seconds_after_load": [round(x, 2) for x in seconds["ray"]],
        "ray_startup_and_load_seconds": [round(x, 2) for x in startup],
        "ratio_serial": round(mean["serial"] / mean["loop"], 3),
        "ratio_ray": round(mean["ray"] / mean["loop"], 3),
        # the runner's own share, robust to a machine whose speed drifts between runs: wall / Σ cell seconds − 1
        "serial_overhead_fraction": round(sum(seconds["serial"]) / sum(IN_CELLS["serial"]) - 1, 4),
        "ray_overhead_fraction": round(sum(seconds["ray"]) / sum(IN_CELLS["ray"]) - 1, 4),
        "same_accuracies": all(a == accuracies["loop"][0] for v in accuracies.values() for a in v),
        "machine": machine(),
    }
    loop_seconds, serial_seconds, ray_seconds = mean["loop"], mean["serial"], mean["ray"]
    print(
        f"{len(cells)} cells on {args.model}: loop {loop_seconds:.1f}s, runner in-process {serial_seconds:.1f}s "
        f"(×{out['ratio_serial']}), one Ray worker {ray_seconds:.1f}s after load (×{out['ratio_ray']}; "
        f"start-up and load {min(out['ray_startup_and_load_seconds']):.1f}s); mean of {len(seconds['loop'])} run(s) each"
    )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
