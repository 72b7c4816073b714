"""Command-line arguments every ``lens-laai`` command shares, and their parsing into checked values.

Each parser raises :class:`~lens_laai.errors.LensLaaiError` with the flag's name, so a bad value
reaches the user as ``lens-laai CMD: error: ...`` rather than a traceback.

Example:
    >>> parse_floats("0.5,0.2", "--group-l1-rel")
    [0.5, 0.2]
    >>> parse_int("16", "--layer")
    16
    >>> parse_int_list("3,5", "--layers")
    [3, 5]
"""

from __future__ import annotations

import argparse
import math

from lens_laai.errors import FitError, LensLaaiError


def add_task_args(p: argparse.ArgumentParser) -> None:
    """The options of every command that reads a task and loads a model.

    Example:
        >>> import argparse
        >>> from lens_laai.cli.args import add_task_args
        >>> p = argparse.ArgumentParser()
        >>> add_task_args(p)
        >>> args = p.parse_args(["--task", "antonym", "--json"])
        >>> args.task, args.task_file, args.model, args.json, args.no_progress
        ('antonym', None, 'smollm2-135m', True, False)
    """
    p.add_argument("--task", default=None, help="bundled task name (antonym, synonym, english-french, english-german)")
    p.add_argument("--task-file", default=None, help="a Function Vectors-format JSON file; overrides --task")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (embedded), a hub name or a local dir")
    p.add_argument(
        "--device",
        default=None,
        help="where the model runs: cpu, cuda, cuda:N (default: the CPU for the embedded model)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="model weights: float32 (default), bfloat16 / bf16, float16 / fp16; Δ is always fitted in float32",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--no-progress", action="store_true")


def add_out_args(p: argparse.ArgumentParser) -> None:
    """``--out`` and ``--force`` of every command that saves.

    Example:
        >>> import argparse
        >>> from lens_laai.cli.args import add_out_args
        >>> p = argparse.ArgumentParser()
        >>> add_out_args(p)
        >>> args = p.parse_args(["--out", "runs/antonym"])
        >>> args.out, args.force
        ('runs/antonym', False)
    """
    p.add_argument("--out", required=True, help="directory to save the intervention in (new, or one of our saves)")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an existing directory that is not a lens_laai save (nothing in it is deleted)",
    )


def model_from_args(args: argparse.Namespace):
    """The model ``--model`` names, placed and cast by ``--device`` / ``--dtype`` (every command that loads one).

    Example:
        >>> import argparse
        >>> from lens_laai.cli.args import model_from_args
        >>> model = model_from_args(argparse.Namespace(model="lens-laai-tiny", device=None, dtype=None))
        >>> type(model).__name__, model.cfg.n_layers, model.cfg.n_heads
        ('TransformerBridge', 3, 4)
    """
    from lens_laai.models.loading import load_model

    return load_model(args.model, device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))


def task_from_args(args: argparse.Namespace):
    """The task ``--task`` or ``--task-file`` names.

    Example:
        >>> import argparse
        >>> from lens_laai.cli.args import task_from_args
        >>> task = task_from_args(argparse.Namespace(task="antonym", task_file=None))
        >>> task.name, len(task), task.pairs[0]
        ('antonym', 364, ('hot', 'cold'))
        >>> task_from_args(argparse.Namespace(task=None, task_file=None))
        Traceback (most recent call last):
        ...
        lens_laai.errors.TaskError: Give --task NAME or --task-file PATH (or --survey / --survey-dir for a survey).
    """
    from lens_laai.tasks.task import Task, TaskError, load_task

    if args.task_file:
        return Task.from_json(args.task_file, name=args.task or None)
    if not args.task:
        raise TaskError("Give --task NAME or --task-file PATH (or --survey / --survey-dir for a survey).")
    return load_task(args.task)


def parse_int(text: str, flag: str, words: str = "'auto'") -> int:
    """An integer flag that also takes the words ``words``, which the caller handles first.

    Example:
        >>> from lens_laai.cli.args import parse_int
        >>> parse_int("16", "--layer")
        16
    """
    try:
        value = int(text)
    except ValueError:
        raise LensLaaiError(f"{flag} must be an integer or {words}, got {text!r}.") from None
    if abs(value) >= 2**63:
        raise LensLaaiError(f"{flag} must be an integer below 2**63, got {text[:40]!r}.")
    return value


def parse_penalties(text: str | None, flag: str, at_most: float | None = None) -> float | list[float] | None:
    """A λ₂ value or path from the command line (``None`` if not given), each ≥ 0 (and ≤ ``at_most``).

    Example:
        >>> from lens_laai.cli.args import parse_penalties
        >>> parse_penalties("0.5,0.1", "--group-l1-rel", at_most=1.0), parse_penalties(None, "--group-l1")
        ([0.5, 0.1], None)
        >>> parse_penalties("-0.1", "--group-l1")
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: --group-l1 values must be ≥ 0, got '-0.1'.
        >>> parse_penalties("2", "--group-l1-rel", at_most=1.0)
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: --group-l1-rel values must be ≤ 1, got '2': at λ₂ ≥ λ_max every head is exactly zero, so the intervention would do nothing.
    """
    if text is None:
        return None
    values = parse_floats(text, flag)
    if any(v < 0 for v in (values if isinstance(values, list) else [values])):
        raise FitError(f"{flag} values must be ≥ 0, got {text!r}.")
    if at_most is not None and any(v > at_most for v in (values if isinstance(values, list) else [values])):
        raise FitError(
            f"{flag} values must be ≤ {at_most:g}, got {text!r}: at λ₂ ≥ λ_max every head is exactly zero, "
            "so the intervention would do nothing."
        )
    return values


def parse_floats(text: str, flag: str) -> float | list[float]:
    """One finite number, or a comma list of them (a list of one is the number); no empty elements.

    Example:
        >>> from lens_laai.cli.args import parse_floats
        >>> parse_floats("0.5,0.2,0.05", "--group-l1-rel"), parse_floats("0.3", "--group-l1")
        ([0.5, 0.2, 0.05], 0.3)
    """
    values = [parse_float(v, flag) for v in _elements(text, flag, "number")]
    return values[0] if len(values) == 1 else values


def parse_int_list(text: str, flag: str) -> list[int]:
    """A comma list of distinct integers (``--layers 3,5``); an empty element or a repeat is an error.

    Example:
        >>> from lens_laai.cli.args import parse_int_list
        >>> parse_int_list("3, 5", "--layers")
        [3, 5]
        >>> parse_int_list("3,5,3", "--layers")
        Traceback (most recent call last):
        ...
        lens_laai.errors.LensLaaiError: --layers lists [3] more than once, in '3,5,3'; give each once.
        >>> parse_int_list("3,,5", "--layers")
        Traceback (most recent call last):
        ...
        lens_laai.errors.LensLaaiError: --layers has an empty element in '3,,5'; write values separated by single commas.
    """
    values = [parse_int(v, flag, "a comma list of integers") for v in _elements(text, flag, "integer")]
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise LensLaaiError(f"{flag} lists {repeated} more than once, in {text!r}; give each once.")
    return values


def _elements(text: str, flag: str, kind: str) -> list[str]:
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        raise LensLaaiError(f"{flag} needs at least one {kind}; {flag.lstrip('-')} is empty (got {text!r}).")
    if any(not v for v in items):
        raise LensLaaiError(f"{flag} has an empty element in {text!r}; write values separated by single commas.")
    return items


def nonnegative_int(text: str) -> int:
    """An argparse ``type``: an integer ≥ 0 (seeds, counts).

    Example:
        >>> from lens_laai.cli.args import nonnegative_int
        >>> nonnegative_int("0")
        0
        >>> nonnegative_int("-1")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be an integer from 0 to 2**63 - 1, got '-1'
    """
    return _bounded_int(text, 0)


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer ≥ 1 (steps, folds, prompts).

    Example:
        >>> from lens_laai.cli.args import positive_int
        >>> positive_int("200")
        200
        >>> positive_int("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be an integer from 1 to 2**63 - 1, got '0'
        >>> positive_int("2.5")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be an integer ≥ 1, got '2.5'
    """
    return _bounded_int(text, 1)


def _bounded_int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ {least}, got {text!r}") from None
    if not least <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer from {least} to 2**63 - 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (learning rates).

    Example:
        >>> from lens_laai.cli.args import positive_float
        >>> positive_float("1e-3")
        0.001
        >>> positive_float("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a number > 0, got '0'
    """
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """An argparse ``type``: a finite number (``nan`` and ``inf`` are refused).

    Example:
        >>> from lens_laai.cli.args import finite_float
        >>> finite_float("-0.25")
        -0.25
        >>> finite_float("nan")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a finite number, got 'nan'
        >>> finite_float("half")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a number, got 'half'
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def nonempty_text(text: str) -> str:
    """An argparse ``type``: a string with something in it besides whitespace (a prompt).

    Example:
        >>> from lens_laai.cli.args import nonempty_text
        >>> nonempty_text("hot:")
        'hot:'
        >>> nonempty_text("  ")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must not be empty, got '  '
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


def parse_float(text: str, flag: str) -> float:
    """One finite number.

    Example:
        >>> from lens_laai.cli.args import parse_float
        >>> parse_float("0.05", "--group-l1")
        0.05
        >>> parse_float("inf", "--group-l1")
        Traceback (most recent call last):
        ...
        lens_laai.errors.LensLaaiError: --group-l1 must be finite numbers, got 'inf'.
        >>> parse_float("small", "--group-l1")
        Traceback (most recent call last):
        ...
        lens_laai.errors.LensLaaiError: --group-l1 must be numbers, got 'small'.
    """
    try:
        value = float(text)
    except ValueError:
        raise LensLaaiError(f"{flag} must be numbers, got {text!r}.") from None
    if not math.isfinite(value):
        raise LensLaaiError(f"{flag} must be finite numbers, got {text!r}.")
    return value
