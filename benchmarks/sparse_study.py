"""Development study of the sparse default: relaxed refit, cross-validated head set, 1-SE rule.

On the twelve development tasks of ``benchmarks/dev_study.py`` (same splits: a seed fixes 100 test
pairs, 40 unused pairs and the n = 20 training pairs), for each (task, seed) at the default layer:

* **path**: the default geometric λ₂ path (fractions of λ_max), fitted on all n pairs with a
  relaxed refit at every point, each point's penalised and relaxed Δ scored on the test pairs; and
  the same path fitted on each cross-validation fold (:func:`cross_validated_path`), so every
  selection rule (``1se``/``min`` × accuracy/cross-entropy × penalised/relaxed, ``max_heads=k``) is
  evaluated offline on the same fits, as ``dev_study.py`` did;
* **methods**: the dense fit (today's default: λ₂ path 0.5 → 0.2 → 0.05·λ_max, 10 steps each, the last
  point) and 10-shot prompting with the n pairs.

    OMP_NUM_THREADS=1 python benchmarks/sparse_study.py --data-dir ../shared/datasets/function_vectors \\
        --out-dir docs/results/sparse_study --shard 0/2 --resume     # and --shard 1/2 beside it
    python benchmarks/sparse_study.py --summarise-only --out-dir docs/results/sparse_study
    python benchmarks/sparse_study.py --model lens-laai-tiny --quick

``--out-dir`` gets ``points.shard*.csv`` (one row per (task, seed, λ₂)) and ``methods.shard*.csv``;
``--summarise-only`` writes the rule table, the per-task table and the frontier from them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import TINY, get_task, load, machine, nested_splits, parser, to_markdown, write_outputs
from dev_study import TASKS

from lens_laai import PromptTemplate, evaluate
from lens_laai.fastpath import CostMeter
from lens_laai.fitting import FitConfig, auto_layer
from lens_laai.fitting.fit import DEFAULT_GROUP_L1_REL, STEPS_PER_POINT
from lens_laai.fitting.layer_fit import layer_path
from lens_laai.fitting.relaxed import RELAXED_STEPS, relaxed_path
from lens_laai.fitting.selection import cross_validated_path

DENSE = (0.5, 0.2, 0.05)  # the previous default's schedule, 10 steps each; its last point is the fit


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--folds", type=int, default=FitConfig.folds)
    p.add_argument("--shard", default="0/1")
    p.add_argument("--reverse", action="store_true", help="run the shard's units last first (a second worker)")
    p.add_argument("--tag", default="", help="suffix of this worker's files, e.g. 'r' for a --reverse worker")
    p.add_argument("--skip-dense", action="store_true", help="skip the previous default's schedule")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--summarise-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out_dir) if args.out_dir else None
    if args.summarise_only:
        return summarise(out)
    model = load(args)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    n, n_test, n_valid = args.n, args.n_test, 40
    if args.quick or args.model == TINY:
        tasks, seeds, n, n_test, n_valid = tasks[:1], [0], 8, 6, 4
    k, n_shards = (int(x) for x in args.shard.split("/"))
    files = {kind: out / f"{kind}.shard{k}{args.tag}.csv" for kind in ("points", "methods")} if out else {}
    tables = {
        kind: (pd.read_csv(f).to_dict("records") if args.resume and f.exists() else []) for kind, f in files.items()
    }
    tables = {kind: tables.get(kind, []) for kind in ("points", "methods")}
    done = {(r["task"], r["seed"]) for r in tables["methods"]}
    units = [(t, s) for s in seeds for t in tasks][k::n_shards]
    for task_name, seed in tqdm(units[::-1] if args.reverse else units, desc="task × seed", disable=args.no_progress):
        if (task_name, seed) in done | _done_elsewhere(out):
            continue
        task = get_task(task_name, args.data_dir, args.model)
        splits = nested_splits(task, seed, n, n_valid, n_test, n)
        points, methods = run_unit(model, splits, seed, args.folds, args.skip_dense)
        tables["points"] += [{"task": task_name, "seed": seed, **r} for r in points]
        tables["methods"] += [{"task": task_name, "seed": seed, **r} for r in methods]
        if out:
            for kind, f in files.items():
                write_outputs(str(out), f.stem, pd.DataFrame(tables[kind]), {"args": vars(args), "machine": machine()})
    if not out:
        print(to_markdown(rules(pd.DataFrame(tables["points"]), pd.DataFrame(tables["methods"]))))
    return 0


def _done_elsewhere(out: Path | None) -> set[tuple[str, int]]:
    """Units any worker has written to ``out`` (workers may share a shard, one forward, one reversed)."""
    if out is None:
        return set()
    done = set()
    for f in out.glob("methods.shard*.csv"):
        done |= {(r.task, int(r.seed)) for r in pd.read_csv(f).itertuples()}
    return done


def run_unit(model, splits, seed: int, folds: int, skip_dense: bool = False) -> tuple[list[dict], list[dict]]:
    layer, template = auto_layer(model.cfg.n_layers), PromptTemplate()
    cfg = FitConfig(steps=STEPS_PER_POINT, folds=folds, seed=seed, n_train=len(splits.train))
    start, meter = time.perf_counter(), CostMeter()
    cv = cross_validated_path(
        model, splits.train, layer, DEFAULT_GROUP_L1_REL, cfg, template, meter, RELAXED_STEPS, progress=False
    )
    cv_seconds, cv_fe = time.perf_counter() - start, meter.forward_equivalents()
    start, meter = time.perf_counter(), CostMeter()
    points = []
    for (_, c), pt in zip(
        cv.iterrows(),
        relaxed_path(model, splits.train, splits.test, layer, DEFAULT_GROUP_L1_REL, cfg, template, meter),
    ):
        heads = " ".join(str(h) for h in np.flatnonzero(pt.fit.delta.norm(dim=-1).cpu().numpy() > 0))
        points.append(
            {
                **c.to_dict(),
                "layer": layer,
                "n_selected": pt.n_selected,
                "heads": heads,
                "train_accuracy": pt.fit.train_accuracy,
                "relaxed_train_accuracy": pt.relaxed_train_accuracy,
                "test_accuracy": float(pt.held["penalised"][0].mean()),
                "relaxed_test_accuracy": float(pt.held["relaxed"][0].mean()),
                "test_ce": float(pt.held["penalised"][1].mean()),
                "relaxed_test_ce": float(pt.held["relaxed"][1].mean()),
                "cv_seconds": cv_seconds,
                "cv_forward_equivalents": cv_fe,
            }
        )
    full_seconds = time.perf_counter() - start
    for row in points:
        row["path_seconds"] = full_seconds
    methods = []
    if not skip_dense:
        start = time.perf_counter()
        dense = list(
            layer_path(
                model, splits.train, splits.test, layer, DENSE, FitConfig(steps=10, seed=seed), template, CostMeter()
            )
        )[-1]
        methods.append(
            {
                "method": "dense (0.05·λ_max, previous default)",
                "accuracy": dense.valid_accuracy,
                "n_selected": dense.n_selected,
                "seconds": time.perf_counter() - start,
            }
        )
    methods += [
        {
            "method": "10-shot",
            "accuracy": evaluate(model, splits, shots=min(10, len(splits.train) - 1), progress=False).accuracy,
            "n_selected": 0,
            "seconds": 0.0,
        },
    ]
    return points, methods


RULES = {
    "relaxed, 1se (accuracy)": ("relaxed", "1se", "accuracy", None),
    "relaxed, 1se (ce)": ("relaxed", "1se", "ce", None),
    "relaxed, min (accuracy)": ("relaxed", "min", "accuracy", None),
    "relaxed, min (ce)": ("relaxed", "min", "ce", None),
    "penalised, 1se (accuracy)": ("penalised", "1se", "accuracy", None),
    "penalised, 1se (ce)": ("penalised", "1se", "ce", None),
    "penalised, min (accuracy)": ("penalised", "min", "accuracy", None),
    "penalised, min (ce)": ("penalised", "min", "ce", None),
    "relaxed, max_heads=1": ("relaxed", "min", "accuracy", 1),
    "relaxed, max_heads=2": ("relaxed", "min", "accuracy", 2),
    "relaxed, max_heads=3": ("relaxed", "min", "accuracy", 3),
}


def picks(points: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, seed, rule): the point the rule picks and its heads and test accuracy."""
    from lens_laai.fitting.selection import choose_point

    rows = []
    for (task, seed), unit in points.groupby(["task", "seed"], sort=False):
        unit = unit.reset_index(drop=True)
        for name, (est, rule, metric, cap) in RULES.items():
            if cap is None:
                i = choose_point(unit, rule, metric, est, unit.n_selected.tolist())
            else:  # a budget: the densest point within it (the last such on the path)
                within = [j for j, k in enumerate(unit.n_selected) if 1 <= k <= cap]
                i = within[-1] if within else int(np.argmax(unit.n_selected >= 1))
            col = "relaxed_test_accuracy" if est == "relaxed" else "test_accuracy"
            rows.append(
                {
                    "task": task,
                    "seed": seed,
                    "rule": name,
                    "point": i,
                    "lam": unit.lam[i],
                    "n_selected": int(unit.n_selected[i]),
                    "heads": unit.heads[i],
                    "test_accuracy": unit[col][i],
                }
            )
    return pd.DataFrame(rows)


def rules(points: pd.DataFrame, methods: pd.DataFrame) -> pd.DataFrame:
    """Mean test accuracy and median heads of every rule and baseline over all (task, seed) units."""
    p = picks(points)
    by = p.groupby("rule", sort=False).agg(
        accuracy=("test_accuracy", "mean"),
        median_heads=("n_selected", "median"),
        mean_heads=("n_selected", "mean"),
    )
    m = methods.groupby("method", sort=False).agg(
        accuracy=("accuracy", "mean"), median_heads=("n_selected", "median"), mean_heads=("n_selected", "mean")
    )
    return pd.concat([by, m]).reset_index(names="rule")


DEFAULT_RULE = "relaxed, 1se (ce)"  # what fit() does by default (chosen on this study)


def per_task(points: pd.DataFrame, methods: pd.DataFrame, rule: str = DEFAULT_RULE) -> pd.DataFrame:
    """Per task (mean over seeds): the default's heads and test accuracy, the dense fit, 10-shot, and the
    Jaccard index of the default's head sets across seeds."""
    p = picks(points)
    p = p[p.rule == rule]
    last = points.groupby(["task", "seed"], sort=False).tail(1)  # 0.05·λ_max: the path's last point
    rows = []
    for task, unit in p.groupby("task", sort=False):
        sets = [set(str(h).split()) for h in unit.heads]
        pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
        jaccard = np.mean([len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs]) if pairs else float("nan")
        dense = last[last.task == task]
        m = methods[methods.task == task]
        rows.append(
            {
                "task": task,
                "seeds": len(unit),
                "default_heads": unit.n_selected.mean(),
                "default_accuracy": unit.test_accuracy.mean(),
                "dense_heads": dense.n_selected.mean(),
                "dense_accuracy": dense.test_accuracy.mean(),
                "dense_old_schedule": m[m.method.str.startswith("dense")].accuracy.mean(),
                "10-shot": m[m.method == "10-shot"].accuracy.mean(),
                "jaccard_across_seeds": jaccard,
                "head_sets": " | ".join(str(h) for h in unit.heads),
            }
        )
    table = pd.DataFrame(rows)
    mean = table.drop(columns=["task", "head_sets"]).mean(numeric_only=True).to_dict()
    mean["default_heads_median"] = float(p.n_selected.median())
    return pd.concat([table, pd.DataFrame([{"task": "mean", **mean, "head_sets": ""}])], ignore_index=True)


def summarise(out: Path | None) -> int:
    if out is None:
        raise SystemExit("--summarise-only needs --out-dir")
    points = pd.concat([pd.read_csv(f) for f in sorted(out.glob("points.shard*.csv"))])
    methods = pd.concat([pd.read_csv(f) for f in sorted(out.glob("methods.shard*.csv"))])
    meta = {"units": int(methods.groupby(["task", "seed"]).ngroups), "machine": machine()}
    table = rules(points, methods)
    write_outputs(str(out), "sparse_study_rules", table, meta)
    write_outputs(str(out), "sparse_study_picks", picks(points), meta)
    frontier = (
        points.groupby("lam", sort=False)
        .agg(
            n_selected=("n_selected", "mean"),
            relaxed_cv_accuracy=("relaxed_cv_accuracy", "mean"),
            penalised_cv_accuracy=("penalised_cv_accuracy", "mean"),
            relaxed_test_accuracy=("relaxed_test_accuracy", "mean"),
            test_accuracy=("test_accuracy", "mean"),
        )
        .reset_index()
    )
    write_outputs(str(out), "sparse_study_frontier", frontier, meta)
    tasks = per_task(points, methods)
    write_outputs(str(out), "sparse_study_per_task", tasks, meta)
    print(to_markdown(tasks))
    print(to_markdown(table))
    print(to_markdown(frontier))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
