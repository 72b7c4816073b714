"""The plain-tensor last-token kernel and the fused cross-entropy agree with the bridge."""

import pytest
import torch
import torch.nn.functional as F

from lens_laai.errors import InterventionError
from lens_laai.fastpath import LastTokenCache, notices, prefix
from lens_laai.fastpath.kernels import LlamaLastToken, last_token_cross_entropy
from lens_laai.interventions.head import delta_hook
from lens_laai.models.bridge import hook_name
from lens_laai.tasks.prompts import k_shot_prompts, make_batch


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_cross_entropy_matches_autograd(with_bias):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(5, 16, generator=gen)
    weight = torch.randn(101, 16, generator=gen) * 3  # 101 rows: the last chunk is partial
    bias = torch.randn(101, generator=gen) if with_bias else None
    targets = torch.tensor([0, 100, 7, 7, 55])
    mine, ref = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    loss = last_token_cross_entropy(mine, weight, bias, targets, chunk=16)
    expected = F.cross_entropy(F.linear(ref, weight, bias), targets, reduction="none")
    assert torch.allclose(loss, expected, atol=1e-5)
    weights = torch.arange(1.0, 6.0)  # a non-uniform upstream gradient reaches every row
    (grad,) = torch.autograd.grad((loss * weights).sum(), mine)
    (grad_ref,) = torch.autograd.grad((expected * weights).sum(), ref)
    assert torch.allclose(grad, grad_ref, atol=1e-5)


def _cache(tiny, task, layer=1, rows=6):
    zero, targets = k_shot_prompts(task, shots=0)
    two, _ = k_shot_prompts(task, shots=2)
    prompts = [(two if i % 2 else zero)[i] for i in range(rows)]  # uneven lengths: left padding is exercised
    batch = make_batch(tiny.tokenizer, prompts, targets[:rows])
    assert (batch.attention_mask == 0).any()
    return LastTokenCache.build(tiny, batch, layer=layer), batch


def test_kernel_runs_on_the_tiny_llama_and_matches_the_bridge_with_gradients(tiny, task):
    cache, batch = _cache(tiny, task)
    assert cache.kernel is not None
    delta = torch.randn(tiny.cfg.n_heads, tiny.cfg.d_head, generator=torch.Generator().manual_seed(1))
    results = []
    for use_kernel in (True, False):
        y = delta.clone().requires_grad_(True)
        hooks = [(hook_name(1), delta_hook(y)), (hook_name(2), delta_hook(0.5 * y))]
        if use_kernel:
            loss = cache.cross_entropy(hooks, batch.target_ids).sum()
        else:
            loss = F.cross_entropy(cache._bridged_logits(hooks), batch.target_ids, reduction="sum")
        results.append((loss.detach(), torch.autograd.grad(loss, y)[0]))
    (loss_k, grad_k), (loss_b, grad_b) = results
    assert abs(float(loss_k - loss_b)) < 1e-4 * max(1.0, abs(float(loss_b)))
    assert torch.allclose(grad_k, grad_b, atol=1e-5, rtol=1e-4)
    assert grad_k.abs().sum() > 0


def test_kernel_calls_observer_hooks_and_hands_other_hooks_to_the_bridge(tiny, task):
    cache, batch = _cache(tiny, task)
    seen = []
    logits = cache.logits([(hook_name(2), lambda z, hook: seen.append((tuple(z.shape), hook)))])
    assert seen == [((len(batch), 1, tiny.cfg.n_heads, tiny.cfg.d_head), tiny.hook_dict[hook_name(2)])]
    assert torch.allclose(logits, cache.full_logits, atol=1e-4)

    def double(x, hook):
        return 2 * x

    via_bridge = cache.logits([("blocks.2.hook_resid_post", double)])  # not a hook_z: bridge's blocks
    with torch.no_grad():
        full = tiny.run_with_hooks(
            batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=[("blocks.2.hook_resid_post", double)]
        )[:, -1]
    assert torch.allclose(via_bridge, full, atol=1e-4)


def test_kernel_that_disagrees_is_dropped_with_a_warning(tiny, task, monkeypatch):
    notices._warned.clear()
    monkeypatch.setattr(LlamaLastToken, "hidden", lambda self, h, *args: torch.zeros_like(h[:, -1]))
    with pytest.warns(RuntimeWarning, match="kernel disagrees"):
        cache, _ = _cache(tiny, task)
    assert cache.kernel is None
    assert torch.allclose(cache.logits(), cache.full_logits, atol=1e-4)


def test_kernel_that_fails_in_its_check_is_dropped_with_a_warning(tiny, task, monkeypatch):
    """A kernel raising in its self-check steps aside, as the blocks' check does: the blocks path, exact, no hooks left."""

    def broken(self, h, *args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    notices._warned.clear()
    monkeypatch.setattr(LlamaLastToken, "hidden", broken)
    with pytest.warns(RuntimeWarning, match="kernel failed on this .*RuntimeError: mat1 and mat2"):
        cache, batch = _cache(tiny, task)
    assert cache is not None and cache.kernel is None and cache.path == "blocks" and not cache.kernel_inputs
    assert torch.allclose(cache.logits(), cache.full_logits, atol=1e-4)
    delta = torch.ones(tiny.cfg.n_heads, tiny.cfg.d_head)
    with torch.no_grad():
        full = tiny.run_with_hooks(
            batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=[(hook_name(1), delta_hook(delta))]
        )[:, -1]
    assert torch.allclose(cache.logits([(hook_name(1), delta_hook(delta))]), full, atol=1e-4)
    assert not any(hp.fwd_hooks for hp in tiny.hook_dict.values())


def test_our_own_error_in_the_kernel_check_is_not_swallowed(tiny, task, monkeypatch):
    def refuse(self, h, *args):
        raise InterventionError("a hook refused its input")

    monkeypatch.setattr(LlamaLastToken, "hidden", refuse)
    with pytest.raises(InterventionError, match="refused"):
        _cache(tiny, task)


def test_kernel_declines_architectures_it_does_not_know(tiny):
    class Config:
        model_type = "gpt2"

    class Model(torch.nn.Module):
        config = Config()

    assert LlamaLastToken.for_model(Model(), 0) is None
    assert LlamaLastToken.for_model(tiny.original_model, 1) is not None


def test_kernel_that_mishandles_hook_z_is_caught_by_the_probe(tiny, task, monkeypatch):
    notices._warned.clear()
    monkeypatch.setattr(prefix, "_call_hook", lambda fn, z, point: z)  # hooks silently ignored
    with pytest.warns(RuntimeWarning, match="kernel disagrees"):
        cache, batch = _cache(tiny, task)
    assert cache.kernel is None
    delta = torch.ones(tiny.cfg.n_heads, tiny.cfg.d_head)
    assert not torch.allclose(cache.logits([(hook_name(1), delta_hook(delta))]), cache.full_logits, atol=1e-3)
