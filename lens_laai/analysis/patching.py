"""Activation and attribution patching of every head, on TransformerLens' own patching API.

* :func:`activation_patching`: TransformerLens' ``get_act_patch_attn_head_out_all_pos`` (clean =
  k-shot prompts, corrupted = the same prompts with the demonstrations' labels deranged, metric =
  mean target log-prob), i.e. Function Vectors' causal indirect effect on TL's own API.
* :func:`attribution_patching`: TransformerLens' ``attribution_patch`` (node granularity,
  ``attn_head_out`` summed over positions): the linearised estimate of the same effect.

Scores are ``[n_layers, n_heads]`` tensors like every score of :mod:`lens_laai.analysis.effects`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.analysis.effects import Scores, empty_scores
from lens_laai.fastpath import BlockReplayModel, CostMeter
from lens_laai.tasks.prompts import Batch


def _target_logprob(targets: Tensor) -> Callable[[Tensor], Tensor]:
    """Per prompt: log P(target's first token) at the last position (a ``[batch]`` metric, ``reduce="none"``)."""
    return lambda logits: torch.log_softmax(logits[:, -1].float(), -1).gather(1, targets[:, None].to(logits.device))[
        :, 0
    ]


def _target_logprob_of_row(target: int) -> Callable[[Tensor], Tensor]:
    return lambda logits: torch.log_softmax(logits[0, -1].float(), -1)[target]


def activation_patching(
    model: TransformerBridge,
    clean: Batch,
    corrupt: Batch,
    layers: Sequence[int],
    meter: CostMeter,
    progress: bool = False,
) -> tuple[dict[str, Scores], float, float]:
    """Effect on the target log-prob of patching each head's clean output (all positions) into the corrupted run.

    TransformerLens' ``get_act_patch_attn_head_out_all_pos`` with ``reduce="none", baseline=True``
    gives a :class:`transformer_lens.patching.PatchingResult`; its per-prompt effects (patched −
    corrupted) give each cell's mean (``act_patch``), standard error (``act_patch_se``, TL's
    ``standard_error``) and sign-flip permutation p-value (``act_patch_p``). Returns those scores
    and the clean and corrupted mean metrics.

    Example:
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> clean, corrupt = (model_batches(model, [f"hot cold up {w} big", f"up down hot {w} big"], [" small"] * 2)[0] for w in ("down", "cold"))
        >>> from lens_laai.analysis.patching import activation_patching
        >>> scores, clean_lp, corrupt_lp = activation_patching(model, clean, corrupt, [0, 1], CostMeter())
        >>> sorted(scores), tuple(scores["act_patch"].shape)
        (['act_patch', 'act_patch_p', 'act_patch_se'], (3, 4))
        >>> bool(scores["act_patch"][:2].isfinite().all()), bool(scores["act_patch"][2].isnan().all())  # layer 2 not scored
        (True, True)
        >>> clean_lp < 0 and corrupt_lp < 0
        True
    """
    import pandas as pd
    from transformer_lens.patching import PatchingResult, get_act_patch_attn_head_out_all_pos
    from transformer_lens.utilities.statistics import standard_error

    metric = _target_logprob(clean.target_ids)
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(
            clean.input_ids, attention_mask=clean.attention_mask, names_filter=lambda n: n.endswith("attn.hook_z")
        )
    adapter = BlockReplayModel(model, corrupt.input_ids, corrupt.attention_mask, meter)
    meter.add(float(clean.attention_mask.sum()), model.cfg.n_layers, backward=False)
    index = pd.DataFrame([(l, h) for l in layers for h in range(model.cfg.n_heads)], columns=["layer", "head"])
    with _quiet_tqdm(progress):
        result = get_act_patch_attn_head_out_all_pos(
            adapter,
            corrupt.input_ids,
            cache,
            metric,
            index_df=index,
            index_axis_names=None,
            reduce="none",
            baseline=True,
        )
    assert isinstance(result, PatchingResult)  # reduce="none", baseline=True returns one
    effect = result.effect().float().cpu()  # [cell, prompt]
    cells = (index["layer"].tolist(), index["head"].tolist())
    out = {"act_patch": empty_scores(model), "act_patch_se": empty_scores(model), "act_patch_p": empty_scores(model)}
    out["act_patch"][cells] = effect.mean(-1)
    if effect.shape[-1] >= 2:
        out["act_patch_se"][cells] = standard_error(effect, dim=-1)
        out["act_patch_p"][cells] = result.permutation_pvalue(seed=0).float().cpu()
    return out, float(metric(clean_logits).mean()), float(result.baseline.float().mean())


def attribution_patching(
    model: TransformerBridge, pairs: Sequence[tuple[Tensor, Tensor, int]], meter: CostMeter, reduce: str = "mean"
) -> Scores | Float[Tensor, "pair n_layers n_heads"]:
    """TransformerLens' ``attribution_patch`` per (clean ids, corrupt ids, target) pair, heads summed over positions.

    ``reduce="mean"`` averages over the pairs; ``"none"`` keeps one ``[n_layers, n_heads]`` per pair.
    The frozen model has no tensor that requires a gradient, so the embedding weight's
    ``requires_grad`` is switched on for the call and always restored (no ``.grad`` is written:
    TL differentiates with ``torch.autograd.grad``).

    Example:
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> clean, corrupt = (model_batches(model, [f"hot cold up {w} big", f"up down hot {w} big"], [" small"] * 2)[0] for w in ("down", "cold"))
        >>> from lens_laai.analysis.patching import attribution_patching
        >>> pairs = [(clean.input_ids[i], corrupt.input_ids[i], int(clean.target_ids[i])) for i in range(2)]
        >>> tuple(attribution_patching(model, pairs, CostMeter()).shape)
        (3, 4)
        >>> per_pair = attribution_patching(model, pairs, CostMeter(), reduce="none")
        >>> tuple(per_pair.shape), any(p.requires_grad for p in model.parameters())  # gradients switched off again
        ((2, 3, 4), False)
    """
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    out = torch.zeros(len(pairs), model.cfg.n_layers, model.cfg.n_heads)
    embedding = next(model.parameters())
    was = embedding.requires_grad
    try:
        embedding.requires_grad_(True)
        device = model.cfg.device
        for i, (clean_ids, corrupt_ids, target) in enumerate(pairs):
            clean_ids, corrupt_ids = clean_ids.to(device), corrupt_ids.to(device)
            result = attribution_patch(
                model,
                clean_ids[None],
                corrupt_ids[None],
                _target_logprob_of_row(target),
            )
            for node, score in result.node_scores.items():
                if node.kind == "attn_head_out":
                    out[i, node.layer, node.head] += score
            meter.add(2.0 * len(clean_ids), model.cfg.n_layers, backward=False)
            meter.add(float(len(clean_ids)), model.cfg.n_layers, backward=True)
    finally:
        embedding.requires_grad_(was)
    return out if reduce == "none" else out.mean(0)


class _quiet_tqdm:
    """Silence TransformerLens' own progress bar unless progress is wanted."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress

    def __enter__(self) -> None:
        import transformer_lens.patching as patching

        self.saved = patching.tqdm
        if not self.progress:
            patching.tqdm = lambda iterable, *a, **k: iterable

    def __exit__(self, *exc: Any) -> None:
        import transformer_lens.patching as patching

        patching.tqdm = self.saved
