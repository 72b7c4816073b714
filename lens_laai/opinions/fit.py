"""Fit a sparse head intervention so the model answers survey questions like a given group.

The paper's opinion-dynamics experiment: for one group (``ATTRIBUTE=VALUE``), minimise over Δ at
one layer the mean divergence (default KL(target ‖ model)) between the group's answer distribution
and the model's distribution over the option letters of each training question, plus
``l1‖Δ‖₁ + group_l1 Σ_h ‖Δ_h‖₂``, with the same proximal solver (:func:`lens_laai.fitting.solver.fista`)
and last-token fast path (:class:`lens_laai.fastpath.LayerRunner`) as task fitting: the answer
letter is one token at the last position. The layer (from :func:`lens_laai.fitting.fit.default_layers`
unless told) and λ₂ (a path, largest first, warm-started) are chosen on the validation questions'
divergence. The intervention records the survey, its content hash, the group and the question
split, so :func:`lens_laai.opinions.evaluate.evaluate_opinion` scores exactly the held-out questions.

Example:
    >>> from lens_laai.opinions.fit import fit_opinion
    >>> from lens_laai.opinions.survey import toy_survey
    >>> from lens_laai.testing import tiny_model
    >>> result = fit_opinion(tiny_model(), toy_survey(), "PARTY=Red", layer=1, n_train=3, n_valid=1,
    ...                      steps=3, progress=False)
    >>> result.layer, result.intervention.metadata["survey"]["group"]
    (1, 'PARTY=Red')
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import FitError, TaskError
from lens_laai.fastpath import CostMeter, LayerRunner, cached_runner
from lens_laai.fitting.fit import FitConfig
from lens_laai.fitting.penalties import lambda_values
from lens_laai.fitting.solver import fista
from lens_laai.interventions.head import HeadIntervention, delta_hook
from lens_laai.models.bridge import hook_name, model_fingerprint, model_name
from lens_laai.opinions.metrics import Divergence, check_divergence, divergence
from lens_laai.opinions.prompts import (
    OpinionPrompt,
    QuestionBatch,
    answer_distribution,
    letter_tokens,
    option_log_probs,
    question_batches,
)
from lens_laai.opinions.survey import Group, Survey, SurveyQuestion, SurveySplits

DEFAULT_GROUP_L1 = (0.05, 0.01)
DEFAULT_L1 = 1e-4


@dataclass
class OpinionFitResult:
    """The chosen intervention, the (layer, λ₂) sweep on validation, and the winner's solver history.

    Example:
        >>> from lens_laai import fit_opinion
        >>> from lens_laai.opinions.survey import toy_survey
        >>> from lens_laai.testing import tiny_model
        >>> survey = toy_survey()
        >>> result = fit_opinion(tiny_model(), survey, "PARTY=Red", 1, splits=survey.split(0, 3, 1), steps=2, progress=False)
        >>> type(result).__name__, len(result.sweep) >= 1
        ('OpinionFitResult', True)
    """

    intervention: HeadIntervention
    layer: int
    group_l1: float
    selected_heads: list[tuple[int, int]]
    train_divergence: float
    valid_divergence: float
    sweep: pd.DataFrame
    history: pd.DataFrame
    splits: SurveySplits
    seconds: float
    forward_equivalents: float
    fast_path: bool


def group_questions(survey: Survey, group: Group, keys: Sequence[str]) -> list[SurveyQuestion]:
    """The questions among ``keys`` that ``group`` answered (others have no target for it).

    Example:
        >>> import dataclasses
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai.opinions.fit import group_questions
        >>> [q.key for q in group_questions(survey, red, ["Q0", "Q1", "Q2"])]
        ['Q0', 'Q1', 'Q2']
        >>> not_asked_q1 = dataclasses.replace(red, answers={k: a for k, a in red.answers.items() if k != "Q1"})
        >>> [q.key for q in group_questions(survey, not_asked_q1, ["Q0", "Q1", "Q2"])]
        ['Q0', 'Q2']
    """
    return [survey.questions[k] for k in keys if k in group.answers]


def opinion_batches(
    model: TransformerBridge,
    survey: Survey,
    group: Group,
    keys: Sequence[str],
    prompt: OpinionPrompt,
    batch_size: int = 16,
) -> list[QuestionBatch]:
    """Plain prompts of ``keys`` (the group answered) with the group's target distributions.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai.opinions.fit import opinion_batches
        >>> from lens_laai.opinions.prompts import OpinionPrompt
        >>> from lens_laai.testing import tiny_model
        >>> batches = opinion_batches(tiny_model(), survey, red, ["Q0", "Q1", "Q2"], OpinionPrompt(), batch_size=2)
        >>> [len(b) for b in batches], batches[0].keys
        ([2, 1], ['Q0', 'Q1'])
        >>> [[round(p, 3) for p in row] for row in batches[0].target.tolist()]  # the group's answers; 0 past the options
        [[0.682, 0.182, 0.136], [0.25, 0.75, 0.0]]
    """
    qs = group_questions(survey, group, keys)
    if not qs:
        return []
    return question_batches(
        model,
        qs,
        [prompt.render(q) for q in qs],
        [group.answers[q.key].distribution for q in qs],
        batch_size,
        prompt.prepend_bos,
    )


def fit_opinion(
    model: TransformerBridge,
    survey: Survey,
    group: str,
    layer: int | str = "sweep",
    *,
    splits: SurveySplits | None = None,
    seed: int | None = None,
    n_train: int | None = None,
    n_valid: int | None = None,
    n_test: int | None = None,
    layers: Sequence[int] | str | None = None,
    l1: float = DEFAULT_L1,
    group_l1: float | Sequence[float] = DEFAULT_GROUP_L1,
    steps: int = 20,
    lr: float = 1.0,
    divergence: Divergence = "kl",
    prompt: OpinionPrompt | None = None,
    batch_size: int = 16,
    fast: bool = True,
    progress: bool = True,
    runners: dict[Any, LayerRunner] | None = None,
) -> OpinionFitResult:
    """Fit one group's intervention on its training questions; see the module docstring.

    Args:
        group: ``ATTRIBUTE=VALUE`` (case-insensitive), e.g. ``"POLVIEWS=Extremely liberal"``.
        splits: question keys to use; otherwise ``survey.split(seed, n_train, n_valid, n_test)`` (defaults
            0, 8, 4, the rest).
        layer, layers: a layer, or ``"sweep"`` (default) to sweep ``layers`` (default
            :func:`~lens_laai.fitting.fit.default_layers`) and keep the lowest validation divergence.
            ``"auto"`` is the old name of ``"sweep"`` here (deprecated: a task fit's ``"auto"`` is a
            fixed layer).
        l1, group_l1: λ₁ and λ₂; a list of λ₂ is a path (largest first, warm starts). ``0, 0`` is
            the fit without the Lasso terms.
        divergence: ``"kl"`` (KL(target ‖ model)), ``"js"`` or ``"w1"`` (see :mod:`lens_laai.opinions.metrics`).
        runners: a dict to keep each layer's prefix cache in; pass the same dict to fits whose prompts are
            the same (every group of one split) so each layer's cache is built once (its cost is counted
            in the first fit's ``forward_equivalents`` only).

    Raises:
        FitError: a bad option (before any work) or a non-finite loss.
        TaskError: an unknown group, or no training question the group answered.

    Example:
        >>> from lens_laai import fit_opinion
        >>> from lens_laai.opinions.survey import toy_survey
        >>> from lens_laai.testing import tiny_model
        >>> model, survey = tiny_model(), toy_survey()
        >>> splits = survey.split(seed=0, n_train=3, n_valid=1)
        >>> result = fit_opinion(model, survey, "PARTY=Red", 1, splits=splits, steps=2, progress=False)
        >>> result.layer, result.intervention.layers
        (1, [1])
    """
    lambdas = tuple(sorted(lambda_values(group_l1), reverse=True))
    layers_arg = layers if layers is None or isinstance(layers, str) else tuple(layers)
    if layer == "auto":
        warnings.warn(
            "fit_opinion(layer='auto') is now layer='sweep' (a sweep on validation questions); a task fit's "
            "'auto' is a fixed layer. Pass layer='sweep'.",
            FutureWarning,
            stacklevel=2,
        )
        layer = "sweep"
    if layer == "joint":
        raise FitError(
            "layer='joint' is for tasks; a survey fit takes a layer index or 'sweep' (a sweep on validation questions)."
        )
    cfg = FitConfig(
        layer=layer,
        layers=layers_arg,
        l1=l1,
        group_l1=lambdas[0],
        relative=False,
        select="valid",
        steps=steps,
        lr=lr,
        batch_size=batch_size,
    )
    for lam in lambdas:
        replace(cfg, group_l1=lam).validate(model.cfg.n_layers)
    check_divergence(divergence)
    grp = survey.group(group)
    if splits is not None:
        given = [
            k
            for k, v in (("seed", seed), ("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test))
            if v is not None
        ]
        if given:
            raise FitError(f"{', '.join(given)} cut a split, but splits= is already given; drop them.")
    else:
        splits = survey.split(
            0 if seed is None else seed, 8 if n_train is None else n_train, 4 if n_valid is None else n_valid, n_test
        )
    prompt = prompt or OpinionPrompt()
    start, meter = time.perf_counter(), CostMeter()
    train = opinion_batches(model, survey, grp, splits.train, prompt, batch_size)
    valid = opinion_batches(model, survey, grp, splits.valid, prompt, batch_size)
    if not train:
        raise TaskError(
            f"Group {grp.name!r} answered none of the {len(splits.train)} training questions; use another split."
        )
    if not valid:
        warnings.warn(
            "No validation question: the layer and λ are chosen on the training divergence, which favours "
            "overfitting. Use n_valid ≥ 1.",
            UserWarning,
            stacklevel=2,
        )
    n_letters = max(len(survey.questions[k].all_options) for k in (*splits.train, *splits.valid, *splits.test))
    letters = letter_tokens(model.tokenizer, n_letters, prompt.answer_prefix)
    candidates = cfg.candidate_layers(model.cfg.n_layers)
    rows, best = [], None
    bar = tqdm(total=len(candidates) * len(lambdas) * steps, desc=f"fit {grp.name}", disable=not progress)
    for L in candidates:
        runner = cached_runner(model, [qb.batch for qb in train], L, fast, meter, runners)
        valid_runner = cached_runner(model, [qb.batch for qb in valid], L, fast, meter, runners) if valid else None
        delta = torch.zeros(model.cfg.n_heads, model.cfg.d_head)
        for lam in lambdas:
            objective = _Objective(runner, train, letters, divergence)

            def on_step(record: Any, L: int = L) -> None:
                bar.update(1)
                bar.set_postfix(layer=L, loss=f"{record.loss:.4f}", heads=record.n_selected)

            delta, history = fista(objective.smooth_and_grad, objective.smooth, delta, l1, lam, steps, lr, on_step)
            train_div = objective.smooth(delta)
            valid_div = (
                _Objective(valid_runner, valid, letters, divergence).smooth(delta) if valid_runner else train_div
            )
            n_sel = int((delta.norm(dim=-1) > 0).sum())
            rows.append(
                {
                    "layer": L,
                    "group_l1": lam,
                    "n_selected": n_sel,
                    "train_divergence": train_div,
                    "valid_divergence": valid_div,
                    "train_loss": history[-1].loss if history else train_div,
                }
            )
            key = (valid_div, n_sel)
            if best is None or key < best[0]:
                best = (key, L, lam, delta.clone(), history, train_div, valid_div, runner.is_fast)
    bar.close()
    assert best is not None, "candidates and lambdas are checked non-empty above"
    _, L, lam, delta, history, train_div, valid_div, is_fast = best
    config = {
        **asdict(
            replace(
                cfg,
                layer=L,
                group_l1=lam,
                n_train=len(splits.train),
                n_valid=len(splits.valid),
                n_test=len(splits.test),
                seed=splits.seed,
            )
        ),
        "group_l1_path": list(lambdas),
        "divergence": divergence,
        "layers_tried": candidates,
    }
    metadata = opinion_metadata(
        survey, grp, splits, prompt, config, train_divergence=train_div, valid_divergence=valid_div
    )
    iv = HeadIntervention({L: delta}, model_name(model), model_fingerprint(model), "last", metadata)
    return OpinionFitResult(
        iv,
        L,
        lam,
        iv.selected_heads(),
        train_div,
        valid_div,
        pd.DataFrame(rows),
        pd.DataFrame([asdict(r) for r in history]),
        splits,
        time.perf_counter() - start,
        meter.forward_equivalents(),
        is_fast,
    )


def opinion_metadata(
    survey: Survey, group: Group, splits: SurveySplits, prompt: OpinionPrompt, config: dict[str, Any], **scores: Any
) -> dict[str, Any]:
    """What a fitted survey intervention records so evaluation can reproduce its held-out questions.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai.opinions.fit import opinion_metadata
        >>> from lens_laai.opinions.prompts import OpinionPrompt
        >>> metadata = opinion_metadata(survey, red, survey.split(0, 3, 1), OpinionPrompt(), {"steps": 3})
        >>> metadata["name"], metadata["survey"]["group"], metadata["survey"]["n_train"], metadata["survey"]["n_test"]
        ('toy:PARTY=Red', 'PARTY=Red', 3, 4)
    """
    record = {
        "name": survey.name,
        "hash": survey.data_hash(),
        "group": group.name,
        **splits.to_json(),
        "n_train": len(splits.train),
        "n_valid": len(splits.valid),
        "n_test": len(splits.test),
    }
    return {
        "name": f"{survey.name}:{group.name}",
        "kind": "opinion",
        "survey": record,
        "opinion_prompt": prompt.to_json(),
        "fit_config": config,
        **scores,
    }


class _Objective:
    """Mean per-question divergence of the letter distribution at the last token, Δ at ``runner.layer``."""

    def __init__(self, runner: LayerRunner, batches: list[QuestionBatch], letters: Tensor, kind: Divergence) -> None:
        self.runner, self.batches, self.letters, self.kind = runner, batches, letters, kind
        self.n = sum(len(b) for b in batches)

    def loss(self, delta: Tensor, backward: bool) -> Tensor:
        total = torch.zeros(())
        hooks = [(hook_name(self.runner.layer), delta_hook(delta))]
        for i, qb in enumerate(self.batches):
            logits = self.runner.logits(i, hooks, backward)
            log_q, _ = answer_distribution(option_log_probs(logits, self.letters[: qb.target.shape[1]]), qb)
            total = total + divergence(self.kind, log_q, qb).sum().cpu()
        return total / self.n

    def smooth_and_grad(self, y: Tensor) -> tuple[float, Tensor]:
        y = y.detach().requires_grad_(True)
        value = self.loss(y, backward=True)
        (grad,) = torch.autograd.grad(value, y)
        return float(value.detach()), grad

    def smooth(self, x: Tensor) -> float:
        with torch.no_grad():
            return float(self.loss(x, backward=False))
