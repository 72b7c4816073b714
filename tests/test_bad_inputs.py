"""One test per defect found by the review and the fault campaign: each failed before its fix."""

import hashlib
import json
import warnings

import pytest
import torch

from lens_laai import (
    FitError,
    HeadIntervention,
    InterventionError,
    ModelError,
    SaveError,
    Task,
    TaskError,
    evaluate,
    fit,
    generate,
    load_model,
)
from lens_laai.cli.main import main
from lens_laai.testing import TINY_PAIRS, tiny_model

TINY = ["--model", "lens-laai-tiny", "--no-progress"]
FIT = ["fit", "--layer", "1", "--n-train", "8", "--n-valid", "4", "--steps", "2", "--no-baselines", *TINY]


@pytest.fixture()
def task_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps([{"input": a, "output": b} for a, b in TINY_PAIRS]))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """A real fitted intervention saved to disk (seed 2, n_train 10)."""
    from lens_laai.testing import tiny_task

    result = fit(tiny, tiny_task(), layer=1, n_train=10, n_valid=4, seed=2, steps=2, progress=False)
    path = tmp_path_factory.mktemp("saved") / "iv"
    result.intervention.save(path)
    return result, path


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def rewrite_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def copy_save(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# 1. saving over a directory that is not ours ----------------------------------------------------
def test_fit_out_refuses_a_foreign_directory_and_keeps_it(tmp_path, task_file, capsys):
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    before = snapshot(theirs)
    assert main([*FIT, "--task-file", str(task_file), "--out", str(theirs)]) == 2
    assert "not a lens_laai save" in capsys.readouterr().err
    assert snapshot(theirs) == before


def test_force_writes_into_a_foreign_directory_without_deleting(tmp_path, task_file):
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    assert main([*FIT, "--task-file", str(task_file), "--out", str(theirs), "--force"]) == 0
    assert (theirs / "notes.txt").read_text() == "keep me"
    assert HeadIntervention.load(theirs).layers == [1]


def test_compose_and_save_refuse_a_foreign_directory(tmp_path, saved, capsys):
    theirs = tmp_path / "data"
    theirs.mkdir()
    (theirs / "a.csv").write_text("1,2")
    assert main(["compose", str(saved[1]), "--out", str(theirs)]) == 2
    with pytest.raises(SaveError, match="not a lens_laai save"):
        saved[0].intervention.save(theirs)
    assert (theirs / "a.csv").read_text() == "1,2" and len(list(theirs.iterdir())) == 1


# 2. evaluation must never score training pairs ---------------------------------------------------
def test_algebra_keeps_the_split_record(tiny, saved):
    result, _ = saved
    train_inputs = set(result.splits.train.inputs)
    for derived in (
        1.0 * result.intervention,
        result.intervention + result.intervention,
        result.intervention - 0.5 * result.intervention,
    ):
        table = evaluate(tiny, Task("tiny-antonym", list(TINY_PAIRS)), derived).table
        assert not train_inputs & set(table.input), "a training pair was scored as test"
        assert list(table.input) == result.splits.test.inputs


def test_evaluating_a_changed_task_file_is_refused(tiny, saved, tmp_path):
    changed = Task("tiny-antonym", list(TINY_PAIRS) + [("above", "below")])
    with pytest.raises(TaskError, match="Cannot reproduce the held-out split"):
        evaluate(tiny, changed, saved[0].intervention)


def test_explicit_splits_that_contain_training_pairs_are_refused(tiny, saved):
    result, _ = saved
    leaky = result.splits.__class__(result.splits.valid, result.splits.valid, result.splits.train, 0)
    with pytest.raises(TaskError, match="were used to fit"):
        evaluate(tiny, leaky, result.intervention)


def test_eval_seed_that_disagrees_with_the_intervention_is_an_error(saved, task_file, capsys):
    _, path = saved
    assert main(["eval", "--task-file", str(task_file), "--intervention", str(path), "--seed", "0", *TINY]) == 2
    assert "seed=0 (fitted with 2)" in capsys.readouterr().err
    assert (
        main(["eval", "--task-file", str(task_file), "--intervention", str(path), "--seed", "2", *TINY, "--json"]) == 0
    )
    assert last_json(capsys)["n"] == 24 - 14


def test_compose_keeps_the_records_of_both_operands(tmp_path, saved, tiny):
    _, path = saved
    other = fit(
        tiny, Task("other", [(b, a) for a, b in TINY_PAIRS]), layer=1, n_train=6, n_valid=2, steps=1, progress=False
    )
    other.intervention.save(tmp_path / "other")
    assert main(["compose", str(path), str(tmp_path / "other"), "--out", str(tmp_path / "both")]) == 0
    both = HeadIntervention.load(tmp_path / "both")
    assert [r["task"] for r in both.metadata["data"]] == ["tiny-antonym", "other"]
    table = evaluate(tiny, Task("tiny-antonym", list(TINY_PAIRS)), both).table
    assert list(table.input) == saved[0].splits.test.inputs


# 4. NaN and inf ----------------------------------------------------------------------------------
def test_non_finite_weights_and_scales_are_refused(tmp_path, saved, capsys):
    assert main(["compose", str(saved[1]), str(saved[1]), "--weights", "nan,1", "--out", str(tmp_path / "x")]) == 2
    assert "finite" in capsys.readouterr().err and not (tmp_path / "x").exists()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InterventionError, match="finite"):
            saved[0].intervention * bad


def test_huge_learning_rate_gives_a_finite_fit_or_a_clear_error(tmp_path, task_file, capsys):
    code = main([*FIT, "--task-file", str(task_file), "--lr", "1e30", "--out", str(tmp_path / "big"), "--json"])
    if code == 0:
        iv = HeadIntervention.load(tmp_path / "big")
        assert all(torch.isfinite(d).all() and d.abs().max() < 1e6 for d in iv.deltas.values())
    else:
        assert code == 2 and "error" in last_json(capsys) and not (tmp_path / "big").exists()


def test_a_fit_whose_loss_is_not_finite_stops_with_a_clear_error():
    broken = tiny_model(seed=3)
    with torch.no_grad():
        broken.original_model.lm_head.weight.fill_(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fast path's self-check fails and says so
        with pytest.raises(FitError, match="not finite"):
            fit(broken, Task("t", list(TINY_PAIRS)), layer=1, n_train=8, n_valid=4, steps=3, progress=False)


def test_nan_tensors_in_a_file_are_refused(tmp_path, saved):
    from safetensors.torch import load_file, save_file

    path = copy_save(saved[1], tmp_path / "nan")
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = load_file(str(path / manifest["tensor_file"]))
    tensors["layer.1"][0, 0] = float("nan")
    save_file(tensors, str(path / manifest["tensor_file"]))
    rewrite_manifest(
        path, lambda m: m.update(tensors_sha256=hashlib.sha256((path / m["tensor_file"]).read_bytes()).hexdigest())
    )
    with pytest.raises(InterventionError, match="NaN"):
        HeadIntervention.load(path)


# clear errors instead of tracebacks --------------------------------------------------------------
def test_corrupt_save_with_a_recomputed_checksum(tmp_path, saved):
    path = copy_save(saved[1], tmp_path / "corrupt")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / manifest["tensor_file"]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    rewrite_manifest(
        path, lambda m: m.update(tensors_sha256=hashlib.sha256((path / m["tensor_file"]).read_bytes()).hexdigest())
    )
    with pytest.raises(InterventionError):
        HeadIntervention.load(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.pop("fingerprint"),
        lambda m: m.pop("model_name"),
        lambda m: m.update(fingerprint=[1, 2]),
        lambda m: m.update(metadata="x"),
        lambda m: m["fingerprint"].update(n_heads="4"),
        lambda m: m.update(positions=1.5),
        lambda m: m.update(positions=[0.5]),
        lambda m: m.update(positions="middle"),
    ],
)
def test_manifests_with_missing_keys_or_wrong_types(tmp_path, saved, edit):
    path = copy_save(saved[1], tmp_path / "m")
    rewrite_manifest(path, edit)
    with pytest.raises(InterventionError):
        HeadIntervention.load(path)


def test_out_dot_is_refused(tmp_path, task_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*FIT, "--task-file", str(task_file), "--out", "."]) == 2
    assert "not a lens_laai save" in capsys.readouterr().err


def test_unwritable_paths_are_a_save_error(tmp_path, saved, task_file, monkeypatch, capsys):
    import os

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "mkdir", refuse)
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(SaveError, match="Permission denied"):
        saved[0].intervention.save(tmp_path / "new" / "iv")
    assert main([*FIT, "--task-file", str(task_file), "--out", str(tmp_path / "new" / "iv")]) == 2
    assert "Permission denied" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layers", ","], "layers is empty"),
        (["--layers", "1,x"], "comma list"),
        (["--n-test", "0"], "n_test must be"),
        (["--layer", "sweep", "--layers", "7"], "out of range"),
        (["--layer", "auto", "--layers", "7"], "--layer sweep or --layer joint"),
    ],
)
def test_bad_layer_and_split_options_exit_2_before_writing(tmp_path, task_file, argv, message, capsys):
    out = tmp_path / "out"
    assert main([*FIT, "--task-file", str(task_file), *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_five_shot_baseline_without_enough_pairs_fails_before_writing(tmp_path, task_file, capsys):
    out = tmp_path / "out"
    argv = [a for a in FIT if a != "--no-baselines"]
    argv[argv.index("--n-train") + 1] = "3"
    assert main([*argv, "--task-file", str(task_file), "--out", str(out)]) == 2
    assert "5-shot" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"layers": []}, "layers is empty"), ({"layer": True}, "layer index"), ({"layers": [1.5]}, "not a layer index")],
)
def test_fit_layer_arguments(tiny, kwargs, message):
    with pytest.raises(FitError, match=message):
        fit(
            tiny,
            Task("t", list(TINY_PAIRS)),
            **{"layer": "sweep", "n_train": 8, "n_valid": 4, "progress": False, **kwargs},
        )


def test_prompt_longer_than_the_context_is_refused_quickly(tiny):
    long = Task("long", [(" ".join(["hot"] * 700), "cold")] + list(TINY_PAIRS))
    with pytest.raises(ModelError, match="context holds 512"):
        evaluate(tiny, long, split="all")
    with pytest.raises(ModelError, match="context holds 512"):
        generate(tiny, "hot " * 40_000, max_new_tokens=2)


def test_unreachable_hub_model_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="Could not load the Hugging Face hub name"):
        load_model("no-such-org/no-such-model-lens-laai")


def test_directory_given_as_task_file(tmp_path, capsys):
    assert main(["eval", "--task-file", str(tmp_path), *TINY]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_fingerprint_with_an_extra_key_names_it(tiny, saved):
    iv = saved[0].intervention
    odd = HeadIntervention(dict(iv.deltas), iv.model_name, {**iv.fingerprint, "n_experts": 8})
    with pytest.raises(InterventionError, match="n_experts"):
        odd.check_model(tiny)


def test_duplicate_pairs_are_dropped_and_cannot_leak(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([{"input": a, "output": b} for a, b in TINY_PAIRS] * 2))
    with pytest.warns(UserWarning, match="dropped 24 duplicate pairs"):
        task = Task.from_json(path)
    splits = task.split(0, 10, 4)
    assert not set(splits.train.pairs) & set(splits.test.pairs) and len(task) == 24


@pytest.mark.parametrize(
    "item", [{"input": 3, "output": "x"}, {"input": "a", "output": None}, {"input": ["a"], "output": "b"}]
)
def test_non_string_inputs_and_outputs_are_refused(tmp_path, item):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([item]))
    with pytest.raises(TaskError, match="not a string"):
        Task.from_json(path)


def test_tensor_dtype_and_duplicate_layer_keys_in_a_file(tmp_path, saved):
    from safetensors.torch import load_file, save_file

    for name, change in (
        ("int", lambda t: {"layer.1": t["layer.1"].to(torch.int32)}),
        ("dup", lambda t: {"layer.1": t["layer.1"], "layer.01": t["layer.1"].clone()}),
    ):
        path = copy_save(saved[1], tmp_path / name)
        manifest = json.loads((path / "manifest.json").read_text())
        save_file(change(load_file(str(path / manifest["tensor_file"]))), str(path / manifest["tensor_file"]))
        rewrite_manifest(
            path, lambda m: m.update(tensors_sha256=hashlib.sha256((path / m["tensor_file"]).read_bytes()).hexdigest())
        )
        with pytest.raises(InterventionError, match="dtype|distinct layer"):
            HeadIntervention.load(path)


@pytest.mark.parametrize("positions", [(1.5,), (True,), (0, 0), (), "first"])
def test_bad_positions_are_refused(saved, positions):
    iv = saved[0].intervention
    with pytest.raises(InterventionError):
        HeadIntervention(dict(iv.deltas), iv.model_name, iv.fingerprint, positions)


def test_out_of_range_position_is_a_clear_error(tiny, saved):
    iv = saved[0].intervention
    far = HeadIntervention(dict(iv.deltas), iv.model_name, iv.fingerprint, (40,))
    with pytest.raises(InterventionError, match="outside this sequence"), far.apply(tiny):
        tiny(torch.tensor([[1, 5, 6]]))


def test_generate_checks_the_model_and_its_arguments(tiny, saved):
    with pytest.raises(InterventionError, match="does not fit"):
        generate(tiny_model(n_heads=2, n_kv_heads=1), "Q: hot\nA:", saved[0].intervention)
    for bad in (-1, 0, 2.5):
        with pytest.raises(TaskError, match="max_new_tokens"):
            generate(tiny, "Q: hot\nA:", max_new_tokens=bad)


def test_json_mode_prints_an_error_object_last(tmp_path, capsys):
    assert main(["eval", "--task", "nope", *TINY, "--json"]) == 2
    out = last_json(capsys)
    assert out["command"] == "eval" and "Unknown task" in out["error"]


def test_same_shaped_model_with_other_weights_warns_or_is_refused(saved, task_file, capsys):
    other = tiny_model(seed=5)
    with pytest.warns(UserWarning, match="other weights"):
        saved[0].intervention.check_model(other)
    with pytest.raises(InterventionError, match="strict"):
        saved[0].intervention.check_model(other, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saved[0].intervention.check_model(tiny_model())


# found by a second reader of the diff ------------------------------------------------------------
def test_saves_from_before_data_records_are_split_by_their_fit_config(tiny):
    from lens_laai.evaluation.evaluate import select_split

    iv = HeadIntervention.zeros(
        tiny, [1], metadata={"fit_config": {"seed": 1, "n_train": 10, "n_valid": 4, "n_test": None}}
    )
    task = Task("tiny-antonym", list(TINY_PAIRS))
    part, _ = select_split(task, "test", [iv])
    assert part.pairs == task.split(1, 10, 4).test.pairs
    with pytest.raises(TaskError, match="fit_config"):
        select_split(task, "test", [iv], seed=0)


def test_combining_two_kinds_of_intervention_is_a_clear_error(tiny, saved, tmp_path, capsys):
    from lens_laai.baselines import ResidualIntervention
    from lens_laai.models.loading import model_fingerprint

    residual = ResidualIntervention(torch.ones(tiny.cfg.d_model), 1, "tiny", model_fingerprint(tiny))
    residual.save(tmp_path / "r")
    assert main(["compose", str(saved[1]), str(tmp_path / "r"), "--out", str(tmp_path / "both")]) == 2
    assert "Cannot combine a HeadIntervention with a ResidualIntervention" in capsys.readouterr().err


def test_evaluate_many_on_an_empty_split(tiny, saved):
    from lens_laai import evaluate_many

    with pytest.raises(TaskError, match="empty"):
        evaluate_many(tiny, Task("t", list(TINY_PAIRS)).split(0, 8, 0), [saved[0].intervention], split="valid")


def test_ablation_positions_outside_the_sequence(tiny):
    from lens_laai import HeadAblation

    with pytest.raises(InterventionError, match="outside this sequence"):
        evaluate(tiny, Task("t", list(TINY_PAIRS)), HeadAblation.zero(tiny, [(1, 0)], positions=(50,)), split="all")


def test_resample_ablation_repeats_its_draws(tiny):
    from lens_laai import HeadAblation
    from lens_laai.tasks.prompts import k_shot_prompts, model_batches

    task = Task("t", list(TINY_PAIRS))
    ablation = HeadAblation.resample(tiny, [(1, 0), (2, 1)], model_batches(tiny, *k_shot_prompts(task, 2)), seed=3)
    first = evaluate(tiny, task, ablation, split="all").table.target_logprob
    assert first.equals(evaluate(tiny, task, ablation, split="all").table.target_logprob)


def test_generate_honours_an_all_positions_ablation(tiny):
    from lens_laai import HeadAblation

    ablation = HeadAblation.zero(tiny, [(0, h) for h in range(4)] + [(1, h) for h in range(4)], positions="all")
    cached = generate(tiny, ["Q: hot\nA:", "Q: up\nA:"], ablation, max_new_tokens=5)
    assert cached == generate(tiny, ["Q: hot\nA:", "Q: up\nA:"], ablation, max_new_tokens=5, use_past_kv_cache=False)
    with ablation.apply(tiny):
        first = tiny.tokenizer.decode([int(tiny(tiny.to_tokens("Q: hot\nA:"))[0, -1].argmax())])
    assert cached[0].startswith(first)
    at_end = HeadAblation.zero(tiny, [(1, h) for h in range(4)], positions=(-1,))  # counted from the prompt's end
    for cache in (True, False):
        assert generate(tiny, "Q: hot\nA:", at_end, max_new_tokens=3, use_past_kv_cache=cache) == generate(
            tiny, "Q: hot\nA:", HeadAblation.zero(tiny, [(1, h) for h in range(4)]), max_new_tokens=3
        )
    with pytest.raises(TaskError, match="explicit positions"):
        generate(tiny, "Q: hot\nA:", HeadAblation.zero(tiny, [(1, 0)], positions=(-500,)))


def test_another_task_is_split_normally_but_never_scores_seen_pairs(tiny, saved):
    reversed_task = Task("reverse", [(b, a) for a, b in TINY_PAIRS])
    result = evaluate(tiny, reversed_task, saved[0].intervention, n_train=4, n_valid=2, shots=0)
    assert result.n == 24 - 6
    if saved[0].mode.shots > 4:  # the recorded k-shot mode needs more demonstrations than 4 training pairs give
        with pytest.raises(TaskError, match="recorded mode .*pass shots=0"):
            evaluate(tiny, reversed_task, saved[0].intervention, n_train=4, n_valid=2)
    leaky = Task("other", list(TINY_PAIRS) + [("above", "below")])
    with pytest.raises(TaskError, match="were used to fit"):
        evaluate(tiny, leaky, saved[0].intervention, n_train=2, n_valid=2)
