"""Mean-difference steering on ``hook_z`` (ITI / ActAdd style): no optimisation at all.

At layer L, for every head, average over the train split the difference between the head's
``hook_z`` at the last token of the k-shot prompt and of the zero-shot prompt of the same query.
Keep the top-K heads of the layer, ranked by

* ``"norm"``: ‖mean difference‖₂ (raw size of the shift), or
* ``"separation"``: ‖μ_k-shot − μ_zero-shot‖₂ / pooled std (the per-dimension variances of both
  groups, averaged over dimensions and groups, square-rooted): a probe-free proxy for how well a
  linear probe would tell the two conditions apart, insensitive to a head's overall scale;

and set Δ_h = α · mean difference for those heads (zero elsewhere), α picked on zero-shot
validation prompts from a small grid (ties: lower cross-entropy). ``layer="auto"`` does the same
over candidate layers. The result is a :class:`lens_laai.HeadIntervention`, so ``heads()``,
algebra and save/load work as for fitted interventions.

Example:
    >>> from lens_laai import evaluate
    >>> from lens_laai.baselines import fit_mean_difference
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> model, splits = tiny_model(), tiny_task().split(0, 8, 4)
    >>> result = fit_mean_difference(model, splits, layer=1, top_k=2, shots=3, progress=False)
    >>> len(result.intervention.selected_heads()), evaluate(model, splits, result.intervention).n
    (2, 12)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.baselines.common import (
    check_shots,
    count_forward,
    runner_for,
    unit_meter,
)
from lens_laai.baselines.function_vectors import candidate_layers
from lens_laai.errors import FitError
from lens_laai.fastpath.recording import last_token_z
from lens_laai.interventions.head import HeadIntervention
from lens_laai.models.bridge import model_fingerprint, model_name
from lens_laai.tasks.prompts import PromptTemplate, k_shot_prompts, model_batches
from lens_laai.tasks.provenance import fit_metadata
from lens_laai.tasks.task import TaskError, TaskSplits

SelectBy = Literal["norm", "separation"]
DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def head_scores(
    z_shot: Float[Tensor, "prompt head d_head"], z_zero: Float[Tensor, "prompt head d_head"]
) -> tuple[Float[Tensor, "head d_head"], Float[Tensor, " head"], Float[Tensor, " head"]]:
    """Per head: mean difference (k-shot − zero-shot), its norm, and the separation score.

    Example:
        >>> import torch
        >>> z_zero = torch.zeros(4, 2, 3)
        >>> z_shot = torch.zeros(4, 2, 3)
        >>> z_shot[:, 1] = torch.tensor([3.0, 4.0, 0.0])  # only head 1 moves with the demonstrations
        >>> diff, norm, separation = head_scores(z_shot, z_zero)
        >>> diff.shape, norm.tolist()
        (torch.Size([2, 3]), [0.0, 5.0])
    """
    diff = (z_shot - z_zero).float().mean(0)
    norm = diff.norm(dim=-1)
    if z_shot.shape[0] < 2:
        return diff, norm, torch.full_like(norm, float("nan"))
    pooled = ((z_shot.float().var(0) + z_zero.float().var(0)) / 2).mean(-1).sqrt()
    return diff, norm, norm / pooled.clamp(min=1e-12)


def top_k_mask(scores: Float[Tensor, " head"], top_k: int) -> Float[Tensor, " head"]:
    """1.0 for the ``top_k`` highest scores (ties: lower head index), 0.0 elsewhere.

    Example:
        >>> import torch
        >>> top_k_mask(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2)  # ties: the lower head
        tensor([0., 1., 0., 1.])
    """
    order = sorted(range(len(scores)), key=lambda h: (-float(scores[h]), h))
    mask = torch.zeros(len(scores))
    mask[order[:top_k]] = 1.0
    return mask


@dataclass
class MeanDifferenceResult:
    """The best mean-difference intervention, its (layer, α) sweep, head scores and cost.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, splits = tiny_model(), tiny_task().split(0, 8, 4)
        >>> result = fit_mean_difference(model, splits, 1, top_k=2, alphas=(1.0, 4.0), shots=3, progress=False)
        >>> len(result.selected_heads), result.alpha in (1.0, 4.0), list(result.sweep.columns[:2])
        (2, True, ['layer', 'alpha'])
    """

    intervention: HeadIntervention
    layer: int
    alpha: float
    valid_accuracy: float
    selected_heads: list[tuple[int, int]]
    sweep: pd.DataFrame
    scores: pd.DataFrame
    seconds: float
    forward_equivalents: float
    fast_path: bool


def fit_mean_difference(
    model: TransformerBridge,
    splits: TaskSplits,
    layer: int | str = "auto",
    *,
    layers: Sequence[int] | None = None,
    top_k: int = 3,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    shots: int = 10,
    select_by: SelectBy = "norm",
    seed: int = 0,
    template: PromptTemplate = PromptTemplate(),
    batch_size: int = 32,
    progress: bool = True,
) -> MeanDifferenceResult:
    """Mean-difference Δ on the top-K heads of a layer, (layer, α) chosen on validation.

    With an empty validation split (layer, α) are chosen on the training pairs' zero-shot prompts,
    which the direction was not fitted to: no labelled data beyond ``n_train``.

    Args:
        layer: a layer index, or ``"auto"`` to try every layer in ``layers`` (default: all).
        top_k: heads kept per layer; ``select_by`` ranks them (``"norm"`` or ``"separation"``).
        alphas: the scale grid tried on zero-shot validation prompts.
        shots: demonstrations (from the train split) in the k-shot prompts.

    Example:
        >>> from lens_laai import evaluate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, splits = tiny_model(), tiny_task().split(0, 8, 4)
        >>> result = fit_mean_difference(model, splits, "auto", top_k=2, alphas=(1.0, 4.0), shots=3, progress=False)
        >>> result.layer in (0, 1, 2), sorted(result.intervention.deltas) == [result.layer]
        (True, True)
        >>> [h for _, h in result.intervention.selected_heads()] == [h for _, h in result.selected_heads]
        True
        >>> 0 <= evaluate(model, splits, result.intervention).accuracy <= 1
        True
    """
    start = time.perf_counter()
    check_shots(splits, shots)
    n_heads = model.cfg.n_heads
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_heads:
        raise FitError(
            f"top_k must be an integer within 1..{n_heads} (heads per layer), got {top_k!r}; "
            "pass how many heads of the layer to keep."
        )
    if select_by not in ("norm", "separation"):
        raise FitError(f"select_by must be 'norm' or 'separation', got {select_by!r}; pass one of the two.")
    if select_by == "separation" and len(splits.train) < 2:
        raise TaskError("select_by='separation' needs a spread estimate: use n_train ≥ 2 or select_by='norm'.")
    if not alphas or any(not isinstance(a, (int, float)) or a <= 0 for a in alphas):
        raise FitError(
            f"alphas must be a non-empty list of positive numbers, got {alphas!r}; "
            f"leave it out for the default grid {DEFAULT_ALPHAS}."
        )
    if layer == "auto":
        todo = candidate_layers(model, layers)
    elif isinstance(layer, int) and not isinstance(layer, bool):
        todo = candidate_layers(model, [layer])
    else:
        raise FitError(
            f"layer must be an int or 'auto', got {layer!r}; pass a layer index, or 'auto' to try each layer."
        )

    meter = unit_meter(model, splits.train, template)
    per_shots = {}
    for k in (0, shots):
        batches = model_batches(
            model, *k_shot_prompts(splits.train, k, splits.train, seed, template), batch_size, template
        )
        per_shots[k] = last_token_z(model, batches, todo)
        count_forward(meter, batches, model.cfg.n_layers)
    chooser = splits.valid if len(splits.valid) else splits.train  # no validation split: choose on the n pairs
    valid = model_batches(model, *k_shot_prompts(chooser, 0, None, seed, template), batch_size, template)
    runner = runner_for(model, valid, todo[0])
    fp, name = model_fingerprint(model), model_name(model)
    score_rows, rows, best = [], [], None
    for i, L in enumerate(tqdm(todo, desc="mean-diff layers", disable=not progress)):
        diff, norm, sep = head_scores(per_shots[shots][:, i], per_shots[0][:, i])
        mask = top_k_mask(norm if select_by == "norm" else sep, top_k)
        score_rows += [
            {"layer": L, "head": h, "norm": float(norm[h]), "separation": float(sep[h]), "selected": bool(mask[h])}
            for h in range(n_heads)
        ]
        for alpha in alphas:
            delta = float(alpha) * diff.float().cpu() * mask[:, None]
            acc, ce = runner.scores(HeadIntervention({L: delta}, name, fp).fwd_hooks())
            rows.append({"layer": L, "alpha": float(alpha), "valid_accuracy": acc, "valid_ce": ce, "n_selected": top_k})
            if best is None or (acc, -ce) > best[0]:
                best = ((acc, -ce), L, float(alpha), delta)
    meter.merge(runner.meter)
    assert best is not None, "todo and alphas are checked non-empty above"
    (valid_acc, _), L, alpha, delta = best
    config = {
        "method": "mean_difference",
        "seed": splits.seed,
        "n_train": len(splits.train),
        "n_valid": len(splits.valid),
        "n_test": len(splits.test),
        "shots": shots,
        "top_k": top_k,
        "select_by": select_by,
        "alphas": [float(a) for a in alphas],
        "layers": todo,
        "prompt_seed": seed,
    }
    metadata = fit_metadata(splits, None, template, config, alpha=alpha, valid_accuracy=valid_acc)
    iv = HeadIntervention({L: delta}, name, fp, "last", metadata)
    return MeanDifferenceResult(
        iv,
        L,
        alpha,
        valid_acc,
        iv.selected_heads(),
        pd.DataFrame(rows),
        pd.DataFrame(score_rows),
        time.perf_counter() - start,
        meter.forward_equivalents(),
        runner.is_fast,
    )
