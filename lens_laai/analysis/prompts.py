"""The prompts a head analysis reads, built from an intervention's held-out queries.

:class:`AnalysisPrompts` holds the zero-shot prompts of the first ``n_prompts`` held-out queries,
and builds on demand (checked against the model's context only then) their clean k-shot prompts,
the label-deranged twins (Function Vectors' shuffled-label prompts, from
:func:`lens_laai.baselines.function_vectors.deranged_prompts`) and the reference prompts of the
training queries, each with its real target.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.baselines.function_vectors import deranged_prompts
from lens_laai.errors import TaskError
from lens_laai.evaluation.evaluate import select_split
from lens_laai.interventions.head import HeadIntervention
from lens_laai.tasks.prompts import Batch, PromptTemplate, make_batch, model_batches
from lens_laai.tasks.task import Task, TaskSplits


class AnalysisPrompts:
    """Held-out queries as zero-shot prompts; clean k-shot prompts, their label-deranged twins and reference prompts on demand.

    The k-shot prompts are built (and checked against the context) only when a method reads them.

    Example:
        >>> from lens_laai import PromptTemplate, fit
        >>> from lens_laai.analysis.prompts import AnalysisPrompts
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> iv = fit(model, task, layer=1, n_train=8, steps=3, progress=False).intervention
        >>> prompts = AnalysisPrompts(model, task, iv, PromptTemplate(), 4, 2, 2, 0, 32)
        >>> len(prompts.queries), prompts.dropped  # the k-shot prompts are not built yet
        (4, None)
        >>> prompts.clean[0].input_ids.shape == prompts.corrupt.input_ids.shape, prompts.n_patch, prompts.dropped
        (True, 2, 0)
    """

    def __init__(
        self,
        model: TransformerBridge,
        task: Task | TaskSplits,
        iv: HeadIntervention,
        template: PromptTemplate,
        n_prompts: int,
        shots: int,
        patching_prompts: int,
        seed: int,
        batch_size: int,
    ) -> None:
        test, self.train = select_split(task, "test", [iv])
        if shots < 2 or shots > len(self.train) - 1:
            raise TaskError(
                f"Label-deranged prompts need 2 ≤ shots ≤ n_train - 1 = {len(self.train) - 1}, got {shots}."
            )
        self.model, self.template, self.shots, self.seed, self.batch_size = model, template, shots, seed, batch_size
        self.patching_prompts = patching_prompts
        self.queries = test.subset(list(range(min(n_prompts, len(test)))))
        self.zero = model_batches(
            model,
            [template.render(x) for x, _ in self.queries.pairs],
            [template.target(y) for _, y in self.queries.pairs],
            batch_size,
            template,
        )
        self.clean_metric: float | None = None
        self.corrupt_metric: float | None = None

    @classmethod
    def build(cls, *args: Any) -> AnalysisPrompts:
        return cls(*args)

    @cached_property
    def _kshot(self) -> tuple[Batch, Batch, int]:
        clean_text, corrupt_text, targets = deranged_prompts(
            self.queries.pairs, self.train.pairs, self.shots, self.seed, self.template
        )
        tok, bos, n_ctx = self.model.tokenizer, self.template.prepend_bos, self.model.cfg.n_ctx
        kept = [i for i in range(len(targets)) if _length(tok, clean_text[i]) == _length(tok, corrupt_text[i])]
        if not kept:
            raise TaskError("No clean/corrupted prompt pair tokenises to equal lengths; patching needs aligned pairs.")
        texts = [[text[i] for i in kept] for text in (clean_text, corrupt_text)]
        clean, corrupt = (make_batch(tok, t, [targets[i] for i in kept], bos, n_ctx) for t in texts)
        device = self.model.cfg.device or "cpu"
        return clean.to(device), corrupt.to(device), len(targets) - len(kept)

    @property
    def clean(self) -> list[Batch]:
        return [self._kshot[0]]

    @property
    def corrupt(self) -> Batch:
        return self._kshot[1]

    @property
    def dropped(self) -> int | None:
        return self._kshot[2] if "_kshot" in self.__dict__ else None

    @property
    def n_patch(self) -> int:
        return max(1, min(self.patching_prompts, len(self._kshot[0])))

    @property
    def patch_clean(self) -> Batch:
        return _rows(self._kshot[0], self.n_patch)

    @property
    def patch_corrupt(self) -> Batch:
        return _rows(self._kshot[1], self.n_patch)

    @cached_property
    def pairs(self) -> list[tuple[Tensor, Tensor, int]]:
        clean, corrupt, _ = self._kshot
        return [
            (
                clean.input_ids[i][clean.attention_mask[i].bool()],
                corrupt.input_ids[i][corrupt.attention_mask[i].bool()],
                int(clean.target_ids[i]),
            )
            for i in range(len(clean))
        ]

    @cached_property
    def reference(self) -> list[Batch]:
        """Clean k-shot prompts of the training queries, with their real targets (mean ablation, FV's means)."""
        text, _, targets = deranged_prompts(
            self.train.pairs, self.train.pairs, self.shots, self.seed + 1, self.template
        )
        return model_batches(self.model, text, targets, self.batch_size, self.template)


def _length(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _rows(batch: Batch, n: int) -> Batch:
    keep = batch.attention_mask[:n].sum(0) > 0
    return Batch(
        batch.input_ids[:n][:, keep],
        batch.attention_mask[:n][:, keep],
        batch.target_ids[:n],
        batch.prompts[:n],
        batch.targets[:n],
        batch.target_tokens[:n],
    )
