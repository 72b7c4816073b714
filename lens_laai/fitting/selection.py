"""Choosing the layer and λ₂ from the n labelled pairs alone: k-fold cross-validation.

A user with 20 examples has 20. :func:`cross_validate` splits them into ``folds`` parts, fits
every candidate (layer, λ₂ path) on all parts but one and scores the one left out, so each pair is
scored once by a fit that never saw it. :func:`choose` keeps the candidate with the best held-out
accuracy (ties: lower held-out cross-entropy); :func:`lens_laai.fitting.fit` then refits it on all n.

Example:
    >>> from lens_laai.fitting.selection import fold_splits
    >>> from lens_laai.testing import tiny_task
    >>> [(len(a), len(b)) for a, b in fold_splits(tiny_task().subset(list(range(10))), 2, seed=0)]
    [(5, 5), (5, 5)]
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import FitError
from lens_laai.fastpath import CostMeter
from lens_laai.fitting.layer_fit import layer_path
from lens_laai.tasks.prompts import PromptTemplate
from lens_laai.tasks.task import Task


def fold_splits(train: Task, folds: int, seed: int) -> list[tuple[Task, Task]]:
    """``folds`` (fit part, held-out part) pairs; the held-out parts partition ``train`` (seeded shuffle).

    Example:
        >>> from lens_laai.fitting.selection import fold_splits
        >>> from lens_laai.testing import tiny_task
        >>> folds = fold_splits(tiny_task().subset(list(range(8))), folds=2, seed=0)
        >>> [(len(fit_part), len(held)) for fit_part, held in folds]
        [(4, 4), (4, 4)]
    """
    if not isinstance(folds, int) or isinstance(folds, bool) or not 2 <= folds <= len(train):
        raise FitError(
            f"folds must be an integer within 2..n_train ({len(train)}), got {folds!r}; "
            "use more training pairs or fewer folds."
        )
    order = list(range(len(train)))
    random.Random(f"folds:{seed}").shuffle(order)
    parts = [sorted(order[f::folds]) for f in range(folds)]
    out = []
    for f, held in enumerate(parts):
        rest = sorted(i for g, part in enumerate(parts) if g != f for i in part)
        out.append((train.subset(rest), train.subset(held)))
    return out


def cross_validate(
    model: TransformerBridge,
    train: Task,
    layers: Sequence[int | tuple[int, ...]],
    lambdas: Sequence[float],
    cfg: Any,
    template: PromptTemplate,
    meter: CostMeter,
    progress: bool = True,
) -> pd.DataFrame:
    """Held-out scores of (layer, λ₂) candidates on every fold: one row each.

    Within a fold and layer the λ₂ path is fitted largest first with warm starts, as in the final
    fit. With ``cfg.halving`` the layers race (successive halving): after each λ₂ only the better
    half of the layers still running (by their best pooled held-out score so far: accuracy, then
    cross-entropy) go on to the next λ₂, so most of the compute goes to the promising layers.

    Columns: ``layer, lam`` (as given: relative or absolute), ``group_l1`` (absolute), ``fold,
    n_held, held_accuracy, held_ce, n_selected``.
    """
    parts = fold_splits(train, cfg.folds, cfg.seed)
    path = sorted(lambdas, reverse=True)
    runners: dict = {}  # one fold's held-out prompts are another's training prompts: build each prefix once
    running = {
        L: [
            layer_path(model, fit_part, held, L, path, cfg, template, meter, runners=runners)
            for fit_part, held in parts
        ]
        for L in layers
    }
    rows: list[dict[str, Any]] = []
    per_lambda, n = [], len(layers)  # layers still running at each λ₂
    for _ in path:
        per_lambda.append(n)
        n = (n + 1) // 2 if cfg.halving else n
    bar = tqdm(total=sum(per_lambda) * len(parts), desc="cross-validation", disable=not progress)
    for step, lam in enumerate(path):
        for L, fold_paths in running.items():
            for f, (gen, (_, held)) in enumerate(zip(fold_paths, parts)):
                fitted = next(gen)
                rows.append(
                    {
                        "layer": L,
                        "lam": lam,
                        "group_l1": fitted.group_l1,
                        "fold": f,
                        "n_held": len(held),
                        "held_accuracy": fitted.valid_accuracy,
                        "held_ce": fitted.valid_ce,
                        "n_selected": fitted.n_selected,
                    }
                )
                bar.update(1)
        if cfg.halving and step + 1 < len(path) and len(running) > 1:
            ranked = pooled_cv_scores(pd.DataFrame(rows)).sort_values(
                ["cv_accuracy", "cv_ce"], ascending=[False, True], kind="stable"
            )
            order = list(dict.fromkeys(int(L) for L in ranked.layer if int(L) in running))
            kept = order[: (len(running) + 1) // 2]
            for key in [k for k in runners if k[0] in running and k[0] not in kept]:
                del runners[key]  # the dropped layers' prefix caches
            running = {L: running[L] for L in kept}
    bar.close()
    return pd.DataFrame(rows)


def pooled_cv_scores(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, lam): pooled held-out accuracy and cross-entropy, mean heads kept."""
    t = table.assign(correct=table.held_accuracy * table.n_held, ce_sum=table.held_ce * table.n_held)
    g = t.groupby(["layer", "lam"], sort=False)
    out = g.agg(
        correct=("correct", "sum"), ce_sum=("ce_sum", "sum"), n=("n_held", "sum"), n_selected=("n_selected", "mean")
    ).reset_index()
    out["cv_accuracy"] = out.correct / out.n
    out["cv_ce"] = out.ce_sum / out.n
    return out[["layer", "lam", "cv_accuracy", "cv_ce", "n_selected"]]


def choose(table: pd.DataFrame) -> dict[str, Any]:
    """The (layer, lam) row of :func:`pooled_cv_scores` with the best held-out accuracy, ties by lower cross-entropy."""
    summary = pooled_cv_scores(table)
    best = summary.sort_values(["cv_accuracy", "cv_ce"], ascending=[False, True], kind="stable").iloc[0]
    layer = best.layer if isinstance(best.layer, tuple) else int(best.layer)
    return {"layer": layer, "lam": float(best.lam), "cv_accuracy": float(best.cv_accuracy), "cv_ce": float(best.cv_ce)}
