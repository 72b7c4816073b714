"""Which heads carry the task, and are they the heads the classic methods find?

:func:`head_table` scores every head of the layers asked for (default: all) with the fitted
intervention's ‖Δ_h‖ and with direct logit attribution, activation patching (TransformerLens'
``patching``), attribution patching (TransformerLens' ``attribution_patch``), Function Vectors'
causal indirect effect, zero- and mean-ablation, and the necessity of each selected head's Δ_h.
It returns a :class:`HeadAnalysis`: one row per (layer, head), the same scores as
``[n_layers, n_heads]`` tensors, a summary (Spearman ρ with permutation p-values, precision@k and
Jaccard overlap with each method's top-k), a random-head ablation control, the logit lens of each
selected head, and the cost of each column in forward-pass equivalents (``docs/analysis.md``).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.analysis import effects as fx
from lens_laai.errors import TaskError
from lens_laai.evaluation.evaluate import resolve_template, select_split
from lens_laai.fastpath.runner import CostMeter, LayerRunner
from lens_laai.fitting.fit import parse_layers
from lens_laai.interventions.ablation import HeadAblation
from lens_laai.interventions.head import HeadIntervention
from lens_laai.tasks.prompts import Batch, PromptTemplate, make_batch, model_batches
from lens_laai.tasks.task import Pair, Task, TaskSplits

METHODS = ("dla", "act_patch", "attr_patch", "fv_cie", "ablation", "necessity", "random_control", "logit_lens")
RANKED = {  # score column -> larger means more important for the task
    "dla": "dla",
    "act_patch": "act_patch",
    "attr_patch": "attr_patch",
    "fv_cie": "fv_cie",
    "zero_logprob_drop": "zero_logprob_drop",
    "mean_logprob_drop": "mean_logprob_drop",
}


@dataclass
class HeadAnalysis:
    """Everything :func:`head_table` measured; see the module docstring.

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
    progress: bool = True,
) -> HeadAnalysis:
    """Score every head of ``layers`` for the task that ``intervention`` was fitted on.

    Args:
        task: the task (split as the intervention records) or explicit splits.
        layers: layers to score (``"all"``, default; ``"default"``; or indices).
        methods: any of ``METHODS``; ``"ablation"`` gives zero- and mean-ablation columns.
        n_prompts: held-out queries used (k-shot prompts for patching and ablation, zero-shot
            prompts for DLA and necessity).
        shots: demonstrations per k-shot prompt (from the training split).
        patching_prompts: how many of those prompts activation patching uses (it costs one
            forward of them per head, the most expensive column).
        n_random: random head sets in the ablation control.

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
    if not isinstance(intervention, HeadIntervention):
        raise TaskError(f"head_table analyses a HeadIntervention, got {type(intervention).__name__}.")
    intervention.check_model(model)
    layers = parse_layers(layers, model.cfg.n_layers)
    template = resolve_template(template, [intervention])
    data = _AnalysisData.build(
        model, task, intervention, template, n_prompts, shots, patching_prompts, seed, batch_size
    )
    run = _Run(model, intervention, layers, data, progress)
    scores: dict[str, Tensor] = {"norm": intervention.head_norms()}
    if "dla" in methods:
        scores["dla"] = run.timed("dla", lambda m: fx.direct_logit_attribution(model, intervention, data.zero, m))
    if "act_patch" in methods:
        scores["act_patch"], data.clean_metric, data.corrupt_metric = run.timed(
            "act_patch",
            lambda m: fx.activation_patching(model, data.patch_clean, data.patch_corrupt, layers, m, progress),
        )
    if "attr_patch" in methods:
        scores["attr_patch"] = run.timed(
            "attr_patch", lambda m: _restrict(fx.attribution_patching(model, data.pairs, m), layers)
        )
    if "fv_cie" in methods:
        scores["fv_cie"] = run.timed("fv_cie", run.fv_cie)
    if "ablation" in methods:
        scores.update(run.timed("ablation", run.ablations))
    if "necessity" in methods:
        scores.update(run.timed("necessity", run.necessity))
    control = (
        run.timed("random_control", lambda m: run.random_control(m, n_random, seed))
        if "random_control" in methods
        else pd.DataFrame()
    )
    lens = (
        run.timed(
            "logit_lens",
            lambda m: pd.DataFrame(fx.logit_lens(model, intervention, data.zero, m), columns=fx.LOGIT_LENS_COLUMNS),
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
        "patching_prompts": int(data.patch_clean.input_ids.shape[0]),
        "dropped_pairs": data.dropped,
        "n_random": n_random,
        "seed": seed,
        "methods": list(methods),
        "clean_logprob": data.clean_metric,
        "corrupted_logprob": data.corrupt_metric,
    }
    if "act_patch" in scores and "attr_patch" in scores:
        settings["attribution_vs_activation"] = agreement(scores["act_patch"], scores["attr_patch"], seed)
    return HeadAnalysis(table, scores, summarise(table, seed), control, lens, run.cost_table(), layers, settings)


# prompts ----------------------------------------------------------------------------------------
@dataclass
class _AnalysisData:
    """Held-out queries as zero-shot prompts, clean k-shot prompts and label-deranged (corrupted) twins."""

    queries: Task
    zero: list[Batch]
    clean: list[Batch]
    patch_clean: Batch
    patch_corrupt: Batch
    pairs: list[tuple[Tensor, Tensor, int]]
    reference: list[Batch]
    dropped: int
    clean_metric: float | None = None
    corrupt_metric: float | None = None

    @classmethod
    def build(
        cls,
        model: TransformerBridge,
        task: Task | TaskSplits,
        iv: HeadIntervention,
        template: PromptTemplate,
        n_prompts: int,
        shots: int,
        patching_prompts: int,
        seed: int,
        batch_size: int,
    ) -> _AnalysisData:
        test, train = select_split(task, "test", [iv])
        if shots < 2 or shots > len(train) - 1:
            raise TaskError(f"Label-deranged prompts need 2 ≤ shots ≤ n_train - 1 = {len(train) - 1}, got {shots}.")
        queries = test.subset(list(range(min(n_prompts, len(test)))))
        clean_text, corrupt_text, targets = _deranged_prompts(queries.pairs, train.pairs, shots, seed, template)
        tok = model.tokenizer
        kept = [i for i in range(len(targets)) if _length(tok, clean_text[i]) == _length(tok, corrupt_text[i])]
        if not kept:
            raise TaskError("No clean/corrupted prompt pair tokenises to equal lengths; patching needs aligned pairs.")
        clean = make_batch(
            tok, [clean_text[i] for i in kept], [targets[i] for i in kept], template.prepend_bos, model.cfg.n_ctx
        )
        corrupt = make_batch(
            tok, [corrupt_text[i] for i in kept], [targets[i] for i in kept], template.prepend_bos, model.cfg.n_ctx
        )
        n_patch = max(1, min(patching_prompts, len(kept)))
        patch_clean, patch_corrupt = (_rows(b, n_patch) for b in (clean, corrupt))
        pairs = [
            (
                clean.input_ids[i][clean.attention_mask[i].bool()],
                corrupt.input_ids[i][corrupt.attention_mask[i].bool()],
                int(clean.target_ids[i]),
            )
            for i in range(len(kept))
        ]
        zero = model_batches(
            model,
            [template.render(x) for x, _ in queries.pairs],
            [template.target(y) for _, y in queries.pairs],
            batch_size,
            template,
        )
        ref_text, ref_targets, _ = _deranged_prompts(train.pairs, train.pairs, shots, seed + 1, template)
        reference = model_batches(model, ref_text, ref_targets, batch_size, template)
        device = model.cfg.device
        return cls(
            queries,
            zero,
            [clean.to(device)],
            patch_clean.to(device),
            patch_corrupt.to(device),
            pairs,
            reference,
            len(targets) - len(kept),
        )


def _deranged_prompts(
    queries: Sequence[Pair], pool: Sequence[Pair], shots: int, seed: int, template: PromptTemplate
) -> tuple[list[str], list[str], list[str]]:
    """Per query: a k-shot prompt and its twin whose demonstration outputs are deranged."""
    rng = random.Random(seed)
    clean, corrupt, targets = [], [], []
    for x, y in queries:
        candidates = [p for p in pool if p[0] != x]
        if len(candidates) < shots:
            raise TaskError(
                f"{shots}-shot prompts need {shots} demonstrations other than the query {x!r}; the training "
                f"split has {len(candidates)}. Use fewer shots."
            )
        demos = rng.sample(candidates, shots)
        perm = list(range(shots))
        while any(i == j for i, j in enumerate(perm)):
            rng.shuffle(perm)
        clean.append(template.render(x, demos))
        corrupt.append(template.render(x, [(demos[i][0], demos[perm[i]][1]) for i in range(shots)]))
        targets.append(template.target(y))
    return clean, corrupt, targets


def _length(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _rows(batch: Batch, n: int) -> Batch:
    keep = batch.attention_mask[:n].sum(0) > 0
    return Batch(
        batch.input_ids[:n][:, keep],
        batch.attention_mask[:n][:, keep],
        batch.target_ids[:n],
        batch.prompts[:n],
        batch.targets[:n],
        batch.target_tokens[:n],
    )


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
        """Function Vectors' CIE: gain in P(target) from the head's mean (clean) output at the corrupted last token."""
        mean = self.reference_mean([(l, 0) for l in self.layers], meter).values
        runner = self.runner("corrupt", [self.data.patch_corrupt], meter)
        base = _target_prob(runner, [])
        out = fx.empty_scores(self.model)
        for layer in self.layers:
            for head in range(self.model.cfg.n_heads):
                hook = (
                    f"blocks.{layer}.attn.hook_z",
                    lambda z, hook, h=head, v=mean[layer][0, head]: _set_last(z, h, v),
                )
                out[layer, head] = float((_target_prob(runner, [hook]) - base).mean())
        meter.merge(runner.meter)
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

    def necessity(self, meter: CostMeter) -> dict[str, Tensor]:
        fast = self.iv.positions == "last"  # the prefix cache recomputes the last token only
        runner = LayerRunner(
            self.model, self.data.zero, min(self.iv.layers), fast, _unit_meter(self.model, self.data.zero)
        )
        out = fx.necessity(runner, self.model, self.iv)
        meter.merge(runner.meter)
        return out

    def random_control(self, meter: CostMeter, n_random: int, seed: int) -> pd.DataFrame:
        """Mean-ablate the selected heads together vs ``n_random`` random sets of as many heads (k-shot prompts)."""
        selected = [h for h in self.iv.selected_heads() if h[0] in self.layers]
        if not selected:
            return pd.DataFrame(columns=["set", "heads", "acc_drop", "logprob_drop"])
        mean = self.reference_mean([(l, 0) for l in self.layers], meter)
        runner = self.runner("clean", self.data.clean, meter)
        base_acc, base_lp = fx.runner_scores(runner, [])
        pool = [(l, h) for l in self.layers for h in range(self.model.cfg.n_heads)]
        rng = random.Random(seed)
        rows = []
        for name, heads in [("selected", selected)] + [
            (f"random {i}", rng.sample(pool, len(selected))) for i in range(n_random)
        ]:
            acc, lp = fx.runner_scores(runner, _mean_ablation(mean, heads).fwd_hooks())
            rows.append(
                {
                    "set": name,
                    "heads": ",".join(f"L{l}H{h}" for l, h in sorted(heads)),
                    "acc_drop": base_acc - acc,
                    "logprob_drop": base_lp - lp,
                }
            )
        meter.merge(runner.meter)
        table = pd.DataFrame(rows)
        table.attrs["percentile"] = float((table.logprob_drop.iloc[1:] < table.logprob_drop.iloc[0]).mean() * 100)
        return table


def _mean_ablation(mean: HeadAblation, heads: list[tuple[int, int]]) -> HeadAblation:
    return HeadAblation(
        heads, "mean", mean.model_name, mean.fingerprint, {l: mean.values[l] for l in {l for l, _ in heads}}
    )


def _unit_meter(model: TransformerBridge, zero_shot: list[Batch]) -> CostMeter:
    meter = CostMeter()
    for batch in zero_shot:
        meter.register_prompts(batch, model.cfg.n_layers)
    return meter


@torch.no_grad()
def _target_prob(runner: LayerRunner, hooks: list) -> Tensor:
    batch = runner.batches[0]
    return torch.softmax(runner.logits(0, hooks).float(), -1).gather(1, batch.target_ids[:, None])[:, 0]


def _set_last(z: Tensor, head: int, value: Tensor) -> Tensor:
    out = z.clone()
    out[:, -1, head] = value.to(z)
    return out


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


def summarise(table: pd.DataFrame, seed: int = 0, n_permutations: int = 2000) -> pd.DataFrame:
    """Per score: Spearman ρ with ‖Δ_h‖ (permutation p), and precision@k / Jaccard of its top-k vs the selected heads.

    ρ is reported over every scored head and over the intervened layers only (where ‖Δ_h‖ can
    be non-zero); k is the number of selected heads.
    """
    rows = []
    selected = set(map(tuple, table.loc[table.selected, ["layer", "head"]].itertuples(index=False)))
    k = len(selected)
    intervened = table.layer.isin(table.loc[table.norm > 0, "layer"].unique()) if k else table.layer < 0
    for column in RANKED:
        if column not in table:
            continue
        scored = table[table[column].notna()]
        row: dict[str, Any] = {"score": column}
        for scope, part in (("all", scored), ("layer", scored[intervened.loc[scored.index]])):
            rho, p = spearman_permutation(part.norm.to_numpy(), part[column].to_numpy(), seed, n_permutations)
            row[f"rho_{scope}"], row[f"p_{scope}"] = rho, p
        top = set(map(tuple, scored.nlargest(k, column)[["layer", "head"]].itertuples(index=False))) if k else set()
        row["precision_at_k"] = len(top & selected) / k if k else float("nan")
        row["jaccard"] = len(top & selected) / len(top | selected) if k else float("nan")
        row["k"] = k
        rows.append(row)
    return pd.DataFrame(rows)


def agreement(reference: Tensor, estimate: Tensor, seed: int = 0) -> dict[str, float]:
    """How well ``estimate`` (e.g. attribution patching) tracks ``reference`` (activation patching) over scored heads."""
    both = torch.isfinite(reference) & torch.isfinite(estimate)
    x, y = reference[both].numpy(), estimate[both].numpy()
    rho, p = spearman_permutation(x, y, seed)
    signs = float(np.mean(np.sign(x) == np.sign(y))) if len(x) else float("nan")
    return {"rho": rho, "p": p, "sign_agreement": signs}


def spearman_permutation(x: np.ndarray, y: np.ndarray, seed: int = 0, n: int = 2000) -> tuple[float, float]:
    """Spearman ρ and a two-sided permutation p-value (NaN when either side is constant).

    Example:
        >>> import numpy as np
        >>> from lens_laai.analysis.head_table import spearman_permutation
        >>> rho, p = spearman_permutation(np.arange(10.0), np.arange(10.0) ** 2)
        >>> round(rho, 3), p < 0.01
        (1.0, True)
    """
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    null = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(n)])
    return rho, float((np.sum(np.abs(null) >= abs(rho) - 1e-12) + 1) / (n + 1))


def _ranks(values: np.ndarray) -> np.ndarray:
    return pd.Series(values).rank(method="average").to_numpy()
