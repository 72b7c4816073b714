import math

import pytest
import torch

from lens_laai import Task, evaluate, fit, fit_path
from lens_laai.fitting import default_layers
from lens_laai.tasks.prompts import k_shot_prompts, make_batch


def test_padded_batch_matches_one_prompt_at_a_time(tiny, task):
    long_prompts, targets = k_shot_prompts(task, shots=2, seed=0)
    short_prompts, _ = k_shot_prompts(task, shots=0)
    prompts = long_prompts[:3] + short_prompts[3:6]
    batch = make_batch(tiny.tokenizer, prompts, targets[:6])
    assert (batch.attention_mask == 0).any(), "the example must contain padding"
    batched = tiny(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
    for i, prompt in enumerate(prompts):
        single = make_batch(tiny.tokenizer, [prompt], [targets[i]])
        assert torch.allclose(tiny(single.input_ids)[:, -1], batched[i : i + 1], atol=1e-5)


def test_fit_lowers_loss_and_is_deterministic(tiny, task):
    kwargs = dict(layer=1, n_train=12, n_valid=6, steps=15, group_l1=1e-3, l1=1e-4, progress=False)
    a, b = fit(tiny, task, **kwargs), fit(tiny, task, **kwargs)
    assert torch.equal(a.intervention.deltas[1], b.intervention.deltas[1])
    assert a.history.smooth.iloc[-1] < a.history.smooth.iloc[0]
    assert a.history.loss.iloc[-1] <= a.history.loss.iloc[0]
    assert a.fast_path
    assert set(a.history.columns) >= {"step", "loss", "smooth", "penalty", "n_selected", "lr"}


def test_fit_teaches_a_constant_answer(tiny, task):
    # A random model cannot learn antonyms, but one additive vector can make it say "cold".
    constant = Task("always-cold", [(a, "cold") for a, _ in task.pairs])
    splits = constant.split(0, 12, 6)
    before = evaluate(tiny, splits, split="train").accuracy
    result = fit(tiny, splits, layer=2, steps=25, group_l1=0.0, l1=0.0, progress=False)
    assert before < 0.5 and result.train_accuracy == 1.0 and result.valid_accuracy == 1.0


def test_large_group_penalty_switches_every_head_off(tiny, task):
    result = fit(tiny, task, layer=1, n_train=12, n_valid=6, steps=10, group_l1=1e3, progress=False)
    assert result.selected_heads == []
    assert torch.equal(result.intervention.deltas[1], torch.zeros_like(result.intervention.deltas[1]))


def test_moderate_penalty_gives_exact_zeros_without_thresholding(tiny, task):
    path, ivs = fit_path(tiny, task.split(0, 12, 6), layer=1, group_l1s=[0.0, 0.05, 0.2, 1e3], steps=15, progress=False)
    counts = path.sort_values("group_l1").n_selected.tolist()
    assert counts == sorted(counts, reverse=True), "more penalty must not select more heads"
    assert counts[0] == 4 and counts[-1] == 0
    for iv in ivs:
        norms = iv.deltas[1].norm(dim=-1)
        assert torch.all((norms == 0) | (norms > 1e-6)), "heads are either exactly off or clearly on"


def test_fast_and_full_paths_give_the_same_trajectory(tiny, task):
    kwargs = dict(layer=1, n_train=12, n_valid=6, steps=20, group_l1=0.02, l1=1e-3, progress=False)
    fast, full = fit(tiny, task, fast=True, **kwargs), fit(tiny, task, fast=False, **kwargs)
    assert fast.fast_path and not full.fast_path
    assert (fast.history.loss - full.history.loss).abs().max() < 1e-4
    assert fast.selected_heads == full.selected_heads
    assert fast.forward_equivalents < full.forward_equivalents


def test_fast_path_works_on_few_shot_prompts(tiny, task):
    kwargs = dict(layer=1, n_train=12, n_valid=6, steps=8, shots=3, progress=False)
    fast, full = fit(tiny, task, fast=True, **kwargs), fit(tiny, task, fast=False, **kwargs)
    assert (fast.history.loss - full.history.loss).abs().max() < 1e-4


def test_layer_auto_sweeps_and_picks_best_on_validation(tiny, task):
    result = fit(
        tiny, task, layer="sweep", n_train=12, n_valid=6, steps=5, group_l1=0.3, select="valid", progress=False
    )
    assert result.candidates.layer.tolist() == default_layers(3) and result.selection == "valid"
    best = result.candidates.sort_values(["valid_accuracy", "valid_ce"], ascending=[False, True]).iloc[0]
    assert result.layer == best.layer and result.intervention.layers == [result.layer]


def test_sequence_objective_runs_and_says_it_uses_the_full_forward(tiny, task):
    from lens_laai.fastpath import notices

    notices._warned.discard("objective:sequence")
    with pytest.warns(RuntimeWarning, match="full forward"):
        result = fit(tiny, task, layer=1, n_train=8, n_valid=4, steps=5, objective="sequence", progress=False)
    assert not result.fast_path and math.isfinite(result.history.loss.iloc[-1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layer": 3}, "out of range"),
        ({"layer": -1}, "out of range"),
        ({"l1": float("nan")}, "finite"),
        ({"group_l1": float("inf")}, "finite"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"steps": 0}, "positive"),
        ({"layer": "best"}, "'auto'"),
        ({"objective": "kl"}, "objective"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(tiny, task, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(tiny, task, **{"layer": 1, "steps": 2, "progress": False, **kwargs})


def test_evaluate_table_and_split_from_intervention(tiny, task):
    result = fit(tiny, task, layer=1, n_train=10, n_valid=4, steps=3, seed=2, progress=False)
    ev = evaluate(tiny, task, result.intervention)
    assert ev.n == len(task) - 14
    assert set(ev.table.input) == set(result.splits.test.inputs)
    assert list(ev.table.columns) == [
        "input",
        "target",
        "prediction",
        "correct",
        "target_logprob",
        "target_rank",
        "prompt",
    ]
    assert ev.accuracy == ev.table.correct.mean()


def test_group_l1_path_picks_best_layer_and_lambda_on_validation(tiny, task):
    result = fit(
        tiny,
        task,
        layer="sweep",
        layers=[1, 2],
        group_l1=[0.01, 1e3],
        n_train=12,
        n_valid=6,
        steps=4,
        select="valid",
        progress=False,
    )
    assert len(result.candidates) == 4 and set(result.candidates.group_l1) == {0.01, 1e3}
    best = result.candidates.sort_values(["valid_accuracy", "valid_ce"], ascending=[False, True]).iloc[0]
    assert (result.layer, result.config.group_l1) == (best.layer, best.group_l1)
    assert result.intervention.metadata["fit_config"]["group_l1"] == best.group_l1


def test_fast_path_falls_back_and_says_so_once(tiny, task, monkeypatch):
    from lens_laai.fastpath import notices, prefix

    notices._warned.clear()
    monkeypatch.setattr(prefix.LastTokenCache, "_reproduces_full_forward", lambda self: False)
    kwargs = dict(layer=1, n_train=8, n_valid=4, steps=3, progress=False)
    with pytest.warns(RuntimeWarning, match="disagrees with the full forward") as record:
        result = fit(tiny, task, **kwargs)
        fit(tiny, task, **kwargs)
    assert not result.fast_path
    assert sum("disagrees" in str(w.message) for w in record) == 1
    notices._warned.clear()
    monkeypatch.setattr(prefix, "REQUIRED_PARTS", ("layers", "no_such_part"))
    with pytest.warns(RuntimeWarning, match="unsupported"):
        assert not fit(tiny, task, **kwargs).fast_path


def test_evaluate_many_matches_evaluate(tiny, task):
    from lens_laai import evaluate_many

    splits = task.split(0, 8, 4)
    _, ivs = fit_path(tiny, splits, layer=1, group_l1s=[0.0, 0.1], steps=4, progress=False)
    two_layer = ivs[0] + fit(tiny, splits, layer=2, steps=2, progress=False).intervention
    table = evaluate_many(tiny, splits, [*ivs, two_layer], shots=2)
    assert len(table) == 3 and table.layers.tolist() == ["1", "1", "1,2"]
    for row, iv in zip(table.itertuples(), [*ivs, two_layer]):
        single = evaluate(tiny, splits, iv, shots=2)
        assert row.accuracy == single.accuracy
        assert abs(row.mean_target_logprob - single.table.target_logprob.mean()) < 1e-4


def test_last_token_cache_refuses_hooks_it_cannot_honour(tiny, task):
    from lens_laai.fastpath import LastTokenCache

    prompts, targets = k_shot_prompts(task, shots=0)
    cache = LastTokenCache.build(tiny, make_batch(tiny.tokenizer, prompts[:4], targets[:4]), layer=1)
    with pytest.raises(ValueError, match="acts below block 1"):
        cache.logits([("blocks.0.attn.hook_z", lambda z, hook: z)])
    with pytest.raises(ValueError, match="acts below block 1"):
        cache.logits([("hook_embed", lambda x, hook: x)])
    assert cache.logits([("blocks.2.hook_resid_post", lambda x, hook: x)]).shape == (4, len(tiny.tokenizer))


@pytest.mark.parametrize("mode", ["zero-shot", "auto"])
def test_delta_at_the_last_few_positions_fits_on_the_fast_path_as_on_the_full_forward(tiny, task, mode):
    """``last_positions=3``: one Δ at each prompt's last 3 tokens; the fast path recomputes those 3."""
    kwargs = dict(layer=1, n_train=8, steps=3, relaxed_steps=2, group_l1_rel=[0.5, 0.1], mode=mode, progress=False)
    fast = fit(tiny, task, last_positions=3, **kwargs)
    slow = fit(tiny, task, last_positions=3, fast=False, **kwargs)
    last = fit(tiny, task, **kwargs)
    assert fast.fast_path and fast.intervention.positions == (-3, -2, -1) and last.intervention.positions == "last"
    assert torch.allclose(fast.intervention.deltas[1], slow.intervention.deltas[1], atol=1e-4)
    assert not torch.allclose(fast.intervention.deltas[1], last.intervention.deltas[1], atol=1e-4)
    assert fast.forward_equivalents < slow.forward_equivalents


def test_delta_at_the_last_few_positions_evaluates_generates_and_saves_consistently(tiny, task, tmp_path):
    from lens_laai import HeadIntervention, evaluate_many, generate

    res = fit(
        tiny, task, layer=1, n_train=8, steps=3, relaxed_steps=1, mode="zero-shot", last_positions=3, progress=False
    )
    iv = 3.0 * res.intervention  # strong enough to change what the tiny model says
    plain = evaluate(tiny, res.splits, iv)
    assert evaluate_many(tiny, res.splits, [iv]).accuracy.item() == pytest.approx(plain.accuracy)
    assert not plain.table.target_logprob.equals(evaluate(tiny, res.splits, res.intervention).table.target_logprob)
    prompts = ["Q: hot\nA:", "Q: upward and onward\nA:"]
    cached = generate(tiny, prompts, iv, max_new_tokens=4, use_past_kv_cache=True)
    assert cached == generate(tiny, prompts, iv, max_new_tokens=4, use_past_kv_cache=False)
    assert cached != generate(tiny, prompts, max_new_tokens=4)
    res.intervention.save(tmp_path / "iv")
    assert HeadIntervention.load(tmp_path / "iv").positions == (-3, -2, -1)


@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "3"])
def test_last_positions_must_be_a_positive_integer(tiny, task, bad):
    from lens_laai.errors import FitError

    with pytest.raises(FitError, match="last_positions must be a positive integer"):
        fit(tiny, task, layer=1, n_train=8, last_positions=bad, progress=False)


def test_last_positions_beyond_the_shortest_prompt_or_with_the_sequence_objective_is_refused(tiny, task):
    from lens_laai.errors import FitError, LensLaaiError

    with pytest.raises(FitError, match="objective='sequence' adds Δ at the last prompt token only"):
        fit(tiny, task, layer=1, n_train=8, last_positions=2, objective="sequence", progress=False)
    with pytest.raises(LensLaaiError, match="needs prompts of at least 500 tokens"):
        fit(tiny, task, layer=1, n_train=8, last_positions=500, mode="zero-shot", progress=False)


def test_delta_at_the_last_few_positions_refuses_a_right_padded_batch_and_leaks_no_hooks(tiny):
    from lens_laai import HeadIntervention
    from lens_laai.errors import InterventionError

    delta = torch.randn(tiny.cfg.n_heads, tiny.cfg.d_head, generator=torch.Generator().manual_seed(0))
    iv = HeadIntervention.from_deltas(tiny, {1: delta}, positions=(-3, -2, -1))
    prompts = ["Q: hot\nA:", "Q: a much longer prompt than that\nA:"]
    tokens = tiny.to_tokens(prompts[0])
    before = tiny(tokens)
    with pytest.raises(InterventionError, match="right-padded"), iv.apply(tiny):
        tiny(prompts)  # the tiny tokenizer pads on the right: Δ would land on padding
    assert torch.equal(tiny(tokens), before)
    with iv.apply(tiny):
        steered = tiny(tokens)  # one prompt: its last three tokens
    assert torch.allclose(steered, tiny.run_with_hooks(tokens, fwd_hooks=iv.fwd_hooks()))
    assert not torch.allclose(steered, before)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with pytest.raises(InterventionError, match="right-padded"):
        tiny.run_with_hooks(torch.tensor([[1, 5, 6, 7, 0]]), fwd_hooks=iv.fwd_hooks(attention_mask=mask))


def test_every_token_generation_also_steers_the_generated_tokens_of_a_last_positions_fit(tiny):
    from lens_laai import HeadIntervention, generate

    delta = 4 * torch.randn(tiny.cfg.n_heads, tiny.cfg.d_head, generator=torch.Generator().manual_seed(1))
    iv = HeadIntervention.from_deltas(tiny, {1: delta}, positions=(-2, -1))
    kwargs = dict(max_new_tokens=5, delta_at="every_token")
    cached = generate(tiny, ["Q: hot\nA:", "Q: up and down\nA:"], iv, use_past_kv_cache=True, **kwargs)
    assert cached == generate(tiny, ["Q: hot\nA:", "Q: up and down\nA:"], iv, use_past_kv_cache=False, **kwargs)
    assert cached != generate(tiny, ["Q: hot\nA:", "Q: up and down\nA:"], iv, max_new_tokens=5)
