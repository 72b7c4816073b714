"""Fitting: find a sparse Δ at one layer that makes the model produce a task's targets.

Objective (model frozen): mean cross-entropy of each target's first token at the last prompt
position (or, with ``objective="sequence"``, of the whole target under teacher forcing),
plus ``l1‖Δ‖₁ + group_l1 Σ_h ‖Δ_h‖₂``, minimised by accelerated proximal gradient
(:func:`lens_laai.fitting.solver.fista`) so unselected heads are exactly zero. The fit uses the training
pairs alone: by default the layer comes from a rule fixed on the development study
(:func:`auto_layer`); the head set is a point of a λ₂ path relative to λ_max, chosen by k-fold
cross-validation on the training pairs with the one-standard-error rule, and its heads are then
refitted with the group penalty off (the relaxed group lasso; :mod:`lens_laai.fitting.frontier`,
:mod:`lens_laai.fitting.relaxed`). ``layer="joint"`` fits every candidate layer at once, one group
per (layer, head), and chooses its point on the same path the same way, so the group lasso picks
layers and heads together; ``layer="sweep"`` chooses (layer, λ₂) by cross-validation
(``lens_laai.fitting.selection``).

Example:
    >>> from lens_laai import fit, load_task
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> result = fit(tiny_model(), tiny_task(), layer=1, n_train=8, n_valid=4, steps=5, progress=False)
    >>> result.intervention.layers
    [1]
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import FitError
from lens_laai.fastpath import CostMeter
from lens_laai.fitting.config import (  # noqa: F401  (re-exported)
    AUTO_DEPTH,
    DEFAULT_GROUP_L1_REL,
    STEP_BUDGET,
    STEPS_PER_POINT,
    FitConfig,
    FitResult,
    Objective,
    Select,
    TaskLike,
    auto_layer,
    check_splits,
    default_layers,
    lambda_spec,
    layers_arg,
    parse_layers,
    prepare_data,
)
from lens_laai.fitting.frontier import PathChoice, choose_on_path
from lens_laai.fitting.layer_fit import (  # noqa: F401  (re-exported)
    Init,
    LayerFit,
    delta_hooks,
    layer_path,
    scored_shots,
    shot_counts,
    solve_layer,
    training_batches,
    zero_shot_meter,
)
from lens_laai.fitting.modes import candidate_modes, fill_shots, recommended_mode
from lens_laai.fitting.penalties import lambda_values
from lens_laai.fitting.relaxed import relaxed_refit
from lens_laai.fitting.selection import choose, cross_validate, pooled_cv_scores
from lens_laai.interventions.head import HeadIntervention
from lens_laai.tasks.prompts import PromptTemplate
from lens_laai.tasks.task import TaskSplits


def fit(
    model: TransformerBridge,
    task: TaskLike,
    layer: int | str = "auto",
    *,
    layers: Sequence[int] | str | None = None,
    l1: float = FitConfig.l1,
    group_l1: float | Sequence[float] | None = None,
    group_l1_rel: float | Sequence[float] | None = None,
    steps: int | None = None,
    lr: float = FitConfig.lr,
    n_train: int | None = None,
    n_valid: int | None = None,
    n_test: int | None = None,
    seed: int | None = None,
    shots: int | Sequence[int] | None = None,
    mode: str = "auto",
    demos: int | None = None,
    last_positions: int = FitConfig.last_positions,
    init: Init = "zero",
    select: Select = "cv",
    rule: str = FitConfig.rule,
    cv_metric: str = FitConfig.cv_metric,
    relaxed: bool = FitConfig.relaxed,
    relaxed_steps: int = FitConfig.relaxed_steps,
    max_heads: int | None = None,
    folds: int = FitConfig.folds,
    halving: bool = FitConfig.halving,
    objective: Objective = "first_token",
    batch_size: int = 32,
    fast: bool = True,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit a sparse per-head intervention; see the module docstring.

    By default: at the layer :func:`auto_layer` names, the group lasso's λ₂ path
    (:data:`DEFAULT_GROUP_L1_REL`, 8 points from 0.9 to 0.05 of λ_max, warm starts) is fitted on the
    training pairs; ``folds``-fold cross-validation on the same pairs scores every point's relaxed
    refit, the one-standard-error rule keeps the sparsest point whose cross-validated cross-entropy
    is within one standard error of the lowest (``rule="1se"``, ``cv_metric="ce"``: chosen on the
    development study, ``docs/results.md`` §6), and its heads are refitted on all pairs with the
    group penalty off (``relaxed=True``, the relaxed group lasso). ``result.candidates`` is the frontier: every
    point's heads kept and scores.

    Args:
        task: a :class:`Task` (split here by ``seed`` into ``n_train``/``n_valid``/rest, defaults
            20/0/rest), ready :class:`TaskSplits` (then give none of those four), or a list of
            your own ``(prompt, target)`` strings, used verbatim unless you pass a ``template``
            (e.g. :meth:`PromptTemplate.chat`).
        layer: a layer index; ``"auto"`` (default): the layer :func:`auto_layer` names (a rule fixed
            on the development study); ``"sweep"``: the paper's single layer, each candidate fitted
            and the best kept; ``"joint"``: one fit over all candidate ``layers`` at once with a
            group per (layer, head), so the group Lasso picks layers and heads together (the result
            may act on several layers; ``FitResult.layer`` is then the one with the largest ‖Δ‖).
            Candidates of sweep and joint: ``layers`` (default :func:`default_layers`; ``"all"``).
        group_l1_rel: λ₂ as fractions of λ_max at each layer, one value or a path (fitted largest
            first with warm starts; default :data:`DEFAULT_GROUP_L1_REL`). ``group_l1``: absolute
            λ₂ instead; give one of the two.
        l1: λ₁ (absolute).
        select: what chooses among the path's points (and layers): ``"cv"`` (default):
            ``folds``-fold cross-validation on the training pairs, so the fit uses no labelled data
            beyond ``n_train``; ``"valid"``: the validation split (``n_valid`` more labelled pairs;
            the older protocol); ``"none"``: no choice, the path's last (smallest) λ₂ at one layer.
            ``"auto"`` is deprecated: it was ``"valid"`` with a validation split, else ``"cv"``
            with several layers, else ``"none"``; it still does that, with a warning naming its choice.
        rule, cv_metric: at one layer, ``"1se"`` (default: the sparsest point within one standard
            error of the best, glmnet's ``lambda.1se``) or ``"min"`` (the best cross-validated
            score: denser and, on the development study, more accurate), on ``"ce"`` (held-out
            cross-entropy, default) or ``"accuracy"``.
        relaxed: refit the chosen heads with the group penalty off (``relaxed_steps`` steps from the
            penalised Δ); ``result.penalised`` keeps the penalised fit.
        max_heads: a head budget instead of a rule: the densest path point keeping at most this
            many heads (no cross-validation), then the relaxed refit.
        folds, halving: cross-validation folds; with several layers and ``halving`` only the better
            half of the layers go on to each next λ₂ (see :func:`lens_laai.fitting.selection.cross_validate`).
        steps, lr: proximal steps per λ₂ (default :data:`STEPS_PER_POINT` on the default path; 30
            in all, split over a path you give) and the initial step size (adapted by backtracking).
        shots: demonstrations in the training prompts (0: the zero-shot setting of the paper).
        last_positions: add the one Δ at each prompt's last ``m`` tokens instead of the last one
            (the fast path recomputes those ``m``; ``docs/results.md`` §7 measures it).
        init: the first λ₂'s starting point: ``"zero"`` or ``"mean-difference"`` (each head's mean
            ``hook_z`` shift from zero-shot to k-shot prompts of the training pairs).
        objective: ``"first_token"`` or ``"sequence"`` (whole target, teacher forcing; uses the
            full forward).
        template: how pairs become prompts; recorded in the intervention and reused by evaluation.
        fast: use the last-token fast path when the model supports it.

    Raises:
        FitError: a bad setting (before any work), or a loss that is not finite.

    Example (a two-point λ₂ path at layer 1 of the tiny model, chosen by 2-fold cross-validation on 8 pairs):
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> r = fit(tiny_model(), tiny_task(), layer=1, n_train=8, group_l1_rel=[0.5, 0.1], steps=2, relaxed_steps=1,
        ...         mode="zero-shot", progress=False)
        >>> r.layer, r.selection, r.selection_rule, len(r.splits.train), r.candidates.group_l1_rel.tolist()
        (1, 'cv', 'cv-1se-ce', 8, [0.5, 0.1])
    """
    lambdas, relative = lambda_spec(group_l1, group_l1_rel)
    if steps is None:
        steps = STEPS_PER_POINT if group_l1 is None and group_l1_rel is None else max(1, STEP_BUDGET // len(lambdas))
    cfg = FitConfig(
        layer=layer,
        layers=layers_arg(layers),
        l1=l1,
        group_l1=lambdas[0],
        relative=relative,
        steps=steps,
        lr=lr,
        shots=0 if shots is None else shots if isinstance(shots, int) else tuple(shots),
        mode=mode,
        demos=demos,
        init=init,
        select=select,
        folds=folds,
        halving=halving,
        objective=objective,
        batch_size=batch_size,
        fast=fast,
        rule=rule,
        cv_metric=cv_metric,
        relaxed=relaxed,
        relaxed_steps=relaxed_steps,
        max_heads=max_heads,
        last_positions=last_positions,
    )
    for lam in lambdas:
        replace(cfg, group_l1=lam).validate(model.cfg.n_layers)
    splits, source, template = prepare_data(task, template, n_train, n_valid, n_test, seed)
    candidates: list = cfg.candidate_layers(model.cfg.n_layers)
    if layer == "joint":
        candidates = [tuple(candidates)]  # one candidate: Δ on every layer at once, one group per (layer, head)
    one_layer = len(candidates) == 1 and layer != "joint"
    on_path = len(candidates) == 1  # one layer, or the joint fit's one candidate: all its layers at once
    how = _selection(select, splits, len(candidates), len(lambdas), joint=layer == "joint", path=one_layer)
    if max_heads is not None and not one_layer:
        raise FitError("max_heads is a head budget on one layer's λ₂ path; use it with one layer (not sweep or joint).")
    cfg = fill_shots(cfg, shots is None, demos is None, len(splits.train), how, one_layer)
    cfg = replace(
        cfg, n_train=len(splits.train), n_valid=len(splits.valid), n_test=len(splits.test), seed=splits.seed, select=how
    )
    if max_heads is not None and len(candidate_modes(cfg.mode, scored_shots(cfg))) == 1:
        how = "none"  # a budget, not a score, picks the point (and there is no mode to choose)
        cfg = replace(cfg, select=how)
    check_splits(splits, max(shot_counts(cfg.shots)), how, cfg)
    start, meter = time.perf_counter(), zero_shot_meter(model, splits.train, template)
    choice: PathChoice | None = None
    if on_path:
        choice = choose_on_path(model, splits, candidates[0], lambdas, cfg, template, meter, how=how, progress=progress)
        best, table = choice.penalised, choice.table
    elif how == "cv":
        best, table, cv_choice = _fit_cross_validated(
            model, splits, candidates, lambdas, cfg, template, meter, progress
        )
    else:
        best, table = _fit_on_validation(model, splits, candidates, lambdas, cfg, template, meter, progress)
    chosen = replace(
        cfg,
        layer="joint" if isinstance(best.layer, tuple) else best.layer,  # a joint fit's layer is a tuple
        group_l1=best.group_l1_rel if relative and best.group_l1_rel is not None else best.group_l1,
    )
    final, penalised_iv, rule_used, cv = _finish(model, splits, source, chosen, template, best, choice, table, how)
    if how == "cv" and choice is None:
        cv = (cv_choice["cv_accuracy"], None)
    use, modes = recommended_mode(chosen, choice.modes if choice is not None else None, splits.train)
    extra = _extra(best, how, rule_used, cv, lambdas, chosen)
    extra["mode"] = use.to_json()
    if modes is not None:
        extra["modes"] = json.loads(modes.to_json(orient="records"))  # JSON has no NaN: a missing score is null
    iv = final.intervention(model, splits, source, chosen, template, **extra)
    return FitResult(
        intervention=iv,
        layer=best.main_layer,
        history=pd.DataFrame([asdict(r) for r in best.history]),
        train_accuracy=final.train_accuracy,
        valid_accuracy=final.valid_accuracy if len(splits.valid) else float("nan"),
        selected_heads=iv.selected_heads(),
        config=chosen,
        candidates=table,
        splits=splits,
        seconds=time.perf_counter() - start,
        forward_equivalents=meter.forward_equivalents(),
        fast_path=best.fast_path,
        selection=how,
        selection_rule=rule_used,
        relaxed=relaxed,
        penalised=penalised_iv,
        penalised_train_accuracy=best.train_accuracy,
        cv_accuracy=cv[0],
        cv_accuracy_se=cv[1],
        mode=use,
        modes=modes,
    )


def _finish(model, splits, source, chosen, template, best, choice, table, how):
    """(the LayerFit returned, the penalised intervention, the rule's name, (cv accuracy, its SE))."""
    cv: tuple[float | None, float | None] = (None, None)
    est = "relaxed" if chosen.relaxed else "penalised"
    if choice is not None:
        rule_used = choice.rule
        if f"{est}_cv_accuracy" in table and rule_used.startswith("cv"):
            cv = (float(table[f"{est}_cv_accuracy"][choice.index]), float(table[f"{est}_cv_accuracy_se"][choice.index]))
    else:
        rule_used = "cv-min-accuracy" if how == "cv" else "valid-max-accuracy"
    penalised_iv = best.intervention(model, splits, source, chosen, template)
    if not chosen.relaxed:
        return best, penalised_iv, rule_used, cv
    if choice is not None:
        delta, train_acc, valid = choice.relaxed, choice.relaxed_train_accuracy, choice.relaxed_valid
    else:
        delta, _ = relaxed_refit(best.runner, chosen, best.delta, chosen.relaxed_steps, best.sites)
        train_acc = best.runner.scores(delta_hooks(best.sites, delta, best.runner.tail))[0]
        valid = (
            best.valid_runner.scores(delta_hooks(best.sites, delta, best.runner.tail))
            if best.valid_runner is not None
            else None
        )
    final = replace(best, delta=delta, train_accuracy=train_acc)
    if valid is not None:
        final.valid_accuracy, final.valid_ce = valid
    return final, penalised_iv, rule_used, cv


def _extra(best, how, rule_used, cv, lambdas, chosen) -> dict[str, Any]:
    """What the intervention's metadata records beyond the config."""
    return {
        "group_l1_absolute": best.group_l1,
        "lambda_max": best.lambda_max,
        "selection": how,
        "selection_rule": rule_used,
        "relaxed": chosen.relaxed,
        "penalised_n_selected": best.n_selected,
        "penalised_train_accuracy": best.train_accuracy,
        "cv_accuracy": cv[0],
        "cv_accuracy_se": cv[1],
        "group_l1_path": [lam for lam in sorted(lambdas, reverse=True) if lam >= chosen.group_l1],
    }


def _fit_on_validation(
    model, splits, candidates, lambdas, cfg, template, meter, progress
) -> tuple[LayerFit, pd.DataFrame]:
    """Every candidate fitted on the training pairs and scored on the validation split (or on training, alone)."""
    show_steps = progress and len(candidates) == 1 and len(lambdas) == 1
    rows, best = [], None
    bar = tqdm(candidates, desc="layers", disable=not progress or len(candidates) == 1)
    for L in bar:
        for fitted in layer_path(model, splits.train, splits.valid, L, lambdas, cfg, template, meter, show_steps):
            rows.append(fitted.row())
            if best is None or fitted.key() > best.key():
                best = fitted
        assert best is not None, "lambdas is checked non-empty"
        bar.set_postfix(best_layer=best.layer, valid_acc=f"{best.valid_accuracy:.2f}")
    assert best is not None, "candidates is checked non-empty"
    return best, pd.DataFrame(rows)


def _fit_cross_validated(
    model, splits, candidates, lambdas, cfg, template, meter, progress
) -> tuple[LayerFit, pd.DataFrame, dict[str, Any]]:
    """Choose (layer, λ₂) by cross-validation on the training pairs, then refit it on all of them."""
    table = cross_validate(model, splits.train, candidates, lambdas, cfg, template, meter, progress)
    choice = choose(table)
    path = [lam for lam in lambdas if lam >= choice["lam"]]
    fitted = list(layer_path(model, splits.train, splits.valid, choice["layer"], path, cfg, template, meter))[-1]
    return fitted, pooled_cv_scores(table), choice


def _selection(
    select: str, splits: TaskSplits, n_layers: int, n_lambdas: int, joint: bool = False, path: bool = False
) -> str:
    """``"cv"``, ``"valid"`` or ``"none"`` (one candidate, or ``select="none"`` at one layer: the path's last point).

    ``"auto"`` (deprecated) resolves as it always did, with a warning naming its choice."""
    if select not in ("auto", "cv", "valid", "none"):
        raise FitError(f"select must be 'cv', 'valid' or 'none', got {select!r}.")
    if select == "auto":
        if len(splits.valid):
            select, why = "valid", "a validation split was given"
        elif n_layers > 1 or joint:
            select, why = "cv", "no validation split, several layers"
        else:
            select, why = "none", "no validation split, one layer: the path's last λ₂"
        warnings.warn(
            f"select='auto' is deprecated; here it chose select={select!r} ({why}). "
            "Pass select='cv', 'valid' or 'none'.",
            FutureWarning,
            stacklevel=3,
        )
    if n_layers * n_lambdas == 1:
        return "none"
    if select == "valid" and not len(splits.valid):
        raise FitError(
            "select='valid' chooses on the validation split, which is empty; use n_valid ≥ 1 or select='cv'."
        )
    if select == "none" and not path:
        raise FitError("select='none' makes no choice; with several layers use select='cv' or 'valid'.")
    return select


def fit_path(
    model: TransformerBridge,
    splits: TaskSplits,
    layer: int,
    group_l1s: Sequence[float],
    *,
    l1: float = 0.0,
    relative: bool = False,
    steps: int = FitConfig.steps,
    lr: float = FitConfig.lr,
    shots: int = 0,
    fast: bool = True,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[HeadIntervention]]:
    """A λ₂ path at one layer, largest first, each fit warm-started from the previous one.

    ``group_l1s`` are absolute, or fractions of λ_max with ``relative=True``. Returns a DataFrame
    (``group_l1, group_l1_rel, lambda_max, n_selected, train_accuracy, valid_accuracy, valid_ce``)
    and the interventions in the same order: accuracy against head budget.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> table, ivs = fit_path(tiny_model(), tiny_task().split(0, 8, 4), 1, [0.1, 0.5], relative=True, steps=2, progress=False)
        >>> table.group_l1_rel.tolist(), table.n_selected.tolist() == [len(iv.selected_heads()) for iv in ivs]
        ([0.5, 0.1], True)
    """
    template = template or PromptTemplate()
    lambdas = tuple(sorted(lambda_values(group_l1s), reverse=True))
    cfg = FitConfig(
        layer=layer,
        l1=l1,
        group_l1=lambdas[0],
        relative=relative,
        steps=steps,
        lr=lr,
        n_train=len(splits.train),
        n_valid=len(splits.valid),
        n_test=len(splits.test),
        seed=splits.seed,
        shots=shots,
        select="none",
        fast=fast,
    )
    for lam in lambdas:
        replace(cfg, group_l1=lam).validate(model.cfg.n_layers)
    check_splits(splits, shots, "none")
    fits = list(
        tqdm(
            layer_path(model, splits.train, splits.valid, layer, lambdas, cfg, template, CostMeter()),
            desc="λ path",
            total=len(lambdas),
            disable=not progress,
        )
    )
    ivs = [
        f.intervention(model, splits, None, replace(cfg, group_l1=f.group_l1_rel if relative else f.group_l1), template)
        for f in fits
    ]
    return pd.DataFrame([f.row() for f in fits]).drop(columns=["layer"]), ivs
