"""Which heads carry the task, and are they the heads the classic methods find?

:func:`head_table` scores every head of the layers asked for (default: all) with the fitted
intervention's ‖Δ_h‖ and with direct logit attribution, activation patching (TransformerLens'
``patching``), attribution patching (TransformerLens' ``attribution_patch``), Function Vectors'
causal indirect effect, zero- and mean-ablation, and the necessity of each selected head's Δ_h.
It returns a :class:`HeadAnalysis`: one row per (layer, head), the same scores as
``[n_layers, n_heads]`` tensors, a summary of where each method ranks the selected heads
(:func:`lens_laai.analysis.summary.selection_agreement`: precision@k with an exact permutation p,
ρ among the selected heads), the findings (necessity: the selected heads ablated together
against random sets of unselected heads; sufficiency: held-out accuracy with Δ on them alone),
a random-head control table, the logit lens of each selected head, and the cost of each column
in forward-pass equivalents (``docs/analysis.md``). ``analysis.answer()`` says it in sentences.

The scored prompts are built from the intervention's held-out test queries (never a pair it was
fitted on), with k-shot demonstrations from its training split; the reference prompts for mean
ablation and FV's mean activations are k-shot prompts of the training queries.

Example:
    >>> from lens_laai import fit
    >>> from lens_laai.analysis.head_table import head_table
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> model, task = tiny_model(), tiny_task()
    >>> result = fit(model, task, layer=1, n_train=8, n_valid=4, steps=3, group_l1=0.01, progress=False)
    >>> analysis = head_table(model, task, result.intervention, n_prompts=6, shots=2, n_random=5, progress=False)
    >>> analysis.scores["norm"].shape, len(analysis.table)
    (torch.Size([3, 4]), 12)
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.analysis import effects as fx
from lens_laai.analysis import logit_attribution, patching
from lens_laai.analysis.prompts import AnalysisPrompts as _AnalysisData
from lens_laai.analysis.summary import (
    IMPORTANCE_SCORES,
    agreement,
    answer,
    mean_interval,
    percentile_with_interval,
    selection_agreement,
    spearman_permutation,
    stability_scores,
)
from lens_laai.baselines.function_vectors import indirect_effects
from lens_laai.errors import TaskError
from lens_laai.evaluation.evaluate import resolve_template
from lens_laai.fastpath import CostMeter, LayerRunner
from lens_laai.fitting.fit import parse_layers
from lens_laai.interventions.ablation import HeadAblation
from lens_laai.interventions.head import HeadIntervention
from lens_laai.tasks.prompts import Batch, PromptTemplate
from lens_laai.tasks.task import Task, TaskSplits

__all__ = [
    "METHODS",
    "IMPORTANCE_SCORES",
    "HeadAnalysis",
    "agreement",
    "head_table",
    "selection_agreement",
    "spearman_permutation",
]

METHODS = ("dla", "act_patch", "attr_patch", "fv_cie", "ablation", "necessity", "random_control", "logit_lens")


@dataclass
class HeadAnalysis:
    """Everything :func:`~lens_laai.head_table` measured; see the module docstring. ``answer()`` says it in sentences.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> from lens_laai import fit
        >>> iv = fit(model, task, layer=1, n_train=8, steps=3, group_l1_rel=0.05, progress=False).intervention
        >>> from lens_laai.analysis.head_table import head_table
        >>> analysis = head_table(model, task, iv, methods=["dla"], n_prompts=4, shots=2, progress=False)
        >>> type(analysis).__name__, len(analysis.table) == model.cfg.n_layers * model.cfg.n_heads
        ('HeadAnalysis', True)
    """

    table: pd.DataFrame
    scores: dict[str, Tensor]
    summary: pd.DataFrame
    random_control: pd.DataFrame
    logit_lens: pd.DataFrame
    costs: pd.DataFrame
    layers: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    findings: dict[str, Any] = field(default_factory=dict)

    def answer(self) -> list[str]:
        """Which heads, how stable, whether necessary and sufficient, where each causal method ranks them."""
        return answer(self)

    def __repr__(self) -> str:
        return (
            f"HeadAnalysis({len(self.table)} heads over layers {self.layers}, scores {sorted(self.scores)}, "
            f"{float(self.costs.seconds.sum()):.1f}s)"
        )


def head_table(
    model: TransformerBridge,
    task: Task | TaskSplits,
    intervention: HeadIntervention,
    *,
    layers: Sequence[int] | str | None = "all",
    methods: Sequence[str] = METHODS,
    n_prompts: int = 16,
    shots: int = 5,
    patching_prompts: int = 4,
    n_random: int = 20,
    seed: int = 0,
    template: PromptTemplate | None = None,
    batch_size: int = 32,
    stability: pd.DataFrame | Tensor | None = None,
    dense: HeadIntervention | None = None,
    progress: bool = True,
) -> HeadAnalysis:
    """Score every head of ``layers`` for the task that ``intervention`` was fitted on.

    Args:
        task: the task (split as the intervention records) or explicit splits.
        layers: layers to score (``"all"``, default; ``"default"``; or indices).
        methods: any of ``METHODS``; ``"ablation"`` gives zero- and mean-ablation columns.
        n_prompts: held-out queries used (k-shot prompts for patching and ablation, zero-shot
            prompts for DLA, necessity and sufficiency).
        shots: demonstrations per k-shot prompt (from the training split).
        patching_prompts: how many of those prompts activation patching uses (it costs one
            forward of them per head, the most expensive column); attribution patching is
            compared with it on the same prompts.
        n_random: random sets of unselected heads in the ablation control.
        stability: each head's selection probability (a DataFrame with ``layer, head,
            selection_probability`` or an ``[n_layers, n_heads]`` tensor, as ``stability()``
            returns); adds a ``selection_probability`` column.
        dense: an intervention on the whole layer (e.g. a fit with a small penalty): the
            sufficiency check compares the selected heads' held-out accuracy with it.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> from lens_laai import fit
        >>> iv = fit(model, task, layer=1, n_train=8, steps=3, group_l1_rel=0.05, progress=False).intervention
        >>> from lens_laai.analysis.head_table import head_table
        >>> analysis = head_table(model, task, iv, methods=["dla", "ablation"], n_prompts=4, shots=2, progress=False)
        >>> tuple(analysis.scores["dla"].shape), {"layer", "head", "norm", "dla", "zero_acc_drop"} <= set(analysis.table.columns)
        ((3, 4), True)
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise TaskError(f"Unknown analysis methods {unknown}; choose from {METHODS}.")
    for name, value, least in (
        ("n_prompts", n_prompts, 1),
        ("shots", shots, 2),
        ("patching_prompts", patching_prompts, 1),
        ("n_random", n_random, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise TaskError(f"{name} must be an integer ≥ {least}, got {value!r}.")
    for name, iv in (("intervention", intervention), ("dense", dense)):
        if iv is not None and not isinstance(iv, HeadIntervention):
            raise TaskError(f"head_table's {name} must be a HeadIntervention, got {type(iv).__name__}.")
        if iv is not None:
            iv.check_model(model)
    layers = parse_layers(layers, model.cfg.n_layers)
    probabilities = (
        stability_scores(stability, (model.cfg.n_layers, model.cfg.n_heads)) if stability is not None else None
    )
    template = resolve_template(template, [intervention])
    data = _AnalysisData(model, task, intervention, template, n_prompts, shots, patching_prompts, seed, batch_size)
    run = _Run(model, intervention, layers, data, progress)
    scores: dict[str, Tensor] = {"norm": intervention.head_norms()}
    if probabilities is not None:
        scores["selection_probability"] = probabilities
    if "dla" in methods:
        scores["dla"] = run.timed(
            "dla", lambda m: logit_attribution.direct_logit_attribution(model, intervention, data.zero, m)
        )
    if "act_patch" in methods:
        patched, data.clean_metric, data.corrupt_metric = run.timed(
            "act_patch",
            lambda m: patching.activation_patching(model, data.patch_clean, data.patch_corrupt, layers, m, progress),
        )
        scores.update(patched)
    per_pair = None
    if "attr_patch" in methods:
        per_pair = run.timed("attr_patch", lambda m: patching.attribution_patching(model, data.pairs, m, reduce="none"))
        scores["attr_patch"] = _restrict(per_pair.mean(0), layers)
    if "fv_cie" in methods:
        scores["fv_cie"] = run.timed("fv_cie", run.fv_cie)
    if "ablation" in methods:
        scores.update(run.timed("ablation", run.ablations))
    if "necessity" in methods:
        scores.update(run.timed("necessity", run.necessity))
    findings: dict[str, Any] = {}
    control = pd.DataFrame(columns=["set", "heads", "acc_drop", "logprob_drop"])
    if "random_control" in methods:
        control, findings["necessity"] = run.timed("random_control", lambda m: run.random_control(m, n_random, seed))
    if "necessity" in methods:
        findings["sufficiency"] = run.timed("sufficiency", lambda m: run.sufficiency(m, dense))
    lens = (
        run.timed(
            "logit_lens",
            lambda m: pd.DataFrame(
                logit_attribution.logit_lens(model, intervention, data.zero, m),
                columns=logit_attribution.LOGIT_LENS_COLUMNS,
            ),
        )
        if "logit_lens" in methods
        else pd.DataFrame()
    )
    table = _table(scores, layers, intervention)
    settings = {
        "task": data.queries.name,
        "first_query": data.queries.pairs[0][0],
        "n_prompts": len(data.queries),
        "shots": shots,
        "patching_prompts": data.n_patch if "_kshot" in data.__dict__ else None,
        "dropped_pairs": data.dropped,
        "n_random": n_random,
        "seed": seed,
        "methods": list(methods),
        "clean_logprob": data.clean_metric,
        "corrupted_logprob": data.corrupt_metric,
    }
    if "act_patch" in scores and per_pair is not None:
        same = _restrict(per_pair[: data.n_patch].mean(0), layers)  # the prompts activation patching used
        settings["attribution_vs_activation"] = {
            **agreement(scores["act_patch"], same, seed),
            "n_prompts": data.n_patch,
        }
    summary = selection_agreement(table, seed)
    return HeadAnalysis(table, scores, summary, control, lens, run.cost_table(), layers, settings, findings)


# running the methods ---------------------------------------------------------------------------
class _Run:
    """Runs each method once, timing it and charging its compute to its own meter.

    Costs are per column as if it ran alone: a method that uses the shared prefix pass over the
    k-shot prompts is charged that pass too.
    """

    def __init__(
        self, model: TransformerBridge, iv: HeadIntervention, layers: list[int], data: _AnalysisData, progress: bool
    ) -> None:
        self.model, self.iv, self.layers, self.data, self.progress = model, iv, layers, data, progress
        self.costs: list[dict[str, Any]] = []
        self._runners: dict[str, LayerRunner] = {}

    def timed(self, name: str, work: Any) -> Any:
        meter = _unit_meter(self.model, self.data.zero)
        start = time.perf_counter()
        result = work(meter)
        self.costs.append(
            {"method": name, "forward_equivalents": meter.forward_equivalents(), "seconds": time.perf_counter() - start}
        )
        return result

    def cost_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.costs, columns=["method", "forward_equivalents", "seconds"])

    def runner(self, name: str, batches: list[Batch], meter: CostMeter) -> LayerRunner:
        """A last-token runner at the lowest scored layer (built once per prompt set); its prefix pass is charged to ``meter``."""
        if name not in self._runners:
            self._runners[name] = LayerRunner(self.model, batches, min(self.layers), True, CostMeter())
        runner = self._runners[name]
        for batch in batches:
            meter.add(float(batch.attention_mask.sum()), self.model.cfg.n_layers, backward=False)
        runner.meter.token_layers = 0.0
        return runner

    def reference_mean(self, heads: list[tuple[int, int]], meter: CostMeter) -> HeadAblation:
        meter.add(sum(float(b.attention_mask.sum()) for b in self.data.reference), self.model.cfg.n_layers, False)
        return HeadAblation.mean(self.model, heads, self.data.reference)

    def fv_cie(self, meter: CostMeter) -> Tensor:
        """Function Vectors' CIE (:func:`lens_laai.baselines.function_vectors.indirect_effects`) on the corrupted prompts."""
        mean = self.reference_mean([(l, 0) for l in self.layers], meter).values
        acts = torch.full((self.model.cfg.n_layers, self.model.cfg.n_heads, self.model.cfg.d_head), float("nan"))
        for layer in self.layers:
            acts[layer] = mean[layer][0].float().cpu()
        table = indirect_effects(self.model, self.data.corrupt, acts, self.layers, meter=meter, progress=self.progress)
        out = fx.empty_scores(self.model)
        out[table["layer"].tolist(), table["head"].tolist()] = torch.tensor(table.cie.to_numpy(), dtype=torch.float)
        return out

    def ablations(self, meter: CostMeter) -> dict[str, Tensor]:
        mean = self.reference_mean([(l, 0) for l in self.layers], meter)
        makers = {
            "zero": lambda heads: HeadAblation.zero(self.model, heads),
            "mean": lambda heads: _mean_ablation(mean, heads),
        }
        runner = self.runner("clean", self.data.clean, meter)
        out = fx.ablation_effects(runner, self.model, self.layers, makers, self.progress)
        meter.merge(runner.meter)
        return out

    def _zero_shot_runner(self, meter: CostMeter) -> LayerRunner:
        fast = self.iv.positions == "last"  # the prefix cache recomputes the last token only
        if "zero" not in self._runners:
            self._runners["zero"] = LayerRunner(
                self.model, self.data.zero, min(self.iv.layers), fast, _unit_meter(self.model, self.data.zero)
            )
        return self._runners["zero"]

    def necessity(self, meter: CostMeter) -> dict[str, Tensor]:
        runner = self._zero_shot_runner(meter)
        out = fx.necessity(runner, self.model, self.iv)
        meter.merge(runner.meter)
        runner.meter.token_layers = 0.0
        return out

    def sufficiency(self, meter: CostMeter, dense: HeadIntervention | None) -> dict[str, Any]:
        """Held-out zero-shot accuracy with Δ on the selected heads, with none, and with the ``dense`` intervention."""
        runner = self._zero_shot_runner(meter)
        facts: dict[str, Any] = {"n_prompts": len(self.data.queries)}
        for name, hooks in (("base", []), ("selected", self.iv.fwd_hooks())):
            correct, lp = fx.prompt_scores(runner, hooks)
            facts[f"{name}_accuracy"], facts[f"{name}_logprob"] = float(correct.mean()), float(lp.mean())
        if dense is not None:
            with dense.apply(self.model):
                correct, lp = fx.prompt_scores(LayerRunner(self.model, self.data.zero, 0, False, CostMeter()), [])
            facts.update(
                dense_accuracy=float(correct.mean()),
                dense_logprob=float(lp.mean()),
                dense_heads=len(dense.selected_heads()),
            )
            meter.add(sum(float(b.attention_mask.sum()) for b in self.data.zero), self.model.cfg.n_layers, False)
        meter.merge(runner.meter)
        runner.meter.token_layers = 0.0
        return facts

    def random_control(self, meter: CostMeter, n_random: int, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Mean-ablate the selected heads together vs ``n_random`` random sets of as many *unselected* heads.

        The random heads come from the scored layers, never from the selected set. When there
        are fewer unselected heads than selected ones (e.g. the fit keeps a whole scored layer)
        no control can be drawn: a warning says so and the percentile is NaN.
        """
        columns = ["set", "heads", "acc_drop", "logprob_drop", "logprob_drop_low", "logprob_drop_high"]
        selected = [h for h in self.iv.selected_heads() if h[0] in self.layers]
        pool = [(l, h) for l in self.layers for h in range(self.model.cfg.n_heads) if (l, h) not in set(selected)]
        reason = ""
        if not selected:
            reason = "the intervention selects no head in the scored layers"
        elif len(pool) < len(selected):
            reason = (
                f"the scored layers have {len(pool)} unselected heads, fewer than the {len(selected)} selected; "
                "score more layers (layers=) to draw random sets of unselected heads"
            )
        if reason:
            warnings.warn(f"Random-head control not run: {reason}.", stacklevel=3)
        mean = self.reference_mean([(l, 0) for l in self.layers], meter) if selected else None
        runner = self.runner("clean", self.data.clean, meter)
        base_correct, base_lp = fx.prompt_scores(runner, [])
        rng = random.Random(seed)
        sets = [("selected", selected)] if selected else []
        if not reason:
            sets += [(f"random {i}", rng.sample(pool, len(selected))) for i in range(n_random)]
        rows, drops = [], {}
        for name, heads in sets:
            assert mean is not None  # sets is empty when nothing was selected
            correct, lp = fx.prompt_scores(runner, _mean_ablation(mean, heads).fwd_hooks())
            drop = base_lp - lp
            mid, low, high = mean_interval(drop)
            drops[name] = mid
            rows.append(
                {
                    "set": name,
                    "heads": ",".join(f"L{l}H{h}" for l, h in sorted(heads)),
                    "acc_drop": float((base_correct - correct).mean()),
                    "logprob_drop": mid,
                    "logprob_drop_low": low,
                    "logprob_drop_high": high,
                }
            )
        meter.merge(runner.meter)
        table = pd.DataFrame(rows, columns=columns)
        randoms = np.array([v for k, v in drops.items() if k != "selected"])
        percentile, low, high = percentile_with_interval(drops.get("selected", float("nan")), randoms)
        table.attrs.update(percentile=percentile, percentile_low=low, percentile_high=high, reason=reason)
        facts: dict[str, Any] = {"reason": reason, "k": len(selected), "n_random": len(randoms)}
        if not reason:
            first = table.iloc[0]
            facts.update(
                n_prompts=len(base_lp),
                shots=self.data.shots,
                drop=first.logprob_drop,
                drop_low=first.logprob_drop_low,
                drop_high=first.logprob_drop_high,
                acc_drop=first.acc_drop,
                percentile=percentile,
                percentile_low=low,
                percentile_high=high,
                random_median=float(np.median(randoms)) if len(randoms) else float("nan"),
            )
        return table, facts


def _mean_ablation(mean: HeadAblation, heads: list[tuple[int, int]]) -> HeadAblation:
    return HeadAblation(
        heads, "mean", mean.model_name, mean.fingerprint, {l: mean.values[l] for l in {l for l, _ in heads}}
    )


def _unit_meter(model: TransformerBridge, zero_shot: list[Batch]) -> CostMeter:
    meter = CostMeter()
    for batch in zero_shot:
        meter.register_prompts(batch, model.cfg.n_layers)
    return meter


def _restrict(scores: Tensor, layers: list[int]) -> Tensor:
    out = torch.full_like(scores, float("nan"))
    out[layers] = scores[layers]
    return out


# tables and summaries ---------------------------------------------------------------------------
def _table(scores: dict[str, Tensor], layers: list[int], iv: HeadIntervention) -> pd.DataFrame:
    n_heads = scores["norm"].shape[1]
    selected = set(iv.selected_heads())
    rows = [{"layer": l, "head": h, "selected": (l, h) in selected} for l in layers for h in range(n_heads)]
    table = pd.DataFrame(rows)
    for name, tensor in scores.items():
        table[name] = [float(tensor[l, h]) for l in layers for h in range(n_heads)]
    ranks = table.loc[table.selected, "norm"].rank(ascending=False, method="min")
    table["rank"] = ranks.reindex(table.index)
    return table
