"""Per-head scores, each as an ``[n_layers, n_heads]`` tensor (NaN where a layer was not scored).

The shape is the one ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` returns, so
every score can go straight to ``imshow``. Each function also charges its compute to a
:class:`lens_laai.fastpath.CostMeter` (forward-pass equivalents of one zero-shot prompt).

* :func:`direct_logit_attribution`: what each head's Δ_h adds to the target's logit, read linearly
  through the final norm (its scale taken from the intervened run) and the unembedding, minus the
  mean over the vocabulary.
* :func:`activation_patching`: TransformerLens' ``get_act_patch_attn_head_out_all_pos`` (clean =
  k-shot prompts, corrupted = the same prompts with the demonstrations' labels deranged, metric =
  mean target log-prob), i.e. Function Vectors' causal indirect effect on TL's own API.
* :func:`attribution_patching`: TransformerLens' ``attribution_patch`` (node granularity,
  ``attn_head_out`` summed over positions): the linearised estimate of the same effect.
* :func:`ablation_effects`: the drop in accuracy and target log-prob when one head is ablated.
* :func:`necessity`: the drop when one selected head's Δ_h alone is removed from the intervention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.fastpath import BlockReplayModel, CostMeter, LayerRunner
from lens_laai.fastpath.kernels import unwrap
from lens_laai.interventions.ablation import HeadAblation
from lens_laai.interventions.head import HeadIntervention
from lens_laai.models.bridge import head_output_weights
from lens_laai.tasks.prompts import Batch

Scores = Float[Tensor, "n_layers n_heads"]


def empty_scores(model: TransformerBridge) -> Scores:
    return torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))


# direct logit attribution -----------------------------------------------------------------------
@torch.no_grad()
def final_norm_readout(
    model: TransformerBridge, iv: HeadIntervention, batches: Sequence[Batch], meter: CostMeter
) -> tuple[Tensor, Tensor]:
    """The final norm's linear map at each prompt's last token under ``iv``: ``(weight, 1/scale per row)``.

    RMSNorm and LayerNorm are linear in a small change of their input once the scale of the
    intervened run is frozen; LayerNorm also subtracts the mean (applied in :func:`_readout`).
    """
    captured: list[Tensor] = []
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    for batch in batches:
        with iv.apply(model), model.hooks(fwd_hooks=[(last, lambda x, hook: captured.append(x[:, -1].float()))]):
            model(batch.input_ids, attention_mask=batch.attention_mask)
        meter.add(float(batch.attention_mask.sum()), model.cfg.n_layers, backward=False)
    resid = torch.cat(captured)
    norm = unwrap(model.ln_final)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    centred = resid - resid.mean(-1, keepdim=True) if _is_layer_norm(norm) else resid
    inv_scale = torch.rsqrt(centred.pow(2).mean(-1) + eps)
    weight = norm.weight.detach().float()
    return (weight + 1.0 if "gemma" in type(norm).__name__.lower() else weight), inv_scale


def _is_layer_norm(norm: Any) -> bool:
    return isinstance(norm, torch.nn.LayerNorm) or (
        getattr(norm, "bias", None) is not None and "rms" not in type(norm).__name__.lower()
    )


def _readout(model: TransformerBridge, vectors: Float[Tensor, "n d_model"], weight: Tensor) -> Float[Tensor, "n vocab"]:
    """Unembedded logits of residual-stream ``vectors`` through the final norm's weight (scale applied by caller)."""
    if _is_layer_norm(unwrap(model.ln_final)):
        vectors = vectors - vectors.mean(-1, keepdim=True)
    w_u = model.W_U.detach().float()
    return ((vectors.to(w_u.device) * weight.to(w_u.device)) @ w_u).cpu()


def direct_logit_attribution(
    model: TransformerBridge, iv: HeadIntervention, batches: Sequence[Batch], meter: CostMeter
) -> Scores:
    """Mean over prompts of ``(u[target] − mean_v u[v]) / scale`` with ``u = W_U(w ⊙ Δ_h W_O[L, h])``.

    Zero for heads whose Δ_h is zero, so every layer is scored.
    """
    weight, inv_scale = final_norm_readout(model, iv, batches, meter)
    targets = torch.cat([b.target_ids.cpu() for b in batches])
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer, delta in iv.deltas.items():
        per_head = torch.einsum(
            "hd,hdm->hm", delta.detach().float().cpu(), head_output_weights(model, layer).float().cpu()
        )
        logits = _readout(model, per_head, weight.cpu())  # [head, vocab]
        relative = logits - logits.mean(-1, keepdim=True)
        out[layer] = (relative[:, targets] * inv_scale.cpu()).mean(-1)
    return out


LOGIT_LENS_COLUMNS = ["layer", "head", "direction", "rank", "token", "logit"]


def logit_lens(
    model: TransformerBridge, iv: HeadIntervention, batches: Sequence[Batch], meter: CostMeter, k: int = 10
) -> list[dict[str, Any]]:
    """The tokens each selected head's ``Δ_h · W_O[L, h]`` promotes and suppresses most (logits, mean scale)."""
    weight, inv_scale = final_norm_readout(model, iv, batches, meter)
    rows = []
    for layer, head in iv.selected_heads():
        vector = iv.deltas[layer][head].detach().float().cpu() @ head_output_weights(model, layer)[head].float().cpu()
        logits = _readout(model, vector[None], weight.cpu())[0] * float(inv_scale.mean())
        logits = logits - logits.mean()
        for direction, values in (("promoted", logits.topk(k)), ("suppressed", (-logits).topk(k))):
            for rank, (value, token) in enumerate(zip(values.values.tolist(), values.indices.tolist())):
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "direction": direction,
                        "rank": rank + 1,
                        "token": model.tokenizer.decode([token]),
                        "logit": value if direction == "promoted" else -value,
                    }
                )
    return rows


# activation and attribution patching -------------------------------------------------------------
def _target_logprob(targets: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda logits: (
        torch.log_softmax(logits[:, -1].float(), -1).gather(1, targets[:, None].to(logits.device)).mean()
    )


def _target_logprob_of_row(target: int) -> Callable[[Tensor], Tensor]:
    return lambda logits: torch.log_softmax(logits[0, -1].float(), -1)[target]


def activation_patching(
    model: TransformerBridge,
    clean: Batch,
    corrupt: Batch,
    layers: Sequence[int],
    meter: CostMeter,
    progress: bool = False,
) -> tuple[Scores, float, float]:
    """Effect on the mean target log-prob of patching each head's clean output (all positions) into the corrupted run.

    Returns the scores (patched − corrupted metric) and the clean and corrupted metrics.
    """
    import pandas as pd
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    metric = _target_logprob(clean.target_ids)
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(
            clean.input_ids, attention_mask=clean.attention_mask, names_filter=lambda n: n.endswith("attn.hook_z")
        )
    adapter = BlockReplayModel(model, corrupt.input_ids, corrupt.attention_mask, meter)
    meter.add(float(clean.attention_mask.sum()), model.cfg.n_layers, backward=False)
    corrupted_metric = float(metric(adapter.run_with_hooks(corrupt.input_ids)))
    index = pd.DataFrame([(l, h) for l in layers for h in range(model.cfg.n_heads)], columns=["layer", "head"])
    with _quiet_tqdm(progress):
        flat = get_act_patch_attn_head_out_all_pos(
            adapter, corrupt.input_ids, cache, metric, index_df=index, index_axis_names=None
        )
    out = empty_scores(model)
    out[index["layer"].tolist(), index["head"].tolist()] = flat.float().cpu() - corrupted_metric
    return out, float(metric(clean_logits)), corrupted_metric


def attribution_patching(
    model: TransformerBridge, pairs: Sequence[tuple[Tensor, Tensor, int]], meter: CostMeter
) -> Scores:
    """TransformerLens' ``attribution_patch`` per (clean ids, corrupt ids, target) pair, heads summed over positions.

    The frozen model has no tensor that requires a gradient, so the embedding weight's
    ``requires_grad`` is switched on for the call and always restored (no ``.grad`` is written:
    TL differentiates with ``torch.autograd.grad``).
    """
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    embedding = next(model.parameters())
    was = embedding.requires_grad
    try:
        embedding.requires_grad_(True)
        device = model.cfg.device
        for clean_ids, corrupt_ids, target in pairs:
            clean_ids, corrupt_ids = clean_ids.to(device), corrupt_ids.to(device)
            result = attribution_patch(
                model,
                clean_ids[None],
                corrupt_ids[None],
                _target_logprob_of_row(target),
            )
            for node, score in result.node_scores.items():
                if node.kind == "attn_head_out":
                    out[node.layer, node.head] += score / len(pairs)
            meter.add(2.0 * len(clean_ids), model.cfg.n_layers, backward=False)
            meter.add(float(len(clean_ids)), model.cfg.n_layers, backward=True)
    finally:
        embedding.requires_grad_(was)
    return out


# ablation and necessity --------------------------------------------------------------------------
def runner_scores(runner: LayerRunner, hooks: list) -> tuple[float, float]:
    """Accuracy and mean target log-prob over the runner's batches under ``hooks``."""
    accuracy, cross_entropy = runner.scores(hooks)
    return accuracy, -cross_entropy


def ablation_effects(
    runner: LayerRunner,
    model: TransformerBridge,
    layers: Sequence[int],
    ablations: dict[str, Callable[[list[tuple[int, int]]], HeadAblation]],
    progress: bool = False,
) -> dict[str, Scores]:
    """``{kind_acc_drop, kind_logprob_drop}``: drops when each head of ``layers`` is ablated alone."""
    from tqdm.auto import tqdm

    base_acc, base_lp = runner_scores(runner, [])
    out = {f"{kind}_{what}": empty_scores(model) for kind in ablations for what in ("acc_drop", "logprob_drop")}
    heads = [(l, h) for l in layers for h in range(model.cfg.n_heads)]
    for layer, head in tqdm(heads, desc="ablation", disable=not progress):
        for kind, make in ablations.items():
            acc, lp = runner_scores(runner, make([(layer, head)]).fwd_hooks())
            out[f"{kind}_acc_drop"][layer, head] = base_acc - acc
            out[f"{kind}_logprob_drop"][layer, head] = base_lp - lp
    return out


def necessity(runner: LayerRunner, model: TransformerBridge, iv: HeadIntervention) -> dict[str, Scores]:
    """Drop in accuracy and target log-prob when one selected head's Δ_h alone is removed (NaN elsewhere)."""
    full_acc, full_lp = runner_scores(runner, iv.fwd_hooks())
    acc_drop, lp_drop = empty_scores(model), empty_scores(model)
    for layer, head in iv.selected_heads():
        deltas = {l: d.detach().clone() for l, d in iv.deltas.items()}
        deltas[layer][head] = 0
        acc, lp = runner_scores(
            runner, HeadIntervention(deltas, iv.model_name, iv.fingerprint, iv.positions).fwd_hooks()
        )
        acc_drop[layer, head], lp_drop[layer, head] = full_acc - acc, full_lp - lp
    return {"necessity_acc_drop": acc_drop, "necessity_logprob_drop": lp_drop}


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
