"""Selection probabilities of every head, per task: stability selection on the development tasks.

For each (task, seed), on the n = 20 training pairs of ``dev_study.py`` / ``sparse_study.py`` /
``modes_study.py`` (same seeds, same pairs), :func:`lens_laai.fitting.stability.stability` refits the
default zero-shot λ₂ path at the default layer on ``--subsamples`` complementary-pair half-samples
(one batched fit) and reports each head's selection probability, the stable set at the threshold and
the Shah–Samworth bound on the expected number of falsely selected heads.

    OMP_NUM_THREADS=1 python benchmarks/stability_study.py --data-dir ../shared/datasets/function_vectors \\
        --out-dir docs/results/stability --workers 2
    python benchmarks/stability_study.py --model lens-laai-tiny --quick

``--out-dir`` gets ``selection_probabilities.csv`` (task, seed, head, probability), ``stable_sets``
(per task: stable heads, bound, seconds) and ``selection_probabilities.png`` (a tasks × heads heatmap).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import TINY, add_study_args, get_task, machine, nested_splits, parser, run_grid, to_markdown, write_outputs
from modes_study import TASKS

from lens_laai import Task, TaskSplits
from lens_laai.fitting.stability import stability


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--tasks", default=",".join(TASKS[:12]))
    p.add_argument("--seeds", default="0")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--subsamples", type=int, default=50)
    add_study_args(p)
    args = p.parse_args(argv)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    fixed = {"model": args.model, "data_dir": args.data_dir, "n": args.n, "subsamples": args.subsamples}
    if args.quick or args.model == TINY:
        tasks, seeds, fixed = tasks[:1], [0], fixed | {"n": 8, "subsamples": 4}
    cells = run_grid("stability_study", "stability_study:cell", {"seed": seeds, "task": tasks}, fixed, args)
    probs = pd.DataFrame([r for c in cells.itertuples() for r in json.loads(c.heads)])
    sets = pd.DataFrame([json.loads(c.summary) for c in cells.itertuples()])
    print(to_markdown(sets))
    if args.out_dir:
        meta = {"args": vars(args), "machine": machine()}
        write_outputs(args.out_dir, "selection_probabilities", probs, meta)
        write_outputs(args.out_dir, "stable_sets", sets, meta)
        _heatmap(probs, Path(args.out_dir) / "selection_probabilities.png")
    return 0


def cell(ctx, config: dict) -> dict:
    """One (task, seed): every head's selection probability at the default layer."""
    model = ctx.model(config["model"])
    task = get_task(config["task"], config["data_dir"], config["model"])
    n = config["n"]
    nested = nested_splits(task, config["seed"], n, 0, 0 if config["model"] != TINY else 4, n)
    splits = TaskSplits(nested.train, Task(task.name, []), nested.test, config["seed"])
    start = time.perf_counter()
    st = stability(model, splits, n_subsamples=config["subsamples"], progress=False)
    seconds = time.perf_counter() - start
    base = {"task": config["task"], "seed": config["seed"]}
    heads = [
        base | {"layer": int(r.layer), "head": int(r.head), "probability": float(r.selection_probability)}
        for r in st.table.itertuples()
    ]
    summary = base | {
        "stable_heads": " ".join(f"L{l}H{h}" for l, h in st.stable_heads()),
        "group_l1_rel": st.lam,
        "threshold": st.threshold,
        "error_bound": st.error_bound,
        "subsamples": config["subsamples"],
        "seconds": seconds,
        "forward_equivalents": st.forward_equivalents,
    }
    return {"heads": json.dumps(heads), "summary": json.dumps(summary)}


def _heatmap(probs: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = probs.groupby(["task", "head"]).probability.mean().unstack("head")
    fig, ax = plt.subplots(figsize=(1 + 0.5 * table.shape[1], 0.4 * len(table) + 1.2))
    im = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(table)), table.index)
    ax.set_xticks(range(table.shape[1]), [f"H{h}" for h in table.columns])
    ax.set_title(f"selection probability at layer {int(probs.layer.iloc[0])}")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
