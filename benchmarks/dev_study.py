"""Development study: which fit settings and selection rules work, with n labelled pairs in all.

Tasks: the twelve Function Vectors tasks of ``../shared/datasets/function_vectors`` (the paper's
four and the eight of the development set). For each (task, seed) the seed fixes a test set, 40
extra "validation" pairs (used *only* to reproduce the older protocol) and n = 20 training pairs.

What one (task, seed) unit runs, every fit on zero-shot prompts ``Q: x\\nA:``:

* **cells**: at every candidate layer, the λ₂ path ``--rel`` (fractions of λ_max, warm-started)
  fitted on all n pairs and scored on test, on the 40 extra pairs and on training; and the same
  path fitted on each of the ``--folds`` cross-validation folds and scored on the left-out pairs.
  Every selection rule is then evaluated offline on these cells: k-fold CV (honest), the 40 extra
  pairs (old protocol), fixed (layer, λ) rules, and the best cell on test (an upper bound).
* **variants** at the (layer, λ) that CV chose: ``init="mean-difference"``, 1-shot training
  prompts, twice the steps; each is the same fit with one setting changed.
* **methods**: 0-, 5- and 10-shot prompting with the same n pairs; Function Vectors (scale from
  {1, 2, 4, 8}) and mean difference with their layer and scale chosen on the n pairs.

    OMP_NUM_THREADS=1 python benchmarks/dev_study.py --data-dir ../shared/datasets/function_vectors \\
        --out-dir docs/results/dev_study --workers 2             # or --address auto on a Ray cluster
    python benchmarks/dev_study.py --summarise-only --out-dir docs/results/dev_study --json
    python benchmarks/dev_study.py --model lens-laai-tiny --quick --json

Each (task, seed) unit is one cell of a study (:mod:`lens_laai.studies`, cell kind ``dev_study:cell``):
one Parquet row per unit under ``OUT_DIR/dev_study.study`` (its cells/variants/methods rows as JSON),
a rerun skips finished units, ``--workers``/``--address`` spread them over Ray workers
(``docs/scaling.md``). ``--out-dir`` gets ``cells``/``variants``/``methods`` rows CSVs and the
summary tables (markdown); ``--summarise-only`` also reads the older per-shard CSVs.
With ``--json`` the last line is one JSON object: per-protocol mean accuracy and the per-task table.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import (
    TINY,
    add_study_args,
    get_task,
    machine,
    nested_splits,
    parser,
    run_grid,
    to_markdown,
    write_outputs,
)

from lens_laai import PromptTemplate, Task, TaskSplits, evaluate, fit
from lens_laai.baselines import fit_function_vector, fit_mean_difference
from lens_laai.fastpath import CostMeter
from lens_laai.fitting import FitConfig, auto_layer
from lens_laai.fitting.layer_fit import layer_path
from lens_laai.fitting.selection import cross_validate, pooled_cv_scores

TASKS = [
    "antonym",
    "synonym",
    "english-french",
    "english-german",
    "landmark-country",
    "person-occupation",
    "product-company",
    "next_item",
    "prev_item",
    "capitalize_first_letter",
    "person-sport",
    "park-country",
]
VARIANTS = {"init=mean-difference": {"init": "mean-difference"}, "shots=1": {"shots": 1}, "steps×2": {"steps": None}}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--n", type=int, default=20, help="labelled pairs a user has")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--layers", default="4,8,12,16,20", help="candidate layers")
    p.add_argument("--rel", default="0.5,0.2,0.05", help="λ₂ path as fractions of λ_max")
    p.add_argument("--steps", type=int, default=10, help="proximal steps per λ₂")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--fv-prompts", type=int, default=8)
    p.add_argument("--skip", default="", help="comma list of parts to skip: variants,methods")
    p.add_argument(
        "--joint-only",
        action="store_true",
        help="run only the joint fit (all --layers at once, λ₂ path by CV) per unit, into joint.csv",
    )
    add_study_args(p)
    p.add_argument("--summarise-only", action="store_true")
    args = p.parse_args(argv)
    if args.summarise_only:
        return report(args)
    layers, rel = _ints(args.layers), _floats(args.rel)
    tasks, seeds = args.tasks.split(","), _ints(args.seeds)
    if args.quick or args.model == TINY:
        layers, rel, args.steps, args.n, args.n_test, args.fv_prompts = [0, 1], [0.5, 0.1], 3, 8, 6, 4
        tasks, seeds = tasks[:1], [0]
    kinds = ("joint",) if args.joint_only else ("cells", "variants", "methods")
    fixed = {
        "model": args.model,
        "data_dir": args.data_dir,
        "n": args.n,
        "n_valid": 40 if args.model != TINY else 4,
        "n_test": args.n_test,
        "layers": layers,
        "rel": rel,
        "steps": args.steps,
        "folds": args.folds,
        "fv_prompts": args.fv_prompts,
        "skip": args.skip,
        "joint_only": bool(args.joint_only),
    }
    units = run_grid("dev_study", "dev_study:cell", {"seed": seeds, "task": tasks}, fixed, args)
    units = units.sort_values(
        ["seed", "task"], key=lambda c: c.map({v: i for i, v in enumerate(seeds if c.name == "seed" else tasks)})
    )
    tables = {
        kind: [{"task": u.task, "seed": u.seed, **r} for u in units.itertuples() for r in json.loads(getattr(u, kind))]
        for kind in kinds
    }
    out = Path(args.out_dir) if args.out_dir else None
    if out:
        meta = {"args": vars(args), "machine": machine()}
        for kind in kinds:
            write_outputs(str(out), kind, pd.DataFrame(tables[kind]), meta)
    if not out:
        if not args.joint_only:
            print(to_markdown(protocols(pd.DataFrame(tables["cells"]), pd.DataFrame(tables["methods"]))))
        return 0
    return report(args)


def cell(ctx, config: dict) -> dict:
    """One (task, seed) unit (the study's cell kind): its cells, variants and methods rows, as JSON."""
    from types import SimpleNamespace

    model = ctx.model(config["model"])
    task = get_task(config["task"], config["data_dir"], config["model"])
    n = config["n"]
    splits = nested_splits(task, config["seed"], n, config["n_valid"], config["n_test"], n)
    layers = [l for l in config["layers"] if l < model.cfg.n_layers]
    cfg = FitConfig(steps=config["steps"], folds=config["folds"], seed=config["seed"], n_train=n)
    if config["joint_only"]:
        unit = {"joint": run_joint(model, splits, layers, config["rel"], cfg)}
    else:
        settings = SimpleNamespace(skip=config["skip"], fv_prompts=config["fv_prompts"])
        unit = run_unit(model, splits, layers, config["rel"], cfg, settings)
    return {kind: json.dumps(rows) for kind, rows in unit.items()} | {"labelled_pairs": n}


def run_unit(
    model, splits: TaskSplits, layers: list[int], rel: list[float], cfg: FitConfig, args
) -> dict[str, list[dict]]:
    """Cells, variants and methods for one (task, seed)."""
    template = PromptTemplate()
    cells, runners = [], {}
    for L in layers:
        start, meter = time.perf_counter(), CostMeter()
        full = list(layer_path(model, splits.train, splits.test, L, rel, cfg, template, meter))
        seconds = time.perf_counter() - start
        cv = pooled_cv_scores(cross_validate(model, splits.train, [L], rel, cfg, template, CostMeter(), progress=False))
        for lam, f, (_, c) in zip(sorted(rel, reverse=True), full, cv.iterrows()):
            valid_acc, valid_ce = _score(model, splits, f, runners)
            cells.append(
                {
                    "layer": L,
                    "rel": lam,
                    "lambda_max": f.lambda_max,
                    "n_selected": f.n_selected,
                    "test_accuracy": f.valid_accuracy,
                    "test_ce": f.valid_ce,
                    "valid40_accuracy": valid_acc,
                    "valid40_ce": valid_ce,
                    "train_accuracy": f.train_accuracy,
                    "train_loss": f.history[-1].loss,
                    "cv_accuracy": c.cv_accuracy,
                    "cv_ce": c.cv_ce,
                    "path_seconds": seconds,
                    "path_forward_equivalents": meter.forward_equivalents(),
                }
            )
    variants = [] if "variants" in args.skip else run_variants(model, splits, pd.DataFrame(cells), rel, cfg, template)
    methods = [] if "methods" in args.skip else run_methods(model, splits, layers, args)
    return {"cells": cells, "variants": variants, "methods": methods or [{"method": "none", "accuracy": float("nan")}]}


def run_joint(model, splits: TaskSplits, layers: list[int], rel: list[float], cfg: FitConfig) -> list[dict]:
    """The joint fit (one group per (layer, head) over all candidate layers), λ₂ by CV on the n pairs."""
    honest = TaskSplits(splits.train, Task(splits.train.name, []), splits.test, splits.seed)
    start = time.perf_counter()
    res = fit(model, honest, "joint", layers=layers, group_l1_rel=rel, steps=cfg.steps, folds=cfg.folds, progress=False)
    heads = res.intervention.selected_heads()
    return [
        {
            "method": "laai (joint over layers, CV on the n pairs)",
            "accuracy": evaluate(model, honest, res.intervention).accuracy,
            "forward_equivalents": res.forward_equivalents,
            "seconds": time.perf_counter() - start,
            "rel": res.config.group_l1,
            "layers": " ".join(str(l) for l in sorted({l for l, _ in heads})),
            "heads": len(heads),
            "main_layer": res.layer,
            "layer_norms": " ".join(f"{l}:{float(d.norm()):.3f}" for l, d in sorted(res.intervention.deltas.items())),
        }
    ]


def run_variants(model, splits, cells: pd.DataFrame, rel: list[float], cfg: FitConfig, template) -> list[dict]:
    """Each variant refits the CV-chosen (layer, λ path) with one setting changed; test accuracy."""
    best = cells.sort_values(["cv_accuracy", "cv_ce"], ascending=[False, True], kind="stable").iloc[0]
    path = [r for r in rel if r >= best.rel]
    rows = [
        {
            "variant": "base",
            "layer": int(best.layer),
            "rel": float(best.rel),
            "test_accuracy": float(best.test_accuracy),
        }
    ]
    for name, change in VARIANTS.items():
        change = {k: (2 * cfg.steps if v is None else v) for k, v in change.items()}
        f = list(
            layer_path(
                model, splits.train, splits.test, int(best.layer), path, replace(cfg, **change), template, CostMeter()
            )
        )[-1]
        rows.append(
            {"variant": name, "layer": int(best.layer), "rel": float(best.rel), "test_accuracy": f.valid_accuracy}
        )
    return rows


def run_methods(model, splits: TaskSplits, layers: list[int], args) -> list[dict]:
    """Prompting with the n pairs, and FV / mean difference choosing layer and scale on the n pairs."""
    rows = []
    for k in (0, 5, 10):
        if k <= len(splits.train):
            rows.append(
                {
                    "method": f"{k}-shot" if k else "zero-shot",
                    "accuracy": evaluate(model, splits, shots=k).accuracy,
                    "forward_equivalents": 0.0,
                    "seconds": 0.0,
                }
            )
    honest = TaskSplits(splits.train, Task(splits.train.name, []), splits.test, splits.seed)
    shots = min(10, len(splits.train) - 1)
    start = time.perf_counter()
    fv = fit_function_vector(
        model,
        honest,
        top_k=10,
        layers=layers,
        shots=shots,
        n_prompts=args.fv_prompts,
        scales=(1.0, 2.0, 4.0, 8.0),
        progress=False,
    )
    rows.append(
        {
            "method": "function-vector",
            "accuracy": evaluate(model, honest, fv.intervention).accuracy,
            "forward_equivalents": fv.forward_equivalents,
            "seconds": time.perf_counter() - start,
        }
    )
    start = time.perf_counter()
    md = fit_mean_difference(model, honest, "auto", layers=layers, shots=shots, progress=False)
    rows.append(
        {
            "method": "mean-difference",
            "accuracy": evaluate(model, honest, md.intervention).accuracy,
            "forward_equivalents": md.forward_equivalents,
            "seconds": time.perf_counter() - start,
        }
    )
    return rows


def _score(model, splits: TaskSplits, f, runners: dict) -> tuple[float, float]:
    """Accuracy and CE of a cell on the 40 extra validation pairs (one prefix cache per layer)."""
    from lens_laai.fastpath import LayerRunner
    from lens_laai.fitting.layer_fit import delta_hooks, training_batches

    if not len(splits.valid):
        return float("nan"), float("nan")
    if f.layer not in runners:
        batches = training_batches(model, splits.valid, splits.train, FitConfig(), PromptTemplate())
        runners[f.layer] = LayerRunner(model, batches, f.layer)
    return runners[f.layer].scores(delta_hooks(f.layer, f.delta))


# offline analysis ------------------------------------------------------------------------------
RULES = {
    "laai (CV on the n pairs, accuracy)": (["cv_accuracy", "cv_ce"], [False, True]),
    "laai (CV on the n pairs, cross-entropy)": (["cv_ce"], [True]),
    "laai (layer and λ on 40 extra validation pairs: 60 labelled pairs)": (
        ["valid40_accuracy", "valid40_ce"],
        [False, True],
    ),
    "laai (lowest training loss)": (["train_loss"], [True]),
    "laai (best cell on test: upper bound)": (["test_accuracy"], [False]),
}


DEFAULT = "laai default (layer at 53% depth, path to λ_max/20)"


def protocols(
    cells: pd.DataFrame, methods: pd.DataFrame, joint: pd.DataFrame | None = None, n_layers: int = 30
) -> pd.DataFrame:
    """One row per (task, seed, method/rule) with the test accuracy it gets.

    With ``joint`` rows, also "single layer at the joint fit's main layer and λ": the cell the
    two-stage rule (joint fit to pick the layer, then the paper's single-layer fit) would return.
    The default fit is the cell at :func:`lens_laai.fitting.auto_layer` and the path's last λ₂ (the same
    computation as ``fit(model, task, n_train=n)``).
    """
    rows = []
    if joint is not None and not joint.empty and "main_layer" in joint:
        for j in joint.itertuples():
            cell = cells[
                (cells.task == j.task) & (cells.seed == j.seed) & (cells.layer == j.main_layer) & (cells.rel == j.rel)
            ]
            if len(cell):
                rows.append(
                    {
                        "task": j.task,
                        "seed": j.seed,
                        "method": "laai (layer from the joint fit, then single layer)",
                        "accuracy": float(cell.test_accuracy.iloc[0]),
                        "layer": int(j.main_layer),
                        "rel": j.rel,
                    }
                )
    for (task, seed), unit in cells.groupby(["task", "seed"], sort=False):
        for name, (keys, asc) in RULES.items():
            best = unit.sort_values(keys, ascending=asc, kind="stable").iloc[0]
            rows.append(
                {
                    "task": task,
                    "seed": seed,
                    "method": name,
                    "accuracy": best.test_accuracy,
                    "layer": int(best.layer),
                    "rel": best.rel,
                }
            )
    default = cells[(cells.layer == auto_layer(n_layers)) & (cells.rel == cells.rel.min())]
    rows += [
        {
            "task": r.task,
            "seed": r.seed,
            "method": DEFAULT,
            "accuracy": r.test_accuracy,
            "layer": int(r.layer),
            "rel": r.rel,
        }
        for r in default.itertuples()
    ]
    if not methods.empty:
        rows += methods[methods.method != "none"][["task", "seed", "method", "accuracy"]].to_dict("records")
    return pd.DataFrame(rows)


def fixed_rules(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean test accuracy of every fixed (layer, λ) over all (task, seed): what a rule fixed in advance gets."""
    out = (
        cells.groupby(["layer", "rel"])
        .agg(
            accuracy=("test_accuracy", "mean"),
            heads=("n_selected", "mean"),
            worst_task=("test_accuracy", lambda s: s.min()),
        )
        .reset_index()
    )
    return out.sort_values("accuracy", ascending=False)


def paired(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """``reference`` minus each method on the same (task, seed): mean, std, and tasks where it is behind."""
    wide = table.pivot_table(index=["task", "seed"], columns="method", values="accuracy")
    if reference not in wide:
        return pd.DataFrame()
    rows = []
    for method in wide.columns.drop(reference):
        diff = (wide[reference] - wide[method]).dropna()
        if diff.empty:
            continue
        by_task = diff.groupby(level="task").mean()
        rows.append(
            {
                "method": method,
                "units": len(diff),
                "mean_difference": diff.mean(),
                "std": diff.std(),
                "tasks_behind": " ".join(sorted(by_task[by_task < 0].index)),
            }
        )
    return pd.DataFrame(rows).sort_values("mean_difference")


def per_task(table: pd.DataFrame) -> pd.DataFrame:
    """Method × task, mean over seeds, plus the mean over tasks."""
    wide = table.pivot_table(index="method", columns="task", values="accuracy", aggfunc="mean", sort=False)
    wide["mean"] = wide.mean(axis=1)
    return wide.sort_values("mean", ascending=False).round(3).reset_index()


def report(args) -> int:
    out = Path(args.out_dir or ".")
    read = {
        kind: pd.concat(
            [pd.read_csv(f) for f in sorted([*out.glob(f"{kind}.csv"), *out.glob(f"{kind}.shard*.csv")])]
            or [pd.DataFrame()]
        )
        for kind in ("cells", "variants", "methods", "joint")
    }
    if not read["joint"].empty:
        read["methods"] = pd.concat(
            [read["methods"], read["joint"][["task", "seed", "method", "accuracy", "forward_equivalents", "seconds"]]]
        )
    if read["cells"].empty:
        print(f"no rows in {out}", file=sys.stderr)
        return 1
    table = protocols(read["cells"], read["methods"], read["joint"])
    units = set(map(tuple, read["cells"][["task", "seed"]].drop_duplicates().values))
    table = table[[(t, s) in units for t, s in zip(table.task, table.seed)]]  # every method on the same units
    summary = per_task(table)
    fixed = fixed_rules(read["cells"])
    variants = pd.DataFrame()
    if not read["variants"].empty:
        v = read["variants"]
        base = v[v.variant == "base"].set_index(["task", "seed"]).test_accuracy
        v = v.assign(gain=v.test_accuracy.values - base.reindex(pd.MultiIndex.from_frame(v[["task", "seed"]])).values)
        variants = (
            v.groupby("variant")
            .agg(
                accuracy=("test_accuracy", "mean"),
                mean_gain=("gain", "mean"),
                std_gain=("gain", "std"),
                wins=("gain", lambda g: int((g > 0).sum())),
                losses=("gain", lambda g: int((g < 0).sum())),
            )
            .reset_index()
        )
    meta = {
        "args": vars(args),
        "machine": machine(),
        "units": int(read["cells"][["task", "seed"]].drop_duplicates().shape[0]),
    }
    versus = paired(table, DEFAULT)
    write_outputs(str(out), "dev_study_per_task", summary, meta)
    write_outputs(str(out), "dev_study_fixed_rules", fixed, meta)
    write_outputs(str(out), "dev_study_variants", variants, meta)
    write_outputs(str(out), "dev_study_default_vs", versus, meta)
    for title, t in (
        ("per task (mean over seeds)", summary),
        ("fixed (layer, λ) rules, top 10", fixed.head(10)),
        ("variants at the CV choice", variants),
        (f"{DEFAULT} against each method, paired", versus),
    ):
        print(f"\n## {title}\n\n{to_markdown(t)}")
    if args.json:
        means = table.groupby("method").accuracy.mean().round(4).to_dict()
        print(json.dumps({"units": meta["units"], "mean_accuracy": means, "per_task": summary.to_dict("records")}))
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main())
