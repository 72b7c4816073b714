"""Studies: grids of cells into one Parquet table; resumable, failures recorded, a killed Ray worker retried."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from lens_laai.cli import main
from lens_laai.studies import Study, StudyError, config_hash, load_study, read_results, run_study
from lens_laai.studies.cells import fit_cell
from lens_laai.studies.runner import LOCAL_RAY_CONFIG
from lens_laai.testing import tiny_task

HERE = str(Path(__file__).resolve().parent)
RUN_COLUMNS = ["seconds", "worker", "attempt", "finished_at"]
TIMEOUT = 240  # seconds for the whole Ray study, start-up included


# cell kinds the studies below name as "test_study:..." (imported in the workers from this folder)
def flaky(ctx, config: dict) -> dict:
    """Fails on x == 2; counts its calls in a file so a test can see which cells ran."""
    with open(config["log"], "a") as f:
        f.write(f"{config['x']}\n")
    if config["x"] == 2:
        raise ValueError("x = 2 is not allowed here")
    return {"square": float(config["x"] ** 2), "forward_equivalents": 1.0, "labelled_pairs": 0}


def slow_fit(ctx, config: dict) -> dict:
    """A tiny fit that first leaves a marker ``{cell}.{pid}`` and pauses, so a test can kill it mid-cell."""
    key = config_hash("test_study:slow_fit", config)
    config = dict(config)
    markers, pause = Path(config.pop("markers")), config.pop("pause")
    markers.mkdir(parents=True, exist_ok=True)
    (markers / f"{key}.{os.getpid()}").touch()
    time.sleep(pause)
    return fit_cell(ctx, config)


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tiny.json"
    tiny_task().to_json(path)
    return str(path)


def fit_study(task_file: str, **fixed) -> Study:
    return Study(
        "tiny-layers",
        "fit",
        axes={"layer": [0, 1, 2], "seed": [0, 1]},
        fixed={"model": "lens-laai-tiny", "task": task_file, "n": 8, "n_test": 8, "steps": 3, **fixed},
    )


def numbers(table: pd.DataFrame) -> pd.DataFrame:
    """What a cell found, without how it was run (time, process, attempt)."""
    return table.drop(columns=RUN_COLUMNS).sort_values("cell").reset_index(drop=True)


def test_a_study_file_expands_to_its_grid_with_stable_hashes(tmp_path, task_file):
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "g"\nkind = "fit"\npaths = ["."]\n[fixed]\nmodel = "lens-laai-tiny"\n'
        f'task = "{task_file}"\nn = 8\n[axes]\nlayer = [0, 1]\nseed = [0, 1, 2]\n'
    )
    study = load_study(path)
    cells = study.cells()
    assert len(cells) == 6 and len({c.key for c in cells}) == 6
    assert study.paths == (str(tmp_path.resolve()),)
    assert [c.key for c in load_study(path).cells()] == [c.key for c in cells]
    assert cells[0].config == {"model": "lens-laai-tiny", "task": task_file, "n": 8, "layer": 0, "seed": 0}
    changed = Study("other name", "fit", fixed={**cells[0].config})
    assert changed.cells()[0].key == cells[0].key  # the hash is of kind + config, not of the study's name


@pytest.mark.parametrize(
    "text, message",
    [
        ('kind = "fit"\n[axes]\nseed = []\n', "non-empty list"),
        ('kind = "fit"\nlayers = 3\n', "unknown keys"),
        ('kind = "fit"\n[fixed]\nseed = 1\n[axes]\nseed = [1, 2]\n', "both axes and fixed"),
        ('kind = "fit"\n[axes]\nseed = [1, 1]\n', "repeats a value"),
        ("kind = fit\n", "not valid TOML"),
    ],
)
def test_bad_study_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(StudyError, match=message):
        load_study(path)


def test_unknown_settings_and_kinds_fail_before_any_cell_runs(tmp_path, task_file):
    with pytest.raises(StudyError, match="no settings \\['stpes'\\]"):
        run_study(fit_study(task_file, stpes=3), tmp_path / "out", progress=False)
    with pytest.raises(StudyError, match="Unknown cell kind 'fitt'"):
        run_study(Study("s", "fitt", fixed={"model": "lens-laai-tiny"}), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out").exists(), "nothing is written for a study that cannot run"


def test_serial_study_writes_one_parquet_row_per_cell_and_a_rerun_skips_them(tmp_path, task_file):
    out = tmp_path / "out"
    table = run_study(fit_study(task_file), out, progress=False)
    files = sorted((out / "cells").iterdir())
    assert [f.suffix for f in files] == [".parquet"] * 6  # no temp files left behind
    assert len(table) == 6 and table.cell.is_unique and set(table.status) == {"ok"}
    assert sorted(table.fitted_layer) == [0, 0, 1, 1, 2, 2] and (table.labelled_pairs == 8).all()
    assert (table.forward_equivalents > table.fit_forward_equivalents).all() and (table.seconds > 0).all()
    assert json.loads(table.config.iloc[0])["model"] == "lens-laai-tiny"
    plain = pd.read_parquet(out / "cells")  # the folder is an ordinary Parquet dataset
    assert len(plain) == 6 and set(plain.cell) == set(table.cell)
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    again = run_study(fit_study(task_file), out, progress=False)
    assert {f.name: f.stat().st_mtime_ns for f in (out / "cells").iterdir()} == mtimes
    pd.testing.assert_frame_equal(again, table)
    bigger = Study("tiny-layers", "fit", axes={"layer": [0, 1, 2], "seed": [0, 1, 2]}, fixed=fit_study(task_file).fixed)
    assert len(run_study(bigger, out, progress=False)) == 9  # only the three new cells ran


def test_a_failing_cell_is_recorded_the_study_goes_on_and_a_rerun_retries_only_it(tmp_path):
    log = tmp_path / "calls.txt"
    study = Study("flaky", "test_study:flaky", axes={"x": [1, 2, 3]}, fixed={"log": str(log)}, paths=(HERE,))
    table = run_study(study, tmp_path / "out", progress=False).set_index("x")
    assert table.loc[2, "status"] == "failed" and "ValueError: x = 2 is not allowed here" in table.loc[2, "error"]
    assert table.loc[[1, 3], "square"].tolist() == [1.0, 9.0] and table.loc[[1, 3], "status"].eq("ok").all()
    assert pd.isna(table.loc[2, "square"])
    run_study(study, tmp_path / "out", progress=False)
    assert log.read_text().split() == ["1", "2", "3", "2"]


def test_cli_study_run_and_status(tmp_path, task_file, capsys):
    path = tmp_path / "s.toml"
    path.write_text(
        f'name = "cli"\nkind = "evaluate"\n[fixed]\nmodel = "lens-laai-tiny"\ntask = "{task_file}"\n'
        "n = 6\nn_test = 8\n[axes]\nshots = [0, 2]\n"
    )
    out = str(tmp_path / "out")
    assert main(["study", "run", str(path), "--out", out, "--workers", "0", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "out": out,
        "cells": 2,
        "ok": 2,
        "failed": 0,
        "to_run": 0,
    }
    table = read_results(out)
    assert sorted(table.shots) == [0, 2] and table.accuracy.between(0, 1).all()
    assert main(["study", "status", str(path), "--out", out]) == 0
    assert "2 cells, 2 done, 0 failed, 0 to run" in capsys.readouterr().out
    assert main(["study", "run", str(tmp_path / "missing.toml"), "--out", out, "--workers", "0"]) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err


DAMAGED_RECORDS = {
    "truncated JSON": (b'{"name": "flaky", "kind": "te', "not valid JSON"),
    "not UTF-8": (b"\xff\xfe{}", "not UTF-8"),
    "not an object": (b"[1, 2]", "expected a JSON object"),
    "a directory": (None, "a directory"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_RECORDS))
def test_a_damaged_study_record_is_a_study_error_naming_the_file_and_the_fix(tmp_path, damage):
    content, message = DAMAGED_RECORDS[damage]
    log, out = tmp_path / "calls.txt", tmp_path / "out"
    record = out / "study.json"
    out.mkdir()
    record.mkdir() if content is None else record.write_bytes(content)
    study = Study("flaky", "test_study:flaky", axes={"x": [1]}, fixed={"log": str(log)}, paths=(HERE,))
    with pytest.raises(StudyError, match=message) as err:
        run_study(study, out, progress=False)
    assert str(record) in str(err.value) and "delete study.json" in str(err.value) and "--out" in str(err.value)
    assert not log.exists()  # no cell ran
    assert record.is_dir() if content is None else record.read_bytes() == content  # the file is left as it was


def test_cli_names_a_damaged_study_record_in_one_line(tmp_path, task_file):
    import subprocess
    import sys

    path, out = tmp_path / "s.toml", tmp_path / "out"
    path.write_text(f'name = "cli"\nkind = "evaluate"\n[fixed]\nmodel = "lens-laai-tiny"\ntask = "{task_file}"\n')
    out.mkdir()
    (out / "study.json").write_text('{"name": "cli", ')
    env = {**os.environ, "PYTHONPATH": str(Path(HERE).parent)}
    cmd = [sys.executable, "-m", "lens_laai.cli", "study", "run", str(path), "--out", str(out), "--workers", "0"]
    done = subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "study.json" in lines[0] and "not valid JSON" in lines[0] and "--out" in lines[0], lines[0]


def test_a_worker_killed_mid_cell_is_retried_and_the_table_matches_a_serial_run(tmp_path, task_file):
    """Two Ray workers; one is SIGKILLed inside a cell. Ray restarts it and retries the cell; the table
    then holds every cell exactly once, with the numbers of a serial run. Ray must start here: no skip."""
    import ray

    study = Study(
        "kill",
        "test_study:slow_fit",
        axes={"seed": [0, 1], "layer": [0, 1, 2]},
        fixed={
            "model": "lens-laai-tiny",
            "task": task_file,
            "n": 8,
            "n_test": 8,
            "steps": 3,
            "markers": str(tmp_path / "markers"),
            "pause": 0.5,
        },
        paths=(HERE,),
    )
    out = tmp_path / "ray"
    killed: dict = {}

    def kill_one(actors) -> None:
        pids = set(ray.get([a.pid.remote() for a in actors], timeout=60))

        def watch() -> None:
            deadline = time.time() + TIMEOUT
            while time.time() < deadline and not killed:
                done = {f.stem for f in (out / "cells").glob("*.parquet")}
                for marker in sorted((tmp_path / "markers").glob("*.*")):
                    pid = int(marker.suffix[1:])
                    if pid in pids and done and marker.stem not in done:  # mid-study, this worker inside a cell
                        os.kill(pid, signal.SIGKILL)
                        killed.update(pid=pid, cell=marker.stem, rows_before=len(done))
                        return
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        _system_config=LOCAL_RAY_CONFIG,
    )
    try:
        start = time.time()
        table = run_study(study, out, workers=2, progress=False, on_worker_start=kill_one)
        assert time.time() - start < TIMEOUT
    finally:
        ray.shutdown()
    assert killed, "the watcher never saw a worker inside a cell"
    assert len(table) == 6 and table.cell.is_unique and set(table.status) == {"ok"}
    assert len(list((out / "cells").iterdir())) == 6
    retried = table.set_index("cell").loc[killed["cell"]]
    assert not retried.worker.endswith(f":{killed['pid']}")  # finished by the restarted worker
    serial = run_study(study, tmp_path / "serial", progress=False, threads=1)
    pd.testing.assert_frame_equal(numbers(table), numbers(serial))


def test_every_built_in_kind_runs_a_cell_on_the_tiny_model(tmp_path, task_file):
    from lens_laai.opinions.survey import toy_survey

    survey = tmp_path / "toy.json"
    survey.write_text(json.dumps(toy_survey().to_json()))
    base = {"model": "lens-laai-tiny", "task": task_file, "n": 8, "n_test": 8}
    studies = [
        Study("e", "evaluate", axes={"shots": [0, 2]}, fixed=base),
        Study(
            "a",
            "analyse",
            axes={"seed": [0]},
            fixed={**base, "layer": 1, "steps": 3, "n_prompts": 6, "analysis_shots": 2, "methods": ["dla"]},
        ),
        Study(
            "b",
            "baseline",
            axes={"method": ["function-vector", "mean-difference"]},
            fixed={**base, "n_valid": 4, "shots": 2, "layers": [1]},
        ),
        Study(
            "o",
            "opinion-fit",
            axes={"group": ["PARTY=Red"]},
            fixed={
                "model": "lens-laai-tiny",
                "survey": str(survey),
                "n_train": 3,
                "n_valid": 1,
                "layer": 1,
                "steps": 3,
            },
        ),
    ]
    tables = {s.kind: run_study(s, tmp_path / s.name, progress=False) for s in studies}
    for kind, table in tables.items():
        assert set(table.status) == {"ok"}, (kind, table.error.tolist())
        assert (table.forward_equivalents > 0).all() and table.labelled_pairs.notna().all()
    assert tables["evaluate"].set_index("shots").labelled_pairs.to_dict() == {0: 0, 2: 8}
    assert "dla_rho_selected" in tables["analyse"] and (tables["analyse"].analysis_forward_equivalents > 0).all()
    assert tables["baseline"].set_index("method").labelled_pairs.to_dict() == {
        "function-vector": 12,
        "mean-difference": 12,
    }
    assert tables["opinion-fit"].kl.between(0, 10).all() and tables["opinion-fit"].labelled_pairs.iloc[0] == 4
