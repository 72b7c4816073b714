"""Property-based fault tests (Hypothesis): whatever a file or a flag holds, we load it or raise our own error, fast.

Each property feeds arbitrary input to a loader (a save's manifest or tensor file, one manifest
field, a task file, a survey file) or to the CLI's numeric and list flags, and asserts the outcome
is a correct load or a :class:`LensLaaiError` subclass, never a hang: a signal deadline of 5 s per
example fails it (typical examples take 1-100 ms; Hypothesis' own 1 s deadline was flaky on a
shared, loaded machine, where one save's fsync took 8 s). The example counts are set by the ``faults`` profile
below (``LENS_LAAI_FAULT_EXAMPLES`` scales them); ``pytest --hypothesis-show-statistics`` prints
how many each property ran.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_faults import deadline

from lens_laai.cli.main import main
from lens_laai.errors import LensLaaiError
from lens_laai.evaluation.evaluate import resolve_template
from lens_laai.interventions.head import HeadIntervention
from lens_laai.interventions.protocol import load_intervention
from lens_laai.opinions.loading import load_survey
from lens_laai.opinions.survey import toy_survey
from lens_laai.tasks.prompts import PromptTemplate
from lens_laai.tasks.provenance import fit_metadata, records_of
from lens_laai.tasks.task import load_task
from lens_laai.testing import TINY_PAIRS, tiny_model, tiny_task

EXAMPLES = int(os.environ.get("LENS_LAAI_FAULT_EXAMPLES", "100"))
settings.register_profile(
    "faults",
    max_examples=EXAMPLES,
    deadline=None,  # timed by a signal instead (5 s, a hang): on a loaded machine a 1 s limit is flaky (one fsync took 8 s)
    derandomize=True,  # the same examples on every run: CI failures reproduce
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
FAULTS = settings.get_profile("faults")

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def good_save(model, tmp_path_factory):
    """One valid save (with a data record and template), copied before each example changes it."""
    task = tiny_task()
    splits = task.split(0, 8, 4)
    delta = torch.zeros(4, 16)
    delta[1] = 0.3
    iv = HeadIntervention.from_deltas(model, {1: delta}, metadata=fit_metadata(splits, task, PromptTemplate(), {}))
    path = tmp_path_factory.mktemp("good") / "iv"
    iv.save(path)
    return path


def outcome(load, *args):
    """``"ok"`` or ``"refused"``; any other exception, or over 5 s, fails the example."""
    with deadline(5):
        try:
            load(*args)
        except LensLaaiError:
            return "refused"
    return "ok"


def copy_save(good_save: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="lens-laai-prop-")) / "iv"
    shutil.copytree(good_save, folder)
    return folder


@FAULTS
@given(data=st.binary(max_size=2000))
def test_any_bytes_as_a_manifest(good_save, data):
    folder = copy_save(good_save)
    (folder / "manifest.json").write_bytes(data)
    assert outcome(load_intervention, folder) in ("ok", "refused")


@FAULTS
@given(data=st.binary(max_size=4000), fix_checksum=st.booleans())
def test_any_bytes_as_a_tensor_file(good_save, data, fix_checksum):
    import hashlib

    folder = copy_save(good_save)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / manifest["tensor_file"]).write_bytes(data)
    if fix_checksum:  # so the bytes reach the safetensors parser and our checks after it
        manifest.update(tensors_sha256=hashlib.sha256(data).hexdigest(), tensors_bytes=len(data))
        (folder / "manifest.json").write_text(json.dumps(manifest))
    assert outcome(load_intervention, folder) in ("ok", "refused")


def _paths(value, prefix=()):
    """Every key path in a manifest (dicts and lists), to replace one at a time."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:2]):
            out += _paths(item, (*prefix, i))
    return out


@FAULTS
@given(choice=st.integers(min_value=0), value=JSON)
def test_any_json_value_in_any_manifest_field(good_save, model, choice, value):
    folder = copy_save(good_save)
    manifest = json.loads((folder / "manifest.json").read_text())
    paths = [p for p in _paths(manifest) if p[0] not in ("format",)]
    path = paths[choice % len(paths)]
    edited = copy.deepcopy(manifest)
    parent = edited
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    (folder / "manifest.json").write_text(json.dumps(edited))

    def load_and_use(folder):
        iv = load_intervention(folder, model)
        iv.fwd_hooks()
        iv.heads()
        records_of([iv.metadata])  # what evaluation reads: the data records and the template
        resolve_template(None, [iv]).render("x", [("a", "b")])

    assert outcome(load_and_use, folder) in ("ok", "refused")


@FAULTS
@given(data=st.one_of(st.binary(max_size=2000), JSON.map(lambda v: json.dumps(v).encode())))
def test_any_task_file(data):
    path = Path(tempfile.mkdtemp(prefix="lens-laai-prop-")) / "task.json"
    path.write_bytes(data)
    assert outcome(load_task, path) in ("ok", "refused")


@FAULTS
@given(pairs=st.lists(st.tuples(JSON, JSON), min_size=1, max_size=5))
def test_any_values_as_task_pairs(pairs):
    path = Path(tempfile.mkdtemp(prefix="lens-laai-prop-")) / "task.json"
    path.write_text(json.dumps([{"input": a, "output": b} for a, b in pairs]))
    assert outcome(load_task, path) in ("ok", "refused")


SURVEY = toy_survey().to_json()


@FAULTS
@given(choice=st.integers(min_value=0), value=JSON, raw=st.none() | st.binary(max_size=1000))
def test_any_survey_file(choice, value, raw):
    path = Path(tempfile.mkdtemp(prefix="lens-laai-prop-")) / "survey.json"
    if raw is not None:
        path.write_bytes(raw)
    else:
        edited = copy.deepcopy(SURVEY)
        paths = _paths(edited)
        where = paths[choice % len(paths)]
        parent = edited
        for key in where[:-1]:
            parent = parent[key]
        parent[where[-1]] = value
        path.write_text(json.dumps(edited))
    assert outcome(load_survey, path) in ("ok", "refused")


class _ModelReached(Exception):
    """Raised where the CLI would load the model: every check before it passed."""


FIT_FLAGS = [
    "--n-train",
    "--n-valid",
    "--n-test",
    "--seed",
    "--steps",
    "--lr",
    "--l1",
    "--folds",
    "--group-l1",
    "--group-l1-rel",
    "--layers",
    "--layer",
]
VALUES = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats().map(repr),
    st.lists(st.one_of(st.integers(-3, 40).map(str), st.just(""), st.floats(0, 2).map(repr)), max_size=4).map(",".join),
)


@FAULTS
@given(flags=st.lists(st.tuples(st.sampled_from(FIT_FLAGS), VALUES), min_size=1, max_size=3))
def test_cli_numeric_and_list_flags(monkeypatch, tmp_path, capsys, flags):
    def reached(args):
        raise _ModelReached

    monkeypatch.setattr(sys.modules["lens_laai.cli.fit_command"], "model_from_args", reached)
    monkeypatch.setattr(sys.modules["lens_laai.cli.saved"], "model_from_args", reached)
    task = tmp_path / "t.json"
    if not task.exists():
        task.write_text(json.dumps([{"input": a, "output": b} for a, b in TINY_PAIRS]))
    argv = ["fit", "--task-file", str(task), "--out", str(tmp_path / "out"), "--model", "lens-laai-tiny", "--json"]
    argv += [f"{flag}={value}" for flag, value in flags]
    capsys.readouterr()
    with deadline(5):
        try:
            code = main(argv)
        except _ModelReached:
            return
    assert code == 2
    assert "error" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@FAULTS
@given(flag=st.sampled_from(["--seed", "--n-train", "--n-valid", "--shots"]), value=VALUES)
def test_cli_eval_flags(monkeypatch, tmp_path, capsys, flag, value):
    def reached(args):
        raise _ModelReached

    monkeypatch.setattr(sys.modules["lens_laai.cli.fit_command"], "model_from_args", reached)
    monkeypatch.setattr(sys.modules["lens_laai.cli.saved"], "model_from_args", reached)
    capsys.readouterr()
    with deadline(5):
        try:
            code = main(["eval", "--task", "antonym", "--model", "lens-laai-tiny", "--json", f"{flag}={value}"])
        except _ModelReached:
            return
    assert code == 2 and "error" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@FAULTS
@given(weights=VALUES)
def test_cli_compose_weights(good_save, tmp_path, capsys, weights):
    capsys.readouterr()
    with deadline(5):
        code = main(["compose", str(good_save), "--weights", weights, "--out", str(tmp_path / "c"), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (code, "error" in out) in ((0, False), (2, True))
