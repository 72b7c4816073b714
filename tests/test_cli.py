import json

import pytest

from lens_laai.cli.main import main
from lens_laai.testing import TINY_PAIRS

TINY = ["--model", "lens-laai-tiny", "--no-progress"]


@pytest.fixture()
def task_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps([{"input": a, "output": b} for a, b in TINY_PAIRS]))
    return path


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_fit_eval_compose_round_trip(tmp_path, task_file, capsys):
    args = ["fit", "--task-file", str(task_file), "--layer", "1", "--n-train", "8", "--n-valid", "4", "--steps", "3"]
    assert main([*args, *TINY, "--out", str(tmp_path / "a"), "--json"]) == 0
    out = last_json(capsys)
    for key in (
        "layer",
        "selected_heads",
        "n_heads_total",
        "train_accuracy",
        "valid_accuracy",
        "test_accuracy",
        "zero_shot_accuracy",
        "few_shot_accuracy",
        "few_shot_shots",
        "seconds",
    ):
        assert key in out, key
    assert out["layer"] == 1 and out["n_heads_total"] == 4 and out["n_test"] == len(TINY_PAIRS) - 12
    mode_shots = [m["shots"] for m in out["modes"] or []] + [out["mode_shots"]]
    assert out["few_shot_shots"] == (max(mode_shots) or 5)  # prompting compared on the mode's prompts

    assert main(["eval", "--task-file", str(task_file), "--intervention", str(tmp_path / "a"), *TINY, "--json"]) == 0
    ev = last_json(capsys)
    assert ev["n"] == out["n_test"] and ev["accuracy"] == pytest.approx(out["test_accuracy"])

    assert main(["fit", *args[1:], "--seed", "1", "--no-baselines", *TINY, "--out", str(tmp_path / "b")]) == 0
    assert "LAAI, zero-shot Δ" in capsys.readouterr().out
    assert (
        main(
            [
                "compose",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--weights",
                "1,0.5",
                "--out",
                str(tmp_path / "ab"),
                "--json",
            ]
        )
        == 0
    )
    assert last_json(capsys)["layers"] == [1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--task", "nope", *TINY], "Unknown task 'nope'"),
        (["eval", *TINY], "Give --task"),
        (["fit", "--task", "antonym", "--layer", "9", "--out", "x", *TINY], "out of range"),
        (["fit", "--task", "antonym", "--layer", "two", "--out", "x", *TINY], "--layer must be an integer"),
        (["fit", "--task", "antonym", "--group-l1", "nan", "--out", "x", *TINY], "finite"),
        (["eval", "--task", "antonym", "--intervention", "/no/such/dir", *TINY], "not a saved intervention"),
        (["fit", "--task", "antonym", "--layers", "0,1", "--out", "x", *TINY], "--layer sweep or --layer joint"),
        (["fit", "--task", "antonym", "--group-l1", "0.1", "--group-l1-rel", "0.5", "--out", "x", *TINY], "not both"),
        (["fit", "--task", "antonym", "--layer", "sweep", "--folds", "1", "--out", "x", *TINY], "folds must be"),
        (
            ["fit", "--task", "antonym", "--layer", "sweep", "--folds", "30", "--out", "x", *TINY],
            "--folds must be within",
        ),
        (["fit", "--task", "antonym", "--layer", "deep", "--out", "x", *TINY], "'auto', 'sweep' or 'joint'"),
        (
            ["fit", "--task", "antonym", "--group-l1-rel", "", "--out", "x", *TINY],
            "--group-l1-rel needs at least one number",
        ),
        (
            ["fit", "--task", "antonym", "--group-l1-rel", "-1", "--out", "x", *TINY],
            "--group-l1-rel values must be ≥ 0",
        ),
        (["fit", "--task", "antonym", "--group-l1-rel", "nan", "--out", "x", *TINY], "finite"),
        (["fit", "--task", "antonym", "--layer", "joint", "--layers", "", "--out", "x", *TINY], "layers is empty"),
        (
            ["fit", "--task", "antonym", "--select", "valid", "--layer", "sweep", "--out", "x", *TINY],
            "validation split",
        ),
        (
            ["fit", "--survey", "gss-spending", "--group", "POLVIEWS=Liberal", "--select", "cv", "--out", "x", *TINY],
            "are for tasks",
        ),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_fit_says_what_it_chose_and_how_many_labelled_pairs_it_used(tmp_path, task_file, capsys):
    base = ["fit", "--task-file", str(task_file), "--n-train", "10", "--no-baselines", *TINY, "--json"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    out = last_json(capsys)
    assert out["selection"] == "cv" and out["selection_rule"] == "cv-1se-ce" and out["relaxed"]
    assert out["labelled_pairs_used"] == 10 and out["relative"] and out["layer"] == 2
    assert (
        main(
            [
                *base,
                "--layer",
                "sweep",
                "--layers",
                "0,1",
                "--steps",
                "2",
                "--no-halving",
                "--init",
                "mean-difference",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    out = last_json(capsys)
    assert out["selection"] == "cv" and out["layer"] in (0, 1) and out["labelled_pairs_used"] == 10
    assert (
        main(
            [
                *base,
                "--layer",
                "sweep",
                "--layers",
                "0,1",
                "--steps",
                "2",
                "--n-valid",
                "4",
                "--select",
                "valid",
                "--group-l1",
                "0.1,0.01",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    out = last_json(capsys)
    assert out["selection"] == "valid" and out["labelled_pairs_used"] == 14 and not out["relative"]


def test_empty_task_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "e.json").write_text("[]")
    assert main(["eval", "--task-file", str(tmp_path / "e.json"), *TINY]) == 2
    assert "non-empty JSON list" in capsys.readouterr().err


def test_fit_with_delta_at_the_last_few_tokens_says_so_and_saves_those_positions(tmp_path, task_file, capsys):
    from lens_laai import HeadIntervention

    args = ["fit", "--task-file", str(task_file), "--layer", "1", "--n-train", "10", "--steps", "2", *TINY]
    assert main([*args, "--last-positions", "2", "--no-baselines", "--out", str(tmp_path / "m"), "--json"]) == 0
    assert last_json(capsys)["last_positions"] == 2
    assert HeadIntervention.load(tmp_path / "m").positions == (-2, -1)
    assert main([*args, "--last-positions", "2", "--no-baselines", "--out", str(tmp_path / "m"), "--force"]) == 0
    assert "layer 1, last 2 tokens" in capsys.readouterr().out
    for bad in ("0", "-1", "two"):
        assert main([*args, "--last-positions", bad, "--out", str(tmp_path / "bad")]) == 2
        assert "--last-positions" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*args, "--last-positions", "2", "--stability", "2", "--out", str(tmp_path / "st")]) == 2
    assert "--stability refits Δ at the last token only" in capsys.readouterr().err


def test_joint_fit_prints_its_layers_and_the_path_it_chose_on(tmp_path, task_file, capsys):
    args = ["fit", "--task-file", str(task_file), "--layer", "joint", "--n-train", "12", "--steps", "2", *TINY]
    assert main([*args, "--no-baselines", "--out", str(tmp_path / "j")]) == 0
    out = capsys.readouterr().out
    assert "layers 0, 1 (joint)" in out and "of 8 heads selected" in out and "one-standard-error rule" in out
    assert "Sparsity–accuracy frontier at layers 0, 1 (joint)" in out
