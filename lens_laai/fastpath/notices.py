"""One-time warnings: a fast path that steps aside says so once per process, not once per batch."""

from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Say ``message`` once per process (the fallback is silent about nothing, noisy about little).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     for _ in range(3):
        ...         warn_once("example:doc", "The fast path is off for this example; using the full forward.")
        >>> len(caught), caught[0].category.__name__
        (1, 'RuntimeWarning')
    """
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
