"""A tiny random model and tokenizer, built in memory, for tests and examples.

The model has the grouped-query Llama shape of the embedded SmolLM2 (RMSNorm, rotary
positions, more query heads than key/value heads) but only a few layers, so whole fits run in
seconds on a CPU. Its weights are random: it checks plumbing and invariants, not learning
quality.

Example:
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> model = tiny_model()
    >>> model.cfg.n_layers, model.cfg.n_heads
    (3, 4)
    >>> len(tiny_task())
    24
"""

from __future__ import annotations

import torch
from transformer_lens.model_bridge import TransformerBridge

from .bridge import freeze
from .tasks import Task

TINY_PAIRS: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"),
    ("good", "bad"), ("high", "low"), ("open", "closed"), ("dark", "light"), ("hard", "soft"),
    ("wet", "dry"), ("full", "empty"), ("early", "late"), ("rich", "poor"), ("long", "short"),
    ("strong", "weak"), ("happy", "sad"), ("loud", "quiet"), ("thick", "thin"), ("young", "aged"),
    ("clean", "dirty"), ("near", "far"), ("first", "last"), ("left", "right"),
]


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on the tiny task's words and templates."""
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


def tiny_model(seed: int = 0, n_layers: int = 3, n_heads: int = 4, n_kv_heads: int = 2) -> TransformerBridge:
    """A frozen random grouped-query Llama wrapped in a ``TransformerBridge``."""
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
    bridge = TransformerBridge.boot_transformers("lens-laai-tiny", hf_model=hf_model, tokenizer=tokenizer)
    return freeze(bridge)


def tiny_task() -> Task:
    """An antonym-like task whose words are single tokens of :func:`tiny_tokenizer`."""
    return Task("tiny-antonym", list(TINY_PAIRS))
