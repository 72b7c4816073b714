"""Atomic saves: safetensors tensors plus a JSON manifest in a directory; nothing half-written, nothing pickled."""

from lens_laai.storage.bundle import (
    atomic_write_bytes,
    atomic_write_text,
    check_save_path,
    is_save,
    load_bundle,
    save_bundle,
)

__all__ = ["atomic_write_bytes", "atomic_write_text", "check_save_path", "is_save", "load_bundle", "save_bundle"]
