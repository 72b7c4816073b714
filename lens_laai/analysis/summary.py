"""Statistics of a head analysis: how the selected heads rank under each score, and the answer in words.

* :func:`selection_agreement`: per score, Spearman ρ of ‖Δ_h‖ with it among the selected heads,
  precision@k of its top-k against the selected heads with an exact permutation p-value, and
  each selected head's rank. Scores that are structurally zero off the selected heads (the DLA of
  Δ) are not ranked against them: ranking those zeros only encodes the sign of the few non-zero
  values (``[3, 1, 0×7]`` against ``[−0.26, −0.06, 0×7]`` gives ρ = −0.97; flip the signs: +1.0).
* :func:`agreement`: attribution patching against activation patching on the same prompts.
* :func:`percentile_with_interval`, :func:`mean_interval`: a percentile against random sets with
  its Clopper–Pearson interval; a mean over prompts with its t-interval (scipy).
* :func:`answer`: the findings of a :class:`lens_laai.analysis.head_table.HeadAnalysis` in sentences.

Example:
    >>> import pandas as pd
    >>> table = pd.DataFrame({"layer": [0] * 4, "head": range(4), "selected": [True, True, False, False],
    ...                       "norm": [2.0, 1.0, 0.0, 0.0], "act_patch": [0.9, 0.1, 0.5, 0.0]})
    >>> row = selection_agreement(table).iloc[0]
    >>> row.score, float(row.precision_at_k), row.selected_ranks
    ('act_patch', 0.5, 'L0H0:1, L0H1:3')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from lens_laai.errors import TaskError

IMPORTANCE_SCORES = ("act_patch", "attr_patch", "fv_cie", "zero_logprob_drop", "mean_logprob_drop", "dla")
STRUCTURAL_ZEROS = {"dla": "the DLA of Δ is 0 on every unselected head, so its top-k is not a ranking of heads"}
CAUSAL = {
    "act_patch": "activation patching",
    "attr_patch": "attribution patching",
    "fv_cie": "FV causal indirect effect",
    "zero_logprob_drop": "zero-ablation",
    "mean_logprob_drop": "mean-ablation",
}


def head_label(layer: int, head: int) -> str:
    """``L<layer>H<head>``, the label every table, sentence, figure and view of an analysis uses.

    Example:
        >>> import numpy as np
        >>> from lens_laai.analysis.summary import head_label
        >>> head_label(16, 1), head_label(np.int64(3), 2.0)  # pandas and numpy values too
        ('L16H1', 'L3H2')
    """
    return f"L{int(layer)}H{int(head)}"


def selection_agreement(table: pd.DataFrame, seed: int = 0, n_permutations: int = 2000) -> pd.DataFrame:
    """Per score: how the selected heads (k of them) rank among the scored heads.

    Columns: ``rho_selected, p_selected`` (Spearman ρ of ‖Δ_h‖ with the score over the selected
    heads only, permutation p; NaN below 3 heads), ``precision_at_k, p_precision`` (share of the
    score's top-k that is selected; the exact permutation p that k random heads overlap as much,
    i.e. the hypergeometric tail), ``jaccard``, ``selected_ranks`` (rank of each selected head,
    1 = top), ``n_scored``, ``k`` and ``note`` (why a value is undefined).

    Example:
        >>> import pandas as pd
        >>> from lens_laai.analysis.summary import selection_agreement
        >>> table = pd.DataFrame({"layer": [0] * 5, "head": range(5), "selected": [True, True, True, False, False],
        ...                       "norm": [3.0, 2.0, 1.0, 0.0, 0.0], "zero_logprob_drop": [0.8, 0.5, 0.1, 0.3, 0.0]})
        >>> row = selection_agreement(table).iloc[0]
        >>> row.score, int(row.k), int(row.n_scored), float(row.rho_selected), float(row.precision_at_k), row.selected_ranks
        ('zero_logprob_drop', 3, 5, 1.0, 0.6666666666666666, 'L0H0:1, L0H1:2, L0H2:4')
    """
    selected_mask = table.selected.astype(bool)
    rows = []
    for column in IMPORTANCE_SCORES:
        if column not in table:
            continue
        scored = table[table[column].notna()]
        chosen = scored[selected_mask.loc[scored.index]]
        k, n = len(chosen), len(scored)
        rho, p = spearman_permutation(chosen.norm.to_numpy(), chosen[column].to_numpy(), seed, n_permutations)
        row: dict[str, Any] = {"score": column, "rho_selected": rho, "p_selected": p, "k": k, "n_scored": n}
        note = STRUCTURAL_ZEROS.get(column, "")
        if note or not k:
            row.update(precision_at_k=np.nan, p_precision=np.nan, jaccard=np.nan, selected_ranks="")
            note = note or "no selected head among the scored heads"
        else:
            ranks = scored[column].rank(ascending=False, method="min")
            top = set(scored.nlargest(k, column).index)
            hits = len(top & set(chosen.index))
            row["precision_at_k"] = hits / k
            row["p_precision"] = float(stats.hypergeom.sf(hits - 1, n, k, k))
            row["jaccard"] = hits / len(top | set(chosen.index))
            row["selected_ranks"] = ", ".join(
                f"{head_label(r.layer, r['head'])}:{int(ranks[i])}" for i, r in chosen.iterrows()
            )
        if k < 3:
            note = "; ".join(filter(None, [note, "ρ needs 3 or more selected heads"]))
        row["note"] = note
        rows.append(row)
    return pd.DataFrame(rows)


def agreement(reference: Tensor, estimate: Tensor, seed: int = 0) -> dict[str, float]:
    """How well ``estimate`` (e.g. attribution patching) tracks ``reference`` (activation patching) over scored heads.

    Example:
        >>> import torch
        >>> from lens_laai.analysis.summary import agreement
        >>> activation = torch.tensor([[0.9, 0.1, -0.4], [0.2, float("nan"), 0.0]])  # NaN: not scored
        >>> out = agreement(activation, 0.5 * activation)  # a rescaled estimate ranks heads identically
        >>> round(out["rho"], 6), out["sign_agreement"]
        (1.0, 1.0)
        >>> round(agreement(activation, -activation)["rho"], 6)
        -1.0
    """
    both = torch.isfinite(reference) & torch.isfinite(estimate)
    x, y = reference[both].numpy(), estimate[both].numpy()
    rho, p = spearman_permutation(x, y, seed)
    signs = float(np.mean(np.sign(x) == np.sign(y))) if len(x) else float("nan")
    return {"rho": rho, "p": p, "sign_agreement": signs}


def spearman_permutation(x: np.ndarray, y: np.ndarray, seed: int = 0, n: int = 2000) -> tuple[float, float]:
    """Spearman ρ and a two-sided permutation p-value (NaN when either side is constant or has < 3 values).

    Example:
        >>> import numpy as np
        >>> from lens_laai.analysis.summary import spearman_permutation
        >>> rho, p = spearman_permutation(np.array([1.0, 2, 3, 4, 5]), np.array([2.0, 4, 5, 9, 10]))
        >>> round(rho, 6), p < 0.05  # monotone: ρ = 1; 2 of the 120 orderings are as extreme
        (1.0, True)
        >>> spearman_permutation(np.array([1.0, 2, 3]), np.array([5.0, 5, 5]))  # constant side: undefined
        (nan, nan)
    """
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    null = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(n)])
    return rho, float((np.sum(np.abs(null) >= abs(rho) - 1e-12) + 1) / (n + 1))


def _ranks(values: np.ndarray) -> np.ndarray:
    return pd.Series(values).rank(method="average").to_numpy()


def percentile_with_interval(value: float, random: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Percent of ``random`` below ``value``, with the Clopper–Pearson interval of that share (NaN when empty).

    Example:
        >>> import numpy as np
        >>> from lens_laai.analysis.summary import percentile_with_interval
        >>> percentile, low, high = percentile_with_interval(0.5, np.array([0.1, 0.2, 0.3, 0.9]))
        >>> percentile, round(low, 1), round(high, 1)  # 3 of 4 random sets below; exact binomial interval
        (75.0, 19.4, 99.4)
    """
    random = np.asarray(random, dtype=float)
    if not len(random) or not np.isfinite(value):
        return float("nan"), float("nan"), float("nan")
    below = int(np.sum(random < value))
    ci = stats.binomtest(below, len(random)).proportion_ci(confidence, method="exact")
    return 100.0 * below / len(random), 100.0 * ci.low, 100.0 * ci.high


def mean_interval(values: Tensor | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-prompt ``values`` and its t-interval (NaN bounds below two values).

    Example:
        >>> from lens_laai.analysis.summary import mean_interval
        >>> [round(v, 3) for v in mean_interval([1.0, 2.0, 3.0, 4.0])]  # mean ± t(0.975, 3) · s.e.
        [2.5, 0.446, 4.554]
        >>> mean_interval([1.0])
        (1.0, nan, nan)
    """
    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else float("nan")
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.sem(values) * stats.t.ppf(0.5 + confidence / 2, len(values) - 1))
    return mean, mean - half, mean + half


def answer(analysis: Any) -> list[str]:
    """The analysis's answer as sentences: which heads, how stable, necessary, sufficient, where methods rank them.

    Example:
        >>> from lens_laai import fit
        >>> from lens_laai.analysis.head_table import head_table
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> iv = fit(model, task, layer=1, n_train=8, steps=3, progress=False).intervention
        >>> analysis = head_table(model, task, iv, methods=["dla"], n_prompts=4, shots=2, progress=False)
        >>> from lens_laai.analysis.summary import answer
        >>> print(answer(analysis)[0])
        Selected: ... of the 12 scored heads: L1H... Stability not measured (pass stability= from lens_laai's stability()).
    """
    table, found = analysis.table, analysis.findings
    chosen = table[table.selected.astype(bool)]
    labels = [head_label(r.layer, r["head"]) for _, r in chosen.iterrows()]
    lines = [_which(labels, len(table), analysis.layers, chosen)]
    lines.append(_necessary(found.get("necessity", {})))
    lines.append(_sufficient(found.get("sufficiency", {})))
    lines.extend(_ranks_sentence(analysis.summary))
    return [line for line in lines if line]


def _which(labels: list[str], n_scored: int, layers: list[int], chosen: pd.DataFrame) -> str:
    if not labels:
        return f"The intervention selects no head in the scored layers ({_span(layers)})."
    text = f"Selected: {len(labels)} of the {n_scored} scored heads: {', '.join(labels)}."
    if "selection_probability" in chosen:
        probs = ", ".join(f"{l} {p:.2f}" for l, p in zip(labels, chosen.selection_probability))
        text += f" Selection probability over subsamples: {probs}."
    else:
        text += " Stability not measured (pass stability= from lens_laai's stability())."
    return text


def _necessary(n: dict[str, Any]) -> str:
    if not n:
        return ""
    if n.get("reason"):
        return f"Necessary? Not measured: {n['reason']}."
    below = round(n["percentile"] * n["n_random"] / 100)
    zero = ", an interval that includes 0" if n["drop_low"] <= 0 <= n["drop_high"] else ""
    return (
        f"Necessary? Mean-ablating the selected heads together changes the target log-prob on {n['n_prompts']} "
        f"held-out {n['shots']}-shot prompts by {-n['drop']:+.3f} (95% CI {-n['drop_high']:+.3f} to "
        f"{-n['drop_low']:+.3f}{zero}); that drop is larger than {below} of {n['n_random']} random sets of "
        f"{n['k']} unselected heads cause (percentile {n['percentile']:.0f}, 95% CI {n['percentile_low']:.0f}–"
        f"{n['percentile_high']:.0f}; random median drop {n['random_median']:.3f})."
    )


def _sufficient(s: dict[str, Any]) -> str:
    if not s:
        return ""
    text = (
        f"Sufficient? Δ on the selected heads gives held-out accuracy {s['selected_accuracy']:.2f} on "
        f"{s['n_prompts']} zero-shot prompts (no intervention: {s['base_accuracy']:.2f})"
    )
    if s.get("dense_accuracy") is not None:
        text += f", against {s['dense_accuracy']:.2f} with Δ on all {s['dense_heads']} heads of the dense fit"
    return text + "."


def _ranks_sentence(summary: pd.DataFrame) -> list[str]:
    out = []
    for _, row in summary.iterrows():
        if row.score not in CAUSAL or not isinstance(row.selected_ranks, str) or not row.selected_ranks:
            continue
        ranks = ", ".join(item.replace(":", " #") for item in row.selected_ranks.split(", "))
        out.append(
            f"{CAUSAL[row.score].capitalize()} ranks {ranks} of {row.n_scored} heads "
            f"(precision@{row.k} {row.precision_at_k:.2f}, permutation p {row.p_precision:.3g})."
        )
    return out


def _span(layers: list[int]) -> str:
    return f"layers {layers[0]}–{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def stability_scores(stability: pd.DataFrame | Tensor, shape: tuple[int, int]) -> Tensor:
    """Selection probabilities as ``[n_layers, n_heads]`` (NaN where not given), from a tensor or a long DataFrame.

    Example:
        >>> import pandas as pd
        >>> from lens_laai.analysis.summary import stability_scores
        >>> frame = pd.DataFrame({"layer": [1, 1], "head": [0, 3], "selection_probability": [0.9, 0.4]})
        >>> scores = stability_scores(frame, (2, 4))
        >>> int(scores.isnan().sum()), round(float(scores[1, 3]), 2)  # NaN where not given
        (6, 0.4)
        >>> stability_scores(frame, (1, 4))
        Traceback (most recent call last):
        ...
        lens_laai.errors.TaskError: stability row (layer 1, head 0, selection_probability 0.9) is outside this model's 1 layers × 4 heads or outside [0, 1].
    """
    if isinstance(stability, Tensor):
        if tuple(stability.shape) != shape:
            raise TaskError(
                f"stability must be an [n_layers, n_heads] = {list(shape)} tensor, got {list(stability.shape)}."
            )
        return stability.detach().float().cpu()
    if not isinstance(stability, pd.DataFrame) or not {"layer", "head", "selection_probability"} <= set(stability):
        raise TaskError("stability must be a DataFrame with columns layer, head, selection_probability, or a tensor.")
    out = torch.full(shape, float("nan"))
    for row in stability.itertuples(index=False):
        layer, head, prob = int(row.layer), int(row.head), float(row.selection_probability)
        if not (0 <= layer < shape[0] and 0 <= head < shape[1] and 0.0 <= prob <= 1.0):
            raise TaskError(
                f"stability row (layer {layer}, head {head}, selection_probability {prob}) is outside this model's "
                f"{shape[0]} layers × {shape[1]} heads or outside [0, 1]."
            )
        out[layer, head] = prob
    return out
