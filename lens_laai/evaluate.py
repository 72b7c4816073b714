"""Evaluation: top-1 accuracy of the target's first token, a per-example table, and generation.

Example:
    >>> from lens_laai import evaluate
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> result = evaluate(tiny_model(), tiny_task(), shots=0, split="all")
    >>> result.n, list(result.table.columns)[:4]
    (24, ['input', 'target', 'prediction', 'correct'])
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from .fastpath import LayerRunner
from .intervention import HeadIntervention, Intervention
from .prompts import PromptTemplate, encode_prompts, iter_batches, k_shot_prompts
from .tasks import Task, TaskError, TaskSplits

SPLITS = ("train", "valid", "test", "all")


@dataclass
class EvalResult:
    """Accuracy over ``n`` examples and one table row per example."""

    accuracy: float
    n: int
    table: pd.DataFrame
    seconds: float

    def __repr__(self) -> str:
        return f"EvalResult(accuracy={self.accuracy:.3f}, n={self.n}, seconds={self.seconds:.1f})"


def select_split(
    task: Task | TaskSplits, split: str, intervention: Intervention | None = None,
    seed: int | None = None, n_train: int | None = None, n_valid: int | None = None,
) -> tuple[Task, Task]:
    """The evaluated part of ``task`` and the pool that k-shot demonstrations come from.

    Unless given, ``seed``/``n_train``/``n_valid`` come from the intervention's fit config, so
    a fitted intervention is scored on exactly its own held-out test split.
    """
    if split not in SPLITS:
        raise TaskError(f"split must be one of {SPLITS}, got {split!r}.")
    fit_cfg = (intervention.metadata.get("fit_config", {}) if intervention is not None else {}) or {}
    if isinstance(task, TaskSplits):
        splits = task
    elif split == "all":
        return task, task
    else:
        splits = task.split(
            fit_cfg.get("seed", 0) if seed is None else seed,
            fit_cfg.get("n_train", 20) if n_train is None else n_train,
            fit_cfg.get("n_valid", 40) if n_valid is None else n_valid,
            fit_cfg.get("n_test") if n_train is None and n_valid is None else None,
        )
    if split == "all":
        return Task(splits.test.name, splits.train.pairs + splits.valid.pairs + splits.test.pairs), splits.train
    return getattr(splits, split), splits.train


def evaluate(
    model: TransformerBridge,
    task: Task | TaskSplits,
    intervention: Intervention | None = None,
    shots: int = 0,
    split: str = "test",
    *,
    seed: int | None = None,
    n_train: int | None = None,
    n_valid: int | None = None,
    demo_seed: int = 0,
    batch_size: int = 32,
    template: PromptTemplate = PromptTemplate(),
    progress: bool = False,
) -> EvalResult:
    """Score ``model`` (with ``intervention`` applied, if given) on one split of ``task``.

    k-shot demonstrations are drawn from the train split. Returns accuracy and a table with
    ``input, target, prediction, correct, target_logprob, target_rank, prompt``.
    """
    start = time.perf_counter()
    part, demos = select_split(task, split, intervention, seed, n_train, n_valid)
    if not len(part):
        raise TaskError(f"The {split!r} split is empty; choose another split or larger task.")
    prompts, targets = k_shot_prompts(part, shots, demos, demo_seed, template)
    rows: list[dict[str, Any]] = []
    batches = list(iter_batches(model.tokenizer, prompts, targets, batch_size))
    if intervention is not None:
        intervention.check_model(model)
    hooks = intervention.fwd_hooks() if intervention is not None else []
    for batch in tqdm(batches, desc="evaluate", disable=not progress):
        with torch.no_grad():
            logits = model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)[:, -1]
        rows.extend(_rows(model, logits, batch))
    table = pd.DataFrame(rows)
    table.insert(0, "input", part.inputs)
    return EvalResult(float(table["correct"].mean()), len(table), table, time.perf_counter() - start)


def _rows(model: TransformerBridge, logits: Tensor, batch) -> list[dict[str, Any]]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    pred = logp.argmax(-1)
    target_lp = logp.gather(1, batch.target_ids[:, None])[:, 0]
    rank = (logp > target_lp[:, None]).sum(-1)
    return [
        {"target": batch.targets[i].strip(), "prediction": model.tokenizer.decode([int(pred[i])]),
         "correct": bool(pred[i] == batch.target_ids[i]), "target_logprob": float(target_lp[i]),
         "target_rank": int(rank[i]), "prompt": batch.prompts[i]}
        for i in range(len(batch))
    ]


@torch.no_grad()
def generate(
    model: TransformerBridge,
    prompt: str,
    intervention: Intervention | None = None,
    max_new_tokens: int = 10,
    every_token: bool = True,
    use_past_kv_cache: bool = True,
) -> str:
    """Greedy continuation of ``prompt`` with Δ at the last prompt token and, if ``every_token``,
    at every generated token too (the cached and uncached modes compute the same thing).
    """
    ids, mask = encode_prompts(model.tokenizer, [prompt])
    prompt_len = ids.shape[1]
    eos = model.tokenizer.eos_token_id
    new: list[int] = []
    cache = None
    for _ in range(max_new_tokens):
        if use_past_kv_cache:
            step_ids = ids if cache is None else ids[:, -1:]
            positions: Any = "last"
            active = intervention is not None and (cache is None or every_token)
            hooks = intervention.fwd_hooks(positions) if active else []
            with model.hooks(fwd_hooks=hooks):
                logits, cache = model(step_ids, attention_mask=mask, past_key_values=cache,
                                      return_type="logits_and_cache", use_cache=True)
        else:
            cur = ids.shape[1]
            positions = tuple(range(prompt_len - 1, cur)) if every_token else (prompt_len - 1,)
            hooks = intervention.fwd_hooks(positions) if intervention is not None else []
            logits = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks)
        token = int(logits[0, -1].argmax())
        if eos is not None and token == eos:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return model.tokenizer.decode(new)


def evaluate_many(
    model: TransformerBridge,
    task: Task | TaskSplits,
    interventions: Sequence[HeadIntervention],
    shots: int = 0,
    split: str = "test",
    *,
    seed: int = 0,
    n_train: int = 20,
    n_valid: int = 40,
    demo_seed: int = 0,
    batch_size: int = 32,
    template: PromptTemplate = PromptTemplate(),
    fast: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """Score many interventions on the same prompts: one row each (``accuracy``, ``mean_target_logprob``).

    Interventions acting at one layer's last token share one prefix pass per batch (the fast
    path of :mod:`lens_laai.fastpath`), so scoring a λ path or an α grid costs little more than
    scoring one. Others are scored with :func:`evaluate`.
    """
    part, demos = select_split(task, split, None, seed, n_train, n_valid)
    prompts, targets = k_shot_prompts(part, shots, demos, demo_seed, template)
    batches = list(iter_batches(model.tokenizer, prompts, targets, batch_size))
    rows: dict[int, dict[str, Any]] = {}
    by_layer: dict[int, list[int]] = {}
    for i, iv in enumerate(interventions):
        iv.check_model(model)
        if len(iv.layers) == 1 and iv.positions == "last":
            by_layer.setdefault(iv.layers[0], []).append(i)
        else:
            full = evaluate(model, TaskSplits(demos, Task(part.name, []), part, 0), iv, shots, "test",
                            demo_seed=demo_seed, batch_size=batch_size, template=template)
            rows[i] = {"accuracy": full.accuracy, "mean_target_logprob": float(full.table.target_logprob.mean())}
    for layer, members in tqdm(by_layer.items(), desc="layers", disable=not progress):
        runner = LayerRunner(model, batches, layer, fast)
        for i in members:
            rows[i] = _score_runner(runner, batches, interventions[i])
    table = pd.DataFrame([rows[i] for i in range(len(interventions))])
    table.insert(0, "layers", [",".join(map(str, iv.layers)) for iv in interventions])
    table["n"] = len(part)
    return table


@torch.no_grad()
def _score_runner(runner: LayerRunner, batches: list, iv: HeadIntervention) -> dict[str, float]:
    correct, logprob, n = 0, 0.0, 0
    for b, batch in enumerate(batches):
        logp = torch.log_softmax(runner.logits(b, iv.fwd_hooks()).float(), dim=-1)
        correct += int((logp.argmax(-1) == batch.target_ids).sum())
        logprob += float(logp.gather(1, batch.target_ids[:, None]).sum())
        n += len(batch)
    return {"accuracy": correct / n, "mean_target_logprob": logprob / n}
