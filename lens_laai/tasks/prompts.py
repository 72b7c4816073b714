"""Prompts: templates, k-shot construction, and left-padded batches with target token ids.

The target of a prompt is its output with a leading space (``" cold"`` after ``"Q: hot\\nA:"``);
accuracy and the fitting loss use its first token. Batches are left-padded so that every
row's last prompt token sits at position ``-1``, where the intervention acts.

Example:
    >>> from lens_laai.tasks.prompts import PromptTemplate
    >>> PromptTemplate().render("hot", demos=[("big", "small")])
    'Q: big\\nA: small\\n\\nQ: hot\\nA:'
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from lens_laai.errors import ModelError, TaskError
from lens_laai.tasks.task import Pair, Task


@dataclass(frozen=True)
class PromptTemplate:
    r"""How a query and its demonstrations become text, and how a target follows it.

    The default is the Function Vectors format (``Q: {input}\nA:``, targets after a space).
    :meth:`verbatim` uses your strings unchanged (prompts you formatted yourself, targets with
    whatever leading space they need); :meth:`chat` wraps each query in the tokenizer's chat
    template. The template is recorded in a fitted intervention, and evaluation reuses it.

    Example:
        >>> from lens_laai import PromptTemplate
        >>> template = PromptTemplate()
        >>> template.render("hot", demos=[("up", "down")]), template.target("cold")
        ('Q: up\nA: down\n\nQ: hot\nA:', ' cold')
        >>> PromptTemplate(query="Word: {input}\nOpposite:").render("hot")
        'Word: hot\nOpposite:'
    """

    query: str = "Q: {input}\nA:"
    demo: str = "Q: {input}\nA: {output}"
    separator: str = "\n\n"
    target_prefix: str = " "
    prepend_bos: bool = True

    def render(self, x: str, demos: Sequence[Pair] = ()) -> str:
        return self.prefix(demos) + self.query.format(input=x)

    def prefix(self, demos: Sequence[Pair]) -> str:
        """The text before the query: each demonstration and a separator (``""`` without demonstrations)."""
        return "".join(self.demo.format(input=a, output=b) + self.separator for a, b in demos)

    def target(self, y: str) -> str:
        return self.target_prefix + y

    @classmethod
    def verbatim(cls) -> PromptTemplate:
        """Prompts and targets exactly as given (a demonstration is prompt + target)."""
        return cls(query="{input}", demo="{input}{output}", separator="\n\n", target_prefix="")

    @classmethod
    def chat(cls, tokenizer: Any, system: str | None = None, target_prefix: str = "") -> PromptTemplate:
        """Each query as one user turn of ``tokenizer``'s chat template, ending where the assistant answers.

        The chat template supplies its own special tokens, so no BOS is prepended.
        """
        if getattr(tokenizer, "chat_template", None) is None:
            raise TaskError("This tokenizer has no chat template; use PromptTemplate() or PromptTemplate.verbatim().")
        marker = "\x00INPUT\x00"
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": marker}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        query = text.replace("{", "{{").replace("}", "}}").replace(marker, "{input}")
        return cls(query=query, demo=query + "{output}", separator="", target_prefix=target_prefix, prepend_bos=False)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> PromptTemplate:
        try:
            return cls(**data)
        except TypeError as err:
            raise TaskError(f"A recorded prompt template is malformed ({err}): {data!r}") from None


@dataclass
class Batch:
    """Left-padded prompts with the first target token of each row.

    Example:
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model
        >>> batch = model_batches(tiny_model(), ["Q: hot\\nA:", "Q: big\\nA:"], [" cold", " small"])[0]
        >>> len(batch), batch.input_ids.shape == batch.attention_mask.shape, batch.target_ids.shape[0]
        (2, True, 2)
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    target_ids: Int[Tensor, " batch"]
    prompts: list[str]
    targets: list[str]
    target_tokens: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_ids.to(device),
            self.prompts,
            self.targets,
            self.target_tokens,
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

    Example:
        >>> from lens_laai import Task
        >>> from lens_laai.tasks.prompts import k_shot_prompts
        >>> task = Task.from_pairs([("hot", "cold"), ("up", "down"), ("big", "small")])
        >>> prompts, targets = k_shot_prompts(task, shots=1, seed=0)
        >>> prompts[0].endswith("Q: hot\\nA:"), targets
        (True, [' cold', ' down', ' small'])
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
    """Token ids of ``target`` (already carrying its leading space); an empty result is an error.

    Example:
        >>> from lens_laai.tasks.prompts import target_token_ids
        >>> from lens_laai.testing import tiny_model
        >>> ids = target_token_ids(tiny_model().tokenizer, " cold")
        >>> len(ids) >= 1
        True
    """
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TaskError(f"Target {target!r} tokenises to nothing; remove that pair or fix its output.")
    return list(ids)


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0.

    Example:
        >>> from types import SimpleNamespace
        >>> from lens_laai.tasks.prompts import pad_id
        >>> from lens_laai.testing import tiny_tokenizer
        >>> pad_id(tiny_tokenizer())
        0
        >>> pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)), pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))
        (2, 0)
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad token rows into ``(input_ids, attention_mask)``: every row ends at position -1.

    Example:
        >>> from lens_laai.tasks.prompts import left_pad
        >>> ids, mask = left_pad([[5, 6, 7], [8]], pad=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], prepend_bos: bool = True, max_tokens: int | None = None, reserve: int = 0
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Tokenise and left-pad ``prompts``; refuse any that, with ``reserve`` more tokens, exceed ``max_tokens``.

    Example:
        >>> from lens_laai.tasks.prompts import encode_prompts
        >>> from lens_laai.testing import tiny_model
        >>> ids, mask = encode_prompts(tiny_model().tokenizer, ["Q: hot\\nA:", "Q: up\\nA:"])
        >>> ids.shape == mask.shape, bool(mask[:, -1].all())  # left-padded: every row ends at -1
        (True, True)
    """
    bos = tokenizer.bos_token_id if prepend_bos else None
    rows = [([bos] if bos is not None else []) + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(not r for r in rows):
        raise TaskError("A prompt tokenises to nothing; check the template and inputs.")
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    if max_tokens is not None and len(rows[longest]) + reserve > max_tokens:
        extra = f" plus {reserve} target or generated tokens" if reserve else ""
        raise ModelError(
            f"A prompt is {len(rows[longest])} tokens long{extra}, but the model's context holds {max_tokens} "
            f"(prompt starts {prompts[longest][:40]!r}). Use shorter inputs, fewer demonstrations or fewer new tokens."
        )
    return left_pad(rows, pad_id(tokenizer))


def make_batch(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    prepend_bos: bool = True,
    max_tokens: int | None = None,
) -> Batch:
    """A left-padded batch plus the token ids of every target (prompt + target must fit ``max_tokens``).

    Example:
        >>> from lens_laai.tasks.prompts import make_batch
        >>> from lens_laai.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> batch = make_batch(tok, ["Q: hot\\nA:", "up:"], [" cold", " down"])
        >>> batch.input_ids.shape, batch.attention_mask.tolist()
        (torch.Size([2, 7]), [[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
        >>> tok.convert_ids_to_tokens(batch.target_ids.tolist()), batch.target_tokens == [[365], [391]]
        (['Ġcold', 'Ġdown'], True)
        >>> make_batch(tok, ["Q: hot\\nA:"], [" cold", " down"])
        Traceback (most recent call last):
        ...
        ValueError: 1 prompts but 2 targets.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets.")
    tokens = [target_token_ids(tokenizer, t) for t in targets]
    ids, mask = encode_prompts(tokenizer, prompts, prepend_bos, max_tokens, max(len(t) for t in tokens) - 1)
    first = torch.tensor([t[0] for t in tokens], dtype=torch.long)
    return Batch(ids, mask, first, list(prompts), list(targets), tokens)


def iter_batches(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
    prepend_bos: bool = True,
    max_tokens: int | None = None,
) -> Iterator[Batch]:
    """Consecutive batches of at most ``batch_size`` rows.

    Example:
        >>> from lens_laai.tasks.prompts import iter_batches
        >>> from lens_laai.testing import tiny_tokenizer
        >>> prompts, targets = ["Q: hot\\nA:", "Q: up\\nA:", "Q: wet\\nA:"], [" cold", " down", " dry"]
        >>> [b.prompts for b in iter_batches(tiny_tokenizer(), prompts, targets, batch_size=2)]
        [['Q: hot\\nA:', 'Q: up\\nA:'], ['Q: wet\\nA:']]
        >>> next(iter_batches(tiny_tokenizer(), prompts, targets, batch_size=0))
        Traceback (most recent call last):
        ...
        lens_laai.errors.TaskError: batch_size must be an integer ≥ 1, got 0.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TaskError(f"batch_size must be an integer ≥ 1, got {batch_size!r}.")
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        yield make_batch(tokenizer, prompts[start:end], targets[start:end], prepend_bos, max_tokens)


def model_batches(
    model: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
    template: PromptTemplate | None = None,
) -> list[Batch]:
    """Batches for ``model``: its tokenizer, its context length as the limit, on its device.

    Example:
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model
        >>> batches = model_batches(tiny_model(), ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"], batch_size=1)
        >>> len(batches), batches[0].input_ids.shape[0]
        (2, 1)
    """
    prepend_bos = template.prepend_bos if template is not None else True
    device = model.cfg.device
    return [
        b.to(device) if device is not None else b
        for b in iter_batches(model.tokenizer, prompts, targets, batch_size, prepend_bos, model.cfg.n_ctx)
    ]
