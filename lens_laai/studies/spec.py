"""A study: a grid of cells (the product of its axes), each cell one call of a cell kind.

A study is declared in Python (:class:`Study`) or in a TOML file (:func:`load_study`)::

    name = "antonym-layers"
    kind = "fit"                    # what each cell does (lens_laai.studies.cells), or "module:function"

    [fixed]                         # settings every cell shares
    model = "smollm2-135m"
    n_test = 100
    steps = 10

    [axes]                          # every combination of these is one cell
    task = ["antonym", "synonym"]
    layer = [8, 12, 16]
    seed = [0, 1]
    n = [10, 20]

A cell's config is ``fixed`` updated with its axis values; its hash (of the kind and the config, not
the study's name) names its row in the results, so a rerun finds the cells already done.

Example:
    >>> study = Study("demo", "fit", axes={"seed": [0, 1], "layer": [1, 2]}, fixed={"model": "lens-laai-tiny"})
    >>> [c.config["layer"] for c in study.cells()], len({c.key for c in study.cells()})
    ([1, 2, 1, 2], 4)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_laai.errors import LensLaaiError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


class StudyError(LensLaaiError):
    """A study that cannot run as declared (bad file, unknown kind, empty axis...).

    Example:
        >>> try:
        ...     Study("bad", "fit", axes={"seed": []})
        ... except StudyError as err:
        ...     print(err)
        Study 'bad': axis 'seed' must be a non-empty list of values, got [].
    """


@dataclass(frozen=True)
class Cell:
    """One point of the grid: the cell kind to run and its full config.

    Example:
        >>> cell = Cell("fit", {"model": "lens-laai-tiny", "layer": 1}, ("layer",))
        >>> cell.model, len(cell.key), cell.key == Cell("fit", {"layer": 1, "model": "lens-laai-tiny"}).key
        ('lens-laai-tiny', 16, True)
    """

    kind: str
    config: dict[str, Any]
    axes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """16 hex digits of SHA-256 over the kind and the canonical JSON of the config."""
        return config_hash(self.kind, self.config)

    @property
    def model(self) -> str | None:
        return self.config.get("model")


@dataclass(frozen=True)
class Study:
    """A named grid: ``kind`` run on every combination of ``axes``, each updated onto ``fixed``.

    ``paths``: folders put on ``sys.path`` in every worker before the kind is imported (for a
    ``"module:function"`` kind that lives outside an installed package, e.g. ``benchmarks/``).

    Example:
        >>> study = Study("layers", "fit", axes={"layer": [0, 1, 2]}, fixed={"model": "lens-laai-tiny", "steps": 3})
        >>> [cell.config for cell in study.cells()][-1]
        {'model': 'lens-laai-tiny', 'steps': 3, 'layer': 2}
        >>> study.to_dict()["axes"]
        {'layer': [0, 1, 2]}
    """

    name: str
    kind: str
    axes: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise StudyError("A study needs a non-empty string `name`.")
        if not isinstance(self.kind, str) or not self.kind:
            raise StudyError(f"Study {self.name!r}: `kind` must be a cell kind name or 'module:function'.")
        for axis, values in self.axes.items():
            if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
                raise StudyError(
                    f"Study {self.name!r}: axis {axis!r} must be a non-empty list of values, got {values!r}."
                )
            keys = [canonical_json(v) for v in values]
            if len(set(keys)) != len(keys):
                raise StudyError(f"Study {self.name!r}: axis {axis!r} repeats a value ({list(values)!r}).")
        both = set(self.axes) & set(self.fixed)
        if both:
            raise StudyError(f"Study {self.name!r}: {sorted(both)} are both axes and fixed settings; keep one.")
        for key, value in self.fixed.items():
            canonical_json(value)  # fails early on values TOML/JSON cannot hold
            if not isinstance(key, str):
                raise StudyError(f"Study {self.name!r}: setting names must be strings, got {key!r}.")

    def cells(self) -> list[Cell]:
        """Every cell, the last axis varying fastest."""
        names = tuple(self.axes)
        return [
            Cell(self.kind, {**self.fixed, **dict(zip(names, values))}, names)
            for values in itertools.product(*(self.axes[a] for a in names))
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "axes": {k: list(v) for k, v in self.axes.items()},
            "fixed": dict(self.fixed),
            "paths": list(self.paths),
        }


def load_study(path: str | os.PathLike) -> Study:
    """Read a study from a TOML file (keys ``name``, ``kind``, ``[axes]``, ``[fixed]``, ``paths``).

    Relative ``paths`` are taken from the file's folder.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "grid.toml"
        >>> _ = path.write_text('kind = "fit"\\n[fixed]\\nmodel = "lens-laai-tiny"\\n[axes]\\nseed = [0, 1]\\n')
        >>> with path.open("a") as f:
        ...     _ = f.write("layer = [1, 2]\\n")
        >>> study = load_study(path)
        >>> study.name, len(study.cells()), study.cells()[1].config
        ('grid', 4, {'model': 'lens-laai-tiny', 'seed': 0, 'layer': 2})
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a TOML file" if path.is_dir() else "does not exist"
        raise StudyError(f"Study file {path} {what}; give the path of a study's .toml file.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise StudyError(f"Study file {path} is not valid TOML ({err}).") from err
    unknown = set(data) - {"name", "kind", "axes", "fixed", "paths"}
    if unknown:
        raise StudyError(f"Study file {path}: unknown keys {sorted(unknown)}; use name, kind, [axes], [fixed], paths.")
    for table in ("axes", "fixed"):
        if not isinstance(data.get(table, {}), dict):
            raise StudyError(f"Study file {path}: `{table}` must be a table ([{table}]).")
    paths = tuple(str((path.parent / p).resolve()) for p in data.get("paths", []))
    return Study(
        name=data.get("name", path.stem),
        kind=data.get("kind", ""),
        axes=data.get("axes", {}),
        fixed=data.get("fixed", {}),
        paths=paths,
    )


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the same config always gives the same text.

    Example:
        >>> canonical_json({"b": [1, 2.5], "a": "x"})
        '{"a":"x","b":[1,2.5]}'
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except TypeError as err:
        raise StudyError(f"Study settings must be numbers, strings, booleans, lists or tables: {err}.") from err


def config_hash(kind: str, config: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over ``kind`` and the canonical JSON of ``config``: a cell's name in the results.

    Example:
        >>> config_hash("fit", {"a": 1, "b": 2}) == config_hash("fit", {"b": 2, "a": 1}), config_hash("fit", {"a": 1})
        (True, '...')
        >>> config_hash("fit", {"a": 1}) != config_hash("evaluate", {"a": 1})  # the kind is part of the hash
        True
    """
    return hashlib.sha256(canonical_json({"kind": kind, "config": dict(config)}).encode()).hexdigest()[:16]
