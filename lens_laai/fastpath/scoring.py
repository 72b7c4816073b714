"""The one scorer: top-1 accuracy, log-probability, rank and cross-entropy of each row's target token.

Evaluation, the fast path's validation scores and the baselines all call :func:`score_logits`, so
a number called "accuracy" means the same thing everywhere: the arg-max of the last-position
logits equals the first token of the target.

Example:
    >>> import torch
    >>> from lens_laai.fastpath.scoring import score_logits
    >>> s = score_logits(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]), torch.tensor([1, 2]))
    >>> s.correct.tolist(), s.rank.tolist()
    ([True, False], [0, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass
class Scores:
    """Per-row scores of one batch.

    Example:
        >>> import torch
        >>> scores = score_logits(torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]]), torch.tensor([2, 2]))
        >>> scores.prediction.tolist(), scores.correct.tolist(), scores.rank.tolist()
        ([1, 2], [False, True], [1, 0])
        >>> scores.cross_entropy  # -log softmax at the target
        tensor([1.4076, 0.0134])
    """

    prediction: Int[Tensor, " batch"]
    correct: Bool[Tensor, " batch"]
    target_logprob: Float[Tensor, " batch"]
    rank: Int[Tensor, " batch"]

    @property
    def cross_entropy(self) -> Float[Tensor, " batch"]:
        return -self.target_logprob


@torch.no_grad()
def score_logits(logits: Float[Tensor, "batch vocab"], target_ids: Int[Tensor, " batch"]) -> Scores:
    """Score last-position ``logits`` against each row's first target token.

    Example:
        >>> import torch
        >>> from lens_laai.fastpath.scoring import score_logits
        >>> scores = score_logits(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]]), torch.tensor([1, 2]))
        >>> scores.correct.tolist(), scores.rank.tolist()
        ([True, False], [0, 1])
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    target_ids = target_ids.to(logp.device)
    target_lp = logp.gather(1, target_ids[:, None])[:, 0]
    prediction = logp.argmax(-1)
    return Scores(prediction, prediction == target_ids, target_lp, (logp > target_lp[:, None]).sum(-1))
