"""The sparsity–accuracy frontier of one layer's λ₂ path, and the choice of a point on it.

Along a λ₂ path from near λ_max down, the group lasso keeps more and more heads. Each point has a
head count, a cross-validated score with its standard error, and (relaxed) training accuracy:
that table is the frontier, the answer to "how many heads does this task need?".
:func:`choose_on_path` is how :func:`lens_laai.fit` picks a point (k-fold cross-validation with
the one-standard-error rule, a head budget, or a validation split) and refits its support without
the group penalty (:mod:`lens_laai.fitting.relaxed`); :func:`frontier` returns the whole table,
optionally with held-out accuracy, and :func:`plot_frontier` draws it.

Example:
    >>> from lens_laai.fitting.frontier import frontier
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> table = frontier(tiny_model(), tiny_task(), layer=1, n_train=8, group_l1_rel=[0.5, 0.1], steps=2,
    ...                  relaxed_steps=2, progress=False)
    >>> list(table.columns[:3])
    ['group_l1_rel', 'group_l1', 'lambda_max']
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import FitError
from lens_laai.fastpath import CostMeter
from lens_laai.fitting.config import DEFAULT_GROUP_L1_REL, FitConfig, auto_layer, prepare_data
from lens_laai.fitting.layer_fit import LayerFit, delta_hooks, layer_path, scored_shots
from lens_laai.fitting.modes import ModeChoice, candidate_modes, choose_mode
from lens_laai.fitting.penalties import lambda_values
from lens_laai.fitting.relaxed import RELAXED_STEPS, PathPoint, pair_scores, relaxed_path, relaxed_refit
from lens_laai.fitting.selection import HeldScores, choose_point, cross_validated_path, held_scores
from lens_laai.tasks.prompts import PromptTemplate
from lens_laai.tasks.task import TaskSplits


@dataclass
class PathChoice:
    """The point :func:`choose_on_path` picked: its penalised fit, relaxed Δ (or ``None``) and the table.

    ``table`` has one row per λ₂ (path order) with ``chosen`` marking the pick; ``rule`` says how
    (``"cv-1se-ce"``, ``"cv-min-accuracy"``, ``"valid-1se-ce"``, ``"max_heads=3"``, ``"last"``);
    ``modes``: how the fit is to be used, when held-out scores chose it (:mod:`lens_laai.fitting.modes`).

    Example (no scores: the path's last point, refitted without the group penalty):
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.frontier import choose_on_path
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> cfg = FitConfig(steps=1, relaxed_steps=1, mode="zero-shot")
        >>> choice = choose_on_path(tiny_model(), tiny_task().split(0, 8), 1, [0.5, 0.1], cfg, PromptTemplate(), CostMeter(),
        ...                         how="none", progress=False)
        >>> choice.index, choice.rule, choice.table.chosen.tolist(), choice.modes, choice.relaxed.shape
        (1, 'last', [False, True], None, torch.Size([4, 16]))
    """

    penalised: LayerFit
    relaxed: Tensor | None
    relaxed_train_accuracy: float
    relaxed_valid: tuple[float, float] | None
    table: pd.DataFrame
    index: int
    rule: str
    modes: ModeChoice | None = None


def choose_on_path(
    model: TransformerBridge,
    splits: TaskSplits,
    layer: int,
    lambdas: Sequence[float],
    cfg: Any,
    template: PromptTemplate,
    meter: CostMeter,
    *,
    how: str,
    progress: bool = True,
) -> PathChoice:
    """Fit ``lambdas`` at ``layer`` on the training pairs and pick a point; see :func:`lens_laai.fit`.

    ``how``: ``"cv"`` (``cfg.folds``-fold cross-validation on the training pairs, ``cfg.rule``),
    ``"valid"`` (the same rule on the validation split), ``"none"`` (the path's last point). With
    ``cfg.max_heads`` the pick is the densest point keeping at most that many heads (no scoring; if
    every point keeps more, the sparsest one's ``max_heads`` largest-norm heads).
    ``cfg.relaxed`` refits the pick's support without the group penalty.

    Example (2-fold cross-validation with the one-standard-error rule on 8 pairs, then a head budget):
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.frontier import choose_on_path
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, splits = tiny_model(), tiny_task().split(0, 8)
        >>> cfg = FitConfig(steps=1, relaxed_steps=1, mode="zero-shot")
        >>> choice = choose_on_path(model, splits, 1, [0.5, 0.1], cfg, PromptTemplate(), CostMeter(), how="cv",
        ...                         progress=False)
        >>> choice.rule, int(choice.table.chosen.sum()), "relaxed_cv_accuracy_se" in choice.table
        ('cv-1se-ce', 1, True)
        >>> budget = FitConfig(steps=1, relaxed_steps=1, mode="zero-shot", max_heads=2)
        >>> choice = choose_on_path(model, splits, 1, [0.9, 0.5], budget, PromptTemplate(), CostMeter(), how="none",
        ...                         progress=False)
        >>> choice.rule.startswith("max_heads=2"), choice.penalised.n_selected <= 2
        (True, True)
    """
    path = sorted(lambdas, reverse=True)
    relaxed_steps = cfg.relaxed_steps if cfg.relaxed else None
    held = None
    if (
        len(path) > 1
        and how == "cv"
        and (cfg.max_heads is None or len(candidate_modes(cfg.mode, scored_shots(cfg))) > 1)
    ):
        held = held_scores(model, splits.train, layer, path, cfg, template, meter, relaxed_steps, progress)
    valid = splits.valid if len(splits.valid) else None
    estimator = "relaxed" if cfg.relaxed else "penalised"
    modes, budget, lazy = None, None, False
    if cfg.max_heads is None and len(path) > 1 and how == "valid":
        points = list(relaxed_path(model, splits.train, valid, layer, path, cfg, template, meter, relaxed_steps))
        held = _validation_scores(points, cfg)
        fits = [p.fit for p in points]
    elif held is not None and cfg.max_heads is None:  # the point is chosen on the folds: fit all n pairs only that far
        modes = choose_mode(held, cfg, [min(held.counts[lam]) for lam in path], estimator, "cv")
        fits = _fit_through(layer_path(model, splits.train, valid, layer, path, cfg, template, meter), modes.index)
        lazy = True
    else:
        fits = list(layer_path(model, splits.train, valid, layer, path, cfg, template, meter))
        budget = _within_budget([f.n_selected for f in fits], cfg.max_heads) if cfg.max_heads is not None else None
    if held is not None and modes is None:
        counts = [f.n_selected for f in fits]
        modes = choose_mode(held, cfg, counts, estimator, "valid" if how == "valid" else "cv", budget)
    scored = modes.path_table if modes is not None else None
    if modes is not None:  # heads kept by the fit on all n pairs where it reached the point (else the folds' fewest)
        modes.table["n_selected"] = [
            fits[int(p)].n_selected if d and int(p) < len(fits) else k
            for p, d, k in zip(modes.table.point.fillna(0), modes.table.delta, modes.table.n_selected)
        ]
    if budget is not None:
        index, rule = budget, f"max_heads={cfg.max_heads}"
    elif modes is not None:
        index, rule = len(fits) - 1 if lazy else modes.index, f"{how}-{cfg.rule}-{cfg.cv_metric}"
    else:
        index, rule = len(fits) - 1, "last"
    chosen = fits[index]
    if cfg.max_heads is not None and chosen.n_selected > cfg.max_heads:  # no point within the budget
        chosen, rule = _top_heads(chosen, cfg.max_heads), f"max_heads={cfg.max_heads} (largest of {chosen.n_selected})"
    relaxed, relaxed_acc, relaxed_valid = None, float("nan"), None
    if cfg.relaxed:
        assert chosen.runner is not None, "layer_path keeps each point's runner"
        relaxed, _ = relaxed_refit(chosen.runner, cfg, chosen.delta, cfg.relaxed_steps, chosen.sites)
        relaxed_acc = chosen.runner.scores(delta_hooks(chosen.sites, relaxed, chosen.runner.tail))[0]
        if chosen.valid_runner is not None:
            relaxed_valid = chosen.valid_runner.scores(delta_hooks(chosen.sites, relaxed, chosen.runner.tail))
    table = pd.DataFrame(
        [_row(f, lam, cfg) for lam, f in zip(path, fits)] + [_unfitted(lam, cfg) for lam in path[len(fits) :]]
    )
    if scored is not None:
        table = pd.concat([table, scored.drop(columns=["lam"])], axis=1)
    table["chosen"] = [i == index for i in range(len(path))]
    return PathChoice(chosen, relaxed, relaxed_acc, relaxed_valid, table, index, rule, modes)


def _validation_scores(points: list[PathPoint], cfg: Any) -> HeldScores:
    """The validation split's per-row scores of a path, as one fold."""
    held = {(p.lam, est): [np.stack(v)] for p in points for est, v in p.held.items()}
    runner = points[0].fit.valid_runner
    assert runner is not None, "scored on a validation split"
    prompting = [np.stack(pair_scores(runner, []))]
    n = len(prompting[0][0]) // len(scored_shots(cfg))
    return HeldScores(
        [p.lam for p in points], scored_shots(cfg), {p.lam: [p.n_selected] for p in points}, held, prompting, [n]
    )


def _fit_through(fits: Iterator[LayerFit], index: int) -> list[LayerFit]:
    """The path on all n pairs up to point ``index`` (then on, if that point keeps no head, to the first that
    keeps one): the points after the pick are not needed, and the frontier shows them from the folds."""
    out: list[LayerFit] = []
    for f in fits:
        out.append(f)
        if len(out) > index and f.n_selected > 0:
            break
    return out


def _unfitted(lam: float, cfg: Any) -> dict[str, Any]:
    """A frontier row for a point past the pick: not fitted on all n pairs (its cross-validated columns say the rest)."""
    key = "group_l1_rel" if cfg.relative else "group_l1"
    return {key: lam, "n_selected": float("nan"), "train_accuracy": float("nan")}


def _top_heads(f: LayerFit, k: int) -> LayerFit:
    """``f`` with only its ``k`` largest-norm heads kept (rescored on the training pairs)."""
    norms = f.delta.norm(dim=-1)
    keep = torch.zeros_like(norms, dtype=torch.bool)
    keep[norms.topk(k).indices] = True
    delta = f.delta * keep[:, None]
    assert f.runner is not None, "layer_path keeps each point's runner"
    acc, _ = f.runner.scores(delta_hooks(f.sites, delta, f.runner.tail))
    return replace(f, delta=delta, train_accuracy=acc)


def _within_budget(counts: list[int], max_heads: int) -> int:
    """The densest path point keeping 1..``max_heads`` heads (the last such); else the sparsest with a head
    (:func:`choose_on_path` then keeps its ``max_heads`` largest heads)."""
    within = [i for i, k in enumerate(counts) if 1 <= k <= max_heads]
    if within:
        return within[-1]
    with_heads = [i for i, k in enumerate(counts) if k >= 1]
    return with_heads[0] if with_heads else 0


def _row(f: LayerFit, lam: float, cfg: Any) -> dict[str, Any]:
    return {
        "group_l1_rel" if cfg.relative else "group_l1": lam,
        **({"group_l1": f.group_l1} if cfg.relative else {}),
        "lambda_max": f.lambda_max,
        "n_selected": f.n_selected,
        "train_accuracy": f.train_accuracy,
    }


def frontier(
    model: TransformerBridge,
    task: Any,
    layer: int | str = "auto",
    *,
    group_l1_rel: Sequence[float] | None = None,
    l1: float | None = None,
    steps: int | None = None,
    relaxed_steps: int = RELAXED_STEPS,
    folds: int | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int | None = None,
    test: bool = False,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The sparsity–accuracy frontier at one layer: one row per point of the λ₂ path.

    Columns: ``group_l1_rel, group_l1, lambda_max, n_selected`` (heads kept by the fit on all n
    pairs), ``train_accuracy`` and ``relaxed_train_accuracy``; the cross-validated scores of
    :func:`~lens_laai.fitting.selection.cross_validated_path` (``relaxed_cv_accuracy`` ± ``_se``,
    ``…_cv_ce``, the same for ``penalised``); ``chosen_1se`` and ``chosen_min`` (what the rules of
    :func:`lens_laai.fit` would pick); with ``test=True`` also ``test_accuracy`` and
    ``relaxed_test_accuracy`` on the test split (held-out pairs the fit never sees).

    Arguments are those of :func:`lens_laai.fit` (a Task is split by ``seed`` into ``n_train`` and
    the rest; ``layer="auto"`` is the default layer).

    Example (two λ₂ on 8 pairs, scored by 2-fold cross-validation and on the 16 test pairs):
        >>> from lens_laai.fitting.frontier import frontier
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> table = frontier(tiny_model(), tiny_task(), layer=1, n_train=8, group_l1_rel=[0.5, 0.1], steps=1,
        ...                  relaxed_steps=1, test=True, progress=False)
        >>> table.group_l1_rel.tolist(), int(table.chosen_1se.sum()), int(table.chosen_min.sum())
        ([0.5, 0.1], 1, 1)
        >>> [c for c in table.columns if "test" in c]
        ['test_accuracy', 'test_ce', 'relaxed_test_accuracy', 'relaxed_test_ce']
        >>> frontier(tiny_model(), tiny_task(), layer="sweep", progress=False)
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: frontier() fits one layer: give a layer index in 0..2 or 'auto'.
    """

    splits, _, template = prepare_data(
        task, template, n_train, 0 if not isinstance(task, TaskSplits) else None, n_test, seed
    )
    if layer == "auto":
        layer = auto_layer(model.cfg.n_layers)
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise FitError(f"frontier() fits one layer: give a layer index in 0..{model.cfg.n_layers - 1} or 'auto'.")
    cfg = FitConfig(
        layer=layer,
        l1=FitConfig.l1 if l1 is None else l1,
        steps=FitConfig.steps if steps is None else steps,
        folds=FitConfig.folds if folds is None else folds,
        seed=splits.seed,
        n_train=len(splits.train),
        relaxed_steps=relaxed_steps,
    )
    path = sorted(
        lambda_values(DEFAULT_GROUP_L1_REL if group_l1_rel is None else group_l1_rel, "group_l1_rel"), reverse=True
    )
    for lam in path:
        replace(cfg, group_l1=lam).validate(model.cfg.n_layers)
    meter = CostMeter()
    scored = cross_validated_path(model, splits.train, layer, path, cfg, template, meter, relaxed_steps, progress)
    held = splits.test if test and len(splits.test) else None
    points = list(relaxed_path(model, splits.train, held, layer, path, cfg, template, meter, relaxed_steps))
    rows = []
    for lam, p in zip(path, points):
        row = {**_row(p.fit, lam, cfg), "relaxed_train_accuracy": p.relaxed_train_accuracy}
        for est, (correct, ce) in p.held.items():
            prefix = "" if est == "penalised" else "relaxed_"
            row[f"{prefix}test_accuracy"], row[f"{prefix}test_ce"] = float(np.mean(correct)), float(np.mean(ce))
        rows.append(row)
    table = pd.concat([pd.DataFrame(rows), scored.drop(columns=["lam"])], axis=1)
    counts = table.n_selected.tolist()
    for rule in ("1se", "min"):
        pick = choose_point(scored, rule, cfg.cv_metric, "relaxed", counts)  # type: ignore[arg-type]  # FitConfig checks it is accuracy or ce
        table[f"chosen_{rule}"] = [i == pick for i in range(len(table))]
    return table


def plot_frontier(table: pd.DataFrame, ax: Any = None, title: str | None = None) -> Any:
    """Accuracy against heads kept along the path: CV score ± 1 SE (relaxed and penalised), and test
    accuracy when the table has it; the 1-SE pick is ringed. Returns the matplotlib Figure.

    Example:
        >>> from lens_laai.fitting.frontier import frontier, plot_frontier
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> table = frontier(tiny_model(), tiny_task(), layer=1, n_train=8, group_l1_rel=[0.5, 0.1], steps=1,
        ...                  relaxed_steps=1, progress=False)
        >>> fig = plot_frontier(table, title="tiny-antonym, layer 1")
        >>> ax = fig.axes[0]
        >>> ax.get_title(), ax.get_xlabel(), sorted(t.get_text() for t in ax.get_legend().get_texts())
        ('tiny-antonym, layer 1', 'heads kept', ['1-SE pick', 'penalised, cross-validated', 'relaxed, cross-validated'])
        >>> import matplotlib.pyplot as plt
        >>> plt.close(fig)
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    x = table.n_selected.to_numpy()
    for est, style in (("relaxed", "o-"), ("penalised", "s--")):
        col = f"{est}_cv_accuracy"
        if col in table:
            ax.errorbar(x, table[col], yerr=table[f"{col}_se"], fmt=style, capsize=3, label=f"{est}, cross-validated")
    for col, style, label in (
        ("relaxed_test_accuracy", "o:", "relaxed, test"),
        ("test_accuracy", "s:", "penalised, test"),
    ):
        if col in table:
            ax.plot(x, table[col], style, alpha=0.7, label=label)
    if "chosen_1se" in table and table.chosen_1se.any():
        pick = table[table.chosen_1se].iloc[0]
        ax.plot([pick.n_selected], [pick.relaxed_cv_accuracy], "o", ms=14, mfc="none", mec="k", label="1-SE pick")
    ax.set_xlabel("heads kept")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Sparsity–accuracy frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
