"""What a fit is given and what it returns: the settings (:class:`FitConfig`), the result (:class:`FitResult`),
the layer policy (:func:`auto_layer`, :func:`default_layers`) and the default λ₂ path.

:func:`lens_laai.fitting.fit.fit` re-exports these; import them from there or from ``lens_laai``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd

from lens_laai.errors import FitError, TaskError
from lens_laai.fitting.layer_fit import Init
from lens_laai.fitting.penalties import lambda_values
from lens_laai.fitting.relaxed import RELAXED_STEPS
from lens_laai.interventions.head import HeadIntervention
from lens_laai.interventions.mode import ZERO_SHOT, Mode
from lens_laai.tasks.prompts import PromptTemplate
from lens_laai.tasks.task import Task, TaskSplits

Objective = Literal["first_token", "sequence"]
TaskLike = Task | TaskSplits | Sequence[tuple[str, str]]


def default_layers(n_layers: int) -> list[int]:
    """The candidate layers unless told otherwise: every fourth layer from 15% to 70% of the depth.

    Task vectors live in the first two thirds of the network (Function Vectors, LAAI; on the
    development study of ``docs/results.md`` no task was best beyond 70%). That is 4, 8, 12, 16,
    20 on a 30-layer model and 5, 9, 13, 17, 21 on a 32-layer one; models with fewer than 12
    layers try every layer of that range.

    Example:
        >>> from lens_laai.fitting.config import default_layers
        >>> default_layers(30), default_layers(32), default_layers(3)
        ([4, 8, 12, 16, 20], [5, 9, 13, 17, 21], [0, 1])
    """
    lo, hi = round(0.15 * n_layers), round(0.70 * n_layers)
    return list(range(lo, max(hi, lo + 1), 4 if n_layers >= 12 else 1))


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """Candidate layers from ``None``/``"default"`` (:func:`default_layers`), ``"all"``, a comma list or ints.

    Example:
        >>> from lens_laai.fitting.config import parse_layers
        >>> parse_layers("2,0", 3), parse_layers([1, 1], 3), parse_layers("all", 3), parse_layers(None, 30)
        ([0, 2], [1], [0, 1, 2], [4, 8, 12, 16, 20])
        >>> parse_layers([5], 3)
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: Layer 5 is out of range: this model has layers 0..2.
        >>> parse_layers("1,two", 3)
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: layers must be 'all', 'default' or a comma list of integers, got '1,two'.
    """
    if spec is None or spec == "default":
        return default_layers(n_layers)
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise FitError(f"layers must be 'all', 'default' or a comma list of integers, got {spec!r}.") from None
    layers = list(spec)
    if not layers:
        raise FitError("layers is empty; give at least one layer index, 'default' or 'all'.")
    for l in layers:
        if not isinstance(l, int) or isinstance(l, bool):
            raise FitError(f"Layer {l!r} is not a layer index (an int), in layers {layers!r}.")
        if not 0 <= l < n_layers:
            raise FitError(f"Layer {l} is out of range: this model has layers 0..{n_layers - 1}.")
    return sorted(set(layers))


Select = Literal["cv", "valid", "none", "auto"]
DEFAULT_GROUP_L1_REL: tuple[float, ...] = tuple(round(0.9 * (0.05 / 0.9) ** (i / 7), 4) for i in range(8))
"""The default λ₂ path: 8 points, geometric from 0.9 to 0.05 of λ_max (0.9, 0.596, 0.394, …, 0.05)."""
STEPS_PER_POINT = 4  # proximal steps per λ₂ of the default path (warm starts carry the rest)
STEP_BUDGET = 30  # proximal steps in all for a λ₂ path you give, unless ``steps`` is given
AUTO_DEPTH = 16 / 30  # layer="auto": the layer at this fraction of the depth (development study, docs/results.md)


def auto_layer(n_layers: int) -> int:
    """The layer ``layer="auto"`` fits: ``round(AUTO_DEPTH × n_layers)`` (16 of SmolLM2's 30, 17 of 32).

    A rule fixed in advance on the development study of ``docs/results.md``: over twelve tasks it
    did as well as choosing the layer by cross-validation on the n pairs, at a sixth of the cost.

    Example:
        >>> from lens_laai.fitting.config import auto_layer
        >>> auto_layer(30), auto_layer(32), auto_layer(3), auto_layer(1)
        (16, 17, 2, 0)
    """
    return min(n_layers - 1, max(0, round(AUTO_DEPTH * n_layers)))


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """Everything that, with the data and model, reproduces a fit.

    With ``relative`` (the default) ``group_l1`` is a fraction of λ_max at the fitted layer (see
    :func:`lens_laai.fitting.layer_fit.lambda_max`); otherwise it is λ₂ itself. ``select`` says how the
    layer and λ₂ were chosen: ``"cv"`` (``folds``-fold cross-validation on the training pairs),
    ``"valid"`` (on a separate validation split: the older protocol, which uses more labelled
    pairs than ``n_train``) or ``"none"`` (one candidate, nothing to choose). ``last_positions``:
    Δ at each prompt's last ``m`` tokens (1: the last token, the paper's setting).

    Example:
        >>> import dataclasses
        >>> from lens_laai.fitting.config import FitConfig
        >>> cfg = FitConfig(layer=1, group_l1=0.5)
        >>> cfg.relative, cfg.steps, cfg.select, cfg.rule, cfg.cv_metric, cfg.candidate_layers(n_layers=3)
        (True, 4, 'cv', '1se', 'ce', [1])
        >>> FitConfig(layer="sweep", layers=(0, 2)).candidate_layers(3), dataclasses.replace(cfg, steps=8).steps
        ([0, 2], 8)
        >>> FitConfig(rule="max").validate(n_layers=3)
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: rule must be '1se' (the sparsest point within one standard error) or 'min', got 'max'.
    """

    layer: int | str = "auto"
    layers: tuple[int, ...] | str | None = None
    l1: float = 1e-3
    group_l1: float = DEFAULT_GROUP_L1_REL[-1]
    relative: bool = True
    steps: int = STEPS_PER_POINT
    lr: float = 1.0
    n_train: int = 20
    n_valid: int = 0
    n_test: int | None = None
    seed: int = 0
    shots: int | tuple[int, ...] = 0
    demos: int | None = None
    init: Init = "zero"
    select: str = "cv"
    folds: int = 2
    halving: bool = True
    rule: str = "1se"
    cv_metric: str = "ce"
    relaxed: bool = True
    relaxed_steps: int = RELAXED_STEPS
    max_heads: int | None = None
    mode: str = "auto"
    objective: Objective = "first_token"
    batch_size: int = 32
    fast: bool = True
    last_positions: int = 1

    def validate(self, n_layers: int) -> None:
        """Raise :class:`FitError` naming the first bad setting."""
        for name in ("l1", "group_l1", "lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise FitError(f"{name} must be a finite number ≥ 0, got {value!r}.")
        if self.lr <= 0:
            raise FitError(f"lr must be > 0, got {self.lr}.")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FitError(f"{name} must be a positive integer, got {value!r}.")
        counts = (self.shots,) if isinstance(self.shots, int) else tuple(self.shots)
        if not counts or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in counts):
            raise FitError(f"shots must be an integer ≥ 0 or a non-empty list of them, got {self.shots!r}.")
        if self.objective not in ("first_token", "sequence"):
            raise FitError(f"objective must be 'first_token' or 'sequence', got {self.objective!r}.")
        if self.init not in ("zero", "mean-difference"):
            raise FitError(f"init must be 'zero' or 'mean-difference', got {self.init!r}.")
        if self.select not in ("auto", "cv", "valid", "none"):
            raise FitError(f"select must be 'cv', 'valid' or 'none', got {self.select!r}.")
        if self.rule not in ("1se", "min"):
            raise FitError(
                f"rule must be '1se' (the sparsest point within one standard error) or 'min', got {self.rule!r}."
            )
        if self.cv_metric not in ("accuracy", "ce"):
            raise FitError(f"cv_metric must be 'accuracy' or 'ce', got {self.cv_metric!r}.")
        if self.demos is not None and (
            not isinstance(self.demos, int) or isinstance(self.demos, bool) or self.demos < 1
        ):
            raise FitError(f"demos must be a positive integer (demonstrations per k-shot prompt), got {self.demos!r}.")
        if self.mode not in ("auto", "zero-shot", "few-shot"):
            raise FitError(
                f"mode must be 'auto' (chosen by cross-validation), 'zero-shot' (the paper's setting) or "
                f"'few-shot' (Δ on k-shot prompts), got {self.mode!r}."
            )
        if not isinstance(self.relaxed, bool):
            raise FitError(f"relaxed must be True or False, got {self.relaxed!r}.")
        for name in ("relaxed_steps", "max_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise FitError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.folds, int) or isinstance(self.folds, bool) or self.folds < 2:
            raise FitError(f"folds must be an integer ≥ 2, got {self.folds!r}.")
        if not isinstance(self.halving, bool):
            raise FitError(f"halving must be True or False, got {self.halving!r}.")
        m = self.last_positions
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise FitError(f"last_positions must be a positive integer (Δ at each prompt's last m tokens), got {m!r}.")
        if m > 1 and self.objective == "sequence":
            raise FitError("objective='sequence' adds Δ at the last prompt token only; use last_positions=1.")
        self.candidate_layers(n_layers)

    def candidate_layers(self, n_layers: int) -> list[int]:
        if self.layer == "auto":
            if self.layers is not None:
                raise FitError(
                    "layers= lists candidates for layer='sweep' or 'joint'; layer='auto' fits the layer at "
                    f"{AUTO_DEPTH:.0%} of the depth. Use layer='sweep' to choose among your layers."
                )
            return [auto_layer(n_layers)]
        if self.layer in ("joint", "sweep"):
            return parse_layers(self.layers, n_layers)
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise FitError(f"layer must be a layer index, 'auto', 'joint' or 'sweep', got {self.layer!r}.")
        return parse_layers([self.layer], n_layers)


@dataclass
class FitResult:
    """A fitted intervention with its training record and selection scores.

    ``intervention`` is the relaxed refit when ``relaxed`` (Δ refitted on the penalised fit's heads
    with the group penalty off), and ``penalised`` the penalised fit it came from (the same object
    otherwise). ``train_accuracy`` is the returned intervention's accuracy on the training pairs,
    ``penalised_train_accuracy`` the penalised fit's. ``cv_accuracy`` ± ``cv_accuracy_se``: the
    chosen candidate's cross-validated accuracy on the training pairs (``None`` when nothing was
    cross-validated); ``valid_accuracy``: accuracy on the validation split (NaN without one).
    ``candidates`` has one row per fitted candidate: the λ₂ path's points at one layer (the
    sparsity–accuracy frontier, ``chosen`` marking the pick), or (layer, λ₂) pairs of a sweep.
    ``selection`` says what chose (``"cv"``, ``"valid"``, ``"none"``), ``selection_rule`` how
    (``"cv-1se-ce"``, ``"cv-min-accuracy"``, ``"max_heads=3"``, ``"last"``, …). ``mode``: how the
    intervention is meant to be used (zero-shot Δ, k-shot prompting alone, or k-shot prompting + Δ;
    :mod:`lens_laai.fitting.modes`), recorded in it and used by :func:`~lens_laai.evaluate`;
    ``modes``: each candidate mode's cross-validated scores (``None`` when nothing chose).

    Example (one λ₂, so nothing is chosen; the relaxed refit is returned and the penalised fit kept):
        >>> import math
        >>> from lens_laai import fit
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> result = fit(tiny_model(), tiny_task(), layer=1, n_train=8, group_l1_rel=0.5, steps=2, mode="zero-shot",
        ...              progress=False)
        >>> result.layer, result.selection, result.selection_rule, result.cv_accuracy, math.isnan(result.valid_accuracy)
        (1, 'none', 'last', None, True)
        >>> result.relaxed, result.penalised is result.intervention, result.n_selected == len(result.selected_heads)
        (True, False, True)
        >>> result.config.group_l1, result.config.n_train, len(result.history), result.mode.name
        (0.5, 8, 2, 'zero-shot Δ')
        >>> list(result.candidates.columns)
        ['group_l1_rel', 'group_l1', 'lambda_max', 'n_selected', 'train_accuracy', 'chosen']
    """

    intervention: HeadIntervention
    layer: int
    history: pd.DataFrame
    train_accuracy: float
    valid_accuracy: float
    selected_heads: list[tuple[int, int]]
    config: FitConfig
    candidates: pd.DataFrame
    splits: TaskSplits
    seconds: float
    forward_equivalents: float
    fast_path: bool = True
    selection: str = "none"
    selection_rule: str = "last"
    relaxed: bool = False
    penalised: HeadIntervention | None = None
    penalised_train_accuracy: float | None = None
    cv_accuracy: float | None = None
    cv_accuracy_se: float | None = None
    mode: Mode = ZERO_SHOT
    modes: pd.DataFrame | None = None

    @property
    def n_selected(self) -> int:
        return len(self.selected_heads)

    @property
    def sweep(self) -> pd.DataFrame:
        """Deprecated name of ``candidates`` (it was a λ path when no layer was swept); removed in 0.x+1."""
        warnings.warn("FitResult.sweep is now FitResult.candidates.", DeprecationWarning, stacklevel=2)
        return self.candidates


def prepare_data(
    task: TaskLike,
    template: PromptTemplate | None,
    n_train: int | None,
    n_valid: int | None,
    n_test: int | None,
    seed: int | None,
) -> tuple[TaskSplits, Task | None, PromptTemplate]:
    """Splits, the task they were cut from (if known), and the template (what :func:`~lens_laai.fit` does with ``task``).

    Example:
        >>> from lens_laai.fitting.config import prepare_data
        >>> from lens_laai.testing import tiny_task
        >>> splits, source, template = prepare_data(tiny_task(), None, 8, 4, None, None)
        >>> len(splits.train), len(splits.valid), len(splits.test), source.name, template.render("hot")
        (8, 4, 12, 'tiny-antonym', 'Q: hot\\nA:')
        >>> splits, source, template = prepare_data([("Hot ->", " cold"), ("Up ->", " down")], None, 1, None, None, None)
        >>> len(splits.train), len(splits.test), template.render("Hot ->")  # your own prompts: used verbatim
        (1, 1, 'Hot ->')
        >>> prepare_data(tiny_task().split(0, 8), None, 8, None, None, None)
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: n_train split a Task, but these TaskSplits are already split; drop them.
    """
    if isinstance(task, TaskSplits):
        given = [
            k
            for k, v in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test), ("seed", seed))
            if v is not None
        ]
        if given:
            raise FitError(f"{', '.join(given)} split a Task, but these TaskSplits are already split; drop them.")
        return task, None, template or PromptTemplate()
    if not isinstance(task, Task):
        if isinstance(task, (str, bytes)) or not isinstance(task, Sequence):
            raise FitError(
                f"task must be a Task, TaskSplits or a list of (prompt, target) strings, got {type(task).__name__}."
            )
        task, template = Task.from_pairs(task), template or PromptTemplate.verbatim()
    splits = task.split(
        0 if seed is None else seed,
        FitConfig.n_train if n_train is None else n_train,
        FitConfig.n_valid if n_valid is None else n_valid,
        n_test,
    )
    return splits, task, template or PromptTemplate()


def lambda_spec(group_l1: Any, group_l1_rel: Any) -> tuple[tuple[float, ...], bool]:
    """(λ₂ values, whether they are relative to λ_max) from ``fit``'s ``group_l1`` / ``group_l1_rel``.

    Example:
        >>> from lens_laai.fitting.config import lambda_spec
        >>> lambda_spec(None, [0.5, 0.1]), lambda_spec(0.3, None)
        (((0.5, 0.1), True), ((0.3,), False))
    """
    if group_l1 is not None and group_l1_rel is not None:
        raise FitError("give group_l1 (absolute λ₂) or group_l1_rel (fractions of λ_max), not both.")
    if group_l1 is not None:
        return lambda_values(group_l1, "group_l1"), False
    values = lambda_values(DEFAULT_GROUP_L1_REL if group_l1_rel is None else group_l1_rel, "group_l1_rel")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise FitError(f"group_l1_rel must be finite fractions of λ_max ≥ 0, got {group_l1_rel!r}.")
    return values, True


def check_splits(splits: TaskSplits, shots: int, how: str, cfg: FitConfig | None = None) -> None:
    """Refuse, before any work, splits the fit (or each cross-validation fold) cannot use.

    Example:
        >>> from lens_laai.fitting.config import FitConfig, check_splits
        >>> from lens_laai.testing import tiny_task
        >>> check_splits(tiny_task().split(0, 4), 5, "none")
        Traceback (most recent call last):
        lens_laai.errors.FitError: 5-shot training prompts need 6 or more training pairs; use n_train ≥ 6.
    """
    n = len(splits.train)
    if not n:
        raise TaskError("The training split is empty; use n_train ≥ 1.")
    if shots > n - 1:
        raise FitError(
            f"{shots}-shot training prompts need {shots + 1} or more training pairs; use n_train ≥ {shots + 1}."
        )
    if how == "cv" and cfg is not None:
        if not 2 <= cfg.folds <= n:
            raise FitError(
                f"folds must be an integer within 2..n_train ({n}), got {cfg.folds!r}; "
                "use more training pairs or fewer folds."
            )
        smallest = n - -(-n // cfg.folds)  # the fitting part of the fold with the most held-out pairs
        if cfg.demos is not None and cfg.demos > smallest:
            raise FitError(
                f"demos={cfg.demos}: held-out pairs draw their demonstrations from a fold's fitting part, and the "
                f"smallest has {smallest} of the {n} training pairs; use demos ≤ {smallest} or more training pairs."
            )
        need = max(shots + 1, 2 if cfg.init == "mean-difference" else 1)
        if smallest < need:
            raise FitError(
                f"with {cfg.folds} folds the smallest fitting part has {smallest} of the {n} training pairs; "
                f"shots={shots} and init={cfg.init!r} need {need}. Use more training pairs or fewer folds."
            )


def layers_arg(layers: Sequence[int] | str | None) -> tuple[int, ...] | str | None:
    """``fit``'s ``layers`` as FitConfig keeps it: a tuple of ints, a name, or None.

    Example:
        >>> from lens_laai.fitting.config import layers_arg
        >>> layers_arg([4, 8]), layers_arg("all"), layers_arg(None)
        ((4, 8), 'all', None)
    """
    if layers is None or isinstance(layers, str):
        return layers
    return tuple(layers)
