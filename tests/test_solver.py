import math
import warnings

import pytest
import torch

from lens_laai.errors import FitError
from lens_laai.fitting.solver import fista, penalty, prox_sparse_group_lasso


def test_prox_matches_hand_computation():
    v = torch.tensor([[3.0, -4.0, 0.5], [0.2, -0.1, 0.3], [1.0, 0.0, -1.0]])
    out = prox_sparse_group_lasso(v, step_l1=0.5, step_group=1.0)
    # row 0: soft-threshold -> [2.5, -3.5, 0], norm sqrt(18.5); shrink by (1 - 1/sqrt(18.5))
    scale = 1 - 1 / math.sqrt(2.5**2 + 3.5**2)
    assert torch.allclose(out[0], torch.tensor([2.5 * scale, -3.5 * scale, 0.0]))
    # row 1: every entry under the l1 threshold -> exactly zero
    assert torch.equal(out[1], torch.zeros(3))
    # row 2: soft-threshold -> [0.5, 0, -0.5], norm 0.707 < 1 -> whole group exactly zero
    assert torch.equal(out[2], torch.zeros(3))


def test_prox_is_the_minimiser():
    torch.manual_seed(0)
    v = torch.randn(5, 4)
    x = prox_sparse_group_lasso(v, 0.3, 0.6)

    def objective(z):
        return 0.5 * ((z - v) ** 2).sum() + penalty(z, 0.3, 0.6)

    for _ in range(200):
        assert objective(x) <= objective(x + 0.01 * torch.randn_like(x)) + 1e-6


def test_fista_reaches_the_closed_form_on_a_quadratic():
    torch.manual_seed(1)
    v = torch.randn(6, 8) * 2
    v[::2] *= 0.2  # small rows: their groups should switch off

    def smooth(x):
        return float(0.5 * ((x - v) ** 2).sum())

    def smooth_and_grad(x):
        return smooth(x), x - v

    x, history = fista(smooth_and_grad, smooth, torch.zeros_like(v), 0.2, 1.5, steps=100, lr=5.0)
    expected = prox_sparse_group_lasso(v, 0.2, 1.5)
    assert torch.allclose(x, expected, atol=1e-5)
    zero_rows = expected.norm(dim=-1) == 0
    assert zero_rows.any(), "the example should switch some groups off"
    assert torch.equal(x[zero_rows], torch.zeros_like(x[zero_rows]))
    assert history[-1].n_selected == int((~zero_rows).sum())


# --- fista: convergence, best iterate, backtracking, non-finite values, momentum ------------

HEADS, D_HEAD = 6, 4


def _objective(smooth, x, l1, group_l1):
    return smooth(x) + float(penalty(x, l1, group_l1))


@pytest.fixture(scope="module")
def ill_conditioned():
    """f(x) = ½(x−b)ᵀA(x−b), eigenvalues of A from 1 to 1000, with a reference solution.

    The reference is 20,000 proximal-gradient steps with the fixed step 1/L (float64): the
    error contracts by (1 − 1/1000) per step, so it is exact to round-off.
    """
    g = torch.Generator().manual_seed(0)
    n = HEADS * D_HEAD
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, 3, n, dtype=torch.float64)) @ q.T
    b = torch.randn(HEADS, D_HEAD, generator=g, dtype=torch.float64) * 2
    b[::2] *= 0.05
    l1, group_l1 = 0.5, 3.0

    def smooth(x):
        r = (x - b).reshape(-1)
        return float(0.5 * r @ a @ r)

    def smooth_and_grad(x):
        r = (x - b).reshape(-1)
        return float(0.5 * r @ a @ r), (a @ r).reshape(HEADS, D_HEAD)

    x = torch.zeros(HEADS, D_HEAD, dtype=torch.float64)
    for _ in range(20_000):
        x = prox_sparse_group_lasso(x - smooth_and_grad(x)[1] / 1000.0, l1 / 1000.0, group_l1 / 1000.0)
    return smooth, smooth_and_grad, l1, group_l1, x, _objective(smooth, x, l1, group_l1)


@pytest.mark.parametrize("grow", [1.25, 1.0])
def test_fista_matches_a_long_proximal_gradient_run_on_an_ill_conditioned_quadratic(ill_conditioned, grow):
    smooth, smooth_and_grad, l1, group_l1, x_ref, f_ref = ill_conditioned
    zero_ref = x_ref.norm(dim=-1) == 0
    assert zero_ref.any() and not zero_ref.all()
    x0 = torch.zeros(HEADS, D_HEAD, dtype=torch.float64)
    x, history = fista(smooth_and_grad, smooth, x0, l1, group_l1, steps=400, lr=1.0, grow=grow)  # 1/L = 1e-3
    assert any(r.backtracks > 0 for r in history)
    assert any(r.restarted for r in history)
    assert all(r.accepted for r in history)
    assert _objective(smooth, x, l1, group_l1) == pytest.approx(f_ref, rel=1e-10)
    assert torch.equal(x.norm(dim=-1) == 0, zero_ref)
    assert torch.allclose(x, x_ref, atol=1e-6)


@pytest.mark.parametrize("group_l1", [0.0, 0.4])
def test_fista_solves_an_orthogonal_design_lasso_exactly(group_l1):
    # f(w) = ½‖Xw − y‖² with XᵀX = I equals ½‖w − Xᵀy‖² + const, so the solution is prox(Xᵀy).
    g = torch.Generator().manual_seed(3)
    design, _ = torch.linalg.qr(torch.randn(40, HEADS * D_HEAD, generator=g, dtype=torch.float64))
    target = torch.randn(40, generator=g, dtype=torch.float64)
    l1 = 0.3

    def smooth(w):
        return float(0.5 * ((design @ w.reshape(-1) - target) ** 2).sum())

    def smooth_and_grad(w):
        r = design @ w.reshape(-1) - target
        return float(0.5 * (r**2).sum()), (design.T @ r).reshape(HEADS, D_HEAD)

    expected = prox_sparse_group_lasso((design.T @ target).reshape(HEADS, D_HEAD), l1, group_l1)
    x0 = torch.zeros(HEADS, D_HEAD, dtype=torch.float64)
    x, _ = fista(smooth_and_grad, smooth, x0, l1, group_l1, steps=60, lr=0.05)
    assert torch.allclose(x, expected, rtol=0, atol=1e-6)
    assert (expected == 0).any()
    assert torch.equal(x == 0, expected == 0)


def test_fista_returns_the_best_iterate_not_the_last(ill_conditioned):
    smooth, smooth_and_grad, l1, group_l1, _, _ = ill_conditioned
    x0 = torch.zeros(HEADS, D_HEAD, dtype=torch.float64)
    # constant step 1/L (grow=1): plain FISTA, whose momentum overshoots on this problem
    _, history = fista(smooth_and_grad, smooth, x0, l1, group_l1, steps=200, lr=1e-3, grow=1.0)
    # the first step at which the objective clearly went up
    k = next(i for i in range(1, len(history)) if history[i].loss > history[i - 1].loss * (1 + 1e-6))
    x, history = fista(smooth_and_grad, smooth, x0, l1, group_l1, steps=k + 1, lr=1e-3, grow=1.0)
    best = min([_objective(smooth, x0, l1, group_l1)] + [r.loss for r in history])
    assert history[-1].loss > best * (1 + 1e-6)
    assert history[-1].restarted
    assert _objective(smooth, x, l1, group_l1) == pytest.approx(best, rel=1e-14)


def test_fista_returns_x0_when_nothing_beats_it():
    v = torch.tensor([[0.1, -0.2], [0.05, 0.0]], dtype=torch.float64)

    def smooth(x):
        return float(0.5 * ((x - v) ** 2).sum())

    x0 = torch.zeros_like(v)  # the solution: prox(v) is zero for these penalties
    x, history = fista(lambda x: (smooth(x), x - v), smooth, x0, 1.0, 1.0, steps=5, lr=1.0)
    assert torch.equal(x, x0)
    assert all(r.loss == pytest.approx(smooth(x0)) for r in history)


def test_fista_does_not_move_when_backtracking_runs_out():
    v = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)

    def smooth(x):  # L = 100: the sufficient-decrease test needs lr <= 0.01
        return float(50.0 * ((x - v) ** 2).sum())

    gradient_points = []

    def smooth_and_grad(x):
        gradient_points.append(x.clone())
        return smooth(x), 100.0 * (x - v)

    x0 = torch.zeros_like(v)
    with pytest.warns(RuntimeWarning, match="backtracking ran out at step 0 with step size 1e\\+03"):
        x, history = fista(smooth_and_grad, smooth, x0, 0.0, 0.0, steps=1, lr=1e3, max_backtracks=1)
    assert torch.equal(x, x0)
    assert not history[0].accepted and history[0].restarted
    assert history[0].backtracks == 1 and history[0].lr == 1e3
    assert history[0].loss == smooth(x0)

    # 4 trials per step: the first 4 steps run out (1e3 → 1e3/2**16 > 0.01), then it recovers
    gradient_points.clear()
    with pytest.warns(RuntimeWarning) as caught:
        x, history = fista(smooth_and_grad, smooth, x0, 0.0, 0.0, steps=40, lr=1e3, max_backtracks=4)
    rejected = [r.step for r in history if not r.accepted]
    assert rejected == [0, 1, 2, 3]
    assert [str(w.message).split(" with")[0] for w in caught] == [
        f"fista: backtracking ran out at step {k}" for k in rejected
    ]
    assert [r.lr for r in history[:4]] == [1e3 / 2**i for i in (3, 7, 11, 15)]
    assert all(r.loss == smooth(x0) for r in history[:4])
    assert all(torch.equal(p, x0) for p in gradient_points[:5])  # x stayed at x0 until step 4
    assert history[4].accepted
    assert torch.allclose(x, v, atol=1e-8)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_fista_recovers_from_a_huge_lr_where_the_loss_is_not_finite(bad):
    b = torch.tensor([[1.0, -0.5, 0.2], [0.1, 0.05, -0.1]], dtype=torch.float64)

    def smooth(x):  # cosh overflows to inf beyond |x − b| ≈ 710
        value = float(torch.cosh(x - b).sum())
        return value if math.isfinite(value) else bad

    def smooth_and_grad(x):
        return smooth(x), torch.sinh(x - b)

    x0 = torch.zeros_like(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recovers inside the backtracking budget: no warning
        x, history = fista(smooth_and_grad, smooth, x0, 0.05, 0.2, steps=150, lr=1e30)
    reference, _ = fista(smooth_and_grad, smooth, x0, 0.05, 0.2, steps=3000, lr=0.1)
    assert history[0].accepted and history[0].backtracks > 10
    assert all(math.isfinite(r.loss) and math.isfinite(r.lr) for r in history)
    assert torch.isfinite(x).all()
    assert _objective(smooth, x, 0.05, 0.2) == pytest.approx(_objective(smooth, reference, 0.05, 0.2), rel=1e-10)


def test_fista_falls_back_to_the_iterate_when_the_momentum_point_is_not_finite():
    b = torch.full((3, 2), 2.0, dtype=torch.float64)
    calls = {"nan": 0}

    def smooth(x):  # undefined past 2.05: momentum overshoots the minimiser at 2 into it
        return float(0.5 * ((x - b) ** 2).sum()) if bool((x < 2.05).all()) else math.nan

    def smooth_and_grad(x):
        value = smooth(x)
        calls["nan"] += math.isnan(value)
        return value, (x - b) if math.isfinite(value) else torch.full_like(x, math.nan)

    x, history = fista(smooth_and_grad, smooth, torch.zeros_like(b), 0.0, 0.0, steps=60, lr=0.05, grow=1.0)
    assert calls["nan"] >= 1
    assert any(r.restarted for r in history)
    assert all(math.isfinite(r.loss) for r in history)
    assert torch.allclose(x, b, atol=1e-6)


def test_fista_raises_fit_error_for_a_non_finite_loss_at_x0():
    def smooth(x):
        return math.nan

    with pytest.raises(FitError, match="not finite .* at step 0.*non-finite logits"):
        fista(lambda x: (math.nan, torch.zeros_like(x)), smooth, torch.zeros(2, 3), 0.1, 0.1, steps=5, lr=1.0)
    # a finite loss with a non-finite gradient at x0 is the same problem
    with pytest.raises(FitError, match="not finite"):
        fista(lambda x: (1.0, torch.full_like(x, math.inf)), lambda x: 1.0, torch.zeros(2, 3), 0.1, 0.1, 5, 1.0)


@pytest.mark.parametrize(
    "l1, group_l1, lr, x0",
    [
        (math.nan, 0.1, 1.0, torch.zeros(2, 3)),
        (0.1, math.inf, 1.0, torch.zeros(2, 3)),
        (0.1, 0.1, math.inf, torch.zeros(2, 3)),
        (0.1, 0.1, 0.0, torch.zeros(2, 3)),
        (-0.1, 0.1, 1.0, torch.zeros(2, 3)),
        (0.1, 0.1, 1.0, torch.tensor([[0.0, math.nan, 0.0], [0.0, 0.0, 0.0]])),
    ],
)
def test_fista_rejects_non_finite_options_at_entry(l1, group_l1, lr, x0):
    def never(x):
        raise AssertionError("the loss must not be evaluated")

    with pytest.raises(FitError, match="fista cannot run"):
        fista(never, never, x0, l1, group_l1, steps=5, lr=lr)


def test_fista_momentum_follows_the_step_size_changes(ill_conditioned):
    # Scheinberg, Goldfarb & Bai (2014): t_{k+1} = (1 + sqrt(1 + 4 (lr_k / lr_{k+1}) t_k²)) / 2, with
    # lr_{k+1} the step proposed after step k (= the next step before its backtracking), and the
    # gradient of step k+1 taken at y = x_k + ((t_k − 1) / t_{k+1}) (x_k − x_{k−1}).
    smooth, smooth_and_grad, l1, group_l1, _, _ = ill_conditioned
    points: dict[str, list[torch.Tensor]] = {"y": [], "x": []}
    last_trial = []

    def recording_smooth(x):
        last_trial[:] = [x.clone()]
        return smooth(x)

    def recording_grad(y):
        points["y"].append(y.clone())
        return smooth_and_grad(y)

    def on_step(record):
        points["x"].append(last_trial[0] if record.accepted else points["x"][-1])

    x0 = torch.zeros(HEADS, D_HEAD, dtype=torch.float64)
    points["x"].append(x0)
    shrink, grow = 0.5, 1.25
    _, history = fista(recording_grad, recording_smooth, x0, l1, group_l1, 80, 1e-4, on_step, shrink, grow)
    xs, ys = points["x"], points["y"]  # xs[k + 1] is the iterate after step k; ys[k] where step k started
    assert len(ys) == len(history)
    t, checked, grown = 1.0, 0, 0
    for k in range(len(history) - 1):
        r, nxt = history[k], history[k + 1]
        if r.restarted:
            t = 1.0
            assert torch.equal(ys[k + 1], xs[k + 1])
            continue
        proposed = nxt.lr / shrink**nxt.backtracks
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * (r.lr / proposed) * t * t)) / 2.0
        expected = xs[k + 1] + ((t - 1.0) / t_next) * (xs[k + 1] - xs[k])
        assert torch.allclose(ys[k + 1], expected, rtol=0, atol=1e-12), k
        t, checked, grown = t_next, checked + 1, grown + (proposed > r.lr)
    assert checked > 40 and grown > 10  # the steps grew often, so a constant-step t would not match
