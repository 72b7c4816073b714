"""Fitting: find a sparse Δ at one layer that makes the model produce a task's targets.

Objective (model frozen): mean cross-entropy of each target's first token at the last prompt
position (or, with ``objective="sequence"``, of the whole target under teacher forcing),
plus ``l1‖Δ‖₁ + group_l1 Σ_h ‖Δ_h‖₂``, minimised by accelerated proximal gradient
(:func:`lens_laai.solver.fista`) so unselected heads are exactly zero. ``layer="auto"``
fits every candidate layer and keeps the best on the validation split.

Example:
    >>> from lens_laai import fit, load_task
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> result = fit(tiny_model(), tiny_task(), layer=1, n_train=8, n_valid=4, steps=5, progress=False)
    >>> result.intervention.layers
    [1]
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Literal, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from .bridge import model_fingerprint, model_name
from .errors import FitError, TaskError
from .fastpath import CostMeter, LayerRunner, block_device, warn_once
from .intervention import HeadIntervention, delta_hook, hook_name
from .prompts import Batch, PromptTemplate, k_shot_prompts, left_pad, model_batches, pad_id
from .provenance import fit_metadata
from .solver import StepRecord, fista
from .tasks import Task, TaskSplits

Objective = Literal["first_token", "sequence"]
TaskLike = Task | TaskSplits | Sequence[tuple[str, str]]


def default_layers(n_layers: int) -> list[int]:
    """The layers ``layer="auto"`` tries unless told otherwise: every third layer of the middle 70%.

    Task vectors live in the middle of the network (Function Vectors, LAAI); models with fewer
    than 12 layers try every layer of that range.
    """
    lo, hi = round(0.15 * n_layers), round(0.85 * n_layers)
    return list(range(lo, max(hi, lo + 1), 3 if n_layers >= 12 else 1))


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """Candidate layers from ``None``/``"default"`` (:func:`default_layers`), ``"all"``, a comma list or ints."""
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


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """Everything that, with the data and model, reproduces a fit."""

    layer: int | str = "auto"
    layers: tuple[int, ...] | None = None
    l1: float = 1e-3
    group_l1: float = 0.3
    steps: int = 50
    lr: float = 1.0
    n_train: int = 20
    n_valid: int = 40
    n_test: int | None = None
    seed: int = 0
    shots: int = 0
    objective: Objective = "first_token"
    batch_size: int = 32
    fast: bool = True

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
        if not isinstance(self.shots, int) or isinstance(self.shots, bool) or self.shots < 0:
            raise FitError(f"shots must be an integer ≥ 0, got {self.shots!r}.")
        if self.objective not in ("first_token", "sequence"):
            raise FitError(f"objective must be 'first_token' or 'sequence', got {self.objective!r}.")
        self.candidate_layers(n_layers)

    def candidate_layers(self, n_layers: int) -> list[int]:
        if self.layer == "auto":
            return parse_layers(self.layers, n_layers)
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise FitError(f"layer must be a layer index or 'auto', got {self.layer!r}.")
        return parse_layers([self.layer], n_layers)


@dataclass
class FitResult:
    """A fitted intervention with its training record and validation scores."""

    intervention: HeadIntervention
    layer: int
    history: pd.DataFrame
    train_accuracy: float
    valid_accuracy: float
    selected_heads: list[tuple[int, int]]
    config: FitConfig
    sweep: pd.DataFrame
    splits: TaskSplits
    seconds: float
    forward_equivalents: float
    fast_path: bool = True


def fit(
    model: TransformerBridge,
    task: TaskLike,
    layer: int | str = "auto",
    *,
    layers: Sequence[int] | str | None = None,
    l1: float = FitConfig.l1,
    group_l1: float | Sequence[float] = FitConfig.group_l1,
    steps: int = FitConfig.steps,
    lr: float = FitConfig.lr,
    n_train: int | None = None,
    n_valid: int | None = None,
    n_test: int | None = None,
    seed: int | None = None,
    shots: int = 0,
    objective: Objective = "first_token",
    batch_size: int = 32,
    fast: bool = True,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit a sparse per-head intervention; see the module docstring.

    Args:
        task: a :class:`Task` (split here by ``seed`` into ``n_train``/``n_valid``/rest, defaults
            0/20/40), ready :class:`TaskSplits` (then give none of those three), or a list of
            your own ``(prompt, target)`` strings, used verbatim unless you pass a ``template``
            (e.g. :meth:`PromptTemplate.chat`).
        layer: a layer index, or ``"auto"`` to sweep ``layers`` (default: :func:`default_layers`;
            ``"all"`` for every layer) and keep the best validation accuracy (ties: lower loss).
        l1, group_l1: λ₁ and λ₂ of the penalty. A sequence of λ₂ values is a path, fitted
            largest first with warm starts at every layer; the best (layer, λ₂) on validation wins.
        steps, lr: proximal steps per (layer, λ₂) and the initial step size (adapted by backtracking).
        shots: demonstrations in the training prompts (0: the zero-shot setting of the paper).
        objective: ``"first_token"`` or ``"sequence"`` (whole target, teacher forcing; uses the
            full forward).
        template: how pairs become prompts; recorded in the intervention and reused by evaluation.
        fast: use the last-token fast path when the model supports it.

    Raises:
        FitError: a bad setting (before any work), or a loss that is not finite.
    """
    lambdas = _as_tuple(group_l1)
    cfg = FitConfig(layer=layer, layers=_layers_arg(layers), l1=l1, group_l1=lambdas[0], steps=steps, lr=lr,
                    shots=shots, objective=objective, batch_size=batch_size, fast=fast)
    for lam in lambdas:
        replace(cfg, group_l1=lam).validate(model.cfg.n_layers)
    splits, source, template = _prepare_data(task, template, n_train, n_valid, n_test, seed)
    cfg = replace(cfg, n_train=len(splits.train), n_valid=len(splits.valid), n_test=len(splits.test), seed=splits.seed)
    _check_splits(splits, shots)
    start = time.perf_counter()
    meter = CostMeter()
    candidates = cfg.candidate_layers(model.cfg.n_layers)
    show_steps = progress and len(candidates) == 1 and len(lambdas) == 1
    rows, best = [], None
    bar = tqdm(candidates, desc="layers", disable=not progress or len(candidates) == 1)
    for L in bar:
        for fitted in _layer_path(model, splits, L, lambdas, cfg, template, meter, show_steps):
            rows.append(fitted.row())
            if best is None or fitted.key() > best.key():
                best = fitted
        bar.set_postfix(best_layer=best.layer, valid_acc=f"{best.valid_accuracy:.2f}")
    chosen = replace(cfg, layer=best.layer, group_l1=best.group_l1)
    iv = best.intervention(model, splits, source, chosen, template)
    return FitResult(
        intervention=iv, layer=best.layer, history=pd.DataFrame([asdict(r) for r in best.history]),
        train_accuracy=best.train_accuracy, valid_accuracy=best.valid_accuracy, selected_heads=iv.selected_heads(),
        config=chosen, sweep=pd.DataFrame(rows), splits=splits, seconds=time.perf_counter() - start,
        forward_equivalents=meter.forward_equivalents(), fast_path=best.fast_path,
    )


def _prepare_data(task: TaskLike, template: PromptTemplate | None, n_train: int | None, n_valid: int | None,
                  n_test: int | None, seed: int | None) -> tuple[TaskSplits, Task | None, PromptTemplate]:
    """Splits, the task they were cut from (if known), and the template."""
    if isinstance(task, TaskSplits):
        given = [k for k, v in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test), ("seed", seed)) if v is not None]
        if given:
            raise FitError(f"{', '.join(given)} split a Task, but these TaskSplits are already split; drop them.")
        return task, None, template or PromptTemplate()
    if not isinstance(task, Task):
        if isinstance(task, (str, bytes)) or not isinstance(task, Sequence):
            raise FitError(f"task must be a Task, TaskSplits or a list of (prompt, target) strings, got {type(task).__name__}.")
        task, template = Task.from_pairs(task), template or PromptTemplate.verbatim()
    splits = task.split(0 if seed is None else seed, 20 if n_train is None else n_train,
                        40 if n_valid is None else n_valid, n_test)
    return splits, task, template or PromptTemplate()


def _check_splits(splits: TaskSplits, shots: int) -> None:
    if not len(splits.train):
        raise TaskError("The training split is empty; use n_train ≥ 1.")
    if shots > len(splits.train) - 1:
        raise FitError(f"{shots}-shot training prompts need {shots + 1} or more training pairs; use n_train ≥ {shots + 1}.")
    if not len(splits.valid):
        warnings.warn("The validation split is empty: the layer and λ are chosen on the training loss, "
                      "which favours overfitting. Use n_valid ≥ 1 for an honest choice.", UserWarning, stacklevel=3)


def _layers_arg(layers: Sequence[int] | str | None) -> tuple[int, ...] | str | None:
    if layers is None or isinstance(layers, str):
        return layers
    return tuple(layers)


def fit_path(
    model: TransformerBridge,
    splits: TaskSplits,
    layer: int,
    group_l1s: Sequence[float],
    *,
    l1: float = 0.0,
    steps: int = FitConfig.steps,
    lr: float = FitConfig.lr,
    shots: int = 0,
    fast: bool = True,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[HeadIntervention]]:
    """A λ₂ path at one layer, largest first, each fit warm-started from the previous one.

    Returns a DataFrame (``group_l1, n_selected, train_accuracy, valid_accuracy, valid_ce``)
    and the interventions in the same order: accuracy against head budget.
    """
    template = template or PromptTemplate()
    lambdas = tuple(sorted(_as_tuple(group_l1s), reverse=True))
    cfg = FitConfig(layer=layer, l1=l1, group_l1=lambdas[0], steps=steps, lr=lr, n_train=len(splits.train),
                    n_valid=len(splits.valid), n_test=len(splits.test), seed=splits.seed, shots=shots, fast=fast)
    for lam in lambdas:
        replace(cfg, group_l1=lam).validate(model.cfg.n_layers)
    _check_splits(splits, shots)
    fits = list(tqdm(_layer_path(model, splits, layer, lambdas, cfg, template, CostMeter(), False),
                     desc="λ path", total=len(lambdas), disable=not progress))
    ivs = [f.intervention(model, splits, None, replace(cfg, group_l1=f.group_l1), template) for f in fits]
    return pd.DataFrame([f.row() for f in fits]).drop(columns=["layer"]), ivs


@dataclass
class _Fitted:
    """One fitted (layer, λ₂) candidate with its scores."""

    layer: int
    group_l1: float
    delta: Tensor
    history: list[StepRecord]
    train_accuracy: float
    valid_accuracy: float
    valid_ce: float
    fast_path: bool

    def key(self) -> tuple[float, float]:
        return (self.valid_accuracy, -self.valid_ce)

    def row(self) -> dict[str, Any]:
        return {"layer": self.layer, "group_l1": self.group_l1, "n_selected": int((self.delta.norm(dim=-1) > 0).sum()),
                "train_accuracy": self.train_accuracy, "valid_accuracy": self.valid_accuracy,
                "valid_ce": self.valid_ce, "train_loss": self.history[-1].loss}

    def intervention(self, model: TransformerBridge, splits: TaskSplits, source: Task | None, cfg: FitConfig,
                     template: PromptTemplate) -> HeadIntervention:
        metadata = fit_metadata(splits, source, template, asdict(cfg), train_accuracy=self.train_accuracy,
                                valid_accuracy=self.valid_accuracy)
        # Δ leaves the fit as plain data (CPU, float32), exactly as a saved one loads; hooks move and cast it.
        delta = self.delta.detach().to("cpu", torch.float32).clone()
        return HeadIntervention({self.layer: delta}, model_name(model), model_fingerprint(model), "last", metadata)


def _layer_path(model, splits, layer, lambdas, cfg, template, meter, show_steps):
    """Fit each λ₂ (largest first, warm-started) at ``layer``; yield a scored :class:`_Fitted` each."""
    train = training_batches(model, splits.train, splits.train, cfg, template)
    valid = training_batches(model, splits.valid, splits.train, cfg, template) if len(splits.valid) else []
    if cfg.fast and cfg.objective == "sequence":
        warn_once("objective:sequence", "objective='sequence' scores tokens after the prompt, which the last-token "
                  "fast path does not compute; fitting with the full forward.")
    runner = LayerRunner(model, train, layer, cfg.fast and cfg.objective == "first_token", meter)
    valid_runner = LayerRunner(model, valid, layer, cfg.fast, meter) if valid else None
    # Δ is optimised in float32 on the intervened block's device, whatever the model's dtype; the hook casts it.
    delta = torch.zeros(model.cfg.n_heads, model.cfg.d_head, device=block_device(model, layer), dtype=torch.float32)
    for lam in sorted(lambdas, reverse=True):
        delta, history = _fit_layer(runner, train, replace(cfg, group_l1=lam), delta, show_steps)
        train_acc, train_ce = runner.scores(_hooks(layer, delta))
        valid_acc, valid_ce = valid_runner.scores(_hooks(layer, delta)) if valid_runner else (train_acc, train_ce)
        yield _Fitted(layer, lam, delta, history, train_acc, valid_acc, valid_ce, runner.is_fast)


def _as_tuple(group_l1: float | Sequence[float]) -> tuple[float, ...]:
    values = tuple(group_l1) if isinstance(group_l1, (list, tuple)) else (group_l1,)
    if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        raise FitError(f"group_l1 must be a number or a non-empty list of numbers, got {group_l1!r}.")
    return tuple(float(v) for v in values)


# internals ------------------------------------------------------------------------------------
def training_batches(model: TransformerBridge, task: Task, demos: Task, cfg: FitConfig, template: PromptTemplate) -> list[Batch]:
    """Prompts of ``task`` (with ``cfg.shots`` demonstrations from ``demos``) in batches."""
    prompts, targets = k_shot_prompts(task, cfg.shots, demos, cfg.seed, template)
    return model_batches(model, prompts, targets, cfg.batch_size, template)


def _fit_layer(
    runner: LayerRunner, train: list[Batch], cfg: FitConfig, init: Tensor, show: bool
) -> tuple[Tensor, list[StepRecord]]:
    bar = tqdm(total=cfg.steps, desc=f"fit layer {runner.layer}", disable=not show)

    def on_step(r: StepRecord) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.3f}", heads=r.n_selected)

    delta, history = solve_layer(runner, train, cfg, init, on_step)
    bar.close()
    return delta, history


def solve_layer(
    runner: LayerRunner, train: list[Batch], cfg: FitConfig, init: Tensor, on_step: Callable[[StepRecord], None] | None
) -> tuple[Tensor, list[StepRecord]]:
    """Minimise the penalised objective over Δ at ``runner.layer`` from ``init`` (FISTA)."""
    n_rows = sum(len(b) for b in train)
    init = init.to(device=runner.delta_device, dtype=torch.float32)

    def loss(delta: Tensor, backward: bool) -> Tensor:
        total = torch.zeros((), device=delta.device)
        for i, batch in enumerate(train):
            if cfg.objective == "sequence":
                part = _sequence_ce(runner, batch, delta, backward) * len(batch)
            else:
                part = runner.cross_entropy(i, _hooks(runner.layer, delta), backward)
            total = total + part.to(total.device)  # the loss may come off another device than Δ's
        return total / n_rows

    def smooth_and_grad(y: Tensor) -> tuple[float, Tensor]:
        y = y.detach().requires_grad_(True)
        value = loss(y, backward=True)
        (grad,) = torch.autograd.grad(value, y)
        return float(value.detach()), grad

    def smooth(x: Tensor) -> float:
        with torch.no_grad():
            return float(loss(x, backward=False))

    return fista(smooth_and_grad, smooth, init, cfg.l1, cfg.group_l1, cfg.steps, cfg.lr, on_step)


def _hooks(layer: int, delta: Tensor) -> list[tuple[str, Callable]]:
    return [(hook_name(layer), delta_hook(delta))]


def _sequence_ce(runner: LayerRunner, batch: Batch, delta: Tensor, backward: bool) -> Tensor:
    """Teacher-forced CE of every target token, Δ at each row's last prompt token only."""
    model = runner.model
    rows = [ids[ids_mask.bool()].tolist() + tgt[:-1] for ids, ids_mask, tgt in
            zip(batch.input_ids, batch.attention_mask, batch.target_tokens)]
    ids, mask = left_pad(rows, pad_id(model.tokenizer))
    ids, mask = ids.to(batch.input_ids.device), mask.to(batch.input_ids.device)
    width = ids.shape[1]
    target_lens = torch.tensor([len(t) for t in batch.target_tokens])
    last_prompt = width - target_lens  # index of each row's last prompt token
    runner.meter.add(float(mask.sum()), model.cfg.n_layers, backward)
    logits = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(hook_name(runner.layer), delta_hook(delta, last_prompt))])
    total = torch.zeros((), device=logits.device)
    for i, tgt in enumerate(batch.target_tokens):
        start = int(last_prompt[i])
        total = total + F.cross_entropy(logits[i, start:start + len(tgt)].float(), torch.tensor(tgt, device=logits.device),
                                        reduction="mean")
    return total / len(batch.target_tokens)
