"""Tiny in-memory models, tokenizer and task for tests, doctests and examples.

The models live in :mod:`lens_laai.models.tiny` (``load_model("lens-laai-tiny")`` builds them);
this module adds :func:`tiny_task`, whose words are single tokens of the tiny tokenizer.

Example:
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> len(tiny_task()), tiny_model().cfg.n_layers
    (24, 3)
"""

from __future__ import annotations

from lens_laai.models.tiny import (
    SLIDING_WINDOW,
    TINY_ARCHITECTURES,
    TINY_PAIRS,
    boot_in_memory,
    tiny_hf_model_for,
    tiny_model,
    tiny_model_for,
    tiny_tokenizer,
)
from lens_laai.tasks.task import Task

__all__ = [
    "SLIDING_WINDOW",
    "TINY_ARCHITECTURES",
    "TINY_PAIRS",
    "boot_in_memory",
    "tiny_hf_model_for",
    "tiny_model",
    "tiny_model_for",
    "tiny_task",
    "tiny_tokenizer",
]


def tiny_task() -> Task:
    """An antonym-like task whose words are single tokens of :func:`tiny_tokenizer`.

    Example:
        >>> from lens_laai.testing import tiny_task
        >>> task = tiny_task()
        >>> len(task), task.pairs[0]
        (24, ('hot', 'cold'))
    """
    return Task("tiny-antonym", list(TINY_PAIRS))
