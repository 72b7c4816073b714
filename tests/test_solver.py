import math

import torch

from lens_laai.solver import fista, penalty, prox_sparse_group_lasso


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
