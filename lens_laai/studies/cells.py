"""What a cell does: the built-in cell kinds, and the worker-side context they run in.

A cell kind is a function ``kind(ctx, config) -> dict`` of metrics. It reads its settings from
``config``, gets the model from ``ctx.model(name)`` (loaded once per worker and kept for the next
cells) and returns plain numbers and strings, plus ``forward_equivalents`` (cost in forward passes
of one zero-shot prompt) and ``labelled_pairs`` (labelled examples it used). The runner adds the
seconds, the config and its hash. Every built-in kind calls the public API (``fit``, ``evaluate``,
``head_table``, ``fit_opinion``, the baselines), so a change of their defaults flows through.

Built-in kinds (``Study.kind``):

* ``"fit"``: ``fit`` on ``n`` training pairs (``seed`` fixes the split), scored on the held-out test
  pairs; any keyword of :func:`lens_laai.fit` (``layer``, ``layers``, ``group_l1_rel``, ``steps``...)
  is a setting.
* ``"analyse"``: the same fit, then :func:`~lens_laai.analysis.head_table.head_table` (settings
  ``analysis_layers``, ``methods``, ``n_prompts``, ``analysis_shots``...); its summary's ρ and
  precision@k per score become columns.
* ``"evaluate"``: ``shots``-shot prompting with the ``n`` pairs as demonstrations.
* ``"baseline"``: ``method = "function-vector"`` or ``"mean-difference"``, with the baseline's keywords.
* ``"opinion-fit"``: ``fit_opinion`` for a survey ``group``, scored on held-out questions.

Any other kind is named ``"module:function"`` and imported in the worker.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from lens_laai.studies.spec import StudyError

CellKind = Callable[["CellContext", dict[str, Any]], dict[str, Any]]
SPLIT_KEYS = {"model", "task", "seed", "n", "n_valid", "n_test"}


class CellContext:
    """What a worker keeps between cells: one loaded model, and a cache a kind may use for itself.

    Example:
        >>> ctx = CellContext()
        >>> model = ctx.model("lens-laai-tiny")
        >>> ctx.model("lens-laai-tiny") is model, ctx.loaded  # loaded once, kept for the next cell
        (True, 'lens-laai-tiny')
    """

    def __init__(self, device: str | None = None, dtype: str | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.cache: dict[Any, Any] = {}
        self._model: tuple[str, TransformerBridge] | None = None

    def model(self, name: str) -> TransformerBridge:
        """The model ``name``, loaded on this worker's device the first time (a new name replaces the old)."""
        from lens_laai.models.loading import load_model

        if self._model is None or self._model[0] != name:
            self._model = None
            self.cache.clear()
            kwargs: dict[str, Any] = {k: v for k, v in (("device", self.device), ("dtype", self.dtype)) if v}
            self._model = (name, load_model(name, **kwargs))
        return self._model[1]

    @property
    def loaded(self) -> str | None:
        return self._model[0] if self._model else None


def resolve_kind(name: str) -> CellKind:
    """A built-in kind by name, or ``"module:function"`` imported.

    Example:
        >>> resolve_kind("fit") is fit_cell, resolve_kind("json:dumps").__name__
        (True, 'dumps')
        >>> try:
        ...     resolve_kind("fitt")
        ... except StudyError as err:
        ...     print(str(err).split(":")[0])
        Unknown cell kind 'fitt'
    """
    if name in KINDS:
        return KINDS[name]
    if ":" not in name:
        raise StudyError(f"Unknown cell kind {name!r}: use one of {sorted(KINDS)} or 'module:function'.")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise StudyError(
            f"Cell kind {name!r} cannot be imported ({err}); is its folder in the study's `paths`?"
        ) from err
    if not callable(fn):
        raise StudyError(f"Cell kind {name!r} is not a function.")
    return fn


def check_settings(kind: str, config: dict[str, Any]) -> None:
    """Refuse settings a built-in kind would not use (a typo would otherwise change nothing, silently).

    Example:
        >>> check_settings("fit", {"model": "lens-laai-tiny", "layer": 1, "steps": 3})
        >>> try:  # a typo would otherwise change nothing, silently
        ...     check_settings("fit", {"model": "lens-laai-tiny", "stpes": 3})
        ... except StudyError as err:
        ...     print(str(err).split(";")[0])
        Cell kind 'fit' has no settings ['stpes']
    """
    allowed = ALLOWED.get(kind)
    if allowed is None:
        return
    unknown = set(config) - allowed()
    if unknown:
        raise StudyError(f"Cell kind {kind!r} has no settings {sorted(unknown)}; it takes {sorted(allowed())}.")
    if "model" not in config:
        raise StudyError(f"Cell kind {kind!r} needs a `model` (a fixed setting or an axis).")


def _splits(config: dict[str, Any]):
    from lens_laai.tasks.task import load_task

    if "task" not in config:
        raise StudyError("This cell kind needs a `task` (a bundled name or a JSON file).")
    task = load_task(config["task"])
    return task.split(
        int(config.get("seed", 0)), int(config.get("n", 20)), int(config.get("n_valid", 0)), config.get("n_test")
    )


def _keywords(fn: Callable, config: dict[str, Any], skip: set[str]) -> dict[str, Any]:
    names = set(inspect.signature(fn).parameters) - skip
    return {k: v for k, v in config.items() if k in names}


def _fit_keys() -> set[str]:
    from lens_laai.fitting.fit import fit

    return set(inspect.signature(fit).parameters) - {"model", "task", "n_train", "n_valid", "n_test", "progress"}


FIT_SKIP = {"model", "task", "n_train", "n_valid", "n_test", "seed", "progress"}


def fit_cell(ctx: CellContext, config: dict[str, Any]) -> dict[str, Any]:
    """``fit`` on the cell's split, scored on its test pairs.

    Example:
        >>> import tempfile
        >>> from lens_laai.testing import tiny_task
        >>> task = tempfile.mkdtemp() + "/tiny.json"
        >>> tiny_task().to_json(task)
        >>> row = fit_cell(CellContext(), {"model": "lens-laai-tiny", "task": task, "n": 8, "layer": 1, "steps": 3})
        >>> row["fitted_layer"], row["labelled_pairs"], 0 <= row["accuracy"] <= 1, 1 <= row["n_heads"] <= 4
        (1, 8, True, True)
    """
    from lens_laai.evaluation.evaluate import evaluate
    from lens_laai.fitting.fit import fit

    model, splits = ctx.model(config["model"]), _splits(config)
    res = fit(model, splits, progress=False, **_keywords(fit, config, FIT_SKIP))
    acc = evaluate(model, splits, res.intervention).accuracy
    heads = sorted(res.selected_heads)
    return {
        "accuracy": acc,
        "fitted_layer": res.layer,
        "n_heads": len(heads),
        "heads": " ".join(f"{l}.{h}" for l, h in heads),
        "selection": res.selection,
        "mode": res.mode.name,
        "group_l1": float(res.config.group_l1),
        "group_l1_relative": bool(res.config.relative),
        "train_accuracy": res.train_accuracy,
        "valid_accuracy": res.valid_accuracy,
        "fit_forward_equivalents": res.forward_equivalents,
        "forward_equivalents": res.forward_equivalents + len(splits.test),
        "labelled_pairs": len(splits.train) + len(splits.valid),
        "_fit": res,
        "_splits": splits,
    }


ANALYSIS_KEYS = {"analysis_layers", "methods", "n_prompts", "analysis_shots", "patching_prompts", "n_random"}


def analyse_cell(ctx: CellContext, config: dict[str, Any]) -> dict[str, Any]:
    """A fit, then the head table over ``analysis_layers`` (default: the fitted layer).

    Example:
        >>> import tempfile
        >>> from lens_laai.testing import tiny_task
        >>> task = tempfile.mkdtemp() + "/tiny.json"
        >>> tiny_task().to_json(task)
        >>> config = {"model": "lens-laai-tiny", "task": task, "n": 8, "layer": 1, "steps": 3, "methods": ["ablation"]}
        >>> row = analyse_cell(CellContext(), config)
        >>> sorted(k for k in row if k.endswith("_rho_selected"))
        ['mean_logprob_drop_rho_selected', 'zero_logprob_drop_rho_selected']
        >>> row["forward_equivalents"] == row["fit_forward_equivalents"] + 16 + row["analysis_forward_equivalents"]
        True
    """
    from lens_laai.analysis.head_table import head_table

    fitted = fit_cell(ctx, {k: v for k, v in config.items() if k not in ANALYSIS_KEYS})
    res, splits = fitted["_fit"], fitted["_splits"]
    kwargs: dict[str, Any] = {
        k: config[k] for k in ("methods", "n_prompts", "patching_prompts", "n_random") if k in config
    }
    if "analysis_shots" in config:
        kwargs["shots"] = config["analysis_shots"]
    layers = config.get("analysis_layers", [res.layer])
    analysis = head_table(
        ctx.model(config["model"]),
        splits,
        res.intervention,
        layers=layers,
        seed=int(config.get("seed", 0)),
        progress=False,
        **kwargs,
    )
    out = dict(fitted)
    for row in analysis.summary.itertuples():
        out[f"{row.score}_rho_selected"] = float(row.rho_selected)
        out[f"{row.score}_precision_at_k"] = float(row.precision_at_k)
        out[f"{row.score}_p_precision"] = float(row.p_precision)
    cost = float(analysis.costs.forward_equivalents.sum())
    out["analysis_forward_equivalents"] = cost
    out["forward_equivalents"] = fitted["forward_equivalents"] + cost
    return out


def evaluate_cell(ctx: CellContext, config: dict[str, Any]) -> dict[str, Any]:
    """``shots``-shot prompting, demonstrations drawn from the cell's ``n`` training pairs.

    Example:
        >>> import tempfile
        >>> from lens_laai.testing import tiny_task
        >>> task = tempfile.mkdtemp() + "/tiny.json"
        >>> tiny_task().to_json(task)
        >>> row = evaluate_cell(CellContext(), {"model": "lens-laai-tiny", "task": task, "n": 8, "shots": 2})
        >>> sorted(row), row["labelled_pairs"]
        (['accuracy', 'forward_equivalents', 'labelled_pairs'], 8)
    """
    from lens_laai.baselines.prompting import prompting_cost
    from lens_laai.evaluation.evaluate import evaluate

    model, splits = ctx.model(config["model"]), _splits(config)
    shots = int(config.get("shots", 0))
    return {
        "accuracy": evaluate(model, splits, shots=shots).accuracy,
        "forward_equivalents": prompting_cost(model, splits, shots=shots) * len(splits.test),
        "labelled_pairs": len(splits.train) if shots else 0,
    }


def baseline_cell(ctx: CellContext, config: dict[str, Any]) -> dict[str, Any]:
    """Function Vectors or mean difference, their choices made on the cell's split, scored on test.

    Example:
        >>> import tempfile
        >>> from lens_laai.testing import tiny_task
        >>> task = tempfile.mkdtemp() + "/tiny.json"
        >>> tiny_task().to_json(task)
        >>> config = {"model": "lens-laai-tiny", "task": task, "n": 8, "layer": 1, "shots": 3}
        >>> row = baseline_cell(CellContext(), {**config, "method": "mean-difference"})
        >>> row["fitted_layer"], row["alpha"] > 0, row["forward_equivalents"] > row["fit_forward_equivalents"]
        (1, True, True)
    """
    from lens_laai.baselines import fit_function_vector, fit_mean_difference
    from lens_laai.evaluation.evaluate import evaluate

    fns: dict[str, Callable[..., Any]] = {
        "function-vector": fit_function_vector,
        "mean-difference": fit_mean_difference,
    }
    method = config.get("method")
    if method not in fns:
        raise StudyError(f"baseline cells need method = one of {sorted(fns)}, got {method!r}.")
    model, splits = ctx.model(config["model"]), _splits(config)
    kwargs = _keywords(fns[method], config, {"model", "splits", "progress"})
    res = fns[method](model, splits, progress=False, **kwargs)
    out = {"accuracy": evaluate(model, splits, res.intervention).accuracy, "fitted_layer": res.layer}
    out["scale" if method == "function-vector" else "alpha"] = float(getattr(res, "scale", getattr(res, "alpha", 0.0)))
    out["fit_forward_equivalents"] = res.forward_equivalents
    out["forward_equivalents"] = res.forward_equivalents + len(splits.test)
    out["labelled_pairs"] = len(splits.train) + len(splits.valid)
    return out


OPINION_SPLIT = {"model", "survey", "group", "seed", "n_train", "n_valid", "n_test"}


def opinion_cell(ctx: CellContext, config: dict[str, Any]) -> dict[str, Any]:
    """``fit_opinion`` for one group on one question split, scored on the held-out questions.

    Example:
        >>> config = {"model": "lens-laai-tiny", "group": "SEX=Female", "layer": 1, "steps": 2}
        >>> row = opinion_cell(CellContext(), {**config, "n_train": 4, "n_valid": 1, "n_test": 4})
        >>> row["n_questions"], row["fitted_layer"], 0 <= row["tv"] <= 1, row["labelled_pairs"]
        (4.0, 1, True, 5)
    """
    from lens_laai.opinions.evaluate import evaluate_opinion
    from lens_laai.opinions.fit import fit_opinion
    from lens_laai.opinions.loading import load_survey

    model, survey = ctx.model(config["model"]), load_survey(config.get("survey", "gss-spending"))
    if "group" not in config:
        raise StudyError("opinion-fit cells need a `group` (ATTRIBUTE=VALUE).")
    cut = {k: config[k] for k in ("n_train", "n_valid", "n_test") if k in config}
    splits = survey.split(int(config.get("seed", 0)), **cut)
    kwargs = _keywords(fit_opinion, config, OPINION_SPLIT | {"splits", "progress", "runners"})
    res = fit_opinion(model, survey, config["group"], splits=splits, progress=False, **kwargs)
    scores = evaluate_opinion(model, survey, config["group"], res.intervention).scores()
    return {
        **{k: float(v) for k, v in scores.items() if isinstance(v, int | float)},
        "fitted_layer": res.layer,
        "group_l1": float(res.group_l1),
        "n_heads": len(res.selected_heads),
        "forward_equivalents": res.forward_equivalents,
        "labelled_pairs": len(splits.train) + len(splits.valid),
    }


def _opinion_keys() -> set[str]:
    from lens_laai.opinions.fit import fit_opinion

    return OPINION_SPLIT | (set(inspect.signature(fit_opinion).parameters) - {"splits", "progress", "runners"})


def _baseline_keys() -> set[str]:
    from lens_laai.baselines import fit_function_vector, fit_mean_difference

    keys = set(inspect.signature(fit_function_vector).parameters) | set(
        inspect.signature(fit_mean_difference).parameters
    )
    return (keys - {"splits", "progress"}) | SPLIT_KEYS | {"method"}


KINDS: dict[str, CellKind] = {
    "fit": fit_cell,
    "analyse": analyse_cell,
    "evaluate": evaluate_cell,
    "baseline": baseline_cell,
    "opinion-fit": opinion_cell,
}
ALLOWED: dict[str, Callable[[], set[str]]] = {
    "fit": lambda: _fit_keys() | SPLIT_KEYS,
    "analyse": lambda: _fit_keys() | SPLIT_KEYS | ANALYSIS_KEYS,
    "evaluate": lambda: SPLIT_KEYS | {"shots"},
    "baseline": _baseline_keys,
    "opinion-fit": _opinion_keys,
}
