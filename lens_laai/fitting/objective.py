"""The penalised objective of a fit at one layer, its λ_max, its starting point, and one solve.

The mean cross-entropy of each training target's first token at the last prompt position (or, with
``objective="sequence"``, of the whole target under teacher forcing) as a function of Δ, for the
accelerated proximal gradient of :mod:`lens_laai.fitting.solver`; :mod:`lens_laai.fitting.layer_fit`
runs it along a λ₂ path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import FitError
from lens_laai.fastpath import CostMeter, LayerRunner, block_device
from lens_laai.fitting.solver import StepRecord, fista
from lens_laai.interventions.head import delta_hook
from lens_laai.interventions.positions import last_positions
from lens_laai.models.bridge import hook_name
from lens_laai.tasks.prompts import Batch, PromptTemplate, k_shot_prompts, left_pad, model_batches, pad_id
from lens_laai.tasks.task import Task


def sites_of(layer: int | Sequence[int]) -> tuple[int, ...]:
    """``(layer,)`` for one layer; the sorted layers of a joint fit.

    Example:
        >>> sites_of(1), sites_of([2, 0])
        ((1,), (0, 2))
    """
    return (layer,) if isinstance(layer, int) else tuple(sorted(layer))


def objective(
    runner: LayerRunner, cfg: Any, sites: tuple[int, ...] | None = None
) -> tuple[Callable[[Tensor], tuple[float, Tensor]], Callable[[Tensor], float]]:
    """``(smooth_and_grad, smooth)``: the mean training cross-entropy as a function of Δ at ``sites``
    (default: ``runner.layer`` alone).

    Example (at Δ = 0 the objective is the model's own mean cross-entropy on the training pairs):
        >>> from lens_laai.fastpath import CostMeter, LayerRunner
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import training_batches
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train, cfg = tiny_model(), tiny_task().split(0, 8).train, FitConfig(layer=1, steps=2)
        >>> runner = LayerRunner(model, training_batches(model, train, train, cfg, PromptTemplate()), 1, True, CostMeter())
        >>> import torch
        >>> from lens_laai.fitting.layer_fit import objective
        >>> smooth_and_grad, smooth = objective(runner, cfg)
        >>> value, grad = smooth_and_grad(torch.zeros(4, 16))
        >>> grad.shape, abs(value - smooth(torch.zeros(4, 16))) < 1e-6, abs(value - runner.scores([])[1]) < 1e-5
        (torch.Size([4, 16]), True, True)
        >>> smooth(-0.5 * grad) < value  # a small step down the gradient lowers it
        True
    """
    train = runner.batches
    sites = sites or (runner.layer,)
    n_rows = sum(len(b) for b in train)

    def loss(delta: Tensor, backward: bool) -> Tensor:
        total = torch.zeros((), device=delta.device)
        for i, batch in enumerate(train):
            if cfg.objective == "sequence":
                part = _sequence_ce(runner, batch, delta, backward) * len(batch)
            else:
                part = runner.cross_entropy(i, delta_hooks(sites, delta, runner.tail), backward)
            total = total + part.to(total.device)  # the loss may come off another device than Δ's
        return total / n_rows

    def smooth_and_grad(y: Tensor) -> tuple[float, Tensor]:
        y = y.detach().requires_grad_(True)
        value = loss(y, backward=True)
        (grad,) = torch.autograd.grad(value, y)
        return float(value.detach()), grad

    def smooth(x: Tensor) -> float:
        with torch.no_grad():
            return float(loss(x, backward=False))

    return smooth_and_grad, smooth


def lambda_max(runner: LayerRunner, cfg: Any, sites: tuple[int, ...] | None = None) -> float:
    """The smallest λ₂ whose proximal step leaves every head at zero from Δ = 0, given λ₁ = ``cfg.l1``.

    For the sparse group lasso that is ``max_h ‖S(∇_h f(0), λ₁)‖₂`` (S: soft-thresholding); one
    gradient evaluation. Raises :class:`FitError` when the gradient is not finite or is zero.

    Example (one proximal step from Δ = 0 keeps every head at zero just above λ_max, and not below it):
        >>> from lens_laai.fastpath import CostMeter, LayerRunner
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import training_batches
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train, cfg = tiny_model(), tiny_task().split(0, 8).train, FitConfig(layer=1, steps=2)
        >>> runner = LayerRunner(model, training_batches(model, train, train, cfg, PromptTemplate()), 1, True, CostMeter())
        >>> import dataclasses, torch
        >>> from lens_laai.fitting.layer_fit import lambda_max, solve_layer
        >>> lam = lambda_max(runner, cfg)
        >>> lam > 0, lambda_max(runner, dataclasses.replace(cfg, l1=0.0)) > lam  # λ₁ soft-thresholds the gradient first
        (True, True)
        >>> def heads_after_one_step(group_l1):
        ...     step = dataclasses.replace(cfg, group_l1=group_l1, steps=1)
        ...     return solve_layer(runner, runner.batches, step, torch.zeros(4, 16), None)[1][-1].n_selected
        >>> heads_after_one_step(1.001 * lam), heads_after_one_step(0.9 * lam) > 0
        (0, True)
    """
    sites = sites or (runner.layer,)
    smooth_and_grad, _ = objective(runner, cfg, sites)
    zero = torch.zeros(len(sites) * runner.model.cfg.n_heads, runner.model.cfg.d_head, device=runner.delta_device)
    value, grad = smooth_and_grad(zero)
    soft = torch.sign(grad) * torch.clamp(grad.abs() - cfg.l1, min=0.0)
    lam = float(soft.norm(dim=-1).max())
    if not torch.isfinite(grad).all() or not lam > 0:
        raise FitError(
            f"λ_max at layer {runner.layer} is {lam} (loss {value}): the gradient at Δ = 0 is not finite "
            f"or is zeroed by l1={cfg.l1}; use a smaller l1, or absolute group_l1 values."
        )
    return lam


def initial_delta(
    model: TransformerBridge,
    train: Task,
    layer: int | Sequence[int],
    cfg: Any,
    template: PromptTemplate,
    meter: CostMeter,
) -> Tensor:
    """Where the path starts: zeros, or every head's mean ``hook_z`` shift from zero-shot to k-shot prompts.

    ``"mean-difference"`` uses ``k = min(10, n_train − 1)`` demonstrations from the training pairs
    (two forwards of them, charged to ``meter``); the fit then shrinks or reshapes that direction.

    Example:
        >>> from lens_laai.fastpath import CostMeter
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import initial_delta
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train = tiny_model(), tiny_task().split(0, 8).train
        >>> zero = initial_delta(model, train, 1, FitConfig(), PromptTemplate(), CostMeter())
        >>> zero.shape, bool((zero == 0).all())
        (torch.Size([4, 16]), True)
        >>> meter = CostMeter()
        >>> shift = initial_delta(model, train, [0, 2], FitConfig(init="mean-difference"), PromptTemplate(), meter)
        >>> shift.shape, bool((shift.norm(dim=-1) > 0).all()), meter.token_layers > 0  # two layers' heads, stacked
        (torch.Size([8, 16]), True, True)
    """
    sites = sites_of(layer)
    shape = (len(sites) * model.cfg.n_heads, model.cfg.d_head)
    device = block_device(model, sites[0])
    if cfg.init == "zero":
        return torch.zeros(shape, device=device, dtype=torch.float32)
    from lens_laai.fastpath.recording import last_token_z

    shots = min(10, len(train) - 1)
    if shots < 1:
        raise FitError("init='mean-difference' needs k-shot prompts, so n_train ≥ 2; use init='zero'.")
    means = []
    for k in (0, shots):
        batches = model_batches(model, *k_shot_prompts(train, k, train, cfg.seed, template), cfg.batch_size, template)
        for batch in batches:
            meter.add(float(batch.attention_mask.sum()), model.cfg.n_layers, backward=False)
        means.append(last_token_z(model, batches, list(sites)).float().mean(0))
    return (means[1] - means[0]).reshape(shape).to(device)


def solve_layer(
    runner: LayerRunner,
    train: list[Batch],
    cfg: Any,
    init: Tensor,
    on_step: Callable[[StepRecord], None] | None,
    sites: tuple[int, ...] | None = None,
) -> tuple[Tensor, list[StepRecord]]:
    """Minimise the penalised objective over Δ at ``runner.layer`` from ``init`` (FISTA); ``train`` must be ``runner.batches``.

    Example (two steps at λ₂ = half of λ_max; ``cfg.group_l1`` is absolute here):
        >>> from lens_laai.fastpath import CostMeter, LayerRunner
        >>> from lens_laai.fitting import FitConfig
        >>> from lens_laai.fitting.layer_fit import training_batches
        >>> from lens_laai.tasks.prompts import PromptTemplate
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, train, cfg = tiny_model(), tiny_task().split(0, 8).train, FitConfig(layer=1, steps=2)
        >>> runner = LayerRunner(model, training_batches(model, train, train, cfg, PromptTemplate()), 1, True, CostMeter())
        >>> import dataclasses, torch
        >>> from lens_laai.fitting.layer_fit import lambda_max, solve_layer
        >>> step_cfg = dataclasses.replace(cfg, group_l1=0.5 * lambda_max(runner, cfg))
        >>> delta, history = solve_layer(runner, runner.batches, step_cfg, torch.zeros(4, 16), None)
        >>> delta.shape, [r.step for r in history], history[-1].n_selected == int((delta.norm(dim=-1) > 0).sum())
        (torch.Size([4, 16]), [0, 1], True)
        >>> history[-1].smooth < runner.scores([])[1]  # the training cross-entropy went down
        True
        >>> solve_layer(runner, list(runner.batches), step_cfg, torch.zeros(4, 16), None)
        Traceback (most recent call last):
        ...
        lens_laai.errors.FitError: solve_layer: train must be the runner's own batches.
    """
    if train is not runner.batches:
        raise FitError("solve_layer: train must be the runner's own batches.")
    init = init.to(device=runner.delta_device, dtype=torch.float32)
    smooth_and_grad, smooth = objective(runner, cfg, sites)
    return fista(smooth_and_grad, smooth, init, cfg.l1, cfg.group_l1, cfg.steps, cfg.lr, on_step)


def delta_hooks(layer: int | Sequence[int], delta: Tensor, tail: int = 1) -> list[tuple[str, Callable]]:
    """``fwd_hooks`` adding Δ at ``hook_z`` at each row's last ``tail`` positions: one layer, or (joint)
    one ``[n_heads, d_head]`` block of Δ's rows per layer of ``layer``. Pass the runner's ``tail``.

    Example:
        >>> [name for name, _ in delta_hooks((2, 0), torch.zeros(8, 16))]  # rows 0-3 → layer 0, rows 4-7 → layer 2
        ['blocks.0.attn.hook_z', 'blocks.2.attn.hook_z']
    """
    sites = sites_of(layer)
    where = last_positions(tail)
    return [(hook_name(L), delta_hook(part, where)) for L, part in zip(sites, delta.chunk(len(sites)))]


def _sequence_ce(runner: LayerRunner, batch: Batch, delta: Tensor, backward: bool) -> Tensor:
    """Teacher-forced CE of every target token, Δ at each row's last prompt token only."""
    model = runner.model
    rows = [
        ids[ids_mask.bool()].tolist() + tgt[:-1]
        for ids, ids_mask, tgt in zip(batch.input_ids, batch.attention_mask, batch.target_tokens)
    ]
    ids, mask = left_pad(rows, pad_id(model.tokenizer))
    ids, mask = ids.to(batch.input_ids.device), mask.to(batch.input_ids.device)
    width = ids.shape[1]
    target_lens = torch.tensor([len(t) for t in batch.target_tokens])
    last_prompt = width - target_lens  # index of each row's last prompt token
    runner.meter.add(float(mask.sum()), model.cfg.n_layers, backward)
    logits = model.run_with_hooks(
        ids, attention_mask=mask, fwd_hooks=[(hook_name(runner.layer), delta_hook(delta, last_prompt))]
    )
    total = torch.zeros((), device=logits.device)
    for i, tgt in enumerate(batch.target_tokens):
        start = int(last_prompt[i])
        total = total + F.cross_entropy(
            logits[i, start : start + len(tgt)].float(), torch.tensor(tgt, device=logits.device), reduction="mean"
        )
    return total / len(batch.target_tokens)
