"""Choosing how a fit is used, on its n pairs: zero-shot Δ, k-shot prompting alone, or k-shot prompting + Δ.

A Δ fitted on prompts with 0 or k demonstrations (``shots=(0, 5)``: half the training pairs each)
serves both zero-shot and k-shot prompts. On a task the model already learns in context, k demonstrations may do better than
any zero-shot Δ; on a lookup task the model cannot infer from examples, Δ does better. The
cross-validation that picks the head set already holds out every pair once, scored under each
number of demonstrations, with and without Δ (:class:`~lens_laai.fitting.selection.HeldScores`),
so choosing among the modes costs nothing more: each Δ mode gets its own λ₂ point by the fit's rule
on its own rows. With ``rule="1se"`` (the default) k-shot prompting + Δ is used unless another mode
is *significantly* better on the same held-out pairs: an exact one-sided sign test (McNemar's) on
the pairs where the two disagree, at level :data:`MODE_ALPHA`. With ``rule="min"`` the best
cross-validated accuracy wins (ties: lower cross-entropy). The scores, with standard errors over the
n pairs, and each mode's p-value against the preferred one are kept as a table.

Why a preferred mode, and why a test: k-shot prompting + Δ contains the other two (Δ = 0 is
prompting; the same Δ is fitted on zero-shot prompts too), and on the eighteen development tasks it
was the best of the three on average. Twenty pairs give accuracies with a standard error near 0.1.
The earlier rule left the preferred mode when another beat it by more than one standard error of the
paired difference: 9 of 36 development fits left it, 8 of them for a mode that was no better or worse
on the test pairs (``docs/results.md`` §7). Held-out pairs scored by two modes are paired binary
outcomes, and the sign test on their disagreements is the standard exact test for them.

Example:
    >>> import numpy as np
    >>> from lens_laai.fitting.modes import choose_mode
    >>> from lens_laai.fitting.config import FitConfig
    >>> from lens_laai.fitting.selection import HeldScores
    >>> rows = lambda correct, ce: np.array([correct, ce], dtype=float)
    >>> held = {(0.5, "relaxed"): [np.concatenate([rows([1, 1, 0, 1], [.2, .3, 2, .1]), rows([1, 0, 0, 1], [.2, 2, 2, .1])], 1)]}
    >>> scores = HeldScores([0.5], (0, 5), {0.5: [2]}, held, [np.concatenate([rows([0] * 4, [5] * 4), rows([1, 1, 1, 0], [.1, .1, .1, 3])], 1)], [4])
    >>> choice = choose_mode(scores, FitConfig(shots=(0, 5), demos=5), [2], "relaxed")
    >>> choice.mode.name, choice.table.set_index("mode").cv_accuracy.round(2).to_dict()
    ('5-shot prompting + Δ', {'zero-shot Δ': 0.75, '5-shot prompting + Δ': 0.5, '5-shot prompting': 0.75})
    >>> choose_mode(scores, FitConfig(shots=(0, 5), demos=5, rule="min"), [2], "relaxed").mode.name
    'zero-shot Δ'
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from lens_laai.errors import FitError
from lens_laai.fitting.layer_fit import scored_shots, shot_counts
from lens_laai.fitting.selection import HeldScores, choose_point
from lens_laai.interventions.mode import Mode
from lens_laai.tasks.task import Task

MODES = ("auto", "zero-shot", "few-shot")
"""``fit(mode=…)``: ``"auto"`` chooses by cross-validation; the others fix Δ on zero-shot or k-shot prompts."""
TRAIN_SHOTS = 5
"""Demonstrations in the k-shot half of the training prompts (fewer when a fold is too small)."""
MODE_SHOTS = 5
"""Demonstrations per prompt in the k-shot modes (fewer when a fold is too small)."""
MODE_ALPHA = 0.05
"""Under ``rule="1se"``, another mode replaces k-shot prompting + Δ only when the one-sided sign test
on the held-out pairs where they disagree gives ``p ≤ MODE_ALPHA`` (the fewest that pass: 5
disagreements, all won; 7 won and 1 lost also pass)."""


@dataclass
class ModeChoice:
    """What :func:`choose_mode` picked: the mode, the λ₂ point its Δ uses, every candidate's scores.

    ``table``: one row per candidate mode (``mode, shots, delta, point, n_selected, cv_accuracy,
    cv_accuracy_se, cv_ce, cv_ce_se, wins, losses, p_better, chosen``: ``wins`` / ``losses`` count the
    held-out pairs this mode gets right / wrong where the preferred mode does the opposite, ``p_better``
    the one-sided sign-test p-value that it is better; ``NaN`` on the preferred row and when
    nothing is preferred); ``path_table``: the λ₂ path scored on the rows of
    the Δ mode whose point was used (the frontier a user reads); ``index``: that point.
    :func:`choose_mode` makes one (the module's example shows it).

    Example:
        >>> from lens_laai.fitting.modes import ModeChoice
        >>> sorted(ModeChoice.__dataclass_fields__)
        ['index', 'mode', 'path_table', 'table']
    """

    mode: Mode
    index: int
    table: pd.DataFrame
    path_table: pd.DataFrame


def default_shots(mode: str, smallest: int) -> tuple[int | tuple[int, int], int | None]:
    """``(shots, demos)`` for a fit whose smallest fitting part has ``smallest`` pairs.

    Zero-shot: ``(0, None)``. Otherwise half the training prompts carry ``min(TRAIN_SHOTS, smallest − 1)``
    demonstrations (a query is never its own), and the k-shot modes use ``min(MODE_SHOTS, smallest)``;
    with fewer than 2 pairs in a part only zero-shot is possible.

    Example:
        >>> from lens_laai.fitting.modes import default_shots
        >>> default_shots("auto", 10), default_shots("zero-shot", 10), default_shots("auto", 3)
        (((0, 5), 5), (0, None), ((0, 2), 3))
    """
    check_mode(mode)
    k = min(TRAIN_SHOTS, smallest - 1)
    if mode == "zero-shot" or k < 1:
        if mode == "few-shot":
            raise FitError(
                f"mode='few-shot' needs at least 2 training pairs in each fit ({smallest} here); "
                "use more training pairs, fewer folds, or mode='zero-shot'."
            )
        return 0, None
    return (0, k), min(MODE_SHOTS, smallest)


def fill_shots(cfg: Any, shots_default: bool, demos_default: bool, n: int, how: str, one_layer: bool) -> Any:
    """``cfg`` with the defaults of ``shots`` and ``demos`` (:func:`default_shots`) filled in for a fit on ``n`` pairs.

    Zero-shot prompts alone unless a k-shot mode can be fitted and chosen: one layer, and (for
    ``mode="auto"``) held-out scores to choose with (``how`` is ``"cv"`` or ``"valid"``). The
    smallest fitting part is a cross-validation fold's (``n − ⌈n / folds⌉``), else all ``n``.

    Example:
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.modes import fill_shots
        >>> cfg = fill_shots(FitConfig(), True, True, 20, "cv", True)
        >>> cfg.shots, cfg.demos, fill_shots(FitConfig(mode="zero-shot"), True, True, 20, "cv", True).shots
        ((0, 5), 5, 0)
    """
    if not one_layer or (cfg.mode == "auto" and how not in ("cv", "valid")):
        if cfg.mode == "few-shot":
            raise FitError("mode='few-shot' is fitted at one layer; use layer='auto' or a layer index.")
        return replace(cfg, shots=0 if shots_default else cfg.shots)
    smallest = n - -(-n // cfg.folds) if how == "cv" else n
    shots, demos = default_shots(cfg.mode, smallest)
    return replace(cfg, shots=shots if shots_default else cfg.shots, demos=demos if demos_default else cfg.demos)


def recommended_mode(cfg: Any, choice: ModeChoice | None, train: Task) -> tuple[Mode, pd.DataFrame | None]:
    """The mode a fit records (with the demonstrations :func:`~lens_laai.generate` uses: a seeded draw
    from ``train``) and the table that chose it (``None`` when nothing was scored: the mode ``cfg.mode``
    names, at the counts :func:`~lens_laai.fitting.layer_fit.scored_shots` gives).

    Example:
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.modes import recommended_mode
        >>> from lens_laai.testing import tiny_task
        >>> mode, table = recommended_mode(FitConfig(mode="few-shot", shots=(0, 2), demos=2), None, tiny_task())
        >>> mode.name, len(mode.demonstrations), table
        ('2-shot prompting + Δ', 2, None)
    """
    counts = scored_shots(cfg)
    if choice is not None:
        use, table = choice.mode, choice.table
    else:
        use, table = Mode(max(counts) if cfg.mode == "few-shot" else min(counts), True), None
    if use.shots:
        demos = tuple(random.Random(f"demonstrations:{cfg.seed}").sample(train.pairs, use.shots))
        use = Mode(use.shots, use.delta, demos)
    return use, table


def check_mode(mode: Any) -> None:
    """Raise :class:`FitError` unless ``mode`` is one of :data:`MODES`.

    Example:
        >>> from lens_laai.fitting.modes import check_mode
        >>> check_mode("auto")
        >>> check_mode("sometimes")
        Traceback (most recent call last):
        lens_laai.errors.FitError: mode must be 'auto' (chosen by cross-validation), 'zero-shot' (the paper's setting) or 'few-shot' (Δ on k-shot prompts), got 'sometimes'.
    """
    if mode not in MODES:
        raise FitError(
            f"mode must be 'auto' (chosen by cross-validation), 'zero-shot' (the paper's setting) or "
            f"'few-shot' (Δ on k-shot prompts), got {mode!r}."
        )


def candidate_modes(mode: str, shots: int | Sequence[int]) -> list[Mode]:
    """The modes a fit may choose among when held-out pairs are scored with ``shots`` demonstrations.

    Example:
        >>> from lens_laai.fitting.modes import candidate_modes
        >>> [m.name for m in candidate_modes("auto", (0, 10))]
        ['zero-shot Δ', '10-shot prompting + Δ', '10-shot prompting']
    """
    counts = shot_counts(shots)
    if mode == "zero-shot":
        return [Mode(min(counts), True)]
    if mode == "few-shot":
        return [Mode(max(counts), True)]
    out = [Mode(k, True) for k in counts]
    return out + [Mode(k, False) for k in counts if k > 0]


def choose_mode(
    scores: HeldScores,
    cfg: Any,
    counts: Sequence[int],
    estimator: str = "relaxed",
    score: str = "cv",
    index: int | None = None,
) -> ModeChoice:
    """Pick a mode among :func:`candidate_modes`: under ``cfg.rule="1se"`` the richest (most
    demonstrations, with Δ) unless others are better on the same held-out pairs by a one-sided sign
    test at :data:`MODE_ALPHA` (then the best of those); under ``"min"`` the best held-out accuracy
    (ties: lower cross-entropy).

    Each Δ mode's λ₂ point is ``cfg.rule`` on ``cfg.cv_metric`` over its own rows (``counts``: heads
    kept on all n pairs, per point), or ``index`` when a head budget fixed it.

    Example (one λ₂ point, one fold of 2 pairs scored zero-shot and 5-shot):
        >>> import numpy as np
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.modes import choose_mode
        >>> from lens_laai.fitting.selection import HeldScores
        >>> held = {(0.5, "relaxed"): [np.array([[0, 1, 1, 1], [3.0, 1.0, 0.5, 0.5]])]}
        >>> prompting = [np.array([[0, 0, 1, 0], [5.0, 5.0, 1.0, 2.0]])]
        >>> choice = choose_mode(HeldScores([0.5], (0, 5), {0.5: [1]}, held, prompting, [2]), FitConfig(demos=5), [1])
        >>> choice.mode.name, choice.table.cv_accuracy.tolist(), choice.table.losses.tolist()
        ('5-shot prompting + Δ', [0.5, 1.0, 0.5], [1.0, nan, 1.0])
    """
    candidates = candidate_modes(getattr(cfg, "mode", "auto"), scores.shots)
    rows, tables, correct_of = [], {}, []
    for m in candidates:
        block = scores.block(m.shots)
        if m.delta:
            tables[m.shots] = block.table(score)
            point = (
                index
                if index is not None
                else choose_point(tables[m.shots], cfg.rule, cfg.cv_metric, estimator, counts, score=score)
            )
            correct, ce = np.concatenate(block.held[(scores.path[point], estimator)], axis=1)
            rows.append(_row(m, point, counts[point], correct, ce, score))
        else:
            correct, ce = np.concatenate(block.prompting, axis=1)
            rows.append(_row(m, None, 0, correct, ce, score))
        correct_of.append(correct)
    table = pd.DataFrame(rows)
    preferred = _preferred(candidates)
    table[["wins", "losses", "p_better"]] = [_against(correct_of, i, preferred) for i in range(len(rows))]
    acc, ce = table[f"{score}_accuracy"].to_numpy(), table[f"{score}_ce"].to_numpy()
    allowed = list(range(len(rows)))
    if getattr(cfg, "rule", "1se") == "1se" and preferred is not None:
        allowed = [preferred] + [i for i in allowed if table.p_better[i] <= MODE_ALPHA]  # NaN (preferred) is not ≤
    best = max(allowed, key=lambda i: (acc[i], -ce[i], -i))
    table["chosen"] = [i == best for i in range(len(rows))]
    chosen = candidates[best]
    with_delta = [i for i, m in enumerate(candidates) if m.delta]
    used = best if chosen.delta else max(with_delta, key=lambda i: (acc[i], -ce[i], -i))
    point = int(table["point"][used])
    return ModeChoice(chosen, point, table, tables[candidates[used].shots])


def _preferred(candidates: Sequence[Mode]) -> int | None:
    """The richest candidate (most demonstrations, with Δ) when there is a choice, else ``None``."""
    most = max(c.shots for c in candidates)
    rich = [i for i, m in enumerate(candidates) if m.delta and m.shots == most]
    return rich[0] if rich and len(candidates) > 1 else None


def _against(correct: Sequence[np.ndarray], i: int, preferred: int | None) -> tuple[float, float, float]:
    """``(wins, losses, p)`` of candidate ``i`` against ``preferred`` on the same held-out pairs: the
    pairs only ``i`` gets right, the pairs only ``preferred`` gets right, and the one-sided exact
    sign-test p-value that ``i`` is better (``1.0`` with no disagreement; all ``NaN`` for the
    preferred row itself or with no preferred mode).

    Example:
        >>> import numpy as np
        >>> from lens_laai.fitting.modes import _against
        >>> right = [np.array([1, 1, 1, 1, 1, 0]), np.zeros(6)]
        >>> _against(right, 0, 1), _against(right, 1, 1)
        ((5.0, 0.0, 0.03125), (nan, nan, nan))
    """
    if preferred is None or i == preferred:
        return float("nan"), float("nan"), float("nan")
    wins = int(((correct[i] > 0) & (correct[preferred] == 0)).sum())
    losses = int(((correct[i] == 0) & (correct[preferred] > 0)).sum())
    p = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
    return float(wins), float(losses), float(p)


def _row(m: Mode, point: int | None, n_selected: int, correct: np.ndarray, ce: np.ndarray, score: str) -> dict:
    n = len(correct)
    se = (lambda v: float(v.std(ddof=1) / np.sqrt(n))) if n > 1 else (lambda v: float("nan"))
    return {
        "mode": m.name,
        "shots": m.shots,
        "delta": m.delta,
        "point": point,
        "n_selected": n_selected,
        f"{score}_accuracy": float(correct.mean()),
        f"{score}_accuracy_se": se(correct),
        f"{score}_ce": float(ce.mean()),
        f"{score}_ce_se": se(ce),
    }
