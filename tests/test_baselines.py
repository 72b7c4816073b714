import json
import re

import pandas as pd
import pytest
import torch

from lens_laai import FitError, HeadIntervention, InterventionError, TaskError, evaluate
from lens_laai.baselines import (
    ResidualIntervention,
    causal_indirect_effect,
    fit_function_vector,
    fit_mean_difference,
    function_vector,
    head_outputs,
    mean_head_activations,
    prompting_baseline,
    prompting_cost,
    shuffled_label_batch,
    top_heads,
)
from lens_laai.fastpath.recording import last_token_z
from lens_laai.models.loading import model_fingerprint, model_name
from lens_laai.tasks.prompts import iter_batches, k_shot_prompts
from lens_laai.testing import tiny_model

PROMPT = torch.tensor([[1, 20, 21, 22, 23, 24]])


@pytest.fixture(scope="module")
def splits(task):
    return task.split(0, 8, 4)


def make_fv(model, layer=1, scale=2.0, seed=0):
    torch.manual_seed(seed)
    return ResidualIntervention(
        scale * torch.randn(model.cfg.d_model), layer, model_name(model), model_fingerprint(model)
    )


def test_residual_changes_only_its_layer_and_position(tiny):
    iv = make_fv(tiny, layer=1)
    _, base = tiny.run_with_cache(PROMPT)
    with iv.apply(tiny):
        _, cache = tiny.run_with_cache(PROMPT)
    for name in base.keys():
        if name.startswith(("blocks.0.", "embed.", "hook_embed")) or (
            name.startswith("blocks.1.") and name not in ("blocks.1.hook_resid_post", "blocks.1.hook_out")
        ):
            assert torch.equal(base[name], cache[name]), f"{name} changed at or below the intervened layer"
    r0, r1 = base["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"]
    assert torch.equal(r0[:, :-1], r1[:, :-1]), "earlier positions must not change"
    assert torch.allclose(r1[:, -1] - r0[:, -1], iv.vector[None], atol=1e-6)
    assert torch.equal(base["blocks.2.hook_resid_pre"][:, :-1], cache["blocks.2.hook_resid_pre"][:, :-1])
    assert not torch.equal(base["blocks.2.hook_resid_post"][:, -1], cache["blocks.2.hook_resid_post"][:, -1])


def test_residual_leaves_model_bit_identical_also_after_exception(tiny):
    before = tiny(PROMPT)
    iv = make_fv(tiny)
    with iv.apply(tiny):
        during = tiny(PROMPT)
    assert not torch.equal(before, during)
    assert torch.equal(tiny(PROMPT), before)
    with pytest.raises(RuntimeError, match="boom"), iv.apply(tiny):
        tiny(PROMPT)
        raise RuntimeError("boom")
    assert torch.equal(tiny(PROMPT), before)
    assert torch.equal(tiny.run_with_hooks(PROMPT, fwd_hooks=iv.fwd_hooks()), during)


def test_residual_algebra(tiny):
    a, b = make_fv(tiny, seed=0), make_fv(tiny, seed=1)
    assert torch.equal((a + b).vector, a.vector + b.vector)
    assert torch.equal((2.0 * a).vector, a.vector * 2) and torch.equal((a * 2).vector, a.vector * 2)
    assert torch.equal((a - a).vector, torch.zeros_like(a.vector))
    with pytest.raises(InterventionError, match="different layers"):
        a + make_fv(tiny, layer=2)
    with pytest.raises(InterventionError, match="out of range"):
        make_fv(tiny, layer=3)


def test_residual_save_load_round_trip_and_fingerprint(tiny, tmp_path):
    iv = make_fv(tiny)
    iv.metadata = {"name": "x", "fit_config": {"seed": 3}}
    iv.save(tmp_path / "fv")
    loaded = ResidualIntervention.load(tmp_path / "fv", model=tiny)
    assert loaded.equals(iv)
    manifest = json.loads((tmp_path / "fv" / "manifest.json").read_text())
    assert manifest["hook_name"] == "blocks.1.hook_resid_post" and manifest["fingerprint"] == iv.fingerprint
    iv.save(tmp_path / "fv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fv"]
    other = tiny_model(n_heads=2, n_kv_heads=1)
    with pytest.raises(InterventionError, match="does not fit this model"):
        ResidualIntervention.load(tmp_path / "fv", model=other)
    with pytest.raises(InterventionError, match="not a saved ResidualIntervention"):
        ResidualIntervention.load(tmp_path / "nothing")


def test_w_o_decomposition_sums_to_attention_output(tiny):
    _, cache = tiny.run_with_cache(PROMPT)
    for layer in range(tiny.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        per_head = head_outputs(tiny, layer, z)
        assert per_head.shape == (*z.shape[:3], tiny.cfg.d_model)
        assert tiny.blocks[layer].attn.o.original_component.bias is None
        direct = tiny.blocks[layer].attn.o.original_component(z.flatten(-2))
        assert torch.allclose(per_head.sum(-2), direct, atol=1e-5)
        assert torch.allclose(per_head.sum(-2), cache[f"blocks.{layer}.attn.hook_out"], atol=1e-5)


def test_mean_activations_and_cie_table(tiny, splits):
    batches = list(iter_batches(tiny.tokenizer, *k_shot_prompts(splits.train, 3, splits.train, 0)))
    acts = mean_head_activations(tiny, batches, layers=[1, 2])
    assert acts.shape == (3, 4, 16) and acts[0].isnan().all() and acts[1:].isfinite().all()
    assert torch.allclose(acts[2], last_token_z(tiny, batches, [2])[:, 0].mean(0))
    with pytest.raises(ValueError, match="no values for layers"):
        causal_indirect_effect(tiny, splits, acts, n_prompts=4, shots=3, layers=[0], progress=False)
    kwargs = dict(n_prompts=5, shots=3, seed=1, layers=[1, 2], progress=False)
    a, b = causal_indirect_effect(tiny, splits, acts, **kwargs), causal_indirect_effect(tiny, splits, acts, **kwargs)
    assert list(a.columns) == ["layer", "head", "cie"] and len(a) == 2 * 4
    assert sorted(zip(a["layer"], a["head"])) == [(l, h) for l in (1, 2) for h in range(4)]
    assert a.equals(b) and a.attrs["forward_passes"] == 10 and a.attrs["forward_equivalents"] > 0
    vec = function_vector(tiny, acts, a, top_k=2)
    top = a.sort_values("cie", ascending=False).head(2)
    expected = sum(acts[l, h] @ tiny.blocks[l].attn.W_O[h] for l, h in zip(top["layer"], top["head"]))
    assert torch.allclose(vec, expected, atol=1e-6)


def test_shuffled_labels_break_the_mapping(tiny, splits):
    batch = shuffled_label_batch(tiny, splits.train, 6, 3, seed=0)
    truth = dict(splits.train.pairs)
    for prompt in batch.prompts:
        demos = [block.split("\nA: ") for block in prompt.split("\n\n")[:-1]]
        assert all(truth[q[3:]] != a for q, a in demos)
    with pytest.raises(TaskError, match="shots"):
        shuffled_label_batch(tiny, splits.train, 4, 1, seed=0)


def test_fit_function_vector_end_to_end(tiny, splits):
    result = fit_function_vector(
        tiny,
        splits,
        top_k=3,
        layers=[0, 1, 2],
        shots=3,
        cie_layers=[1, 2],
        n_prompts=4,
        scales=(1.0, 3.0),
        progress=False,
    )
    assert isinstance(result.intervention, ResidualIntervention) and result.layer in (0, 1, 2)
    assert len(result.sweep) == 6 and len(result.heads) == 3 and result.fast_path and result.scale in (1.0, 3.0)
    unscaled = function_vector(tiny, result.mean_acts, result.cie, top_k=3)
    assert torch.allclose(result.intervention.vector, result.scale * unscaled)
    assert result.valid_accuracy == result.sweep.valid_accuracy.max(), "the scale is chosen on validation"
    assert result.valid_accuracy >= result.sweep[result.sweep.scale == 1.0].valid_accuracy.max()
    assert result.forward_equivalents > 0 and result.seconds > 0
    scored = evaluate(tiny, splits, result.intervention)
    assert scored.n == len(splits.test) and 0.0 <= scored.accuracy <= 1.0
    assert result.intervention.metadata["fit_config"]["n_train"] == len(splits.train)


def test_fit_mean_difference_selects_top_k_heads(tiny, splits):
    result = fit_mean_difference(
        tiny, splits, "auto", layers=[1, 2], top_k=2, alphas=(1.0, 4.0), shots=3, progress=False
    )
    iv = result.intervention
    assert isinstance(iv, HeadIntervention) and iv.layers == [result.layer]
    assert len(iv.selected_heads()) == 2 and iv.heads().selected.sum() == 2
    chosen = result.scores[(result.scores.layer == result.layer) & result.scores.selected]
    assert sorted(chosen["head"]) == sorted(h for _, h in iv.selected_heads())
    assert chosen.norm.min() >= result.scores[result.scores.layer == result.layer].norm.nlargest(2).min()
    assert len(result.sweep) == 4 and result.alpha in (1.0, 4.0)
    assert evaluate(tiny, splits, iv).n == len(splits.test)
    sep = fit_mean_difference(tiny, splits, 1, top_k=1, alphas=(1.0,), shots=3, select_by="separation", progress=False)
    assert len(sep.intervention.selected_heads()) == 1
    again = fit_mean_difference(
        tiny, splits, 1, top_k=1, alphas=(1.0,), shots=3, select_by="separation", progress=False
    )
    assert torch.equal(again.intervention.deltas[1], sep.intervention.deltas[1])
    with pytest.raises(ValueError, match="top_k"):
        fit_mean_difference(tiny, splits, 1, top_k=5, shots=3, progress=False)


def test_prompting_baseline_and_cost(tiny, splits):
    zero, few = prompting_baseline(tiny, splits, 0), prompting_baseline(tiny, splits, 3)
    assert zero.n == few.n == len(splits.test)
    assert zero.accuracy == evaluate(tiny, splits, shots=0).accuracy
    assert prompting_cost(tiny, splits, 0) == 1.0 and prompting_cost(tiny, splits, 3) > 2.0
    assert prompting_baseline(tiny, splits, 8).n == len(splits.test)  # test queries may use all 8 train pairs
    with pytest.raises(TaskError, match="shots ≤ 8"):
        prompting_baseline(tiny, splits, 9)
    with pytest.raises(TaskError, match="shots ≤ 7"):
        prompting_baseline(tiny, splits, 8, split="train")  # a train query is never its own demonstration


BAD_OPTIONS = {
    "mean-difference top_k": (
        lambda m, s: fit_mean_difference(m, s, 1, top_k=0, shots=3),
        "top_k",
        "heads of the layer",
    ),
    "mean-difference select_by": (
        lambda m, s: fit_mean_difference(m, s, 1, select_by="max", shots=3),
        "select_by",
        "one of the two",
    ),
    "mean-difference alphas": (lambda m, s: fit_mean_difference(m, s, 1, alphas=(), shots=3), "alphas", "default"),
    "mean-difference layer": (lambda m, s: fit_mean_difference(m, s, "1", shots=3), "layer must be", "auto"),
    "mean-difference layers": (lambda m, s: fit_mean_difference(m, s, layers=[9], shots=3), "0..2", "None"),
    "function-vector layers": (lambda m, s: fit_function_vector(m, s, layers=["x"], shots=3), "layers", "None"),
    "function-vector scales": (lambda m, s: fit_function_vector(m, s, scales=[-1.0], shots=3), "scales", "(1.0,)"),
    "CIE n_prompts": (
        lambda m, s: causal_indirect_effect(m, s, torch.zeros(3, 4, 16), n_prompts=0, shots=3),
        "n_prompts",
        "pass how many",
    ),
    "CIE missing layers": (
        lambda m, s: causal_indirect_effect(m, s, torch.full((3, 4, 16), float("nan")), n_prompts=2, shots=3),
        "no values for layers",
        "mean_head_activations",
    ),
    "top_heads top_k": (
        lambda m, s: top_heads(pd.DataFrame({"layer": [0], "head": [0], "cie": [1.0]}), 2),
        "top_k",
        "pick one",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_baseline_options_are_fit_errors_that_name_the_fix(tiny, splits, case):
    """Each bad option is our :class:`FitError` (still a ValueError), raised before any model work."""
    call, problem, fix = BAD_OPTIONS[case]
    with pytest.raises(FitError, match=re.escape(problem)) as err:
        call(tiny, splits)
    assert isinstance(err.value, ValueError) and fix in str(err.value), str(err.value)
