"""Prompting baselines (zero-shot, k-shot) and the cost accounting shared by all baselines.

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

from typing import Callable

from transformer_lens.model_bridge import TransformerBridge

from ..evaluate import EvalResult, evaluate, select_split
from ..fastpath import CostMeter, LayerRunner
from ..prompts import Batch, PromptTemplate, iter_batches, k_shot_prompts
from ..tasks import Task, TaskError, TaskSplits


def check_shots(splits: TaskSplits, shots: int, split: str = "train") -> None:
    """Raise :class:`TaskError` unless ``shots`` demonstrations can be drawn from the train split.

    Queries from the train split never see themselves, so they need ``shots ≤ n_train - 1``;
    queries from another split may use all ``n_train`` pairs.
    """
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise TaskError(f"shots must be an integer ≥ 0, got {shots!r}.")
    n = len(splits.train)
    limit = n - 1 if split == "train" else n
    if shots and shots > limit:
        raise TaskError(
            f"{shots}-shot prompts draw demonstrations from the train split, which has {n} pairs "
            f"(a query is never its own demonstration): use shots ≤ {max(limit, 0)} or a larger n_train."
        )


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
    """Accuracy of plain k-shot prompting (demonstrations from the train split) on ``split``."""
    check_shots(splits, shots, split)
    return evaluate(model, splits, shots=shots, split=split, demo_seed=demo_seed, template=template, batch_size=batch_size)


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
    """
    check_shots(splits, shots, split)
    part, demos = select_split(splits, split)
    meter = unit_meter(model, part, template, demos)
    prompts, targets = k_shot_prompts(part, shots, demos, demo_seed, template)
    count_forward(meter, list(iter_batches(model.tokenizer, prompts, targets)), model.cfg.n_layers)
    return meter.forward_equivalents() / len(part)


# shared by the baselines ----------------------------------------------------------------------
def unit_meter(model: TransformerBridge, task: Task, template: PromptTemplate, demos: Task | None = None) -> CostMeter:
    """A :class:`CostMeter` whose unit is the mean zero-shot prompt of ``task`` (nothing counted yet)."""
    meter = CostMeter()
    prompts, targets = k_shot_prompts(task, 0, demos, 0, template)
    for batch in iter_batches(model.tokenizer, prompts, targets):
        meter.register_prompts(batch, model.cfg.n_layers)
    return meter


def count_forward(meter: CostMeter, batches: list[Batch], n_layers: int) -> None:
    """Record one full forward (no backward) of every batch."""
    for batch in batches:
        meter.add(float(batch.attention_mask.sum()), n_layers, backward=False)


def runner_for(model: TransformerBridge, batches: list[Batch], layer: int) -> LayerRunner:
    """A fast-path :class:`LayerRunner` with a private meter; charge its compute with :func:`settle`.

    The runner's meter registers its batches (which may be k-shot) as its unit; keeping them out
    of the caller's meter keeps that unit at one zero-shot prompt.
    """
    return LayerRunner(model, batches, layer, fast=True, meter=CostMeter())


def settle(meter: CostMeter, runner: LayerRunner) -> None:
    """Move the compute counted by ``runner`` into ``meter`` (and zero the runner's count)."""
    meter.token_layers += runner.meter.token_layers
    runner.meter.token_layers = 0.0


def runner_scores(runner: LayerRunner, fwd_hooks: list[tuple[str, Callable]]) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of the first target token over the runner's batches."""
    return runner.scores(fwd_hooks)
