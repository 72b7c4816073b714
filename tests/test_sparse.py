"""The sparse default: relaxed refit, the one-standard-error rule, head budgets and the frontier."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from lens_laai import FitError, fit
from lens_laai.fastpath import CostMeter
from lens_laai.fitting import FitConfig
from lens_laai.fitting.layer_fit import layer_path
from lens_laai.fitting.relaxed import relaxed_refit, support
from lens_laai.fitting.selection import choose_point, cross_validated_path
from lens_laai.tasks.prompts import PromptTemplate


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _table(acc, se):
    return pd.DataFrame(
        {
            "lam": np.linspace(0.9, 0.05, len(acc)),
            "relaxed_cv_accuracy": acc,
            "relaxed_cv_accuracy_se": se,
            "relaxed_cv_ce": [-a for a in acc],
            "relaxed_cv_ce_se": se,
        }
    )


def test_one_standard_error_rule_picks_the_sparsest_point_within_one_se_of_the_best():
    table = _table([0.2, 0.5, 0.62, 0.7, 0.68], [0.1] * 5)
    assert choose_point(table, "min", n_selected=[1, 2, 3, 5, 9]) == 3
    assert choose_point(table, "1se", n_selected=[1, 2, 3, 5, 9]) == 2  # 0.62 ≥ 0.7 − 0.1; 0.5 is not
    assert choose_point(table, "1se", n_selected=[0, 2, 3, 5, 9]) == 2
    assert choose_point(_table([0.6, 0.5, 0.62, 0.7, 0.68], [0.1] * 5), "1se", n_selected=[0, 2, 3, 5, 9]) == 2, (
        "a point that keeps no head is never picked"
    )
    assert choose_point(table, "min", n_selected=[1, 2, 3, 5, 9], max_heads=3) == 2
    assert choose_point(table, "1se", metric="ce", n_selected=[1, 2, 3, 5, 9]) == 2  # ce = −acc here: lower is better
    with pytest.raises(FitError, match="rule must be"):
        choose_point(table, "best")
    with pytest.raises(FitError, match="no valid scores"):
        choose_point(table, score="valid")


def test_relaxed_refit_keeps_the_support_and_fits_better(tiny, task):
    cfg = FitConfig(steps=3, seed=0)
    fits = list(layer_path(tiny, task.subset(list(range(10))), None, 1, [0.98], cfg, PromptTemplate(), CostMeter()))
    penalised = fits[0]
    assert 0 < penalised.n_selected < tiny.cfg.n_heads
    relaxed, history = relaxed_refit(penalised.runner, cfg, penalised.delta, steps=10)
    assert torch.equal(support(relaxed), support(penalised.delta)), "heads off stay exactly off, heads on stay on"
    assert history[-1].smooth < penalised.history[-1].smooth, "without the group penalty the loss goes further down"
    zero = torch.zeros_like(penalised.delta)
    same, none = relaxed_refit(penalised.runner, cfg, zero)
    assert torch.equal(same, zero) and none == []


def test_cross_validated_path_scores_every_pair_once_with_standard_errors(tiny, task):
    train = task.subset(list(range(10)))
    cfg = FitConfig(steps=2, folds=2, seed=0)
    table = cross_validated_path(tiny, train, 1, [0.9, 0.3], cfg, PromptTemplate(), CostMeter(), 2, progress=False)
    assert table.lam.tolist() == [0.9, 0.3]
    for est in ("penalised", "relaxed"):
        acc, se = table[f"{est}_cv_accuracy"], table[f"{est}_cv_accuracy_se"]
        assert ((acc * 10).round(6) % 1 == 0).all(), "a mean over the 10 held-out pairs"
        assert np.allclose(se, np.sqrt(acc * (1 - acc) * 10 / 9) / np.sqrt(10)), "sd over pairs / √n"
        assert (table[f"{est}_cv_ce_se"] > 0).all()


def test_head_budget_and_relaxed_switch(tiny, task):
    kw = {"layer": 1, "n_train": 10, "max_heads": 1, "steps": 2, "relaxed_steps": 2, "progress": False}
    budget = fit(tiny, task, mode="zero-shot", **kw)  # a budget alone: nothing is cross-validated
    assert budget.n_selected <= 1 and budget.selection_rule.startswith("max_heads=1") and budget.selection == "none"
    assert budget.candidates.chosen.sum() == 1 and "relaxed_cv_accuracy" not in budget.candidates
    with_modes = fit(
        tiny, task, **kw
    )  # the default mode="auto": cross-validation chooses the mode at the budget's point
    assert with_modes.n_selected <= 1 and with_modes.selection_rule.startswith("max_heads=1")
    assert with_modes.selection == "cv" and len(with_modes.modes) == 3
    assert (with_modes.modes[with_modes.modes.delta].n_selected <= 1).all()
    plain = fit(tiny, task, layer=1, n_train=10, steps=2, relaxed=False, progress=False)
    assert not plain.relaxed and torch.equal(plain.intervention.deltas[1], plain.penalised.deltas[1])
    assert plain.cv_accuracy == plain.candidates[plain.candidates.chosen].penalised_cv_accuracy.iloc[0]
    with pytest.raises(FitError, match="max_heads is a head budget on one layer"):
        fit(tiny, task, "sweep", layers=[0, 1], max_heads=2, progress=False)
    with pytest.raises(FitError, match="max_heads must be a positive integer"):
        fit(tiny, task, max_heads=0, progress=False)
    with pytest.raises(FitError, match="rule must be"):
        fit(tiny, task, rule="lambda.min", progress=False)


def test_sweep_is_a_deprecated_name_of_candidates(tiny, task):
    result = fit(tiny, task, layer=1, group_l1_rel=0.3, n_train=8, steps=2, progress=False)
    with pytest.warns(DeprecationWarning, match="candidates"):
        assert result.sweep is result.candidates


def test_frontier_table_and_plot(tiny, task):
    from lens_laai.fitting.frontier import frontier, plot_frontier

    table = frontier(
        tiny, task, layer=1, n_train=8, group_l1_rel=[0.9, 0.3], steps=2, relaxed_steps=2, test=True, progress=False
    )
    assert len(table) == 2 and table.chosen_1se.sum() == 1 and table.chosen_min.sum() == 1
    assert {"n_selected", "relaxed_cv_accuracy_se", "relaxed_train_accuracy", "relaxed_test_accuracy"} <= set(table)
    fig = plot_frontier(table)
    assert fig.axes[0].get_xlabel() == "heads kept"
    with pytest.raises(FitError, match="one layer"):
        frontier(tiny, task, layer="sweep", progress=False)


def test_cli_reports_the_rule_the_frontier_and_stability(tmp_path, capsys):
    import json

    from lens_laai.cli.main import main
    from lens_laai.testing import TINY_PAIRS

    task = tmp_path / "tiny.json"
    task.write_text(json.dumps([{"input": a, "output": b} for a, b in TINY_PAIRS]))
    args = ["fit", "--task-file", str(task), "--n-train", "10", "--steps", "2", "--model", "lens-laai-tiny"]
    assert main([*args, "--no-progress", "--stability", "4", "--no-baselines", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "Sparsity–accuracy frontier at layer 2" in printed and "<-" in printed
    assert (
        "cross-validated cross-entropy, one-standard-error rule" in printed
        and "Stability over 4 complementary-pair subsamples" in printed
    )
    assert main([*args, "--no-progress", "--json", "--no-baselines", "--out", str(tmp_path / "b")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["selection_rule"] == "cv-1se-ce" and out["relaxed"] is True
    assert out["n_selected"] == len(out["selected_heads"]) and out["validation_accuracy"] is None
    assert out["valid_accuracy"] == out["cv_accuracy"], "the deprecated key keeps its old meaning for one release"
    for bad, message in ((["--stability", "3"], "even number"), (["--max-heads", "0"], "head budget")):
        assert main([*args, *bad, "--no-progress", "--out", str(tmp_path / "c")]) == 2
        assert message in capsys.readouterr().err
