"""Atomic saves: safetensors tensors plus a JSON manifest in a directory; nothing half-written, nothing pickled."""
