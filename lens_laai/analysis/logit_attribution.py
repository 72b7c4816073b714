"""What each selected head's Δ_h writes to the residual stream, read through the unembedding.

* :func:`direct_logit_attribution`: what each head's Δ_h adds to the target's logit, read linearly
  through the final norm (its scale taken from the intervened run) and the unembedding, minus the
  mean over the vocabulary; an ``[n_layers, n_heads]`` tensor like every score of
  :mod:`lens_laai.analysis.effects`.
* :func:`logit_lens`: the tokens each selected head's write promotes and suppresses most.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.analysis.effects import Scores
from lens_laai.fastpath import CostMeter, warn_once
from lens_laai.fastpath.kernels import unwrap
from lens_laai.interventions.head import HeadIntervention
from lens_laai.models.bridge import hook_name
from lens_laai.models.head_write import attention_write, head_writes
from lens_laai.tasks.prompts import Batch


@torch.no_grad()
def last_token_state(
    model: TransformerBridge, iv: HeadIntervention, batches: Sequence[Batch], meter: CostMeter
) -> tuple[Float[Tensor, "n d_model"], dict[int, Float[Tensor, "n n_heads d_head"]]]:
    """Under ``iv``, at each prompt's last token: the final residual stream and ``hook_z`` (Δ included) of ``iv``'s layers.

    Where the block has a ``hook_resid_mid``, the block's real write is checked against
    :func:`lens_laai.models.head_write.attention_write` of the recorded ``z`` (a warning names
    an architecture whose attention-output path that function does not reproduce).

    Example:
        >>> from lens_laai import fit
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> iv = fit(model, tiny_task(), layer=1, n_train=8, steps=3, progress=False).intervention
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> from lens_laai.analysis.logit_attribution import last_token_state
        >>> resid, zs = last_token_state(model, iv, batches, CostMeter())
        >>> tuple(resid.shape), {layer: tuple(z.shape) for layer, z in zs.items()}  # [prompt, d_model]; [prompt, head, d_head]
        ((2, 64), {1: (2, 4, 16)})
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

    Example:
        >>> from lens_laai import fit
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> iv = fit(model, tiny_task(), layer=1, n_train=8, steps=3, progress=False).intervention
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> from lens_laai.analysis.logit_attribution import final_norm_readout
        >>> weight, inv_scale = final_norm_readout(model, iv, batches, CostMeter())
        >>> tuple(weight.shape), tuple(inv_scale.shape), bool((inv_scale > 0).all())  # [d_model]; one scale per prompt
        ((64,), (2,), True)
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

    Example:
        >>> from lens_laai import fit
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> iv = fit(model, tiny_task(), layer=1, n_train=8, steps=3, progress=False).intervention
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> from lens_laai.analysis.logit_attribution import last_token_state, selected_head_writes
        >>> _, zs = last_token_state(model, iv, batches, CostMeter())
        >>> writes = selected_head_writes(model, iv, zs)
        >>> tuple(writes[1].shape)  # [prompt, head, d_model]
        (2, 4, 64)
        >>> moved = writes[1].norm(dim=-1).amax(0) > 1e-4  # per head: does its Δ_h move the residual stream?
        >>> [h for h in range(4) if moved[h]] == [h for _, h in iv.selected_heads()]
        True
    """
    return {l: head_writes(model, l, zs[l], iv.deltas[l].detach().float().cpu()).cpu() for l in iv.layers}


def direct_logit_attribution(
    model: TransformerBridge, iv: HeadIntervention, batches: Sequence[Batch], meter: CostMeter
) -> Scores:
    """Mean over prompts of ``(u[target] − mean_v u[v]) / scale`` with ``u = W_U(w ⊙ write_h)``.

    ``write_h`` is what Δ_h adds to the residual stream through the block's real attention-output
    path (post-attention norm included) at that prompt. Zero for heads whose Δ_h is zero, so
    every layer is scored.

    Example:
        >>> from lens_laai import fit
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> iv = fit(model, tiny_task(), layer=1, n_train=8, steps=3, progress=False).intervention
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> from lens_laai.analysis.logit_attribution import direct_logit_attribution
        >>> dla = direct_logit_attribution(model, iv, batches, CostMeter())
        >>> tuple(dla.shape), bool((dla[0] == 0).all()), bool((dla[1] != 0).any())  # only layer 1 carries a Δ
        ((3, 4), True, True)
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
    """The tokens each selected head's write to the residual stream promotes and suppresses most (mean over prompts).

    Example:
        >>> from lens_laai import fit
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> iv = fit(model, tiny_task(), layer=1, n_train=8, steps=3, progress=False).intervention
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> from lens_laai.analysis.logit_attribution import logit_lens
        >>> rows = logit_lens(model, iv, batches, CostMeter(), k=2)
        >>> len(rows) == 2 * 2 * len(iv.selected_heads()), sorted(rows[0])
        (True, ['direction', 'head', 'layer', 'logit', 'rank', 'token'])
        >>> [(r["direction"], r["rank"]) for r in rows[:4]]
        [('promoted', 1), ('promoted', 2), ('suppressed', 1), ('suppressed', 2)]
        >>> rows[0]["logit"] > 0 > rows[2]["logit"]
        True
    """
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
