"""Block recording and replay: run the decoder blocks again from layer ``L`` up on what a full forward gave them.

A change at layer ``L`` (a Δ on ``hook_z``, a patched head) cannot alter anything below ``L``. So
one full forward records, with forward pre-hooks, the hidden state and every other argument each
block was called with (:func:`record_block_calls`), and later runs replay blocks ``L..n-1`` on
those inputs (:func:`replay_logits`) under whatever hooks the caller sets. Two callers:

* the last-token prefix cache (:class:`lens_laai.fastpath.prefix.LastTokenCache`) records each
  argument cut to the last ``tail`` query positions (``width=``, ``tail=``) and replays those tokens
  per row (one, unless Δ acts at the last few positions);
* :class:`BlockReplayModel` records all positions and answers TransformerLens' patching
  functions, one patched run per head.

Example:
    >>> import torch
    >>> from lens_laai.testing import tiny_model
    >>> model = tiny_model()
    >>> tokens = torch.tensor([[1, 5, 7, 9]])
    >>> replay = BlockReplayModel(model, tokens, torch.ones_like(tokens), CostMeter())
    >>> replay.calls is not None  # every block's call recorded: patched runs replay blocks
    True
    >>> full = model(tokens)[:, -1]
    >>> bool(torch.allclose(replay.run_with_hooks(tokens)[:, -1], full, atol=1e-5))
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.fastpath.cost import CostMeter
from lens_laai.fastpath.kernels import unwrap
from lens_laai.fastpath.notices import warn_once

# hook names that belong to no block: below block 0, or above the last one
_EMBEDDING_HOOKS = ("embed", "hook_embed", "pos_embed", "hook_pos_embed")


class ReplayUnsupported(Exception):
    """A block argument that cannot be recorded for replay (the message says which and why).

    Example:
        >>> import torch
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> with record_block_calls(model, [1, 2]) as recorded:
        ...     _ = model(torch.tensor([[1, 5, 7]]))
        ...     _ = model(torch.tensor([[1, 5, 7]]))  # a second forward: block calls that cannot be told apart
        >>> isinstance(recorded[1], ReplayUnsupported), str(recorded[1])
        (True, 'block 1 ran twice in one forward')
    """


PREFIX = object()  # stands for "the KV cache" in a cut recorded call; replaced by the frozen prefix on replay


@dataclass
class BlockCall:
    """What the full forward passed one block, other than its hidden state.

    ``kwargs`` holds every argument by name: recorded with ``width`` (the last-token path), the
    attention mask's last ``tail`` query rows, the rotary tables' and position ids' last ``tail`` positions, flags as
    given and the cache as :data:`PREFIX`; recorded without, every argument as given and the cache
    as ``None``. ``device`` is where the block ran.

    Example:
        >>> import torch
        >>> kwargs = {"attention_mask": torch.zeros(1, 1, 1, 3), "past_key_values": PREFIX}
        >>> call = BlockCall(kwargs, torch.device("cpu"))
        >>> call.replay(prefix="my cache")["past_key_values"]  # the cache is replaced on replay
        'my cache'
        >>> call.replay()["attention_mask"].shape  # the last query row of the mask
        torch.Size([1, 1, 1, 3])
    """

    kwargs: dict[str, Any]
    device: torch.device

    def replay(self, prefix: Any = None) -> dict[str, Any]:
        """The keyword arguments to call the block with again, ``prefix`` standing in for the cache."""
        return {k: prefix if v is PREFIX else v for k, v in self.kwargs.items()}


RecordedCall = tuple[Tensor, BlockCall]  # the block's hidden-state input, and the rest of its call


def block_index(hook_name: str) -> float:
    """The block a hook name belongs to: -1 for embeddings, +inf for the final norm / unembedding.

    >>> block_index("blocks.3.attn.hook_z"), block_index("hook_embed"), block_index("ln_final.hook_normalized")
    (3, -1, inf)
    """
    parts = hook_name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return -1 if parts[0] in _EMBEDDING_HOOKS else float("inf")


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a Hugging Face KV cache.

    Example:
        >>> from transformers.cache_utils import DynamicCache
        >>> is_cache(DynamicCache()), is_cache(None)
        (True, False)
    """
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def _cut(name: str, value: Any, width: int, tail: int = 1) -> Any:
    """``value`` of argument ``name`` at the last ``tail`` of ``width`` positions, or :class:`ReplayUnsupported`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if is_cache(value):
        return PREFIX
    if isinstance(value, Tensor):
        if name == "attention_mask" and value.dim() == 4 and value.shape[-2:] == (width, width):
            return value[..., -tail:, :].detach().clone()
        if name in ("position_ids", "cache_position") and value.shape[-1] == width:
            return value[..., -tail:].detach().clone()
        raise ReplayUnsupported(f"tensor argument {name!r} of shape {tuple(value.shape)}")
    if (
        name == "position_embeddings"
        and isinstance(value, (tuple, list))
        and all(isinstance(t, Tensor) and t.dim() >= 2 and t.shape[-2] == width for t in value)
    ):
        return tuple(t[..., -tail:, :].detach().clone() for t in value)
    raise ReplayUnsupported(f"argument {name!r} of type {type(value).__name__}")


def _bind(block: Any, args: tuple, kwargs: dict) -> tuple[Tensor, dict[str, Any]]:
    """The hidden state and every other argument by name, as the wrapped HF layer's signature names them."""
    signature = inspect.signature(unwrap(block).forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as err:
        raise ReplayUnsupported(
            f"arguments that do not bind to {type(unwrap(block)).__name__}.forward ({err})"
        ) from None
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ReplayUnsupported("extra positional arguments")
        else:
            named[name] = value
    if not named:
        raise ReplayUnsupported("no hidden state")
    first = next(iter(signature.parameters))
    hidden = named.pop(first, None)
    if not isinstance(hidden, Tensor):
        raise ReplayUnsupported(f"first argument {first!r} is not a tensor")
    return hidden, named


def _record(module: Any, args: tuple, kwargs: dict, width: int | None, tail: int = 1) -> RecordedCall:
    hidden, named = _bind(module, args, kwargs)
    if width is None:
        kept = {name: (None if is_cache(value) else value) for name, value in named.items()}
        hidden = hidden.detach()
    else:
        kept = {name: _cut(name, value, width, tail) for name, value in named.items()}
        hidden = hidden[:, -tail:].detach().clone()
    if "use_cache" in kept:
        kept["use_cache"] = False
    return hidden, BlockCall(kept, hidden.device)


@contextmanager
def record_block_calls(
    model: TransformerBridge, layers: Sequence[int], width: int | None = None, tail: int = 1
) -> Iterator[dict[int, RecordedCall | ReplayUnsupported]]:
    """Forward pre-hooks on blocks ``layers`` recording each call, or the reason it cannot be replayed.

    With ``width`` (the prompt length) every argument is cut to the last ``tail`` positions; without,
    all positions are kept. The hooks are removed on exit, also after an exception. Check the result
    with :func:`recording_problems`.

    Example:
        >>> import torch
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> tokens = torch.tensor([[1, 5, 7, 9]])
        >>> with record_block_calls(model, [1, 2], width=4) as recorded:  # cut to the last position
        ...     _ = model(tokens)
        >>> hidden, call = recorded[1]
        >>> hidden.shape, recording_problems(recorded, [1, 2]), all(not b._forward_pre_hooks for b in model.blocks)
        (torch.Size([1, 1, 64]), [], True)
    """
    calls: dict[int, RecordedCall | ReplayUnsupported] = {}

    def record(index: int, module: Any, args: tuple, kwargs: dict) -> None:
        if index in calls:
            calls[index] = ReplayUnsupported(f"block {index} ran twice in one forward")
            return
        try:
            calls[index] = _record(module, args, kwargs, width, tail)
        except ReplayUnsupported as err:
            calls[index] = err

    def hook(index: int) -> Callable[..., None]:
        return lambda module, args, kwargs: record(index, module, args, kwargs)

    handles = []
    try:
        for index in layers:
            handles.append(model.blocks[index].register_forward_pre_hook(hook(index), with_kwargs=True))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def recording_problems(recorded: Mapping[int, RecordedCall | ReplayUnsupported], layers: Sequence[int]) -> list[str]:
    """Why ``recorded`` cannot be replayed over ``layers`` (empty when it can).

    Example:
        >>> recording_problems({0: ReplayUnsupported("argument 'x' of type Foo")}, [0, 1])
        ["argument 'x' of type Foo", 'block 1 was not called']
    """
    problems = [str(v) for v in recorded.values() if isinstance(v, ReplayUnsupported)]
    return problems + [f"block {l} was not called" for l in layers if l not in recorded]


def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma's final logit soft-capping, ``cap · tanh(logits / cap)`` (identity without a cap).

    Example:
        >>> import torch
        >>> soft_cap(torch.tensor([0.0, 10.0, 1000.0]), 30.0)
        tensor([ 0.0000,  9.6454, 30.0000])
        >>> soft_cap(torch.tensor([1000.0]), None)
        tensor([1000.])
    """
    return logits if cap is None else torch.tanh(logits / cap) * cap


def final_softcap(model: TransformerBridge) -> float | None:
    """The model's final logit soft-cap, if its config has one.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_model_for
        >>> final_softcap(tiny_model()), final_softcap(tiny_model_for("gemma2"))
        (None, 2.0)
    """
    cap = getattr(getattr(getattr(model, "original_model", None), "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def device_of(module: Any, default: Tensor) -> torch.device:
    """Where ``module``'s weights live (``default``'s device if it has none off the meta device).

    Example:
        >>> import torch
        >>> from lens_laai.testing import tiny_model
        >>> device_of(tiny_model().ln_final, torch.zeros(1))
        device(type='cpu')
    """
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return default.device


def replay_logits(
    model: TransformerBridge,
    hidden: Tensor,
    calls: Mapping[int, BlockCall],
    start: int,
    softcap: float | None = None,
    prefix: Any = None,
) -> Float[Tensor, "batch 1 vocab"]:
    """Last-position logits from blocks ``start..n-1`` run on ``hidden`` with the recorded ``calls``.

    Hooks the caller has set fire as usual; ``softcap`` is :func:`final_softcap`'s; ``prefix`` stands
    in for the cache of a cut call.

    Example:
        >>> import torch
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> tokens = torch.tensor([[1, 5, 7, 9]])
        >>> with torch.no_grad(), record_block_calls(model, [1, 2]) as recorded:
        ...     full = model(tokens)[:, -1]
        >>> calls = {l: call for l, (_, call) in recorded.items()}
        >>> with torch.no_grad():
        ...     again = replay_logits(model, recorded[1][0], calls, start=1)
        >>> again.shape, torch.allclose(again[:, -1], full, atol=1e-5)
        (torch.Size([1, 1, 396]), True)
    """
    h = hidden
    for layer in range(start, model.cfg.n_layers):
        call = calls[layer]
        out = model.blocks[layer](h.to(call.device), **call.replay(prefix))
        h = out[0] if isinstance(out, tuple) else out
    h = model.ln_final(h[:, -1:].to(device_of(model.ln_final, h)))
    return soft_cap(model.unembed(h.to(device_of(model.unembed, h))), softcap)


class BlockReplayModel:
    """The bridge as TransformerLens' patching functions call it, answered by replaying blocks.

    ``generic_activation_patch`` runs ``model.run_with_hooks(tokens, fwd_hooks=...)`` once per head.
    This stand-in runs the corrupted prompts (left-padded, with their attention mask) once while
    recording what every block was called with, and answers each patched run by replaying the
    blocks from the patched layer up on those recorded inputs, unembedding only the last
    position, the one the metric reads. A patch at layer L cannot change anything below L, so
    this is exact (tests compare it with a hand-made full-forward patch); it costs (n − L)/n of a
    forward. Architectures whose blocks cannot be replayed use the full forward, with a warning.

    Example:
        >>> import torch
        >>> from lens_laai.fastpath.cost import CostMeter
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> tokens = torch.tensor([[1, 5, 7, 9]])
        >>> meter = CostMeter()
        >>> replay = BlockReplayModel(model, tokens, torch.ones_like(tokens), meter)
        >>> def zero_head_0(z, hook):
        ...     z[:, :, 0] = 0.0
        ...     return z
        >>> patched = replay.run_with_hooks(tokens, fwd_hooks=[("blocks.2.attn.hook_z", zero_head_0)])
        >>> full = model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.attn.hook_z", zero_head_0)])
        >>> torch.allclose(patched[:, -1], full[:, -1], atol=1e-5), torch.allclose(full, model(tokens), atol=1e-3)
        (True, False)
    """

    def __init__(self, model: TransformerBridge, tokens: Tensor, mask: Tensor, meter: CostMeter) -> None:
        self.model, self.tokens, self.mask, self.cfg, self.meter = model, tokens, mask, model.cfg, meter
        self.calls = self._record()
        self.softcap = final_softcap(model)
        meter.add(float(mask.sum()), model.cfg.n_layers, backward=False)

    def _record(self) -> dict[int, RecordedCall] | None:
        layers = range(self.cfg.n_layers)
        with torch.no_grad(), record_block_calls(self.model, layers) as recorded:
            self.model(self.tokens, attention_mask=self.mask)
        if recording_problems(recorded, layers):
            warn_once(
                f"replay:{type(self.model.original_model).__name__}",
                "Activation patching cannot replay this model's "
                "blocks; every patched run is a full forward (same numbers, slower).",
            )
            return None
        return {l: c for l, c in recorded.items() if not isinstance(c, ReplayUnsupported)}

    @torch.no_grad()
    def run_with_hooks(self, tokens: Tensor, fwd_hooks: Sequence[tuple[str, Callable]] = (), **kwargs: Any) -> Tensor:
        first = min((block_index(name) for name, _ in fwd_hooks), default=0)
        if self.calls is None or first < 0:
            self.meter.add(float(self.mask.sum()), self.cfg.n_layers, backward=False)
            return self.model.run_with_hooks(tokens, attention_mask=self.mask, fwd_hooks=list(fwd_hooks), **kwargs)
        start = int(min(first, self.cfg.n_layers - 1))  # a hook past the last block: replay the last one
        self.meter.add(float(self.mask.sum()), self.cfg.n_layers - start, backward=False)
        with self.model.hooks(fwd_hooks=list(fwd_hooks)):
            calls = {l: call for l, (_, call) in self.calls.items()}
            return replay_logits(self.model, self.calls[start][0], calls, start, self.softcap)
