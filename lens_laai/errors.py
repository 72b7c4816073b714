"""The exceptions lens_laai raises for bad input: each message names the problem and the fix.

Every error a user can cause (a task file, a saved intervention, a model name, an option) is a
:class:`LensLaaiError`, so a notebook can catch one type and the ``lens-laai`` command can print
the message without a traceback. They also subclass :class:`ValueError` (the Python convention
for a bad argument); :class:`SaveError` is an :class:`OSError` as well, since it is raised when
the file system refuses a write.

Example:
    >>> from lens_laai.errors import LensLaaiError, TaskError
    >>> issubclass(TaskError, LensLaaiError) and issubclass(TaskError, ValueError)
    True
"""

from __future__ import annotations


class LensLaaiError(ValueError):
    """Base class: a problem with what the user gave us, explained in the message."""


class TaskError(LensLaaiError):
    """A task name, file, pair or split that cannot be used."""


class InterventionError(LensLaaiError):
    """An intervention that does not fit the model, file or operation it was given."""


class FitError(LensLaaiError):
    """A fit that cannot start (bad options) or that went wrong (a non-finite loss)."""


class ModelError(LensLaaiError):
    """A model that cannot be loaded or is too small for the prompts it is given."""


class SaveError(LensLaaiError, OSError):
    """A save that was refused (the path holds something else) or that the file system refused."""
