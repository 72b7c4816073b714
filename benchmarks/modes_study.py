"""Never worse than prompting with the same pairs: the default fit's modes against prompting and the baselines.

On the eighteen development tasks of ``../shared/datasets/function_vectors`` (n = 20 labelled pairs,
seeds 0 and 1; the seed fixes 100 test pairs exactly as ``dev_study.py`` and ``sparse_study.py`` do,
and the 40 "validation" pairs of those studies are left unused), one cell per (task, seed, part):

* ``part=main``: 0-, 5- and 10-shot prompting with the n pairs; the **default fit** (``fit(model,
  splits)``: half its training prompts carry 5 demonstrations, and cross-validation on the n pairs
  chooses among zero-shot Δ, 5-shot prompting and 5-shot prompting + Δ), scored in the mode it chose
  and in each mode;
* ``part=zero``: the **zero-shot fit** (``mode="zero-shot"``: the paper's setting and the previous
  default) and the **dense** fit (zero-shot, the λ₂ path's last point 0.05·λ_max, penalised: the
  default before the sparse head set);
* ``part=positions``: the default fit with Δ at each prompt's **last 3 tokens** (``last_positions=3``),
  scored in each mode like ``main``;
* ``part=joint``: the **joint fit** (``layer="joint"``: the default candidate layers at once, one
  group per (layer, head), with the default selection; zero-shot);
* ``part=baselines``: Function Vectors (top 10 heads by causal indirect effect, layer and scale
  chosen on the n pairs) and mean difference, as ``dev_study.py`` runs them.

    OMP_NUM_THREADS=1 python benchmarks/modes_study.py --data-dir ../shared/datasets/function_vectors \\
        --out-dir docs/results/modes_study --workers 2                 # or --address auto on a Ray cluster
    python benchmarks/modes_study.py --summarise-only --out-dir docs/results/modes_study
    python benchmarks/modes_study.py --model lens-laai-tiny --quick
    # the variant with 10-shot modes (docs/results.md §7; not the default):
    python benchmarks/modes_study.py ... --parts main --demos 10 --out-dir docs/results/modes_study_demos10

Cells run as a study (:mod:`lens_laai.studies`, kind ``modes_study:cell``): a rerun skips finished
cells. ``--out-dir`` gets ``rows.csv`` (one row per method and cell) and the summaries
``modes_study_per_task``, ``modes_study_summary`` and ``modes_study_modes`` (markdown and CSV).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import (
    TINY,
    add_study_args,
    get_task,
    loosely_unique,
    machine,
    nested_splits,
    parser,
    run_grid,
    to_markdown,
    write_outputs,
)
from dev_study import TASKS as DEV_TASKS

from lens_laai import HeadIntervention, Task, TaskSplits, evaluate, evaluate_many, fit
from lens_laai.baselines import fit_function_vector, fit_mean_difference
from lens_laai.cli.args import positive_int

TASKS = [
    *DEV_TASKS,
    "person-instrument",
    "country-currency",
    "alphabetically_first_3",
    "capitalize_last_letter",
    "choose_first_of_3",
    "lowercase_first_letter",
]
"""The eighteen development tasks: the twelve of ``dev_study.py`` and the six added for this study."""


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--parts", default="main,zero,joint,positions,baselines")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--fv-prompts", type=int, default=8)
    p.add_argument(
        "--demos",
        type=positive_int,
        default=None,
        help="the default fit's demos= (k-shot modes); default: the library's",
    )
    p.add_argument("--summarise-only", action="store_true")
    add_study_args(p)
    args = p.parse_args(argv)
    if args.summarise_only:
        return summarise(Path(args.out_dir))
    tasks, seeds, parts = args.tasks.split(","), [int(s) for s in args.seeds.split(",")], args.parts.split(",")
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        p.error(f"--parts: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    fixed = {"model": args.model, "data_dir": args.data_dir, "n": args.n, "n_test": args.n_test}
    fixed |= {"fv_prompts": args.fv_prompts, "n_valid": 40} | ({"demos": args.demos} if args.demos is not None else {})
    if args.quick or args.model == TINY:
        tasks, seeds = tasks[:1], [0]
        fixed |= {"n": 12, "n_test": 6, "n_valid": 4, "fv_prompts": 4}
    cells = run_grid("modes_study", "modes_study:cell", {"seed": seeds, "task": tasks, "part": parts}, fixed, args)
    rows = pd.DataFrame([r for c in cells.itertuples() for r in json.loads(c.rows)])
    if not args.out_dir:
        print(to_markdown(per_task(rows).reset_index()))
        return 0
    write_outputs(
        args.out_dir, "run", pd.DataFrame([{"cells": len(cells)}]), {"args": vars(args), "machine": machine()}
    )
    return summarise(Path(args.out_dir))


def cell(ctx, config: dict) -> dict:
    """One (task, seed, part): its method rows, as JSON."""
    model = ctx.model(config["model"])
    task = loosely_unique(get_task(config["task"], config["data_dir"], config["model"]))
    n = config["n"]
    nested = nested_splits(task, config["seed"], n, config["n_valid"], config["n_test"], n)
    splits = TaskSplits(nested.train, Task(task.name, []), nested.test, config["seed"])  # n pairs, nothing more
    rows = PARTS[config["part"]](model, splits, config)
    base = {"task": config["task"], "seed": config["seed"], "n_test": len(splits.test)}
    return {"rows": json.dumps([base | r for r in rows])}


def run_main(model, splits: TaskSplits, config: dict) -> list[dict]:
    """Prompting at 0 and 10 shots, and the default fit in its modes (:func:`fit_in_modes`; ``demos``:
    its k-shot modes, when the config names them)."""
    rows = [{"method": f"{k}-shot prompting", "accuracy": evaluate(model, splits, shots=k).accuracy} for k in (0, 10)]
    return rows + fit_in_modes(model, splits, "default", {"demos": config.get("demos")}, prompting=True)


def run_positions(model, splits: TaskSplits, config: dict) -> list[dict]:
    """The default fit with Δ at each prompt's last ``last_positions`` tokens (3 unless the config says)."""
    m = config.get("last_positions", 3)
    return fit_in_modes(model, splits, f"last {m} tokens", {"last_positions": m})


def fit_in_modes(model, splits: TaskSplits, name: str, kwargs: dict, prompting: bool = False) -> list[dict]:
    """``fit(model, splits, **kwargs)`` scored in the mode it chose and in each mode: its Δ zero-shot,
    and 5- and 10-shot prompting with and without it in one pass per k (the prefix shared:
    :func:`lens_laai.evaluate_many`); ``prompting`` adds the 5-shot prompting row."""
    start = time.perf_counter()
    res = fit(model, splits, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    common = {
        "n_selected": res.n_selected,
        "heads": " ".join(f"L{l}H{h}" for l, h in res.selected_heads),
        "forward_equivalents": res.forward_equivalents,
        "seconds": seconds,
        "chosen_mode": res.mode.name,
        "cv": json.dumps({m: round(a, 4) for m, a in zip(res.modes["mode"], res.modes.cv_accuracy)}),
        "cv_won_lost_p": res.modes.set_index("mode")[["wins", "losses", "p_better"]].dropna().to_json(orient="index"),
    }
    iv = res.intervention
    none = HeadIntervention.zeros(model, iv.layers[0])
    by_mode = {"zero-shot Δ": evaluate(model, splits, iv, shots=0).accuracy}
    for k in sorted({5, 10, res.mode.shots} - {0}):
        plain, with_delta = evaluate_many(model, splits, [none, iv], shots=k).accuracy.tolist()
        by_mode |= {f"{k}-shot prompting": plain, f"{k}-shot prompting + Δ": with_delta}
    rows = [{"method": "5-shot prompting", "accuracy": by_mode["5-shot prompting"]}] if prompting else []
    rows.append({"method": f"{name} (chosen mode)", "accuracy": by_mode[res.mode.name], **common})
    rows.append({"method": f"{name}, zero-shot Δ", "accuracy": by_mode["zero-shot Δ"], **common})
    for k in (5, 10):
        rows.append({"method": f"{name}, {k}-shot + Δ", "accuracy": by_mode[f"{k}-shot prompting + Δ"], **common})
    return rows


def run_zero(model, splits: TaskSplits, config: dict) -> list[dict]:
    return fitted_rows(
        model,
        splits,
        [
            ("zero-shot fit", {"mode": "zero-shot"}),
            ("dense zero-shot fit", {"mode": "zero-shot", "select": "none", "relaxed": False}),
        ],
    )


def run_joint(model, splits: TaskSplits, config: dict) -> list[dict]:
    """The joint fit over the default candidate layers, one group per (layer, head), with the library's
    selection (λ₂ path, cross-validation, one-standard-error rule, relaxed refit); zero-shot, since a
    fit over several layers has no k-shot modes: compare it with the zero-shot fit."""
    return fitted_rows(model, splits, [("joint fit", {"layer": "joint"})])


def fitted_rows(model, splits: TaskSplits, fits: list[tuple[str, dict]]) -> list[dict]:
    """One row per named fit: held-out accuracy in the fit's mode, its heads and cost."""
    rows = []
    for name, kwargs in fits:
        start = time.perf_counter()
        res = fit(model, splits, progress=False, **kwargs)
        rows.append(
            {
                "method": name,
                "accuracy": evaluate(model, splits, res.intervention).accuracy,
                "n_selected": res.n_selected,
                "heads": " ".join(f"L{l}H{h}" for l, h in res.selected_heads),
                "forward_equivalents": res.forward_equivalents,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def run_baselines(model, splits: TaskSplits, config: dict) -> list[dict]:
    layers = [l for l in (4, 8, 12, 16, 20) if l < model.cfg.n_layers] or [0]
    shots = min(10, len(splits.train) - 1)
    rows = []
    start = time.perf_counter()
    fv = fit_function_vector(
        model,
        splits,
        top_k=10,
        layers=layers,
        shots=shots,
        n_prompts=config["fv_prompts"],
        scales=(1.0, 2.0, 4.0, 8.0),
        progress=False,
    )
    acc = evaluate(model, splits, fv.intervention).accuracy
    rows.append(
        {
            "method": "function vectors",
            "accuracy": acc,
            "forward_equivalents": fv.forward_equivalents,
            "seconds": time.perf_counter() - start,
        }
    )
    start = time.perf_counter()
    md = fit_mean_difference(model, splits, "auto", layers=layers, shots=shots, progress=False)
    acc = evaluate(model, splits, md.intervention).accuracy
    rows.append(
        {
            "method": "mean difference",
            "accuracy": acc,
            "forward_equivalents": md.forward_equivalents,
            "seconds": time.perf_counter() - start,
        }
    )
    return rows


PARTS = {"main": run_main, "zero": run_zero, "joint": run_joint, "positions": run_positions, "baselines": run_baselines}
"""Each ``--parts`` name and the function that runs its cell."""


COLUMNS = [
    "0-shot prompting",
    "5-shot prompting",
    "10-shot prompting",
    "default (chosen mode)",
    "default, zero-shot Δ",
    "default, 5-shot + Δ",
    "default, 10-shot + Δ",
    "last 3 tokens (chosen mode)",
    "last 3 tokens, zero-shot Δ",
    "last 3 tokens, 5-shot + Δ",
    "zero-shot fit",
    "dense zero-shot fit",
    "joint fit",
    "function vectors",
    "mean difference",
]


def per_task(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over seeds per task and method, with the default's heads and chosen modes."""
    table = rows.pivot_table(index="task", columns="method", values="accuracy", aggfunc="mean")
    table = table[[c for c in COLUMNS if c in table]]
    n_fits = (rows.method == "default (chosen mode)").sum()
    partial = [c for c in table if c.startswith("default, ") and (rows.method == c).sum() < n_fits]
    table = table.drop(columns=partial)  # scored on some fits only (an older run of the cell): not comparable
    chosen = rows[rows.method == "default (chosen mode)"]
    table["default heads"] = chosen.groupby("task").n_selected.mean()
    table["zero-shot fit heads"] = rows[rows.method == "zero-shot fit"].groupby("task").n_selected.mean()
    table["joint fit heads"] = rows[rows.method == "joint fit"].groupby("task").n_selected.mean()
    table["last 3 tokens heads"] = rows[rows.method == "last 3 tokens (chosen mode)"].groupby("task").n_selected.mean()
    table["default heads Jaccard"] = chosen.groupby("task").heads.agg(jaccard)
    table["chosen modes"] = chosen.groupby("task").chosen_mode.agg(lambda m: " / ".join(m))
    table["seeds"] = chosen.groupby("task").seed.nunique()
    order = [t for t in TASKS if t in table.index] + [t for t in table.index if t not in TASKS]
    return table.loc[order]


def positions_table(rows: pd.DataFrame, name: str = "last 3 tokens") -> pd.DataFrame:
    """Per task, on the (task, seed) cells both ran: the default fit and the fit with Δ at the last
    tokens, in the chosen mode and as zero-shot Δ, with heads and forward-pass equivalents."""
    pairs = {"default (chosen mode)": "default", f"{name} (chosen mode)": name}
    pairs |= {"default, zero-shot Δ": "default, zero-shot Δ", f"{name}, zero-shot Δ": f"{name}, zero-shot Δ"}
    wide = rows[rows.method.isin(list(pairs))].pivot_table(
        index=["task", "seed"], columns="method", values=["accuracy", "n_selected", "forward_equivalents"]
    )
    if ("accuracy", f"{name} (chosen mode)") not in wide:
        return pd.DataFrame()
    wide = wide.dropna(subset=[("accuracy", m) for m in pairs])
    out = wide["accuracy"][list(pairs)].rename(columns=pairs)
    for m in ("default (chosen mode)", f"{name} (chosen mode)"):
        out[f"{pairs[m]} heads"] = wide["n_selected"][m]
        out[f"{pairs[m]} forward-pass equivalents"] = wide["forward_equivalents"][m]
    table = out.groupby("task").mean().assign(seeds=out.groupby("task").size())
    return pd.concat([table, table.mean().to_frame("mean").T]).reset_index(names="task")


def versus_row(rows: pd.DataFrame, a: str, b: str) -> dict:
    """Method ``a`` against ``b`` on the (task, seed) cells both ran: mean accuracy, median heads, mean
    forward-pass equivalents, and how many cells ``a`` was above / below ``b``."""
    wide = rows[rows.method.isin([a, b])].pivot_table(
        index=["task", "seed"], columns="method", values=["accuracy", "n_selected", "forward_equivalents"]
    )
    both = (
        wide.dropna(subset=[("accuracy", a), ("accuracy", b)])
        if ("accuracy", a) in wide and ("accuracy", b) in wide
        else []
    )
    what = f"{a} / {b}"
    if not len(both):
        return {"what": f"{what} (mean accuracy, median heads, forward-pass equivalents)", "value": "-"}
    acc, heads, fpe = both["accuracy"], both.get("n_selected"), both.get("forward_equivalents")
    median = lambda m: f"{heads[m].median():.1f}" if heads is not None and m in heads else "-"
    mean = lambda m: f"{fpe[m].mean():.0f}" if fpe is not None and m in fpe else "-"
    return {
        "what": f"{what} on {len(both)} cells (mean accuracy, median heads, forward-pass equivalents, cells up / down)",
        "value": f"{acc[a].mean():.3f} / {acc[b].mean():.3f}, {median(a)} / {median(b)}, {mean(a)} / {mean(b)}, "
        f"{int((acc[a] > acc[b]).sum())} / {int((acc[a] < acc[b]).sum())}",
    }


def jaccard(heads: pd.Series) -> float:
    """Mean pairwise Jaccard index of the head sets (space-separated ``L<l>H<h>``) across seeds; NaN with one seed."""
    sets = [set(str(h).split()) - {"nan"} for h in heads]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
    if not pairs:
        return float("nan")
    return sum(len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs) / len(pairs)


def earlier(out: Path) -> pd.DataFrame:
    """Rows the earlier studies measured on the same splits (same seeds, n, test pairs), for cells this
    study has not run: the zero-shot fit and the dense fit from ``sparse_study`` (its 1-SE rule on
    cross-validated cross-entropy with the relaxed refit, and the path's last point), Function
    Vectors and mean difference from ``dev_study``. Each carries its ``source``."""
    results, rows = out.parent, []
    picks = results / "sparse_study" / "sparse_study_picks.csv"
    if picks.exists():
        p = pd.read_csv(picks)
        for r in p[p.rule == "relaxed, 1se (ce)"].itertuples():
            rows.append(
                {
                    "task": r.task,
                    "seed": r.seed,
                    "method": "zero-shot fit",
                    "accuracy": r.test_accuracy,
                    "n_selected": r.n_selected,
                    "source": "sparse_study",
                }
            )
    points = sorted((results / "sparse_study").glob("points.shard*.csv"))
    if points:
        p = pd.concat([pd.read_csv(f) for f in points]).drop_duplicates(["task", "seed", "lam"])
        for r in p[p.lam == p.lam.min()].itertuples():
            rows.append(
                {
                    "task": r.task,
                    "seed": r.seed,
                    "method": "dense zero-shot fit",
                    "accuracy": r.test_accuracy,
                    "n_selected": r.n_selected,
                    "source": "sparse_study",
                }
            )
    names = {"function-vector": "function vectors", "mean-difference": "mean difference"}
    for f in sorted((results / "dev_study").glob("methods.shard*.csv")):
        d = pd.read_csv(f)
        for r in d[d.method.isin(list(names))].itertuples():
            rows.append(
                {
                    "task": r.task,
                    "seed": r.seed,
                    "method": names[r.method],
                    "accuracy": r.accuracy,
                    "forward_equivalents": r.forward_equivalents,
                    "source": "dev_study",
                }
            )
    return pd.DataFrame(rows)


def finished_rows(out: Path) -> pd.DataFrame:
    """The rows of every finished cell in ``out/modes_study.study`` (a partial study summarises too)."""
    cells = sorted((out / "modes_study.study" / "cells").glob("*.parquet"))
    table = pd.concat([pd.read_parquet(f) for f in cells], ignore_index=True) if cells else pd.DataFrame()
    if "status" in table:
        table = table[table.status == "ok"]
    return pd.DataFrame([r for c in table.itertuples() for r in json.loads(c.rows)])


def summarise(out: Path) -> int:
    rows = finished_rows(out).assign(source="modes_study")
    write_outputs(str(out), "rows", rows, {"source": "every finished cell of modes_study.study"})
    old = earlier(out)
    if len(old):
        have = set(zip(rows.task, rows.seed, rows.method))
        old = old[[k not in have for k in zip(old.task, old.seed, old.method)]]
        rows = pd.concat([rows, old[old.task.isin(set(rows.task))]], ignore_index=True)
    table = per_task(rows)
    meta = {"source": "rows.csv"}
    mean = table.drop(columns=["chosen modes"]).mean(numeric_only=True)
    meta = {"source": "rows.csv, and earlier studies' rows on the same splits where this one has none (column source)"}
    write_outputs(str(out), "modes_study_rows_all", rows, meta)
    write_outputs(str(out), "modes_study_per_task", pd.concat([table, mean.to_frame("mean").T]).reset_index(), meta)
    ten = table["10-shot prompting"]
    default = table["default (chosen mode)"]
    strong = ten >= 0.5
    cost = rows.groupby("method").forward_equivalents.mean()
    summary = pd.DataFrame(
        [
            {"what": "tasks (seeds)", "value": f"{len(table)} ({int(table.seeds.min())}–{int(table.seeds.max())})"},
            {"what": "mean accuracy: default (chosen mode)", "value": f"{default.mean():.3f}"},
            {"what": "mean accuracy: 10-shot prompting", "value": f"{ten.mean():.3f}"},
            {"what": "target: default ≥ 10-shot mean + 0.05", "value": str(bool(default.mean() >= ten.mean() + 0.05))},
            {"what": "tasks where 10-shot ≥ 0.5", "value": ", ".join(table.index[strong]) or "none"},
            {
                "what": "…where the default is below 10-shot",
                "value": ", ".join(
                    f"{t} ({default[t]:.2f} < {ten[t]:.2f})" for t in table.index[strong & (default < ten)]
                )
                or "none",
            },
            {"what": "median heads kept by the default", "value": f"{table['default heads'].median():.1f}"},
            {
                "what": "default head sets across seeds, mean Jaccard (all / the twelve of sparse_study)",
                "value": f"{table['default heads Jaccard'].mean():.2f} / "
                f"{table.loc[table.index.isin(TASKS[:12]), 'default heads Jaccard'].mean():.2f}",
            },
            {
                "what": "the twelve tasks of sparse_study: default / zero-shot fit / dense / 10-shot (mean accuracy)",
                "value": " / ".join(
                    f"{table.loc[table.index.isin(TASKS[:12]), c].mean():.3f}" if c in table else "-"
                    for c in ("default (chosen mode)", "zero-shot fit", "dense zero-shot fit", "10-shot prompting")
                ),
            },
            {
                "what": "the twelve tasks of sparse_study: median heads, default / zero-shot fit",
                "value": f"{table.loc[table.index.isin(TASKS[:12]), 'default heads'].median():.1f} / "
                f"{table.loc[table.index.isin(TASKS[:12]), 'zero-shot fit heads'].median():.1f}",
            },
            versus_row(rows, "joint fit", "zero-shot fit"),
            versus_row(rows, "last 3 tokens (chosen mode)", "default (chosen mode)"),
            {
                "what": "default fit, forward-pass equivalents",
                "value": f"{cost.get('default (chosen mode)', float('nan')):.0f}",
            },
            {
                "what": "zero-shot fit, forward-pass equivalents",
                "value": f"{cost.get('zero-shot fit', float('nan')):.0f}",
            },
            {
                "what": "Function Vectors head search, forward-pass equivalents",
                "value": f"{cost.get('function vectors', float('nan')):.0f}",
            },
        ]
    )
    write_outputs(str(out), "modes_study_summary", summary, meta)
    positions = positions_table(rows)
    if len(positions):
        write_outputs(str(out), "modes_study_positions", positions, meta)
    chosen = rows[rows.method == "default (chosen mode)"]
    modes = chosen.chosen_mode.value_counts().rename_axis("mode").reset_index(name="cells")
    write_outputs(str(out), "modes_study_modes", modes, meta)
    print(to_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
