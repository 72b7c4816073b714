"""What a whole fit costs: the old default search, the new one, and Function Vectors' head search.

Side by side in one run, on the same tasks, seeds and test sets (n labelled pairs, zero-shot prompts):

* ``old``: the search the library shipped before the honest protocol: a single-layer sweep over
  every third layer of the middle 70% (8 layers on SmolLM2), λ₂ = 0.3 (absolute), 50 steps, layer
  chosen on 40 *extra* validation pairs (``select="valid"``);
* ``new``: ``fit(model, task, n_train=n)`` with today's defaults (cross-validation on the n pairs
  chooses the λ₂ point, relative to λ_max, and the mode; half the training prompts carry 5
  demonstrations and count what they cost; then a relaxed refit on all n), scored in its mode;
* ``fv``: Function Vectors (Todd et al.): mean head activations and causal indirect effects over
  every head on 16 corrupted 10-shot prompts, top 10 heads; its add-layer and scale chosen on the n pairs;
* ``md`` (not run by default): mean difference on ``hook_z``, its layer and α chosen on the n pairs.

Cost is in forward-pass equivalents (one full forward of one zero-shot prompt; backward = 2) and
seconds; accuracy is top-1 of the target's first token on the same held-out test set.

    OMP_NUM_THREADS=1 python benchmarks/search_cost.py --data-dir ../shared/datasets/function_vectors \\
        --out-dir docs/results/search_cost --workers 2 --json      # or --address auto on a Ray cluster
    python benchmarks/search_cost.py --summarise-only --out-dir docs/results/search_cost --json
    python benchmarks/search_cost.py --model lens-laai-tiny --quick --json

The grid (task × seed × method) runs as a study (:mod:`lens_laai.studies`): one Parquet row per cell
under ``OUT_DIR/search_cost.study``, a rerun skips the finished cells, ``--workers``/``--address``
spread the cells over Ray workers. ``rows.csv`` is the table of every finished cell.

With ``--json`` the last line is one JSON object with ``old_forward_equivalents``,
``new_forward_equivalents``, ``fv_forward_equivalents``, ``old_accuracy``, ``new_accuracy`` (means
over task × seed), the paired accuracy difference (new − old: mean, std, min, max) and per-task rows.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import (
    TASKS,
    TINY,
    add_study_args,
    get_task,
    machine,
    nested_splits,
    old_default_layers,
    parser,
    run_grid,
    to_markdown,
    write_outputs,
)

from lens_laai import Task, TaskSplits, evaluate, fit
from lens_laai.baselines import fit_function_vector, fit_mean_difference
from lens_laai.fitting.fit import default_layers

METHODS = ("old", "new", "fv", "md")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_study_args(p)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--methods", default="old,new,fv")
    p.add_argument(
        "--layers",
        default=None,
        help="candidate layers of fv and md (default: the library's default_layers; "
        "the published table used 4,8,12,16,20 on SmolLM2)",
    )
    p.add_argument("--summarise-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out_dir) if args.out_dir else None
    if args.summarise_only:
        if out is None:
            p.error("--summarise-only needs --out-dir")
        return report(_read(out), args)
    methods = [m for m in args.methods.split(",") if m]
    if set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {METHODS}")
    tasks, seeds, n, n_test = args.tasks.split(","), [int(s) for s in args.seeds.split(",")], args.n, args.n_test
    quick = args.quick or args.model == TINY
    if quick:
        tasks, seeds, n, n_test = tasks[:1], [0], 8, 6
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    fixed = {"model": args.model, "data_dir": args.data_dir, "n": n, "n_test": n_test, "quick": quick}
    if layers is not None:
        fixed["layers"] = layers
    table = run_grid("search_cost", "search_cost:cell", {"task": tasks, "seed": seeds, "method": methods}, fixed, args)
    table = table.drop(columns="seconds").rename(
        columns={"fit_seconds": "seconds", "result_n_test": "n_test"}
    )  # n_test: the split's size
    grid = {"task": tasks, "seed": seeds, "method": methods}
    order = {key: i for i, key in enumerate(itertools.product(*grid.values()))}  # rows in grid order
    table = table.iloc[sorted(range(len(table)), key=lambda i: order[tuple(table[a].iloc[i] for a in grid)])]
    rows = table[["task", "seed", "method", *ROW_COLUMNS]].reset_index(drop=True)
    if out:
        write_outputs(str(out), "rows", rows, {"args": vars(args), "machine": machine()})
    return report(_read(out) if out else rows, args)


ROW_COLUMNS = ["accuracy", "forward_equivalents", "seconds", "labelled_pairs", "n_test", "detail"]


def cell(ctx, config: dict) -> dict:
    """One (task, seed, method) cell of the study: split, fit, score (the study's cell kind)."""
    model = ctx.model(config["model"])
    task = get_task(config["task"], config["data_dir"], config["model"])
    quick, n = config["quick"], config["n"]
    splits = nested_splits(task, config["seed"], n, 4 if quick else 40, config["n_test"], n)
    return run(config["method"], model, splits, quick, config.get("layers"))


def run(method: str, model, splits: TaskSplits, quick: bool, layers: list[int] | None = None) -> dict:
    """Fit one method on one split; its cost, choice and test accuracy (fv and md choose among ``layers``)."""
    layers = layers or default_layers(model.cfg.n_layers)
    honest = TaskSplits(splits.train, Task(splits.train.name, []), splits.test, splits.seed)
    steps = {"steps": 2} if quick else {}
    start = time.perf_counter()
    if method == "old":
        res = fit(
            model,
            splits,
            "sweep",
            layers=old_default_layers(model.cfg.n_layers),
            group_l1=0.3,
            select="valid",
            progress=False,
            **({"steps": 2} if quick else {"steps": 50}),
        )
        iv, fe, detail = res.intervention, res.forward_equivalents, f"layer={res.layer} heads={len(res.selected_heads)}"
    elif method == "new":
        res = fit(model, honest, progress=False, **steps)
        iv, fe = res.intervention, res.forward_equivalents
        detail = (
            f"layer={res.layer} group_l1_rel={res.config.group_l1} heads={len(res.selected_heads)} mode={res.mode.name}"
        )
    elif method == "md":
        res = fit_mean_difference(
            model,
            honest,
            "auto",
            layers=layers,
            shots=min(10, len(splits.train) - 1),
            progress=False,
        )
        iv, fe, detail = res.intervention, res.forward_equivalents, f"layer={res.layer} alpha={res.alpha:g}"
    else:
        shots = min(10, len(splits.train) - 1)
        res = fit_function_vector(
            model,
            honest,
            top_k=min(10, model.cfg.n_heads * model.cfg.n_layers),
            layers=layers,
            shots=shots,
            n_prompts=4 if quick else 16,
            scales=(1.0, 2.0, 4.0, 8.0),
            progress=False,
        )
        iv, fe, detail = res.intervention, res.forward_equivalents, f"layer={res.layer} scale={res.scale:g}"
    seconds = time.perf_counter() - start
    labelled = len(splits.train) + (len(splits.valid) if method == "old" else 0)
    return {
        "accuracy": evaluate(model, honest, iv).accuracy,
        "forward_equivalents": round(fe, 1),
        "fit_seconds": round(seconds, 2),
        "labelled_pairs": labelled,
        "n_test": len(splits.test),
        "detail": detail,
    }


def _read(out: Path | None) -> pd.DataFrame:
    """``rows.csv`` (the study's table), plus rows of older per-shard files for cells it does not hold."""
    if out is None:
        return pd.DataFrame()
    new = pd.read_csv(out / "rows.csv") if (out / "rows.csv").exists() else pd.DataFrame()
    legacy = [pd.read_csv(f) for f in sorted(out.glob("rows*.shard*.csv"))]
    if not legacy:
        return new
    old = pd.concat(legacy)
    if not new.empty:
        have = set(zip(new.task, new.seed, new.method))
        old = old[[k not in have for k in zip(old.task, old.seed, old.method)]]
    return pd.concat([new, old], ignore_index=True)


def report(rows: pd.DataFrame, args) -> int:
    if rows.empty:
        print("no rows yet", file=sys.stderr)
        return 1
    per_task = rows.pivot_table(
        index="task",
        columns="method",
        values=["accuracy", "forward_equivalents", "seconds"],
        aggfunc="mean",
        sort=False,
    )
    per_task.columns = [f"{m}_{v}" for v, m in per_task.columns]
    per_task = per_task.reset_index()
    wide = rows.pivot_table(index=["task", "seed"], columns="method", values="accuracy")
    summary: dict = {"units": int(len(wide))}
    for m in METHODS:
        part = rows[rows.method == m]
        if not part.empty:
            summary[f"{m}_forward_equivalents"] = round(float(part.forward_equivalents.mean()), 1)
            summary[f"{m}_seconds"] = round(float(part.seconds.mean()), 2)
            summary[f"{m}_accuracy"] = round(float(part.accuracy.mean()), 4)
    if {"old", "new"} <= set(wide.columns):
        diff = (wide["new"] - wide["old"]).dropna()
        summary["paired_new_minus_old"] = {
            "mean": round(float(diff.mean()), 4),
            "std": round(float(diff.std()), 4) if len(diff) > 1 else None,
            "min": round(float(diff.min()), 4),
            "max": round(float(diff.max()), 4),
            "n": int(len(diff)),
        }
    if args.out_dir:
        write_outputs(
            args.out_dir, "search_cost", per_task, {"args": vars(args), "machine": machine(), "summary": summary}
        )
    print(to_markdown(per_task))
    print("\n" + to_markdown(rows[["task", "seed", "method", "accuracy", "forward_equivalents", "seconds", "detail"]]))
    if args.json:
        print(json.dumps({**summary, "per_task": per_task.round(4).to_dict("records")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
