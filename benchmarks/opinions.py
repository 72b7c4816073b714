"""Opinion dynamics: can a sparse head intervention make the model answer survey questions like a group?

For every seed's split of the survey's questions (train / validation / test) and every group, scores
on the held-out questions: prompting with the plain question, with a persona ("Answer the following
question as if ..."), few-shot with the group's majority answers to the training questions, LAAI
(layer and λ₂ chosen on the validation questions' KL) and LAAI without the Lasso terms (λ₁ = λ₂ = 0,
at the layer LAAI chose). Metrics: mean KL(target ‖ model), mean total variation, and OpinionQA's
representativeness 1 − mean W₁/range. A reference row without any model, ``group_mean``, answers every
held-out question with the group's mean answer distribution over the training questions; ``spread`` is
the standard deviation over held-out questions of the expected answer (ordinal value) under each method
(``target`` row: the group's own), i.e. how much the answers depend on the question at all. Writes
rows, per-question distributions, markdown tables and a figure (target vs plain vs persona vs
intervened distributions) with --out-dir.

    python benchmarks/opinions.py --out-dir docs/results                 # --workers 2 / --address auto: on Ray
    python benchmarks/opinions.py --model lens-laai-tiny --quick --json

The grid (seed × group) runs as a study (:mod:`lens_laai.studies`): one Parquet row per cell (its
method rows and per-question distributions as JSON) under OUT_DIR/opinions.study; a rerun skips the
finished cells.
"""

from __future__ import annotations

import io
import itertools
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import TINY, add_study_args, machine, parser, run_grid, to_markdown, write_outputs

from lens_laai.fitting.fit import parse_layers
from lens_laai.opinions.evaluate import (
    distributions,
    few_shot_demos,
    plot_distributions,
)
from lens_laai.opinions.fit import fit_opinion
from lens_laai.opinions.loading import load_survey
from lens_laai.opinions.metrics import mean_metrics
from lens_laai.opinions.survey import toy_survey
from lens_laai.storage.bundle import atomic_write_text

GROUPS = [
    "POLVIEWS=Extremely liberal",
    "POLVIEWS=Moderate",
    "POLVIEWS=Extremely conservative",
    "PARTYID=Strong Democrat",
    "PARTYID=Independent",
    "PARTYID=Strong Republican",
]
METHODS = ["plain", "persona", "few_shot", "group_mean", "laai_no_lasso", "laai"]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument(
        "--survey", default="gss-spending", help="bundled survey name, survey JSON file or OpinionQA directory"
    )
    p.add_argument("--groups", default=",".join(GROUPS), help="comma list of ATTRIBUTE=VALUE groups")
    p.add_argument("--seeds", default="0,1,2", help="question-split seeds")
    p.add_argument("--n-train-questions", type=int, default=8)
    p.add_argument("--n-valid-questions", type=int, default=4)
    p.add_argument("--layers", default="7,13,19", help="candidate layers (comma list, 'default' or 'all')")
    p.add_argument("--group-l1", default="0.05,0.01", help="λ₂ path, largest first")
    p.add_argument("--l1", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=10, help="proximal steps per (layer, λ₂)")
    p.add_argument("--figure-groups", default="POLVIEWS=Extremely liberal,POLVIEWS=Extremely conservative")
    add_study_args(p)
    args = p.parse_args(argv)
    start = time.perf_counter()
    survey = load_survey(args.survey)
    if args.quick or args.model == TINY:  # the tiny model's context cannot hold the GSS few-shot prompts
        survey = toy_survey()
        args.groups = args.figure_groups = "PARTY=Red,PARTY=Blue"
        args.seeds, args.n_train_questions, args.n_valid_questions, args.layers, args.steps = "0,1", 3, 1, "1", 3
    groups = [survey.group(g).name for g in args.groups.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    fixed = {
        "model": args.model,
        "survey": "toy" if survey.name == toy_survey().name else args.survey,
        "n_train_questions": args.n_train_questions,
        "n_valid_questions": args.n_valid_questions,
        "layers": args.layers,
        "group_l1": [float(x) for x in args.group_l1.split(",")],
        "l1": args.l1,
        "steps": args.steps,
    }
    table = run_grid("opinions", "opinions:cell", {"seed": seeds, "group": groups}, fixed, args)
    order = {cell: i for i, cell in enumerate(itertools.product(seeds, groups))}  # the order the old loop ran
    table = table.iloc[sorted(range(len(table)), key=lambda i: order[(table.seed.iloc[i], table.group.iloc[i])])]
    rows = [r for cell_rows in table.rows for r in json.loads(cell_rows)]
    questions = [pd.read_json(io.StringIO(q), orient="records", convert_dates=False) for q in table.questions]
    layers = parse_layers(args.layers, int(table.n_layers.iloc[0]))
    rows = pd.DataFrame(rows)
    per_question = pd.concat(questions, ignore_index=True)
    wide = {metric: by_method_and_group(rows, metric) for metric in ("representativeness", "kl", "tv", "spread")}
    target = rows[rows["method"] == "plain"].assign(method="target", spread=lambda t: t["target_spread"])
    wide["spread"] = pd.concat([by_method_and_group(target, "spread", ["target"]), wide["spread"]], ignore_index=True)
    meta = {
        "survey": survey.name,
        "survey_hash": survey.data_hash(),
        "groups": groups,
        "seeds": seeds,
        "layers": layers,
        "args": vars(args),
        "machine": machine(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    for metric, table in wide.items():
        print(f"\n{metric} on held-out questions (mean ± std over {len(seeds)} seeds):")
        print(to_markdown(table))
    print(f"\n{meta['seconds']:.0f}s")
    if args.out_dir:
        write_outputs(args.out_dir, "opinions_rows", rows, meta)
        atomic_write_text(Path(args.out_dir) / "opinions_questions.csv", per_question.to_csv(index=False))
        atomic_write_text(
            Path(args.out_dir) / "opinions.md",
            "\n\n".join(
                f"{metric}, held-out questions, mean ± std over seeds (n seeds):\n\n{to_markdown(t)}"
                for metric, t in wide.items()
            )
            + "\n",
        )
        figure(
            per_question,
            survey,
            [survey.group(g).name for g in args.figure_groups.split(",")],
            seeds[0],
            Path(args.out_dir) / "opinions.png",
        )
    if args.json:
        records = rows.astype(object).where(rows.notna(), None).to_dict("records")
        print(json.dumps({"rows": records, "seconds": meta["seconds"]}))
    return 0


def cell(ctx, config: dict) -> dict:
    """One (seed, group) cell: every method's scores on the seed's held-out questions (the study's cell kind)."""
    model = ctx.model(config["model"])
    survey = toy_survey() if config["survey"] == "toy" else load_survey(config["survey"])
    seed, g = config["seed"], config["group"]
    grp = survey.group(g)
    splits = survey.split(seed, config["n_train_questions"], config["n_valid_questions"])
    layers = parse_layers(config["layers"], model.cfg.n_layers)
    runners = ctx.cache.setdefault(("opinion-runners", seed), {})  # same prompts for every group of a split
    tables = {}
    for m in ("plain", "persona"):  # every question once per group and worker (batched as before), then the test ones
        key = ("every", config["survey"], g, m)
        if key not in ctx.cache:
            ctx.cache[key] = distributions(model, survey, grp, list(survey.questions), m)
        tables[m] = ctx.cache[key][ctx.cache[key]["key"].isin(splits.test)]
    demos = few_shot_demos(survey, grp, splits.train, None, seed)
    tables["few_shot"] = distributions(model, survey, grp, splits.test, "few_shot", demos=demos)
    tables["group_mean"] = group_mean(survey, grp, splits)
    common = {"splits": splits, "steps": config["steps"], "progress": False, "runners": runners}
    fitted = fit_opinion(
        model, survey, g, "auto", layers=layers, l1=config["l1"], group_l1=config["group_l1"], **common
    )
    plain_fit = fit_opinion(model, survey, g, fitted.layer, l1=0.0, group_l1=0.0, **common)
    info = {}
    for name, result in (("laai", fitted), ("laai_no_lasso", plain_fit)):
        tables[name] = distributions(model, survey, grp, splits.test, "plain", result.intervention)
        info[name] = {
            "layer": result.layer,
            "group_l1": result.group_l1,
            "n_selected": len(result.selected_heads),
            "fit_seconds": round(result.seconds, 1),
        }
    rows, questions = [], []
    for method in METHODS:
        table = tables[method].assign(group=g, seed=seed, method=method)
        questions.append(table)
        row = mean_metrics(table).iloc[0].to_dict()
        rows.append({"group": g, "seed": seed, **row, **spread(table, survey), **info.get(method, {})})
    return {
        "rows": json.dumps(rows),
        "questions": pd.concat(questions, ignore_index=True).to_json(orient="records", double_precision=15),
        "forward_equivalents": fitted.forward_equivalents + plain_fit.forward_equivalents,
        "labelled_pairs": len(splits.train) + len(splits.valid),
        "n_layers": model.cfg.n_layers,
    }


def group_mean(survey, group, splits) -> pd.DataFrame:
    """The no-model reference: each held-out question gets the group's mean distribution over the training
    questions with the same options (uniform if there is none)."""
    import numpy as np

    from lens_laai.opinions.metrics import question_metrics

    rows = []
    for key in [k for k in splits.test if k in group.answers]:
        q, answers = survey.questions[key], group.answers[key]
        same = [
            group.answers[k].distribution
            for k in splits.train
            if k in group.answers and survey.questions[k].options == q.options
        ]
        prior = np.mean(same, axis=0) if same else np.full(len(q.options), 1 / len(q.options))
        rows.append(
            {
                "key": key,
                "question": q.text,
                "n_respondents": answers.n,
                "target": answers.distribution.round(6).tolist(),
                "model": prior.round(6).tolist(),
                **question_metrics(answers.distribution, prior, q.ordinal),
                "refusal_target": answers.refusal_share,
                "refusal_model": float("nan"),
            }
        )
    return pd.DataFrame(rows)


def spread(table: pd.DataFrame, survey) -> dict[str, float]:
    """Std over questions of the expected ordinal answer, for the method and for the group (target)."""
    import numpy as np

    ordinal = [np.asarray(survey.questions[k].ordinal) for k in table["key"]]
    model = [float(np.dot(o, d)) for o, d in zip(ordinal, table["model"])]
    target = [float(np.dot(o, d)) for o, d in zip(ordinal, table["target"])]
    return {"spread": float(np.std(model, ddof=1)), "target_spread": float(np.std(target, ddof=1))}


def by_method_and_group(rows: pd.DataFrame, metric: str, methods: list[str] | None = None) -> pd.DataFrame:
    """Methods × groups, each cell 'mean ± std (seeds)' of ``metric``, plus the mean over groups."""
    out = []
    for method in [m for m in (methods or METHODS) if m in set(rows["method"])]:
        part = rows[rows["method"] == method]
        cells = {"method": method}
        for group, sub in part.groupby("group", sort=False):
            cells[group] = (
                f"{sub[metric].mean():.3f} ± {sub[metric].std(ddof=1) if len(sub) > 1 else 0:.3f} ({len(sub)})"
            )
        per_seed = part.groupby("seed")[metric].mean()
        cells["all groups"] = f"{per_seed.mean():.3f} ± {per_seed.std(ddof=1) if len(per_seed) > 1 else 0:.3f}"
        out.append(cells)
    return pd.DataFrame(out)


def figure(per_question: pd.DataFrame, survey, groups: list[str], seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = per_question[(per_question["seed"] == seed) & per_question["group"].isin(groups)]
    keys = list(dict.fromkeys(part["key"]))[:3]
    fig, grid = plt.subplots(len(groups), len(keys), figsize=(4.3 * len(keys), 3.0 * len(groups)), squeeze=False)
    for row, group in zip(grid, groups):
        plot_distributions(
            part[part["group"] == group],
            survey,
            keys,
            ["plain", "persona", "few_shot", "laai"],
            title=group,
            axes=list(row),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
