"""Helpers every baseline shares: the shots check, cost meters in zero-shot units, fast-path runners."""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import TaskError
from lens_laai.fastpath import CostMeter, LayerRunner
from lens_laai.tasks.prompts import Batch, PromptTemplate, k_shot_prompts, model_batches
from lens_laai.tasks.task import Task, TaskSplits


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


def unit_meter(model: TransformerBridge, task: Task, template: PromptTemplate, demos: Task | None = None) -> CostMeter:
    """A :class:`CostMeter` whose unit is the mean zero-shot prompt of ``task`` (nothing counted yet)."""
    meter = CostMeter()
    for batch in model_batches(model, *k_shot_prompts(task, 0, demos, 0, template), template=template):
        meter.register_prompts(batch, model.cfg.n_layers)
    return meter


def count_forward(meter: CostMeter, batches: list[Batch], n_layers: int) -> None:
    """Record one full forward (no backward) of every batch."""
    for batch in batches:
        meter.add(float(batch.attention_mask.sum()), n_layers, backward=False)


def runner_for(model: TransformerBridge, batches: list[Batch], layer: int) -> LayerRunner:
    """A fast-path :class:`LayerRunner` with a private meter; charge its compute with ``meter.merge(runner.meter)``.

    The runner's meter registers its batches (which may be k-shot) as its unit; keeping them out
    of the caller's meter keeps that unit at one zero-shot prompt.
    """
    return LayerRunner(model, batches, layer, fast=True, meter=CostMeter())
