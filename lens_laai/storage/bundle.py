"""Atomic saves: safetensors tensors + a JSON manifest in a directory; nothing half-written, nothing pickled.

Files are written under temporary names, fsynced and renamed, and the manifest is switched last,
so a reader (or a crash) always sees the old save or the new one; concurrent writers to one path
take turns under a lock, and a reader whose manifest was replaced while it read starts again. Files
follow the umask, and a path holding anything that is not one of our saves is never overwritten or
emptied. Reads open only regular files inside the save (:mod:`lens_laai.storage.safe_read`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_laai.errors import InterventionError, SaveError
from lens_laai.storage.lock import save_lock
from lens_laai.storage.safe_read import loads_json, read_regular_file

if TYPE_CHECKING:
    import torch

BUNDLE_VERSION = 2
MANIFEST = "manifest.json"
TMP_TAG = ".lens_laai-tmp-"
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_TENSOR_BYTES = 16 * 2**30
READ_ATTEMPTS = 50


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step (temp file, fsync, rename, directory fsync).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "new" / "blob.bin"  # missing folders are created
        >>> atomic_write_bytes(path, b"abc"), path.read_bytes(), os.listdir(path.parent)  # and no temporary file left
        (None, b'abc', ['blob.bin'])
    """
    path = Path(path)
    with _save_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(path, data)
        _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write_text(path, "written in one step")
        >>> path.read_text()
        'written in one step'
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> _ = path.write_text("abc")
        >>> sha256_file(path)[:16]
        'ba7816bf8f01cfea'
    """
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_save(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory whose manifest.json is an object with a ``lens_laai.*`` format.

    Example:
        >>> import tempfile
        >>> from lens_laai import HeadIntervention
        >>> from lens_laai.testing import tiny_model
        >>> folder = tempfile.mkdtemp()
        >>> path = HeadIntervention.zeros(tiny_model(), 1).save(folder + "/iv")
        >>> is_save(path), is_save(folder)
        (True, False)
    """
    return _our_manifest(Path(path)) is not None


def check_save_path(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Raise :class:`SaveError` if :func:`save_bundle` would refuse ``path``; write nothing; return it resolved.

    Allowed: a missing path, an empty directory, one of our saves and (with ``force``) a foreign
    directory without a manifest.json. Files and other foreign directories are refused, so that a
    wrong path cannot destroy someone's data.

    Example:
        >>> import tempfile
        >>> check_save_path(tempfile.NamedTemporaryFile(delete=False).name)  # someone's file
        Traceback (most recent call last):
        lens_laai.errors.SaveError: ... is not a lens_laai save; refusing to overwrite it. Choose a new path.
    """
    with _save_errors(Path(path)):
        target = Path(path).expanduser().resolve()
        if not os.path.lexists(target) or (target.is_dir() and (is_save(target) or not any(target.iterdir()))):
            _check_writable(target)
            return target
        refusal = f"{target} exists and is not a lens_laai save; refusing to overwrite it. Choose a new path"
        if not target.is_dir():
            raise SaveError(f"{refusal}.")
        if os.path.lexists(target / MANIFEST):
            raise SaveError(f"{refusal}: it holds another program's {MANIFEST}, which even force would overwrite.")
        if not force:
            raise SaveError(f"{refusal}, or pass force=True / --force to write into it (nothing in it is deleted).")
        _check_writable(target)
    return target


def _check_writable(target: Path) -> None:
    """Refuse ``target`` if it could not be created or written: below a file, or in a read-only folder."""
    if target.is_dir():
        if not os.access(target, os.W_OK | os.X_OK):
            raise SaveError(f"Cannot save to {target}: the folder is not writable. Choose a writable path.")
        return
    where = target.parent
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise SaveError(f"Cannot save to {target}: {where} is a file, not a folder. Choose another path.")
    if not os.access(where, os.W_OK | os.X_OK):
        raise SaveError(
            f"Cannot save to {target}: the folder {where} is not writable, so lens_laai could not create it. "
            "Choose a writable path."
        )


def save_bundle(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    tensor_stem: str,
    *,
    force: bool = False,
) -> Path:
    """Save ``tensors`` and ``manifest`` as directory ``path`` (layout v2) atomically; return the resolved path.

    The tensors go to ``{tensor_stem}.{sha256[:12]}.safetensors``; the manifest gains
    ``format_version``, ``tensor_file``, ``tensors_sha256`` and ``tensors_bytes``. A new save is built
    in a hidden sibling and renamed into place; an existing one gets the new tensor file first and
    its manifest switched last, so a crash at any point leaves the old or the new save loadable.
    Concurrent saves to one path take turns (:func:`lens_laai.storage.lock.save_lock`), so the
    last one to finish is the save, whole.

    Example:
        >>> import tempfile, torch
        >>> path = save_bundle(tempfile.mkdtemp() + "/b", {"w": torch.ones(2)}, {"format": "lens_laai.x"}, "w")
        >>> sorted(os.listdir(path))  # the manifest and one tensor file, named by its checksum
        ['manifest.json', 'w...safetensors']
    """
    from safetensors.torch import save

    if not _plain_name(f"{tensor_stem}.safetensors"):
        raise SaveError(f"Tensor file stem {tensor_stem!r} must be a plain file name.")
    target = check_save_path(path, force=force)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    digest = hashlib.sha256(data).hexdigest()
    name = f"{tensor_stem}.{digest[:12]}.safetensors"
    full = {
        **manifest,
        "format_version": BUNDLE_VERSION,
        "tensor_file": name,
        "tensors_sha256": digest,
        "tensors_bytes": len(data),
    }
    text = (json.dumps(full, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    with _save_errors(target), save_lock(target):
        check_save_path(target, force=force)  # again under the lock: another writer may have changed it
        (_write_into if target.exists() else _create)(target, name, data, text, tensor_stem)
    return target


def load_bundle(
    path: str | os.PathLike, fmt: str, tensor_stem: str, check: Callable[[dict[str, Any], str], Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a save of format ``fmt`` (layout v1 or v2): its tensors (safetensors, never pickle) and manifest.

    Only regular files directly inside ``path`` are read: a symlink, FIFO or device is refused
    before a byte is read (and without blocking), and the tensor file must have the size and SHA-256 its
    manifest records. ``check(manifest, where)`` (a schema) runs before the tensor file is read.
    The tensors are those of the manifest read: when a concurrent save replaces the manifest
    meanwhile, the read starts again. Anything unreadable raises :class:`InterventionError` naming
    the file and the problem.

    Example:
        >>> import tempfile, torch
        >>> path = save_bundle(tempfile.mkdtemp() + "/b", {"w": torch.arange(3.0)}, {"format": "lens_laai.x"}, "w")
        >>> tensors, manifest = load_bundle(path, "lens_laai.x", "w")
        >>> tensors["w"], manifest["format_version"]
        (tensor([0., 1., 2.]), 2)
    """
    root = Path(path)
    for attempt in range(READ_ATTEMPTS):
        raw, manifest = _read_manifest(root, fmt, check)
        try:
            return _read_tensors(root, manifest, tensor_stem), manifest
        except InterventionError:
            if attempt == READ_ATTEMPTS - 1 or _manifest_bytes(root) == raw:
                raise
        time.sleep(0.001 * (attempt + 1))
    raise AssertionError("unreachable")


def _read_manifest(
    root: Path, fmt: str, check: Callable[[dict[str, Any], str], Any] | None
) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes and its checked JSON object."""
    manifest_path, kind = root / MANIFEST, fmt.rsplit(".", 1)[-1]
    if not root.is_dir() or not os.path.lexists(manifest_path):
        raise InterventionError(f"{root} is not a saved {kind} (needs {MANIFEST} and a tensor file).")
    try:
        with _directory(root) as fd:
            raw = read_regular_file(MANIFEST, InterventionError, max_bytes=MAX_MANIFEST_BYTES, dir_fd=fd)
        manifest = loads_json(raw, "it", InterventionError)
    except InterventionError as err:
        raise InterventionError(f"{manifest_path} is not a readable JSON manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = (
            f"format {_short(manifest.get('format'))}"
            if isinstance(manifest, dict)
            else f"a {type(manifest).__name__}, not an object"
        )
        raise InterventionError(f"{manifest_path} is not a {fmt} manifest (it holds {found}).")
    if type(manifest.get("format_version")) is not int or manifest["format_version"] not in (1, BUNDLE_VERSION):
        raise InterventionError(
            f"{manifest_path} has format_version {_short(manifest.get('format_version'))}; "
            f"this lens_laai reads 1 and {BUNDLE_VERSION}. Upgrade lens_laai."
        )
    if _tensor_file(manifest, "x") is None:
        raise InterventionError(
            f"{manifest_path}: tensor_file {_short(manifest.get('tensor_file'))} is not a plain file name."
        )
    size = manifest.get("tensors_bytes")
    if size is not None and (type(size) is not int or size < 0):
        raise InterventionError(f"{manifest_path}: tensors_bytes {_short(size)} is not a byte count.")
    if check is not None:
        check(manifest, str(manifest_path))
    return raw, manifest


def _read_tensors(root: Path, manifest: dict[str, Any], stem: str) -> dict[str, torch.Tensor]:
    """The tensors of the file ``manifest`` names, after checking its size and checksum."""
    from safetensors.torch import load

    name = _tensor_file(manifest, stem)
    if name is None:
        raise InterventionError(f"{root}: the manifest names no plain tensor file; the save is corrupt or was edited.")
    try:
        with _directory(root) as fd:
            data = read_regular_file(
                name,
                InterventionError,
                max_bytes=MAX_TENSOR_BYTES,
                expect_bytes=manifest.get("tensors_bytes"),
                dir_fd=fd,
            )
    except InterventionError as err:
        raise InterventionError(f"{root} is not a saved {manifest['format'].rsplit('.', 1)[-1]}: {err}") from None
    if hashlib.sha256(data).hexdigest() != manifest.get("tensors_sha256"):
        raise InterventionError(
            f"{root / name} does not match the checksum in its manifest; the save is corrupt or was edited."
        )
    try:
        return load(data)
    except Exception as err:
        raise InterventionError(
            f"{root / name} is not a readable safetensors file ({err}); the save is corrupt."
        ) from err


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile manifest may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _manifest_bytes(root: Path) -> bytes | None:
    """The manifest's bytes now (to see whether a writer replaced it), or None if unreadable."""
    try:
        with _directory(root) as fd:
            return read_regular_file(MANIFEST, InterventionError, max_bytes=MAX_MANIFEST_BYTES, dir_fd=fd)
    except InterventionError:
        return None


@contextmanager
def _directory(root: Path) -> Iterator[int]:
    """An open descriptor of directory ``root``, so files are looked up inside it and nowhere else."""
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        raise InterventionError(f"Cannot open the save directory {root}: {err.strerror or err}.") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _create(target: Path, name: str, data: bytes, manifest: bytes, stem: str) -> None:
    """Build a new save in a hidden sibling directory, then rename it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_temps(target.parent, f".{target.name}{TMP_TAG}")
    tmp = _temp_name(target)
    os.mkdir(tmp, 0o777)
    try:
        _write_file(tmp / name, data)
        _write_file(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def _write_into(target: Path, name: str, data: bytes, manifest: bytes, stem: str) -> None:
    """Add the new tensor file to directory ``target``, switch its manifest, then drop superseded files."""
    old = _tensor_file(_our_manifest(target) or {}, stem)
    fresh = not os.path.lexists(target / name)
    try:
        _write_file(target / name, data)
        _fsync_dir(target)
        _write_file(target / MANIFEST, manifest)
    except BaseException:
        if fresh and _tensor_file(_our_manifest(target) or {}, stem) != name:
            (target / name).unlink(missing_ok=True)
        raise
    _fsync_dir(target)
    if old and old != name:
        (target / old).unlink(missing_ok=True)
    _remove_superseded(target, stem, name)
    _remove_temps(target, ".")
    _fsync_dir(target)


def _remove_superseded(directory: Path, stem: str, keep: str) -> None:
    """Delete our tensor files other than ``keep``: named ``stem.<12 hex>`` and matching their own SHA-256.

    A save killed between switching the manifest and deleting the old tensor file leaves one.
    """
    pattern = re.compile(rf"{re.escape(stem)}\.([0-9a-f]{{12}})\.safetensors")
    for entry in directory.iterdir():
        match = pattern.fullmatch(entry.name)
        if (
            entry.name != keep
            and match
            and not entry.is_symlink()
            and entry.is_file()
            and sha256_file(entry).startswith(match[1])
        ):
            entry.unlink(missing_ok=True)


def _remove_temps(directory: Path, prefix: str) -> None:
    """Delete leftovers of killed saves in ``directory``: entries starting with ``prefix`` that hold our tag."""
    for entry in directory.iterdir():
        if entry.name.startswith(prefix) and TMP_TAG in entry.name:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _write_file(path: Path, data: bytes) -> None:
    """Write a temp sibling of ``path`` (mode 0666 minus umask), fsync it and rename it over ``path``."""
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temp_name(path: Path) -> Path:
    """A new hidden sibling of ``path``: ``.{name}.lens_laai-tmp-{random}``, recognisable as our leftover."""
    return path.with_name(f".{path.name}{TMP_TAG}{secrets.token_hex(8)}")


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable; skipped where directories cannot be fsynced (Windows, some file systems)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _our_manifest(directory: Path) -> dict[str, Any] | None:
    """``directory``'s manifest if it is a regular file of UTF-8 JSON, an object with a ``lens_laai.*`` format."""
    try:
        with _directory(directory) as fd:
            raw = read_regular_file(MANIFEST, InterventionError, max_bytes=MAX_MANIFEST_BYTES, dir_fd=fd)
        manifest = loads_json(raw, str(directory / MANIFEST), InterventionError)
    except InterventionError:
        return None
    ours = (
        isinstance(manifest, dict)
        and isinstance(manifest.get("format"), str)
        and manifest["format"].startswith("lens_laai.")
    )
    return manifest if ours else None


def _tensor_file(manifest: dict[str, Any], stem: str) -> str | None:
    """The tensor file a manifest names (fixed in layout v1, recorded in v2), or None if it is not a plain name."""
    name = f"{stem}.safetensors" if manifest.get("format_version") == 1 else manifest.get("tensor_file")
    return name if _plain_name(name) else None


def _plain_name(name: Any) -> bool:
    """Whether ``name`` is a file name that stays inside its directory (no separators, not hidden)."""
    return isinstance(name, str) and bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


@contextmanager
def _save_errors(path: Path) -> Iterator[None]:
    """Turn an OSError while saving to ``path`` into a :class:`SaveError` naming the path, the reason and a fix."""
    try:
        yield
    except SaveError:
        raise
    except OSError as err:
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise SaveError(
            f"Cannot save to {path}{where}: {err.strerror or err}. Check that the folder is writable "
            "and the disk has space, or choose another path."
        ) from err
