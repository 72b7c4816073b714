"""The relaxed group lasso: refit Δ on the heads the penalised fit kept, with the group penalty off.

The group penalty does two jobs at once: it chooses heads and it shrinks the ones it keeps. The λ₂
that chooses a small, right set of heads is larger than the λ₂ that predicts well, so a sparse
penalised fit is a weak one. The relaxed lasso (Meinshausen 2007) separates the jobs: the penalised
path chooses the support; a second fit on that support alone, with the group penalty off (λ₁, small,
stays), estimates Δ. Heads outside the support stay exactly zero (their gradient is masked), and
the refit is warm-started from the penalised Δ, so a few steps suffice.

Example:
    >>> import torch
    >>> from lens_laai.fitting.relaxed import support
    >>> support(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])).tolist()
    [False, True, True]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.fastpath import CostMeter, LayerRunner
from lens_laai.fastpath.scoring import score_logits
from lens_laai.fitting.layer_fit import LayerFit, delta_hooks, layer_path, objective
from lens_laai.fitting.solver import StepRecord, fista
from lens_laai.tasks.prompts import PromptTemplate
from lens_laai.tasks.task import Task

RELAXED_STEPS = 8  # proximal steps of a relaxed refit unless told otherwise (development study, docs/results.md §6)


def support(delta: Tensor) -> Tensor:
    """Which rows (heads) of Δ are non-zero: a boolean ``[head]`` tensor.

    Example:
        >>> import torch
        >>> from lens_laai.fitting.relaxed import support
        >>> support(torch.tensor([[0.0, 0.0], [0.0, -1e-8], [3.0, 4.0]])).tolist()
        [False, True, True]
    """
    return delta.norm(dim=-1) > 0


def relaxed_refit(
    runner: LayerRunner,
    cfg: Any,
    delta: Tensor,
    steps: int = RELAXED_STEPS,
    sites: tuple[int, ...] | None = None,
) -> tuple[Tensor, list[StepRecord]]:
    """Minimise the training loss + ``cfg.l1‖Δ‖₁`` over Δ supported on ``delta``'s non-zero heads.

    Starts from ``delta`` (the penalised fit); returns the refitted Δ and the solver's record.
    A Δ with no head selected comes back unchanged, with an empty record.

    Example (the refit moves only the heads the penalised fit kept, here heads 0 and 2):
        >>> import torch
        >>> from lens_laai.fastpath import CostMeter, LayerRunner
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import training_batches
        >>> from lens_laai.fitting.relaxed import relaxed_refit, support
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train, cfg = tiny_model(), tiny_task().split(0, 8).train, FitConfig(layer=1)
        >>> runner = LayerRunner(model, training_batches(model, train, train, cfg, PromptTemplate()), 1, True, CostMeter())
        >>> penalised = torch.zeros(4, 16)
        >>> penalised[[0, 2]] = 0.1
        >>> refit, history = relaxed_refit(runner, cfg, penalised, steps=3)
        >>> support(refit).tolist(), len(history), history[-1].smooth < runner.scores([])[1]
        ([True, False, True, False], 3, True)
        >>> refit, history = relaxed_refit(runner, cfg, torch.zeros(4, 16))  # no head: nothing to refit
        >>> bool((refit == 0).all()), history
        (True, [])
    """
    keep = support(delta)
    if not bool(keep.any()) or steps == 0:
        return delta.detach().clone(), []
    mask = keep[:, None].to(delta.dtype)
    smooth_and_grad, smooth = objective(runner, cfg, sites)

    def masked(y: Tensor) -> tuple[float, Tensor]:
        value, grad = smooth_and_grad(y)
        return value, grad * mask.to(grad.device)

    init = delta.detach().to(device=runner.delta_device, dtype=torch.float32)
    return fista(masked, smooth, init, cfg.l1, 0.0, steps, cfg.lr)


@torch.no_grad()
def pair_scores(runner: LayerRunner, fwd_hooks: list) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair top-1 correctness (0/1) and cross-entropy of the first target token under ``fwd_hooks``.

    Example (the model alone, no hooks; the means are what the runner's ``scores`` reports):
        >>> from lens_laai.fastpath import CostMeter, LayerRunner
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import training_batches
        >>> from lens_laai.fitting.relaxed import pair_scores
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train = tiny_model(), tiny_task().split(0, 8).train
        >>> runner = LayerRunner(model, training_batches(model, train, train, FitConfig(), PromptTemplate()), 1, True, CostMeter())
        >>> correct, ce = pair_scores(runner, [])
        >>> correct.shape, ce.shape, set(correct.tolist()) <= {0.0, 1.0}, bool((ce > 0).all())
        ((8,), (8,), True, True)
        >>> accuracy, mean_ce = runner.scores([])
        >>> float(correct.mean()) == accuracy, abs(float(ce.mean()) - mean_ce) < 1e-5
        (True, True)
    """
    correct, ce = [], []
    for i, batch in enumerate(runner.batches):
        s = score_logits(runner.logits(i, fwd_hooks), batch.target_ids)
        correct.append(s.correct.float().cpu())
        ce.append((-s.target_logprob).float().cpu())
    return torch.cat(correct).numpy(), torch.cat(ce).numpy()


@dataclass
class PathPoint:
    """One λ₂ of a path: the penalised fit, its relaxed refit, and per-pair scores on the held-out pairs.

    ``held`` maps ``"penalised"`` / ``"relaxed"`` to ``(correct, cross_entropy)`` arrays, one entry per
    held-out pair (empty without held-out pairs); ``relaxed`` is ``None`` when no refit was asked for.

    Example (the one point of a one-λ₂ :func:`relaxed_path`, no held-out pairs):
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.relaxed import relaxed_path
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> train = tiny_task().split(0, 8).train
        >>> (point,) = relaxed_path(tiny_model(), train, None, 1, [0.5], FitConfig(steps=2), PromptTemplate(), CostMeter(), 1)
        >>> point.lam, point.n_selected == point.fit.n_selected, point.held, len(point.relaxed_history)
        (0.5, True, {}, 1)
        >>> point.delta(relaxed=True) is point.relaxed, point.delta(relaxed=False) is point.fit.delta
        (True, True)
    """

    lam: float
    fit: LayerFit
    relaxed: Tensor | None
    relaxed_history: list[StepRecord]
    relaxed_train_accuracy: float
    held: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def n_selected(self) -> int:
        return self.fit.n_selected

    def delta(self, relaxed: bool) -> Tensor:
        return self.relaxed if relaxed and self.relaxed is not None else self.fit.delta


def relaxed_path(
    model: TransformerBridge,
    train: Task,
    held: Task | None,
    layer: int,
    lambdas: Sequence[float],
    cfg: Any,
    template: PromptTemplate,
    meter: CostMeter,
    relaxed_steps: int | None = RELAXED_STEPS,
    runners: dict | None = None,
) -> Iterator[PathPoint]:
    """:func:`~lens_laai.fitting.layer_fit.layer_path` with a relaxed refit at every λ₂ (``relaxed_steps=None``:
    none) and per-pair scores on ``held``. Each refit starts from its own point's penalised Δ.

    Example (8 training pairs, 16 held-out ones scored penalised and relaxed at each λ₂):
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.relaxed import relaxed_path, support
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> splits = tiny_task().split(0, 8)
        >>> points = list(relaxed_path(tiny_model(), splits.train, splits.test, 1, [0.2, 0.9], FitConfig(steps=2),
        ...                            PromptTemplate(), CostMeter(), relaxed_steps=1))
        >>> [p.lam for p in points], [sorted(p.held) for p in points][0], points[0].held["relaxed"][0].shape
        ([0.9, 0.2], ['penalised', 'relaxed'], (16,))
        >>> all(bool((support(p.relaxed) == support(p.fit.delta)).all()) for p in points)  # same heads, refitted
        True
    """
    path = sorted(lambdas, reverse=True)
    for lam, f in zip(path, layer_path(model, train, held, layer, path, cfg, template, meter, runners=runners)):
        relaxed, train_acc = None, float("nan")
        history: list = []
        if relaxed_steps is not None:
            assert f.runner is not None, "layer_path keeps each point's runner"
            relaxed, history = relaxed_refit(f.runner, cfg, f.delta, relaxed_steps, f.sites)
            train_acc = f.runner.scores(delta_hooks(f.sites, relaxed, f.runner.tail))[0]
        scores = {}
        if f.valid_runner is not None:
            scores["penalised"] = pair_scores(f.valid_runner, delta_hooks(f.sites, f.delta, f.valid_runner.tail))
            if relaxed is not None:
                scores["relaxed"] = pair_scores(f.valid_runner, delta_hooks(f.sites, relaxed, f.valid_runner.tail))
        yield PathPoint(lam, f, relaxed, history, train_acc, scores)
