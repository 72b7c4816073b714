"""Tiny random models and a tokenizer, built in memory, for tests and examples.

:func:`tiny_model` has the grouped-query Llama shape of the embedded SmolLM2 (RMSNorm, rotary
positions, more query heads than key/value heads) but only a few layers, so whole fits run in
seconds on a CPU. :func:`tiny_model_for` builds the same size of model for every architecture in
:data:`TINY_ARCHITECTURES` (GPT-2, GPT-NeoX/Pythia, Llama, Qwen2, Gemma 2 and 3, Mistral, Phi-3)
from a transformers config, with no download, and boots it with
``TransformerBridge.boot_transformers``. Weights are random (biases and norm weights too, so a
kernel that ignored them would be caught): they check plumbing and exactness, not learning.

Example:
    >>> from lens_laai.testing import tiny_model, tiny_model_for, tiny_task
    >>> model = tiny_model()
    >>> model.cfg.n_layers, model.cfg.n_heads
    (3, 4)
    >>> tiny_model_for("gpt2").cfg.n_heads
    4
    >>> len(tiny_task())
    24
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.models.bridge import freeze

TINY_PAIRS: list[tuple[str, str]] = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("old", "new"),
    ("good", "bad"),
    ("high", "low"),
    ("open", "closed"),
    ("dark", "light"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("full", "empty"),
    ("early", "late"),
    ("rich", "poor"),
    ("long", "short"),
    ("strong", "weak"),
    ("happy", "sad"),
    ("loud", "quiet"),
    ("thick", "thin"),
    ("young", "aged"),
    ("clean", "dirty"),
    ("near", "far"),
    ("first", "last"),
    ("left", "right"),
]


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on the tiny task's words and templates.

    Example:
        >>> tokenizer = tiny_tokenizer()
        >>> ids = tokenizer("Q: hot\\nA: cold")["input_ids"]
        >>> ids[0] == tokenizer.bos_token_id, tokenizer.decode(ids[1:])
        (True, 'Q: hot\\nA: cold')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<bos>", "<eos>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = [w for pair in TINY_PAIRS for w in pair]
    corpus = [f"Q: {a}\nA: {b}\n\n" for a, b in TINY_PAIRS] + [" " + " ".join(words)] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        name_or_path="lens-laai-tiny",
    )
    fast.add_bos_token = True
    return fast


def tiny_model(
    seed: int = 0,
    n_layers: int = 3,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> TransformerBridge:
    """A frozen random grouped-query Llama wrapped in a ``TransformerBridge`` (float32 on the CPU by default).

    Example:
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> model.cfg.n_layers, model.cfg.n_heads
        (2, 4)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    hf_model = LlamaForCausalLM(config).eval()
    return boot_in_memory("lens-laai-tiny", hf_model, tokenizer, dtype, device)


# Small windows on purpose: every prompt of the tiny task (6+ tokens) is longer than SLIDING_WINDOW,
# so models with sliding-window attention really mask inside the prompt.
SLIDING_WINDOW = 4


def _common(tokenizer: Any) -> dict[str, Any]:
    # initializer_range 0.1 (transformers: 0.02) gives logits of a few units, so a fast path that
    # computed something else would differ by far more than the check's tolerance.
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1,
    )


def _gpt2(t: Any, n_layers: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, n_inner=128, n_positions=512, **_common(t))
    )


def _neox(t: Any, n_layers: int) -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    # Pythia's layout: parallel attention + MLP, rotary on a quarter of each head, untied unembedding.
    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            hidden_size=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            use_parallel_residual=True,
            tie_word_embeddings=False,
            **_common(t),
        )
    )


def _llama(t: Any, n_layers: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **_common(t),
        )
    )


def _qwen2(t: Any, n_layers: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # q/k/v projections with biases, grouped-query attention, tied embeddings.
    return Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **_common(t),
        )
    )


def _gemma2(t: Any, n_layers: int) -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Soft-capping set low enough to bind on random weights; alternating sliding/full layers; tied
    # embeddings scaled by sqrt(d_model); (1 + w) RMSNorm before and after each sublayer.
    return Gemma2ForCausalLM(
        Gemma2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=SLIDING_WINDOW,
            final_logit_softcapping=2.0,
            attn_logit_softcapping=2.0,
            query_pre_attn_scalar=16,
            **_common(t),
        )
    )


def _gemma3(t: Any, n_layers: int) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Query/key norms, local (sliding, own rotary base) and global layers, tied scaled embeddings.
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    config = Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=SLIDING_WINDOW,
        layer_types=layer_types,
        query_pre_attn_scalar=16,
        **_common(t),
    )
    config.architectures = ["Gemma3ForCausalLM"]  # the bridge picks its adapter by this name
    return Gemma3ForCausalLM(config)


def _mistral(t: Any, n_layers: int) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(
        MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            sliding_window=SLIDING_WINDOW,
            tie_word_embeddings=False,
            **_common(t),
        )
    )


def _phi3(t: Any, n_layers: int) -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    # Fused qkv and gate/up projections.
    return Phi3ForCausalLM(
        Phi3Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            original_max_position_embeddings=512,
            sliding_window=None,
            tie_word_embeddings=False,
            **_common(t),
        )
    )


# architecture -> builder of a random HF causal LM of that architecture with the tiny tokenizer.
TINY_ARCHITECTURES: dict[str, Callable[[Any, int], Any]] = {
    "gpt2": _gpt2,
    "gpt-neox": _neox,
    "llama": _llama,
    "qwen2": _qwen2,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "mistral": _mistral,
    "phi3": _phi3,
}


def tiny_hf_model_for(architecture: str, seed: int = 0, n_layers: int = 3) -> Any:
    """A random Hugging Face causal LM of ``architecture`` (d_model 64, 4 heads), in eval mode, float32.

    Biases and norm weights are random too (transformers initialises them to 0 or 1), so code
    that ignored one would give other numbers.

    Example:
        >>> hf = tiny_hf_model_for("gemma2", n_layers=2)
        >>> type(hf).__name__, hf.config.num_hidden_layers, hf.config.sliding_window
        ('Gemma2ForCausalLM', 2, 4)
    """
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose one of {sorted(TINY_ARCHITECTURES)}.")
    torch.manual_seed(seed)
    hf_model = TINY_ARCHITECTURES[architecture](tiny_tokenizer(), n_layers).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return hf_model


def tiny_model_for(
    architecture: str,
    seed: int = 0,
    n_layers: int = 3,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> TransformerBridge:
    """A frozen ``TransformerBridge`` around :func:`tiny_hf_model_for` (float32 on the CPU by default).

    Example:
        >>> from lens_laai.testing import tiny_model_for
        >>> tiny_model_for("gpt2").cfg.n_layers
        3
    """
    hf_model = tiny_hf_model_for(architecture, seed, n_layers)
    return boot_in_memory(f"lens-laai-tiny-{architecture}", hf_model, tiny_tokenizer(), dtype, device)


def boot_in_memory(
    name: str, hf_model: Any, tokenizer: Any, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> TransformerBridge:
    """Boot an in-memory HF model, cast to ``dtype`` and moved to ``device`` first, and freeze it.

    ``boot_transformers`` ignores ``dtype`` (and ``device``) for a ready ``hf_model``, so the
    parameters are cast and moved here; buffers (rotary frequencies) keep float32, as a
    ``from_pretrained`` load in that dtype keeps them.

    Example:
        >>> import torch
        >>> hf = tiny_hf_model_for("gpt2")
        >>> model = boot_in_memory("my-gpt2", hf, tiny_tokenizer(), dtype=torch.bfloat16)
        >>> model.cfg.n_layers, next(model.parameters()).dtype, any(p.requires_grad for p in model.parameters())
        (3, torch.bfloat16, False)
    """
    if dtype is not None:
        for param in hf_model.parameters():
            param.data = param.data.to(dtype)
    if device is not None:
        hf_model = hf_model.to(device)
    # Name the device the weights are on: left out, boot_transformers records CUDA whenever a GPU
    # exists, even for a model that stayed on the CPU, and inputs would go to the wrong device.
    first = next(hf_model.parameters())
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=str(first.device), dtype=first.dtype
    )
    return freeze(bridge)
