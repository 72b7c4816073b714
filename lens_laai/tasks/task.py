"""Task data: (input, output) pairs, the Function Vectors JSON format, and seeded splits.

A task file is a JSON list of ``{"input": ..., "output": ...}`` objects, the format of the
Function Vectors project. We ship our own files for four tasks (``bundled_tasks()``) and read
the format from any path.

Example:
    >>> from lens_laai.tasks.task import load_task
    >>> task = load_task("antonym")
    >>> splits = task.split(seed=0, n_train=20, n_valid=40)
    >>> len(splits.train), len(splits.valid)
    (20, 40)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lens_laai.errors import TaskError

Pair = tuple[str, str]


@dataclass(frozen=True)
class Task:
    """A named list of distinct (input, output) string pairs (a split may be empty).

    Exact duplicate pairs are dropped with a warning: a pair listed twice could otherwise land
    in both the training and the test split.

    Example:
        >>> from lens_laai import Task
        >>> task = Task.from_pairs([("hot", "cold"), ("up", "down"), ("big", "small")], name="mini")
        >>> len(task), task.inputs, task.outputs[0]
        (3, ['hot', 'up', 'big'], 'cold')
    """

    name: str
    pairs: list[Pair]

    def __post_init__(self) -> None:
        pairs = [_check_pair(self.name, i, pair) for i, pair in enumerate(self.pairs)]
        unique = list(dict.fromkeys(pairs))
        if len(unique) < len(pairs):
            warnings.warn(
                f"Task {self.name!r}: dropped {len(pairs) - len(unique)} duplicate pairs "
                "(kept the first of each), so no pair is in two splits.",
                UserWarning,
                stacklevel=3,
            )
        object.__setattr__(self, "pairs", unique)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], name: str = "pairs") -> Task:
        """A task from your own (input, output) or (prompt, target) strings."""
        return cls(name, list(pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def inputs(self) -> list[str]:
        return [a for a, _ in self.pairs]

    @property
    def outputs(self) -> list[str]:
        return [b for _, b in self.pairs]

    def data_hash(self) -> str:
        """A short content hash, recorded in fitted interventions' manifests."""
        blob = json.dumps(self.pairs, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def subset(self, indices: list[int], name: str | None = None) -> Task:
        return Task(name or self.name, [self.pairs[i] for i in indices])

    def split(self, seed: int = 0, n_train: int = 20, n_valid: int = 0, n_test: int | None = None) -> TaskSplits:
        """Shuffle with ``seed`` and cut into train / valid / test (the rest, or ``n_test``)."""
        for label, n, least in (
            ("n_train", n_train, 0),
            ("n_valid", n_valid, 0),
            ("n_test", n_test, 1),
            ("seed", seed, 0),
        ):
            if label == "n_test" and n is None:
                continue
            if not isinstance(n, int) or isinstance(n, bool) or n < least:
                raise TaskError(f"{label} must be an integer ≥ {least}, got {n!r}.")
        need = n_train + n_valid + (n_test or 1)
        if need > len(self):
            raise TaskError(
                f"Task {self.name!r} has {len(self)} pairs but the split asks for {need} "
                f"(n_train={n_train}, n_valid={n_valid}, n_test={n_test or '≥1'}); use fewer."
            )
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        end_test = None if n_test is None else n_train + n_valid + n_test
        return TaskSplits(
            train=self.subset(order[:n_train]),
            valid=self.subset(order[n_train : n_train + n_valid]),
            test=self.subset(order[n_train + n_valid : end_test]),
            seed=seed,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike, name: str | None = None) -> Task:
        """Read a Function Vectors-format JSON file: ``[{"input": ..., "output": ...}, ...]``."""
        from lens_laai.storage.safe_read import loads_json, read_regular_file

        path = Path(path)
        if path.is_dir():
            raise TaskError(f"Task file {path} is a directory; give the path of a JSON file inside it.")
        if not os.path.lexists(path):
            raise TaskError(f"Task file {path} does not exist.")
        raw = read_regular_file(path, TaskError, follow_symlinks=True)
        data = loads_json(raw, f"Task file {path}", TaskError)
        if not isinstance(data, list) or not data:
            raise TaskError(
                f'Task file {path} must hold a non-empty JSON list of {{"input": ..., "output": ...}} objects.'
            )
        pairs = []
        for i, item in enumerate(data):
            if not isinstance(item, dict) or not {"input", "output"} <= item.keys():
                raise TaskError(f"Task file {path}, entry {i} ({item!r}) needs both 'input' and 'output'.")
            pairs.append((item["input"], item["output"]))
        return cls(name or path.stem, pairs)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the task in the Function Vectors format, atomically."""
        from lens_laai.storage.bundle import atomic_write_text

        rows = [{"input": a, "output": b} for a, b in self.pairs]
        atomic_write_text(Path(path), json.dumps(rows, ensure_ascii=False, indent=1))


def _check_pair(name: str, i: int, pair: Any) -> Pair:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TaskError(f"Task {name!r}, pair {i} is {pair!r}: each pair needs an input and an output.")
    bad = [s for s in pair if not isinstance(s, str) or not s.strip()]
    if bad:
        kind = "an empty string" if isinstance(bad[0], str) else f"a {type(bad[0]).__name__}, not a string"
        raise TaskError(
            f"Task {name!r}, pair {i} is {tuple(pair)!r}: {bad[0]!r} is {kind}. "
            "Inputs and outputs must be non-empty strings (quote numbers in the JSON file)."
        )
    return (pair[0], pair[1])


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint train / valid / test parts of one task, cut by ``seed``.

    Example:
        >>> from lens_laai import load_task
        >>> splits = load_task("antonym").split(seed=0, n_train=20)
        >>> len(splits.train), len(splits.valid), len(splits.test), splits.seed
        (20, 0, 344, 0)
    """

    train: Task
    valid: Task
    test: Task
    seed: int


def bundled_tasks() -> list[str]:
    """Names of the task files shipped with lens_laai.

    Example:
        >>> from lens_laai import bundled_tasks
        >>> bundled_tasks()
        ['antonym', 'english-french', 'english-german', 'synonym']
    """
    folder = resources.files("lens_laai") / "data" / "tasks"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_task(name_or_path: str | os.PathLike) -> Task:
    """A bundled task by name (``"antonym"``) or any Function Vectors-format JSON file.

    Example:
        >>> from lens_laai import load_task
        >>> task = load_task("antonym")  # or a path to a Function Vectors JSON file
        >>> task.name, len(task), task.pairs[0] in task.pairs
        ('antonym', 364, True)
    """
    text = str(name_or_path)
    if text in bundled_tasks():
        with resources.as_file(resources.files("lens_laai") / "data" / "tasks" / f"{text}.json") as p:
            return Task.from_json(p, name=text)
    if text.endswith(".json") or Path(text).exists():
        return Task.from_json(text)
    raise TaskError(
        f"Unknown task {text!r}. Bundled tasks: {', '.join(bundled_tasks())}; "
        'or pass the path of a JSON file of {"input", "output"} pairs (--task-file).'
    )


def compose_tasks(first: Task, second: Task, name: str | None = None) -> Task:
    """Chain two tasks: input ``x`` of ``first``, target ``second(first(x))``.

    Keeps the pairs whose intermediate word is an input of ``second`` (matched case-insensitively),
    e.g. antonym then English→French: ``hot`` → ``cold`` → ``froid``.

    Example:
        >>> from lens_laai import Task, compose_tasks
        >>> first = Task.from_pairs([("hot", "cold"), ("up", "down"), ("big", "small")], name="antonym")
        >>> second = Task.from_pairs([("cold", "froid"), ("down", "bas")], name="french")
        >>> chained = compose_tasks(first, second)
        >>> chained.name, chained.pairs
        ('antonym+french', [('hot', 'froid'), ('up', 'bas')])
    """
    lookup = {a.strip().lower(): b for a, b in second.pairs}
    pairs = [(a, lookup[b.strip().lower()]) for a, b in first.pairs if b.strip().lower() in lookup]
    if not pairs:
        raise TaskError(f"No output of {first.name!r} is an input of {second.name!r}; nothing to compose.")
    return Task(name or f"{first.name}+{second.name}", pairs)
