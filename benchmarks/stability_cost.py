"""What stability selection costs: N half-sample fits as one batched fit, against one default fit.

Side by side in one run on the same task and pairs (n = 20 antonym pairs by default): the default
fit (``lens_laai.fit``: cross-validated λ₂ path, 1-SE rule, relaxed refit) and
``lens_laai.fitting.stability.stability`` with ``--subsamples`` complementary half-samples (one
batched fit; target: 50 subsamples in at most 5× the default fit's wall time). Each is timed
``--repeats`` times, alternating, and the medians are compared, so machine load hits both alike.

    OMP_NUM_THREADS=1 python benchmarks/stability_cost.py --json
    python benchmarks/stability_cost.py --model lens-laai-tiny --quick --json

With ``--json`` the last line is one JSON object: seconds and forward-pass equivalents of each, and
``ratio`` (stability seconds / default-fit seconds).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import TINY, get_task, load, machine, parser

from lens_laai import fit
from lens_laai.fitting.stability import stability


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--task", default="antonym")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--subsamples", type=int, default=50)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    model = load(args)
    n, subsamples = args.n, args.subsamples
    if args.quick or args.model == TINY:
        n, subsamples = 8, 6
    splits = get_task(args.task, args.data_dir, args.model).split(0, n, 0)
    runs: dict[str, list[float]] = {"fit": [], "stability": []}
    cost: dict[str, float] = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = fit(model, splits, progress=False)
        runs["fit"].append(time.perf_counter() - start)
        cost["fit"] = result.forward_equivalents
        start = time.perf_counter()
        st = stability(model, splits, n_subsamples=subsamples, progress=not args.no_progress)
        runs["stability"].append(time.perf_counter() - start)
        cost["stability"] = st.forward_equivalents
    fit_s, st_s = statistics.median(runs["fit"]), statistics.median(runs["stability"])
    out = {
        "task": args.task,
        "n": n,
        "subsamples": subsamples,
        "fit_seconds": round(fit_s, 2),
        "stability_seconds": round(st_s, 2),
        "ratio": round(st_s / fit_s, 3),
        "fit_forward_equivalents": round(cost["fit"], 1),
        "stability_forward_equivalents": round(cost["stability"], 1),
        "fit_heads": [f"L{l}H{h}" for l, h in result.selected_heads],
        "stable_heads": [f"L{l}H{h}" for l, h in st.stable_heads()],
        "selection_probability": {
            f"L{r.layer}H{r.head}": round(r.selection_probability, 3) for r in st.table.itertuples()
        },
        "error_bound": round(st.error_bound, 3),
        "runs": runs,
        "machine": machine(),
    }
    print(
        f"default fit {fit_s:.1f}s ({cost['fit']:.0f} forward-pass equivalents); stability, {subsamples} "
        f"half-samples in one batched fit: {st_s:.1f}s ({cost['stability']:.0f}); ratio {st_s / fit_s:.2f}× "
        "(target ≤ 5×)"
    )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
