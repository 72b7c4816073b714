"""Every feature on every architecture the bridge wraps: GPT-2, GPT-NeoX, Llama, Qwen2, Gemma 2/3, Mistral, Phi-3.

Each model is a random 3-layer, d_model-64 model built in memory (:func:`lens_laai.testing.tiny_model_for`)
and booted with ``TransformerBridge.boot_transformers``. Prompts of the tiny task are longer than the
models' sliding windows (:data:`lens_laai.testing.SLIDING_WINDOW`), so the windows really mask.

``LENS_LAAI_TEST_DEVICE=cuda`` runs the matrix with every model on that device (what
``benchmarks/device_check.py`` does on a GPU machine); the default is the CPU.
"""

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from lens_laai import (
    HeadIntervention,
    ModelError,
    evaluate,
    evaluate_many,
    fit,
    generate,
    load_model,
)
from lens_laai.fastpath import LastTokenCache, LayerRunner, blocks, notices, prefix, tolerance
from lens_laai.fastpath.kernels import LlamaLastToken
from lens_laai.interventions.head import delta_hook
from lens_laai.interventions.positions import tail_of
from lens_laai.models.bridge import hook_name
from lens_laai.tasks.prompts import k_shot_prompts, make_batch
from lens_laai.testing import (
    SLIDING_WINDOW,
    TINY_ARCHITECTURES,
    tiny_hf_model_for,
    tiny_model_for,
    tiny_tokenizer,
)

ARCHS = sorted(TINY_ARCHITECTURES)
# Which fast path each architecture takes: the plain-tensor kernel only for the verified Llama family.
EXPECTED_PATH = {
    "gpt2": "blocks",
    "gpt-neox": "blocks",
    "llama": "kernel",
    "qwen2": "kernel",
    "gemma2": "blocks",
    "gemma3": "blocks",
    "mistral": "kernel",
    "phi3": "blocks",
}
DEVICE = os.environ.get("LENS_LAAI_TEST_DEVICE", "cpu")
FIT = dict(layer=1, n_train=8, n_valid=4, steps=6, group_l1=0.01, l1=1e-3, progress=False)


@pytest.fixture(scope="module")
def models():
    return {}


def model_for(models, arch, dtype=torch.float32):
    if (arch, dtype) not in models:
        models[(arch, dtype)] = tiny_model_for(arch, dtype=dtype, device=DEVICE)
    return models[(arch, dtype)]


def padded_batch(model, task, rows=6):
    """Zero- and 2-shot prompts mixed: left padding, and prompts longer than any sliding window."""
    zero, targets = k_shot_prompts(task, shots=0)
    two, _ = k_shot_prompts(task, shots=2)
    prompts = [(two if i % 2 else zero)[i] for i in range(rows)]
    batch = make_batch(model.tokenizer, prompts, targets[:rows]).to(model.cfg.device)
    assert (batch.attention_mask == 0).any() and batch.attention_mask.sum(-1).min() > SLIDING_WINDOW
    return batch


def no_fallback_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_the_matrix_is_the_one_the_issue_asks_for():
    assert set(ARCHS) >= {"gpt2", "gpt-neox", "llama", "qwen2", "mistral", "phi3"} and {"gemma2", "gemma3"} & set(ARCHS)
    assert set(EXPECTED_PATH) == set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_z_has_one_row_per_query_head(models, arch):
    model = model_for(models, arch)
    config = model.original_model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    _, cache = model.run_with_cache(torch.tensor([[1, 5, 6, 7]]))
    assert cache[hook_name(1)].shape == (1, 4, heads, model.cfg.d_head) and model.cfg.n_heads == heads
    kv = getattr(config, "num_key_value_heads", heads)
    assert kv <= heads  # grouped-query models (kv < heads) still expose every query head on hook_z


@pytest.mark.parametrize("arch", ARCHS)
def test_unembedding_only_the_last_position_is_exact(models, arch):
    from lens_laai.models.bridge import last_position_hooks

    model = model_for(models, arch)
    ids = torch.randint(5, 200, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    full = model(ids, attention_mask=mask)[:, -1]
    hooks = last_position_hooks(model)
    assert hooks, f"{arch}: no unembed.hook_in, scoring would unembed every position"
    cut = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks)
    assert cut.shape[1] == 1 and torch.allclose(cut[:, -1].float(), full.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("positions", ["last", (-3, -2, -1), (-4, -1)])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_equals_the_full_forward_with_gradients(models, arch, task, positions):
    """Δ at the last token, or at several of the last positions (the cache then recomputes that many)."""
    model = model_for(models, arch)
    batch = padded_batch(model, task)
    notices._warned.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cache = LastTokenCache.build(model, batch, layer=1, tail=tail_of(positions))
    assert cache is not None and not no_fallback_warnings(record)
    assert cache.path == EXPECTED_PATH[arch]
    assert all(not block._forward_pre_hooks for block in model.blocks), "recording hooks leaked"
    gen = torch.Generator().manual_seed(1)
    results = []
    for fast in (True, False):
        y = (
            (2 * torch.randn(model.cfg.n_heads, model.cfg.d_head, generator=gen.manual_seed(1)))
            .to(DEVICE)
            .requires_grad_(True)
        )
        hooks = [
            (hook_name(1), delta_hook(y, positions)),
            (hook_name(2), delta_hook(0.5 * y, positions)),
        ]  # Δ flows through both
        if fast:
            logits, loss = cache.logits(hooks), cache.cross_entropy(hooks, batch.target_ids).sum()
        else:
            logits = model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)[:, -1]
            loss = F.cross_entropy(logits, batch.target_ids, reduction="sum")
        results.append((logits.detach(), loss.detach(), torch.autograd.grad(loss, y)[0]))
    (fast_logits, fast_loss, fast_grad), (full_logits, full_loss, full_grad) = results
    assert (fast_logits - full_logits).abs().max() < 1e-4 * max(1.0, float(full_logits.abs().max()))
    assert abs(float(fast_loss - full_loss)) < 1e-4 * max(1.0, abs(float(full_loss)))
    assert torch.allclose(fast_grad, full_grad, atol=1e-5, rtol=1e-4) and fast_grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_fit_apply_save_load_evaluate_generate(models, arch, task, tmp_path):
    model = model_for(models, arch)
    notices._warned.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast = fit(model, task, fast=True, **FIT)
    assert fast.fast_path and not no_fallback_warnings(record)
    full = fit(model, task, fast=False, **FIT)
    assert (fast.history.loss - full.history.loss).abs().max() < 1e-4
    assert fast.selected_heads == full.selected_heads
    iv = fast.intervention
    assert iv.deltas[1].dtype == torch.float32 and iv.deltas[1].device.type == "cpu"  # plain data, like a loaded one
    assert fast.history.loss.notna().all()

    iv.save(tmp_path / "iv")
    back = HeadIntervention.load(tmp_path / "iv", model=model)
    assert back.equals(iv)
    ids = padded_batch(model, task, rows=3)
    with torch.no_grad():
        plain = model(ids.input_ids, attention_mask=ids.attention_mask)
        with back.apply(model):
            edited = model(ids.input_ids, attention_mask=ids.attention_mask)
        after = model(ids.input_ids, attention_mask=ids.attention_mask)
    assert torch.equal(plain, after), "apply() left hooks behind"
    if fast.selected_heads:
        assert not torch.allclose(plain[:, -1], edited[:, -1])
    real = ids.attention_mask[:, :-1].bool()  # padding positions compute nothing meaningful
    assert torch.allclose(plain[:, :-1][real], edited[:, :-1][real], atol=1e-6), (
        "Δ at the last token changed earlier tokens"
    )

    result = evaluate(model, task, back)
    assert result.n == len(task) - 12 and 0.0 <= result.accuracy <= 1.0
    many = evaluate_many(model, task, [back])
    assert many.accuracy.iloc[0] == result.accuracy
    loud = (
        5.0 * back if fast.selected_heads else HeadIntervention.from_deltas(model, {1: torch.ones(4, model.cfg.d_head)})
    )
    prompts = ["Q: hot\nA:", "Q: early\nA:"]
    for where in ("prompt", "every_token"):
        cached = generate(model, prompts, loud, max_new_tokens=5, delta_at=where)
        uncached = generate(model, prompts, loud, max_new_tokens=5, delta_at=where, use_past_kv_cache=False)
        assert cached == uncached


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_models_fit_with_a_float32_delta(models, arch, task, tmp_path):
    model = model_for(models, arch, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and model.cfg.dtype == torch.bfloat16
    cache = LastTokenCache.build(model, padded_batch(model, task), layer=1)
    assert cache is not None and cache.path == EXPECTED_PATH[arch]
    bound = tolerance(torch.bfloat16) * max(1.0, float(cache.full_logits.float().abs().max()))
    assert float((cache.logits().float() - cache.full_logits.float()).abs().max()) < bound
    fast = fit(model, task, fast=True, **FIT)
    full = fit(model, task, fast=False, **FIT)
    assert fast.fast_path and torch.isfinite(torch.tensor(fast.history.loss.to_numpy())).all()
    assert (fast.history.loss - full.history.loss).abs().max() < 5e-2  # bf16 rounding, not a different function
    fast.intervention.save(tmp_path / "iv")
    back = HeadIntervention.load(tmp_path / "iv", model=model)
    assert back.deltas[1].dtype == torch.float32
    assert torch.equal(back.deltas[1], fast.intervention.deltas[1])
    assert 0.0 <= evaluate(model, task, back).accuracy <= 1.0


@pytest.mark.parametrize("arch", [a for a in ARCHS if EXPECTED_PATH[a] != "kernel"])
def test_the_kernel_refuses_what_it_was_not_verified_against(models, arch):
    kernel, why = LlamaLastToken.check_model(model_for(models, arch).original_model, 0)
    assert kernel is None and why


def test_the_kernel_refuses_a_modified_llama_block_and_says_so(task):
    from transformers.models.llama.modeling_llama import LlamaAttention

    class PatchedAttention(LlamaAttention):  # e.g. a remote-code variant with its own forward
        pass

    model = tiny_model_for("llama", seed=3, device=DEVICE)
    attn = model.original_model.model.layers[2].self_attn
    inner = getattr(attn, "original_component", None) or attn._original_component
    inner.__class__ = PatchedAttention
    notices._warned.clear()
    with pytest.warns(RuntimeWarning, match="kernel does not apply.*PatchedAttention"):
        cache = LastTokenCache.build(model, padded_batch(model, task), layer=1)
    assert cache.path == "blocks" and torch.allclose(cache.logits(), cache.full_logits, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_missing_soft_cap_is_caught_by_the_check(models, task, monkeypatch, dtype):
    model = model_for(models, "gemma2", dtype)
    assert model.original_model.config.final_logit_softcapping
    monkeypatch.setattr(blocks, "soft_cap", lambda logits, cap: logits)
    monkeypatch.setattr(prefix, "soft_cap", lambda logits, cap: logits)
    notices._warned.clear()
    with pytest.warns(RuntimeWarning, match="disagrees with the full forward"):
        assert LastTokenCache.build(model, padded_batch(model, task), layer=1) is None


@pytest.mark.parametrize(
    "arch, windowed, dtype",
    [
        ("mistral", True, torch.float32),
        ("gemma2", True, torch.float32),
        ("mistral", True, torch.bfloat16),
        ("llama", False, torch.float32),
    ],
)
def test_sliding_windows_come_from_the_recorded_mask(models, arch, windowed, dtype, task, monkeypatch):
    """Without the recorded mask row (every key visible), windowed models disagree and fall back; Llama does not care."""
    model = model_for(models, arch, dtype)
    prompt, target = k_shot_prompts(task, shots=3)[0][0], k_shot_prompts(task, shots=3)[1][0]
    batch = make_batch(model.tokenizer, [prompt], [target]).to(
        model.cfg.device
    )  # one unpadded row, longer than the window
    assert batch.input_ids.shape[1] > 3 * SLIDING_WINDOW
    cut = blocks._cut

    def see_everything(name, value, width, tail=1):
        out = cut(name, value, width, tail)
        return torch.zeros_like(out) if name == "attention_mask" and isinstance(out, torch.Tensor) else out

    monkeypatch.setattr(blocks, "_cut", see_everything)
    notices._warned.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cache = LastTokenCache.build(model, batch, layer=0)
    assert (cache is None) == windowed, no_fallback_warnings(record)


def test_recording_hooks_are_removed_when_the_forward_fails(models, task):
    model = model_for(models, "gpt2")

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), model.hooks(fwd_hooks=[("blocks.2.hook_out", boom)]):
        LastTokenCache.build(model, padded_batch(model, task), layer=1)
    assert all(not block._forward_pre_hooks for block in model.blocks)
    assert LastTokenCache.build(model, padded_batch(model, task), layer=1).path == "blocks"


def test_a_block_argument_that_cannot_be_cut_means_the_announced_full_forward(models, task, monkeypatch):
    model = model_for(models, "phi3")

    def refuse(name, value, width):
        raise blocks.ReplayUnsupported(f"argument {name!r} of type {type(value).__name__}")

    monkeypatch.setattr(blocks, "_cut", refuse)
    notices._warned.clear()
    with pytest.warns(RuntimeWarning, match="unsupported for Phi3ForCausalLM"):
        runner = LayerRunner(model, [padded_batch(model, task)], 1)
    assert runner.path == "full forward" and not runner.is_fast
    assert all(not block._forward_pre_hooks for block in model.blocks)


@pytest.mark.skipif(DEVICE != "cpu", reason="accelerate refuses maps that mix a GPU with CPU/disk offload")
def test_a_model_split_over_cpu_and_disk_fits_like_the_whole_model(task, tmp_path):
    hf = tiny_hf_model_for("llama")
    hf.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    notices._warned.clear()
    with pytest.warns(RuntimeWarning, match="kernel does not apply.*offloaded"):
        split = load_model(str(tmp_path / "m"), device_map=device_map, offload_folder=str(tmp_path / "offload"))
        assert split.cfg.n_devices == 2 and split.original_model.hf_device_map["model.layers.2"] == "disk"
        fast = fit(split, task, fast=True, **FIT)
    whole = fit(load_model(str(tmp_path / "m"), device="cpu"), task, fast=True, **FIT)
    full = fit(split, task, fast=False, **FIT)
    assert fast.fast_path
    assert (fast.history.loss - whole.history.loss).abs().max() < 1e-5
    assert (fast.history.loss - full.history.loss).abs().max() < 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "int8"}, "Unknown dtype"),
        ({"device": "gpu"}, "not a device"),
        ({"device": "cpu", "device_map": "auto"}, "not both"),
        ({"device_map": "auto"}, "use device= instead"),
        ({"n_devices": 0}, "positive integer"),
        ({"offload_folder": "x"}, "offload_folder"),
    ],
)
def test_placement_arguments_are_checked_with_clear_errors(kwargs, message):
    with pytest.raises(ModelError, match=message):
        load_model("lens-laai-tiny-gpt2", **kwargs)


def test_unknown_tiny_architecture_and_missing_cuda_are_clear_errors():
    with pytest.raises(ModelError, match="lens-laai-tiny-gpt2"):
        load_model("lens-laai-tiny-bert")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            load_model("lens-laai-tiny", device="cuda")


def test_load_model_places_and_casts_a_ready_bridge():
    model = tiny_model_for("gpt2")
    assert load_model(model, device=DEVICE, dtype="bf16") is model
    assert next(model.parameters()).dtype == torch.bfloat16 and model.cfg.dtype == torch.bfloat16
    assert next(model.parameters()).device.type == torch.device(DEVICE).type


def test_cli_fits_a_bf16_model_and_saves_a_float32_delta(tmp_path, capsys):
    from safetensors.torch import load_file

    from lens_laai.cli.main import main

    out = tmp_path / "iv"
    code = main(
        [
            "fit",
            "--task",
            "antonym",
            "--model",
            "lens-laai-tiny-qwen2",
            "--dtype",
            "bf16",
            "--device",
            DEVICE,
            "--layer",
            "1",
            "--steps",
            "3",
            "--n-train",
            "8",
            "--n-valid",
            "4",
            "--n-test",
            "8",
            "--no-baselines",
            "--out",
            str(out),
            "--json",
            "--no-progress",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        code == 0 and summary["dtype"] == "bfloat16" and summary["device"].startswith(DEVICE) and summary["fast_path"]
    )
    assert all(t.dtype == torch.float32 for t in load_file(next(out.glob("*.safetensors"))).values())
    assert (
        main(
            [
                "eval",
                "--task",
                "antonym",
                "--model",
                "lens-laai-tiny-qwen2",
                "--dtype",
                "bf16",
                "--device",
                DEVICE,
                "--intervention",
                str(out),
                "--json",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "fit",
                "--task",
                "antonym",
                "--model",
                "lens-laai-tiny",
                "--dtype",
                "fp8",
                "--out",
                str(tmp_path / "x"),
                "--json",
            ]
        )
        == 2
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs this module itself")
def test_device_check_says_plainly_when_there_is_no_gpu(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "device_check", Path(__file__).parents[1] / "benchmarks" / "device_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["cuda"] is False and "no CUDA device" in out["status"]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_head_analysis_runs_and_its_patching_replay_is_exact(models, arch, task):
    from lens_laai.analysis.head_table import head_table

    model = model_for(models, arch)
    iv = fit(model, task, **{**FIT, "steps": 2}).intervention
    notices._warned.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        analysis = head_table(
            model,
            task,
            iv,
            n_prompts=4,
            shots=2,
            patching_prompts=3,
            n_random=2,
            methods=("dla", "act_patch", "attr_patch", "ablation"),
            progress=False,
        )
    assert not no_fallback_warnings(record)
    assert analysis.scores["act_patch"].shape == (model.cfg.n_layers, model.cfg.n_heads)
    for name in ("dla", "act_patch", "attr_patch", "zero_logprob_drop"):
        assert torch.isfinite(analysis.scores[name]).all(), name
    assert not any(p.requires_grad for p in model.parameters())

    from lens_laai.fastpath import BlockReplayModel, CostMeter

    batch = padded_batch(model, task)
    replay = BlockReplayModel(model, batch.input_ids, batch.attention_mask, CostMeter())
    assert replay.calls is not None, "blocks replayed, not the full-forward fallback"
    hook = [(hook_name(1), lambda z, hook: z + 0.5)]
    full = model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hook)[:, -1]
    fast = replay.run_with_hooks(batch.input_ids, hook)[:, -1]
    assert torch.allclose(fast, full, atol=1e-4 * max(1.0, float(full.abs().max())))
