"""The sparse-group-lasso penalty, its exact proximal operator, and an accelerated proximal solver.

Penalty: ``λ₁‖Δ‖₁ + λ₂ Σ_h ‖Δ_h‖₂`` with one group per attention head (a row of Δ). Its
proximal operator is elementwise soft-thresholding followed by group shrinkage (Friedman,
Hastie & Tibshirani 2010), so a head whose row shrinks to zero is *exactly* zero: heads are
switched off by the step itself, not by a threshold applied afterwards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from lens_laai.errors import FitError

GroupWeight = float | Float[Tensor, "head 1"]


def penalty(delta: Float[Tensor, "head d_head"], l1: float, group_l1: GroupWeight) -> Tensor:
    """``l1 * ‖Δ‖₁ + Σ_h group_l1_h ‖Δ_h‖₂`` (``group_l1``: one λ₂, or one per group as a ``[head, 1]`` tensor).

    Example (rows are heads: ‖Δ‖₁ = 8, the row norms are 5, 0 and 1):
        >>> import torch
        >>> from lens_laai.fitting.solver import penalty
        >>> delta = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
        >>> round(penalty(delta, l1=0.1, group_l1=1.0).item(), 4)  # 0.1 × 8 + (5 + 0 + 1)
        6.8
        >>> penalty(delta, l1=0.0, group_l1=torch.tensor([[1.0], [1.0], [0.0]])).item()  # head 2 unpenalised
        5.0
    """
    norms = delta.norm(dim=-1, keepdim=True)
    return l1 * delta.abs().sum() + (group_l1 * norms).sum()


def prox_sparse_group_lasso(
    v: Float[Tensor, "head d_head"], step_l1: float, step_group: GroupWeight
) -> Float[Tensor, "head d_head"]:
    """``argmin_x ½‖x − v‖² + step_l1‖x‖₁ + Σ_h step_group_h ‖x_h‖₂`` in closed form (``step_group``: a
    number, or one per group as a ``[head, 1]`` tensor).

    Example (a row whose norm is below the group threshold becomes exactly zero; the others shrink):
        >>> import torch
        >>> from lens_laai.fitting.solver import prox_sparse_group_lasso
        >>> v = torch.tensor([[3.0, 4.0], [0.3, -0.4], [1.0, 0.0]])
        >>> x = prox_sparse_group_lasso(v, step_l1=0.0, step_group=1.0)
        >>> x[0].tolist(), bool((x[1:] == 0).all())  # row 0: norm 5 → 4; rows 1 and 2: norms 0.5 and 1 → 0
        ([2.4000000953674316, 3.200000047683716], True)
        >>> x = prox_sparse_group_lasso(v, step_l1=0.25, step_group=0.5)
        >>> (x.norm(dim=-1) > 0).tolist(), round(x[2, 0].item(), 4)  # row 2: 1 → 0.75 (l1), then × (1 − 0.5/0.75)
        ([True, False, True], 0.25)
    """
    u = torch.sign(v) * torch.clamp(v.abs() - step_l1, min=0.0)
    norms = u.norm(dim=-1, keepdim=True)
    scale = torch.clamp(1.0 - step_group / torch.where(norms > 0, norms, torch.ones_like(norms)), min=0.0)
    return torch.where(norms > 0, u * scale, torch.zeros_like(u))


@dataclass
class StepRecord:
    """One iteration of :func:`fista`: the objective at the iterate it ends on, and how it got there.

    ``lr`` is the step size the iteration used (the last one tried when ``accepted`` is false),
    ``backtracks`` the number of trial steps it rejected, ``accepted`` whether it moved (false
    when backtracking ran out), ``restarted`` whether it reset the momentum.

    Example (the first step of a two-head problem: one head survives the group penalty):
        >>> import torch
        >>> from lens_laai.fitting.solver import fista
        >>> target = torch.tensor([[2.0, 0.0], [0.05, 0.0]])
        >>> f = lambda x: float(((x - target) ** 2).sum() / 2)
        >>> _, (record,) = fista(lambda x: (f(x), x - target), f, torch.zeros(2, 2), l1=0.0, group_l1=0.1, steps=1, lr=1.0)
        >>> record.step, record.n_selected, record.lr, record.backtracks, record.accepted, record.restarted
        (0, 1, 1.0, 0, True, False)
        >>> round(record.smooth, 5), round(record.penalty, 5), record.loss == record.smooth + record.penalty
        (0.00625, 0.19, True)
    """

    step: int
    loss: float
    smooth: float
    penalty: float
    n_selected: int
    lr: float
    backtracks: int
    accepted: bool
    restarted: bool


def _is_finite(value: float, tensor: Tensor | None = None) -> bool:
    """Whether ``value`` (and every entry of ``tensor``, if given) is finite."""
    return math.isfinite(value) and (tensor is None or bool(torch.isfinite(tensor).all()))


def fista(
    smooth_and_grad: Callable[[Tensor], tuple[float, Tensor]],
    smooth: Callable[[Tensor], float],
    x0: Tensor,
    l1: float,
    group_l1: GroupWeight,
    steps: int,
    lr: float,
    on_step: Callable[[StepRecord], None] | None = None,
    shrink: float = 0.5,
    grow: float = 1.25,
    max_backtracks: int = 30,
) -> tuple[Tensor, list[StepRecord]]:
    """Minimise ``f(x) + penalty(x, l1, group_l1)`` by FISTA with backtracking and adaptive restart.

    ``group_l1`` is one λ₂ or a ``[head, 1]`` tensor of one λ₂ per group (e.g. several independent
    problems stacked as rows, each with its own λ₂). ``smooth_and_grad(y)`` returns ``f(y)`` and its gradient, ``smooth(x)`` returns ``f(x)`` alone.
    A trial step from ``y`` is accepted when it passes the sufficient-decrease test of Beck &
    Teboulle (2009); otherwise the step size shrinks by ``shrink`` (by ``min(shrink, 0.01)`` when
    the trial point or its loss is not finite, so a wildly large ``lr`` recovers within the
    budget). A step that passed outright lets the next one grow by ``grow``, so a too-small
    ``lr`` recovers too. Losses within round-off of the test (relative 1e-6; 1e-12 for float64
    ``x0``) are accepted, since float32 noise must not shrink the step forever, but the next step
    is shrunk instead of grown. If ``max_backtracks`` trials all fail, the iteration does not
    move: it restarts the momentum and warns (``RuntimeWarning``) that ``lr`` is too large.

    Momentum follows Scheinberg, Goldfarb & Bai (2014) so that it stays consistent with steps that
    change size: ``t_{k+1} = (1 + sqrt(1 + 4 (lr_k / lr_{k+1}) t_k²)) / 2`` with ``lr_{k+1}`` the
    step proposed for the next iteration (backtracking can only make it smaller, which keeps
    ``lr_{k+1} t_{k+1}(t_{k+1} − 1) ≤ lr_k t_k²``, the condition of their analysis). Momentum
    restarts (O'Donoghue & Candès 2015) when the objective goes up, and when the extrapolated
    point has a non-finite loss or gradient (the gradient is then taken at the iterate instead).

    Returns the iterate with the lowest objective among ``x0`` and every accepted iterate (FISTA
    is not monotone, so the last one can be worse) and one :class:`StepRecord` per iteration.
    Raises :class:`~lens_laai.errors.FitError` for non-finite or out-of-range options or ``x0``,
    and when the loss or gradient is not finite at an accepted iterate (``x0`` included).

    Example:
        >>> import torch
        >>> from lens_laai.fitting.solver import fista
        >>> target = torch.tensor([[2.0, 0.0], [0.05, 0.0]])
        >>> f = lambda x: float(((x - target) ** 2).sum() / 2)
        >>> x, records = fista(lambda x: (f(x), x - target), f, torch.zeros(2, 2), l1=0.0, group_l1=0.1, steps=50, lr=1.0)
        >>> (x[1] == 0).all().item(), round(x[0, 0].item(), 3)  # head 1 switched off exactly
        (True, 1.9)
    """
    _check_options(x0, l1, group_l1, steps, lr, shrink, grow, max_backtracks)
    rel_slack = 1e-12 if x0.dtype == torch.float64 else 1e-6
    x = x0.detach().clone()
    f_x = pen_x = math.nan  # f(x) and penalty(x), known once the gradient at y = x0 comes back
    y, t = x, 1.0
    objective = best_objective = math.inf
    best = x
    history: list[StepRecord] = []
    for k in range(steps):
        if not lr > 0:  # the step size underflowed to zero (issue 23): no later step could move x
            warnings.warn(
                f"fista: the step size underflowed to zero after {k} steps; stopping there, as no further "
                "step can change Δ in floating point.",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        restarted = False
        f_y, g_y = smooth_and_grad(y)
        if not _is_finite(f_y, g_y) and y is not x:  # extrapolated too far: restart from x
            y, t, restarted = x, 1.0, True
            f_y, g_y = smooth_and_grad(y)
        if not _is_finite(f_y, g_y):
            where = "the starting point" if k == 0 else "the current iterate"
            raise FitError(
                f"the loss or its gradient is not finite (loss {f_y}) at step {k}, at {where}; "
                "the model or data produce non-finite logits: check the prompts and the model dtype "
                "(float32 rather than float16), and try a smaller lr."
            )
        if k == 0:
            f_x, pen_x = f_y, float(penalty(x, l1, group_l1))
            objective = best_objective = f_x + pen_x
        slack = rel_slack * max(1.0, abs(f_y))
        accepted, backtracks, used, next_lr = False, 0, lr, lr
        for backtracks in range(max_backtracks):
            used = lr
            x_new = prox_sparse_group_lasso(y - lr * g_y, lr * l1, lr * group_l1)
            f_new = smooth(x_new) if bool(torch.isfinite(x_new).all()) else math.nan
            if not math.isfinite(f_new):
                lr *= min(shrink, 0.01)
                continue
            d = x_new - y
            bound = f_y + float((g_y * d).sum()) + float((d * d).sum()) / (2 * lr)
            if f_new <= bound:  # grow only after a step that passed outright
                accepted, next_lr = True, lr * grow if backtracks == 0 else lr
                break
            if f_new <= bound + slack:  # passed within round-off: the step is at its limit
                accepted, next_lr = True, lr * shrink
                break
            lr *= shrink
        if accepted:
            pen_new = float(penalty(x_new, l1, group_l1))
            new_objective = f_new + pen_new
            if new_objective > objective:
                y, t, restarted = x_new, 1.0, True
            else:
                ratio = lr / next_lr if next_lr > 0 else 1.0
                t_next = (1.0 + math.sqrt(1.0 + 4.0 * ratio * t * t)) / 2.0
                y = x_new + ((t - 1.0) / t_next) * (x_new - x)
                t = t_next
            x, f_x, pen_x, objective, lr = x_new, f_new, pen_new, new_objective, next_lr
            if objective < best_objective:
                best, best_objective = x, objective
        else:
            backtracks = max_backtracks
            y, t, restarted = x, 1.0, True
            warnings.warn(
                f"fista: backtracking ran out at step {k} with step size {used:.3g} (after "
                f"{max_backtracks} trials); the step was not taken. Use a smaller lr.",
                RuntimeWarning,
                stacklevel=2,
            )
        record = StepRecord(
            k,
            objective,
            f_x,
            pen_x,
            int((x.norm(dim=-1) > 0).sum()),
            used,
            backtracks,
            accepted,
            restarted,
        )
        history.append(record)
        if on_step is not None:
            on_step(record)
    return best, history


def _check_options(
    x0: Tensor, l1: float, group_l1: GroupWeight, steps: int, lr: float, shrink: float, grow: float, max_backtracks: int
) -> None:
    """Raise :class:`FitError` for options under which :func:`fista` cannot run."""
    problems = []
    if isinstance(group_l1, Tensor):
        group_ok = group_l1.shape == (x0.shape[0], 1) and bool((torch.isfinite(group_l1) & (group_l1 >= 0)).all())
    else:
        group_ok = math.isfinite(group_l1) and group_l1 >= 0
    if not (math.isfinite(l1) and l1 >= 0) or not group_ok:
        problems.append(
            f"l1 and group_l1 must be finite and >= 0, group_l1 a number or one per row of x0 ([{x0.shape[0]}, 1]) "
            f"(got {l1}, {group_l1 if not isinstance(group_l1, Tensor) else tuple(group_l1.shape)})"
        )
    if not (math.isfinite(lr) and lr > 0):
        problems.append(f"lr must be finite and > 0 (got {lr})")
    if not 0 < shrink < 1 or not (math.isfinite(grow) and grow >= 1) or max_backtracks < 1 or steps < 0:
        problems.append(
            f"need 0 < shrink < 1, grow >= 1, max_backtracks >= 1, steps >= 0 "
            f"(got {shrink}, {grow}, {max_backtracks}, {steps})"
        )
    if not bool(torch.isfinite(x0).all()):
        problems.append("the starting point has non-finite entries")
    if problems:
        raise FitError("fista cannot run: " + "; ".join(problems) + ".")
