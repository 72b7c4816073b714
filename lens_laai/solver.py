"""The sparse-group-lasso penalty, its exact proximal operator, and an accelerated proximal solver.

Penalty: ``λ₁‖Δ‖₁ + λ₂ Σ_h ‖Δ_h‖₂`` with one group per attention head (a row of Δ). Its
proximal operator is elementwise soft-thresholding followed by group shrinkage (Friedman,
Hastie & Tibshirani 2010), so a head whose row shrinks to zero is *exactly* zero: heads are
switched off by the step itself, not by a threshold applied afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor


def penalty(delta: Float[Tensor, "head d_head"], l1: float, group_l1: float) -> Tensor:
    """``l1 * ‖Δ‖₁ + group_l1 * Σ_h ‖Δ_h‖₂``."""
    return l1 * delta.abs().sum() + group_l1 * delta.norm(dim=-1).sum()


def prox_sparse_group_lasso(
    v: Float[Tensor, "head d_head"], step_l1: float, step_group: float
) -> Float[Tensor, "head d_head"]:
    """``argmin_x ½‖x − v‖² + step_l1‖x‖₁ + step_group Σ_h ‖x_h‖₂`` in closed form."""
    u = torch.sign(v) * torch.clamp(v.abs() - step_l1, min=0.0)
    norms = u.norm(dim=-1, keepdim=True)
    scale = torch.clamp(1.0 - step_group / torch.where(norms > 0, norms, torch.ones_like(norms)), min=0.0)
    return torch.where(norms > 0, u * scale, torch.zeros_like(u))


@dataclass
class StepRecord:
    """One accepted proximal step."""

    step: int
    loss: float
    smooth: float
    penalty: float
    n_selected: int
    lr: float


def fista(
    smooth_and_grad: Callable[[Tensor], tuple[float, Tensor]],
    smooth: Callable[[Tensor], float],
    x0: Tensor,
    l1: float,
    group_l1: float,
    steps: int,
    lr: float,
    on_step: Callable[[StepRecord], None] | None = None,
    shrink: float = 0.5,
    grow: float = 1.25,
    max_backtracks: int = 30,
) -> tuple[Tensor, list[StepRecord]]:
    """Accelerated proximal gradient (FISTA) with backtracking and adaptive restart.

    ``smooth_and_grad(y)`` returns the smooth loss and its gradient at ``y``; ``smooth(x)`` the
    loss alone (used to accept a step: the sufficient-decrease test of Beck & Teboulle 2009).
    The step size shrinks on rejection and grows by ``grow`` after a step that passed the test
    outright, so a too-small ``lr`` recovers. Momentum restarts whenever the objective goes up.
    """
    x = x0.detach().clone()
    y = x.clone()
    t = 1.0
    history: list[StepRecord] = []
    prev_objective = math.inf
    for k in range(steps):
        f_y, g_y = smooth_and_grad(y)
        slack = 1e-6 * max(1.0, abs(f_y))  # float32 round-off must not shrink the step forever
        next_lr = lr * grow
        for _ in range(max_backtracks):
            x_new = prox_sparse_group_lasso(y - lr * g_y, lr * l1, lr * group_l1)
            d = x_new - y
            f_new = smooth(x_new)
            bound = f_y + float((g_y * d).sum()) + float((d * d).sum()) / (2 * lr)
            if f_new <= bound:
                break
            if f_new <= bound + slack:
                next_lr = lr * shrink  # accepted within round-off, but the step is at its limit
                break
            lr *= shrink
            next_lr = lr
        pen = float(penalty(x_new, l1, group_l1))
        objective = f_new + pen
        if objective > prev_objective:
            t = 1.0  # adaptive restart (O'Donoghue & Candès 2015)
            y = x_new.clone()
        else:
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            y = x_new + ((t - 1.0) / t_new) * (x_new - x)
            t = t_new
        x = x_new
        prev_objective = objective
        n_sel = int((x.norm(dim=-1) > 0).sum())
        record = StepRecord(k, objective, f_new, pen, n_sel, lr)
        history.append(record)
        if on_step is not None:
            on_step(record)
        lr = next_lr
    return x, history
