"""Function Vectors (Todd et al., ICLR 2024), adapted to the lens_laai harness.

1. :func:`mean_head_activations`: each head's mean ``hook_z`` at the last token of clean k-shot
   prompts built from the train split.
2. :func:`causal_indirect_effect`: on k-shot prompts whose demonstration outputs are permuted
   among the demonstrations (the mapping is broken, :func:`deranged_prompts`), replace one head's
   ``z`` at the last token by its mean and measure the gain in probability of the target's first
   token (:func:`indirect_effects`; the head analysis calls the same function).
3. :func:`function_vector`: the sum over the top-k heads of their mean outputs as written to the
   residual stream (:func:`head_outputs`: through ``W_O``, and the post-attention norm where the
   block has one; the output bias is left out).
4. :func:`fit_function_vector`: add the vector to the hidden state *output* of layer ℓ
   (``blocks.ℓ.hook_resid_post``) at the last token of zero-shot prompts, ℓ chosen on validation.

Patching and the layer sweep use the last-token fast path (:class:`lens_laai.fastpath.LayerRunner`),
which falls back to full forwards where it is unsupported.
"""

from __future__ import annotations

import operator
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.baselines.common import (
    check_shots,
    count_forward,
    runner_for,
    unit_meter,
)
from lens_laai.errors import FitError
from lens_laai.fastpath import CostMeter
from lens_laai.fastpath.recording import last_token_z
from lens_laai.interventions.residual import ResidualIntervention
from lens_laai.models.bridge import hook_name, model_fingerprint, model_name
from lens_laai.models.head_write import head_writes
from lens_laai.tasks.prompts import (
    Batch,
    PromptTemplate,
    k_shot_prompts,
    make_batch,
    model_batches,
)
from lens_laai.tasks.provenance import fit_metadata
from lens_laai.tasks.task import Pair, Task, TaskError, TaskSplits


def candidate_layers(model: TransformerBridge, layers: Sequence[int] | None) -> list[int]:
    """``layers`` checked against the model (default: all layers), sorted and de-duplicated.

    Example:
        >>> from lens_laai.testing import tiny_model
        >>> candidate_layers(tiny_model(), None), candidate_layers(tiny_model(), [2, 1, 2])
        ([0, 1, 2], [1, 2])
    """
    n = model.cfg.n_layers
    try:
        chosen = list(range(n)) if layers is None else sorted({operator.index(l) for l in layers})
    except TypeError:  # not a list, or not integers
        chosen = []
    if not chosen or any(not 0 <= l < n for l in chosen):
        raise FitError(f"layers must be layer indices within 0..{n - 1}, got {layers!r}; pass some, or None for all.")
    return chosen


@torch.no_grad()
def mean_head_activations(
    model: TransformerBridge, prompts_batches: list[Batch], layers: Sequence[int] | None = None
) -> Float[Tensor, "layer head d_head"]:
    """Mean ``hook_z`` at the last token over the prompts; layers not in ``layers`` are NaN.

    Example:
        >>> from lens_laai.tasks.prompts import k_shot_prompts, model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train = tiny_model(), tiny_task().split(0, 8).train
        >>> batches = model_batches(model, *k_shot_prompts(train, 3, train, 0))
        >>> acts = mean_head_activations(model, batches, layers=[1, 2])
        >>> acts.shape, bool(acts[0].isnan().all()), bool(acts[1:].isfinite().all())
        (torch.Size([3, 4, 16]), True, True)
    """
    layers = candidate_layers(model, layers)
    cfg = model.cfg
    out = torch.full((cfg.n_layers, cfg.n_heads, cfg.d_head), float("nan"))
    out[layers] = last_token_z(model, prompts_batches, layers).float().mean(0).cpu()
    return out


def deranged_prompts(
    queries: Sequence[Pair],
    pool: Sequence[Pair],
    shots: int,
    rng: random.Random | int,
    template: PromptTemplate = PromptTemplate(),
) -> tuple[list[str], list[str], list[str]]:
    """Per query: ``(clean, corrupt, target)``, a k-shot prompt and its twin whose demo outputs are deranged.

    The demonstrations are ``shots`` pairs of ``pool`` other than the query; in the corrupted
    twin no demonstration keeps its own output (Function Vectors' shuffled-label prompts), so
    both have the same words and, usually, the same token length.

    Example:
        >>> pool = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow")]
        >>> clean, corrupt, targets = deranged_prompts([("old", "new")], pool, 2, rng=0)
        >>> clean[0].split("\\n\\n"), corrupt[0].split("\\n\\n")[:2]  # the corrupt demos swap their outputs
        (['Q: fast\\nA: slow', 'Q: up\\nA: down', 'Q: old\\nA:'], ['Q: fast\\nA: down', 'Q: up\\nA: slow'])
        >>> targets
        [' new']
    """
    rng = random.Random(rng) if isinstance(rng, int) else rng
    clean, corrupt, targets = [], [], []
    for x, y in queries:
        candidates = [p for p in pool if p[0] != x]
        if len(candidates) < shots:
            raise TaskError(
                f"{shots}-shot prompts need {shots} demonstrations other than the query {x!r}; the pool "
                f"has {len(candidates)}. Use fewer shots."
            )
        demos = rng.sample(candidates, shots)
        perm = list(range(shots))
        while any(i == j for i, j in enumerate(perm)):
            rng.shuffle(perm)
        clean.append(template.render(x, demos))
        corrupt.append(template.render(x, [(demos[i][0], demos[perm[i]][1]) for i in range(shots)]))
        targets.append(template.target(y))
    return clean, corrupt, targets


def shuffled_label_batch(
    model: TransformerBridge,
    task: Task,
    n_prompts: int,
    shots: int,
    seed: int,
    template: PromptTemplate = PromptTemplate(),
) -> Batch:
    """``n_prompts`` k-shot prompts from ``task`` whose demo outputs are deranged among the demos.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train = tiny_model(), tiny_task().split(0, 8).train
        >>> batch = shuffled_label_batch(model, train, n_prompts=5, shots=3, seed=0)
        >>> len(batch), batch.input_ids.shape[0] == batch.target_ids.shape[0]
        (5, True)
    """
    if shots < 2 or shots > len(task) - 1:
        raise TaskError(f"Shuffled-label prompts need 2 ≤ shots ≤ {len(task) - 1} (train pairs - 1), got {shots}.")
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n_prompts:
        order += rng.sample(range(len(task)), len(task))
    _, corrupt, targets = deranged_prompts([task.pairs[i] for i in order[:n_prompts]], task.pairs, shots, rng, template)
    return make_batch(model.tokenizer, corrupt, targets, template.prepend_bos, model.cfg.n_ctx)


@torch.no_grad()
def causal_indirect_effect(
    model: TransformerBridge,
    splits: TaskSplits,
    mean_acts: Float[Tensor, "layer head d_head"],
    n_prompts: int = 16,
    shots: int = 10,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    *,
    template: PromptTemplate = PromptTemplate(),
    meter: CostMeter | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Columns ``layer, head, cie``: mean gain in P(target's first token) from patching the head's mean.

    The prompts are ``n_prompts`` shuffled-label prompts of the training split
    (:func:`shuffled_label_batch`); see :func:`indirect_effects` for the rest.

    Example:
        >>> from lens_laai.tasks.prompts import k_shot_prompts, model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, splits = tiny_model(), tiny_task().split(0, 8, 4)
        >>> batches = model_batches(model, *k_shot_prompts(splits.train, 3, splits.train, 0))
        >>> acts = mean_head_activations(model, batches, layers=[1, 2])
        >>> cie = causal_indirect_effect(model, splits, acts, n_prompts=4, shots=3, layers=[1, 2], progress=False)
        >>> list(cie.columns), len(cie), cie.attrs["forward_equivalents"] > 0
        (['layer', 'head', 'cie'], 8, True)
    """
    layers = candidate_layers(model, layers)
    if n_prompts < 1:
        raise FitError(f"n_prompts must be ≥ 1, got {n_prompts}; pass how many shuffled-label prompts to average.")
    own = unit_meter(model, splits.train, template)
    batch = shuffled_label_batch(model, splits.train, n_prompts, shots, seed, template)
    table = indirect_effects(model, batch, mean_acts, layers, meter=own, progress=progress)
    table.attrs["forward_equivalents"] = own.forward_equivalents()
    if meter is not None:
        meter.merge(own)
    return table


@torch.no_grad()
def indirect_effects(
    model: TransformerBridge,
    batch: Batch,
    mean_acts: Float[Tensor, "layer head d_head"],
    layers: Sequence[int],
    *,
    meter: CostMeter | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Function Vectors' causal indirect effect of every head of ``layers`` on the (corrupted) prompts ``batch``.

    Per head: replace its ``z`` at the last token by ``mean_acts[layer, head]`` and take the mean
    gain in P(target's first token). All prompts go through one last-token forward per head.
    ``df.attrs`` holds ``forward_passes`` and ``fast_path``; the compute is charged to ``meter``.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train = tiny_model(), tiny_task().split(0, 8).train
        >>> batch = shuffled_label_batch(model, train, n_prompts=4, shots=3, seed=0)
        >>> zero = torch.zeros(3, 4, 16)  # patch each head's last-token z to zero
        >>> table = indirect_effects(model, batch, zero, [2], progress=False)
        >>> table.shape, table.attrs["forward_passes"], bool(table.cie.abs().max() > 0)
        ((4, 3), 6, True)
    """
    layers = candidate_layers(model, layers)
    missing = [l for l in layers if not torch.isfinite(mean_acts[l]).all()]
    if missing:
        raise FitError(
            f"mean_acts has no values for layers {missing}; compute it with mean_head_activations(..., layers=...) "
            "including them, or score only the layers it covers."
        )
    runner = runner_for(model, [batch], layers[0])
    base = target_probs(runner.logits(0, []), batch.target_ids)
    rows = []
    for layer, head in tqdm(list(product(layers, range(model.cfg.n_heads))), desc="CIE", disable=not progress):
        hooks = [(hook_name(layer), _patcher(head, mean_acts[layer, head]))]
        probs = target_probs(runner.logits(0, hooks), batch.target_ids)
        rows.append({"layer": layer, "head": head, "cie": float((probs - base).mean())})
    if meter is not None:
        meter.merge(runner.meter)
    table = pd.DataFrame(rows, columns=["layer", "head", "cie"])
    table.attrs.update(forward_passes=len(rows) + 2, fast_path=runner.is_fast)
    return table


def head_outputs(
    model: TransformerBridge, layer: int, z: Float[Tensor, "... head d_head"]
) -> Float[Tensor, "... head d_model"]:
    """Each head's contribution to the residual stream: what the block's write loses without that head's ``z``.

    Runs the block's own attention-output path (:func:`lens_laai.models.head_write.head_writes`):
    ``z_h @ W_O[h]`` where that path is linear, the exact difference where a post-attention norm
    (Gemma 2 and 3) normalises the attention output before the residual add.

    Example:
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> z = torch.randn(5, 4, 16)
        >>> writes = head_outputs(model, 1, z)
        >>> writes.shape, torch.allclose(writes[:, 2], z[:, 2] @ model.blocks[1].attn.W_O[2], atol=1e-5)
        (torch.Size([5, 4, 64]), True)
    """
    return head_writes(model, layer, z.float())


def top_heads(cie: pd.DataFrame, top_k: int) -> list[tuple[int, int]]:
    """The ``top_k`` (layer, head) pairs with the largest CIE (ties: lower layer, then head).

    Example:
        >>> cie = pd.DataFrame({"layer": [1, 1, 2, 2], "head": [0, 1, 0, 1], "cie": [0.1, 0.3, 0.3, -0.2]})
        >>> top_heads(cie, 2)  # ties go to the lower layer
        [(1, 1), (2, 0)]
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(cie):
        raise FitError(f"top_k must be an integer within 1..{len(cie)} (the heads scored), got {top_k!r}; pick one.")
    ranked = cie.sort_values(["cie", "layer", "head"], ascending=[False, True, True], kind="mergesort")
    return [(int(l), int(h)) for l, h in ranked[["layer", "head"]].head(top_k).itertuples(index=False)]


@torch.no_grad()
def function_vector(
    model: TransformerBridge, mean_acts: Float[Tensor, "layer head d_head"], cie: pd.DataFrame, top_k: int = 10
) -> Float[Tensor, " d_model"]:
    """Sum over the ``top_k`` heads by CIE of each head's mean output in the residual stream.

    Example:
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> acts = torch.randn(3, 4, 16)
        >>> cie = pd.DataFrame({"layer": [2, 2, 2, 2], "head": [0, 1, 2, 3], "cie": [0.1, 0.5, 0.0, 0.4]})
        >>> vector = function_vector(model, acts, cie, top_k=2)  # heads 2.1 and 2.3
        >>> torch.allclose(vector, head_outputs(model, 2, acts[2])[[1, 3]].sum(0), atol=1e-5), vector.shape
        (True, torch.Size([64]))
    """
    vector = torch.zeros(model.cfg.d_model)
    for layer, head in top_heads(cie, top_k):
        vector += head_outputs(model, layer, mean_acts[layer])[head].float().cpu()
    return vector


@dataclass
class FunctionVectorResult:
    """The best function-vector intervention, its add-layer sweep and what it cost.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, splits = tiny_model(), tiny_task().split(0, 8, 4)
        >>> result = fit_function_vector(model, splits, top_k=2, shots=3, n_prompts=4, progress=False)
        >>> len(result.heads), result.intervention.layer == result.layer, list(result.cie.columns)
        (2, True, ['layer', 'head', 'cie'])
    """

    intervention: ResidualIntervention
    layer: int
    scale: float
    valid_accuracy: float
    heads: list[tuple[int, int]]
    sweep: pd.DataFrame
    cie: pd.DataFrame
    mean_acts: Tensor
    seconds: float
    forward_equivalents: float
    fast_path: bool


def fit_function_vector(
    model: TransformerBridge,
    splits: TaskSplits,
    top_k: int = 10,
    layers: Sequence[int] | None = None,
    *,
    shots: int = 10,
    cie_layers: Sequence[int] | None = None,
    n_prompts: int = 16,
    scales: Sequence[float] = (1.0,),
    seed: int = 0,
    template: PromptTemplate = PromptTemplate(),
    batch_size: int = 32,
    progress: bool = True,
) -> FunctionVectorResult:
    """Mean activations, CIE, the vector, then the add-layer (from ``layers``, default all) on validation.

    With an empty validation split the add-layer and scale are chosen on the training pairs'
    zero-shot prompts instead: the vector is built from k-shot prompts and never fitted to those
    targets, so this uses no labelled data beyond ``n_train`` (the honest protocol).

    ``cie_layers`` restricts the heads scored (default all layers). The sweep scores zero-shot
    validation prompts with ``scale × vector`` at their last token for every layer and scale
    (default ``(1.0,)``, the paper's unscaled vector); ties go to the lower cross-entropy.

    Example:
        >>> from lens_laai import evaluate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, splits = tiny_model(), tiny_task().split(0, 8, 4)
        >>> result = fit_function_vector(model, splits, top_k=2, shots=3, n_prompts=4, scales=(1, 2), progress=False)
        >>> result.scale in (1, 2), len(result.sweep) == 3 * 2  # every layer and scale tried on validation
        (True, True)
        >>> 0 <= evaluate(model, splits, result.intervention).accuracy <= 1
        True
    """
    start = time.perf_counter()
    check_shots(splits, shots)
    if not scales or any(not isinstance(a, (int, float)) or a <= 0 for a in scales):
        raise FitError(f"scales must be a non-empty list of positive numbers, got {scales!r}; the paper's is (1.0,).")
    add_layers, cie_layers = candidate_layers(model, layers), candidate_layers(model, cie_layers)
    meter = unit_meter(model, splits.train, template)
    clean = model_batches(
        model, *k_shot_prompts(splits.train, shots, splits.train, seed, template), batch_size, template
    )
    mean_acts = mean_head_activations(model, clean, cie_layers)
    count_forward(meter, clean, model.cfg.n_layers)
    cie = causal_indirect_effect(
        model, splits, mean_acts, n_prompts, shots, seed, cie_layers, template=template, meter=meter, progress=progress
    )
    vector = function_vector(model, mean_acts, cie, top_k)
    chooser = splits.valid if len(splits.valid) else splits.train
    valid = model_batches(model, *k_shot_prompts(chooser, 0, None, seed, template), batch_size, template)
    runner = runner_for(model, valid, add_layers[0])
    fp, name = model_fingerprint(model), model_name(model)
    rows, best = [], None
    for layer in tqdm(add_layers, desc="FV layers", disable=not progress):
        for scale in scales:
            acc, ce = runner.scores(ResidualIntervention(float(scale) * vector, layer, name, fp).fwd_hooks())
            rows.append({"layer": layer, "scale": float(scale), "valid_accuracy": acc, "valid_ce": ce})
            if best is None or (acc, -ce) > best[0]:
                best = ((acc, -ce), layer, float(scale))
    meter.merge(runner.meter)
    assert best is not None, "add_layers and scales are checked non-empty above"
    (valid_acc, _), layer, scale = best
    heads = top_heads(cie, top_k)
    config = {
        "method": "function_vector",
        "seed": splits.seed,
        "n_train": len(splits.train),
        "n_valid": len(splits.valid),
        "n_test": len(splits.test),
        "shots": shots,
        "top_k": top_k,
        "n_prompts": n_prompts,
        "prompt_seed": seed,
        "scales": [float(a) for a in scales],
        "layers": add_layers,
        "cie_layers": cie_layers,
    }
    metadata = fit_metadata(
        splits, None, template, config, heads=[list(h) for h in heads], scale=scale, valid_accuracy=valid_acc
    )
    return FunctionVectorResult(
        ResidualIntervention(scale * vector, layer, name, fp, "last", metadata),
        layer,
        scale,
        valid_acc,
        heads,
        pd.DataFrame(rows),
        cie,
        mean_acts,
        time.perf_counter() - start,
        meter.forward_equivalents(),
        bool(cie.attrs["fast_path"] and runner.is_fast),
    )


def _patcher(head: int, value: Tensor) -> Callable:
    def hook(z: Tensor, hook: Any) -> Tensor:
        out = z.clone()
        out[:, -1, head] = value.to(dtype=z.dtype, device=z.device)
        return out

    return hook


def target_probs(logits: Float[Tensor, "batch vocab"], target_ids: Tensor) -> Float[Tensor, " batch"]:
    """P(target's first token) per row of last-position ``logits``.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0], [0.0, 100.0]])
        >>> target_probs(logits, torch.tensor([1, 1]))
        tensor([0.5000, 1.0000])
    """
    return torch.softmax(logits.float(), dim=-1).gather(1, target_ids[:, None].to(logits.device))[:, 0]
