"""The fault suite of issue 23: concurrent and hostile saves, odd inputs, misleading messages.

Every case that gave a traceback, a hang, a lost save or a silently wrong answer has a test here;
each asserts our own error (a :class:`LensLaaiError` subclass) or the right result, within a
deadline. Property-based tests of the same loaders are in ``tests/test_faults_properties.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lens_laai.cli.main import main
from lens_laai.errors import InterventionError, TaskError
from lens_laai.evaluation.evaluate import evaluate
from lens_laai.interventions.ablation import HeadAblation
from lens_laai.interventions.head import HeadIntervention
from lens_laai.interventions.protocol import load_intervention
from lens_laai.opinions.survey import toy_survey
from lens_laai.tasks.prompts import PromptTemplate
from lens_laai.tasks.provenance import fit_metadata
from lens_laai.tasks.task import Task, load_task
from lens_laai.testing import TINY_PAIRS, tiny_model, tiny_task

TINY = ["--model", "lens-laai-tiny", "--no-progress"]
ROOT = Path(__file__).resolve().parents[1]


class Hung(BaseException):
    """Raised by :func:`deadline`; not an OSError (as TimeoutError is), so no ``except OSError`` can hide a hang."""


@contextmanager
def deadline(seconds: float):
    """Fail (:class:`Hung`) instead of hanging when the block takes longer than ``seconds``."""

    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def fitted(model, seed=0, pairs=TINY_PAIRS, scale=0.5) -> HeadIntervention:
    """A head intervention carrying a real data record and template, as a fit writes them."""
    task = Task("tiny-antonym", list(pairs))
    splits = task.split(seed, 8, 4)
    delta = torch.zeros(4, 16)
    delta[2] = scale
    metadata = fit_metadata(splits, task, PromptTemplate(), {"seed": seed, "n_train": 8, "n_valid": 4})
    return HeadIntervention.from_deltas(model, {1: delta}, metadata=metadata)


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def write_task(path: Path, pairs) -> Path:
    path.write_text(json.dumps([{"input": a, "output": b} for a, b in pairs]))
    return path


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# --- lost saves ---------------------------------------------------------------------------------


def _writer(source, target, scale, go, seconds, results) -> None:
    iv = scale * load_intervention(source)
    go.wait(30)
    end, saves, failures = time.monotonic() + seconds, 0, []
    while time.monotonic() < end:
        try:
            iv.save(target)
            saves += 1
        except Exception as err:
            failures.append(f"{type(err).__name__}: {err}")
    results.put(("saves", {"ok": saves, "failed": len(failures), "first": failures[:2]}))


def _reader(target, go, seconds, results) -> None:
    go.wait(30)
    end, ok, failures = time.monotonic() + seconds, 0, []
    while time.monotonic() < end:
        try:
            load_intervention(target)
            ok += 1
        except Exception as err:
            failures.append(f"{type(err).__name__}: {err}")
    results.put(("reads", {"ok": ok, "failed": len(failures), "first": failures[:3]}))


def test_concurrent_writers_never_lose_a_save_and_readers_never_fail(model, tmp_path):
    """The issue's scenario with real processes: ×1 and ×2 writers saving to A in a loop for 2 s, a third loading A.

    The processes are forked (torch is already imported, so they start at once); each has its own
    file descriptors and locks, as separate programs would.
    """
    import multiprocessing

    base = fitted(model)
    base.save(tmp_path / "A")
    shutil.copytree(tmp_path / "A", tmp_path / "A0")
    context = multiprocessing.get_context("fork")
    go, results, seconds = context.Event(), context.Queue(), 2.0
    procs = [
        context.Process(target=_writer, args=(tmp_path / "A0", tmp_path / "A", 1.0, go, seconds, results)),
        context.Process(target=_writer, args=(tmp_path / "A0", tmp_path / "A", 2.0, go, seconds, results)),
        context.Process(target=_reader, args=(tmp_path / "A", go, seconds, results)),
    ]
    for proc in procs:
        proc.start()
    go.set()
    got = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    saves = [n for kind, n in got if kind == "saves"]
    reads = next(r for kind, r in got if kind == "reads")
    print(f"\nconcurrent saves: writers {saves}, reader {reads}")
    assert len(saves) == 2 and min(s["ok"] for s in saves) > 0 and reads["ok"] > 0, (saves, reads)
    assert [s["failed"] for s in saves] == [0, 0] and reads["failed"] == 0, (saves, reads)
    final = load_intervention(tmp_path / "A")
    assert any(torch.equal(final.deltas[1], s * base.deltas[1]) for s in (1.0, 2.0))
    files = sorted(p.name for p in (tmp_path / "A").iterdir())
    assert len(files) == 2 and "manifest.json" in files, files  # one manifest, one tensor file: nothing left over


def test_save_refuses_nan_and_keeps_the_good_save(model, tmp_path):
    iv = fitted(model)
    iv.save(tmp_path / "s")
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    iv.deltas[1][2, 0] = float("nan")
    with pytest.raises(InterventionError, match="NaN"):
        iv.save(tmp_path / "s")
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    assert load_intervention(tmp_path / "s").equals(fitted(model))


def test_evaluate_refuses_an_intervention_edited_to_nan(model):
    iv = fitted(model)
    iv.deltas[1][2, 0] = float("inf")
    with pytest.raises(InterventionError, match="NaN or infinite"):
        evaluate(model, tiny_task(), iv)
    evaluate(model, tiny_task(), fitted(model))  # and the hooks were not left behind


def test_cli_checks_the_output_path_before_loading_the_model(tmp_path, monkeypatch, capsys):
    cli = sys.modules["lens_laai.cli.fit_command"]
    monkeypatch.setattr(cli, "model_from_args", lambda args: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    task = write_task(tmp_path / "t.json", TINY_PAIRS)
    args = ["fit", "--task-file", str(task), "--layer", "1", "--n-train", "8", *TINY, "--json"]
    assert main([*args, "--out", str(tmp_path / "file" / "sub" / "out")]) == 2
    assert "is a file, not a folder" in last_json(capsys)["error"]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    assert main([*args, "--out", str(tmp_path / "ro" / "out")]) == 2
    assert "not writable" in last_json(capsys)["error"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the os.access case above covers it")
def test_cli_refuses_a_read_only_folder(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    task = write_task(tmp_path / "t.json", TINY_PAIRS)
    argv = ["fit", "--task-file", str(task), "--layer", "1", "--n-train", "8", *TINY, "--json"]
    assert main([*argv, "--out", str(tmp_path / "ro" / "out")]) == 2
    assert "not writable" in last_json(capsys)["error"]


# --- hangs and unbounded reads -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["manifest", "tensor"])
def test_a_fifo_in_a_save_is_refused_without_hanging(model, tmp_path, which):
    fitted(model).save(tmp_path / "s")
    name = (
        "manifest.json"
        if which == "manifest"
        else json.loads((tmp_path / "s/manifest.json").read_text())["tensor_file"]
    )
    (tmp_path / "s" / name).unlink()
    os.mkfifo(tmp_path / "s" / name)
    with deadline(5), pytest.raises(InterventionError, match="FIFO|not a saved intervention"):
        load_intervention(tmp_path / "s")


def test_compose_onto_a_fifo_save_does_not_hang(model, tmp_path, capsys):
    fitted(model).save(tmp_path / "a")
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "manifest.json")
    with deadline(10):
        assert main(["compose", str(tmp_path / "a"), "--out", str(tmp_path / "out"), "--json"]) == 2
    assert "manifest.json" in last_json(capsys)["error"]


@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_a_symlinked_tensor_file_is_refused(model, tmp_path, target):
    fitted(model).save(tmp_path / "s")
    name = json.loads((tmp_path / "s/manifest.json").read_text())["tensor_file"]
    if target == "outside":
        shutil.copy(tmp_path / "s" / name, tmp_path / "elsewhere.safetensors")
        target = str(tmp_path / "elsewhere.safetensors")
    (tmp_path / "s" / name).unlink()
    (tmp_path / "s" / name).symlink_to(target)
    with deadline(5), pytest.raises(InterventionError, match="symbolic link"):
        load_intervention(tmp_path / "s")


def test_a_symlinked_manifest_is_refused(model, tmp_path):
    fitted(model).save(tmp_path / "s")
    shutil.copy(tmp_path / "s/manifest.json", tmp_path / "m.json")
    (tmp_path / "s/manifest.json").unlink()
    (tmp_path / "s/manifest.json").symlink_to(tmp_path / "m.json")
    with deadline(5), pytest.raises(InterventionError):
        load_intervention(tmp_path / "s")


def test_tensor_file_size_is_checked_against_the_manifest(model, tmp_path):
    fitted(model).save(tmp_path / "s")
    name = json.loads((tmp_path / "s/manifest.json").read_text())["tensor_file"]
    with open(tmp_path / "s" / name, "ab") as handle:
        handle.write(b"\0" * 4096)
    with pytest.raises(InterventionError, match="bytes, but its manifest records"):
        load_intervention(tmp_path / "s")


# --- manifests with wrong types: the schema ----------------------------------------------------

SURVEY_RECORD = {"name": "toy", "hash": "0" * 16, "group": "PARTY=Red", "seed": 0, "train": ["Q0"], "valid": []}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m["metadata"].update(data=5), "metadata.data"),
        (lambda m: m["metadata"]["data"][0].update(seen=7), "metadata.data.0.seen"),
        (lambda m: m["metadata"]["template"].update(query=5), "metadata.template.query"),
        (lambda m: m["metadata"]["template"].update(query="Q: {x}\nA:"), "must contain {input}"),
        (lambda m: m["metadata"]["template"].update(query="Q: input\nA:"), "must contain {input}"),
        (lambda m: m["metadata"]["template"].update(demo="{input} {output} {0}"), "metadata.template.demo"),
        (lambda m: m["metadata"].update(survey={**SURVEY_RECORD, "test": ["Q1"], "train": 5}), "metadata.survey.train"),
        (lambda m: m["metadata"].update(survey=SURVEY_RECORD), "metadata.survey.test"),
        (lambda m: m["metadata"].update(survey="toy"), "metadata.survey"),
        (lambda m: m["fingerprint"].update(n_heads=True), "fingerprint.n_heads"),
        (lambda m: m["fingerprint"].update(n_layers=10**30), "fingerprint.n_layers"),
        (lambda m: m.update(positions=[2**80]), "positions"),
        (lambda m: m.update(metadata=[]), "metadata"),
        (lambda m: m.update(model_name=None), "model_name"),
        (lambda m: m.update(tensors_bytes="12"), "tensors_bytes"),
    ],
    ids=[
        "data=5",
        "seen=7",
        "query=5",
        "query-without-input",
        "query-no-placeholder",
        "demo-extra-field",
        "survey-train=5",
        "survey-no-test",
        "survey-string",
        "n_heads-bool",
        "n_layers-huge",
        "position-huge",
        "metadata-list",
        "model_name-null",
        "tensors_bytes-str",
    ],
)
def test_manifest_schema_gives_our_error(model, tmp_path, change, match):
    fitted(model).save(tmp_path / "s")
    edit_manifest(tmp_path / "s", change)
    with deadline(5), pytest.raises(InterventionError) as err:
        load_intervention(tmp_path / "s")
    assert match in str(err.value) and "schema" in str(err.value) or "tensors_bytes" in str(err.value)


def test_a_manifest_nested_100000_deep_gives_our_error(model, tmp_path):
    fitted(model).save(tmp_path / "s")
    text = (tmp_path / "s/manifest.json").read_text()
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "s/manifest.json").write_text(text.replace('"metadata": {', f'"deep": {deep}, "metadata": {{', 1))
    with deadline(5), pytest.raises(InterventionError, match="nested deeper"):
        load_intervention(tmp_path / "s")


def test_float8_tensors_are_refused(model, tmp_path):
    from safetensors.torch import save_file

    fitted(model).save(tmp_path / "s")
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    path = tmp_path / "s" / manifest["tensor_file"]
    save_file({"layer.1": torch.zeros(4, 16).to(torch.float8_e4m3fn)}, str(path))
    edit_manifest(tmp_path / "s", lambda m: m.update(tensors_sha256=sha256(path), tensors_bytes=path.stat().st_size))
    with pytest.raises(InterventionError, match="float8"):
        load_intervention(tmp_path / "s")
    iv = fitted(model)
    iv.deltas[1] = iv.deltas[1].to(torch.float8_e4m3fn)
    with pytest.raises(InterventionError, match="float8"):
        iv.save(tmp_path / "t")


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("tensors", [{}, {"layer.1": torch.zeros(4, 16), "layer.2": torch.zeros(4, 16)}])
def test_no_tensors_or_an_extra_tensor_key_is_refused(model, tmp_path, tensors):
    from safetensors.torch import save_file

    fitted(model).save(tmp_path / "s")
    path = tmp_path / "s" / json.loads((tmp_path / "s/manifest.json").read_text())["tensor_file"]
    save_file(tensors, str(path))
    edit_manifest(tmp_path / "s", lambda m: m.update(tensors_sha256=sha256(path), tensors_bytes=path.stat().st_size))
    with pytest.raises(InterventionError, match="no tensors|manifest records layers"):
        load_intervention(tmp_path / "s")


def test_ablation_seed_2_70_and_extra_reference_values_are_refused(model, tmp_path):
    HeadAblation.zero(model, [(1, 0)]).save(tmp_path / "z")
    edit_manifest(tmp_path / "z", lambda m: m.update(seed=2**70))
    with pytest.raises(InterventionError, match="seed"):
        load_intervention(tmp_path / "z")
    with pytest.raises(InterventionError, match="no ablated head"):
        HeadAblation(
            [(1, 0)],
            "mean",
            "m",
            dict(HeadIntervention.zeros(model, 1).fingerprint),
            {1: torch.zeros(1, 4, 16), 2: torch.zeros(1, 4, 16)},
        )


def test_published_schema_file_is_current():
    from lens_laai.storage.schema import manifest_json_schema

    published = json.loads((ROOT / "lens_laai/data/manifest.schema.json").read_text())
    assert published == json.loads(json.dumps(manifest_json_schema()))


# --- task and survey files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 100_000 + "]" * 100_000, "nested deeper"),
        ('[{"input": "a", "output": ' + "9" * 100_000 + "}]", "number"),
        ('[{"input": "\\ud800", "output": "b"}]', "surrogate"),
        ('[{"input": "a", "output": "b"}, {"input": "c", "output": NaN}]', "NaN"),
    ],
    ids=["deep", "100000-digits", "lone-surrogate", "nan"],
)
def test_odd_task_files_give_our_error(tmp_path, text, match):
    (tmp_path / "t.json").write_text(text)
    with deadline(5), pytest.raises(TaskError, match=match):
        load_task(tmp_path / "t.json")


def test_a_fifo_task_file_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "t.json")
    with deadline(5), pytest.raises(TaskError, match="FIFO"):
        load_task(tmp_path / "t.json")


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested deeper"),
        ('{"format": "lens_laai.survey/1", "name": ' + "1" * 100_000 + "}", "number"),
        ('{"format": "lens_laai.survey/1", "name": "\\udc00"}', "surrogate"),
    ],
)
def test_odd_survey_files_give_our_error(tmp_path, text, match):
    from lens_laai.opinions.loading import load_survey

    (tmp_path / "s.json").write_text(text)
    with deadline(5), pytest.raises(TaskError, match=match):
        load_survey(tmp_path / "s.json")


def test_a_fifo_opinionqa_file_does_not_hang(tmp_path):
    from lens_laai.opinions.loading import load_survey

    for name in ("info.csv", "metadata.csv", "responses.csv"):
        (tmp_path / name).write_text("key\n")
    (tmp_path / "info.csv").unlink()
    os.mkfifo(tmp_path / "info.csv")
    with deadline(5), pytest.raises(TaskError, match="FIFO"):
        load_survey(tmp_path)


# --- more tracebacks and misleading messages ---------------------------------------------------


@pytest.fixture()
def task_file(tmp_path):
    return write_task(tmp_path / "tiny.json", TINY_PAIRS)


@pytest.fixture()
def saved(model, tmp_path):
    fitted(model).save(tmp_path / "iv")
    return tmp_path / "iv"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["fit", "--n-train", "abc"], "--n-train: must be an integer"),
        (["fit", "--seed", "1e3"], "--seed: must be an integer"),
        (["fit", "--seed", "-1"], "--seed: must be an integer"),
        (["fit", "--init", "bogus"], "--init: invalid choice"),
        (["fit", "--lr", "nan"], "--lr: must be a finite number"),
        (["fit", "--steps", "0"], "--steps: must be an integer"),
        (["eval", "--split", "bogus"], "--split: invalid choice"),
        (["eval", "--seed", "9" * 30], "--seed: must be an integer from 0"),
        (["analyze", "--intervention", "x", "--out", "y", "--seed", "-1"], "--seed: must be an integer"),
        (["report", "--intervention", "x", "--out", "y", "--prompt", ""], "--prompt: must not be empty"),
        (["report", "--intervention", "x", "--out", "y", "--prompt", "  "], "--prompt: must not be empty"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argparse_errors_print_the_json_error_line(capsys, argv, match):
    with deadline(10):
        assert main([*argv, "--task", "antonym", "--out", "o", *TINY, "--json"]) == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out.strip().splitlines()[-1])["error"]
    assert match in error and match in captured.err and "usage:" in captured.err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--layer", "sweep", "--group-l1", "1,,2"], "empty element"),
        (["--layer", "sweep", "--group-l1", "1,"], "empty element"),
        (["--layer", "1", "--group-l1-rel", "2"], "every head is exactly zero"),
        (["--layer", "sweep", "--layers", "0,0"], "more than once"),
        (["--layer", "sweep", "--layers", "0,,1"], "empty element"),
        (["--layer", "sweep", "--layers", "9" * 5000], "--layers must be"),
    ],
)
def test_fit_flags_refused_before_the_model_loads(task_file, tmp_path, monkeypatch, capsys, flags, match):
    monkeypatch.setattr(
        sys.modules["lens_laai.cli.fit_command"], "model_from_args", lambda a: pytest.fail("model loaded")
    )
    argv = ["fit", "--task-file", str(task_file), "--n-train", "8", *flags, *TINY, "--out", str(tmp_path / "o")]
    assert main([*argv, "--json"]) == 2
    assert match in last_json(capsys)["error"]


def test_a_huge_lr_warns_that_the_saved_intervention_is_all_zero(task_file, tmp_path, capsys):
    argv = ["fit", "--task-file", str(task_file), "--layer", "1", "--n-train", "8", "--no-baselines", "--lr", "1e308"]
    with pytest.warns(UserWarning, match="every head off"):
        assert main([*argv, *TINY, "--out", str(tmp_path / "o"), "--json"]) == 0
    assert last_json(capsys)["selected_heads"] == []


def test_many_steps_stop_when_the_step_size_underflows():
    """Losses always within round-off above the test shrink the step every iteration, until it is 0.0.

    ``lens-laai fit --steps 1500`` on the tiny model ended in ZeroDivisionError this way.
    """
    from lens_laai.fitting.solver import fista

    def smooth(x):
        return 1.0 + 1e-7  # a trial point is never better than y: "passed within round-off", next step halved

    with pytest.warns(RuntimeWarning, match="underflowed"):
        x, history = fista(lambda y: (1.0, torch.ones_like(y)), smooth, torch.zeros(4, 16), 0.0, 0.0, 3000, 1e-290)
    assert torch.isfinite(x).all() and len(history) < 3000


def test_ctrl_c_after_the_manifest_switch_says_the_save_is_in_place(saved, tmp_path, monkeypatch, capsys):
    from lens_laai.storage import bundle

    real = bundle._remove_superseded

    def interrupted(*args):
        real(*args)
        raise KeyboardInterrupt

    fitted(tiny_model()).save(tmp_path / "c")
    monkeypatch.setattr(bundle, "_remove_superseded", interrupted)
    assert main(["compose", str(saved), "--weights", "2", "--out", str(tmp_path / "c"), "--json"]) == 130
    assert "nothing was saved" not in last_json(capsys)["error"]
    (tmp_path / "d").mkdir()
    fitted(tiny_model()).save(tmp_path / "d" / "old")
    monkeypatch.setattr(bundle, "_write_file", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["compose", str(saved), "--weights", "2", "--out", str(tmp_path / "d" / "old"), "--json"]) == 130
    assert "nothing was saved" in last_json(capsys)["error"]
    monkeypatch.undo()
    assert torch.equal(load_intervention(tmp_path / "c").deltas[1], 2 * fitted(tiny_model()).deltas[1])
    assert load_intervention(tmp_path / "d" / "old").equals(fitted(tiny_model()))


def test_task_eval_refuses_a_survey_intervention(model, tmp_path, capsys):
    from lens_laai.opinions.fit import opinion_metadata
    from lens_laai.opinions.prompts import OpinionPrompt

    survey = toy_survey()
    metadata = opinion_metadata(survey, survey.group("PARTY=Red"), survey.split(0, 3, 1), OpinionPrompt(), {"seed": 0})
    HeadIntervention.zeros(model, 1, metadata=metadata).save(tmp_path / "s")
    argv = ["eval", "--task", "antonym", "--intervention", str(tmp_path / "s"), *TINY, "--json"]
    assert main(argv) == 2
    assert "fitted on a survey" in last_json(capsys)["error"]


def test_a_truncated_model_cache_is_rebuilt_not_a_traceback(tmp_path):
    from lens_laai.models.loading import _load_cached
    from lens_laai.testing import tiny_hf_model_for, tiny_tokenizer

    cache = tmp_path / "cache"
    tiny_hf_model_for("llama").save_pretrained(cache)
    tiny_tokenizer().save_pretrained(cache)
    weights = cache / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="damaged"):
        assert _load_cached(cache) is None
    assert not cache.exists()


def test_opinionqa_group_without_ordinal_answers_is_refused_in_fit(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "W1"
    folder.mkdir()
    yes_no = "\"['Yes', 'No']\""
    (folder / "info.csv").write_text(
        "key,question,references,option_ordinal,option_mapping\n"
        + "".join(f'Q{i},Is it {i}?,{yes_no},"[1, 2]",\n' for i in range(5))
    )
    (folder / "metadata.csv").write_text("key,options\nPARTY,\"['Red', 'Green']\"\n")
    (folder / "responses.csv").write_text(
        "Q0,Q1,Q2,Q3,Q4,PARTY,WEIGHT_W1\nYes,No,Yes,No,Yes,Red,1\nNo,No,Yes,Yes,Yes,Red,1\n"
    )
    monkeypatch.setattr(
        sys.modules["lens_laai.cli.fit_command"], "model_from_args", lambda a: pytest.fail("model loaded")
    )
    monkeypatch.setattr("lens_laai.cli.args.model_from_args", lambda a: pytest.fail("model loaded"))
    argv = ["fit", "--survey-dir", str(folder), "--group", "PARTY=Green", "--n-train-questions", "2"]
    assert main([*argv, "--n-valid-questions", "1", *TINY, "--out", str(tmp_path / "o"), "--json"]) == 2
    assert "no ordinal answers" in last_json(capsys)["error"]


# --- training data scored as test --------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [lambda a, b: (a + " ", b), lambda a, b: (a, b.capitalize()), lambda a, b: ("  " + a.upper(), " " + b + "\t")],
    ids=["trailing-space", "capitalised-output", "spaces-and-case"],
)
def test_training_pairs_that_differ_in_whitespace_or_case_are_not_scored_as_test(model, variant):
    iv = fitted(model)
    splits = Task("tiny-antonym", list(TINY_PAIRS)).split(0, 8, 4)
    seen = splits.train.pairs + splits.valid.pairs
    copy = Task("copy", [variant(a, b) if (a, b) in seen else (a, b) for a, b in TINY_PAIRS])
    with pytest.raises(TaskError, match="were used to fit this intervention"):
        evaluate(model, copy.split(0, n_train=0), iv)  # every pair held out: the variants too


def test_survey_split_record_survives_algebra(model):
    from lens_laai.opinions.evaluate import evaluate_opinion
    from lens_laai.opinions.fit import opinion_metadata
    from lens_laai.opinions.prompts import OpinionPrompt

    survey = toy_survey()
    group = survey.group("PARTY=Red")
    a = HeadIntervention.from_deltas(
        model,
        {1: torch.full((4, 16), 0.1)},
        metadata=opinion_metadata(survey, group, survey.split(0, 3, 1), OpinionPrompt(), {}),
    )
    b = HeadIntervention.from_deltas(
        model,
        {1: torch.full((4, 16), 0.2)},
        metadata=opinion_metadata(survey, group, survey.split(1, 3, 1), OpinionPrompt(), {}),
    )

    def seen(*ivs):
        return {q for iv in ivs for part in ("train", "valid") for q in iv.metadata["survey"][part]}

    for combined, fitted_on in ((1.0 * a, seen(a)), (a + b, seen(a, b))):
        with pytest.raises(TaskError, match="disagree|fitted with"):
            evaluate_opinion(model, survey, "PARTY=Red", combined, seed=5, n_train=3, n_valid=1)
        scored = set(evaluate_opinion(model, survey, "PARTY=Red", combined).table["key"])
        assert scored and not scored & fitted_on


def test_a_save_without_data_record_needs_split_all(model, tmp_path, task_file, capsys):
    iv = fitted(model)
    iv.metadata.pop("data")
    iv.metadata.pop("fit_config")
    iv.save(tmp_path / "bare")
    argv = ["eval", "--task-file", str(task_file), "--intervention", str(tmp_path / "bare"), *TINY, "--json"]
    assert main(argv) == 2
    error = last_json(capsys)["error"]
    assert "held-out split cannot be checked" in error and "--split all" in error
    with pytest.warns(UserWarning, match="no data record"):
        assert main([*argv, "--split", "all"]) == 0
    assert last_json(capsys)["n"] == len(TINY_PAIRS)
