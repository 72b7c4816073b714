"""The honest protocol: layer and λ₂ chosen from the n training pairs alone (cross-validation),
λ₂ relative to λ_max, successive halving, and the mean-difference starting point."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch

from lens_laai import FitError, evaluate, fit, fit_path
from lens_laai.fastpath import CostMeter, LayerRunner
from lens_laai.fitting import FitConfig
from lens_laai.fitting.layer_fit import initial_delta, lambda_max, training_batches
from lens_laai.fitting.selection import choose, cross_validate, fold_splits, pooled_cv_scores
from lens_laai.tasks.prompts import PromptTemplate


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_folds_partition_the_training_pairs(task):
    train = task.subset(list(range(11)))
    parts = fold_splits(train, 3, seed=4)
    held = [p for _, h in parts for p in h.pairs]
    assert sorted(held) == sorted(train.pairs)  # every pair is held out exactly once
    for fit_part, held_part in parts:
        assert not set(fit_part.pairs) & set(held_part.pairs)
        assert len(fit_part) + len(held_part) == len(train)
    assert fold_splits(train, 3, seed=4)[0][1].pairs == parts[0][1].pairs  # seeded
    assert fold_splits(train, 3, seed=5)[0][1].pairs != parts[0][1].pairs
    with pytest.raises(FitError, match="folds must be"):
        fold_splits(train, 12, seed=0)
    with pytest.raises(FitError, match="folds must be"):
        fold_splits(train, 1, seed=0)


def test_default_fit_uses_only_the_training_pairs(tiny, task):
    from lens_laai.fitting import auto_layer
    from lens_laai.fitting.fit import DEFAULT_GROUP_L1_REL, STEPS_PER_POINT

    result = fit(tiny, task, n_train=10, progress=False)
    assert result.selection == "cv" and result.config.select == "cv" and result.selection_rule == "cv-1se-ce"
    assert result.layer == auto_layer(tiny.cfg.n_layers) == 2 and result.intervention.layers == [2]
    assert result.config.n_valid == 0 and len(result.splits.valid) == 0
    assert result.config.steps == STEPS_PER_POINT and result.config.relative and result.relaxed
    path = result.candidates  # the frontier: one row per λ₂ of the default path, the pick marked
    assert path.group_l1_rel.tolist() == list(DEFAULT_GROUP_L1_REL) and path.chosen.sum() == 1
    pick = path[path.chosen].iloc[0]
    assert result.config.group_l1 == pick.group_l1_rel and result.n_selected == pick.n_selected
    assert result.cv_accuracy == pick.relaxed_cv_accuracy and result.cv_accuracy_se == pick.relaxed_cv_accuracy_se
    assert result.history.shape[0] == STEPS_PER_POINT  # the penalised fit's last λ₂
    assert result.penalised.selected_heads() == result.selected_heads  # the relaxed refit keeps the support
    assert len(result.splits.test) == len(task) - 10
    record = result.intervention.metadata["data"][0]
    assert record["n_valid"] == 0 and len(record["seen"]) == 10
    assert evaluate(tiny, task, result.intervention).n == len(task) - 10
    joint = fit(tiny, task, "joint", n_train=10, layers=[0, 1], steps=3, progress=False)
    assert joint.selection == "cv" and joint.config.layer == "joint"
    with pytest.raises(FitError, match="layer='sweep'"):
        fit(tiny, task, layers=[0, 1], progress=False)


def test_auto_layer_rule():
    from lens_laai.fitting import auto_layer

    assert auto_layer(30) == 16 and auto_layer(32) == 17 and auto_layer(1) == 0 and auto_layer(2) == 1


def test_sweep_refits_the_cross_validated_choice(tiny, task):
    result = fit(tiny, task, "sweep", n_train=10, layers=[0, 1], steps=3, progress=False)
    assert result.selection == "cv" and isinstance(result.config.layer, int)
    chosen = result.candidates.sort_values(["cv_accuracy", "cv_ce"], ascending=[False, True], kind="stable").iloc[0]
    assert (result.layer, result.config.group_l1) == (int(chosen.layer), float(chosen.lam))
    assert result.cv_accuracy == pytest.approx(chosen.cv_accuracy) and math.isnan(result.valid_accuracy)
    assert result.intervention.layers == [result.layer]


def test_validation_protocol_is_still_there_and_labelled(tiny, task):
    result = fit(tiny, task, "sweep", n_train=8, n_valid=4, layers=[0, 1], steps=2, select="valid", progress=False)
    assert result.selection == "valid"
    assert result.intervention.metadata["selection"] == "valid"
    forced = fit(tiny, task, "sweep", n_train=8, n_valid=4, layers=[0, 1], steps=2, select="cv", progress=False)
    assert forced.selection == "cv"
    with pytest.warns(FutureWarning, match="select='auto' is deprecated; here it chose select='valid'"):
        auto = fit(tiny, task, "sweep", n_train=8, n_valid=4, layers=[0, 1], steps=2, select="auto", progress=False)
    assert auto.selection == "valid"


def test_one_candidate_needs_no_selection(tiny, task):
    result = fit(tiny, task, layer=1, group_l1_rel=0.3, n_train=8, steps=2, progress=False)
    assert result.selection == "none" and len(result.candidates) == 1
    path = fit(tiny, task, layer=1, group_l1_rel=[0.5, 0.1], n_train=8, steps=2, select="none", progress=False)
    assert path.selection == "none" and path.config.group_l1 == 0.1  # the path's last value, no choice made
    assert path.selection_rule == "last"
    chosen = fit(tiny, task, layer=1, group_l1_rel=[0.5, 0.1], n_train=8, steps=2, select="cv", progress=False)
    assert chosen.selection == "cv"


def test_relative_lambda_is_a_fraction_of_lambda_max(tiny, task):
    splits = task.split(0, 10, 4)
    table, ivs = fit_path(tiny, splits, 1, [1.05, 0.3], relative=True, steps=5, progress=False)
    assert table.n_selected.iloc[0] == 0  # above λ_max nothing enters, from Δ = 0
    assert table.n_selected.iloc[1] > 0
    assert table.group_l1.iloc[1] == pytest.approx(0.3 * table.lambda_max.iloc[1])
    assert ivs[0].metadata["fit_config"]["relative"] is True


def test_lambda_max_is_the_largest_soft_thresholded_head_gradient(tiny, task):
    cfg = FitConfig(l1=0.0)
    runner = LayerRunner(tiny, training_batches(tiny, task.subset(list(range(8))), task, cfg, PromptTemplate()), 1)
    lam = lambda_max(runner, cfg)
    zero = torch.zeros(tiny.cfg.n_heads, tiny.cfg.d_head, requires_grad=True)
    from lens_laai.fitting.layer_fit import objective

    _, grad = objective(runner, cfg)[0](zero)
    assert lam == pytest.approx(float(grad.norm(dim=-1).max()), rel=1e-5)
    with pytest.raises(FitError, match="λ_max"):
        lambda_max(runner, FitConfig(l1=1e6))


def test_halving_drops_the_worse_half_of_the_layers_after_each_lambda(tiny, task):
    cfg = FitConfig(steps=2, folds=2)
    train = task.subset(list(range(10)))
    table = cross_validate(tiny, train, [0, 1, 2], [0.6, 0.3, 0.1], cfg, PromptTemplate(), CostMeter(), progress=False)
    per_lam = table.groupby("lam").layer.nunique().sort_index(ascending=False).tolist()
    assert per_lam == [3, 2, 1]
    first = pooled_cv_scores(table[table.lam == 0.6]).sort_values(
        ["cv_accuracy", "cv_ce"], ascending=[False, True], kind="stable"
    )
    assert set(table[table.lam == 0.3].layer) == set(first.layer.iloc[:2])  # the best two went on
    full = cross_validate(
        tiny,
        train,
        [0, 1, 2],
        [0.6, 0.3, 0.1],
        FitConfig(steps=2, folds=2, halving=False),
        PromptTemplate(),
        CostMeter(),
        progress=False,
    )
    assert len(full) == 3 * 3 * 2
    shared = table.merge(full, on=["layer", "lam", "fold"], suffixes=("", "_full"))
    assert (shared.held_ce - shared.held_ce_full).abs().max() < 1e-5  # halving changes what runs, not the fits


def test_choose_prefers_accuracy_then_cross_entropy():
    table = pd.DataFrame(
        [
            {"layer": 0, "lam": 0.5, "fold": 0, "n_held": 2, "held_accuracy": 0.5, "held_ce": 1.0, "n_selected": 1},
            {"layer": 1, "lam": 0.5, "fold": 0, "n_held": 2, "held_accuracy": 0.5, "held_ce": 0.8, "n_selected": 1},
            {"layer": 2, "lam": 0.5, "fold": 0, "n_held": 2, "held_accuracy": 0.0, "held_ce": 0.1, "n_selected": 1},
        ]
    )
    assert choose(table)["layer"] == 1


def test_mean_difference_start(tiny, task):
    cfg = FitConfig(init="mean-difference")
    train = task.subset(list(range(8)))
    start = initial_delta(tiny, train, 1, cfg, PromptTemplate(), CostMeter())
    assert start.shape == (tiny.cfg.n_heads, tiny.cfg.d_head) and start.abs().sum() > 0
    result = fit(tiny, task, layer=1, group_l1_rel=0.1, n_train=8, init="mean-difference", steps=2, progress=False)
    assert result.config.init == "mean-difference"
    with pytest.raises(FitError, match="init"):
        fit(tiny, task, layer=1, init="fv", progress=False)
    with pytest.raises(FitError, match="n_train ≥ 2"):
        initial_delta(tiny, task.subset([0]), 1, cfg, PromptTemplate(), CostMeter())


def test_bad_selection_options(tiny, task):
    with pytest.raises(FitError, match="select must be"):
        fit(tiny, task, select="test", progress=False)
    with pytest.raises(FitError, match="folds must be"):
        fit(tiny, task, folds=1, progress=False)
    with pytest.raises(FitError, match="folds must be an integer within"):
        fit(tiny, task, "sweep", n_train=3, folds=4, layers=[0, 1], steps=1, progress=False)
    with pytest.raises(FitError, match="group_l1_rel must be finite"):
        fit(tiny, task, group_l1_rel=float("nan"), progress=False)
    with pytest.raises(FitError, match="group_l1_rel must be a number"):
        fit(tiny, task, group_l1_rel=[], progress=False)
    with pytest.raises(FitError, match="halving"):
        fit(tiny, task, halving="yes", progress=False)
    with pytest.raises(FitError, match="smallest fitting part has 1 of the 3"):
        fit(tiny, task, "sweep", n_train=3, folds=2, init="mean-difference", layers=[0, 1], progress=False)
    with pytest.raises(FitError, match="for tasks"):
        from lens_laai.opinions.fit import fit_opinion
        from lens_laai.opinions.survey import toy_survey

        fit_opinion(tiny, toy_survey(), "AGE=Old", "joint", progress=False)


def test_the_fit_records_its_whole_lambda_path(tiny, task):
    from lens_laai.fitting.fit import DEFAULT_GROUP_L1_REL

    result = fit(tiny, task, layer=1, n_train=8, steps=2, select="none", progress=False)
    assert result.intervention.metadata["group_l1_path"] == list(DEFAULT_GROUP_L1_REL)
    assert result.intervention.metadata["selection_rule"] == "last" and result.intervention.metadata["relaxed"]


def test_joint_fit_chooses_layers_and_heads_together(tiny, task):
    result = fit(tiny, task, layer="joint", layers=[0, 1, 2], n_train=10, steps=4, progress=False)
    iv = result.intervention
    assert result.config.layer == "joint" and result.selection == "cv"
    assert set(iv.layers) <= {0, 1, 2} and result.layer in iv.layers
    norms = iv.head_norms()
    assert norms.shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)
    from lens_laai.fastpath import LayerRunner
    from lens_laai.fitting.layer_fit import delta_hooks, objective

    # the joint objective is the sum of per-layer edits: Δ on layer 1 alone equals a joint Δ zero elsewhere
    cfg = FitConfig()
    runner = LayerRunner(tiny, training_batches(tiny, task.subset(list(range(6))), task, cfg, PromptTemplate()), 0)
    single = torch.randn(tiny.cfg.n_heads, tiny.cfg.d_head) * 0.3
    joint = torch.zeros(3 * tiny.cfg.n_heads, tiny.cfg.d_head)
    joint[tiny.cfg.n_heads : 2 * tiny.cfg.n_heads] = single
    _, f_joint = objective(runner, cfg, (0, 1, 2))
    assert f_joint(joint) == pytest.approx(runner.scores(delta_hooks(1, single))[1], rel=1e-4)
    assert len(delta_hooks((0, 1, 2), joint)) == 3


def test_evaluate_rows_keep_the_task_order_when_batched_by_length(tiny, task):
    splits = task.split(0, 8, 0)
    result = evaluate(tiny, splits, shots=3, batch_size=2)
    assert result.table.input.tolist() == splits.test.inputs
    assert result.table.target.tolist() == [t for _, t in splits.test.pairs]
    assert all(row.prompt.endswith(f"{row.input}\nA:") for row in result.table.itertuples())
