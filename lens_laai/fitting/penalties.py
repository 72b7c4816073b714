"""The λ₂ values a fit takes: one number, or a list of them (a path), checked the same way everywhere.

Example:
    >>> lambda_values([0.5, 2])
    (0.5, 2.0)
    >>> lambda_values("0.5", "group_l1_rel")
    Traceback (most recent call last):
    ...
    lens_laai.errors.FitError: group_l1_rel must be a number or a non-empty list of numbers, got '0.5'.
"""

from __future__ import annotations

from collections.abc import Sequence

from lens_laai.errors import FitError


def lambda_values(value: float | Sequence[float], name: str = "group_l1") -> tuple[float, ...]:
    """``value`` (a number or a non-empty list or tuple of numbers) as a tuple of floats; else :class:`FitError` naming ``name``.

    Example:
        >>> from lens_laai.fitting.penalties import lambda_values
        >>> lambda_values(0.3), lambda_values((1, 0.5))
        ((0.3,), (1.0, 0.5))
        >>> lambda_values([], "group_l1_rel")
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: group_l1_rel must be a number or a non-empty list of numbers, got [].
        >>> lambda_values([0.5, True])
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: group_l1 must be a number or a non-empty list of numbers, got [0.5, True].
    """
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        raise FitError(f"{name} must be a number or a non-empty list of numbers, got {value!r}.")
    return tuple(float(v) for v in values)
