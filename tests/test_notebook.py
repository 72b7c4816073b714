"""The quick-start notebook's code runs (on the tiny model, with few steps) so it cannot drift from the API."""

import json
from pathlib import Path

from lens_laai.testing import tiny_task

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_on_tiny_model(monkeypatch):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert 'MODEL = "smollm2-135m"' in source and "STEPS = 50" in source and "layer=15" in source
    source = (source.replace('MODEL = "smollm2-135m"', 'MODEL = "lens-laai-tiny"').replace("STEPS = 50", "STEPS = 3")
              .replace("layer=15", "layer=1").replace("n_train=20, n_valid=40, n_test=100", "n_train=8, n_valid=4, n_test=8"))
    import lens_laai

    monkeypatch.setattr(lens_laai, "load_task", lambda name: tiny_task())
    exec(compile(source, str(NOTEBOOK), "exec"), {"__name__": "notebook"})
