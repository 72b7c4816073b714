"""Per-head ablation and necessity scores, each as an ``[n_layers, n_heads]`` tensor (NaN where not scored).

The shape is the one ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` returns, so
every score can go straight to ``imshow``. Each function also charges its compute to a
:class:`lens_laai.fastpath.CostMeter` (forward-pass equivalents of one zero-shot prompt).

* :func:`ablation_effects`: the drop in accuracy and target log-prob when one head is ablated.
* :func:`necessity`: the drop when one selected head's Δ_h alone is removed from the intervention.

The other scores live beside this module: :mod:`lens_laai.analysis.logit_attribution` (direct logit
attribution of Δ_h, the logit lens) and :mod:`lens_laai.analysis.patching` (activation and
attribution patching).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.fastpath import LayerRunner
from lens_laai.interventions.ablation import HeadAblation
from lens_laai.interventions.head import HeadIntervention

Scores = Float[Tensor, "n_layers n_heads"]


def empty_scores(model: TransformerBridge) -> Scores:
    """An all-NaN ``[n_layers, n_heads]`` score tensor: NaN marks a head that was not scored.

    Example:
        >>> from lens_laai.analysis.effects import empty_scores
        >>> from lens_laai.testing import tiny_model
        >>> scores = empty_scores(tiny_model())
        >>> tuple(scores.shape), bool(scores.isnan().all())
        ((3, 4), True)
    """
    return torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))


def runner_scores(runner: LayerRunner, hooks: list) -> tuple[float, float]:
    """Accuracy and mean target log-prob over the runner's batches under ``hooks``.

    Example:
        >>> from lens_laai import fit
        >>> from lens_laai.fastpath import CostMeter, LayerRunner
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> iv = fit(model, tiny_task(), layer=1, n_train=8, steps=3, progress=False).intervention
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> runner = LayerRunner(model, batches, 1, True, CostMeter())  # last-token runner from layer 1
        >>> from lens_laai.analysis.effects import prompt_scores, runner_scores
        >>> accuracy, logprob = runner_scores(runner, [])
        >>> correct, logprobs = prompt_scores(runner, [])
        >>> accuracy == float(correct.mean()), abs(logprob - float(logprobs.mean())) < 1e-5
        (True, True)
        >>> runner_scores(runner, iv.fwd_hooks())[1] != logprob  # Δ changes the target's log-prob
        True
    """
    accuracy, cross_entropy = runner.scores(hooks)
    return accuracy, -cross_entropy


def prompt_scores(runner: LayerRunner, hooks: list) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """Per prompt of the runner's batches under ``hooks``: 1.0 if the first target token is top-1, and its log-prob.

    Example:
        >>> from lens_laai.fastpath import CostMeter, LayerRunner
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> runner = LayerRunner(model, batches, 1, True, CostMeter())  # last-token runner from layer 1
        >>> from lens_laai.analysis.effects import prompt_scores
        >>> correct, logprob = prompt_scores(runner, [])
        >>> tuple(correct.shape), set(correct.tolist()) <= {0.0, 1.0}, bool((logprob < 0).all())
        ((2,), True, True)
    """
    from lens_laai.fastpath.scoring import score_logits

    correct, logprob = [], []
    for i, batch in enumerate(runner.batches):
        s = score_logits(runner.logits(i, hooks), batch.target_ids)
        correct.append(s.correct.float().cpu())
        logprob.append(s.target_logprob.float().cpu())
    return torch.cat(correct), torch.cat(logprob)


def standard_error(values: Tensor) -> float:
    """Standard error of the mean of per-prompt ``values`` (TransformerLens' estimator; NaN below two prompts).

    Example:
        >>> import torch
        >>> from lens_laai.analysis.effects import standard_error
        >>> round(standard_error(torch.tensor([1.0, 2.0, 3.0, 4.0])), 4)  # sample std / sqrt(n)
        0.6455
        >>> standard_error(torch.tensor([1.0]))
        nan
    """
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

    Example:
        >>> from lens_laai.fastpath import CostMeter, LayerRunner
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> runner = LayerRunner(model, batches, 1, True, CostMeter())  # last-token runner from layer 1
        >>> from lens_laai.analysis.effects import ablation_effects
        >>> from lens_laai.interventions.ablation import HeadAblation
        >>> out = ablation_effects(runner, model, [1], {"zero": lambda heads: HeadAblation.zero(model, heads)})
        >>> sorted(out)
        ['zero_acc_drop', 'zero_logprob_drop', 'zero_logprob_drop_se']
        >>> bool(out["zero_logprob_drop"][1].isfinite().all()), bool(out["zero_logprob_drop"][0].isnan().all())
        (True, True)
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
    """Drop in accuracy and target log-prob when one selected head's Δ_h alone is removed (NaN elsewhere).

    Example:
        >>> from lens_laai import fit
        >>> from lens_laai.fastpath import CostMeter, LayerRunner
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> iv = fit(model, tiny_task(), layer=1, n_train=8, steps=3, progress=False).intervention
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"])
        >>> runner = LayerRunner(model, batches, 1, True, CostMeter())  # last-token runner from layer 1
        >>> from lens_laai.analysis.effects import necessity
        >>> out = necessity(runner, model, iv)
        >>> sorted(out)
        ['necessity_acc_drop', 'necessity_logprob_drop']
        >>> scored = [tuple(c) for c in out["necessity_logprob_drop"].isfinite().nonzero().tolist()]
        >>> scored == iv.selected_heads()  # one score per selected head, NaN elsewhere
        True
    """
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
