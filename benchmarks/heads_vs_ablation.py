"""The link study: is a sparse head set necessary, sufficient, and where do the causal methods rank it?

For each (task, seed):

0. splits: the seed's shuffle, ``--n-train`` (20) training pairs, no validation pairs, ``--n-test`` (100) test pairs;
1. one λ₂ path at ``--layer`` over ``--rel`` (fractions of λ_max, warm-started, largest first);
   the **sparse** fit is the densest path point keeping 1 to ``--max-heads`` heads (chosen by head
   count alone, never by a test score); the **dense** fit is the path's last point (0.05·λ_max,
   the earlier default, which keeps about the whole layer);
2. held-out test accuracy of the sparse fit, the dense fit and no intervention (``evaluate``);
3. ``head_table`` of the sparse fit over ``--score-layers`` (default all): activation patching (TransformerLens'
   ``PatchingResult``), attribution patching, zero/mean ablation, DLA, the random-head control
   (the selected heads mean-ablated together against ``--n-random`` random sets of as many
   *unselected* heads: percentile with its Clopper–Pearson interval, drop with its t-interval) and
   sufficiency (zero-shot accuracy with Δ on the selected heads against the dense fit);
4. per causal method, precision@k of its top-k against the selected heads with the exact
   permutation p, and each selected head's rank among all heads.

Writes ``heads_vs_ablation_link.{csv,md,meta.json}`` (one row per task × seed),
``heads_vs_ablation_summary.*`` (every method's ranking, long form), ``heads_vs_ablation_cost.*``,
and per task × seed the head table CSV and heatmaps. ``--resume`` skips units already written.

    OMP_NUM_THREADS=1 python benchmarks/heads_vs_ablation.py --data-dir ../shared/datasets/function_vectors \\
        --tasks antonym,english-french,country-currency,person-occupation --seeds 0,1 --score-layers 10-22 \\
        --out-dir docs/results --resume
    # the twelve-task study of docs/analysis.md: the default fit's heads (--fit default) instead of step 1
    OMP_NUM_THREADS=1 python benchmarks/heads_vs_ablation.py --data-dir ../shared/datasets/function_vectors \\
        --fit default --tasks antonym,synonym,... --seeds 0 --score-layers 14-18 --out-dir docs/results/link_study --resume
    python benchmarks/heads_vs_ablation.py --model lens-laai-tiny --quick --json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import TINY, get_task, load, loosely_unique, machine, parser, to_markdown, write_outputs

from lens_laai import evaluate, fit_path
from lens_laai.analysis.head_table import head_table

METHODS = ("dla", "act_patch", "attr_patch", "ablation", "necessity", "random_control")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--tasks", default="antonym,english-french")
    p.add_argument("--seeds", default="0")
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--n-test", type=int, default=100, help="held-out test pairs (as the development study)")
    p.add_argument("--layer", type=int, default=16)
    p.add_argument("--rel", default="0.9,0.7,0.5,0.35,0.2,0.05", help="λ₂ path, fractions of λ_max")
    p.add_argument(
        "--fit",
        choices=["default", "path"],
        default="path",
        help="the sparse set: 'default' (the library's default fit, fit(model, splits, layer=LAYER): its heads "
        "and mode chosen by cross-validation on the n pairs; dense: the zero-shot path's last point) or "
        "'path' (the densest point of one λ₂ path keeping 1..--max-heads heads)",
    )
    p.add_argument("--max-heads", type=int, default=3)
    p.add_argument("--score-layers", default="all", help="layers head_table scores: 'all' (default) or 'first-last'")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--patching-prompts", type=int, default=4)
    p.add_argument("--n-random", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="skip task × seed units already in the link CSV")
    args = p.parse_args(argv)
    start = time.perf_counter()
    model = load(args)
    quick = args.quick or args.model == TINY
    layer = min(args.layer, model.cfg.n_layers - 1)
    rel = [float(x) for x in args.rel.split(",")]
    n_train = 8 if quick else args.n_train
    links, summaries, costs = _previous(args) if args.resume else ([], [], [])
    done = {(r["task"], r["seed"]) for r in links}
    meta = {"args": vars(args), "machine": machine(), "units": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.tasks.split(","):
            if (name, seed) in done:
                continue
            link, summary, cost = run_unit(model, name, seed, layer, rel, n_train, quick, args)
            links.append(link)
            summaries.append(summary.assign(task=name, seed=seed))
            costs.append(cost.assign(task=name, seed=seed))
            write_outputs(args.out_dir, "heads_vs_ablation_link", pd.DataFrame(links), meta)
            write_outputs(args.out_dir, "heads_vs_ablation_summary", pd.concat(summaries), meta)
            write_outputs(args.out_dir, "heads_vs_ablation_cost", pd.concat(costs), meta)
            print(f"{name} seed {seed}: {json.dumps(link, default=str)}", flush=True)
    link, summary = pd.DataFrame(links), pd.concat(summaries) if summaries else pd.DataFrame()
    meta["seconds"] = time.perf_counter() - start
    print("\n## The link, per task\n" + to_markdown(link[[c for c in LINK_COLUMNS if c in link]]))
    if args.json:
        control = [
            {**row, "percentile": row["necessity_percentile"], "attr_vs_act_rho": row["attr_vs_act_rho"]}
            for row in links
        ]
        print(
            json.dumps(
                {"link": links, "summary": summary.to_dict("records"), "control": control, "seconds": meta["seconds"]},
                default=float,
            )
        )
    return 0


LINK_COLUMNS = [
    "task",
    "seed",
    "mode",
    "heads",
    "rel",
    "acc_sparse",
    "acc_dense",
    "acc_none",
    "dense_heads",
    "necessity_drop",
    "necessity_drop_ci",
    "necessity_percentile",
    "necessity_percentile_ci",
    "act_patch_precision",
    "act_patch_p",
    "attr_patch_precision",
    "attr_patch_p",
    "mean_ablation_precision",
    "mean_ablation_p",
    "zero_ablation_precision",
    "zero_ablation_p",
]


def run_unit(model, name: str, seed: int, layer: int, rel: list[float], n_train: int, quick: bool, args):
    task = loosely_unique(get_task(name, args.data_dir, args.model))
    splits = task.split(seed, n_train, 0, min(args.n_test, len(task) - n_train))
    t0 = time.perf_counter()
    steps = {"steps": 3} if quick else ({"steps": args.steps} if args.steps else {})
    if args.fit == "default":
        sparse, dense, rel_used, kept, mode = _default_fits(model, splits, layer, steps, args)
    else:
        path, ivs = fit_path(model, splits, layer, rel, relative=True, progress=not args.no_progress, **steps)
        kept = [i for i, n in enumerate(path.n_selected) if 1 <= n <= args.max_heads]
        sparse, dense, mode = ivs[kept[-1]] if kept else ivs[0], ivs[-1], ""
        rel_used = float(path.group_l1_rel.iloc[kept[-1]]) if kept else float(path.group_l1_rel.iloc[0])
    fit_seconds = time.perf_counter() - t0
    accuracy = {key: evaluate(model, splits, iv).accuracy for key, iv in (("sparse", sparse), ("dense", dense))}
    accuracy["none"] = evaluate(model, splits).accuracy
    analysis = head_table(
        model,
        splits,
        sparse,
        methods=METHODS,
        n_prompts=6 if quick else args.n_prompts,
        shots=2 if quick else 5,
        patching_prompts=args.patching_prompts,
        n_random=5 if quick else args.n_random,
        layers=_layers(args.score_layers, model.cfg.n_layers, layer),
        seed=seed,
        dense=dense,
        progress=not args.no_progress,
    )
    necessity = analysis.findings.get("necessity", {})
    sufficiency = analysis.findings.get("sufficiency", {})
    summary = analysis.summary.set_index("score")
    link = {
        "task": name,
        "seed": seed,
        "layer": layer,
        "fit": args.fit,
        "mode": mode,
        "rel": rel_used,
        "k": len(sparse.selected_heads()),
        "within_budget": bool(kept),  # False: no path point kept 1..max_heads heads; the sparsest was used
        "heads": " ".join(f"L{l}H{h}" for l, h in sparse.selected_heads()),
        "dense_heads": len(dense.selected_heads()),
        "n_test": len(splits.test),
        "acc_sparse": accuracy["sparse"],
        "acc_dense": accuracy["dense"],
        "acc_none": accuracy["none"],
        "suff_acc_selected": sufficiency.get("selected_accuracy"),
        "suff_acc_dense": sufficiency.get("dense_accuracy"),
        "necessity_drop": necessity.get("drop"),
        "necessity_drop_ci": _ci(necessity.get("drop_low"), necessity.get("drop_high"), 3),
        "necessity_percentile": necessity.get("percentile", float("nan")),
        "necessity_percentile_ci": _ci(necessity.get("percentile_low"), necessity.get("percentile_high"), 0),
        "random_median_drop": necessity.get("random_median"),
        "necessity_note": necessity.get("reason", ""),
        "attr_vs_act_rho": analysis.settings.get("attribution_vs_activation", {}).get("rho"),
        "clean_logprob": analysis.settings.get("clean_logprob"),
        "corrupted_logprob": analysis.settings.get("corrupted_logprob"),
        "fit_seconds": fit_seconds,
        "analysis_seconds": float(analysis.costs.seconds.sum()),
    }
    for score, short in (
        ("act_patch", "act_patch"),
        ("attr_patch", "attr_patch"),
        ("mean_logprob_drop", "mean_ablation"),
        ("zero_logprob_drop", "zero_ablation"),
    ):
        if score in summary.index:
            row = summary.loc[score]
            link[f"{short}_precision"] = row.precision_at_k
            link[f"{short}_p"] = row.p_precision
            link[f"{short}_ranks"] = row.selected_ranks
    link["answer"] = " ".join(analysis.answer())
    if args.out_dir:
        _save(args.out_dir, f"{name}_s{seed}", analysis)
    return link, analysis.summary, analysis.costs


def _default_fits(model, splits, layer: int, steps: dict, args):
    """The default fit (its heads, λ₂ and chosen mode) and the dense zero-shot fit (the path's last point,
    penalised: the default before the sparse head set); the analysis scores Δ zero-shot."""
    from lens_laai import fit

    quiet = {"progress": not args.no_progress, **steps}
    default = fit(model, splits, layer=layer, **quiet)
    dense = fit(model, splits, layer=layer, mode="zero-shot", select="none", relaxed=False, **quiet)
    rel = float(default.config.group_l1)
    return default.intervention, dense.intervention, rel, default.n_selected > 0, default.mode.name


def _layers(text: str, n_layers: int, layer: int) -> list[int] | str:
    if text == "all":
        return "all"
    first, last = (int(x) for x in text.split("-"))
    chosen = list(range(max(0, first), min(n_layers - 1, last) + 1))
    return chosen if layer in chosen else sorted({*chosen, layer})


def _ci(low, high, digits: int) -> str:
    if low is None or high is None or low != low:
        return ""
    return f"{low:.{digits}f} to {high:.{digits}f}"


def _previous(args) -> tuple[list[dict], list[pd.DataFrame], list[pd.DataFrame]]:
    folder = Path(args.out_dir or ".")
    frames = []
    for stem in ("link", "summary", "cost"):
        path = folder / f"heads_vs_ablation_{stem}.csv"
        frames.append(pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.exists() else pd.DataFrame())
    link, summary, cost = frames
    if "task" not in link:
        return [], [], []
    return link.to_dict("records"), [summary] if len(summary) else [], [cost] if len(cost) else []


def _save(out_dir: str, stem: str, analysis) -> None:
    from lens_laai.analysis.views import heatmaps
    from lens_laai.storage.bundle import atomic_write_text

    folder = Path(out_dir)
    atomic_write_text(folder / f"heads_vs_ablation_{stem}.csv", analysis.table.to_csv(index=False))
    columns = ["norm", "act_patch", "attr_patch", "mean_logprob_drop", "zero_logprob_drop", "dla"]
    heatmaps(analysis.scores, columns).savefig(folder / f"heads_vs_ablation_{stem}.png", dpi=80)


if __name__ == "__main__":
    sys.exit(main())
