"""Head budget: accuracy against the number of selected heads along a λ₂ path.

At one layer, fits λ₂ from large to small with warm starts (`lens_laai.fit_path`) and scores every
point on validation and test. Writes CSV/markdown and a PNG with --out-dir.

    python benchmarks/head_budget.py --task antonym --layer 15 --out-dir docs/results
    python benchmarks/head_budget.py --model lens-laai-tiny --quick --json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import TINY, get_task, load, machine, parser, to_markdown, write_outputs

from lens_laai import evaluate, fit_path

DEFAULT_PATH = "2.0,1.0,0.6,0.4,0.3,0.2,0.1,0.05,0.0"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--task", default="antonym")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--group-l1", default=DEFAULT_PATH, help="comma list of λ₂ values")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    model = load(args)
    if args.quick or args.model == TINY:
        args.layer, args.steps, args.n_train, args.n_test = min(args.layer, model.cfg.n_layers - 1), 3, 8, 8
    task = get_task(args.task, args.data_dir, args.model)
    n_valid = min(40, len(task) - args.n_train - args.n_test) if args.model != TINY else 4
    splits = task.split(args.seed, args.n_train, n_valid, args.n_test)
    lambdas = [float(x) for x in args.group_l1.split(",")]
    table, ivs = fit_path(model, splits, args.layer, lambdas, steps=args.steps, progress=not args.no_progress)
    table["test_accuracy"] = [evaluate(model, splits, iv).accuracy for iv in ivs]
    table["heads"] = [" ".join(f"H{h}" for _, h in iv.selected_heads()) for iv in ivs]
    meta = {
        "task": task.name,
        "layer": args.layer,
        "args": vars(args),
        "machine": machine(),
        "zero_shot_accuracy": evaluate(model, splits, shots=0).accuracy,
        "seconds": time.perf_counter() - start,
    }
    print(to_markdown(table))
    write_outputs(args.out_dir, f"head_budget_{task.name}", table, meta)
    if args.out_dir:
        _plot(table, meta, Path(args.out_dir) / f"head_budget_{task.name}.png")
    if args.json:
        print(json.dumps({"rows": table.to_dict("records"), "zero_shot_accuracy": meta["zero_shot_accuracy"]}))
    return 0


def _plot(table, meta, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(table.n_selected, table.test_accuracy, "o-", label="test")
    ax.plot(table.n_selected, table.valid_accuracy, "s--", alpha=0.6, label="validation")
    ax.axhline(meta["zero_shot_accuracy"], color="grey", ls=":", label="zero-shot prompt")
    ax.set(xlabel=f"selected heads at layer {meta['layer']}", ylabel="accuracy", title=f"{meta['task']}: head budget")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
