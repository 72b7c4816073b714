"""Heads vs attribution and ablation: fit each task, score every head, compare.

For each task (bundled data, seed 0, n = 20, the CLI's default layer sweep): fit LAAI, then
`lens_laai.analysis.head_table.head_table` over every layer. Prints and writes the summary (Spearman ρ of
‖Δ_h‖ with each score, precision@k, Jaccard), the random-head control percentile, the agreement of
attribution with activation patching, and the cost and time of every column; saves the heatmaps.

    OMP_NUM_THREADS=2 python benchmarks/heads_vs_ablation.py --out-dir docs/results
    python benchmarks/heads_vs_ablation.py --model lens-laai-tiny --quick --json
"""

from __future__ import annotations

import json
import sys
import time

import pandas as pd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import (
    TINY,
    get_task,
    load,
    machine,
    old_default_layers,
    parser,
    to_markdown,
    write_outputs,
)

from lens_laai import fit
from lens_laai.analysis.head_table import head_table


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--tasks", default="antonym,english-french")
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--patching-prompts", type=int, default=4)
    args = p.parse_args(argv)
    start = time.perf_counter()
    model = load(args)
    quick = args.quick or args.model == TINY
    n_train, n_valid, steps = (8, 4, 3) if quick else (args.n_train, 40, args.steps)
    summaries, controls, costs, meta = [], [], [], {"args": vars(args), "machine": machine(), "tasks": {}}
    for name in args.tasks.split(","):
        task = get_task(name, args.data_dir, args.model)
        t0 = time.perf_counter()
        # the earlier release's default fit, which docs/analysis.md reports: 8-layer sweep, λ₂ = 0.3, 40 validation pairs
        result = fit(
            model,
            task,
            "sweep",
            layers=old_default_layers(model.cfg.n_layers),
            group_l1=0.3,
            n_train=n_train,
            n_valid=n_valid,
            seed=args.seed,
            steps=steps,
            progress=not args.no_progress,
        )
        fit_seconds = time.perf_counter() - t0
        analysis = head_table(
            model,
            task,
            result.intervention,
            n_prompts=6 if quick else args.n_prompts,
            shots=2 if quick else 5,
            patching_prompts=4 if quick else args.patching_prompts,
            n_random=5 if quick else 20,
            seed=args.seed,
            progress=not args.no_progress,
        )
        summaries.append(analysis.summary.assign(task=name))
        controls.append(
            {
                "task": name,
                "layer": result.layer,
                "selected": len(result.selected_heads),
                "percentile": analysis.random_control.attrs.get("percentile"),
                "selected_logprob_drop": float(analysis.random_control.logprob_drop.iloc[0])
                if len(analysis.random_control)
                else None,
                "random_median_logprob_drop": float(analysis.random_control.logprob_drop.iloc[1:].median())
                if len(analysis.random_control)
                else None,
                "attr_vs_act_rho": analysis.settings["attribution_vs_activation"]["rho"],
                "attr_vs_act_sign_agreement": analysis.settings["attribution_vs_activation"]["sign_agreement"],
            }
        )
        costs.append(analysis.costs.assign(task=name))
        meta["tasks"][name] = {
            "layer": result.layer,
            "selected_heads": [list(h) for h in result.selected_heads],
            "fit_seconds": fit_seconds,
            "analysis_seconds": float(analysis.costs.seconds.sum()),
            "settings": analysis.settings,
        }
        if args.out_dir:
            _save(args.out_dir, name, analysis)
    summary, control, cost = pd.concat(summaries), pd.DataFrame(controls), pd.concat(costs)
    meta["seconds"] = time.perf_counter() - start
    for title, table in (
        ("Summary", summary),
        ("Random-head control and attribution agreement", control),
        ("Cost", cost),
    ):
        print(f"\n## {title}\n" + to_markdown(table))
    write_outputs(args.out_dir, "heads_vs_ablation_summary", summary, meta)
    write_outputs(args.out_dir, "heads_vs_ablation_control", control, meta)
    write_outputs(args.out_dir, "heads_vs_ablation_cost", cost, meta)
    if args.json:
        print(
            json.dumps(
                {
                    "summary": summary.to_dict("records"),
                    "control": control.to_dict("records"),
                    "cost": cost.to_dict("records"),
                    "seconds": meta["seconds"],
                },
                default=float,
            )
        )
    return 0


def _save(out_dir: str, name: str, analysis) -> None:
    from pathlib import Path

    from lens_laai.analysis.views import heatmaps
    from lens_laai.storage.bundle import atomic_write_text

    folder = Path(out_dir)
    atomic_write_text(folder / f"heads_vs_ablation_{name}.csv", analysis.table.to_csv(index=False))
    heatmaps(analysis.scores).savefig(folder / f"heads_vs_ablation_{name}.png", dpi=90)


if __name__ == "__main__":
    sys.exit(main())
