"""Prompting baselines (zero-shot, k-shot) and their cost per query.

Costs are in forward-pass equivalents with :class:`lens_laai.fastpath.CostMeter` semantics: one
unit is one full forward of one *zero-shot* prompt, so a k-shot prompt costs its token count over
the mean zero-shot token count.

Example:
    >>> from lens_laai.baselines import prompting_baseline, prompting_cost
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> model, splits = tiny_model(), tiny_task().split(0, 8, 4)
    >>> prompting_baseline(model, splits, shots=2).n
    12
    >>> prompting_cost(model, splits, shots=0)
    1.0
"""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge

from lens_laai.baselines.common import check_shots, count_forward, unit_meter
from lens_laai.evaluation.evaluate import EvalResult, evaluate, select_split
from lens_laai.tasks.prompts import PromptTemplate, k_shot_prompts, model_batches
from lens_laai.tasks.task import TaskSplits


def prompting_baseline(
    model: TransformerBridge,
    splits: TaskSplits,
    shots: int = 0,
    split: str = "test",
    *,
    demo_seed: int = 0,
    template: PromptTemplate = PromptTemplate(),
    batch_size: int = 32,
) -> EvalResult:
    """Accuracy of plain k-shot prompting (demonstrations from the train split) on ``split``.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> from lens_laai.baselines.prompting import prompting_baseline
        >>> result = prompting_baseline(model, task.split(seed=0, n_train=8), shots=2)
        >>> 0.0 <= result.accuracy <= 1.0
        True
    """
    check_shots(splits, shots, split)
    return evaluate(
        model, splits, shots=shots, split=split, demo_seed=demo_seed, template=template, batch_size=batch_size
    )


def prompting_cost(
    model: TransformerBridge,
    splits: TaskSplits,
    shots: int = 0,
    split: str = "test",
    *,
    demo_seed: int = 0,
    template: PromptTemplate = PromptTemplate(),
) -> float:
    """Forward-pass equivalents per query of k-shot prompting on ``split`` (1.0 for zero-shot).

    Multiply by the split size for the total; no fitting cost is involved.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, splits = tiny_model(), tiny_task().split(0, 8, 4)
        >>> prompting_cost(model, splits, shots=0)
        1.0
        >>> 2.0 < prompting_cost(model, splits, shots=3) < 6.0  # three demonstrations: a prompt several times as long
        True
    """
    check_shots(splits, shots, split)
    part, demos = select_split(splits, split)
    meter = unit_meter(model, part, template, demos)
    prompts, targets = k_shot_prompts(part, shots, demos, demo_seed, template)
    count_forward(meter, model_batches(model, prompts, targets, template=template), model.cfg.n_layers)
    return meter.forward_equivalents() / len(part)
