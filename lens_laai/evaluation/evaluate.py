"""Evaluation: top-1 accuracy of the target's first token, a per-example table, and generation.

A fitted intervention is scored on its own held-out split: the split is reproduced from the
record the fit wrote (:mod:`lens_laai.tasks.provenance`), and no pair the fit saw is ever scored as a
test pair. The prompt template the intervention was fitted with is reused unless you pass one.

Example:
    >>> from lens_laai import evaluate
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> result = evaluate(tiny_model(), tiny_task(), shots=0, split="all")
    >>> result.n, list(result.table.columns)[:4]
    (24, ['input', 'target', 'prediction', 'correct'])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import TaskError
from lens_laai.fastpath import LayerRunner
from lens_laai.fastpath.scoring import score_logits
from lens_laai.interventions.mode import Mode
from lens_laai.interventions.positions import tail_of
from lens_laai.interventions.protocol import Intervention
from lens_laai.models.bridge import last_position_hooks
from lens_laai.tasks.prompts import (
    Batch,
    PromptTemplate,
    k_shot_prompts,
    model_batches,
)
from lens_laai.tasks.provenance import check_unseen, held_out, records_of
from lens_laai.tasks.task import Task, TaskSplits

SPLITS = ("train", "valid", "test", "all")


@dataclass
class EvalResult:
    """Accuracy over ``n`` examples and one table row per example; ``mode``: how the prompts were
    made and whether the interventions acted (``"zero-shot Δ"``, ``"5-shot prompting + Δ"``, …).

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> from lens_laai import evaluate
        >>> result = evaluate(model, task.split(seed=0, n_train=8))
        >>> type(result).__name__, result.n, float(result.table["correct"].mean()) == result.accuracy
        ('EvalResult', 16, True)
    """

    accuracy: float
    n: int
    table: pd.DataFrame
    seconds: float
    mode: str = ""

    def __repr__(self) -> str:
        mode = f", mode={self.mode!r}" if self.mode else ""
        return f"EvalResult(accuracy={self.accuracy:.3f}, n={self.n}{mode}, seconds={self.seconds:.1f})"


def select_split(
    task: Task | TaskSplits,
    split: str,
    interventions: Sequence[Intervention] = (),
    seed: int | None = None,
    n_train: int | None = None,
    n_valid: int | None = None,
) -> tuple[Task, Task]:
    """The evaluated part of ``task`` and the pool that k-shot demonstrations come from.

    A :class:`Task` is split the way the interventions' fits split it (explicit ``seed`` /
    ``n_train`` / ``n_valid`` must agree with that); without interventions, by those settings
    (default 0 / 20 / 0). The ``"test"`` part is refused if it holds a pair any fit saw.

    Example:
        >>> from lens_laai.evaluation.evaluate import select_split
        >>> from lens_laai.testing import tiny_task
        >>> task = tiny_task()
        >>> scored, demos = select_split(task, "test", n_train=8)
        >>> len(scored), len(demos), set(scored.pairs) & set(demos.pairs)
        (16, 8, set())
        >>> [len(part) for part in select_split(task.split(0, 8, 4), "valid")]  # already split: its valid part
        [4, 8]
        >>> len(select_split(task, "all")[0])
        24
        >>> select_split(task, "dev")
        Traceback (most recent call last):
        ...
        lens_laai.errors.TaskError: split must be one of ('train', 'valid', 'test', 'all'), got 'dev'.
    """
    if split not in SPLITS:
        raise TaskError(f"split must be one of {SPLITS}, got {split!r}.")
    records = records_of(iv.metadata for iv in interventions)
    if isinstance(task, TaskSplits):
        if any(v is not None for v in (seed, n_train, n_valid)):
            raise TaskError("seed / n_train / n_valid split a Task; these TaskSplits are already split. Drop them.")
        splits = task
    elif split == "all":
        return task, task
    elif not records and (legacy := _legacy_split(interventions)) is not None:
        given = {"seed": seed, "n_train": n_train, "n_valid": n_valid}
        if any(v is not None and v != legacy[k] for k, v in given.items()):
            raise TaskError(
                f"{given} disagree with the split this intervention records in its fit_config ({legacy}); drop them."
            )
        splits = held_out(task, [], legacy["seed"], legacy["n_train"], legacy["n_valid"], legacy["n_test"])
    else:
        splits = held_out(task, records, seed, n_train, n_valid)
    if split == "all":
        return Task(splits.test.name, splits.train.pairs + splits.valid.pairs + splits.test.pairs), splits.train
    part = getattr(splits, split)
    if split == "test":
        check_unseen(part, records)
    return part, splits.train


def _legacy_split(interventions: Sequence[Intervention]) -> dict[str, Any] | None:
    """The split recorded by saves made before data records existed (``fit_config`` only), if all agree."""
    configs = [iv.metadata.get("fit_config") for iv in interventions]
    found = [
        {k: c.get(k) for k in ("seed", "n_train", "n_valid", "n_test")}
        for c in configs
        if isinstance(c, dict) and "seed" in c
    ]
    if not found:
        return None
    if any(f != found[0] for f in found):
        raise TaskError("These interventions record different splits in their fit_config; pass explicit TaskSplits.")
    return found[0]


def resolve_template(template: PromptTemplate | None, interventions: Sequence[Intervention]) -> PromptTemplate:
    """``template`` if given, else the one the interventions were fitted with, else the default.

    Example:
        >>> import torch
        >>> from lens_laai import HeadIntervention
        >>> from lens_laai.evaluation.evaluate import resolve_template
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model
        >>> resolve_template(None, []).render("hot")
        'Q: hot\\nA:'
        >>> iv = HeadIntervention.from_deltas(tiny_model(), {1: torch.zeros(4, 16)})
        >>> iv.metadata["template"] = PromptTemplate.verbatim().to_json()  # as a fit with verbatim prompts records
        >>> resolve_template(None, [iv]).render("hot"), resolve_template(PromptTemplate(), [iv]).render("hot")
        ('hot', 'Q: hot\\nA:')
        >>> other = HeadIntervention.from_deltas(tiny_model(), {1: torch.zeros(4, 16)})
        >>> other.metadata["template"] = PromptTemplate().to_json()
        >>> resolve_template(None, [iv, other])
        Traceback (most recent call last):
        ...
        lens_laai.errors.TaskError: These interventions were fitted with different prompt templates; pass template= explicitly.
    """
    if template is not None:
        return template
    recorded = [iv.metadata["template"] for iv in interventions if "template" in iv.metadata]
    if not recorded:
        return PromptTemplate()
    if any(t != recorded[0] for t in recorded):
        raise TaskError("These interventions were fitted with different prompt templates; pass template= explicitly.")
    return PromptTemplate.from_json(recorded[0])


def evaluate(
    model: TransformerBridge,
    task: Task | TaskSplits,
    intervention: Intervention | Sequence[Intervention] | None = None,
    shots: int | None = None,
    split: str = "test",
    *,
    seed: int | None = None,
    n_train: int | None = None,
    n_valid: int | None = None,
    demo_seed: int = 0,
    batch_size: int = 32,
    template: PromptTemplate | None = None,
    progress: bool = False,
    strict: bool = False,
) -> EvalResult:
    """Score ``model`` (with ``intervention`` applied, if given) on one split of ``task``.

    ``intervention`` may be a list (e.g. ``[iv, ablation]``): their hooks act together, in order.
    k-shot demonstrations are drawn from the train split. Returns accuracy and a table with
    ``input, target, prediction, correct, target_logprob, target_rank, prompt``.

    ``shots=None`` (default) uses the mode a fitted intervention records (:mod:`lens_laai.interventions.mode`):
    the fit chose, on its own pairs, among zero-shot Δ, k-shot prompting alone and k-shot prompting + Δ,
    so this scores what the fit recommends (``result.mode`` says which). ``shots=0`` is the paper's
    zero-shot intervention; ``shots=k`` adds the interventions to k-shot prompts. Without a recorded
    mode (no intervention, several, or a sum of fits) ``None`` means 0.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> from lens_laai import evaluate
        >>> splits = task.split(seed=0, n_train=8)
        >>> result = evaluate(model, splits, shots=2)  # 2-shot prompting; pass an intervention to apply it
        >>> result.n == len(splits.test), 0.0 <= result.accuracy <= 1.0
        (True, True)
        >>> result.table.columns.tolist()[:4]
        ['input', 'target', 'prediction', 'correct']
    """
    start = time.perf_counter()
    ivs = _as_list(intervention)
    for iv in ivs:
        iv.check_model(model, strict)
    part, demos = select_split(task, split, ivs, seed, n_train, n_valid)
    if not len(part):
        raise TaskError(f"The {split!r} split is empty; choose another split or a larger task.")
    template = resolve_template(template, ivs)
    given = shots
    shots, acting, mode = resolve_mode(ivs, shots)
    try:
        prompts, targets = k_shot_prompts(part, shots, demos, demo_seed, template)
    except TaskError as err:
        if given is not None:
            raise
        raise TaskError(
            f"{err} The {shots} demonstrations per prompt are this intervention's recorded mode ({mode}); "
            "pass shots=0 for its zero-shot Δ, or a smaller shots."
        ) from None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    batches = model_batches(model, [prompts[i] for i in order], [targets[i] for i in order], batch_size, template)
    hooks = [hook for iv in acting for hook in iv.fwd_hooks()] + last_position_hooks(model)
    rows: list[dict[str, Any]] = []
    for batch in tqdm(batches, desc="evaluate", disable=not progress):
        with torch.no_grad():
            logits = model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)[:, -1]
        rows.extend(_rows(model, logits, batch))
    in_order: list[dict[str, Any]] = [{}] * len(rows)
    for row, i in zip(rows, order):
        in_order[i] = row
    table = pd.DataFrame(in_order)
    table.insert(0, "input", part.inputs)
    return EvalResult(float(table["correct"].mean()), len(table), table, time.perf_counter() - start, mode)


def resolve_mode(ivs: Sequence[Intervention], shots: int | None) -> tuple[int, list[Intervention], str]:
    """(demonstrations per prompt, the interventions that act, the mode's name) for ``evaluate``'s ``shots``.

    Example:
        >>> from lens_laai import HeadIntervention
        >>> from lens_laai.evaluation.evaluate import resolve_mode
        >>> from lens_laai.testing import tiny_model
        >>> iv = HeadIntervention.zeros(tiny_model(), 1)
        >>> iv.metadata["mode"] = {"shots": 3, "delta": False}
        >>> resolve_mode([iv], None)[0::2], resolve_mode([iv], 0)[0::2]
        ((3, '3-shot prompting'), (0, 'zero-shot Δ'))
    """
    if shots is not None:
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise TaskError(f"shots must be an integer ≥ 0 or None (the fit's recorded mode), got {shots!r}.")
        return shots, list(ivs), Mode(shots, bool(ivs)).name if ivs else f"{shots}-shot prompting"
    recorded = Mode.of(ivs[0].metadata) if len(ivs) == 1 else None
    if recorded is None:
        return 0, list(ivs), "zero-shot Δ" if ivs else "zero-shot prompting"
    return recorded.shots, list(ivs) if recorded.delta else [], recorded.name


def _rows(model: TransformerBridge, logits: Tensor, batch: Batch) -> list[dict[str, Any]]:
    s = score_logits(logits, batch.target_ids)
    return [
        {
            "target": batch.targets[i].strip(),
            "prediction": model.tokenizer.decode([int(s.prediction[i])]),
            "correct": bool(s.correct[i]),
            "target_logprob": float(s.target_logprob[i]),
            "target_rank": int(s.rank[i]),
            "prompt": batch.prompts[i],
        }
        for i in range(len(batch))
    ]


def _as_list(intervention: Intervention | Sequence[Intervention] | None) -> list[Intervention]:
    """``evaluate``'s ``intervention``: none, one, or several acting together, as a list."""
    if intervention is None:
        return []
    if isinstance(intervention, Sequence):
        return list(intervention)
    return [intervention]


def evaluate_many(
    model: TransformerBridge,
    task: Task | TaskSplits,
    interventions: Sequence[Intervention],
    shots: int = 0,
    split: str = "test",
    *,
    seed: int | None = None,
    n_train: int | None = None,
    n_valid: int | None = None,
    demo_seed: int = 0,
    batch_size: int = 32,
    template: PromptTemplate | None = None,
    fast: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """Score many interventions on the same prompts: one row each (``accuracy``, ``mean_target_logprob``).

    Any intervention of the protocol works. Those acting at the last token share one prefix
    pass per batch and layer (the fast path of :mod:`lens_laai.fastpath`), so scoring a λ path
    or an α grid costs little more than scoring one. The split must be held out for all of them.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> from lens_laai import HeadIntervention, evaluate_many
        >>> splits = task.split(seed=0, n_train=8)
        >>> iv = HeadIntervention.zeros(model, 1)
        >>> table = evaluate_many(model, splits, [iv, 2 * iv])
        >>> len(table), "accuracy" in table.columns
        (2, True)
    """
    for iv in interventions:
        iv.check_model(model)
    part, demos = select_split(task, split, interventions, seed, n_train, n_valid)
    if not len(part):
        raise TaskError(f"The {split!r} split is empty; choose another split or a larger task.")
    template = resolve_template(template, interventions)
    prompts, targets = k_shot_prompts(part, shots, demos, demo_seed, template)
    batches = model_batches(model, prompts, targets, batch_size, template)
    by_layer: dict[tuple[int, int], list[int]] = {}
    for i, iv in enumerate(interventions):
        tail = tail_of(iv.positions)
        by_layer.setdefault((min(iv.layers), tail) if tail and iv.layers else (-1, 1), []).append(i)
    rows: dict[int, dict[str, Any]] = {}
    for (layer, tail), members in tqdm(by_layer.items(), desc="layers", disable=not progress):
        runner = LayerRunner(model, batches, max(layer, 0), fast and layer >= 0, tail=tail)
        for i in members:
            accuracy, ce = runner.scores(interventions[i].fwd_hooks())
            rows[i] = {"accuracy": accuracy, "mean_target_logprob": -ce}
    table = pd.DataFrame([rows[i] for i in range(len(interventions))])
    table.insert(0, "layers", [",".join(map(str, iv.layers)) for iv in interventions])
    table["n"] = len(part)
    return table
