"""Δ fitted with demonstrations, and the mode a fit chooses (zero-shot Δ, k-shot prompting, k-shot + Δ)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lens_laai import HeadIntervention, evaluate, fit, generate, load_intervention
from lens_laai.errors import FitError, InterventionError, TaskError
from lens_laai.fastpath import CostMeter
from lens_laai.fitting import FitConfig
from lens_laai.fitting.layer_fit import held_out_batches, scored_shots, training_batches
from lens_laai.fitting.modes import candidate_modes, choose_mode
from lens_laai.fitting.selection import HeldScores
from lens_laai.interventions.mode import Mode
from lens_laai.tasks.prompts import PromptTemplate, model_batches


@pytest.fixture(scope="module")
def fitted(tiny, task):
    return fit(tiny, task, layer=1, n_train=16, progress=False)


def test_training_prompts_split_the_pairs_between_the_numbers_of_demonstrations(tiny, task):
    train = task.split(0, 12).train
    batches = training_batches(tiny, train, train, FitConfig(shots=(0, 3), batch_size=4), PromptTemplate())
    prompts = [p for b in batches for p in b.prompts]
    queries = sorted(p.rsplit("Q: ", 1)[1] for p in prompts)
    assert queries == sorted(f"{x}\nA:" for x, _ in train.pairs)  # every pair once
    assert sorted(p.count("Q:") for p in prompts) == [1] * 6 + [4] * 6
    for p in prompts:  # a query is never its own demonstration
        x = p.rsplit("Q: ", 1)[1].removesuffix("\nA:")
        assert f"Q: {x}\nA:" not in p.rsplit("\n\n", 1)[0] or p.count("Q:") == 1
    assert all(len({p.count("Q:") for p in b.prompts}) == 1 for b in batches)  # one count per batch


def test_held_out_pairs_are_scored_at_every_count(tiny, task):
    splits = task.split(0, 12)
    cfg = FitConfig(shots=(0, 3), demos=5, batch_size=4)
    assert scored_shots(cfg) == (0, 5) and scored_shots(FitConfig(shots=2)) == (2,)
    prompts = [p for b in held_out_batches(tiny, splits.test, splits.train, cfg, PromptTemplate()) for p in b.prompts]
    n = len(splits.test)
    assert [p.count("Q:") for p in prompts] == [1] * n + [6] * n


def test_cost_unit_stays_one_zero_shot_prompt(tiny, task):
    """A fit on 5-shot prompts reports cost in zero-shot forwards, comparable with a zero-shot fit."""
    splits = task.split(0, 16)
    few = fit(tiny, splits, layer=1, mode="few-shot", select="none", group_l1_rel=0.1, steps=3, progress=False)
    zero = fit(tiny, splits, layer=1, mode="zero-shot", select="none", group_l1_rel=0.1, steps=3, progress=False)
    assert few.config.shots == (0, 5) and few.config.demos == 5 and zero.config.shots == 0
    meter = CostMeter()
    for b in model_batches(tiny, *_zero_shot(splits.train)):
        meter.register_prompts(b, tiny.cfg.n_layers)
    meter.fix_unit()
    b5 = model_batches(tiny, *_five_shot(splits.train))
    for b in b5:
        meter.register_prompts(b, tiny.cfg.n_layers)
        meter.add(float(b.attention_mask.sum()), tiny.cfg.n_layers, backward=False)
    assert meter.forward_equivalents() > 3 * len(splits.train)  # 5-shot prompts cost several zero-shot ones
    assert few.forward_equivalents > zero.forward_equivalents


def _zero_shot(train):
    from lens_laai.tasks.prompts import k_shot_prompts

    return k_shot_prompts(train, 0)


def _five_shot(train):
    from lens_laai.tasks.prompts import k_shot_prompts

    return k_shot_prompts(train, 5)


def _scores(zero_delta, five_delta, five_prompt):
    """HeldScores with one λ₂ point and one fold of n pairs scored at 0 and 5 shots."""
    rows = lambda c, ce: np.array([c, ce], dtype=float)
    n = len(zero_delta[0])
    held = {(0.5, "relaxed"): [np.concatenate([rows(*zero_delta), rows(*five_delta)], 1)]}
    prompting = [np.concatenate([rows([0] * n, [9.0] * n), rows(*five_prompt)], 1)]
    return HeldScores([0.5], (0, 5), {0.5: [2]}, held, prompting, [n])


def _right(*pairs: int, n: int = 10) -> tuple[list[int], list[float]]:
    """``n`` held-out pairs, right on the ones named (cross-entropy 1 everywhere)."""
    return [int(i in pairs) for i in range(n)], [1.0] * n


@pytest.mark.parametrize(
    "scores, winner",
    [
        ((([1, 1, 1, 0], [1] * 4), ([1, 0, 0, 0], [1] * 4), ([1, 1, 0, 0], [1] * 4)), "zero-shot Δ"),
        ((([1, 0, 0, 0], [1] * 4), ([1, 1, 1, 1], [1] * 4), ([1, 1, 0, 0], [1] * 4)), "5-shot prompting + Δ"),
        ((([1, 0, 0, 0], [1] * 4), ([1, 1, 0, 0], [1] * 4), ([1, 1, 1, 0], [1] * 4)), "5-shot prompting"),
        ((([1, 1, 0, 0], [2] * 4), ([1, 1, 0, 0], [0.5] * 4), ([1, 1, 0, 0], [1] * 4)), "5-shot prompting + Δ"),
    ],
)
def test_under_rule_min_the_best_cross_validated_mode_wins_ties_by_cross_entropy(scores, winner):
    choice = choose_mode(_scores(*scores), FitConfig(shots=(0, 5), rule="min"), [2], "relaxed")
    assert choice.mode.name == winner
    assert choice.table.chosen.sum() == 1 and choice.table.loc[choice.table.chosen, "mode"].item() == winner
    assert set(choice.table.columns) >= {"cv_accuracy", "cv_accuracy_se", "cv_ce", "cv_ce_se", "n_selected"}


@pytest.mark.parametrize(
    "scores, winner",
    [
        # zero-shot Δ right on 5 pairs the preferred mode misses, never the reverse: p = 1/32, it wins
        ((_right(0, 1, 2, 3, 4, 5), _right(5), _right(5)), "zero-shot Δ"),
        # 4 such pairs, ahead by 0.4 (more than one SE of the difference, 0.16): p = 1/16, not enough
        ((_right(0, 1, 2, 3, 5), _right(5), _right(5)), "5-shot prompting + Δ"),
        # prompting alone wins 6 and loses 1 (p = 0.0625): keep prompting + Δ
        ((_right(), _right(9), _right(0, 1, 2, 3, 4, 5)), "5-shot prompting + Δ"),
        # prompting alone wins 7 and loses none (p = 1/128)
        ((_right(), _right(), _right(0, 1, 2, 3, 4, 5, 6)), "5-shot prompting"),
        # one pair ahead is exactly one SE of the paired difference: never a reason to leave
        ((_right(0, 1), _right(1), _right(1)), "5-shot prompting + Δ"),
        # zero-shot Δ leads (0.70) but wins 12 and loses 6 (p = 0.12); prompting alone (0.65) wins 5 of 5
        (
            (_right(*range(6, 20), n=20), _right(*range(8), n=20), _right(*range(13), n=20)),
            "5-shot prompting",
        ),
        # a tie goes to the preferred mode whatever the cross-entropies say
        ((([1, 1, 0, 0], [0.1] * 4), ([1, 1, 0, 0], [3.0] * 4), ([1, 1, 0, 0], [1] * 4)), "5-shot prompting + Δ"),
    ],
)
def test_under_rule_1se_prompting_plus_delta_is_left_only_for_a_significantly_better_mode(scores, winner):
    choice = choose_mode(_scores(*scores), FitConfig(shots=(0, 5)), [2], "relaxed")
    assert choice.mode.name == winner
    assert choice.table.loc[choice.table.chosen, "mode"].item() == winner
    table = choice.table.set_index("mode")
    assert np.isnan(table.loc["5-shot prompting + Δ", ["wins", "losses", "p_better"]].astype(float)).all()
    others = table.drop("5-shot prompting + Δ")
    assert ((others.p_better <= 0.05) == (others.index == winner)).all()


def test_the_mode_table_counts_the_pairs_where_a_mode_disagrees_with_the_preferred_one():
    choice = choose_mode(_scores(_right(0, 1, 2), _right(2, 3), _right(3, 4, 5)), FitConfig(shots=(0, 5)), [2])
    table = choice.table.set_index("mode")
    assert table.loc["zero-shot Δ", ["wins", "losses"]].tolist() == [2, 1]
    assert table.loc["5-shot prompting", ["wins", "losses"]].tolist() == [2, 1]
    assert table.loc["zero-shot Δ", "p_better"] == pytest.approx(0.5)  # 2 of 3 disagreements: P(X ≥ 2), X ~ Bin(3, ½)


def test_candidate_modes():
    assert [m.name for m in candidate_modes("auto", (0, 5))] == [
        "zero-shot Δ",
        "5-shot prompting + Δ",
        "5-shot prompting",
    ]
    assert [m.name for m in candidate_modes("zero-shot", 0)] == ["zero-shot Δ"]
    assert [m.name for m in candidate_modes("few-shot", (0, 3))] == ["3-shot prompting + Δ"]


def test_default_fit_records_the_mode_it_chose(fitted, tiny, task, tmp_path):
    assert fitted.config.shots == (0, 5) and fitted.config.demos == 5 and fitted.config.mode == "auto"
    assert len(fitted.modes) == 3 and fitted.modes.chosen.sum() == 1
    chosen = fitted.modes.loc[fitted.modes.chosen, "mode"].item()
    assert fitted.mode.name == chosen
    iv = fitted.intervention
    assert Mode.of(iv.metadata) == fitted.mode
    if fitted.mode.shots:
        assert len(fitted.mode.demonstrations) == fitted.mode.shots
        assert set(fitted.mode.demonstrations) <= set(fitted.splits.train.pairs)
    iv.save(tmp_path / "iv")
    loaded = load_intervention(tmp_path / "iv", tiny)
    assert Mode.of(loaded.metadata) == fitted.mode
    result = evaluate(tiny, task, loaded)
    assert result.mode == fitted.mode.name
    demos_per_prompt = {p.count("Q:") - 1 for p in result.table.prompt}
    assert demos_per_prompt == {fitted.mode.shots}


def test_evaluate_with_explicit_shots_adds_delta_to_k_shot_prompts(fitted, tiny, task):
    iv = fitted.intervention
    zero = evaluate(tiny, task, iv, shots=0)
    assert zero.mode == "zero-shot Δ" and {p.count("Q:") for p in zero.table.prompt} == {1}
    three = evaluate(tiny, task, iv, shots=3)
    assert three.mode == "3-shot prompting + Δ"
    plain = evaluate(tiny, task, shots=3, seed=fitted.splits.seed, n_train=16)
    assert plain.mode == "3-shot prompting"
    assert (three.table.prompt == plain.table.prompt).all()
    assert not np.allclose(three.table.target_logprob, plain.table.target_logprob)  # Δ acted
    with pytest.raises(TaskError, match="shots must be an integer"):
        evaluate(tiny, task, iv, shots=-1)


def test_a_prompting_mode_does_not_add_delta(tiny, task):
    iv = HeadIntervention.zeros(tiny, 1)
    iv.deltas[1][0] = 3.0
    iv.metadata["mode"] = Mode(2, False).to_json()
    splits = task.split(0, 8)
    chosen = evaluate(tiny, splits, iv)
    plain = evaluate(tiny, splits, shots=2)
    assert chosen.mode == "2-shot prompting"
    assert np.allclose(chosen.table.target_logprob, plain.table.target_logprob)


def test_sums_of_fits_carry_no_mode_and_act_zero_shot(fitted, tiny, task):
    both = fitted.intervention + fitted.intervention
    assert "mode" not in both.metadata
    assert evaluate(tiny, task, both).mode == "zero-shot Δ"


def test_zero_shot_mode_is_the_papers_fit(tiny, task):
    result = fit(tiny, task, layer=1, n_train=16, mode="zero-shot", progress=False)
    assert result.config.shots == 0 and result.mode == Mode(0, True)
    assert result.modes["mode"].tolist() == ["zero-shot Δ"]
    assert {p.count("Q:") for p in evaluate(tiny, task, result.intervention).table.prompt} == {1}


def test_generate_follows_the_recorded_mode(tiny):
    iv = HeadIntervention.zeros(tiny, 1)
    iv.deltas[1][1] = 2.0
    demos = (("hot", "cold"), ("up", "down"))
    iv.metadata.update(template=PromptTemplate().to_json(), mode=Mode(2, True, demos).to_json())
    prefix = PromptTemplate().prefix(demos)
    prompt = "Q: big\nA:"
    assert generate(tiny, prompt, iv, max_new_tokens=3) == generate(tiny, prefix + prompt, iv, 3, shots=0)
    assert generate(tiny, prompt, iv, 3, shots=1) == generate(
        tiny, PromptTemplate().prefix(demos[:1]) + prompt, iv, 3, shots=0
    )
    iv.metadata["mode"] = Mode(2, False, demos).to_json()
    assert generate(tiny, prompt, iv, max_new_tokens=3) == generate(tiny, prefix + prompt, None, 3)
    with pytest.raises(TaskError, match="records 2"):
        generate(tiny, prompt, iv, 3, shots=3)
    with pytest.raises(TaskError, match="records 0"):
        generate(tiny, prompt, None, 3, shots=1)


def test_bad_modes_and_shots_are_refused_before_any_work(tiny, task):
    with pytest.raises(FitError, match="mode must be"):
        fit(tiny, task, layer=1, mode="sometimes", progress=False)
    with pytest.raises(FitError, match="shots must be"):
        fit(tiny, task, layer=1, shots=[0, -2], progress=False)
    with pytest.raises(FitError, match="one layer"):
        fit(tiny, task, layer="sweep", layers=[0, 1], mode="few-shot", progress=False)
    with pytest.raises(InterventionError, match="mode"):
        Mode.from_json({"shots": "5", "delta": True})


def test_small_n_fits_fall_back_to_zero_shot_prompts(tiny, task):
    result = fit(tiny, task, layer=1, n_train=2, folds=2, steps=2, progress=False)
    assert result.config.shots == 0 and result.mode.name == "zero-shot Δ"


def test_cli_fit_reports_the_mode_and_eval_uses_it(tmp_path, capsys):
    from lens_laai.cli.main import main
    from lens_laai.testing import TINY_PAIRS

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps([{"input": a, "output": b} for a, b in TINY_PAIRS]))
    tiny = ["--model", "lens-laai-tiny", "--no-progress", "--task-file", str(path)]
    args = ["fit", *tiny, "--layer", "1", "--n-train", "16", "--steps", "2", "--no-baselines", "--json"]
    assert main([*args, "--out", str(tmp_path / "iv")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] in {"zero-shot Δ", "5-shot prompting + Δ", "5-shot prompting"}
    assert [m["mode"] for m in summary["modes"]] == ["zero-shot Δ", "5-shot prompting + Δ", "5-shot prompting"]
    assert summary["mode_rule"] == "1se" and 0 <= summary["zero_shot_delta_accuracy"] <= 1
    assert main(["eval", *tiny, "--intervention", str(tmp_path / "iv"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["mode"] == summary["mode"] and ev["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert main([*args, "--mode", "zero-shot", "--out", str(tmp_path / "z")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "zero-shot Δ"
    assert main([*args, "--mode", "often", "--out", str(tmp_path / "x")]) == 2
    assert "--mode" in capsys.readouterr().err
    assert main([*args, "--shots", "0,x", "--out", str(tmp_path / "y")]) == 2
    assert "--shots" in capsys.readouterr().err


@pytest.mark.parametrize(
    "rule, words",
    [("1se", "unless another way is significantly better"), ("min", "the best CV accuracy")],
)
def test_the_printed_modes_table_names_the_rule_that_picked(rule, words, capsys):
    from lens_laai.cli.fit_report import print_modes

    row = {"delta": True, "n_selected": 1, "cv_accuracy": 0.5, "cv_accuracy_se": 0.1, "cv_ce": 2.0, "cv_ce_se": 0.3}
    print_modes(
        [
            {**row, "mode": "zero-shot Δ", "chosen": False, "wins": 3.0, "losses": 1.0, "p_better": 0.3125},
            {**row, "mode": "5-shot prompting + Δ", "chosen": True, "wins": None, "losses": None, "p_better": None},
        ],
        rule,
    )
    out = capsys.readouterr().out
    assert words in out
    assert ("3–1, p 0.312" in out) == (rule == "1se")
