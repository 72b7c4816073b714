"""Fitting Δ at one layer: the penalised objective, λ_max, the starting point and a warm-started λ₂ path.

:func:`lens_laai.fitting.fit` decides *which* layer and λ₂ (see :mod:`lens_laai.fitting.selection`); this module fits
one layer. λ₂ may be given relative to :func:`lambda_max`, the smallest λ₂ at which the proximal
step keeps every head at zero from Δ = 0 (as glmnet scales its path): a relative value means the
same thing at every layer and on every task, an absolute one does not, since the gradient's size
varies by orders of magnitude between layers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import FitError
from lens_laai.fastpath import CostMeter, LayerRunner, cached_runner, warn_once
from lens_laai.fitting.objective import (  # noqa: F401  (re-exported: they were defined here)
    delta_hooks,
    initial_delta,
    lambda_max,
    objective,
    sites_of,
    solve_layer,
)
from lens_laai.fitting.solver import StepRecord
from lens_laai.interventions.head import HeadIntervention
from lens_laai.interventions.positions import last_positions
from lens_laai.models.bridge import model_fingerprint, model_name
from lens_laai.tasks.prompts import (
    Batch,
    PromptTemplate,
    k_shot_prompts,
    model_batches,
)
from lens_laai.tasks.provenance import fit_metadata
from lens_laai.tasks.task import Task, TaskSplits

Init = Literal["zero", "mean-difference"]


@dataclass
class LayerFit:
    """One fitted (layer, λ₂) candidate with its scores (``valid_*`` on whatever split was scored).

    Example (the points of a two-λ₂ path at layer 1 of the tiny model, no validation split):
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import layer_path
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, splits = tiny_model(), tiny_task().split(0, 8)
        >>> cfg = FitConfig(layer=1, steps=2)
        >>> first, last = layer_path(model, splits.train, None, 1, [0.9, 0.2], cfg, PromptTemplate(), CostMeter())
        >>> last.layer, last.group_l1_rel, last.sites, last.main_layer, tuple(last.delta.shape), len(last.history)
        (1, 0.2, (1,), 1, (4, 16), 2)
        >>> first.n_selected <= last.n_selected, last.valid_accuracy == last.train_accuracy  # no split: train scores
        (True, True)
        >>> list(last.row())
        ['layer', 'group_l1', 'group_l1_rel', 'lambda_max', 'n_selected', 'train_accuracy', 'valid_accuracy', 'valid_ce', 'train_loss']
        >>> iv = last.intervention(model, splits, None, cfg, PromptTemplate())
        >>> iv.layers, len(iv.selected_heads()) == last.n_selected, iv.metadata["fit_config"]["steps"]
        ([1], True, 2)
    """

    layer: int | tuple[int, ...]
    group_l1: float
    group_l1_rel: float | None
    lambda_max: float | None
    delta: Tensor
    history: list[StepRecord]
    train_accuracy: float
    valid_accuracy: float
    valid_ce: float
    fast_path: bool
    runner: LayerRunner | None = field(default=None, repr=False)  # what it was fitted on (reused by refits)
    valid_runner: LayerRunner | None = field(default=None, repr=False)  # what ``valid_*`` was scored on

    def key(self) -> tuple[float, float]:
        return (self.valid_accuracy, -self.valid_ce)

    @property
    def n_selected(self) -> int:
        return int((self.delta.norm(dim=-1) > 0).sum())

    def row(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "group_l1": self.group_l1,
            "group_l1_rel": self.group_l1_rel,
            "lambda_max": self.lambda_max,
            "n_selected": self.n_selected,
            "train_accuracy": self.train_accuracy,
            "valid_accuracy": self.valid_accuracy,
            "valid_ce": self.valid_ce,
            "train_loss": self.history[-1].loss,
        }

    @property
    def sites(self) -> tuple[int, ...]:
        """The layers Δ acts on: one, or every candidate layer of a joint fit."""
        return sites_of(self.layer)

    @property
    def main_layer(self) -> int:
        """The layer with the largest ‖Δ‖ (the only one, for a single-layer fit)."""
        norms = self.delta.reshape(len(self.sites), -1).norm(dim=-1)
        return self.sites[int(norms.argmax())]

    def intervention(
        self,
        model: TransformerBridge,
        splits: TaskSplits,
        source: Task | None,
        cfg: Any,
        template: PromptTemplate,
        **extra: Any,
    ) -> HeadIntervention:
        metadata = fit_metadata(
            splits,
            source,
            template,
            asdict(cfg),
            train_accuracy=self.train_accuracy,
            valid_accuracy=self.valid_accuracy,
            **extra,
        )
        # Δ leaves the fit as plain data (CPU, float32), exactly as a saved one loads; hooks move and cast it.
        delta = self.delta.detach().to("cpu", torch.float32).clone()
        parts = dict(zip(self.sites, delta.chunk(len(self.sites))))
        kept = {L: d for L, d in parts.items() if d.abs().sum() > 0} or {self.sites[0]: parts[self.sites[0]]}
        where = last_positions(cfg.last_positions)
        return HeadIntervention(kept, model_name(model), model_fingerprint(model), where, metadata)


def layer_path(
    model: TransformerBridge,
    train: Task,
    valid: Task | None,
    layer: int | tuple[int, ...],
    lambdas: Sequence[float],
    cfg: Any,
    template: PromptTemplate,
    meter: CostMeter,
    show_steps: bool = False,
    runners: dict | None = None,
) -> Iterator[LayerFit]:
    """Fit each λ₂ (largest first, each warm-started from the last) at ``layer``; yield a scored :class:`LayerFit`.

    ``layer`` may be a tuple of layers: a *joint* fit, one group per (layer, head), so the group
    Lasso chooses layers and heads together (the cache starts at the lowest of them).

    ``cfg`` is a :class:`lens_laai.fitting.FitConfig`: with ``cfg.relative`` the ``lambdas`` are fractions of
    :func:`lambda_max` at this layer; ``cfg.init`` picks the starting point of the first λ₂.
    ``runners`` (a dict) shares prefix caches between paths whose prompts coincide, e.g. one
    fold's held-out pairs and another fold's training pairs.

    Example (8 training pairs, scored on 16 held-out ones; λ₂ relative to one λ_max):
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import layer_path
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> splits = tiny_task().split(0, 8)
        >>> meter = CostMeter()
        >>> path = list(layer_path(tiny_model(), splits.train, splits.test, 1, [0.2, 0.9], FitConfig(layer=1, steps=2),
        ...                        PromptTemplate(), meter))
        >>> [f.group_l1_rel for f in path], len({f.lambda_max for f in path}), [len(f.history) for f in path]
        ([0.9, 0.2], 1, [2, 2])
        >>> [f.group_l1 == f.group_l1_rel * f.lambda_max for f in path], path[0].valid_runner is path[1].valid_runner
        ([True, True], True)
        >>> meter.forward_equivalents() > 0
        True
    """
    fast = cfg.fast and cfg.objective == "first_token"
    if cfg.fast and cfg.objective == "sequence":
        warn_once(
            "objective:sequence",
            "objective='sequence' scores tokens after the prompt, which the last-token "
            "fast path does not compute; fitting with the full forward.",
        )
    sites = sites_of(layer)
    if len(sites) > 1 and cfg.objective == "sequence":
        raise FitError("a joint fit over several layers supports objective='first_token' only.")
    tail = cfg.last_positions
    runner = _runner(model, training_batches(model, train, train, cfg, template), sites[0], meter, fast, runners, tail)
    valid_runner = (
        _runner(model, held_out_batches(model, valid, train, cfg, template), sites[0], meter, cfg.fast, runners, tail)
        if valid is not None and len(valid)
        else None
    )
    lam_max = lambda_max(runner, cfg, sites) if cfg.relative else None
    delta = initial_delta(model, train, sites, cfg, template, meter)
    for lam in sorted(lambdas, reverse=True):
        absolute = lam * lam_max if lam_max is not None else lam
        delta, history = _solve_with_bar(runner, replace(cfg, group_l1=absolute), delta, show_steps, sites)
        train_acc, train_ce = runner.scores(delta_hooks(sites, delta, runner.tail))
        valid_acc, valid_ce = (
            valid_runner.scores(delta_hooks(sites, delta, runner.tail)) if valid_runner else (train_acc, train_ce)
        )
        yield LayerFit(
            layer,
            absolute,
            lam if lam_max is not None else None,
            lam_max,
            delta,
            history,
            train_acc,
            valid_acc,
            valid_ce,
            runner.is_fast,
            runner,
            valid_runner,
        )


def _runner(
    model: TransformerBridge,
    batches: list[Batch],
    layer: int,
    meter: CostMeter,
    fast: bool,
    runners: dict | None,
    tail: int = 1,
) -> LayerRunner:
    """A :class:`LayerRunner` for ``batches``, shared through ``runners`` (:func:`~lens_laai.fastpath.cached_runner`)."""
    return cached_runner(model, batches, layer, fast, meter, runners, tail)


def training_batches(
    model: TransformerBridge, task: Task, demos: Task, cfg: Any, template: PromptTemplate
) -> list[Batch]:
    """Prompts of ``task`` in batches, each pair once, with demonstrations from ``demos`` (never the query's own pair).

    ``cfg.shots`` is one count or several: with ``(0, 5)`` half the pairs (a seeded choice) are
    zero-shot and half 5-shot, so one Δ learns to serve both at the cost of one row per pair.
    Each count gets its own batches (rows of one length pad little).

    Example:
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import training_batches
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train = tiny_model(), tiny_task().split(0, 8).train
        >>> batches = training_batches(model, train, train, FitConfig(), PromptTemplate())
        >>> [len(b) for b in batches], batches[0].prompts[0].count("Q:")
        ([8], 1)
        >>> batches = training_batches(model, train, train, FitConfig(shots=(0, 2)), PromptTemplate())
        >>> [len(b) for b in batches], [b.prompts[0].count("Q:") for b in batches]  # half zero-shot, half 2-shot
        ([4, 4], [1, 3])
    """
    counts = shot_counts(cfg.shots)
    order = list(range(len(task)))
    if len(counts) > 1:
        random.Random(f"shots:{cfg.seed}").shuffle(order)
    parts = {k: sorted(order[j :: len(counts)]) for j, k in enumerate(counts)}
    return _batches(model, [(task.subset(parts[k]), k) for k in counts], demos, cfg, template)


def held_out_batches(
    model: TransformerBridge, task: Task, demos: Task, cfg: Any, template: PromptTemplate
) -> list[Batch]:
    """Prompts of held-out pairs in batches: every pair once per count of :func:`scored_shots`, in that order.

    Example:
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import held_out_batches
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> splits = tiny_task().split(0, 8)
        >>> batches = held_out_batches(tiny_model(), splits.test, splits.train, FitConfig(demos=2), PromptTemplate())
        >>> [p.count("Q:") for b in batches for p in b.prompts] == [1] * len(splits.test) + [3] * len(splits.test)
        True
    """
    return _batches(model, [(task, k) for k in scored_shots(cfg)], demos, cfg, template)


def scored_shots(cfg: Any) -> tuple[int, ...]:
    """The demonstration counts held-out pairs are scored with: ``(0, cfg.demos)`` when the fit chooses a
    k-shot mode (``cfg.demos`` set), else the training counts ``cfg.shots``.

    Example:
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import scored_shots
        >>> scored_shots(FitConfig(shots=(0, 5), demos=5)), scored_shots(FitConfig(shots=1))
        ((0, 5), (1,))
    """
    demos = getattr(cfg, "demos", None)
    return (0, demos) if demos else shot_counts(cfg.shots)


def _batches(
    model: TransformerBridge, parts: list[tuple[Task, int]], demos: Task, cfg: Any, template: PromptTemplate
) -> list[Batch]:
    batches: list[Batch] = []
    for task, k in parts:
        if len(task):
            prompts, targets = k_shot_prompts(task, k, demos, cfg.seed, template)
            batches += model_batches(model, prompts, targets, cfg.batch_size, template)
    return batches


def zero_shot_meter(model: TransformerBridge, train: Task, template: PromptTemplate) -> CostMeter:
    """A meter whose unit is one full forward of one zero-shot prompt of ``train``, however many
    demonstrations the fit's prompts carry (so fits stay comparable).

    Example:
        >>> from lens_laai.fitting.layer_fit import zero_shot_meter
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> meter = zero_shot_meter(tiny_model(), tiny_task().split(0, 8).train, PromptTemplate())
        >>> meter.unit_fixed, meter.prompts, meter.forward_equivalents()
        (True, 8, 0.0)
    """
    meter = CostMeter()
    for batch in model_batches(model, *k_shot_prompts(train, 0, train, 0, template), template=template):
        meter.register_prompts(batch, model.cfg.n_layers)
    meter.fix_unit()
    return meter


def shot_counts(shots: int | Sequence[int]) -> tuple[int, ...]:
    """``shots`` as a tuple of demonstration counts: ``3`` → ``(3,)``, ``[0, 5]`` → ``(0, 5)``.

    Example:
        >>> from lens_laai.fitting.layer_fit import shot_counts
        >>> shot_counts(3), shot_counts([0, 5])
        ((3,), (0, 5))
    """
    return (shots,) if isinstance(shots, int) else tuple(shots)


def _solve_with_bar(
    runner: LayerRunner, cfg: Any, init: Tensor, show: bool, sites: tuple[int, ...]
) -> tuple[Tensor, list[StepRecord]]:
    bar = tqdm(total=cfg.steps, desc=f"fit layer {runner.layer}", disable=not show)

    def on_step(r: StepRecord) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.3f}", heads=r.n_selected)

    delta, history = solve_layer(runner, runner.batches, cfg, init, on_step, sites)
    bar.close()
    return delta, history
