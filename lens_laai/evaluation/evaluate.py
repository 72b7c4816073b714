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
from typing import Any, Literal, overload

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import TaskError
from lens_laai.fastpath import LayerRunner
from lens_laai.fastpath.scoring import score_logits
from lens_laai.interventions.protocol import Intervention
from lens_laai.models.bridge import last_position_hooks
from lens_laai.tasks.prompts import (
    Batch,
    PromptTemplate,
    encode_prompts,
    k_shot_prompts,
    model_batches,
)
from lens_laai.tasks.provenance import check_unseen, held_out, records_of
from lens_laai.tasks.task import Task, TaskSplits

SPLITS = ("train", "valid", "test", "all")


@dataclass
class EvalResult:
    """Accuracy over ``n`` examples and one table row per example.

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

    def __repr__(self) -> str:
        return f"EvalResult(accuracy={self.accuracy:.3f}, n={self.n}, seconds={self.seconds:.1f})"


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
    """``template`` if given, else the one the interventions were fitted with, else the default."""
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
    shots: int = 0,
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
    prompts, targets = k_shot_prompts(part, shots, demos, demo_seed, template)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    batches = model_batches(model, [prompts[i] for i in order], [targets[i] for i in order], batch_size, template)
    hooks = [hook for iv in ivs for hook in iv.fwd_hooks()] + last_position_hooks(model)
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
    return EvalResult(float(table["correct"].mean()), len(table), table, time.perf_counter() - start)


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
    by_layer: dict[int, list[int]] = {}
    for i, iv in enumerate(interventions):
        by_layer.setdefault(min(iv.layers) if iv.positions == "last" and iv.layers else -1, []).append(i)
    rows: dict[int, dict[str, Any]] = {}
    for layer, members in tqdm(by_layer.items(), desc="layers", disable=not progress):
        runner = LayerRunner(model, batches, max(layer, 0), fast and layer >= 0)
        for i in members:
            accuracy, ce = runner.scores(interventions[i].fwd_hooks())
            rows[i] = {"accuracy": accuracy, "mean_target_logprob": -ce}
    table = pd.DataFrame([rows[i] for i in range(len(interventions))])
    table.insert(0, "layers", [",".join(map(str, iv.layers)) for iv in interventions])
    table["n"] = len(part)
    return table


DeltaAt = Literal["prompt", "every_token"]


@overload
def generate(
    model: TransformerBridge,
    prompt: str,
    intervention: Intervention | None = None,
    max_new_tokens: int = 10,
    *,
    delta_at: DeltaAt = "prompt",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_past_kv_cache: bool = True,
    prepend_bos: bool = True,
    strict: bool = False,
) -> str: ...


@overload
def generate(
    model: TransformerBridge,
    prompt: list[str] | tuple[str, ...],
    intervention: Intervention | None = None,
    max_new_tokens: int = 10,
    *,
    delta_at: DeltaAt = "prompt",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_past_kv_cache: bool = True,
    prepend_bos: bool = True,
    strict: bool = False,
) -> list[str]: ...


@torch.no_grad()
def generate(
    model: TransformerBridge,
    prompt: str | Sequence[str],
    intervention: Intervention | None = None,
    max_new_tokens: int = 10,
    *,
    delta_at: DeltaAt = "prompt",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_past_kv_cache: bool = True,
    prepend_bos: bool = True,
    strict: bool = False,
) -> str | list[str]:
    """Continue ``prompt`` (one string, or a list generated as one left-padded batch).

    ``delta_at="prompt"`` (default) adds Δ at the last prompt token only, as in training; every
    later token sees it through the attention cache. ``"every_token"`` also adds it at each
    generated token. An intervention (or ablation) whose ``positions`` are ``"all"`` acts at every
    prompt and generated token; explicit positions index the left-padded prompt. Cached and
    uncached generation compute the same thing in every case.
    ``temperature=0`` is greedy; otherwise sample, optionally restricted by ``top_k`` / ``top_p``,
    reproducibly with ``seed``. Each row stops at the tokenizer's EOS.

    Example:
        >>> from lens_laai import generate
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> texts = generate(model, ["Q: hot\\nA:", "Q: up\\nA:"], max_new_tokens=2)  # greedy; pass an intervention to steer
        >>> len(texts), all(isinstance(t, str) for t in texts)
        (2, True)
    """
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    _check_generate_args(texts, max_new_tokens, delta_at, temperature, top_k, top_p)
    if intervention is not None:
        intervention.check_model(model, strict)
    ids, mask = encode_prompts(model.tokenizer, texts, prepend_bos, model.cfg.n_ctx, max_new_tokens)
    if (
        intervention is not None
        and isinstance(intervention.positions, tuple)
        and (min(intervention.positions) < 0 or max(intervention.positions) >= ids.shape[1])
    ):
        raise TaskError(
            f"generate needs an intervention's explicit positions inside the (left-padded) prompt, "
            f"0..{ids.shape[1] - 1}; got {intervention.positions}. Use positions='last' or 'all'."
        )
    device = model.cfg.device
    ids, mask = (ids.to(device), mask.to(device)) if device is not None else (ids, mask)
    generator = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    prompt_len, eos = ids.shape[1], model.tokenizer.eos_token_id
    done = torch.zeros(len(texts), dtype=torch.bool, device=ids.device)
    new: list[Tensor] = []
    cache = None
    for _ in range(max_new_tokens):
        hooks = _generation_hooks(intervention, delta_at, use_past_kv_cache, cache is None, prompt_len, ids.shape[1])
        with model.hooks(fwd_hooks=hooks):
            if use_past_kv_cache:
                step_ids = ids if cache is None else ids[:, -1:]
                logits, cache = model(
                    step_ids, attention_mask=mask, past_key_values=cache, return_type="logits_and_cache", use_cache=True
                )
            else:
                logits = model(ids, attention_mask=mask)
        token = _next_token(logits[:, -1].float(), temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, eos if eos is not None else 0), token)
        new.append(token)
        done |= token == eos if eos is not None else torch.zeros_like(done)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if bool(done.all()):
            break
    out = [_decode(model.tokenizer, [int(t[i]) for t in new], eos) for i in range(len(texts))]
    return out[0] if isinstance(prompt, str) else out


def _check_generate_args(
    texts: list[str], max_new_tokens: Any, delta_at: str, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise TaskError("generate needs a non-empty prompt string or a non-empty list of them.")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise TaskError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}.")
    if delta_at not in ("prompt", "every_token"):
        raise TaskError(f"delta_at must be 'prompt' or 'every_token', got {delta_at!r}.")
    if not temperature >= 0 or temperature == float("inf"):
        raise TaskError(f"temperature must be a finite number ≥ 0, got {temperature!r}.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise TaskError(f"top_k must be an integer ≥ 1, got {top_k!r}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise TaskError(f"top_p must be in (0, 1], got {top_p!r}.")


def _generation_hooks(
    iv: Intervention | None, delta_at: DeltaAt, cached: bool, first: bool, prompt_len: int, length: int
) -> list:
    if iv is None:
        return []
    if iv.positions == "all":
        return iv.fwd_hooks("all")  # under a cache each step sees only its new token: every position once
    if iv.positions != "last":
        return iv.fwd_hooks(iv.positions) if first or not cached else []
    if cached:
        return iv.fwd_hooks("last") if first or delta_at == "every_token" else []
    if delta_at == "every_token":
        return iv.fwd_hooks(tuple(range(prompt_len - 1, length)))
    return iv.fwd_hooks((prompt_len - 1,))


def _next_token(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _decode(tokenizer: Any, tokens: list[int], eos: int | None) -> str:
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens)
