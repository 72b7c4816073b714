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
    """Base class: a problem with what the user gave us, explained in the message.

    Example:
        >>> from lens_laai import LensLaaiError, TaskError, load_task
        >>> try:
        ...     load_task("no-such-task")
        ... except LensLaaiError as err:  # every error a user can cause; also a ValueError
        ...     print(type(err).__name__, isinstance(err, ValueError))
        TaskError True
    """


class TaskError(LensLaaiError):
    """A task name, file, pair or split that cannot be used.

    Example:
        >>> from lens_laai import Task, TaskError
        >>> try:
        ...     Task.from_pairs([("hot", 3)])
        ... except TaskError as err:
        ...     print(type(err).__name__)
        TaskError
    """


class InterventionError(LensLaaiError):
    """An intervention that does not fit the model, file or operation it was given.

    Example:
        >>> from lens_laai import HeadIntervention, InterventionError
        >>> from lens_laai.testing import tiny_model
        >>> iv = HeadIntervention.zeros(tiny_model(), 1)
        >>> try:
        ...     iv * float("nan")
        ... except InterventionError as err:
        ...     print(type(err).__name__)
        InterventionError
    """


class FitError(LensLaaiError):
    """A fit that cannot start (bad options) or that went wrong (a non-finite loss).

    Example:
        >>> from lens_laai import FitError, fit
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> try:
        ...     fit(tiny_model(), tiny_task(), layer=99, progress=False)
        ... except FitError as err:
        ...     print(type(err).__name__)
        FitError
    """


class ModelError(LensLaaiError):
    """A model that cannot be loaded or is too small for the prompts it is given.

    Example:
        >>> from lens_laai import ModelError, load_model
        >>> try:
        ...     load_model("lens-laai-tiny", dtype="float8")
        ... except ModelError as err:
        ...     print(type(err).__name__)
        ModelError
    """


class SaveError(LensLaaiError, OSError):
    """A save that was refused (the path holds something else) or that the file system refused.

    Example:
        >>> import pathlib, tempfile
        >>> from lens_laai import HeadIntervention, SaveError
        >>> from lens_laai.testing import tiny_model
        >>> yours = pathlib.Path(tempfile.mkdtemp())
        >>> (yours / "notes.txt").write_text("not ours")
        8
        >>> try:  # a directory that is not one of our saves is never overwritten
        ...     HeadIntervention.zeros(tiny_model(), 1).save(yours)
        ... except SaveError as err:
        ...     print(type(err).__name__)
        SaveError
    """
