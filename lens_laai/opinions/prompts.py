"""Survey questions as prompts, and the model's distribution over their answer options.

A question becomes ``Question: {q}\\nA. {opt1}\\nB. {opt2}\\n...\\nAnswer:`` (every option listed,
refusal-type ones last). The model's answer distribution is read at the last position as in
OpinionQA's ``get_probabilities``: for each option letter, the larger of the next-token
probabilities of ``" A"`` and ``"A"`` (a variant that is not one token is skipped), then
renormalised over the ordinal options; the refusal options' share of the letters' mass is
reported apart. The persona prompt prefixes ``Answer the following question as if {persona}.``
(OpinionQA's steer-portray style); few-shot prompts put answered questions before the query.

Example:
    >>> from lens_laai.opinions.prompts import OpinionPrompt
    >>> from lens_laai.opinions.survey import SurveyQuestion
    >>> q = SurveyQuestion("q1", "Is it good?", ("Yes", "No"), (1.0, 2.0), ("Refused",))
    >>> print(OpinionPrompt().render(q, demos=[(q, 1)], persona="you were a woman"))
    Answer the following question as if you were a woman.
    <BLANKLINE>
    Question: Is it good?
    A. Yes
    B. No
    C. Refused
    Answer: B
    <BLANKLINE>
    Question: Is it good?
    A. Yes
    B. No
    C. Refused
    Answer:
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_laai.errors import TaskError
from lens_laai.opinions.survey import SurveyQuestion
from lens_laai.tasks.prompts import Batch, model_batches

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class OpinionPrompt:
    """How a question (with optional persona and answered demonstrations) becomes text; recorded in fits.

    Example:
        >>> from lens_laai.opinions.prompts import OpinionPrompt
        >>> from lens_laai.opinions.survey import toy_survey
        >>> print(OpinionPrompt().render(toy_survey().questions["Q0"]))
        Question: How much hot?
        A. More
        B. Same
        C. Less
        Answer:
    """

    query: str = "Question: {question}\n{options}\nAnswer:"
    option: str = "{letter}. {text}"
    persona: str = "Answer the following question as if {persona}.\n\n"
    separator: str = "\n\n"
    answer_prefix: str = " "
    prepend_bos: bool = True

    def render(
        self, question: SurveyQuestion, demos: Sequence[tuple[SurveyQuestion, int]] = (), persona: str | None = None
    ) -> str:
        """The prompt for ``question``; ``demos`` are (question, index of the option answered)."""
        parts = [self._block(q) + self.answer_prefix + LETTERS[i] for q, i in demos]
        text = self.separator.join([*parts, self._block(question)])
        return (self.persona.format(persona=persona) if persona else "") + text

    def _block(self, q: SurveyQuestion) -> str:
        if len(q.all_options) > len(LETTERS):
            raise TaskError(
                f"question {q.key!r} has {len(q.all_options)} options; at most {len(LETTERS)} are supported."
            )
        options = "\n".join(self.option.format(letter=LETTERS[i], text=t) for i, t in enumerate(q.all_options))
        return self.query.format(question=q.text, options=options)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> OpinionPrompt:
        try:
            return cls(**data)
        except TypeError as err:
            raise TaskError(f"A recorded survey prompt format is malformed ({err}): {data!r}") from None


def letter_tokens(tokenizer: Any, n: int, prefix: str = " ") -> Int[Tensor, "n 2"]:
    """Token ids of ``prefix + letter`` and ``letter`` for the first ``n`` letters; -1 where not one token.

    Raises :class:`TaskError` if a letter has neither single-token form, or two letters share one.

    Example:
        >>> from lens_laai.opinions.prompts import letter_tokens
        >>> from lens_laai.testing import tiny_tokenizer
        >>> tokenizer = tiny_tokenizer()
        >>> ids = letter_tokens(tokenizer, 3)  # [letter, (" X", "X")]; -1: not one token
        >>> ids[:, 0].tolist(), [tokenizer.decode([int(i)]) for i in ids[:, 1]]
        ([-1, -1, -1], ['A', 'B', 'C'])
    """
    out = torch.full((n, 2), -1, dtype=torch.long)
    for i, letter in enumerate(LETTERS[:n]):
        for j, text in enumerate((prefix + letter, letter)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                out[i, j] = ids[0]
        if (out[i] < 0).all():
            raise TaskError(
                f"Neither {prefix + letter!r} nor {letter!r} is a single token of this tokenizer, so the "
                "answer distribution cannot be read; use a tokenizer with single-token option letters."
            )
    used = out[out >= 0].tolist()
    if len(used) != len(set(used)):
        raise TaskError("Two option letters share a token id; the answer distribution would be ambiguous.")
    return out


@dataclass
class QuestionBatch:
    """A batch of prompts with everything needed to score the answer distribution at the last token.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai.opinions.prompts import OpinionPrompt, question_batches
        >>> from lens_laai.testing import tiny_model
        >>> qs = [survey.questions["Q0"], survey.questions["Q1"]]  # 3 ordinal options; 2 and a refusal
        >>> (qb,) = question_batches(tiny_model(), qs, [OpinionPrompt().render(q) for q in qs])
        >>> qb.n_ordinal.tolist(), qb.n_options.tolist(), qb.gaps.tolist(), qb.span.tolist()
        ([3, 2], [3, 3], [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], [2.0, 1.0])
    """

    batch: Batch
    keys: list[str]
    n_ordinal: Int[Tensor, " b"]
    n_options: Int[Tensor, " b"]
    target: Float[Tensor, "b k"]  # 0 beyond the ordinal options
    order: Int[Tensor, "b k"]  # option indices sorted by ordinal value (padding last)
    gaps: Float[Tensor, "b k"]  # distance to the next sorted ordinal value (0 at the end)
    span: Float[Tensor, " b"]  # max ordinal − min ordinal

    def __len__(self) -> int:
        return len(self.keys)


def question_batches(
    model: Any,
    questions: Sequence[SurveyQuestion],
    prompts: Sequence[str],
    targets: Sequence[np.ndarray] | None = None,
    batch_size: int = 16,
    prepend_bos: bool = True,
) -> list[QuestionBatch]:
    """Left-padded batches of ``prompts`` (one per question) with padded option tensors.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai.opinions.prompts import OpinionPrompt, question_batches
        >>> from lens_laai.testing import tiny_model
        >>> qs = [survey.questions[k] for k in ("Q0", "Q1", "Q2")]
        >>> batches = question_batches(tiny_model(), qs, [OpinionPrompt().render(q) for q in qs], batch_size=2)
        >>> [b.keys for b in batches], batches[0].target[1].tolist()  # no targets given: uniform over the ordinal options
        ([['Q0', 'Q1'], ['Q2']], [0.5, 0.5, 0.0])
    """
    from lens_laai.tasks.prompts import PromptTemplate

    template = PromptTemplate(prepend_bos=prepend_bos)
    first = LETTERS[0]  # model_batches needs a target string; we read the letters ourselves
    batches = model_batches(model, list(prompts), [first] * len(prompts), batch_size, template)
    k = max(len(q.all_options) for q in questions)
    out, start = [], 0
    for batch in batches:
        qs = questions[start : start + len(batch)]
        ts = (
            targets[start : start + len(batch)]
            if targets is not None
            else [np.full(len(q.options), 1 / len(q.options)) for q in qs]
        )
        start += len(batch)
        target = torch.zeros(len(qs), k)
        order = torch.zeros(len(qs), k, dtype=torch.long)
        gaps = torch.zeros(len(qs), k)
        for i, (q, t) in enumerate(zip(qs, ts)):
            target[i, : len(q.options)] = torch.as_tensor(np.asarray(t, dtype=np.float64), dtype=torch.float32)
            ranks = sorted(range(len(q.options)), key=lambda j: q.ordinal[j])
            order[i] = torch.tensor(ranks + list(range(len(q.options), k)))
            values = [q.ordinal[j] for j in ranks]
            gaps[i, : len(values) - 1] = torch.tensor(np.diff(values), dtype=torch.float32)
        out.append(
            QuestionBatch(
                batch,
                [q.key for q in qs],
                torch.tensor([len(q.options) for q in qs]),
                torch.tensor([len(q.all_options) for q in qs]),
                target,
                order,
                gaps,
                torch.tensor([q.span for q in qs], dtype=torch.float32),
            )
        )
    return out


def option_log_probs(logits: Float[Tensor, "b vocab"], letters: Int[Tensor, "k 2"]) -> Float[Tensor, "b k"]:
    """Per option letter, ``max(log p(" X"), log p("X"))`` of the next token (OpinionQA's reading).

    Example:
        >>> import torch
        >>> from lens_laai.opinions.prompts import option_log_probs
        >>> letters = torch.tensor([[5, 6], [7, -1]])  # option A: ids 5 (" A") and 6 ("A"); option B: id 7 only
        >>> logits = torch.zeros(1, 10)
        >>> logits[0, 6] = 2.0
        >>> [round(p, 3) for p in option_log_probs(logits, letters).exp()[0].tolist()]  # e²/(e²+9), 1/(e²+9)
        [0.451, 0.061]
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp[:, letters.clamp(min=0).to(logits.device)]  # [b, k, 2]
    picked = picked.masked_fill((letters < 0).to(logits.device), float("-inf"))
    return picked.max(dim=-1).values


def answer_distribution(option_logp: Float[Tensor, "b k"], qb: QuestionBatch) -> tuple[Tensor, Tensor]:
    """``(log D_M, R_M)``: log-distribution over the ordinal options (−inf beyond them), refusal share.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> import torch
        >>> from lens_laai.opinions.prompts import OpinionPrompt, answer_distribution, question_batches
        >>> from lens_laai.testing import tiny_model
        >>> q = survey.questions["Q1"]  # Yes / No, then Refused
        >>> (qb,) = question_batches(tiny_model(), [q], [OpinionPrompt().render(q)])
        >>> log_dm, refusal = answer_distribution(torch.tensor([[0.3, 0.1, 0.1]]).log(), qb)
        >>> [round(p, 3) for p in log_dm.exp()[0].tolist()], round(float(refusal[0]), 3)
        ([0.75, 0.25, 0.0], 0.2)
    """
    k = option_logp.shape[1]
    idx = torch.arange(k, device=option_logp.device)
    ordinal = idx[None, :] < qb.n_ordinal[:, None].to(option_logp.device)
    listed = idx[None, :] < qb.n_options[:, None].to(option_logp.device)
    ord_lp = option_logp.masked_fill(~ordinal, float("-inf"))
    log_dm = ord_lp - torch.logsumexp(ord_lp, dim=-1, keepdim=True)
    all_lse = torch.logsumexp(option_logp.masked_fill(~listed, float("-inf")), dim=-1)
    refusal_lp = option_logp.masked_fill(~(listed & ~ordinal), float("-inf"))
    refusal = torch.exp(torch.logsumexp(refusal_lp, dim=-1) - all_lse)
    return log_dm, refusal
