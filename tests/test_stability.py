"""Stability selection: complementary pairs, one batched fit that equals the separate fits, the bound."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lens_laai import FitError, PromptTemplate
from lens_laai.fastpath import CostMeter, LayerRunner
from lens_laai.fitting import FitConfig
from lens_laai.fitting.layer_fit import delta_hooks, training_batches
from lens_laai.fitting.stability import _stacked_runner, complementary_pairs, stability
from lens_laai.interventions.head import delta_hook


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_complementary_pairs_halve_the_pairs():
    subsets = complementary_pairs(11, 6, seed=3)
    assert len(subsets) == 6 and all(len(s) == 5 for s in subsets)
    for a, b in zip(subsets[::2], subsets[1::2]):
        assert not set(a) & set(b), "each half and its complement are disjoint"
    assert complementary_pairs(11, 6, seed=3) == subsets and complementary_pairs(11, 6, seed=4) != subsets
    with pytest.raises(FitError, match="even number"):
        complementary_pairs(10, 5, seed=0)


@pytest.mark.parametrize("fast", [True, False])
def test_the_batched_fit_computes_each_subsample_as_its_own_fit(tiny, task, fast):
    train = task.subset(list(range(8)))
    cfg = FitConfig(batch_size=8, fast=fast)
    subsets = complementary_pairs(8, 4, seed=0)
    runner = _stacked_runner(tiny, train, subsets, 1, cfg, PromptTemplate(), CostMeter())
    deltas = torch.randn(4, tiny.cfg.n_heads, tiny.cfg.d_head, generator=torch.Generator().manual_seed(0))
    owner = torch.tensor([s for s, subset in enumerate(subsets) for _ in subset])
    with torch.no_grad():
        stacked = runner.logits(0, [("blocks.1.attn.hook_z", delta_hook(deltas[owner]))])
    for s, subset in enumerate(subsets):
        alone = LayerRunner(tiny, training_batches(tiny, train.subset(subset), train, cfg, PromptTemplate()), 1, fast)
        with torch.no_grad():
            expected = alone.logits(0, delta_hooks(1, deltas[s]))
        assert torch.allclose(stacked[owner == s], expected, atol=1e-5)


def test_stability_probabilities_tensor_and_bound(tiny, task):
    st = stability(tiny, task, layer=1, n_train=10, n_subsamples=6, steps=2, progress=False)
    assert list(st.table.columns) == ["layer", "head", "selection_probability"] and len(st.table) == tiny.cfg.n_heads
    assert st.scores.shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)
    assert torch.isnan(st.scores[0]).all() and not torch.isnan(st.scores[1]).any()
    assert ((st.table.selection_probability * 6).round(6) % 1 == 0).all(), "fractions of the 6 half-sample fits"
    assert math.isclose(st.error_bound, st.q**2 / ((2 * st.threshold - 1) * tiny.cfg.n_heads))
    assert set(st.stable_heads(0.51)) >= set(st.stable_heads())
    summary = st.summary([(1, 0)])
    assert summary["n_subsamples"] == 6 and "L1H0" in summary["selected_heads_probability"]
    fixed = stability(tiny, task, layer=1, n_train=10, n_subsamples=4, steps=2, lam=0.9, progress=False)
    assert fixed.lam == 0.9 and set(fixed.path.group_l1_rel) == {0.9}, "Λ stops at the λ₂ given"
    assert st.heatmap().axes[0].get_xlabel() == "head"
    with pytest.raises(FitError, match="threshold"):
        stability(tiny, task, layer=1, threshold=0.5, progress=False)
