"""The intervention API a TransformerLens user expects: one protocol, positions, generation, own data."""

import warnings

import pytest
import torch

from lens_laai import (
    FitError,
    HeadIntervention,
    Intervention,
    PromptTemplate,
    Task,
    TaskError,
    evaluate,
    evaluate_many,
    fit,
    generate,
    load_intervention,
)
from lens_laai.baselines import ResidualIntervention
from lens_laai.fitting import FitConfig
from lens_laai.models.loading import model_fingerprint
from lens_laai.testing import TINY_PAIRS

PROMPTS = ["Q: hot\nA:", "Q: big big big big\nA:"]


def head_iv(model, layer=1, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return HeadIntervention.from_deltas(
        model, {layer: scale * torch.randn(model.cfg.n_heads, model.cfg.d_head, generator=g)}
    )


def resid_iv(model, layer=1):
    return ResidualIntervention(
        3 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)),
        layer,
        "tiny",
        model_fingerprint(model),
    )


def right_padded(model):
    rows = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    rows = [[model.tokenizer.bos_token_id] + r for r in rows]
    width = max(map(len, rows))
    ids = torch.tensor([r + [model.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, [len(r) - 1 for r in rows]


# one protocol ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [head_iv, resid_iv])
def test_every_intervention_follows_the_protocol(tiny, tmp_path, make):
    iv = make(tiny)
    assert isinstance(iv, Intervention)
    ids = torch.tensor([[1, 20, 21, 22]])
    with iv.apply(tiny, scale=2.0):
        scaled = tiny(ids)
    assert torch.allclose(scaled, tiny.run_with_hooks(ids, fwd_hooks=(2.0 * iv).fwd_hooks()))
    iv.save(tmp_path / "iv")
    loaded = load_intervention(tmp_path / "iv", model=tiny)
    assert type(loaded) is type(iv) and loaded.equals(iv)
    half = iv.to(dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in half._tensors().values())
    assert all(torch.equal(a, b) for a, b in zip((iv - iv)._tensors().values(), (0.0 * iv)._tensors().values()))


def test_evaluate_many_accepts_residual_interventions(tiny):
    splits = Task("t", list(TINY_PAIRS)).split(0, 8, 4)
    ivs = [resid_iv(tiny), head_iv(tiny, layer=2)]
    table = evaluate_many(tiny, splits, ivs)
    for row, iv in zip(table.itertuples(), ivs):
        single = evaluate(tiny, splits, iv)
        assert row.accuracy == single.accuracy
        assert abs(row.mean_target_logprob - single.table.target_logprob.mean()) < 1e-4


def test_from_deltas_head_norms_and_residual_image(tiny):
    iv = head_iv(tiny, layer=1)
    iv.deltas[1][3] = 0
    norms = iv.head_norms()
    assert norms.shape == (3, 4) and torch.equal(norms[[0, 2]], torch.zeros(2, 4)) and norms[1, 3] == 0
    assert torch.allclose(norms[1], iv.deltas[1].norm(dim=-1))
    ids = torch.tensor([[1, 20, 21, 22]])
    _, base = tiny.run_with_cache(ids)
    with iv.apply(tiny):
        _, cache = tiny.run_with_cache(ids)
    change = cache["blocks.1.hook_resid_mid"][0, -1] - base["blocks.1.hook_resid_mid"][0, -1]
    assert torch.allclose(iv.residual_image(tiny)[1], change, atol=1e-4)


# positions ---------------------------------------------------------------------------------------
def test_last_means_the_last_real_token_under_right_padding(tiny):
    iv = head_iv(tiny)
    ids, mask, last = right_padded(tiny)
    singles = []
    for row in range(2):
        with iv.apply(tiny):
            singles.append(tiny(ids[row : row + 1, : last[row] + 1])[0, -1])
    with iv.apply(tiny):
        batched = tiny(ids, attention_mask=mask)
    plain = tiny.run_with_hooks(ids, attention_mask=mask, fwd_hooks=iv.fwd_hooks(attention_mask=mask))
    for row in range(2):
        assert torch.allclose(batched[row, last[row]], singles[row], atol=1e-4)
        assert torch.allclose(plain[row, last[row]], singles[row], atol=1e-4)
    wrong = tiny.run_with_hooks(ids, attention_mask=mask, fwd_hooks=iv.fwd_hooks())
    assert not torch.allclose(wrong[0, last[0]], singles[0], atol=1e-4), "without the mask, -1 is a padding token"


def test_apply_leaves_no_hook_behind_after_an_exception(tiny):
    ids = torch.tensor([[1, 20, 21, 22]])
    before = tiny(ids)
    with pytest.raises(RuntimeError, match="boom"), head_iv(tiny).apply(tiny):
        tiny(ids)
        raise RuntimeError("boom")
    assert not tiny._forward_pre_hooks and torch.equal(tiny(ids), before)


def test_apply_reads_the_padding_of_a_batch_of_strings(tiny):
    iv = head_iv(tiny)
    assert tiny.tokenizer.padding_side == "right"
    with iv.apply(tiny):
        batched = tiny(PROMPTS)
        single = tiny(PROMPTS[0])
    length = tiny.to_tokens(PROMPTS[0]).shape[-1]
    assert torch.allclose(batched[0, length - 1], single[0, -1], atol=1e-4)


# generation --------------------------------------------------------------------------------------
def test_generate_batches_and_samples_reproducibly(tiny):
    iv = head_iv(tiny)
    batch = generate(tiny, PROMPTS, iv, max_new_tokens=5)
    assert batch == [generate(tiny, p, iv, max_new_tokens=5) for p in PROMPTS]
    a = generate(tiny, PROMPTS, iv, max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a == generate(tiny, PROMPTS, iv, max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert isinstance(a, list) and len(a) == 2
    with pytest.raises(TaskError, match="delta_at"):
        generate(tiny, PROMPTS[0], iv, delta_at="always")


def test_generate_default_acts_at_the_last_prompt_token_only(tiny):
    iv = head_iv(tiny, scale=8.0)
    prompt_only = generate(tiny, PROMPTS[0], iv, max_new_tokens=6, use_past_kv_cache=False)
    every = generate(tiny, PROMPTS[0], iv, max_new_tokens=6, delta_at="every_token", use_past_kv_cache=False)
    assert prompt_only == generate(tiny, PROMPTS[0], iv, max_new_tokens=6)
    assert prompt_only != every


# your own data -----------------------------------------------------------------------------------
def test_fit_on_your_own_prompt_target_pairs(tiny):
    pairs = [(f"Q: {a}\nA:", f" {b}") for a, b in TINY_PAIRS]
    own = fit(tiny, pairs, layer=1, n_train=8, n_valid=4, steps=2, progress=False)
    standard = fit(tiny, Task("t", list(TINY_PAIRS)), layer=1, n_train=8, n_valid=4, steps=2, progress=False)
    assert torch.allclose(own.intervention.deltas[1], standard.intervention.deltas[1])
    assert own.intervention.metadata["template"] == PromptTemplate.verbatim().to_json()
    assert (
        evaluate(tiny, Task.from_pairs(pairs), own.intervention).accuracy
        == evaluate(tiny, Task("t", list(TINY_PAIRS)), standard.intervention).accuracy
    )


def test_chat_template_prompts(tiny):
    with pytest.raises(TaskError, match="no chat template"):
        PromptTemplate.chat(tiny.tokenizer)
    tokenizer = tiny.tokenizer
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    try:
        template = PromptTemplate.chat(tokenizer)
        assert template.render("hot") == "<user>hot\n<assistant>" and not template.prepend_bos
        result = fit(
            tiny, Task("t", list(TINY_PAIRS)), layer=1, n_train=8, n_valid=4, steps=1, template=template, progress=False
        )
        table = evaluate(tiny, Task("t", list(TINY_PAIRS)), result.intervention).table
        assert table.prompt.iloc[0].startswith("<user>")
    finally:
        tokenizer.chat_template = None


def test_fit_arguments(tiny):
    with pytest.raises(TypeError):
        FitConfig(1)  # keyword-only
    splits = Task("t", list(TINY_PAIRS)).split(0, 8, 4)
    with pytest.raises(FitError, match="already split"):
        fit(tiny, splits, layer=1, n_train=8, progress=False)
    with pytest.raises(FitError, match="select='valid'.*empty"):
        fit(tiny, Task("t", list(TINY_PAIRS)), layer=1, n_train=8, n_valid=0, steps=1, select="valid", progress=False)
    with pytest.raises(FitError, match="not both"):
        fit(tiny, Task("t", list(TINY_PAIRS)), layer=1, group_l1=0.1, group_l1_rel=0.5, progress=False)


def test_default_layer_policy_is_shared(tiny):
    from lens_laai.fitting import default_layers
    from lens_laai.fitting.fit import parse_layers

    assert parse_layers("default", 30) == default_layers(30) == [4, 8, 12, 16, 20]
    assert default_layers(32) == [5, 9, 13, 17, 21] and default_layers(3) == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(tiny, Task("t", list(TINY_PAIRS)), "sweep", n_train=8, n_valid=4, steps=1, progress=False)
        joint = fit(tiny, Task("t", list(TINY_PAIRS)), "joint", n_train=8, steps=1, progress=False)
    assert sorted(result.candidates.layer.unique()) == default_layers(3)
    assert set(joint.intervention.layers) <= set(default_layers(3)) and joint.relaxed
    assert joint.selection_rule == "cv-1se-ce" and "n_selected" in joint.candidates  # the path's rule, as at one layer
