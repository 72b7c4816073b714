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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import FitError
from lens_laai.fastpath import CostMeter
from lens_laai.fitting.layer_fit import layer_path, scored_shots
from lens_laai.fitting.relaxed import RELAXED_STEPS, pair_scores, relaxed_path
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

    Example (three layers race over two λ₂ on 8 pairs in 2 folds; only the better two go on to the second):
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.selection import cross_validate
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> train = tiny_task().split(0, 8).train
        >>> table = cross_validate(tiny_model(), train, [0, 1, 2], [0.1, 0.5], FitConfig(steps=1), PromptTemplate(),
        ...                        CostMeter(), progress=False)
        >>> list(table.columns)
        ['layer', 'lam', 'group_l1', 'fold', 'n_held', 'held_accuracy', 'held_ce', 'n_selected']
        >>> table.groupby("lam", sort=False).layer.nunique().to_dict(), table.n_held.unique().tolist()
        ({0.5: 3, 0.1: 2}, [4])
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
    """One row per (layer, lam): pooled held-out accuracy and cross-entropy, mean heads kept.

    Example (two folds of 4 held-out pairs at each of two layers):
        >>> from lens_laai.fitting.selection import pooled_cv_scores
        >>> import pandas as pd
        >>> folds = pd.DataFrame({"layer": [0, 0, 1, 1], "lam": 0.5, "fold": [0, 1, 0, 1], "n_held": 4,
        ...                       "held_accuracy": [0.5, 0.25, 0.75, 0.75], "held_ce": [2.0, 3.0, 1.0, 1.5],
        ...                       "n_selected": [2, 3, 1, 2]})
        >>> pooled_cv_scores(folds)
           layer  lam  cv_accuracy  cv_ce  n_selected
        0      0  0.5        0.375   2.50         2.5
        1      1  0.5        0.750   1.25         1.5
    """
    t = table.assign(correct=table.held_accuracy * table.n_held, ce_sum=table.held_ce * table.n_held)
    g = t.groupby(["layer", "lam"], sort=False)
    out = g.agg(
        correct=("correct", "sum"), ce_sum=("ce_sum", "sum"), n=("n_held", "sum"), n_selected=("n_selected", "mean")
    ).reset_index()
    out["cv_accuracy"] = out.correct / out.n
    out["cv_ce"] = out.ce_sum / out.n
    return out[["layer", "lam", "cv_accuracy", "cv_ce", "n_selected"]]


def choose(table: pd.DataFrame) -> dict[str, Any]:
    """The (layer, lam) row of :func:`pooled_cv_scores` with the best held-out accuracy, ties by lower cross-entropy.

    Example:
        >>> from lens_laai.fitting.selection import choose
        >>> import pandas as pd
        >>> folds = pd.DataFrame({"layer": [0, 0, 1, 1], "lam": 0.5, "fold": [0, 1, 0, 1], "n_held": 4,
        ...                       "held_accuracy": [0.5, 0.25, 0.75, 0.75], "held_ce": [2.0, 3.0, 1.0, 1.5],
        ...                       "n_selected": [2, 3, 1, 2]})
        >>> choose(folds)
        {'layer': 1, 'lam': 0.5, 'cv_accuracy': 0.75, 'cv_ce': 1.25}
    """
    summary = pooled_cv_scores(table)
    best = summary.sort_values(["cv_accuracy", "cv_ce"], ascending=[False, True], kind="stable").iloc[0]
    layer = best.layer if isinstance(best.layer, tuple) else int(best.layer)
    return {"layer": layer, "lam": float(best.lam), "cv_accuracy": float(best.cv_accuracy), "cv_ce": float(best.cv_ce)}


Rule = Literal["1se", "min"]
Metric = Literal["accuracy", "ce"]
ESTIMATORS = ("penalised", "relaxed")


@dataclass
class HeldScores:
    """Per-row held-out scores of every path point, by fold: what every selection rule reads.

    ``held[(lam, est)]`` is one ``[2, rows]`` array per fold (correct 0/1, cross-entropy), rows in
    blocks of ``block_sizes[fold]``, one block per number of demonstrations in ``shots`` (in that
    order); ``prompting`` is the same for Δ = 0 (the prompts alone); ``counts[lam]`` the heads each
    fold's fit kept.

    Example:
        >>> import numpy as np
        >>> from lens_laai.fitting.selection import HeldScores
        >>> held = {(0.5, "relaxed"): [np.array([[1, 0, 1, 1], [0.1, 2.0, 0.2, 0.3]])]}
        >>> scores = HeldScores([0.5], (0, 5), {0.5: [1]}, held, [np.zeros((2, 4))], [2])
        >>> scores.block(5).held[(0.5, "relaxed")][0].tolist(), scores.table().relaxed_cv_accuracy.tolist()
        ([[1.0, 1.0], [0.2, 0.3]], [0.75])
    """

    path: list[float]
    shots: tuple[int, ...]
    counts: dict[float, list[int]]
    held: dict[tuple[float, str], list[np.ndarray]]
    prompting: list[np.ndarray]
    block_sizes: list[int]

    def block(self, shots: int) -> HeldScores:
        """The rows of prompts with ``shots`` demonstrations only."""
        j = self.shots.index(shots)

        def cut(arrays: list[np.ndarray]) -> list[np.ndarray]:
            return [a[:, j * n : (j + 1) * n] for a, n in zip(arrays, self.block_sizes)]

        held = {key: cut(arrays) for key, arrays in self.held.items()}
        return HeldScores(self.path, (shots,), self.counts, held, cut(self.prompting), self.block_sizes)

    def table(self, score: str = "cv") -> pd.DataFrame:
        """One row per λ₂ (see :func:`cross_validated_path`), pooled over every row."""
        return _table(self.path, self.counts, self.held, score)


def held_scores(
    model: TransformerBridge,
    train: Task,
    layer: int,
    lambdas: Sequence[float],
    cfg: Any,
    template: PromptTemplate,
    meter: CostMeter,
    relaxed_steps: int | None = RELAXED_STEPS,
    progress: bool = True,
) -> HeldScores:
    """``cfg.folds``-fold cross-validation of one layer's λ₂ path: the per-row scores :func:`cross_validated_path` pools.

    Example:
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.selection import held_scores
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> cfg = FitConfig(steps=1, shots=(0, 1), demos=2)
        >>> scores = held_scores(tiny_model(), tiny_task().split(0, 8).train, 1, [0.5], cfg, PromptTemplate(), CostMeter(), 1, False)
        >>> scores.shots, scores.block_sizes, scores.held[(0.5, "relaxed")][0].shape
        ((0, 2), [4, 4], (2, 8))
    """
    parts = fold_splits(train, cfg.folds, cfg.seed)
    path = sorted(lambdas, reverse=True)
    runners: dict = {}
    held: dict[tuple[float, str], list[np.ndarray]] = {}
    counts: dict[float, list[int]] = {lam: [] for lam in path}
    prompting: list[np.ndarray] = []
    bar = tqdm(total=len(path) * len(parts), desc="cross-validation", disable=not progress)
    for fit_part, held_part in parts:
        for i, point in enumerate(
            relaxed_path(model, fit_part, held_part, layer, path, cfg, template, meter, relaxed_steps, runners=runners)
        ):
            if i == 0 and point.fit.valid_runner is not None:
                prompting.append(np.stack(pair_scores(point.fit.valid_runner, [])))
            counts[point.lam].append(point.n_selected)
            for est, scores in point.held.items():
                held.setdefault((point.lam, est), []).append(np.stack(scores))
            bar.update(1)
    bar.close()
    return HeldScores(path, scored_shots(cfg), counts, held, prompting, [len(h) for _, h in parts])


def cross_validated_path(
    model: TransformerBridge,
    train: Task,
    layer: int,
    lambdas: Sequence[float],
    cfg: Any,
    template: PromptTemplate,
    meter: CostMeter,
    relaxed_steps: int | None = RELAXED_STEPS,
    progress: bool = True,
) -> pd.DataFrame:
    """Every point of one layer's λ₂ path scored by ``cfg.folds``-fold cross-validation, penalised and relaxed.

    Each fold fits the whole path (largest λ₂ first, warm starts) on its fitting part, refits each
    point's support without the group penalty (:func:`~lens_laai.fitting.relaxed.relaxed_path`) and
    scores both on its held-out part. Every pair is held out once, so each score is a mean over the
    n pairs and its standard error is ``sd / sqrt(n)`` over pairs (with 2 folds, fold means would
    give a standard error from two numbers). When the fit chooses a k-shot mode every held-out pair
    is scored zero-shot and k-shot (:func:`~lens_laai.fitting.layer_fit.scored_shots`), pooled here
    (:class:`HeldScores` keeps them apart).

    One row per λ₂, path order: ``lam, cv_n_selected`` (mean over folds) and, for ``est`` in
    ``penalised``/``relaxed``, ``{est}_cv_accuracy, {est}_cv_accuracy_se, {est}_cv_ce, {est}_cv_ce_se``.

    Example:
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.selection import cross_validated_path
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> train = tiny_task().split(0, 8).train
        >>> table = cross_validated_path(tiny_model(), train, 1, [0.1, 0.5], FitConfig(steps=1), PromptTemplate(),
        ...                              CostMeter(), relaxed_steps=1, progress=False)
        >>> table.lam.tolist(), list(table.columns[:2]), list(table.columns[-4:])
        ([0.5, 0.1], ['lam', 'cv_n_selected'], ['relaxed_cv_accuracy', 'relaxed_cv_accuracy_se', 'relaxed_cv_ce', 'relaxed_cv_ce_se'])
        >>> bool(table.relaxed_cv_accuracy.between(0, 1).all()), bool((table.relaxed_cv_ce_se > 0).all())
        (True, True)
    """
    return held_scores(model, train, layer, lambdas, cfg, template, meter, relaxed_steps, progress).table()


def score_table(points: Sequence[Any], score: str = "valid") -> pd.DataFrame:
    """:func:`cross_validated_path`'s table from the held-out scores of :class:`~lens_laai.fitting.relaxed.PathPoint` s
    (e.g. a validation split), columns named ``{est}_{score}_…``.

    Example (a path scored on 4 validation pairs):
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.relaxed import relaxed_path
        >>> from lens_laai.fitting.selection import score_table
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> splits = tiny_task().split(0, 8, 4)
        >>> points = list(relaxed_path(tiny_model(), splits.train, splits.valid, 1, [0.5, 0.1], FitConfig(steps=1),
        ...                            PromptTemplate(), CostMeter(), relaxed_steps=1))
        >>> table = score_table(points)
        >>> table.lam.tolist(), table.valid_n_selected.tolist() == [p.n_selected for p in points]
        ([0.5, 0.1], True)
        >>> [c for c in table.columns if c.startswith("relaxed")]
        ['relaxed_valid_accuracy', 'relaxed_valid_accuracy_se', 'relaxed_valid_ce', 'relaxed_valid_ce_se']
    """
    held = {(p.lam, est): [np.stack(v)] for p in points for est, v in p.held.items()}
    return _table([p.lam for p in points], {p.lam: [p.n_selected] for p in points}, held, score)


def _table(
    path: Sequence[float], counts: dict[float, list[int]], held: dict[tuple[float, str], list[np.ndarray]], score: str
) -> pd.DataFrame:
    rows = []
    for lam in path:
        row: dict[str, Any] = {"lam": lam, f"{score}_n_selected": float(np.mean(counts[lam]))}
        for est in ESTIMATORS:
            if (lam, est) not in held:
                continue
            correct, ce = np.concatenate(held[(lam, est)], axis=1)
            n = len(correct)
            for name, values in (("accuracy", correct), ("ce", ce)):
                row[f"{est}_{score}_{name}"] = float(values.mean())
                row[f"{est}_{score}_{name}_se"] = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def choose_point(
    table: pd.DataFrame,
    rule: Rule = "1se",
    metric: Metric = "accuracy",
    estimator: str = "relaxed",
    n_selected: Sequence[int] | None = None,
    max_heads: int | None = None,
    score: str = "cv",
) -> int:
    """The index (path order, largest λ₂ first) of the point a rule picks from :func:`cross_validated_path`'s table.

    ``"min"``: the best cross-validated score (accuracy: highest; ``"ce"``: lowest; ties: the
    sparser). ``"1se"``: the sparsest point whose score is within one standard error of the best
    (glmnet's ``lambda.1se``), so a denser set has to earn its place. ``n_selected`` (heads kept
    by the fit on all n pairs, one per point) rules out points that keep no head, and with
    ``max_heads`` points that keep more than that; ``score`` names the columns used (``"cv"``, ``"valid"``); if nothing is left, the sparsest point that keeps a
    head (or the first point) is returned.

    Example (three path points; the best is point 2, and point 1 is within one standard error of it):
        >>> import pandas as pd
        >>> from lens_laai.fitting.selection import choose_point
        >>> table = pd.DataFrame({"relaxed_cv_accuracy": [0.5, 0.7, 0.75], "relaxed_cv_accuracy_se": [0.1, 0.1, 0.1]})
        >>> choose_point(table, "min"), choose_point(table, "1se"), choose_point(table, "min", n_selected=[1, 2, 4], max_heads=2)
        (2, 1, 1)
        >>> choose_point(table, "1se", metric="ce")
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: no cv scores of the relaxed fits in this table (no column 'relaxed_cv_ce').
    """
    if rule not in ("1se", "min"):
        raise FitError(f"rule must be '1se' or 'min', got {rule!r}.")
    if metric not in ("accuracy", "ce"):
        raise FitError(f"metric must be 'accuracy' or 'ce', got {metric!r}.")
    col = f"{estimator}_{score}_{metric}"
    if col not in table:
        raise FitError(f"no {score} scores of the {estimator} fits in this table (no column {col!r}).")
    heads = list(n_selected) if n_selected is not None else [1] * len(table)
    ok = [i for i, k in enumerate(heads) if k >= 1 and (max_heads is None or k <= max_heads)]
    if not ok:
        with_heads = [i for i, k in enumerate(heads) if k >= 1]
        return with_heads[0] if with_heads else 0
    sign = 1.0 if metric == "accuracy" else -1.0  # higher is better after the sign
    signed = sign * table[col].to_numpy()
    best = max(ok, key=lambda i: (signed[i], -i))
    if rule == "min":
        return best
    se = float(table[f"{col}_se"].to_numpy()[best])
    threshold = signed[best] - (0.0 if not np.isfinite(se) else se)
    return next(i for i in ok if signed[i] >= threshold - 1e-12)
