"""How far a model's answer distribution is from a group's: training divergences and held-out metrics.

Training (differentiable, torch, one value per question): ``"kl"`` = KL(target ‖ model), the
default; ``"js"`` = Jensen–Shannon; ``"w1"`` = the Wasserstein-1 distance over the options' ordinal
values divided by their range (what representativeness averages).

Held-out metrics (numpy/scipy, per question): KL(target ‖ model) in nats, total variation
½‖p − q‖₁, and W₁(p, q) / (max ordinal − min ordinal) with :func:`scipy.stats.wasserstein_distance`.
OpinionQA's representativeness of a set of questions is ``1 − mean W₁/range``.

Example:
    >>> import numpy as np
    >>> from lens_laai.opinions.metrics import question_metrics
    >>> m = question_metrics(np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5]), (1.0, 2.0, 3.0))
    >>> round(m["tv"], 3), round(m["w1"], 3)
    (0.5, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lens_laai.errors import FitError
from lens_laai.opinions.prompts import QuestionBatch

Divergence = Literal["kl", "js", "w1"]
DIVERGENCES = ("kl", "js", "w1")


def check_divergence(name: str) -> None:
    """Refuse a divergence name that is not one of ``DIVERGENCES`` (``"kl"``, ``"js"``, ``"w1"``).

    Example:
        >>> from lens_laai.opinions.metrics import check_divergence
        >>> check_divergence("js")  # known: nothing to say
        >>> check_divergence("l2")
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: divergence must be one of kl, js, w1, got 'l2'.
    """
    if name not in DIVERGENCES:
        raise FitError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {name!r}.")


def divergence(kind: Divergence, log_q: Tensor, qb: QuestionBatch) -> Tensor:
    """Per-question divergence between ``qb.target`` and ``exp(log_q)`` (−inf beyond the ordinal options).

    Example:
        >>> import torch
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai.opinions.fit import opinion_batches
        >>> from lens_laai.opinions.metrics import divergence
        >>> from lens_laai.opinions.prompts import OpinionPrompt
        >>> from lens_laai.testing import tiny_model
        >>> (qb,) = opinion_batches(tiny_model(), survey, red, ["Q0", "Q2"], OpinionPrompt())
        >>> [round(float(v), 6) for v in divergence("kl", qb.target.log(), qb)]  # the target itself: 0
        [0.0, 0.0]
        >>> uniform = torch.full_like(qb.target, 1 / 3).log()
        >>> [bool((divergence(kind, uniform, qb) > 0).all()) for kind in ("kl", "js", "w1")]
        [True, True, True]
    """
    p = qb.target.to(log_q.device)
    mask = torch.isfinite(log_q)
    log_q0 = log_q.masked_fill(~mask, 0.0)
    q = torch.exp(log_q).masked_fill(~mask, 0.0)
    if kind == "kl":
        return _kl(p, log_q0)
    if kind == "js":
        m = 0.5 * (p + q)
        log_m = torch.log(m.clamp_min(1e-30))
        return 0.5 * _kl(p, log_m) + 0.5 * _kl(q, log_m)
    if kind == "w1":
        order = qb.order.to(log_q.device)
        cdf_p, cdf_q = p.gather(1, order).cumsum(1), q.gather(1, order).cumsum(1)
        return ((cdf_p - cdf_q).abs() * qb.gaps.to(log_q.device)).sum(1) / qb.span.to(log_q.device)
    raise FitError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {kind!r}.")


def _kl(p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p (log p − log q) with 0 log 0 = 0."""
    log_p = torch.log(p.clamp_min(1e-30))
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def question_metrics(target: np.ndarray, model: np.ndarray, ordinal: Sequence[float]) -> dict[str, float]:
    """KL(target ‖ model), total variation and W₁ / range for one question.

    Example:
        >>> import numpy as np
        >>> from lens_laai.opinions.metrics import question_metrics
        >>> m = question_metrics(np.array([0.5, 0.5]), np.array([0.25, 0.75]), (1.0, 2.0))
        >>> {k: round(v, 4) for k, v in m.items()}  # KL = ½ ln 2 + ½ ln ⅔
        {'kl': 0.1438, 'tv': 0.25, 'w1': 0.25}
    """
    from scipy.stats import (
        wasserstein_distance,  # here, so that importing lens_laai does not load scipy
    )

    p, q = np.asarray(target, dtype=np.float64), np.asarray(model, dtype=np.float64)
    if p.shape != q.shape or p.shape != (len(ordinal),):
        raise ValueError(f"target {p.shape}, model {q.shape} and {len(ordinal)} ordinal values disagree.")
    support = p > 0
    kl = float(np.sum(p[support] * (np.log(p[support]) - np.log(np.maximum(q[support], 1e-300)))))
    span = max(ordinal) - min(ordinal)
    w1 = float(wasserstein_distance(ordinal, ordinal, p, q)) / span
    return {"kl": kl, "tv": 0.5 * float(np.abs(p - q).sum()), "w1": w1}


def representativeness(w1: Sequence[float]) -> float:
    """OpinionQA's representativeness: ``1 − mean W₁/range`` over questions.

    Example:
        >>> from lens_laai.opinions.metrics import representativeness
        >>> representativeness([0.0, 0.5])  # mean W₁ / range of 0.25
        0.75
    """
    values = list(w1)
    return 1.0 - float(np.mean(values)) if values else math.nan


def mean_metrics(table: pd.DataFrame, by: Sequence[str] = ("method",)) -> pd.DataFrame:
    """Per ``by`` group: questions, mean KL, mean TV, representativeness, mean refusal shares.

    Example:
        >>> import pandas as pd
        >>> from lens_laai.opinions.metrics import mean_metrics
        >>> table = pd.DataFrame({"method": ["plain", "plain", "persona"], "kl": [0.2, 0.4, 0.1], "tv": [0.1, 0.3, 0.1],
        ...                       "w1": [0.2, 0.4, 0.0], "refusal_model": [0.0] * 3, "refusal_target": [0.1] * 3})
        >>> mean_metrics(table)[["method", "n_questions", "kl", "representativeness"]].round(3).values.tolist()
        [['plain', 2, 0.3, 0.7], ['persona', 1, 0.1, 1.0]]
    """
    rows = []
    for key, part in table.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append(
            {
                **dict(zip(by, key)),
                "n_questions": len(part),
                "kl": float(part["kl"].mean()),
                "tv": float(part["tv"].mean()),
                "representativeness": representativeness(part["w1"]),
                "refusal_model": float(part["refusal_model"].mean()),
                "refusal_target": float(part["refusal_target"].mean()),
            }
        )
    return pd.DataFrame(rows)
