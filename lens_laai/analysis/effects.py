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

from lens_laai.fastpath import BlockReplayModel, CostMeter, LayerRunner, warn_once
from lens_laai.fastpath.kernels import unwrap
from lens_laai.interventions.ablation import HeadAblation
from lens_laai.interventions.head import HeadIntervention
from lens_laai.models.bridge import hook_name
from lens_laai.models.head_write import attention_write, head_writes
from lens_laai.tasks.prompts import Batch

Scores = Float[Tensor, "n_layers n_heads"]


def empty_scores(model: TransformerBridge) -> Scores:
    return torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))


# direct logit attribution -----------------------------------------------------------------------
@torch.no_grad()
def last_token_state(
    model: TransformerBridge, iv: HeadIntervention, batches: Sequence[Batch], meter: CostMeter
) -> tuple[Float[Tensor, "n d_model"], dict[int, Float[Tensor, "n n_heads d_head"]]]:
    """Under ``iv``, at each prompt's last token: the final residual stream and ``hook_z`` (Δ included) of ``iv``'s layers.

    Where the block has a ``hook_resid_mid``, the block's real write is checked against
    :func:`lens_laai.models.head_write.attention_write` of the recorded ``z`` (a warning names
    an architecture whose attention-output path that function does not reproduce).
    """
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    grabbed: dict[str, list[Tensor]] = {}

    def grab(name: str) -> Callable:
        return lambda x, hook: grabbed.setdefault(name, []).append(x[:, -1].detach().float().cpu())

    names = [last] + [hook_name(l) for l in iv.layers]
    checks = [l for l in iv.layers if f"blocks.{l}.hook_resid_mid" in model.hook_dict]
    names += [f"blocks.{l}.hook_resid_{w}" for l in checks for w in ("pre", "mid")]
    for batch in batches:
        with iv.apply(model), model.hooks(fwd_hooks=[(n, grab(n)) for n in names]):
            model(batch.input_ids, attention_mask=batch.attention_mask)
        meter.add(float(batch.attention_mask.sum()), model.cfg.n_layers, backward=False)
    got = {n: torch.cat(v) for n, v in grabbed.items()}
    zs = {l: got[hook_name(l)] for l in iv.layers}
    for layer in checks:
        real = got[f"blocks.{layer}.hook_resid_mid"] - got[f"blocks.{layer}.hook_resid_pre"]
        ours = attention_write(model, layer, zs[layer]).cpu()
        if not torch.allclose(ours, real, rtol=1e-2, atol=1e-2 * float(real.abs().max())):  # half precision too
            warn_once(
                f"head-write:{type(model.original_model).__name__}",
                f"Block {layer}'s attention adds something other than its output projection and post-attention "
                "norm to the residual stream; DLA and the logit lens may be off on this architecture.",
            )
    return got[last], zs


def final_norm_readout(
    model: TransformerBridge, iv: HeadIntervention, batches: Sequence[Batch], meter: CostMeter
) -> tuple[Tensor, Tensor]:
    """The final norm's linear map at each prompt's last token under ``iv``: ``(weight, 1/scale per row)``.

    RMSNorm and LayerNorm are linear in a small change of their input once the scale of the
    intervened run is frozen; LayerNorm also subtracts the mean (applied in :func:`_readout`).
    """
    resid, _ = last_token_state(model, iv, batches, meter)
    return _norm_map(model, resid)


def _norm_map(model: TransformerBridge, resid: Tensor) -> tuple[Tensor, Tensor]:
    norm = unwrap(model.ln_final)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    centred = resid - resid.mean(-1, keepdim=True) if _is_layer_norm(norm) else resid
    inv_scale = torch.rsqrt(centred.pow(2).mean(-1) + eps)
    weight = norm.weight.detach().float().cpu()
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


def selected_head_writes(
    model: TransformerBridge, iv: HeadIntervention, zs: dict[int, Tensor]
) -> dict[int, Float[Tensor, "n n_heads d_model"]]:
    """Per layer of ``iv``: what each Δ_h adds to the residual stream at each prompt (zero where Δ_h is zero).

    The change in the block's real write when Δ_h alone is taken out of the intervened ``z``
    (:func:`lens_laai.models.head_write.head_writes`); ``Δ_h · W_O`` wherever that path is linear.
    """
    return {l: head_writes(model, l, zs[l], iv.deltas[l].detach().float().cpu()).cpu() for l in iv.layers}


def direct_logit_attribution(
    model: TransformerBridge, iv: HeadIntervention, batches: Sequence[Batch], meter: CostMeter
) -> Scores:
    """Mean over prompts of ``(u[target] − mean_v u[v]) / scale`` with ``u = W_U(w ⊙ write_h)``.

    ``write_h`` is what Δ_h adds to the residual stream through the block's real attention-output
    path (post-attention norm included) at that prompt. Zero for heads whose Δ_h is zero, so
    every layer is scored.
    """
    resid, zs = last_token_state(model, iv, batches, meter)
    weight, inv_scale = _norm_map(model, resid)
    targets = torch.cat([b.target_ids.cpu() for b in batches])
    w_u = model.W_U.detach().float().cpu()
    direction = w_u[:, targets] - w_u.mean(-1, keepdim=True)  # [d_model, n]
    centre = _is_layer_norm(unwrap(model.ln_final))
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer, writes in selected_head_writes(model, iv, zs).items():
        vectors = writes - writes.mean(-1, keepdim=True) if centre else writes  # [n, head, d]
        per_prompt = torch.einsum("nhd,dn->nh", vectors * weight, direction) * inv_scale[:, None]
        out[layer] = per_prompt.mean(0)
    return out


LOGIT_LENS_COLUMNS = ["layer", "head", "direction", "rank", "token", "logit"]


def logit_lens(
    model: TransformerBridge, iv: HeadIntervention, batches: Sequence[Batch], meter: CostMeter, k: int = 10
) -> list[dict[str, Any]]:
    """The tokens each selected head's write to the residual stream promotes and suppresses most (mean over prompts)."""
    resid, zs = last_token_state(model, iv, batches, meter)
    weight, inv_scale = _norm_map(model, resid)
    writes = selected_head_writes(model, iv, zs)
    rows = []
    for layer, head in iv.selected_heads():
        logits = (_readout(model, writes[layer][:, head], weight) * inv_scale[:, None]).mean(0)
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


# ablation and necessity --------------------------------------------------------------------------
def runner_scores(runner: LayerRunner, hooks: list) -> tuple[float, float]:
    """Accuracy and mean target log-prob over the runner's batches under ``hooks``."""
    accuracy, cross_entropy = runner.scores(hooks)
    return accuracy, -cross_entropy


def prompt_scores(runner: LayerRunner, hooks: list) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """Per prompt of the runner's batches under ``hooks``: 1.0 if the first target token is top-1, and its log-prob."""
    from lens_laai.fastpath.scoring import score_logits

    correct, logprob = [], []
    for i, batch in enumerate(runner.batches):
        s = score_logits(runner.logits(i, hooks), batch.target_ids)
        correct.append(s.correct.float().cpu())
        logprob.append(s.target_logprob.float().cpu())
    return torch.cat(correct), torch.cat(logprob)


def standard_error(values: Tensor) -> float:
    """Standard error of the mean of per-prompt ``values`` (TransformerLens' estimator; NaN below two prompts)."""
    from transformer_lens.utilities.statistics import standard_error as tl_standard_error

    return float(tl_standard_error(values.float(), dim=-1)) if values.numel() >= 2 else float("nan")


def ablation_effects(
    runner: LayerRunner,
    model: TransformerBridge,
    layers: Sequence[int],
    ablations: dict[str, Callable[[list[tuple[int, int]]], HeadAblation]],
    progress: bool = False,
) -> dict[str, Scores]:
    """``{kind_acc_drop, kind_logprob_drop, kind_logprob_drop_se}``: drops when each head of ``layers`` is ablated alone.

    ``_se`` is the standard error over prompts of the per-prompt log-prob drop (a 95% interval is
    about ±2 se at 16 prompts; the report prints t-intervals).
    """
    from tqdm.auto import tqdm

    base_correct, base_lp = prompt_scores(runner, [])
    names = ("acc_drop", "logprob_drop", "logprob_drop_se")
    out = {f"{kind}_{what}": empty_scores(model) for kind in ablations for what in names}
    heads = [(l, h) for l in layers for h in range(model.cfg.n_heads)]
    for layer, head in tqdm(heads, desc="ablation", disable=not progress):
        for kind, make in ablations.items():
            correct, lp = prompt_scores(runner, make([(layer, head)]).fwd_hooks())
            out[f"{kind}_acc_drop"][layer, head] = float((base_correct - correct).mean())
            out[f"{kind}_logprob_drop"][layer, head] = float((base_lp - lp).mean())
            out[f"{kind}_logprob_drop_se"][layer, head] = standard_error(base_lp - lp)
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
