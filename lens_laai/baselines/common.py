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

    Example:
        >>> from lens_laai.errors import TaskError
        >>> from lens_laai.testing import tiny_task
        >>> splits = tiny_task().split(0, 4)
        >>> check_shots(splits, 3)  # a train query never is its own demonstration: at most n_train - 1
        >>> try:
        ...     check_shots(splits, 4)
        ... except TaskError as err:
        ...     print(str(err).split(":")[1].strip())
        use shots ≤ 3 or a larger n_train.
        >>> check_shots(splits, 4, split="test")  # test queries may use all four
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
    """A :class:`CostMeter` whose unit is the mean zero-shot prompt of ``task`` (nothing counted yet).

    Example:
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> meter = unit_meter(tiny_model(), tiny_task(), PromptTemplate())
        >>> meter.forward_equivalents()  # nothing counted yet; the unit is one zero-shot prompt
        0.0
    """
    meter = CostMeter()
    for batch in model_batches(model, *k_shot_prompts(task, 0, demos, 0, template), template=template):
        meter.register_prompts(batch, model.cfg.n_layers)
    return meter


def count_forward(meter: CostMeter, batches: list[Batch], n_layers: int) -> None:
    """Record one full forward (no backward) of every batch.

    Example:
        >>> from lens_laai.tasks.prompts import PromptTemplate, k_shot_prompts, model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> meter = unit_meter(model, task, PromptTemplate())
        >>> count_forward(meter, model_batches(model, *k_shot_prompts(task, 0)), model.cfg.n_layers)
        >>> round(meter.forward_equivalents(), 6)  # one zero-shot forward per pair
        24.0
    """
    for batch in batches:
        meter.add(float(batch.attention_mask.sum()), n_layers, backward=False)


def runner_for(model: TransformerBridge, batches: list[Batch], layer: int) -> LayerRunner:
    """A fast-path :class:`LayerRunner` with a private meter; charge its compute with ``meter.merge(runner.meter)``.

    The runner's meter registers its batches (which may be k-shot) as its unit; keeping them out
    of the caller's meter keeps that unit at one zero-shot prompt.

    Example:
        >>> from lens_laai.tasks.prompts import k_shot_prompts, model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> batches = model_batches(model, *k_shot_prompts(tiny_task(), 2))
        >>> runner = runner_for(model, batches, 1)
        >>> runner.path, runner.logits(0, []).shape  # [prompts, vocabulary]
        ('kernel', torch.Size([24, 396]))
    """
    return LayerRunner(model, batches, layer, fast=True, meter=CostMeter())
