"""Rule-understanding benchmark: every method on one harness, across training sizes and seeds.

For each task, seed and training size n, the seed fixes one test set (≥ 200 pairs where the data
allows) and one validation set shared by all n; the first n pairs of the seed's training pool are
the examples every method may use. Methods: zero-shot and k-shot prompting (k = 5, 10; k ≤ n),
Function Vectors (the paper's unscaled vector, and "scaled": its scale chosen on validation from
1, 2, 4, 8, as mean difference chooses its α), mean difference on hook_z, LAAI without the Lasso
terms (λ₁ = λ₂ = 0) and LAAI (layer and λ₂ chosen on validation): all of these choose on the
validation set, the older protocol; and ``laai-default``, today's ``fit(model, task, n_train=n)``,
which uses the n pairs and nothing else. Metric: top-1 accuracy of the
target's first token. Cost: forward-pass equivalents (one full forward of one zero-shot prompt) and
wall seconds of fitting.

    python benchmarks/rule_tasks.py --data-dir ../shared/datasets/function_vectors --out-dir docs/results
    python benchmarks/rule_tasks.py --model lens-laai-tiny --quick --json

With --json the last line is a JSON list of rows {task, method, n, seed, accuracy,
forward_equivalents, seconds}. --out-dir writes rule_tasks.csv / .md (mean ± std over seeds) and
sample_efficiency.png, plus rule_tasks_n{n}.md (method × task) per n; --summarise-only rebuilds those
files from the rows CSV without running anything. The grid (task × seed × n × method) runs as a study
(:mod:`lens_laai.studies`): one Parquet row per cell under OUT_DIR/rule_tasks.study, a rerun skips the
finished cells, and --workers N / --address spread the cells over Ray workers.
"""

from __future__ import annotations

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
    appended_meta,
    get_task,
    machine,
    nested_splits,
    parser,
    run_grid,
    to_markdown,
    write_outputs,
)

from lens_laai import Task, TaskSplits, evaluate, fit
from lens_laai.baselines import fit_function_vector, fit_mean_difference, prompting_cost

METHODS = [
    "zero-shot",
    "5-shot",
    "10-shot",
    "function-vector",
    "function-vector-scaled",
    "mean-difference",
    "laai-no-lasso",
    "laai",
    "laai-default",
]
FV_SCALES = {"function-vector": (1.0,), "function-vector-scaled": (1.0, 2.0, 4.0, 8.0)}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--n", default="5,10,20,50", help="training sizes")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-valid", type=int, default=40)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layers", default="6,9,12,15,18", help="candidate layers for LAAI, mean difference and FV")
    p.add_argument("--group-l1", default="0.6,0.3,0.1", help="LAAI λ₂ path (best on validation)")
    p.add_argument("--steps", type=int, default=40, help="LAAI proximal steps per (layer, λ₂)")
    p.add_argument("--fv-prompts", type=int, default=16, help="shuffled-label prompts for the FV head search")
    p.add_argument(
        "--summarise-only",
        action="store_true",
        help="rebuild the tables and figure in --out-dir from its rows CSV; run nothing",
    )
    p.add_argument(
        "--extra-rows",
        default=None,
        help="with --summarise-only: a CSV of more rows (task, method, n, seed, accuracy, labelled_pairs) "
        "drawn in the figure only, e.g. the honest-protocol runs",
    )
    add_study_args(p)
    args = p.parse_args(argv)
    if args.summarise_only:
        return summarise_only(p, args)
    sizes, seeds = _ints(args.n), _ints(args.seeds)
    layers = _ints(args.layers)
    if args.quick or args.model == TINY:
        sizes, seeds, layers, args.steps, args.n_test, args.n_valid, args.fv_prompts = [4, 6], [0], [1], 3, 8, 4, 4
        args.tasks = args.tasks.split(",")[0]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    fixed = {
        "model": args.model,
        "data_dir": args.data_dir,
        "n_valid": args.n_valid,
        "n_test": args.n_test,
        "n_train_max": max(sizes),
        "layers": layers,
        "group_l1": args.group_l1,
        "steps": args.steps,
        "fv_prompts": args.fv_prompts,
        "quick": bool(args.quick),
    }
    axes = {"task": args.tasks.split(","), "seed": seeds, "n": sizes, "method": methods}
    table = run_grid("rule_tasks", "rule_tasks:cell", axes, fixed, args)
    table = table[~table.skipped.astype(bool)] if "skipped" in table else table
    table = table.drop(columns="seconds").rename(columns={"fit_seconds": "seconds", "result_n_test": "n_test"})
    rows = table[ROW_COLUMNS].sort_values(["task", "seed", "n", "method"], key=_grid_order(axes), kind="stable")
    rows = rows.reset_index(drop=True)
    if args.out_dir:
        meta = {"args": vars(args), "machine": machine()}
        write_outputs(args.out_dir, "rule_tasks_rows", rows, appended_meta(args.out_dir, "rule_tasks_rows", meta))
    report(rows, args)
    return 0


ROW_COLUMNS = [
    "task",
    "method",
    "n",
    "seed",
    "accuracy",
    "forward_equivalents",
    "fit_forward_equivalents",
    "seconds",
    "n_test",
    "detail",
    "labelled_pairs",
]


def _grid_order(axes: dict[str, list]):
    """Sort key: each column in the order of its axis (the order the old loop ran them)."""
    return lambda col: col.map({v: i for i, v in enumerate(axes[col.name])})


def cell(ctx, config: dict) -> dict:
    """One (task, seed, n, method) cell: the seed's nested split, then the method (the study's cell kind)."""
    from types import SimpleNamespace

    model = ctx.model(config["model"])
    task = get_task(config["task"], config["data_dir"], config["model"])
    n = config["n"]
    splits = nested_splits(task, config["seed"], n, config["n_valid"], config["n_test"], config["n_train_max"])
    layers = [l for l in config["layers"] if l < model.cfg.n_layers]
    settings = SimpleNamespace(**{k: config[k] for k in ("group_l1", "steps", "fv_prompts", "quick")})
    row = run_method(config["method"], model, splits, n, layers, settings)
    return {"skipped": True} if row is None else {**row, "skipped": False}


def summarise_only(p, args) -> int:
    csv = Path(args.out_dir or ".") / "rule_tasks_rows.csv"
    if not args.out_dir or not csv.exists():
        p.error(f"--summarise-only needs --out-dir with a rule_tasks_rows.csv in it (looked for {csv}).")
    report(pd.read_csv(csv), args)
    return 0


PROMPTING = ("zero-shot", "5-shot", "10-shot")


def labelled_pairs(table: pd.DataFrame, n_valid: int) -> pd.Series:
    """Labelled pairs each row's method used: n for prompting, n + the validation pairs for the fitted methods
    (rows of this script choose layer, λ, α or scale on ``n_valid`` extra pairs), unless the row says."""
    used = table.n + table.method.map(lambda m: 0 if m in PROMPTING else n_valid)
    if "labelled_pairs" in table:
        used = table.labelled_pairs.fillna(used)
    return used.astype(int)


def report(table: pd.DataFrame, args) -> None:
    """Print the summary; with --out-dir write it, the method × task table per n, and the figure."""
    summary = summarise(table)
    print(to_markdown(summary))
    if args.out_dir and not table.empty:
        meta = {"args": vars(args), "machine": machine()}
        write_outputs(args.out_dir, "rule_tasks", summary, meta)
        for n in sorted(table.n.unique()):
            write_outputs(args.out_dir, f"rule_tasks_n{n}", by_method_and_task(table[table.n == n]), meta)
        extra = pd.read_csv(args.extra_rows) if getattr(args, "extra_rows", None) else None
        plot(table, Path(args.out_dir) / "sample_efficiency.png", args.n_valid, extra)
    if args.json:
        keep = ["task", "method", "n", "seed", "accuracy", "forward_equivalents", "seconds"]
        print(json.dumps(table[keep].to_dict("records")))


def run_method(method: str, model, splits, n: int, layers: list[int], args) -> dict | None:
    """Fit (if the method fits anything) and score one method; ``None`` when it cannot run at this n."""
    start = time.perf_counter()
    progress = False
    shots = min(10, n - 1) if n > 1 else 0
    n_test = len(splits.test)
    if method in ("zero-shot", "5-shot", "10-shot"):
        k = {"zero-shot": 0, "5-shot": 5, "10-shot": 10}[method]
        if k > n:
            return None
        acc = evaluate(model, splits, shots=k).accuracy
        return {
            **_row(acc, prompting_cost(model, splits, shots=k) * n_test, 0.0, n_test, fit_fe=0.0, extra=f"k={k}"),
            "labelled_pairs": n,
        }
    if method in FV_SCALES:
        res = fit_function_vector(
            model,
            splits,
            top_k=10,
            layers=layers,
            shots=shots,
            n_prompts=args.fv_prompts,
            scales=FV_SCALES[method],
            progress=progress,
        )
        iv, extra = res.intervention, f"layer={res.layer} scale={res.scale:g} heads={len(res.heads)}"
        fit_fe = res.forward_equivalents
    elif method == "mean-difference":
        res = fit_mean_difference(model, splits, "auto", layers=layers, shots=shots, progress=progress)
        iv, extra, fit_fe = (
            res.intervention,
            f"layer={res.layer} alpha={res.alpha} heads={len(res.selected_heads)}",
            res.forward_equivalents,
        )
    elif method == "laai-default":  # the honest default: the n pairs and nothing else
        honest = TaskSplits(splits.train, Task(splits.train.name, []), splits.test, splits.seed)
        res = fit(model, honest, progress=progress, **({"steps": args.steps} if args.quick else {}))
        iv, fit_fe = res.intervention, res.forward_equivalents
        extra = f"layer={res.layer} group_l1_rel={res.config.group_l1} heads={len(res.selected_heads)}"
    else:
        lambdas = [0.0] if method == "laai-no-lasso" else [float(x) for x in args.group_l1.split(",")]
        res = fit(
            model,
            splits,
            "sweep",
            layers=layers,
            group_l1=lambdas,
            l1=0.0 if method == "laai-no-lasso" else 1e-3,
            steps=args.steps,
            progress=progress,
        )
        iv, fit_fe = res.intervention, res.forward_equivalents
        extra = f"layer={res.layer} group_l1={res.config.group_l1} heads={len(res.selected_heads)}"
    seconds = time.perf_counter() - start
    acc = evaluate(model, splits, iv).accuracy
    row = _row(acc, fit_fe + n_test, seconds, n_test, fit_fe=fit_fe, extra=extra)
    return {**row, "labelled_pairs": n if method == "laai-default" else n + len(splits.valid)}


def _row(acc: float, fe: float, seconds: float, n_test: int, fit_fe: float, extra: str) -> dict:
    return {
        "accuracy": acc,
        "forward_equivalents": round(fe, 1),
        "fit_forward_equivalents": round(fit_fe, 1),
        "fit_seconds": round(seconds, 2),
        "n_test": n_test,
        "detail": extra,
    }


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std accuracy over seeds, one row per (task, n, method), plus mean fitting cost."""
    if table.empty:
        return table
    g = table.groupby(["task", "n", "method"], sort=False)
    out = g.agg(
        accuracy_mean=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"),
        seeds=("seed", "nunique"),
        fit_forward_equivalents=("fit_forward_equivalents", "mean"),
        fit_seconds=("seconds", "mean"),
    ).reset_index()
    out["accuracy"] = [f"{m:.3f} ± {0 if pd.isna(s) else s:.3f}" for m, s in zip(out.accuracy_mean, out.accuracy_std)]
    return out[["task", "n", "method", "accuracy", "seeds", "fit_forward_equivalents", "fit_seconds"]]


def by_method_and_task(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method, one column per task: "mean ± std (seeds)" accuracy, plus mean fit cost.

    The cost columns average over every row of the method; rows without seconds (blank) are skipped.
    """
    cells = table.groupby(["method", "task"], sort=False).accuracy.agg(["mean", "std", "count"]).reset_index()
    cells["text"] = [
        f"{m:.3f} ± {0 if pd.isna(s) else s:.3f} ({c})" for m, s, c in zip(cells["mean"], cells["std"], cells["count"])
    ]
    wide = cells.pivot(index="method", columns="task", values="text")
    wide = wide.reindex([m for m in METHODS if m in wide.index])[list(dict.fromkeys(table.task))].fillna("–")
    cost = table.groupby("method").fit_forward_equivalents.mean().round().astype(int)
    wide["mean fit forward-equivalents"] = cost.reindex(wide.index).values
    seconds = table.groupby("method").seconds.mean().round().astype("Int64")
    wide["mean fit seconds"] = seconds.reindex(wide.index).values
    return wide.reset_index()


def plot(table: pd.DataFrame, path: Path, n_valid: int = 40, extra: pd.DataFrame | None = None) -> None:
    """Accuracy against labelled pairs used, one panel per task, one line per method (mean ± std over seeds).

    The x-axis counts every labelled pair a method saw: prompting uses its n pairs; the fitted
    methods of this script also chose their settings on ``n_valid`` validation pairs. ``extra`` rows
    (their own ``labelled_pairs``) are drawn as markers, e.g. the honest protocol at n = 20.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = table.assign(labelled_pairs=labelled_pairs(table, n_valid))
    tasks = list(dict.fromkeys(table.task))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in METHODS:
            part = table[(table.task == task) & (table.method == method)]
            if part.empty:
                continue
            stats = part.groupby("labelled_pairs").accuracy.agg(["mean", "std"]).fillna(0)
            ax.errorbar(
                stats.index,
                stats["mean"],
                yerr=stats["std"],
                marker="o",
                capsize=3,
                label=method,
                linestyle="-" if method in PROMPTING or method == "laai-default" else "--",
            )
        if extra is not None:
            for method, part in extra[extra.task == task].groupby("method", sort=False):
                stats = part.groupby("labelled_pairs").accuracy.agg(["mean", "std"]).fillna(0)
                ax.errorbar(
                    stats.index,
                    stats["mean"],
                    yerr=stats["std"],
                    marker="*",
                    markersize=11,
                    capsize=3,
                    linestyle="none",
                    label=method,
                )
        ax.set(title=task, xlabel="labelled pairs used (n, + validation pairs)", ylabel="test accuracy", xscale="log")
        ticks = [t for t in (5, 10, 20, 50, 90) if table.labelled_pairs.min() <= t <= table.labelled_pairs.max()]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 9), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main())
