"""lens_laai.storage.bundle: atomic, umask-respecting saves that never destroy foreign data, and loads that fail cleanly."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lens_laai.errors import InterventionError, SaveError
from lens_laai.storage import bundle as io
from lens_laai.storage.bundle import check_save_path, is_save, load_bundle, save_bundle

FMT, STEM = "lens_laai.Test", "weights"


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def save(path, seed=0, **kw):
    return save_bundle(path, tensors(seed), {"format": FMT, "note": "é ✓"}, STEM, **kw)


def snapshot(folder):
    """Every file under ``folder`` with its bytes: to compare before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def temps(folder):
    return [p.name for p in Path(folder).rglob("*") if io.TMP_TAG in p.name]


def assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k])


def assert_clean_save(path):
    names = sorted(os.listdir(path))
    assert len(names) == 2 and names[0] == "manifest.json" and names[1].startswith(f"{STEM}.")
    assert not temps(Path(path).parent)


def test_round_trip_and_manifest(tmp_path):
    out = save(tmp_path / "new" / "deep" / "save")
    got, manifest = load_bundle(out, FMT, STEM)
    assert_same(got, tensors(0))
    assert manifest["format"] == FMT and manifest["format_version"] == io.BUNDLE_VERSION == 2
    assert manifest["tensor_file"] == f"{STEM}.{manifest['tensors_sha256'][:12]}.safetensors"
    assert manifest["note"] == "é ✓" and "é ✓" in (out / "manifest.json").read_text(encoding="utf-8")
    assert is_save(out) and not is_save(tmp_path)
    assert_clean_save(out)


def test_saving_twice_replaces_and_leaves_one_tensor_file(tmp_path):
    out = save(tmp_path / "s", seed=0)
    assert save(out, seed=1) == out
    assert_same(load_bundle(out, FMT, STEM)[0], tensors(1))
    assert_clean_save(out)
    before = snapshot(out)
    save(out, seed=1)  # same content, same tensor file name: nothing deleted
    assert snapshot(out) == before


def test_relative_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert save("rel/") == tmp_path / "rel"
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    assert save(".") == tmp_path / "empty"
    monkeypatch.chdir(tmp_path / "rel")
    assert save("..", force=True) == tmp_path and is_save(tmp_path)  # no manifest there: force may add ours
    assert_same(load_bundle(tmp_path / "rel", FMT, STEM)[0], tensors(0))


def foreign(tmp_path):
    folder = tmp_path / "theirs"
    (folder / "sub").mkdir(parents=True)
    (folder / "data.txt").write_text("precious")
    (folder / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    return folder


def test_foreign_directory_is_refused_and_untouched(tmp_path):
    folder = foreign(tmp_path)
    before = snapshot(folder)
    with pytest.raises(SaveError, match="not a lens_laai save.*force=True") as err:
        save(folder)
    assert snapshot(folder) == before and sorted(os.listdir(tmp_path)) == ["theirs"]
    with pytest.raises(SaveError) as pre:
        check_save_path(folder)
    assert str(pre.value) == str(err.value)
    assert snapshot(folder) == before and sorted(os.listdir(tmp_path)) == ["theirs"]


def test_force_adds_our_files_and_keeps_theirs(tmp_path):
    folder = foreign(tmp_path)
    before = snapshot(folder)
    save(folder, force=True)
    save(folder, seed=1, force=True)
    after = snapshot(folder)
    assert {k: after[k] for k in before} == before
    assert len(after) == len(before) + 2 and "manifest.json" in after
    assert_same(load_bundle(folder, FMT, STEM)[0], tensors(1))


def test_foreign_manifest_refused_even_with_force(tmp_path):
    folder = foreign(tmp_path)
    (folder / "manifest.json").write_text('{"format": "someone.else"}')
    before = snapshot(folder)
    for force in (False, True):
        with pytest.raises(SaveError, match="manifest.json"):
            save(folder, force=force)
    assert snapshot(folder) == before


def test_file_path_refused_even_with_force(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    for force in (False, True):
        with pytest.raises(SaveError, match="not a lens_laai save"):
            save(target, force=force)
    assert target.read_text() == "keep me" and os.listdir(tmp_path) == ["file.txt"]


def test_dot_with_foreign_content_refused(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SaveError, match="not a lens_laai save"):
        save(".")
    assert os.listdir(tmp_path) == ["notes.txt"] and not temps(tmp_path.parent)


def test_empty_directory_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    save(tmp_path / "empty")
    assert_same(load_bundle(tmp_path / "empty", FMT, STEM)[0], tensors(0))
    assert_clean_save(tmp_path / "empty")


def failing(monkeypatch, name, when, exc):
    """Make ``os.<name>`` raise ``exc`` when ``when(args)`` holds."""
    real = getattr(os, name)

    def fake(*args, **kwargs):
        if when(args):
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, fake)


@pytest.mark.parametrize(
    "name, when, exc",
    [
        ("replace", lambda a: str(a[1]).endswith("manifest.json"), OSError(5, "Input/output error")),
        ("replace", lambda a: str(a[1]).endswith(".safetensors"), OSError(28, "No space left on device")),
        ("fsync", lambda a: True, OSError(5, "Input/output error")),
        ("replace", lambda a: str(a[1]).endswith("manifest.json"), KeyboardInterrupt()),
    ],
    ids=["manifest-switch", "tensor-rename", "tensor-fsync", "interrupt"],
)
def test_failed_overwrite_keeps_old_save(tmp_path, monkeypatch, name, when, exc):
    out = save(tmp_path / "s", seed=0)
    before = snapshot(tmp_path)
    failing(monkeypatch, name, when, exc)
    with pytest.raises(SaveError if isinstance(exc, OSError) else KeyboardInterrupt):
        save(out, seed=1)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert_same(load_bundle(out, FMT, STEM)[0], tensors(0))


@pytest.mark.parametrize("name, exc", [("rename", OSError(5, "Input/output error")), ("fsync", KeyboardInterrupt())])
def test_failed_new_save_leaves_nothing(tmp_path, monkeypatch, name, exc):
    failing(monkeypatch, name, lambda a: True, exc)
    with pytest.raises(SaveError if isinstance(exc, OSError) else KeyboardInterrupt):
        save(tmp_path / "s")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


KILL_SCRIPT = r"""
import sys, types
pkg = types.ModuleType("lens_laai"); pkg.__path__ = [sys.argv[1]]; sys.modules["lens_laai"] = pkg
import torch
from lens_laai.storage.bundle import save_bundle
i = 0
while True:
    i += 1
    save_bundle(sys.argv[2], {"w": torch.full((64, 64), float(i))}, {"format": "lens_laai.Test", "i": i}, "weights")
    if i == 1:
        print("saving", flush=True)
"""


def test_sigkill_mid_save_leaves_a_loadable_save(tmp_path):
    out = tmp_path / "s"
    save_bundle(out, {"w": torch.zeros(64, 64)}, {"format": FMT, "i": 0}, STEM)
    pkg = str(Path(io.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, pkg, str(out)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline() == b"saving\n"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got, manifest = load_bundle(out, FMT, STEM)
        assert torch.equal(got["w"], torch.full((64, 64), float(manifest["i"])))
        leftovers = set(os.listdir(out)) - {"manifest.json", manifest["tensor_file"]}
        assert all(io.TMP_TAG in n or n.startswith(f"{STEM}.") for n in leftovers)
    save_bundle(out, {"w": torch.ones(2)}, {"format": FMT}, STEM)
    assert_clean_save(out)


def test_next_save_removes_leftovers_of_killed_saves(tmp_path):
    (tmp_path / f".s{io.TMP_TAG}dead").mkdir()  # a killed first save
    (tmp_path / f".s{io.TMP_TAG}dead" / "manifest.json").write_text("{}")
    out = save(tmp_path / "s", seed=0)
    assert os.listdir(tmp_path) == ["s"]
    orphan = load_bundle(out, FMT, STEM)[1]["tensor_file"]
    kept = (out / orphan).read_bytes()
    save(out, seed=1)
    (out / orphan).write_bytes(kept)  # killed between the manifest switch and deleting the old file
    (out / f".manifest.json{io.TMP_TAG}dead").write_text("{")  # killed while writing the manifest
    lookalike = out / f"{STEM}.0123456789ab.safetensors"  # not ours: its name is not its checksum
    lookalike.write_bytes(b"theirs")
    save(out, seed=2)
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json", load_bundle(out, FMT, STEM)[1]["tensor_file"], lookalike.name]
    )


@pytest.mark.parametrize(
    "umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)], ids=["022", "077"]
)
def test_modes_follow_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = save(tmp_path / "parent" / "s")
        save(out, seed=1)
        io.atomic_write_text(tmp_path / "t.txt", "ü")
    finally:
        os.umask(old)
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "ü"
    assert (out.stat().st_mode & 0o777, (out.parent.stat().st_mode & 0o777)) == (dir_mode, dir_mode)
    for p in [*out.iterdir(), tmp_path / "t.txt"]:
        assert p.stat().st_mode & 0o777 == file_mode, p


@pytest.mark.parametrize("name, existing", [("mkdir", False), ("open", True)])
def test_os_errors_become_save_errors(tmp_path, monkeypatch, name, existing):
    out = tmp_path / "s"
    if existing:
        save(out)
    writes = (lambda a: True) if name == "mkdir" else (lambda a: len(a) > 1 and a[1] & os.O_CREAT)
    failing(monkeypatch, name, writes, PermissionError(13, "Permission denied", "x"))
    with pytest.raises(SaveError) as err:
        save(out, seed=1)
    assert str(out) in str(err.value) and "Permission denied" in str(err.value) and "writable" in str(err.value)
    assert isinstance(err.value.__cause__, PermissionError)


def test_atomic_write_error_is_save_error(tmp_path, monkeypatch):
    failing(monkeypatch, "open", lambda a: True, PermissionError(13, "Permission denied"))
    with pytest.raises(SaveError, match="t.txt.*Permission denied"):
        io.atomic_write_bytes(tmp_path / "t.txt", b"x")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_fsyncs_files_and_directories(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: (
            events.append("fsync-" + ("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")),
            real_fsync(fd),
        ),
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace-" + Path(b).name.split(".")[0]), real_replace(a, b))
    )
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append("rename-" + Path(b).name), real_rename(a, b)))
    save(tmp_path / "s")
    assert events == [
        "fsync-file",
        "replace-weights",
        "fsync-file",
        "replace-manifest",
        "fsync-dir",
        "rename-s",
        "fsync-dir",
    ]
    events.clear()
    save(tmp_path / "s", seed=1)
    assert events[:6] == ["fsync-file", "replace-weights", "fsync-dir", "fsync-file", "replace-manifest", "fsync-dir"]
    assert events[-1] == "fsync-dir"


def edit_manifest(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def corrupt_recomputed(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / manifest["tensor_file"]).write_bytes(b"\xff" * 64)
    edit_manifest(
        folder,
        lambda m: m.update(tensors_sha256=io.sha256_file(folder / manifest["tensor_file"]), tensors_bytes=64),
    )


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda f: (f / "manifest.json").write_text("{nope"), "not a readable JSON"),
        (lambda f: (f / "manifest.json").write_bytes(b'{"format": "\xff"}'), "not a readable JSON"),
        (lambda f: (f / "manifest.json").write_text("[1, 2]"), "not a lens_laai.Test manifest"),
        (lambda f: edit_manifest(f, lambda m: m.pop("format")), "not a lens_laai.Test manifest"),
        (lambda f: edit_manifest(f, lambda m: m.update(format="lens_laai.Other")), "not a lens_laai.Test manifest"),
        (lambda f: edit_manifest(f, lambda m: m.update(format_version=3)), "format_version 3"),
        (lambda f: edit_manifest(f, lambda m: m.update(format_version=True)), "format_version True"),
        (lambda f: edit_manifest(f, lambda m: m.pop("format_version")), "format_version None"),
        (lambda f: edit_manifest(f, lambda m: m.update(tensor_file="../s/manifest.json")), "not a plain file name"),
        (lambda f: edit_manifest(f, lambda m: m.update(tensor_file=["x"])), "not a plain file name"),
        (lambda f: edit_manifest(f, lambda m: m.update(tensor_file="gone.safetensors")), "not a saved Test"),
        (lambda f: edit_manifest(f, lambda m: m.update(tensors_sha256="0" * 64)), "checksum"),
        (lambda f: edit_manifest(f, lambda m: m.pop("tensors_sha256")), "checksum"),
        (corrupt_recomputed, "not a readable safetensors file"),
    ],
    ids=[
        "bad-json",
        "bad-utf8",
        "json-list",
        "no-format",
        "other-format",
        "version-3",
        "version-bool",
        "no-version",
        "traversal",
        "name-not-str",
        "missing-tensor",
        "checksum",
        "no-checksum",
        "garbage-tensor",
    ],
)
def test_unreadable_saves_raise_intervention_error(tmp_path, damage, match):
    out = save(tmp_path / "s")
    damage(out)
    with pytest.raises(InterventionError, match=match):
        load_bundle(out, FMT, STEM)


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.write_text("x"), lambda p: p.mkdir()])
def test_not_a_save_raises_intervention_error(tmp_path, make):
    make(tmp_path / "x")
    with pytest.raises(InterventionError, match="not a saved Test"):
        load_bundle(tmp_path / "x", FMT, STEM)


def test_v1_layout_still_loads_and_is_upgraded(tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "old"
    out.mkdir()
    save_file(tensors(0), str(out / f"{STEM}.safetensors"))
    manifest = {"format": FMT, "format_version": 1, "tensors_sha256": io.sha256_file(out / f"{STEM}.safetensors")}
    (out / "manifest.json").write_text(json.dumps(manifest))
    got, loaded = load_bundle(out, FMT, STEM)
    assert_same(got, tensors(0))
    assert loaded["format_version"] == 1
    save(out, seed=1)
    assert_same(load_bundle(out, FMT, STEM)[0], tensors(1))
    assert_clean_save(out)


OLD_SAVES = Path(__file__).parent / "data" / "saves_0_1"  # written by lens_laai 0.1 (commit 2a68bfc): make_saves.py


@pytest.mark.parametrize(
    "name, kind", [("head", "HeadIntervention"), ("ablation", "HeadAblation"), ("residual", "ResidualIntervention")]
)
def test_saves_of_the_flat_0_1_layout_load_and_act_the_same(name, kind):
    """0.2 moved every module; a 0.1 save still loads, as the same class, and changes the logits as 0.1 did."""
    from lens_laai import evaluate, load_intervention
    from lens_laai.tasks.prompts import make_batch
    from lens_laai.testing import tiny_model, tiny_task

    expected = json.loads((OLD_SAVES / "expected.json").read_text())
    model = tiny_model()
    iv = load_intervention(OLD_SAVES / name, model, strict=True)
    assert type(iv).__name__ == kind
    batch = make_batch(model.tokenizer, expected["prompts"], [" cold", " small"])
    with torch.no_grad(), iv.apply(model):
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)[:, -1, :16]
    with torch.no_grad():
        plain = model(batch.input_ids, attention_mask=batch.attention_mask)[:, -1, :16]
    want = torch.tensor(expected["last_token_logits_first_16"][name])
    assert not torch.allclose(plain, want, atol=1e-4), "the saved intervention changes the logits"
    assert torch.allclose(logits, want, atol=1e-5)
    if name == "head":
        assert [list(h) for h in iv.selected_heads()] == expected["head_selected"]
        # the recorded split and template still reproduce 0.1's evaluation of it
        assert evaluate(model, tiny_task(), iv).accuracy == expected["head_test_accuracy"]
