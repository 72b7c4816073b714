"""Read a survey in OpinionQA's layout (Santurkar et al. 2023) from a directory you give.

The directory holds three CSV files:

* ``info.csv``: one row per question: ``key``, ``question``, ``references`` (a Python-literal list
  of option texts, the ordinal options first and refusal-type options such as ``'Refused'`` after
  them), ``option_ordinal`` (a list of numbers, one per ordinal option) and optionally
  ``option_mapping`` (a dict literal from answer codes to option texts; checked, not needed);
* ``metadata.csv``: one row per demographic attribute: ``key`` and ``options`` (a list of its groups);
* ``responses.csv``: one row per respondent: the answer text for each question key (empty when
  not asked), one column per attribute, and a weight column whose name starts with ``WEIGHT``
  (equal weights when there is none).

List columns are parsed with :func:`ast.literal_eval`, never ``eval``. A group is
``ATTRIBUTE=VALUE``; its target for a question is the weighted count of each ordinal answer,
normalised, and the weighted share of refusal answers is kept apart, as in OpinionQA. Questions
whose ordinal values are all equal (not ordinal) are dropped with a warning. Every problem raises
:class:`~lens_laai.errors.TaskError` naming the file, line and column.

Example:
    >>> import pathlib, tempfile
    >>> from lens_laai.opinions.opinionqa import load_opinionqa
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "info.csv").write_text('key,question,references,option_ordinal\\n'
    ...     'Q1,Is it good?,"[\\'Yes\\', \\'No\\', \\'Refused\\']","[1, 2]"\\n')
    >>> _ = (d / "metadata.csv").write_text('key,options\\nSEX,"[\\'Male\\', \\'Female\\']"\\n')
    >>> _ = (d / "responses.csv").write_text('Q1,SEX,WEIGHT_W1\\nYes,Male,2\\nNo,Male,1\\nRefused,Male,1\\nNo,Female,1\\n')
    >>> survey = load_opinionqa(d)
    >>> survey.group("SEX=Male").answers["Q1"].distribution.round(3).tolist()
    [0.667, 0.333]
    >>> survey.group("SEX=Male").answers["Q1"].refusal_share
    0.25
"""

from __future__ import annotations

import ast
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from lens_laai.errors import TaskError
from lens_laai.opinions.survey import Group, Survey, SurveyQuestion, group_answers
from lens_laai.storage.safe_read import read_regular_file

PERSONAS = {  # "Answer the following question as if {persona}." (OpinionQA's steer-portray style)
    "POLPARTY": "in politics today, you considered yourself a {value}",
    "POLIDEOLOGY": "in politics today, you would describe your political views as {value}",
    "SEX": "your sex was {value}",
    "RACE": "your race or ethnicity was {value}",
    "AGE": "your age was {value}",
    "EDUCATION": "the highest level of school you completed was: {value}",
    "INCOME": "your family income last year was {value}",
    "CREGION": "you lived in the {value} of the United States",
    "RELIG": "your present religion was {value}",
}


def load_opinionqa(folder: str | Path) -> Survey:
    """Read ``info.csv``, ``metadata.csv`` and ``responses.csv`` from ``folder``; see the module docstring.

    Example:
        >>> import tempfile
        >>> from lens_laai.opinions.opinionqa import load_opinionqa
        >>> load_opinionqa(tempfile.mkdtemp())  # the module docstring reads a real one
        Traceback (most recent call last):
        ...
        lens_laai.errors.TaskError: .../info.csv: missing; an OpinionQA-layout directory holds info.csv, metadata.csv and responses.csv.
    """
    folder = Path(folder)
    questions = _questions(folder / "info.csv")
    attributes = _attributes(folder / "metadata.csv")
    path = folder / "responses.csv"
    frame = _read(path, index_col=False)
    missing = [k for k in [*questions, *attributes] if k not in frame.columns]
    if missing:
        raise TaskError(
            f"{path}: no column for {missing} (every question key of info.csv and every attribute "
            "of metadata.csv needs one)."
        )
    weights = _weights(frame, path)
    for key, q in questions.items():
        bad = [i for i, v in enumerate(frame[key]) if v not in ("", *q.all_options)]
        if bad:
            raise TaskError(
                f"{path}: line {bad[0] + 2}, column {key!r}: answer {frame[key][bad[0]]!r} is not one of "
                f"the options in info.csv {list(q.all_options)!r} (leave the cell empty if not asked)."
            )
    groups: dict[str, Group] = {}
    for attr, values in attributes.items():
        column = frame[attr]
        for value in values:
            rows = [i for i, v in enumerate(column) if v == value]
            answers = {}
            for key, q in questions.items():
                labels = [frame[key][i] or None for i in rows]
                tallied = group_answers(labels, q.options, q.refusals, [weights[i] for i in rows])
                if tallied is not None:
                    answers[key] = tallied
            name = f"{attr}={value}"
            persona = PERSONAS.get(attr, f"your {attr.lower()} was {{value}}").format(value=value)
            groups[name] = Group(name, attr, value, persona, answers, len(rows))
    return Survey(folder.name, questions, groups, {"layout": "OpinionQA", "path": str(folder.resolve())})


def _read(path: Path, **kwargs: Any) -> pd.DataFrame:
    if not os.path.lexists(path):
        raise TaskError(
            f"{path}: missing; an OpinionQA-layout directory holds info.csv, metadata.csv and responses.csv."
        )
    data = read_regular_file(path, TaskError, follow_symlinks=True)  # never a FIFO or a device
    try:
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: not a readable CSV file ({err}).") from None


def _literal(path: Path, line: int, column: str, text: str, kind: type) -> Any:
    """Parse a Python literal (list/dict) with ``ast.literal_eval``; errors name the cell."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise TaskError(
            f"{path}: line {line}, column {column!r}: {text[:80]!r} is not a Python literal {kind.__name__}."
        ) from None
    if not isinstance(value, kind):
        raise TaskError(
            f"{path}: line {line}, column {column!r}: expected a {kind.__name__}, got {type(value).__name__}."
        )
    return value


def _require(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TaskError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}.")


def _questions(path: Path) -> dict[str, SurveyQuestion]:
    frame = _read(path)
    _require(frame, path, ("key", "question", "references", "option_ordinal"))
    out: dict[str, SurveyQuestion] = {}
    for i, row in frame.iterrows():
        line, key = int(i) + 2, row["key"]
        refs = _literal(path, line, "references", row["references"], list)
        ordinal = _literal(path, line, "option_ordinal", row["option_ordinal"], list)
        if "option_mapping" in frame.columns and row["option_mapping"].strip():
            mapping = _literal(path, line, "option_mapping", row["option_mapping"], dict)
            stray = [v for v in mapping.values() if v not in refs]
            if stray:
                raise TaskError(f"{path}: line {line}, column 'option_mapping': {stray!r} are not in references.")
        if not key or key in out:
            raise TaskError(f"{path}: line {line}, column 'key': {'empty' if not key else f'duplicate key {key!r}'}.")
        if any(not isinstance(r, str) for r in refs) or len(ordinal) > len(refs):
            raise TaskError(
                f"{path}: line {line}, column 'references': needs option texts, at least as many as the "
                f"{len(ordinal)} ordinal values in 'option_ordinal'."
            )
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in ordinal):
            raise TaskError(f"{path}: line {line}, column 'option_ordinal': {ordinal!r} must be finite numbers.")
        if len(ordinal) >= 2 and max(ordinal) == min(ordinal):
            warnings.warn(
                f"{path}: line {line}: question {key!r} has equal ordinal values {ordinal!r} (not ordinal); "
                "dropped, since representativeness is undefined for it.",
                UserWarning,
                stacklevel=3,
            )
            continue
        try:
            out[key] = SurveyQuestion(
                key,
                row["question"],
                tuple(refs[: len(ordinal)]),
                tuple(float(v) for v in ordinal),
                tuple(refs[len(ordinal) :]),
            )
        except TaskError as err:
            raise TaskError(f"{path}: line {line}: {err}") from None
    if not out:
        raise TaskError(f"{path}: no usable questions.")
    return out


def _attributes(path: Path) -> dict[str, list[str]]:
    frame = _read(path)
    _require(frame, path, ("key", "options"))
    out: dict[str, list[str]] = {}
    for i, row in frame.iterrows():
        values = _literal(path, int(i) + 2, "options", row["options"], list)
        if not row["key"] or any(not isinstance(v, str) or not v for v in values):
            raise TaskError(f"{path}: line {int(i) + 2}: needs an attribute key and a list of group names (strings).")
        out[row["key"]] = values
    return out


def _weights(frame: pd.DataFrame, path: Path) -> list[float]:
    columns = [c for c in frame.columns if c.startswith("WEIGHT")]
    if len(columns) > 1:
        raise TaskError(f"{path}: several weight columns {columns}; keep the one for this wave.")
    if not columns:
        return [1.0] * len(frame)
    out = []
    for i, text in enumerate(frame[columns[0]]):
        try:
            w = float(text)
        except ValueError:
            w = math.nan
        if not math.isfinite(w) or w < 0:
            raise TaskError(f"{path}: line {i + 2}, column {columns[0]!r}: weight {text!r} is not a finite number ≥ 0.")
        out.append(w)
    return out
