"""Studies: grids of fits, evaluations and analyses, run in one process or on Ray, into one results table.

Example:
    >>> from lens_laai.studies import Study
    >>> study = Study("layers", "fit", axes={"layer": [8, 12, 16], "seed": [0, 1]},
    ...               fixed={"model": "smollm2-135m", "task": "antonym", "n": 20, "n_test": 100})
    >>> len(study.cells())
    6

``run_study(study, "runs/layers", workers=2)`` runs it (``lens-laai study run STUDY.toml --out DIR``
from the shell) and ``read_results("runs/layers")`` reads the table back.
"""

from lens_laai.studies.cells import KINDS, CellContext, resolve_kind
from lens_laai.studies.runner import CellRunner, pending, run_study
from lens_laai.studies.spec import Cell, Study, StudyError, config_hash, load_study
from lens_laai.studies.store import ResultStore, read_results

__all__ = [
    "KINDS",
    "Cell",
    "CellContext",
    "CellRunner",
    "ResultStore",
    "Study",
    "StudyError",
    "config_hash",
    "load_study",
    "pending",
    "read_results",
    "resolve_kind",
    "run_study",
]
