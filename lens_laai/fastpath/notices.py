"""One-time warnings: a fast path that steps aside says so once per process, not once per batch."""

from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Say ``message`` once per process (the fallback is silent about nothing, noisy about little)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
