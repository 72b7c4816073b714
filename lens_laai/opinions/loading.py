"""Loading a survey: a bundled name, our survey JSON file, or a directory in OpinionQA's layout.

Example:
    >>> survey = load_survey("gss-spending")
    >>> "gss-spending" in bundled_surveys(), len(survey.questions) > 0
    (True, True)
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from lens_laai.errors import TaskError
from lens_laai.opinions.opinionqa import load_opinionqa
from lens_laai.opinions.survey import Survey
from lens_laai.storage.safe_read import loads_json, read_regular_file


def bundled_surveys() -> list[str]:
    """Names of the surveys shipped with lens_laai (``lens_laai/data/surveys/*.json``).

    Example:
        >>> from lens_laai import bundled_surveys
        >>> bundled_surveys()
        ['gss-spending']
    """
    folder = resources.files("lens_laai") / "data" / "surveys"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_survey(source: str | Path) -> Survey:
    """A bundled survey by name, our JSON file by path, or an OpinionQA-layout directory.

    Raises:
        TaskError: an unknown name, a missing path, or a malformed file (naming file, row and column).

    Example:
        >>> from lens_laai import load_survey
        >>> survey = load_survey("gss-spending")  # or our survey JSON file, or an OpinionQA directory
        >>> len(survey.questions), survey.group("POLVIEWS=Extremely conservative").n_respondents > 0
        (18, True)
    """
    if isinstance(source, str) and source in bundled_surveys():
        text = (resources.files("lens_laai") / "data" / "surveys" / f"{source}.json").read_text(encoding="utf-8")
        return Survey.from_json(json.loads(text), where=f"bundled survey {source!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        return load_opinionqa(path)
    if os.path.lexists(path):
        try:
            data = loads_json(read_regular_file(path, TaskError, follow_symlinks=True), "it", TaskError)
        except TaskError as err:
            raise TaskError(f"{path}: cannot read a survey JSON file ({err}).") from None
        return Survey.from_json(data, where=str(path))
    raise TaskError(
        f"Unknown survey {str(source)!r}: not a bundled survey ({', '.join(bundled_surveys())}), "
        "a survey JSON file or an OpinionQA-layout directory (info.csv, metadata.csv, responses.csv)."
    )
