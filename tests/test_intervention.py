import json

import pytest
import torch

from lens_laai import HeadIntervention, InterventionError
from lens_laai.testing import tiny_model

PROMPT = torch.tensor([[1, 20, 21, 22, 23, 24]])


def make_iv(model, layer=1, heads=(0, 2), scale=3.0, seed=0):
    torch.manual_seed(seed)
    iv = HeadIntervention.zeros(model, layers=[layer])
    for h in heads:
        iv.deltas[layer][h] = scale * torch.randn(model.cfg.d_head)
    return iv


def test_changes_only_chosen_layer_positions_and_heads(tiny):
    iv = make_iv(tiny, layer=1, heads=(0, 2))
    _, base = tiny.run_with_cache(PROMPT)
    with iv.apply(tiny):
        _, cache = tiny.run_with_cache(PROMPT)
    for name in base.keys():
        if name.startswith(("blocks.0.", "embed.", "hook_embed")):
            assert torch.equal(base[name], cache[name]), f"{name} changed below the intervened layer"
    z0, z1 = base["blocks.1.attn.hook_z"], cache["blocks.1.attn.hook_z"]
    assert torch.equal(z0[:, :-1], z1[:, :-1]), "earlier positions must not change"
    assert torch.equal(z0[:, -1, [1, 3]], z1[:, -1, [1, 3]]), "unselected heads must not change"
    assert torch.allclose(z1[:, -1, [0, 2]] - z0[:, -1, [0, 2]], iv.deltas[1][[0, 2]])
    for layer in (1, 2):
        resid = f"blocks.{layer}.hook_resid_post"
        assert torch.equal(base[resid][:, :-1], cache[resid][:, :-1])
        assert not torch.equal(base[resid][:, -1], cache[resid][:, -1])


def test_logits_bit_identical_after_context_and_after_exception(tiny):
    before = tiny(PROMPT)
    iv = make_iv(tiny)
    with iv.apply(tiny):
        during = tiny(PROMPT)
    assert not torch.equal(before, during)
    assert torch.equal(tiny(PROMPT), before)
    with pytest.raises(RuntimeError, match="boom"), iv.apply(tiny):
        tiny(PROMPT)
        raise RuntimeError("boom")
    assert torch.equal(tiny(PROMPT), before)


def test_user_hooks_survive_apply(tiny):
    seen = []
    tiny.add_hook("blocks.0.hook_resid_post", lambda x, hook: seen.append(1))
    try:
        with make_iv(tiny).apply(tiny):
            tiny(PROMPT)
        tiny(PROMPT)
        assert len(seen) == 2
    finally:
        tiny.reset_hooks()


def test_gradients_reach_delta_only(tiny):
    iv = make_iv(tiny)
    iv.deltas[1].requires_grad_(True)
    with iv.apply(tiny):
        tiny(PROMPT)[0, -1].logsumexp(-1).backward()
    assert iv.deltas[1].grad is not None and iv.deltas[1].grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny.parameters())


def test_fwd_hooks_work_with_run_with_hooks(tiny):
    iv = make_iv(tiny)
    with iv.apply(tiny):
        expected = tiny(PROMPT)
    assert torch.equal(tiny.run_with_hooks(PROMPT, fwd_hooks=iv.fwd_hooks()), expected)


def test_heads_table_and_selection(tiny):
    iv = make_iv(tiny, heads=(0, 2))
    table = iv.heads()
    assert list(table.columns) == ["layer", "head", "norm", "l1", "selected"]
    assert len(table) == tiny.cfg.n_heads
    assert table.selected.tolist() == [True, False, True, False]
    assert iv.selected_heads() == [(1, 0), (1, 2)]


def test_algebra(tiny):
    a, b = make_iv(tiny, layer=1, seed=0), make_iv(tiny, layer=2, seed=1)
    total = a + b
    assert total.layers == [1, 2]
    assert torch.equal(total.deltas[1], a.deltas[1]) and torch.equal(total.deltas[2], b.deltas[2])
    assert torch.allclose((a - a).deltas[1], torch.zeros_like(a.deltas[1]))
    assert torch.equal((2.0 * a).deltas[1], a.deltas[1] * 2) and torch.equal((a * 2.0).deltas[1], a.deltas[1] * 2)
    assert (a - a).selected_heads() == []
    with pytest.raises(InterventionError, match="different positions"):
        a + HeadIntervention(dict(b.deltas), b.model_name, b.fingerprint, "all")
    other = make_iv(tiny_model(n_heads=2, n_kv_heads=1), layer=1, heads=(0,))
    with pytest.raises(InterventionError, match="different models"):
        a + other


def test_save_load_round_trip_bit_for_bit(tiny, tmp_path):
    iv = make_iv(tiny)
    iv.metadata = {"name": "x", "fit_config": {"seed": 3}}
    iv.save(tmp_path / "iv")
    loaded = HeadIntervention.load(tmp_path / "iv", model=tiny)
    assert loaded.equals(iv)
    manifest = json.loads((tmp_path / "iv" / "manifest.json").read_text())
    assert manifest["fingerprint"] == iv.fingerprint and manifest["hook_names"] == {"1": "blocks.1.attn.hook_z"}
    iv.save(tmp_path / "iv")  # overwriting an existing save works and leaves no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iv"]


def test_load_refuses_another_models_fingerprint(tiny, tmp_path):
    make_iv(tiny).save(tmp_path / "iv")
    other = tiny_model(n_heads=2, n_kv_heads=1)
    with pytest.raises(InterventionError, match="does not fit this model"):
        HeadIntervention.load(tmp_path / "iv", model=other)
    with pytest.raises(InterventionError, match="does not fit this model"):
        with HeadIntervention.load(tmp_path / "iv").apply(other):
            pass


def test_corrupt_or_missing_saves_are_clear_errors(tiny, tmp_path):
    make_iv(tiny).save(tmp_path / "iv")
    tensor_file = tmp_path / "iv" / json.loads((tmp_path / "iv" / "manifest.json").read_text())["tensor_file"]
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[:-4] + b"\0\0\0\1")
    with pytest.raises(InterventionError, match="checksum"):
        HeadIntervention.load(tmp_path / "iv")
    with pytest.raises(InterventionError, match="not a saved HeadIntervention"):
        HeadIntervention.load(tmp_path / "nothing")


def test_out_of_range_layer_or_bad_shape(tiny):
    fp = dict(make_iv(tiny).fingerprint)
    with pytest.raises(InterventionError, match="out of range"):
        HeadIntervention({7: torch.zeros(4, 16)}, "m", fp)
    with pytest.raises(InterventionError, match="shape"):
        HeadIntervention({1: torch.zeros(3, 16)}, "m", fp)
