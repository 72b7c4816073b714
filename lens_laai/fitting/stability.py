"""Stability selection of heads: how often each head is selected when the fit sees half the pairs.

One fit on 20 pairs gives one head set; another 20 pairs could give another. :func:`stability`
refits the λ₂ path on complementary pairs of half-samples (Shah & Samworth 2013: each random half
and the other half) and reports each head's *selection probability*: the fraction of half-sample
fits that keep it, maximised over the path's region Λ from λ_max down to a λ₂ (Meinshausen &
Bühlmann 2010). Heads at or above a threshold π form the stable set; under Meinshausen and
Bühlmann's exchangeability conditions the expected number of heads falsely in it is at most
``q² / ((2π − 1) p)``, with ``q`` the mean number of heads a half-sample fit selects over Λ and
``p`` the heads at the layer (Shah & Samworth's Theorem 1 gives the same bound for complementary
pairs, with the probabilities of the half-sample fits).

Cost: all N half-sample fits run as **one** batched fit: one Δ per subsample, stacked, each added to
its own rows of one batch that repeats the training prompts, so the frozen model runs once per
proximal step for all of them and the prefix cache of the n prompts is built once and shared.
``benchmarks/stability_cost.py`` measures it against one default fit.

Example:
    >>> from lens_laai.fitting.stability import stability
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> st = stability(tiny_model(), tiny_task(), layer=1, n_train=8, n_subsamples=4, steps=2, progress=False)
    >>> st.scores.shape, list(st.table.columns)
    (torch.Size([3, 4]), ['layer', 'head', 'selection_probability'])
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import FitError
from lens_laai.fastpath import CostMeter, LayerRunner
from lens_laai.fitting.config import DEFAULT_GROUP_L1_REL, FitConfig, auto_layer, prepare_data
from lens_laai.fitting.layer_fit import training_batches
from lens_laai.fitting.solver import fista
from lens_laai.interventions.head import delta_hook
from lens_laai.models.bridge import hook_name
from lens_laai.tasks.prompts import PromptTemplate


@dataclass
class Stability:
    """Selection probabilities of the heads at one layer, and the error bound of the stable set.

    ``table``: ``layer, head, selection_probability`` (max over Λ), most stable first. ``scores``:
    the same as an ``[n_layers, n_heads]`` tensor, NaN outside the fitted layer (as
    ``transformer_lens.patching`` lays out scores). ``path``: one row per λ₂ of Λ and head with the
    probability at that λ₂. ``q``: mean heads selected per subsample over Λ; ``error_bound``:
    ``q² / ((2·threshold − 1)·n_heads)``, the bound on the expected number of falsely stable heads.

    Example (4 half-samples of 8 pairs at layer 1 of the tiny model):
        >>> from lens_laai.fitting.stability import stability
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> st = stability(tiny_model(), tiny_task(), layer=1, n_train=8, n_subsamples=4, steps=2, progress=False)
        >>> st.layer, st.n_subsamples, st.threshold, tuple(st.scores.shape), list(st.path.columns)
        (1, 4, 0.75, (3, 4), ['group_l1_rel', 'head', 'selection_probability'])
        >>> probs = st.table.selection_probability
        >>> probs.is_monotonic_decreasing, set((probs * 4).tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}  # k of 4 fits
        (True, True)
        >>> st.stable_heads() == [(1, int(r.head)) for r in st.table.itertuples() if r.selection_probability >= 0.75]
        True
        >>> st.error_bound == st.q**2 / ((2 * st.threshold - 1) * 4), sorted(st.summary())[:4]
        (True, ['error_bound', 'group_l1_rel', 'heads', 'n_subsamples'])
    """

    layer: int
    table: pd.DataFrame
    scores: Tensor
    path: pd.DataFrame
    n_subsamples: int
    threshold: float
    lam: float
    q: float
    error_bound: float
    seconds: float
    forward_equivalents: float

    def stable_heads(self, threshold: float | None = None) -> list[tuple[int, int]]:
        """(layer, head) of every head selected with probability ≥ ``threshold`` (default: the fit's)."""
        t = self.threshold if threshold is None else threshold
        return [(int(r.layer), int(r.head)) for r in self.table.itertuples() if r.selection_probability >= t]

    def summary(self, selected: Sequence[tuple[int, int]] = ()) -> dict[str, Any]:
        """JSON-ready: probabilities, the stable set, the bound, and (given ``selected``) the fit's heads' probabilities."""
        probs = {(int(r.layer), int(r.head)): float(r.selection_probability) for r in self.table.itertuples()}
        return {
            "n_subsamples": self.n_subsamples,
            "threshold": self.threshold,
            "group_l1_rel": self.lam,
            "heads": [{"layer": l, "head": h, "selection_probability": p} for (l, h), p in probs.items()],
            "stable_heads": [f"L{l}H{h}" for l, h in self.stable_heads()],
            "selected_heads_probability": {f"L{l}H{h}": probs.get((l, h)) for l, h in selected},
            "q": self.q,
            "error_bound": self.error_bound,
            "seconds": round(self.seconds, 2),
        }

    def heatmap(self, ax: Any = None, title: str | None = None) -> Any:
        """The ``[n_layers, n_heads]`` selection probabilities as a heatmap (blank outside the layer); a Figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        else:
            fig = ax.figure
        image = ax.imshow(self.scores.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        for r in self.table.itertuples():
            if r.selection_probability >= self.threshold:
                ax.text(r.head, r.layer, f"{r.selection_probability:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(
            title or f"Selection probability ({self.n_subsamples} half-samples; E[false] ≤ {self.error_bound:.2f})"
        )
        fig.colorbar(image, ax=ax, label="selection probability")
        fig.tight_layout()
        return fig


def complementary_pairs(n: int, n_subsamples: int, seed: int) -> list[list[int]]:
    """``n_subsamples`` index sets of size ``n // 2``: random halves and their complements, pair by pair.

    Example:
        >>> from lens_laai.fitting.stability import complementary_pairs
        >>> halves = complementary_pairs(6, 4, seed=0)
        >>> [len(h) for h in halves], sorted(halves[0] + halves[1]), sorted(halves[2] + halves[3])
        ([3, 3, 3, 3], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])
        >>> complementary_pairs(6, 3, seed=0)
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: n_subsamples must be an even number ≥ 2 (complementary pairs), got 3.
    """
    if n_subsamples < 2 or n_subsamples % 2:
        raise FitError(f"n_subsamples must be an even number ≥ 2 (complementary pairs), got {n_subsamples!r}.")
    if n < 2:
        raise FitError(f"stability needs n_train ≥ 2 to halve the pairs, got {n}.")
    rng, half, out = random.Random(f"cpss:{seed}"), n // 2, []
    for _ in range(n_subsamples // 2):
        order = list(range(n))
        rng.shuffle(order)
        out += [sorted(order[:half]), sorted(order[half : 2 * half])]
    return out


def stability(
    model: TransformerBridge,
    task: Any,
    layer: int | str = "auto",
    *,
    n_subsamples: int = 50,
    group_l1_rel: Sequence[float] | None = None,
    lam: float | None = None,
    threshold: float = 0.75,
    max_false: float = 1.0,
    l1: float | None = None,
    steps: int | None = None,
    n_train: int | None = None,
    seed: int | None = None,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> Stability:
    """Selection probability of every head at ``layer`` over ``n_subsamples`` complementary half-samples.

    The default λ₂ path (relative to each subsample's own λ_max) is fitted on every half-sample at
    once. Λ runs from the path's first λ₂ down to ``lam`` (a fraction of λ_max, e.g. the one
    :func:`lens_laai.fit` chose: ``result.config.group_l1``); without ``lam``, down to the smallest
    λ₂ at which the error bound at ``threshold`` is at most ``max_false`` heads. Task arguments are
    those of :func:`lens_laai.fit`.

    Example (Λ from 0.9 down to 0.5 of λ_max: two points of the path, 4 half-samples):
        >>> from lens_laai.fitting.stability import stability
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> st = stability(tiny_model(), tiny_task(), layer=1, n_train=8, n_subsamples=4, group_l1_rel=[0.9, 0.5, 0.1],
        ...                lam=0.5, steps=2, progress=False)
        >>> st.lam, st.path.group_l1_rel.unique().tolist(), len(st.table), bool(st.table.selection_probability.between(0, 1).all())
        (0.5, [0.9, 0.5], 4, True)
        >>> stability(tiny_model(), tiny_task(), layer=1, threshold=0.5, progress=False)
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: threshold must be in (0.5, 1], got 0.5: the bound needs π > 1/2.
    """

    if not 0.5 < threshold <= 1:
        raise FitError(f"threshold must be in (0.5, 1], got {threshold!r}: the bound needs π > 1/2.")
    splits, _, template = prepare_data(task, template, n_train, None, None, seed)
    layer = auto_layer(model.cfg.n_layers) if layer == "auto" else layer
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < model.cfg.n_layers:
        raise FitError(f"stability() fits one layer: give a layer index in 0..{model.cfg.n_layers - 1} or 'auto'.")
    path = sorted(DEFAULT_GROUP_L1_REL if group_l1_rel is None else [float(x) for x in group_l1_rel], reverse=True)
    cfg = FitConfig(
        layer=layer,
        l1=FitConfig.l1 if l1 is None else l1,
        steps=FitConfig.steps if steps is None else steps,
        seed=splits.seed,
        batch_size=max(len(splits.train), 1),
    )
    for value in path:
        replace(cfg, group_l1=value).validate(model.cfg.n_layers)
    subsets = complementary_pairs(len(splits.train), n_subsamples, splits.seed)
    start, meter = time.perf_counter(), CostMeter()
    runner = _stacked_runner(model, splits.train, subsets, layer, cfg, template, meter)
    selected = _batched_path(runner, subsets, model.cfg.n_heads, path, cfg, lam, progress)
    return _summarise(model, layer, path, selected, lam, threshold, max_false, n_subsamples, start, meter)


def _stacked_runner(model, train, subsets, layer, cfg, template, meter) -> LayerRunner:
    """A runner over one batch holding every subsample's rows, its prefix cache cut from the n prompts' own."""
    (batch,) = training_batches(model, train, train, cfg, template)
    rows = torch.tensor([i for subset in subsets for i in subset])
    base = LayerRunner(model, [batch], layer, cfg.fast, meter)
    stacked = _take_rows(batch, rows, len(batch))
    runner = copy.copy(base)
    runner.batches = [stacked]
    if base.caches[0] is None:  # no fast path on this model: the full forward of every stacked row
        runner.caches = [None]
    else:
        runner.caches = [_take_rows(base.caches[0], rows, len(batch))]
    return runner


def _take_rows(obj: Any, rows: Tensor, n: int) -> Any:
    """``obj`` with every per-row tensor or list (leading size ``n``) indexed by ``rows``; the rest shared."""
    if isinstance(obj, Tensor):
        return obj[rows.to(obj.device)] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, list):
        return [obj[i] for i in rows.tolist()] if len(obj) == n else obj
    if isinstance(obj, tuple):
        return tuple(_take_rows(v, rows, n) for v in obj)
    if isinstance(obj, dict):
        return {k: _take_rows(v, rows, n) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        skip = {"model", "kernel", "hook_points"}
        changes = {
            f.name: _take_rows(getattr(obj, f.name), rows, n) for f in dataclasses.fields(obj) if f.name not in skip
        }
        return replace(obj, **changes)
    if hasattr(obj, "keys") and hasattr(obj, "values") and isinstance(getattr(obj, "keys", None), dict):
        clone = copy.copy(obj)  # the frozen KV prefix: {layer: [batch, kv_heads, pos, d_head]}
        clone.keys, clone.values = _take_rows(obj.keys, rows, n), _take_rows(obj.values, rows, n)
        return clone
    return obj


def _batched_path(runner, subsets, n_heads, path, cfg, lam, progress) -> list[np.ndarray]:
    """Fit the path on every subsample at once; per λ₂ a ``[n_subsamples, n_heads]`` boolean selection."""
    n_sub, m = len(subsets), len(subsets[0])
    owner = torch.tensor([s for s, subset in enumerate(subsets) for _ in subset])
    name = hook_name(runner.layer)
    d_head = runner.model.cfg.d_head

    def loss(delta: Tensor, backward: bool) -> Tensor:
        rows = delta.view(n_sub, n_heads, d_head)[owner.to(delta.device)]
        return runner.cross_entropy(0, [(name, delta_hook(rows))], backward) / m  # Σ over subsamples of their means

    def smooth_and_grad(y: Tensor) -> tuple[float, Tensor]:
        y = y.detach().requires_grad_(True)
        value = loss(y, True)
        (grad,) = torch.autograd.grad(value, y)
        return float(value.detach()), grad

    def smooth(x: Tensor) -> float:
        with torch.no_grad():
            return float(loss(x, False))

    delta = torch.zeros(n_sub * n_heads, d_head, device=runner.delta_device)
    _, grad = smooth_and_grad(delta)
    soft = torch.sign(grad) * torch.clamp(grad.abs() - cfg.l1, min=0.0)
    lam_max = soft.norm(dim=-1).view(n_sub, n_heads).max(dim=1).values  # each subsample's own λ_max
    if not bool(torch.isfinite(lam_max).all()) or not bool((lam_max > 0).all()):
        raise FitError("λ_max of a subsample is zero or not finite; use a smaller l1.")
    selected = []
    for value in tqdm(path, desc=f"stability ({n_sub} half-samples)", disable=not progress):
        weights = (value * lam_max).repeat_interleave(n_heads)[:, None]
        delta, _ = fista(smooth_and_grad, smooth, delta, cfg.l1, weights, cfg.steps, cfg.lr)
        selected.append((delta.norm(dim=-1) > 0).view(n_sub, n_heads).cpu().numpy())
        if lam is not None and value <= lam + 1e-12:
            break
    return selected


def _summarise(model, layer, path, selected, lam, threshold, max_false, n_sub, start, meter) -> Stability:
    n_heads = model.cfg.n_heads
    per_lambda = np.stack([s.mean(axis=0) for s in selected])  # [λ, head]
    union = np.logical_or.accumulate(np.stack(selected), axis=0)  # selected anywhere in Λ down to each λ
    q = union.sum(axis=2).mean(axis=1)  # [λ]
    bound = q**2 / ((2 * threshold - 1) * n_heads)
    if lam is not None:
        end = len(selected) - 1
    else:
        ok = [i for i in range(len(selected)) if bound[i] <= max_false]
        end = ok[-1] if ok else 0
    probs = per_lambda[: end + 1].max(axis=0)
    scores = torch.full((model.cfg.n_layers, n_heads), math.nan)
    scores[layer] = torch.tensor(probs, dtype=torch.float32)
    table = pd.DataFrame({"layer": layer, "head": range(n_heads), "selection_probability": probs})
    table = table.sort_values("selection_probability", ascending=False, kind="stable").reset_index(drop=True)
    rows = [
        {"group_l1_rel": path[i], "head": h, "selection_probability": float(per_lambda[i, h])}
        for i in range(len(selected))
        for h in range(n_heads)
    ]
    return Stability(
        layer,
        table,
        scores,
        pd.DataFrame(rows),
        n_sub,
        threshold,
        float(path[end]),
        float(q[end]),
        float(bound[end]),
        time.perf_counter() - start,
        meter.forward_equivalents(),
    )
