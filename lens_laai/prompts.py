"""Prompts: templates, k-shot construction, and left-padded batches with target token ids.

The target of a prompt is its output with a leading space (``" cold"`` after ``"Q: hot\\nA:"``);
accuracy and the fitting loss use its first token. Batches are left-padded so that every
row's last prompt token sits at position ``-1``, where the intervention acts.

Example:
    >>> from lens_laai.prompts import PromptTemplate
    >>> PromptTemplate().render("hot", demos=[("big", "small")])
    'Q: big\\nA: small\\n\\nQ: hot\\nA:'
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from .tasks import Pair, Task, TaskError


@dataclass(frozen=True)
class PromptTemplate:
    """How a query and its demonstrations become text."""

    query: str = "Q: {input}\nA:"
    demo: str = "Q: {input}\nA: {output}"
    separator: str = "\n\n"
    target_prefix: str = " "

    def render(self, x: str, demos: Sequence[Pair] = ()) -> str:
        parts = [self.demo.format(input=a, output=b) for a, b in demos]
        return self.separator.join([*parts, self.query.format(input=x)])

    def target(self, y: str) -> str:
        return self.target_prefix + y


@dataclass
class Batch:
    """Left-padded prompts with the first target token of each row."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    target_ids: Int[Tensor, " batch"]
    prompts: list[str]
    targets: list[str]
    target_tokens: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.target_ids.to(device),
            self.prompts, self.targets, self.target_tokens,
        )


def k_shot_prompts(
    task: Task,
    shots: int = 0,
    demos: Task | None = None,
    seed: int = 0,
    template: PromptTemplate = PromptTemplate(),
) -> tuple[list[str], list[str]]:
    """Render every pair of ``task`` as a prompt with ``shots`` demonstrations.

    Demonstrations are drawn per prompt (seeded) from ``demos`` (default: ``task`` itself),
    never including the query pair. Returns ``(prompts, targets)``.
    """
    if shots < 0:
        raise TaskError(f"shots must be ≥ 0, got {shots}.")
    pool = (demos if demos is not None else task).pairs
    rng = random.Random(seed)
    prompts, targets = [], []
    for x, y in task.pairs:
        chosen: list[Pair] = []
        if shots:
            candidates = [p for p in pool if p[0] != x]
            if len(candidates) < shots:
                raise TaskError(
                    f"{shots}-shot prompts need {shots} demonstrations other than the query; the pool "
                    f"has {len(candidates)}. Use fewer shots or more training pairs."
                )
            chosen = rng.sample(candidates, shots)
        prompts.append(template.render(x, chosen))
        targets.append(template.target(y))
    return prompts, targets


def target_token_ids(tokenizer, target: str) -> list[int]:
    """Token ids of ``target`` (already carrying its leading space); an empty result is an error."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TaskError(f"Target {target!r} tokenises to nothing; remove that pair or fix its output.")
    return list(ids)


def encode_prompts(
    tokenizer, prompts: Sequence[str], prepend_bos: bool = True
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Tokenise and left-pad ``prompts``; returns ``(input_ids, attention_mask)``."""
    bos = tokenizer.bos_token_id if prepend_bos else None
    rows = [([bos] if bos is not None else []) + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(not r for r in rows):
        raise TaskError("A prompt tokenises to nothing; check the template and inputs.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def make_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str], prepend_bos: bool = True) -> Batch:
    """A left-padded batch plus the first token id of every target."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets.")
    ids, mask = encode_prompts(tokenizer, prompts, prepend_bos)
    tokens = [target_token_ids(tokenizer, t) for t in targets]
    first = torch.tensor([t[0] for t in tokens], dtype=torch.long)
    return Batch(ids, mask, first, list(prompts), list(targets), tokens)


def iter_batches(
    tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32, prepend_bos: bool = True
) -> Iterator[Batch]:
    """Consecutive batches of at most ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    for start in range(0, len(prompts), batch_size):
        yield make_batch(tokenizer, prompts[start : start + batch_size], targets[start : start + batch_size], prepend_bos)
