"""Opinion dynamics: prompts, the letter readout, divergences, fitting, held-out evaluation and the CLI."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from lens_laai import HeadIntervention
from lens_laai.cli.main import main
from lens_laai.errors import FitError, InterventionError, TaskError
from lens_laai.opinions.evaluate import (
    compare_methods,
    distributions,
    evaluate_opinion,
    few_shot_demos,
)
from lens_laai.opinions.fit import fit_opinion, opinion_batches
from lens_laai.opinions.loading import load_survey
from lens_laai.opinions.metrics import divergence, question_metrics, representativeness
from lens_laai.opinions.prompts import (
    OpinionPrompt,
    answer_distribution,
    letter_tokens,
    option_log_probs,
    question_batches,
)
from lens_laai.opinions.survey import Survey, SurveyQuestion, toy_survey

TINY = ["--model", "lens-laai-tiny", "--no-progress"]


@pytest.fixture(scope="module")
def survey():
    return toy_survey()


@pytest.fixture(scope="module")
def splits(survey):
    return survey.split(0, 3, 1)


@pytest.fixture(scope="module")
def fitted(tiny, survey, splits):
    return fit_opinion(tiny, survey, "PARTY=Red", 1, splits=splits, steps=8, group_l1=(0.05, 0.01), progress=False)


def test_prompt_format_is_the_issue_s():
    q = SurveyQuestion("k", "Should we?", ("Yes", "No"), (1.0, 2.0), ("Refused",))
    assert OpinionPrompt().render(q) == "Question: Should we?\nA. Yes\nB. No\nC. Refused\nAnswer:"


def test_letter_tokens_use_single_token_variants_only(tiny):
    letters = letter_tokens(tiny.tokenizer, 3)
    tok = tiny.tokenizer
    for i, letter in enumerate("ABC"):
        assert tok.convert_ids_to_tokens(int(letters[i, 1])) == letter
        spaced = tok(" " + letter, add_special_tokens=False)["input_ids"]
        assert (letters[i, 0] == spaced[0]) if len(spaced) == 1 else letters[i, 0] == -1

    class NoLetters:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2]}

    with pytest.raises(TaskError, match="single token"):
        letter_tokens(NoLetters(), 2)


def test_readout_matches_opinionqa_get_probabilities(tiny):
    """max over ' X' / 'X', renormalised over ordinal options; refusal share of all listed options."""
    q3 = SurveyQuestion("a", "x?", ("Yes", "No"), (1.0, 2.0), ("Refused",))
    q2 = SurveyQuestion("b", "y?", ("L", "M", "H"), (1.0, 2.0, 3.0))
    qb = question_batches(tiny, [q3, q2], ["p", "q"])[0]
    letters = torch.tensor([[10, 11], [12, -1], [13, 14]])
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(0))
    lp = torch.log_softmax(logits, -1).numpy()
    log_dm, refusal = answer_distribution(option_log_probs(logits, letters), qb)
    for row, n_ord, n_all in ((0, 2, 3), (1, 3, 3)):
        per_letter = np.array([max(lp[row, 10], lp[row, 11]), lp[row, 12], max(lp[row, 13], lp[row, 14])])[:n_all]
        probs = np.exp(per_letter)
        np.testing.assert_allclose(log_dm[row, :n_ord].exp().numpy(), probs[:n_ord] / probs[:n_ord].sum(), rtol=1e-5)
        assert float(refusal[row]) == pytest.approx(probs[n_ord:].sum() / probs.sum(), abs=1e-6)
    assert torch.isinf(log_dm[0, 2])  # the refusal option is not part of the distribution


def test_torch_divergences_agree_with_the_held_out_metrics(tiny):
    q = SurveyQuestion(
        "c", "z?", ("Positive", "Negative", "Mixed"), (1.0, 2.0, 1.5)
    )  # OpinionQA-style unsorted ordinals
    target = np.array([0.5, 0.1, 0.4])
    qb = question_batches(tiny, [q], ["p"], [target])[0]
    model_q = torch.tensor([[0.2, 0.5, 0.3]])
    kl = divergence("kl", model_q.log(), qb)
    w1 = divergence("w1", model_q.log(), qb)
    m = question_metrics(target, model_q[0].numpy(), q.ordinal)
    assert float(kl) == pytest.approx(m["kl"], rel=1e-5)
    assert float(w1) == pytest.approx(
        wasserstein_distance(q.ordinal, q.ordinal, target, model_q[0].numpy()) / 1.0, rel=1e-5
    )
    assert float(w1) == pytest.approx(m["w1"], rel=1e-5)
    same = torch.tensor(target[None], dtype=torch.float32)
    for kind in ("kl", "js", "w1"):
        assert float(divergence(kind, same.log(), qb)) == pytest.approx(0.0, abs=1e-6)
    assert m["tv"] == pytest.approx(0.4) and representativeness([0.2, 0.4]) == pytest.approx(0.7)


def test_fit_lowers_the_training_divergence_and_records_the_split(tiny, survey, splits, fitted):
    iv = fitted.intervention
    zero = HeadIntervention.from_deltas(tiny, {1: torch.zeros(4, 16)})
    before = evaluate_opinion(tiny, survey, "PARTY=Red", zero, splits=splits, split="train").scores()["kl"]
    after = evaluate_opinion(tiny, survey, "PARTY=Red", iv, split="train").scores()["kl"]
    assert after < 0.8 * before
    # the fit's own (fast-path) training divergence is what the full forward reads too
    assert fitted.train_divergence == pytest.approx(after, rel=1e-3)
    record = iv.metadata["survey"]
    assert record["group"] == "PARTY=Red" and record["hash"] == survey.data_hash()
    assert (record["train"], record["valid"], record["test"]) == (
        list(splits.train),
        list(splits.valid),
        list(splits.test),
    )
    assert iv.metadata["opinion_prompt"] == OpinionPrompt().to_json()
    assert set(fitted.sweep["group_l1"]) == {0.05, 0.01} and fitted.fast_path


def test_large_group_penalty_switches_every_head_off_exactly(tiny, survey, splits):
    result = fit_opinion(tiny, survey, "PARTY=Red", 1, splits=splits, steps=4, group_l1=50.0, progress=False)
    assert result.selected_heads == [] and torch.count_nonzero(result.intervention.deltas[1]) == 0


def test_same_seed_same_delta_and_shared_runners_change_nothing(tiny, survey, splits, fitted):
    runners = {}
    again = fit_opinion(
        tiny, survey, "PARTY=Red", 1, splits=splits, steps=8, group_l1=(0.05, 0.01), progress=False, runners=runners
    )
    assert torch.equal(again.intervention.deltas[1], fitted.intervention.deltas[1])
    blue = fit_opinion(tiny, survey, "PARTY=Blue", 1, splits=splits, steps=8, progress=False, runners=runners)
    alone = fit_opinion(tiny, survey, "PARTY=Blue", 1, splits=splits, steps=8, progress=False)
    assert len(runners) == 2 and torch.equal(blue.intervention.deltas[1], alone.intervention.deltas[1])


def test_layer_sweep_is_the_lowest_validation_divergence(tiny, survey, splits):
    result = fit_opinion(
        tiny, survey, "AGE=Old", splits=splits, layers=[0, 1, 2], steps=3, group_l1=0.01, progress=False
    )
    assert len(result.sweep) == 3
    assert result.layer == int(result.sweep.loc[result.sweep.valid_divergence.idxmin(), "layer"])
    with pytest.warns(FutureWarning, match="layer='auto'\\) is now layer='sweep'"):
        old = fit_opinion(
            tiny, survey, "AGE=Old", "auto", splits=splits, layers=[0, 1, 2], steps=3, group_l1=0.01, progress=False
        )
    assert old.layer == result.layer


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"group_l1": float("nan")}, FitError, "group_l1 must be"),
        ({"steps": 0}, FitError, "steps must be"),
        ({"divergence": "hellinger"}, FitError, "divergence must be one of"),
        ({"layer": 7}, FitError, "out of range"),
    ],
)
def test_bad_fit_options_are_refused_before_work(tiny, survey, kwargs, error, message):
    with pytest.raises(error, match=message):
        fit_opinion(tiny, survey, "PARTY=Red", **{"layer": 1, **kwargs}, progress=False)


def test_splits_and_split_settings_together_are_refused(tiny, survey, splits):
    with pytest.raises(FitError, match="seed cut a split, but splits= is already given"):
        fit_opinion(tiny, survey, "PARTY=Red", 1, splits=splits, seed=1, progress=False)


def test_evaluation_reproduces_the_held_out_questions_and_refuses_mismatches(tiny, survey, splits, fitted):
    iv = fitted.intervention
    result = evaluate_opinion(tiny, survey, "party=red", iv)
    assert list(result.table["key"]) == list(splits.test)
    changed = Survey.from_json({**survey.to_json(), "name": "toy"})
    changed.groups["PARTY=Red"].answers.pop("Q7")
    with pytest.raises(TaskError, match="Cannot reproduce the held-out questions"):
        evaluate_opinion(tiny, changed, "PARTY=Red", iv)
    with pytest.raises(TaskError, match="fitted for group 'PARTY=Red', not 'PARTY=Blue'"):
        evaluate_opinion(tiny, survey, "PARTY=Blue", iv)
    with pytest.raises(TaskError, match="seed=1 \\(fitted with 0\\)"):
        evaluate_opinion(tiny, survey, "PARTY=Red", iv, seed=1)
    leaky = type(splits)(splits.train, splits.valid, splits.train, 0)
    with pytest.raises(TaskError, match="were used to fit this intervention"):
        evaluate_opinion(tiny, survey, "PARTY=Red", iv, splits=leaky)
    bare = HeadIntervention.from_deltas(tiny, {1: iv.deltas[1].clone()})
    with pytest.raises(InterventionError, match="no survey record"):
        evaluate_opinion(tiny, survey, "PARTY=Red", bare)
    assert (iv + iv).metadata["survey"] == iv.metadata["survey"]  # algebra keeps the record (issue 23)


def test_baselines_score_the_same_questions_and_zero_delta_is_the_plain_prompt(tiny, survey, splits, fitted):
    zero = HeadIntervention.from_deltas(tiny, {1: torch.zeros(4, 16)})
    result = compare_methods(tiny, survey, "PARTY=Red", splits, {"zero": zero, "laai": fitted.intervention})
    table = result.table
    assert set(table["method"]) == {"plain", "persona", "few_shot", "zero", "laai"}
    for _, part in table.groupby("method"):
        assert list(part["key"]) == list(splits.test)
    plain, zero_rows = table[table.method == "plain"], table[table.method == "zero"]
    np.testing.assert_allclose(
        np.concatenate(list(plain["model"])), np.concatenate(list(zero_rows["model"])), atol=1e-6
    )
    summary = result.summary().set_index("method")
    assert ((summary["representativeness"] > 0) & (summary["representativeness"] <= 1)).all()
    assert (summary["tv"] >= 0).all() and (summary["refusal_model"] > 0).all()  # toy questions list 'Refused'
    persona = np.concatenate(list(table[table.method == "persona"]["model"]))
    assert not np.allclose(persona, np.concatenate(list(plain["model"])))


def test_few_shot_demos_are_the_group_s_majority_answers(survey, splits):
    group = survey.group("AGE=Old")
    demos = few_shot_demos(survey, group, splits.train, None, 0)
    assert sorted(q.key for q, _ in demos) == sorted(splits.train)
    for q, answer in demos:
        assert answer == int(np.argmax(group.answers[q.key].distribution))
    text = OpinionPrompt().render(survey.questions[splits.test[0]], demos)
    assert text.count("Question:") == len(demos) + 1 and text.endswith("Answer:")
    with pytest.raises(TaskError, match="shots must be"):
        few_shot_demos(survey, group, splits.train, 9, 0)


def test_questions_a_group_did_not_answer_are_left_out(tiny, survey, splits):
    data = survey.to_json()
    data["groups"]["PARTY=Red"]["answers"].pop(splits.test[0])
    partial = Survey.from_json(data)
    table = distributions(tiny, partial, partial.group("PARTY=Red"), splits.test)
    assert list(table["key"]) == list(splits.test[1:])
    assert len(opinion_batches(tiny, partial, partial.group("PARTY=Red"), splits.test[:1], OpinionPrompt())) == 0


# command line -------------------------------------------------------------------------------------
@pytest.fixture()
def survey_file(tmp_path, survey):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(survey.to_json()))
    return path


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_fit_then_eval_round_trip(tmp_path, survey_file, capsys):
    args = [
        "fit",
        "--survey",
        str(survey_file),
        "--group",
        "PARTY=Blue",
        "--layer",
        "1",
        "--n-train-questions",
        "3",
        "--n-valid-questions",
        "1",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "iv"),
        "--json",
        *TINY,
    ]
    assert main(args) == 0
    out = last_json(capsys)
    for key in ("layer", "selected_heads", "n_test_questions", "test_representativeness", "test_kl", "test_tv"):
        assert key in out, key
    assert out["layer"] == 1 and out["n_test_questions"] == 4 and out["group"] == "PARTY=Blue"
    assert set(out["baselines"]) == {"plain", "persona", "few_shot"}
    for scores in out["baselines"].values():
        assert scores["n_questions"] == 4 and 0 < scores["representativeness"] <= 1 and scores["kl"] >= 0
    assert main(["eval", "--survey", str(survey_file), "--intervention", str(tmp_path / "iv"), "--json", *TINY]) == 0
    ev = last_json(capsys)
    assert ev["questions"] == out["test_questions"] and ev["group"] == "PARTY=Blue"
    assert ev["representativeness"] == pytest.approx(out["test_representativeness"], abs=1e-9)
    assert ev["kl"] == pytest.approx(out["test_kl"], abs=1e-9)
    assert (
        main(
            [
                "eval",
                "--survey",
                str(survey_file),
                "--group",
                "PARTY=Blue",
                "--method",
                "persona",
                "--n-train-questions",
                "3",
                "--n-valid-questions",
                "1",
                "--json",
                *TINY,
            ]
        )
        == 0
    )
    assert last_json(capsys)["representativeness"] == pytest.approx(out["baselines"]["persona"]["representativeness"])


def test_cli_survey_dir_and_bundled_gss(tmp_path, capsys):
    from test_survey import write_opinionqa

    folder = write_opinionqa(tmp_path / "W1")
    assert (
        main(
            [
                "fit",
                "--survey-dir",
                str(folder),
                "--group",
                "SEX=Female",
                "--layer",
                "0",
                "--n-train-questions",
                "1",
                "--n-valid-questions",
                "0",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "a"),
                "--json",
                *TINY,
            ]
        )
        == 0
    )
    assert last_json(capsys)["n_test_questions"] == 1
    assert (
        main(
            [
                "fit",
                "--survey",
                "gss-spending",
                "--group",
                "PARTYID=Strong Republican",
                "--layer",
                "2",
                "--n-train-questions",
                "1",
                "--n-valid-questions",
                "1",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "g"),
                "--json",
                *TINY,
            ]
        )
        == 0
    )
    assert last_json(capsys)["n_test_questions"] == 16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "--survey", "gss-spending", "--group", "PARTYID=Whig"], "no group 'PARTYID=Whig'"),
        (["fit", "--survey", "gss-spending"], "--group ATTRIBUTE=VALUE is required"),
        (["fit", "--survey", "gss-spending", "--task", "antonym", "--group", "SEX=Male"], "not both"),
        (["fit", "--survey-dir", "/no/such/dir", "--group", "SEX=Male"], "is not a directory"),
        (
            ["fit", "--survey", "gss-spending", "--group", "SEX=Male", "--n-train-questions", "17"],
            "leave 0 for testing",
        ),
        (
            ["fit", "--survey", "gss-spending", "--group", "SEX=Male", "--group-l1", "-1"],
            "group_l1 must be a finite number",
        ),
        (["fit", "--task", "antonym", "--n-train-questions", "3"], "for surveys"),
        (
            ["fit", "--survey", "gss-spending", "--group", "SEX=Male", "--n-train-questions", "8"],
            "tokens long, but the model's context holds 512",
        ),
    ],
)
def test_cli_bad_survey_inputs_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "x"), *TINY, "--json"]) == 2
    err = capsys.readouterr()
    assert message in err.err and json.loads(err.out.strip().splitlines()[-1])["error"]
    assert not (tmp_path / "x").exists()


def test_cli_eval_refuses_another_group(tmp_path, survey_file, capsys):
    assert (
        main(
            [
                "fit",
                "--survey",
                str(survey_file),
                "--group",
                "PARTY=Red",
                "--layer",
                "1",
                "--n-train-questions",
                "3",
                "--n-valid-questions",
                "1",
                "--steps",
                "2",
                "--no-baselines",
                "--out",
                str(tmp_path / "r"),
                *TINY,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--survey",
                str(survey_file),
                "--group",
                "PARTY=Blue",
                "--intervention",
                str(tmp_path / "r"),
                *TINY,
            ]
        )
        == 2
    )
    assert "fitted for group 'PARTY=Red'" in capsys.readouterr().err


@pytest.mark.integration
def test_smollm2_intervention_moves_held_out_answers_toward_the_group():
    """On the embedded model, one layer, few steps: held-out KL and representativeness beat the plain prompt."""
    from lens_laai import load_model

    model = load_model("smollm2-135m")
    gss = load_survey("gss-spending")
    splits = gss.split(0, 8, 4)
    result = fit_opinion(model, gss, "PARTYID=Strong Republican", 13, splits=splits, steps=8, progress=False)
    scores = (
        compare_methods(
            model, gss, "PARTYID=Strong Republican", splits, {"laai": result.intervention}, methods=("plain",)
        )
        .summary()
        .set_index("method")
    )
    assert scores.loc["laai", "kl"] < 0.5 * scores.loc["plain", "kl"]
    assert scores.loc["laai", "representativeness"] > scores.loc["plain", "representativeness"] + 0.05
