"""The last-token fast path: per-step cost independent of prompt length.

Δ acts at one layer ``L`` and only at the last prompt token, so nothing at earlier positions,
and nothing of the last token below ``L``, can change. :class:`LastTokenCache` runs one full
forward per batch and keeps (a) every layer ≥ L's keys/values of the earlier positions,
(b) the last token's residual stream entering block ``L`` and (c) what the full forward handed
each block ≥ L at the last position (:class:`BlockCall`: its attention-mask row, rotary tables,
position ids). A step then pushes the last token alone through blocks ``L..n-1`` (attending to
the cached keys/values, with the recorded mask row), the final norm, the unembedding and, where
the model has one, the final logit soft-cap. The intervention's ordinary ``hook_z`` hook fires
inside block ``L`` as usual.

Because each block gets the very mask and rotary tables the full forward built for it, the path
is exact wherever the block itself is: sliding windows shorter than the prompt (Mistral, Gemma),
per-layer rotary bases (Gemma 3), partial rotary (GPT-NeoX), learned positions (GPT-2, folded
into the cached residual stream) need no special case. The keys/values are recorded in a full
``DynamicCache`` of our own (the model's default cache keeps only a sliding window's worth).

Three paths, fastest first (:attr:`LastTokenCache.path`, :attr:`LayerRunner.path`):

* ``"kernel"``: Llama-family models whose modules are on the positive list of
  :mod:`lens_laai.fastpath.kernels` run plain tensor ops with a fused cross-entropy, whenever every hook
  is a ``hook_z`` hook. Checked on every batch against the full forward and against the bridge's
  blocks under a random ``hook_z`` edit; dropped with a warning if either disagrees.
* ``"blocks"``: the bridge's own blocks on the last token (any decoder the bridge wraps whose
  blocks take their inputs as keyword tensors we know how to cut: GPT-2, GPT-NeoX, Gemma,
  Phi-3, …). Checked against the full forward on every batch.
* ``"full forward"``: :meth:`LastTokenCache.build` returns ``None`` with a one-time warning
  when the bridge lacks a part, a block receives an argument we cannot cut to one position, or
  the check fails; callers then run the full forward.

Agreement is judged relative to the largest logit, within :data:`TOLERANCE` of the model's dtype.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.fastpath.kernels import (
    SUPPORTED_MODEL_TYPES,
    BlockInputs,
    KernelUnsupported,
    LlamaLastToken,
    ZHook,
    last_token_cross_entropy,
    unembed,
    unwrap,
)
from lens_laai.fastpath.scoring import score_logits
from lens_laai.models.bridge import hook_name, last_position_hooks
from lens_laai.tasks.prompts import Batch

_warned: set[str] = set()
REQUIRED_PARTS = ("blocks", "ln_final", "unembed")  # of the bridge
# Largest |fast − full| / max(1, max |full logit|) accepted, per model dtype. float32 differs only
# by summation order (≤ 4e-7 on the tiny models, 1.3e-6 on SmolLM2). In bf16/fp16 a GPU may round the
# one-token products differently from the full forward's; on the CPU we measured 0 in bf16 and
# ≤ 5e-5 in fp16 on every tiny architecture. bf16 keeps 8 bits of mantissa (eps 3.9e-3): 3e-2 allows
# a few roundings through the network, while a wrong computation is off by far more (on the tiny
# models, in float32 and bf16 alike: a missing soft-cap 0.6, a missing sliding window 0.45).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}
PATHS = ("kernel", "blocks", "full forward")


def warn_once(key: str, message: str) -> None:
    """Say ``message`` once per process (the fallback is silent about nothing, noisy about little)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def block_device(model: TransformerBridge, layer: int) -> torch.device:
    """The device block ``layer``'s weights live on (where Δ for that layer is kept while fitting)."""
    for param in model.blocks[layer].parameters():
        if param.device.type != "meta":  # weights offloaded by accelerate sit on "meta" until used
            return param.device
    return torch.device(model.cfg.device or "cpu")


class _FrozenPrefix:
    """A read-only stand-in for an HF cache: appends the new token's K/V without storing them."""

    def __init__(self, keys: dict[int, Tensor], values: dict[int, Tensor]) -> None:
        self.keys, self.values = keys, values

    def update(self, k: Tensor, v: Tensor, layer_idx: int, cache_kwargs: Any = None) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys[layer_idx], k], dim=-2), torch.cat([self.values[layer_idx], v], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return next(iter(self.keys.values())).shape[-2]


class _Unsupported(Exception):
    """A block argument the fast path cannot cut to the last position (message: which and why)."""


_PREFIX = object()  # stands for "the cache" in a recorded call; replaced by the frozen prefix on replay


@dataclass
class BlockCall:
    """What the full forward passed one block, cut to the last query position.

    ``kwargs`` holds every argument but the hidden state: the attention mask's last query row,
    the rotary tables' and position ids' last position, flags as given, and the cache replaced by
    the frozen prefix on :meth:`replay`. ``device`` is where the block ran.
    """

    kwargs: dict[str, Any]
    device: torch.device

    def replay(self, prefix: _FrozenPrefix) -> dict[str, Any]:
        return {k: prefix if v is _PREFIX else v for k, v in self.kwargs.items()}


def _cut(name: str, value: Any, width: int) -> Any:
    """``value`` of argument ``name`` at the last of ``width`` positions, or :class:`_Unsupported`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if _is_cache(value):
        return _PREFIX
    if isinstance(value, Tensor):
        if name == "attention_mask" and value.dim() == 4 and value.shape[-2:] == (width, width):
            return value[..., -1:, :].detach().clone()
        if name in ("position_ids", "cache_position") and value.shape[-1] == width:
            return value[..., -1:].detach().clone()
        raise _Unsupported(f"tensor argument {name!r} of shape {tuple(value.shape)}")
    if (
        name == "position_embeddings"
        and isinstance(value, (tuple, list))
        and all(isinstance(t, Tensor) and t.dim() >= 2 and t.shape[-2] == width for t in value)
    ):
        return tuple(t[..., -1:, :].detach().clone() for t in value)
    raise _Unsupported(f"argument {name!r} of type {type(value).__name__}")


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def _bind(block: Any, args: tuple, kwargs: dict) -> tuple[Tensor, dict[str, Any]]:
    """The hidden state and every other argument by name, as the wrapped HF layer's signature names them."""
    signature = inspect.signature(unwrap(block).forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as err:
        raise _Unsupported(f"arguments that do not bind to {type(unwrap(block)).__name__}.forward ({err})") from None
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise _Unsupported("extra positional arguments")
        else:
            named[name] = value
    if not named:
        raise _Unsupported("no hidden state")
    first = next(iter(signature.parameters))
    hidden = named.pop(first, None)
    if not isinstance(hidden, Tensor):
        raise _Unsupported(f"first argument {first!r} is not a tensor")
    return hidden, named


@contextmanager
def _recording(model: TransformerBridge, layer: int, width: int) -> Iterator[dict[int, Any]]:
    """Forward pre-hooks on blocks ``layer..n-1`` recording each call (a :class:`BlockCall`, or the reason not).

    The hooks are removed on exit, also after an exception.
    """
    calls: dict[int, Any] = {}

    def record(index: int, module: Any, args: tuple, kwargs: dict) -> None:
        if index in calls:
            calls[index] = _Unsupported(f"block {index} ran twice in one forward")
            return
        try:
            hidden, named = _bind(module, args, kwargs)
            cut = {name: _cut(name, value, width) for name, value in named.items()}
            if "use_cache" in cut:
                cut["use_cache"] = False
            calls[index] = (hidden[:, -1:].detach().clone(), BlockCall(cut, hidden.device))
        except _Unsupported as err:
            calls[index] = err

    handles = []
    try:
        for index in range(layer, model.cfg.n_layers):
            handles.append(
                model.blocks[index].register_forward_pre_hook(
                    lambda module, args, kwargs, index=index: record(index, module, args, kwargs), with_kwargs=True
                )
            )
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LastTokenCache:
    """What Δ at (layer, last token) cannot change, for one batch; see the module docstring."""

    layer: int
    resid: Float[Tensor, "batch 1 d_model"]
    prefix: _FrozenPrefix
    calls: dict[int, BlockCall]
    full_logits: Float[Tensor, "batch vocab"]
    model: TransformerBridge
    softcap: float | None = None
    kernel: LlamaLastToken | None = None
    kernel_inputs: dict[int, BlockInputs] = field(default_factory=dict)
    hook_points: dict[str, Any] = field(default_factory=dict)  # the model's ``hook_dict`` is rebuilt per access

    @classmethod
    def build(cls, model: TransformerBridge, batch: Batch, layer: int, check: bool = True) -> LastTokenCache | None:
        """Run the one full forward; ``None`` (after a one-time warning) if the path can't be used."""
        hf = getattr(model, "original_model", None)
        arch = type(hf).__name__
        missing = [part for part in REQUIRED_PARTS if not hasattr(model, part)]
        if missing:
            warn_once(
                f"arch:{arch}",
                f"Fast last-token path unsupported for {arch} (the bridge has no "
                f"{', '.join(missing)}); using the full forward.",
            )
            return None
        from transformers.cache_utils import DynamicCache

        width = batch.input_ids.shape[1]
        try:
            with torch.no_grad(), _recording(model, layer, width) as recorded:
                logits, cache = model(
                    batch.input_ids,
                    attention_mask=batch.attention_mask,
                    past_key_values=DynamicCache(),
                    return_type="logits_and_cache",
                    use_cache=True,
                )
        except (TypeError, ValueError) as err:  # a bridge that takes no cache argument
            warn_once(
                f"arch:{arch}",
                f"Fast last-token path unsupported for {arch} (its forward refused a KV cache: "
                f"{type(err).__name__}: {err}); using the full forward.",
            )
            return None
        problems = [str(v) for v in recorded.values() if isinstance(v, Exception)]
        problems += [f"block {l} was not called" for l in range(layer, model.cfg.n_layers) if l not in recorded]
        if problems:
            warn_once(
                f"arch:{arch}", f"Fast last-token path unsupported for {arch} ({problems[0]}); using the full forward."
            )
            return None
        keys, values = _prefix_kv(cache, layer, model.cfg.n_layers)
        if keys is None:
            warn_once("nocache", "The model returned no KV cache; the fast path is off, using the full forward.")
            return None
        softcap = getattr(getattr(hf, "config", None), "final_logit_softcapping", None)
        built = cls(
            layer,
            recorded[layer][0],
            _FrozenPrefix(keys, values),
            {l: c for l, (_, c) in recorded.items()},
            logits[:, -1].detach(),
            model,
            float(softcap) if softcap else None,
        )
        if check:
            try:
                ok = built._reproduces_full_forward()
            except (TypeError, AttributeError, RuntimeError, KeyError) as err:
                warn_once(
                    f"check:{arch}",
                    f"Fast last-token path failed on {arch} ({type(err).__name__}: {err}); using the full forward.",
                )
                return None
            if not ok:
                warn_once(
                    f"check:{arch}",
                    f"Fast last-token path disagrees with the full forward on {arch}; using the full forward.",
                )
                return None
        built._attach_kernel(check)
        return built

    @property
    def path(self) -> str:
        """``"kernel"`` (plain-tensor blocks) or ``"blocks"`` (the bridge's blocks on the last token)."""
        return "kernel" if self.kernel is not None else "blocks"

    def logits(self, fwd_hooks: list[tuple[str, Callable]] = ()) -> Float[Tensor, "batch vocab"]:
        """Last-token logits with ``fwd_hooks`` active (e.g. an intervention's ``hook_z`` adder).

        Hooks below block ``layer`` would never fire here (that computation is cached), so they
        are refused rather than silently ignored.
        """
        z_hooks = self._kernel_hooks(fwd_hooks)
        if z_hooks is None:
            return self._bridged_logits(fwd_hooks)
        weight, bias = self._unembedding()
        return _soft_cap(unembed(self._kernel_hidden(z_hooks).to(weight.device), weight, bias), self.softcap)

    def cross_entropy(
        self, fwd_hooks: list[tuple[str, Callable]], targets: Int[Tensor, " batch"]
    ) -> Float[Tensor, " batch"]:
        """Per-row cross-entropy of the last-token logits against ``targets`` (fused on the kernel path)."""
        z_hooks = self._kernel_hooks(fwd_hooks)
        if z_hooks is None or self.softcap is not None:
            logits = self.logits(fwd_hooks).float()
            return F.cross_entropy(logits, targets.to(logits.device), reduction="none")
        weight, bias = self._unembedding()
        hidden = self._kernel_hidden(z_hooks).to(weight.device)  # the head may sit on another device (device_map)
        return last_token_cross_entropy(hidden, weight, bias, targets.to(hidden.device))

    def _kernel_hooks(self, fwd_hooks: list[tuple[str, Callable]]) -> dict[int, list[ZHook]] | None:
        """Validate ``fwd_hooks``; ``{layer: [fn]}`` if the kernel can run them all, else ``None``."""
        for name, _ in fwd_hooks:
            if _block_index(name) < self.layer:
                raise ValueError(
                    f"Hook {name!r} acts below block {self.layer}, which the last-token cache does not "
                    "recompute; build the cache at a lower layer or use the full forward."
                )
        if self.kernel is None:
            return None
        z_hooks: dict[int, list[ZHook]] = {}
        for name, fn in fwd_hooks:
            layer = _block_index(name)
            if layer == float("inf") or name != hook_name(int(layer)):
                return None
            if name not in self.hook_points:
                self.hook_points[name] = self.model.hook_dict.get(name)
            point = self.hook_points[name]
            z_hooks.setdefault(int(layer), []).append(lambda z, fn=fn, point=point: _call_hook(fn, z, point))
        return z_hooks

    def _kernel_hidden(self, z_hooks: dict[int, list[ZHook]]) -> Float[Tensor, "batch d_model"]:
        assert self.kernel is not None
        return self.kernel.hidden(self.resid, self.kernel_inputs, self.prefix.keys, self.prefix.values, z_hooks)

    def _unembedding(self) -> tuple[Tensor, Tensor | None]:
        head = unwrap(self.model.unembed)
        return head.weight, getattr(head, "bias", None)

    def _bridged_logits(self, fwd_hooks: list[tuple[str, Callable]]) -> Float[Tensor, "batch vocab"]:
        h = self.resid
        with self.model.hooks(fwd_hooks=list(fwd_hooks)):
            for layer in range(self.layer, self.model.cfg.n_layers):
                call = self.calls[layer]
                out = self.model.blocks[layer](h.to(call.device), **call.replay(self.prefix))
                h = out[0] if isinstance(out, tuple) else out
            h = self.model.ln_final(h.to(_device_of(self.model.ln_final, h)))
            logits = self.model.unembed(h.to(_device_of(self.model.unembed, h)))[:, -1]
        return _soft_cap(logits, self.softcap)

    def _attach_kernel(self, check: bool) -> None:
        """Use the plain-tensor kernel if the architecture is on its list and it matches the bridge's blocks."""
        hf = self.model.original_model
        kernel, why = LlamaLastToken.check_model(hf, self.layer)
        if kernel is None:
            if getattr(getattr(hf, "config", None), "model_type", None) in SUPPORTED_MODEL_TYPES:
                warn_once(
                    f"kernel-declined:{type(hf).__name__}",
                    f"The plain-tensor last-token kernel does not "
                    f"apply to this {type(hf).__name__} ({why}); using the bridge's blocks (same results, slower).",
                )
            return
        try:
            inputs = {
                l: kernel.inputs(
                    self.calls[l].kwargs.get("position_embeddings"), self.calls[l].kwargs.get("attention_mask")
                )
                for l in kernel.blocks
            }
        except KernelUnsupported as err:
            warn_once(
                f"kernel-declined:{type(hf).__name__}",
                f"The plain-tensor last-token kernel does not apply to "
                f"this {type(hf).__name__} ({err}); using the bridge's blocks (same results, slower).",
            )
            return
        with torch.no_grad():
            self.kernel, self.kernel_inputs = kernel, inputs
            if check and not self._kernel_matches_bridge():
                self.kernel, self.kernel_inputs = None, {}
                warn_once(
                    f"kernel:{type(hf).__name__}",
                    "The plain-tensor last-token kernel disagrees with the "
                    "full forward on this model; using the bridge's blocks (same results, slower).",
                )

    def _kernel_matches_bridge(self) -> bool:
        """Kernel vs full forward at Δ = 0, and kernel vs the bridge's blocks under a random ``hook_z`` edit."""
        if not _close(self.logits(), self.full_logits):
            return False
        cfg = self.model.cfg
        noise = torch.randn(cfg.n_heads, cfg.d_head, generator=torch.Generator().manual_seed(0))

        def probe(z: Tensor, hook: Any) -> Tensor:
            return z + noise.to(z)

        hooks = [(hook_name(self.layer), probe)]
        return _close(self.logits(hooks), self._bridged_logits(hooks))

    def _reproduces_full_forward(self) -> bool:
        with torch.no_grad():
            return _close(self._bridged_logits([]), self.full_logits)


def tolerance(dtype: torch.dtype) -> float:
    """The relative agreement :data:`TOLERANCE` asks of a fast path in ``dtype`` (float32's if unlisted)."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def _close(fast: Tensor, full: Tensor) -> bool:
    full = full.to(fast.device)
    scale = full.float().abs().max().clamp(min=1.0)
    return bool(((fast.float() - full.float()).abs().max() / scale) < tolerance(full.dtype))


def _soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma's final logit soft-capping, ``cap · tanh(logits / cap)`` (identity without a cap)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _device_of(module: Any, default: Tensor) -> torch.device:
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return default.device


def _call_hook(fn: Callable, z: Tensor, point: Any) -> Tensor:
    out = fn(z, hook=point)
    return z if out is None else out


def _block_index(hook_name: str) -> float:
    """The block a hook name belongs to: -1 for embeddings, +inf for the final norm / unembedding."""
    parts = hook_name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return -1 if parts[0] in ("embed", "hook_embed", "pos_embed", "hook_pos_embed") else float("inf")


def _prefix_kv(cache: Any, layer: int, n_layers: int) -> tuple[dict[int, Tensor] | None, dict[int, Tensor] | None]:
    """Keys/values of all positions but the last, for layers ``layer..n_layers-1``."""
    if cache is None:
        return None, None
    keys, values = {}, {}
    for l in range(layer, n_layers):
        if hasattr(cache, "layers"):
            if l >= len(cache.layers):
                return None, None
            k, v = cache.layers[l].keys, cache.layers[l].values
        else:
            k, v = cache[l][0], cache[l][1]
        if k is None or k.numel() == 0:
            return None, None
        keys[l], values[l] = k[..., :-1, :].detach(), v[..., :-1, :].detach()
    return keys, values


class CostMeter:
    """Counts compute in token-layers (backward = 2× forward) to report forward-pass equivalents.

    One forward-pass equivalent is one full forward of one prompt: ``prompt tokens × n_layers``
    token-layers. Attention's length-dependent cost is ignored, which flatters long prompts
    slightly on the full path and never the fast path.

    Example:
        >>> from lens_laai.fastpath.runner import CostMeter
        >>> meter = CostMeter()
        >>> type(meter).__name__
        'CostMeter'
    """

    def __init__(self) -> None:
        self.token_layers = 0.0
        self.prompt_token_layers = 0.0
        self.prompts = 0

    def add(self, tokens: float, layers: int, backward: bool) -> None:
        self.token_layers += tokens * layers * (3 if backward else 1)

    def register_prompts(self, batch: Batch, n_layers: int) -> None:
        self.prompt_token_layers += float(batch.attention_mask.sum()) * n_layers
        self.prompts += len(batch)

    def merge(self, other: CostMeter) -> None:
        """Charge ``other``'s compute to this meter (in this meter's unit) and zero ``other``'s count."""
        self.token_layers += other.token_layers
        other.token_layers = 0.0

    def forward_equivalents(self) -> float:
        per_prompt = self.prompt_token_layers / max(self.prompts, 1)
        return self.token_layers / per_prompt if per_prompt else 0.0


class LayerRunner:
    """Last-token logits of fixed batches under a Δ at one layer; fast path where possible."""

    def __init__(
        self,
        model: TransformerBridge,
        batches: list[Batch],
        layer: int,
        fast: bool = True,
        meter: CostMeter | None = None,
    ) -> None:
        self.model, self.batches, self.layer = model, batches, layer
        self.meter = meter or CostMeter()
        n = model.cfg.n_layers
        self.caches: list[LastTokenCache | None] = []
        for batch in batches:
            self.meter.register_prompts(batch, n)
            cache = LastTokenCache.build(model, batch, layer) if fast else None
            if cache is not None:
                self.meter.add(float(batch.attention_mask.sum()), n, backward=False)
            self.caches.append(cache)

    @property
    def is_fast(self) -> bool:
        return all(c is not None for c in self.caches)

    @property
    def path(self) -> str:
        """The slowest path any batch takes: ``"kernel"``, ``"blocks"`` or ``"full forward"``."""
        taken = [c.path if c is not None else "full forward" for c in self.caches] or ["full forward"]
        return max(taken, key=PATHS.index)

    @property
    def delta_device(self) -> torch.device:
        """Where Δ is kept while fitting: the intervened block's device."""
        return block_device(self.model, self.layer)

    def logits(
        self, index: int, fwd_hooks: list[tuple[str, Callable]], backward: bool = False
    ) -> Float[Tensor, "batch vocab"]:
        batch, cache = self.batches[index], self.caches[index]
        n = self.model.cfg.n_layers
        if cache is not None:
            self.meter.add(len(batch), n - self.layer, backward)
            return cache.logits(fwd_hooks)
        self.meter.add(float(batch.attention_mask.sum()), n, backward)
        out = self.model.run_with_hooks(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            fwd_hooks=list(fwd_hooks) + last_position_hooks(self.model),
        )
        return out[:, -1]

    def cross_entropy(self, index: int, fwd_hooks: list[tuple[str, Callable]], backward: bool = False) -> Tensor:
        """Summed cross-entropy of batch ``index``'s first target tokens (the fitting loss)."""
        batch, cache = self.batches[index], self.caches[index]
        if cache is not None:
            self.meter.add(len(batch), self.model.cfg.n_layers - self.layer, backward)
            return cache.cross_entropy(fwd_hooks, batch.target_ids).sum()
        logits = self.logits(index, fwd_hooks, backward).float()
        return F.cross_entropy(logits, batch.target_ids.to(logits.device), reduction="sum")

    @torch.no_grad()
    def scores(self, fwd_hooks: list[tuple[str, Callable]]) -> tuple[float, float]:
        """Top-1 accuracy and mean cross-entropy of the first target token over all batches."""
        correct, ce, n = 0, 0.0, 0
        for i, batch in enumerate(self.batches):
            s = score_logits(self.logits(i, fwd_hooks), batch.target_ids)
            correct += int(s.correct.sum())
            ce += float(s.cross_entropy.sum())
            n += len(batch)
        return correct / n, ce / n
