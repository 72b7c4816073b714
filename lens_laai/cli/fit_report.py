"""What ``lens-laai fit`` prints about the head set: the sparsity–accuracy frontier and stability."""

from __future__ import annotations

from typing import Any

import pandas as pd


def where(s: dict[str, Any]) -> str:
    """Where a fit acts, for a printed heading: ``layer 16``, a joint fit's ``layers 4, 8, 12 (joint)``,
    and ``, last 3 tokens`` when Δ acts at more than the last token.

    Example:
        >>> from lens_laai.cli.fit_report import where
        >>> where({"layer": 16}), where({"layer": 8, "layers": [4, 8, 12]}), where({"layer": 16, "last_positions": 3})
        ('layer 16', 'layers 4, 8, 12 (joint)', 'layer 16, last 3 tokens')
    """
    layers = s.get("layers") or [s["layer"]]
    at = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))} (joint)"
    m = s.get("last_positions") or 1
    return at if m == 1 else f"{at}, last {m} tokens"


def print_frontier(s: dict[str, Any], path: pd.DataFrame) -> None:
    """The sparsity–accuracy frontier at the fitted layer, the pick marked.

    ``s`` is the fit's summary (``layer``, ``labelled_pairs_used``); ``path`` is ``FitResult.candidates``
    at one layer: a row per λ₂, with the cross-validated accuracy of each estimator that was scored.
    Points past the pick were not refitted on all pairs (``n_selected`` is missing): their head count is
    the folds' mean, starred.

    Example:
        >>> import pandas as pd
        >>> from lens_laai.cli.fit_report import print_frontier
        >>> path = pd.DataFrame({"group_l1_rel": [0.5, 0.2, 0.05], "n_selected": [1, 2, None],
        ...                      "cv_n_selected": [1.0, 2.0, 3.5], "train_accuracy": [0.5, 0.75, None],
        ...                      "relaxed_cv_accuracy": [0.4, 0.6, 0.62], "relaxed_cv_accuracy_se": [0.1, 0.1, 0.12],
        ...                      "chosen": [False, True, False]})
        >>> print_frontier({"layer": 1, "labelled_pairs_used": 8}, path)
        <BLANKLINE>
        Sparsity–accuracy frontier at layer 1 (λ₂ path, warm starts; 8 labelled pairs used in all):
         λ₂/λ_max heads train acc (penalised) CV acc (relaxed) pick
            0.500     1                 0.500      0.40 ± 0.10
            0.200     2                 0.750      0.60 ± 0.10   <-
            0.050  3.5*                     -      0.62 ± 0.12
        * past the pick: not refitted on all pairs; heads kept, mean over the cross-validation folds
    """
    cols = {"group_l1_rel": "λ₂/λ_max", "n_selected": "heads", "train_accuracy": "train acc (penalised)"}
    table = path[list(cols)].rename(columns=cols)
    folds = path.get("cv_n_selected", path.n_selected)
    unfitted = path.n_selected.isna()
    table["heads"] = [f"{c:.1f}*" if u else str(int(h)) for h, c, u in zip(path.n_selected, folds, unfitted)]
    table["train acc (penalised)"] = ["-" if u else f"{a:.3f}" for a, u in zip(path.train_accuracy, unfitted)]
    for est in ("relaxed", "penalised"):
        if f"{est}_cv_accuracy" in path:
            acc, se = path[f"{est}_cv_accuracy"], path[f"{est}_cv_accuracy_se"]
            table[f"CV acc ({est})"] = [f"{a:.2f} ± {e:.2f}" for a, e in zip(acc, se)]
    table["pick"] = ["<-" if c else "" for c in path.chosen]
    used = f"{s['labelled_pairs_used']} labelled pairs used in all"
    print(f"\nSparsity–accuracy frontier at {where(s)} (λ₂ path, warm starts; {used}):")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if unfitted.any():
        print("* past the pick: not refitted on all pairs; heads kept, mean over the cross-validation folds")


def print_modes(modes: list[dict[str, Any]], rule: str = "1se") -> None:
    """How the fit is to be used: each candidate mode's cross-validated accuracy, the winner marked,
    and (with several candidates) the ``rule`` that picked it, with each mode's record against the
    preferred one (held-out pairs won and lost, and the sign test's p-value) where the fit kept it.

    Example:
        >>> from lens_laai.cli.fit_report import print_modes
        >>> print_modes([{"mode": "zero-shot Δ", "delta": True, "n_selected": 2, "cv_accuracy": 0.5,
        ...               "cv_accuracy_se": 0.1, "cv_ce": 2.0, "cv_ce_se": 0.3, "chosen": True}])  # doctest: +NORMALIZE_WHITESPACE
        <BLANKLINE>
        How to use it, chosen by the same cross-validation (evaluate and generate use the pick by default):
               mode heads CV accuracy CV cross-entropy pick
        zero-shot Δ     2 0.50 ± 0.10      2.00 ± 0.30   <-
    """
    table = pd.DataFrame(
        {
            "mode": [m["mode"] for m in modes],
            "heads": [m["n_selected"] if m["delta"] else "-" for m in modes],
            "CV accuracy": [f"{m['cv_accuracy']:.2f} ± {m['cv_accuracy_se']:.2f}" for m in modes],
            "CV cross-entropy": [f"{m['cv_ce']:.2f} ± {m['cv_ce_se']:.2f}" for m in modes],
        }
    )
    if len(modes) > 1 and rule == "1se" and any(m.get("p_better") is not None for m in modes):
        table["won–lost, p"] = [_record(m) for m in modes]
    table["pick"] = ["<-" if m["chosen"] else "" for m in modes]
    print("\nHow to use it, chosen by the same cross-validation (evaluate and generate use the pick by default):")
    print(table.to_string(index=False))
    if len(modes) > 1:
        print(
            "(--rule 1se: prompting + Δ unless another way is significantly better on the same held-out pairs: "
            "won–lost counts the pairs where the two disagree, p is the one-sided sign test's, ≤ 0.05 to leave)"
            if rule == "1se"
            else "(--rule min: the best CV accuracy, ties to the lower cross-entropy)"
        )


def _record(mode: dict[str, Any]) -> str:
    """``"5–0, p 0.031"`` against the preferred mode, ``"-"`` for the preferred mode itself."""
    if mode.get("p_better") is None or mode["p_better"] != mode["p_better"]:
        return "-"
    return f"{mode['wins']:.0f}–{mode['losses']:.0f}, p {mode['p_better']:.3f}"


def print_stability(st: dict[str, Any]) -> None:
    """Each head's selection probability over the subsamples, the stable set, and the error bound.

    ``st`` is :meth:`lens_laai.fitting.stability.Stability.summary`'s dictionary.

    Example:
        >>> from lens_laai.cli.fit_report import print_stability
        >>> print_stability({"n_subsamples": 4, "threshold": 0.6, "stable_heads": ["L1H2"], "error_bound": 0.1234,
        ...                  "heads": [{"layer": 1, "head": 2, "selection_probability": 1.0},
        ...                            {"layer": 1, "head": 0, "selection_probability": 0.25}]})
        <BLANKLINE>
        Stability over 4 complementary-pair subsamples (selection probability): L1H2 1.00, L1H0 0.25
        stable set (probability ≥ 0.6): L1H2; expected falsely selected heads ≤ 0.12 (Shah & Samworth 2013)
    """
    probs = ", ".join(f"L{h['layer']}H{h['head']} {h['selection_probability']:.2f}" for h in st["heads"])
    print(
        f"\nStability over {st['n_subsamples']} complementary-pair subsamples (selection probability): {probs}\n"
        f"stable set (probability ≥ {st['threshold']}): {', '.join(st['stable_heads']) or 'none'}; "
        f"expected falsely selected heads ≤ {st['error_bound']:.2f} (Shah & Samworth 2013)"
    )
