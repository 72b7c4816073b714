"""Generation with an intervention: greedy or sampled continuations, cached or not, in the fit's mode.

Example:
    >>> from lens_laai import generate
    >>> from lens_laai.testing import tiny_model
    >>> texts = generate(tiny_model(), ["Q: hot\\nA:", "Q: up\\nA:"], max_new_tokens=2)
    >>> len(texts), all(isinstance(t, str) for t in texts)
    (2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import TaskError
from lens_laai.evaluation.evaluate import resolve_template
from lens_laai.interventions.mode import Mode
from lens_laai.interventions.protocol import Intervention
from lens_laai.tasks.prompts import encode_prompts

DeltaAt = Literal["prompt", "every_token"]


@overload
def generate(
    model: TransformerBridge,
    prompt: str,
    intervention: Intervention | None = None,
    max_new_tokens: int = 10,
    *,
    delta_at: DeltaAt = "prompt",
    shots: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_past_kv_cache: bool = True,
    prepend_bos: bool = True,
    strict: bool = False,
) -> str: ...


@overload
def generate(
    model: TransformerBridge,
    prompt: list[str] | tuple[str, ...],
    intervention: Intervention | None = None,
    max_new_tokens: int = 10,
    *,
    delta_at: DeltaAt = "prompt",
    shots: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_past_kv_cache: bool = True,
    prepend_bos: bool = True,
    strict: bool = False,
) -> list[str]: ...


@torch.no_grad()
def generate(
    model: TransformerBridge,
    prompt: str | Sequence[str],
    intervention: Intervention | None = None,
    max_new_tokens: int = 10,
    *,
    delta_at: DeltaAt = "prompt",
    shots: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_past_kv_cache: bool = True,
    prepend_bos: bool = True,
    strict: bool = False,
) -> str | list[str]:
    """Continue ``prompt`` (one string, or a list generated as one left-padded batch).

    ``delta_at="prompt"`` (default) adds Δ at the last prompt token only, as in training; every
    later token sees it through the attention cache. ``"every_token"`` also adds it at each
    generated token. An intervention (or ablation) whose ``positions`` are ``"all"`` acts at every
    prompt and generated token; explicit positions index the left-padded prompt (negative ones count
    back from its last token: a fit with ``last_positions=3`` acts at ``(-3, -2, -1)``). Cached and
    uncached generation compute the same thing in every case.
    ``temperature=0`` is greedy; otherwise sample, optionally restricted by ``top_k`` / ``top_p``,
    reproducibly with ``seed``. Each row stops at the tokenizer's EOS.

    ``shots=None`` (default) follows the mode a fitted intervention records: for a k-shot mode its
    k recorded demonstrations (from the fit's training pairs, in its prompt template) go before each
    prompt, and Δ is added only if the mode adds it. ``shots=0``: the prompt as given, Δ added (the
    paper's setting); ``shots=k``: the first k recorded demonstrations before it, Δ added.

    Example:
        >>> from lens_laai import generate
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> texts = generate(model, ["Q: hot\\nA:", "Q: up\\nA:"], max_new_tokens=2)  # greedy; pass an intervention to steer
        >>> len(texts), all(isinstance(t, str) for t in texts)
        (2, True)
    """
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    _check_generate_args(texts, max_new_tokens, delta_at, temperature, top_k, top_p)
    if intervention is not None:
        intervention.check_model(model, strict)
    before, intervention = _generation_mode(intervention, shots)
    texts = [before + t for t in texts]
    ids, mask = encode_prompts(model.tokenizer, texts, prepend_bos, model.cfg.n_ctx, max_new_tokens)
    if (
        intervention is not None
        and isinstance(intervention.positions, tuple)
        and not all(-ids.shape[1] <= p < ids.shape[1] for p in intervention.positions)
    ):
        raise TaskError(
            f"generate needs an intervention's explicit positions inside the (left-padded) prompt, "
            f"{-ids.shape[1]}..{ids.shape[1] - 1}; got {intervention.positions}. Use a longer prompt, or "
            "refit with fewer last_positions."
        )
    device = model.cfg.device
    ids, mask = (ids.to(device), mask.to(device)) if device is not None else (ids, mask)
    generator = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    prompt_len, eos = ids.shape[1], model.tokenizer.eos_token_id
    done = torch.zeros(len(texts), dtype=torch.bool, device=ids.device)
    new: list[Tensor] = []
    cache = None
    for _ in range(max_new_tokens):
        hooks = _generation_hooks(intervention, delta_at, use_past_kv_cache, cache is None, prompt_len, ids.shape[1])
        with model.hooks(fwd_hooks=hooks):
            if use_past_kv_cache:
                step_ids = ids if cache is None else ids[:, -1:]
                logits, cache = model(
                    step_ids, attention_mask=mask, past_key_values=cache, return_type="logits_and_cache", use_cache=True
                )
            else:
                logits = model(ids, attention_mask=mask)
        token = _next_token(logits[:, -1].float(), temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, eos if eos is not None else 0), token)
        new.append(token)
        done |= token == eos if eos is not None else torch.zeros_like(done)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if bool(done.all()):
            break
    out = [_decode(model.tokenizer, [int(t[i]) for t in new], eos) for i in range(len(texts))]
    return out[0] if isinstance(prompt, str) else out


def _check_generate_args(
    texts: list[str], max_new_tokens: Any, delta_at: str, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise TaskError("generate needs a non-empty prompt string or a non-empty list of them.")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise TaskError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}.")
    if delta_at not in ("prompt", "every_token"):
        raise TaskError(f"delta_at must be 'prompt' or 'every_token', got {delta_at!r}.")
    if not temperature >= 0 or temperature == float("inf"):
        raise TaskError(f"temperature must be a finite number ≥ 0, got {temperature!r}.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise TaskError(f"top_k must be an integer ≥ 1, got {top_k!r}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise TaskError(f"top_p must be in (0, 1], got {top_p!r}.")


def _generation_mode(iv: Intervention | None, shots: int | None) -> tuple[str, Intervention | None]:
    """(text before each prompt, the intervention that acts) for ``generate``'s ``shots``."""
    if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 0):
        raise TaskError(f"shots must be an integer ≥ 0 or None (the fit's recorded mode), got {shots!r}.")
    mode = Mode.of(iv.metadata) if iv is not None else None
    template = resolve_template(None, [iv] if iv is not None else [])
    if shots is None:
        if mode is None or mode.shots == 0:
            return "", iv if mode is None or mode.delta else None
        shots, iv = mode.shots, iv if mode.delta else None
    if shots == 0:
        return "", iv
    if mode is None or len(mode.demonstrations) < shots:
        have = 0 if mode is None else len(mode.demonstrations)
        raise TaskError(
            f"shots={shots} puts recorded demonstrations before the prompt, and this intervention records {have}; "
            "write the demonstrations into the prompt yourself and pass shots=0."
        )
    return template.prefix(mode.demonstrations[:shots]), iv


def _generation_hooks(
    iv: Intervention | None, delta_at: DeltaAt, cached: bool, first: bool, prompt_len: int, length: int
) -> list:
    if iv is None:
        return []
    if iv.positions == "all":
        return iv.fwd_hooks("all")  # under a cache each step sees only its new token: every position once
    if isinstance(iv.positions, tuple):
        at = tuple(p % prompt_len for p in iv.positions)  # negative: from the prompt's end, not the sequence's
        if delta_at == "every_token":  # and at each generated token: under a cache, the one each step adds
            return iv.fwd_hooks(at if first else "last") if cached else iv.fwd_hooks((*at, *range(prompt_len, length)))
        return iv.fwd_hooks(at) if first or not cached else []
    if cached:
        return iv.fwd_hooks("last") if first or delta_at == "every_token" else []
    if delta_at == "every_token":
        return iv.fwd_hooks(tuple(range(prompt_len - 1, length)))
    return iv.fwd_hooks((prompt_len - 1,))


def _next_token(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _decode(tokenizer: Any, tokens: list[int], eos: int | None) -> str:
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens)
