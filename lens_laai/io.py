"""Atomic file writing and tensor bundles (safetensors + JSON manifest): nothing half-written, nothing pickled."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling of ``path``, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_bundle(path: Path, tensors: dict[str, "torch.Tensor"], manifest: dict[str, Any], tensor_file: str) -> Path:
    """Write directory ``path`` with ``tensor_file`` (safetensors) and ``manifest.json``, atomically.

    The manifest gets the tensors' SHA-256, checked by :func:`load_bundle`. The directory is built
    beside ``path`` and renamed into place, so a reader sees the old save or the new one, never half.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / tensor_file))
        manifest = {**manifest, "tensors_sha256": sha256_file(tmp / tensor_file)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_bundle(path: Path, fmt: str, version: int, tensor_file: str) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """Read what :func:`save_bundle` wrote: safetensors (never pickle) and a checked manifest.

    Raises ``ValueError`` naming the problem: missing files, bad JSON, another format, or a checksum
    mismatch (a corrupt or edited save).
    """
    from safetensors.torch import load_file

    path = Path(path)
    manifest_path, tensor_path = path / "manifest.json", path / tensor_file
    if not manifest_path.is_file() or not tensor_path.is_file():
        raise ValueError(f"{path} is not a saved {fmt.rsplit('.', 1)[-1]} (needs manifest.json and {tensor_file}).")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}).") from err
    if manifest.get("format") != fmt or manifest.get("format_version") != version:
        raise ValueError(f"{path} is not a {fmt} save of format version {version}.")
    if sha256_file(tensor_path) != manifest.get("tensors_sha256"):
        raise ValueError(f"{tensor_path} does not match the checksum in its manifest; the save is corrupt.")
    return load_file(str(tensor_path)), manifest


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is swapped out, never left half-written."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst} exists and is not a directory; choose another output path.")
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        os.replace(dst, old / "x")
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
