"""Task calculus: does Δ_antonym + Δ_french do "antonym, then French"?

Fits one intervention per task (same recipe as `lens-laai fit`), then evaluates on the composed
task (input "hot", target the French of "cold"): each vector alone, their sum, the best weighted
sum (weights chosen on a composed validation split), and zero-/k-shot prompting with composed
demonstrations. Prints a table; writes CSV/markdown with --out-dir; --json ends with one JSON line.

    python benchmarks/composition.py --out-dir docs/results
    python benchmarks/composition.py --model lens-laai-tiny --quick --json
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import pandas as pd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import TINY, get_task, load, machine, parser, to_markdown, write_outputs

from lens_laai import Task, compose_tasks, evaluate, fit


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--first", default="antonym")
    p.add_argument("--second", default="english-french")
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--layers", default="6,9,12,15,18", help="candidate layers for each single-task fit")
    p.add_argument("--group-l1", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n-valid", type=int, default=30, help="composed validation pairs (weight choice)")
    p.add_argument("--n-test", type=int, default=300, help="cap on composed (and single-task) test pairs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    model = load(args)
    layers = [int(x) for x in args.layers.split(",")]
    if args.quick or args.model == TINY:
        layers, args.steps, args.n_train, args.n_valid, args.n_test = (
            [l for l in layers if l < model.cfg.n_layers][:2] or [1],
            3,
            6,
            4,
            8,
        )
    first, second = get_task(args.first, args.data_dir, args.model), get_task(args.second, args.data_dir, args.model)
    if args.model == TINY:  # the tiny model's vocabulary: compose the tiny task with itself reversed
        second = Task("reverse", [(b, a) for a, b in first.pairs])
    composed_all = compose_tasks(first, second)
    fits = {}
    for task in (first, second):
        n_valid = min(40, len(task) - args.n_train - 2)
        splits = task.split(args.seed, args.n_train, n_valid, min(args.n_test, len(task) - args.n_train - n_valid))
        fits[task.name] = fit(
            model,
            splits,
            "sweep",
            layers=layers,
            group_l1=args.group_l1,
            steps=args.steps,
            progress=not args.no_progress,
        )
    composed = _held_out(composed_all, first, fits[first.name].splits.train, args)
    iv_a, iv_b = fits[first.name].intervention, fits[second.name].intervention
    cut = composed.split(args.seed, 0, args.n_valid, min(args.n_test, len(composed) - args.n_valid))
    valid, test = cut.valid, cut.test
    weights = max(
        itertools.product((0.5, 1.0, 1.5, 2.0), repeat=2),
        key=lambda w: evaluate(model, valid, w[0] * iv_a + w[1] * iv_b, split="all").accuracy,
    )
    demos = valid
    rows = [
        ("zero-shot prompt", evaluate(model, test, split="all").accuracy),
        (f"Δ_{first.name} alone", evaluate(model, test, iv_a, split="all").accuracy),
        (f"Δ_{second.name} alone", evaluate(model, test, iv_b, split="all").accuracy),
        (f"Δ_{first.name} + Δ_{second.name}", evaluate(model, test, iv_a + iv_b, split="all").accuracy),
        (
            f"{weights[0]}·Δ_{first.name} + {weights[1]}·Δ_{second.name} (weights on validation)",
            evaluate(model, test, weights[0] * iv_a + weights[1] * iv_b, split="all").accuracy,
        ),
    ]
    for k in (5, 10):
        if len(demos) >= k:
            rows.append((f"{k}-shot prompt (composed demos)", _k_shot(model, test, demos, k)))
    table = pd.DataFrame(rows, columns=["method", "accuracy"])
    table["n_test"] = len(test)
    meta = {
        "task": composed.name,
        "layers": {first.name: fits[first.name].layer, second.name: fits[second.name].layer},
        "selected_heads": {t: [list(h) for h in f.selected_heads] for t, f in fits.items()},
        "single_task_test_accuracy": {t: evaluate(model, f.splits, f.intervention).accuracy for t, f in fits.items()},
        "weights": list(weights),
        "args": vars(args),
        "machine": machine(),
        "seconds": time.perf_counter() - start,
    }
    print(to_markdown(table))
    print(
        f"\nlayers {meta['layers']}, single-task accuracy {meta['single_task_test_accuracy']}, {meta['seconds']:.0f}s"
    )
    write_outputs(args.out_dir, "composition", table, meta)
    if args.json:
        print(
            json.dumps(
                {"rows": table.to_dict("records"), **{k: meta[k] for k in ("task", "layers", "weights", "seconds")}}
            )
        )
    return 0


def _held_out(composed: Task, first: Task, first_train: Task, args) -> Task:
    """Composed pairs whose input was not a training input of the first task."""
    seen = {a for a, _ in first_train.pairs}
    pairs = [p for p in composed.pairs if p[0] not in seen]
    return Task(composed.name, pairs)


def _k_shot(model, test: Task, demos: Task, k: int) -> float:
    from lens_laai import TaskSplits

    return evaluate(model, TaskSplits(demos, Task(test.name, []), test, 0), shots=k).accuracy


if __name__ == "__main__":
    sys.exit(main())
