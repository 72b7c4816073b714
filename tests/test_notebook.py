"""The quick-start notebook's code runs (on the tiny model, with few steps) so it cannot drift from the API."""

import json
from pathlib import Path

from lens_laai.testing import tiny_task

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def code_of(name: str) -> str:
    """The notebook's code cells, joined in order."""
    cells = json.loads((NOTEBOOK.parent / name).read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def run_on_tiny_task(source: str, name: str, monkeypatch) -> None:
    """Run notebook code with ``load_task`` returning the tiny task."""
    import lens_laai

    monkeypatch.setattr(lens_laai, "load_task", lambda task: tiny_task())
    exec(compile(source, str(NOTEBOOK.parent / name), "exec"), {"__name__": "notebook"})


def test_quickstart_notebook_runs_on_tiny_model(monkeypatch):
    source = code_of("quickstart.ipynb")
    assert 'MODEL = "smollm2-135m"' in source and "STEPS = 50" in source and "layer=15" in source
    source = (
        source.replace('MODEL = "smollm2-135m"', 'MODEL = "lens-laai-tiny"')
        .replace("STEPS = 50", "STEPS = 3")
        .replace("layer=15", "layer=1")
        .replace("n_train=20, n_test=100", "n_train=8, n_test=8")
    )
    run_on_tiny_task(source, "quickstart.ipynb", monkeypatch)


def test_heads_notebook_runs_on_tiny_model(monkeypatch):
    source = code_of("heads_vs_ablation.ipynb")
    assert 'MODEL = "smollm2-135m"' in source and "STEPS = 10" in source and "group_l1_rel=[0.5, 0.3]" in source
    source = (
        source.replace('MODEL = "smollm2-135m"', 'MODEL = "lens-laai-tiny"')
        .replace("STEPS = 10", "STEPS = 3")
        .replace("n_train=20, seed=0", "n_train=8, seed=0")
        .replace(
            "n_prompts=16, shots=5, patching_prompts=4, n_random=20",
            "n_prompts=6, shots=2, patching_prompts=4, n_random=4",
        )
        .replace('layer="auto"', "layer=1")
        .replace("group_l1_rel=[0.5, 0.3]", "group_l1_rel=0.05")
        .replace('"Q: early\\nA:"', '"Q: hot\\nA:"')
    )
    run_on_tiny_task(source, "heads_vs_ablation.ipynb", monkeypatch)


def test_opinion_notebook_runs_on_tiny_model(tmp_path):
    from lens_laai.opinions.survey import toy_survey

    notebook = NOTEBOOK.parent / "opinion_dynamics.ipynb"
    source = code_of("opinion_dynamics.ipynb")
    defaults = [
        'MODEL = "smollm2-135m"',
        'SURVEY = "gss-spending"',
        'GROUP = "POLVIEWS=Extremely conservative"',
        "N_TRAIN, N_VALID = 8, 4",
        "LAYERS, STEPS = [7, 13, 19], 10",
    ]
    assert all(d in source for d in defaults)
    toy = tmp_path / "toy.json"  # the tiny model's 512-token context cannot hold GSS few-shot prompts
    toy.write_text(json.dumps(toy_survey().to_json()))
    tiny = [
        'MODEL = "lens-laai-tiny"',
        f'SURVEY = "{toy}"',
        'GROUP = "PARTY=Red"',
        "N_TRAIN, N_VALID = 3, 1",
        "LAYERS, STEPS = [1, 2], 3",
    ]
    for old, new in zip(defaults, tiny):
        source = source.replace(old, new)
    import matplotlib

    matplotlib.use("Agg")
    exec(compile(source, str(notebook), "exec"), {"__name__": "notebook"})


def test_task_calculus_notebook_runs_on_tiny_model(monkeypatch):
    """Antonym then its reverse stands in for antonym then French (the tiny vocabulary has no French)."""
    import lens_laai
    from lens_laai import Task

    source = code_of("task_calculus.ipynb")
    defaults = ['MODEL = "smollm2-135m"', "N_TRAIN, SEED = 20, 0", "N_DEMOS, SHOTS = 10, 5", "N_TEST = 150"]
    assert all(d in source for d in defaults)
    tiny = ['MODEL = "lens-laai-tiny"', "N_TRAIN, SEED = 4, 0", "N_DEMOS, SHOTS = 2, 1", "N_TEST = 10"]
    for old, new in zip(defaults, tiny):
        source = source.replace(old, new)
    tasks = {
        "antonym": Task("antonym", tiny_task().pairs),
        "english-french": Task("english-french", [(b, a) for a, b in tiny_task().pairs]),
    }
    monkeypatch.setattr(lens_laai, "load_task", tasks.__getitem__)
    namespace = {"__name__": "notebook"}
    exec(compile(source, str(NOTEBOOK.parent / "task_calculus.ipynb"), "exec"), namespace)
    table = namespace["table"]
    assert list(table.columns) == ["composed", "antonym (step 1 only)", "French of input (step 2 only)"]
    assert table.index[-1] == "1-shot prompt (composed demos)" and table["composed"].between(0, 1).all()
