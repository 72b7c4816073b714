"""Smoke runs of every benchmark script on the tiny model: they run, and their JSON has the promised keys."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str], capsys) -> object:
    module = load_script(name)
    assert module.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


TINY = ["--model", "lens-laai-tiny", "--quick", "--json"]


def test_fit_speed_smoke(capsys):
    out = run_script("fit_speed", ["--model", "lens-laai-tiny", "--quick", "--json"], capsys)
    for key in (
        "ratio_zero_shot",
        "ratio_10_shot",
        "fast_step_seconds_zero_shot",
        "naive_step_seconds_zero_shot",
        "max_abs_loss_diff",
    ):
        assert key in out
    assert out["max_abs_loss_diff"] < 1e-4


def test_rule_tasks_smoke(capsys, tmp_path):
    rows = run_script("rule_tasks", [*TINY, "--no-progress", "--out-dir", str(tmp_path)], capsys)
    assert {r["method"] for r in rows} >= {
        "zero-shot",
        "5-shot",
        "function-vector",
        "function-vector-scaled",
        "mean-difference",
        "laai",
        "laai-no-lasso",
    }
    for row in rows:
        assert set(row) == {"task", "method", "n", "seed", "accuracy", "forward_equivalents", "seconds"}
        assert 0.0 <= row["accuracy"] <= 1.0
    assert (tmp_path / "rule_tasks.md").exists() and (tmp_path / "sample_efficiency.png").exists()
    for name in ("rule_tasks.md", "rule_tasks_n4.md", "sample_efficiency.png"):
        (tmp_path / name).unlink()
    again = run_script("rule_tasks", ["--summarise-only", "--json", "--out-dir", str(tmp_path)], capsys)
    assert again == rows, "--summarise-only rebuilds from the rows CSV, running nothing"
    assert "| laai |" in (tmp_path / "rule_tasks_n4.md").read_text() and (tmp_path / "sample_efficiency.png").exists()
    with pytest.raises(SystemExit):
        run_script("rule_tasks", ["--summarise-only", "--out-dir", str(tmp_path / "empty")], capsys)


def test_method_by_task_table_averages_seeds_and_skips_blank_seconds():
    module = load_script("rule_tasks")
    rows = pd.DataFrame(
        [
            {
                "task": "antonym",
                "method": "laai",
                "n": 5,
                "seed": 0,
                "accuracy": 0.2,
                "fit_forward_equivalents": 100.0,
                "seconds": 10.0,
            },
            {
                "task": "antonym",
                "method": "laai",
                "n": 5,
                "seed": 1,
                "accuracy": 0.4,
                "fit_forward_equivalents": 300.0,
                "seconds": float("nan"),
            },
            {
                "task": "synonym",
                "method": "laai",
                "n": 5,
                "seed": 0,
                "accuracy": 0.1,
                "fit_forward_equivalents": 200.0,
                "seconds": 30.0,
            },
            {
                "task": "antonym",
                "method": "zero-shot",
                "n": 5,
                "seed": 0,
                "accuracy": 0.0,
                "fit_forward_equivalents": 0.0,
                "seconds": 0.0,
            },
        ]
    )
    wide = module.by_method_and_task(rows).set_index("method")
    assert list(wide.index) == ["zero-shot", "laai"], "rows follow METHODS order"
    assert wide.loc["laai", "antonym"] == "0.300 ± 0.141 (2)"
    assert wide.loc["zero-shot", "synonym"] == "–", "a cell not run is a dash, not a zero"
    assert wide.loc["laai", "mean fit forward-equivalents"] == 200
    assert wide.loc["laai", "mean fit seconds"] == 20, "a blank seconds row is left out of the mean"


def test_composition_smoke(capsys, tmp_path):
    out = run_script("composition", [*TINY, "--no-progress", "--out-dir", str(tmp_path)], capsys)
    methods = [r["method"] for r in out["rows"]]
    assert any("+" in m for m in methods) and "zero-shot prompt" in methods


def test_head_budget_smoke(capsys, tmp_path):
    out = run_script("head_budget", [*TINY, "--no-progress", "--out-dir", str(tmp_path)], capsys)
    counts = [r["n_selected"] for r in out["rows"]]
    assert counts == sorted(counts), "λ runs largest first, so the head count never falls"
    assert (tmp_path / "head_budget_tiny-antonym.png").exists() or list(tmp_path.glob("head_budget_*.png"))


@pytest.mark.parametrize("name", ["fit_speed", "rule_tasks", "composition", "head_budget", "opinions"])
def test_scripts_have_help(name, capsys):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out


def test_heads_vs_ablation_smoke(capsys, tmp_path):
    out = run_script(
        "heads_vs_ablation", [*TINY, "--no-progress", "--tasks", "antonym", "--out-dir", str(tmp_path)], capsys
    )
    assert {r["score"] for r in out["summary"]} >= {"dla", "act_patch", "attr_patch", "zero_logprob_drop"}
    assert {"percentile", "attr_vs_act_rho"} <= set(out["control"][0])
    assert (tmp_path / "heads_vs_ablation_antonym_s0.png").exists() and (
        tmp_path / "heads_vs_ablation_summary.md"
    ).exists()


def test_heads_vs_ablation_links_the_default_fit(capsys, tmp_path):
    args = [*TINY, "--no-progress", "--tasks", "antonym", "--fit", "default", "--score-layers", "1-2"]
    link = run_script("heads_vs_ablation", args, capsys)["link"][0]
    assert link["fit"] == "default" and link["mode"].endswith(("Δ", "prompting"))
    assert link["k"] == len(link["heads"].split()) >= 1 and link["dense_heads"] >= link["k"]


def test_opinions_smoke(capsys, tmp_path):
    out = run_script("opinions", [*TINY, "--no-progress", "--out-dir", str(tmp_path)], capsys)
    rows = out["rows"]
    assert {r["method"] for r in rows} == {"plain", "persona", "few_shot", "group_mean", "laai", "laai_no_lasso"}
    assert {(r["group"], r["seed"]) for r in rows} == {(g, s) for g in ("PARTY=Red", "PARTY=Blue") for s in (0, 1)}
    for row in rows:
        assert row["n_questions"] == 4 and 0 < row["representativeness"] <= 1 and row["kl"] >= 0 and 0 <= row["tv"] <= 1
        assert (row["layer"] is None) == (row["method"] in ("plain", "persona", "few_shot", "group_mean"))
        assert row["spread"] >= 0 and row["target_spread"] > 0
    assert all(r["group_l1"] == 0 for r in rows if r["method"] == "laai_no_lasso")
    assert (tmp_path / "opinions.png").exists() and "| laai |" in (tmp_path / "opinions.md").read_text()


def test_search_cost_smoke(capsys, tmp_path):
    out = run_script("search_cost", [*TINY, "--no-progress", "--out-dir", str(tmp_path)], capsys)
    for key in (
        "old_forward_equivalents",
        "new_forward_equivalents",
        "fv_forward_equivalents",
        "old_accuracy",
        "new_accuracy",
        "paired_new_minus_old",
    ):
        assert key in out
    assert out["new_forward_equivalents"] > 0 and out["units"] == 1
    again = run_script("search_cost", ["--summarise-only", "--json", "--out-dir", str(tmp_path)], capsys)
    assert again["old_accuracy"] == out["old_accuracy"]


def test_dev_study_smoke(capsys, tmp_path):
    module = load_script("dev_study")
    assert module.main([*TINY, "--no-progress", "--out-dir", str(tmp_path)]) == 0
    assert module.main([*TINY, "--no-progress", "--out-dir", str(tmp_path), "--joint-only"]) == 0
    capsys.readouterr()
    out = run_script("dev_study", ["--summarise-only", "--json", "--out-dir", str(tmp_path)], capsys)
    methods = set(out["mean_accuracy"])
    assert {
        "laai (CV on the n pairs, accuracy)",
        "laai (layer and λ on 40 extra validation pairs: 60 labelled pairs)",
        "5-shot",
        "function-vector",
        "mean-difference",
        "laai (joint over layers, CV on the n pairs)",
    } <= methods
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert {"cv_accuracy", "valid40_accuracy", "test_accuracy", "lambda_max"} <= set(cells.columns)
    assert (tmp_path / "dev_study_per_task.md").exists() and (tmp_path / "dev_study_variants.md").exists()


def test_a_resumed_job_keeps_the_record_of_earlier_rows(tmp_path):
    import sys

    sys.path.insert(0, str(BENCH))
    from _common import appended_meta

    (tmp_path / "rows.meta.json").write_text(json.dumps({"note": "curated", "jobs": [{"args": {"n": "5"}}]}))
    merged = appended_meta(str(tmp_path), "rows", {"args": {"n": "50"}})
    assert merged["note"] == "curated" and [j["args"]["n"] for j in merged["jobs"]] == ["5", "50"]
    (tmp_path / "plain.meta.json").write_text(json.dumps({"args": {"n": "5"}}))
    assert [j["args"]["n"] for j in appended_meta(str(tmp_path), "plain", {"args": {"n": "10"}})["jobs"]] == ["5", "10"]


def test_study_overhead_smoke(capsys):
    out = run_script("study_overhead", TINY, capsys)
    assert out["cells"] == 12 and out["same_accuracies"], "the runner computes what the loop computes"
    assert out["ratio_serial"] > 0 and out["ratio_ray"] > 0 and len(out["ray_seconds_after_load"]) == 1


def test_a_rerun_of_a_benchmark_skips_the_cells_it_has(capsys, tmp_path):
    first = run_script("search_cost", [*TINY, "--no-progress", "--out-dir", str(tmp_path), "--methods", "md"], capsys)
    cells = sorted((tmp_path / "search_cost.study" / "cells").iterdir())
    stamps = [f.stat().st_mtime_ns for f in cells]
    again = run_script(
        "search_cost", [*TINY, "--no-progress", "--out-dir", str(tmp_path), "--methods", "md,new"], capsys
    )
    assert [f.stat().st_mtime_ns for f in cells] == stamps and len(list(cells[0].parent.iterdir())) == 2
    assert again["md_accuracy"] == first["md_accuracy"] and "new_accuracy" in again


def test_modes_study_smoke(capsys, tmp_path):
    module = load_script("modes_study")
    assert module.main(["--model", "lens-laai-tiny", "--quick", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    rows = pd.read_csv(tmp_path / "rows.csv")
    assert {
        "10-shot prompting",
        "default (chosen mode)",
        "default, zero-shot Δ",
        "zero-shot fit",
        "joint fit",
        "last 3 tokens (chosen mode)",
        "function vectors",
    } <= set(rows.method)
    joint = rows[rows.method == "joint fit"].iloc[0]
    assert joint.forward_equivalents > 0 and 0 <= joint.n_selected <= 3 * 4  # the tiny model: 3 layers × 4 heads
    chosen = rows[rows.method == "default (chosen mode)"].iloc[0]
    assert chosen.chosen_mode in json.loads(chosen.cv) and chosen.forward_equivalents > 0
    summary = pd.read_csv(tmp_path / "modes_study_summary.csv")
    assert "target: default ≥ 10-shot mean + 0.05" in set(summary.what)
    versus = summary[summary.what.str.startswith("last 3 tokens (chosen mode) / default (chosen mode) on 1 cells")]
    assert len(versus) == 1 and versus.value.iloc[0] != "-"


def test_stability_study_smoke(tmp_path):
    module = load_script("stability_study")
    assert module.main(["--model", "lens-laai-tiny", "--quick", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    probs = pd.read_csv(tmp_path / "selection_probabilities.csv")
    assert set(probs.columns) >= {"task", "seed", "layer", "head", "probability"}
    assert probs.probability.between(0, 1).all() and (tmp_path / "selection_probabilities.png").exists()


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_modes_study_refuses_a_bad_demos_before_running(bad, capsys, tmp_path):
    with pytest.raises(SystemExit):
        load_script("modes_study").main(
            ["--model", "lens-laai-tiny", "--quick", "--demos", bad, "--out-dir", str(tmp_path / "o")]
        )
    assert "--demos" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_modes_study_refuses_an_unknown_part_before_running(capsys, tmp_path):
    with pytest.raises(SystemExit):
        load_script("modes_study").main(
            ["--model", "lens-laai-tiny", "--quick", "--parts", "main,bogus", "--out-dir", str(tmp_path / "o")]
        )
    assert "unknown part 'bogus'" in capsys.readouterr().err and not (tmp_path / "o").exists()
