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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import LensLaaiError
from lens_laai.fastpath.blocks import (
    BlockCall,
    ReplayUnsupported,
    block_index,
    final_softcap,
    record_block_calls,
    recording_problems,
    replay_logits,
    soft_cap,
)
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
from lens_laai.fastpath.notices import warn_once
from lens_laai.models.bridge import hook_name
from lens_laai.tasks.prompts import Batch

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
# What a fast path's self-check may raise on a model it does not fit; it then steps aside with a
# warning. Our own errors (LensLaaiError, from a user's hook) and anything else propagate.
CHECK_FAILURES: tuple[type[Exception], ...] = (TypeError, AttributeError, RuntimeError, KeyError)


class FrozenPrefix:
    """A read-only stand-in for an HF cache: appends the new token's K/V without storing them.

    Example:
        >>> import torch
        >>> prefix = FrozenPrefix({0: torch.zeros(1, 2, 5, 4)}, {0: torch.ones(1, 2, 5, 4)})
        >>> k, v = prefix.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), layer_idx=0)
        >>> k.shape, prefix.get_seq_length(), prefix.keys[0].shape  # the cached keys are never extended
        (torch.Size([1, 2, 6, 4]), 5, torch.Size([1, 2, 5, 4]))
    """

    def __init__(self, keys: dict[int, Tensor], values: dict[int, Tensor]) -> None:
        self.keys, self.values = keys, values

    def update(self, k: Tensor, v: Tensor, layer_idx: int, cache_kwargs: Any = None) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys[layer_idx], k], dim=-2), torch.cat([self.values[layer_idx], v], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return next(iter(self.keys.values())).shape[-2]


@dataclass
class LastTokenCache:
    """What Δ at (layer, last token) cannot change, for one batch; see the module docstring.

    Built with ``tail=m``, the same for Δ at the last ``m`` positions: the prefix is all but those,
    and a step recomputes them from ``layer`` up (the logits are still the last token's).

    Example:
        >>> import torch
        >>> from lens_laai.interventions.head import delta_hook
        >>> from lens_laai.models.bridge import hook_name
        >>> from lens_laai.tasks.prompts import k_shot_prompts, model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> batch = model_batches(model, *k_shot_prompts(tiny_task(), 2))[0]
        >>> cache = LastTokenCache.build(model, batch, layer=1)  # one full forward
        >>> delta = torch.randn(4, 16)
        >>> fast = cache.logits([(hook_name(1), delta_hook(delta))])  # then one token per row through blocks 1..2
        >>> full = model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask,
        ...                             fwd_hooks=[(hook_name(1), delta_hook(delta))])[:, -1]
        >>> cache.path, fast.shape, torch.allclose(fast, full, atol=1e-4)
        ('kernel', torch.Size([24, 396]), True)
    """

    layer: int
    resid: Float[Tensor, "batch tail d_model"]
    prefix: FrozenPrefix
    calls: dict[int, BlockCall]
    full_logits: Float[Tensor, "batch vocab"]
    model: TransformerBridge
    softcap: float | None = None
    kernel: LlamaLastToken | None = None
    kernel_inputs: dict[int, BlockInputs] = field(default_factory=dict)
    hook_points: dict[str, Any] = field(default_factory=dict)  # the model's ``hook_dict`` is rebuilt per access
    tail: int = 1

    @classmethod
    def build(
        cls, model: TransformerBridge, batch: Batch, layer: int, check: bool = True, tail: int = 1
    ) -> LastTokenCache | None:
        """Run the one full forward; ``None`` (after a one-time warning) if the path can't be used.

        ``tail``: how many last positions a step recomputes from ``layer`` up (1 for Δ at the last
        token; ``m`` for Δ at the last ``m`` positions, which then attend to each other as in the full
        forward). The step's cost grows with ``tail``, not with the prompt.
        """
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

        width, layers = batch.input_ids.shape[1], range(layer, model.cfg.n_layers)
        try:
            with torch.no_grad(), record_block_calls(model, layers, width, tail) as recorded:
                logits, cache = model(
                    batch.input_ids,
                    attention_mask=batch.attention_mask,
                    past_key_values=DynamicCache(),
                    return_type="logits_and_cache",
                    use_cache=True,
                )
        except LensLaaiError:  # our own error from a hook: the caller's to see, not a missing fast path
            raise
        except (TypeError, ValueError) as err:  # a bridge that takes no cache argument
            warn_once(
                f"arch:{arch}",
                f"Fast last-token path unsupported for {arch} (its forward refused a KV cache: "
                f"{type(err).__name__}: {err}); using the full forward.",
            )
            return None
        problems = recording_problems(recorded, layers)
        calls = {l: c for l, c in recorded.items() if not isinstance(c, ReplayUnsupported)}
        if problems:
            warn_once(
                f"arch:{arch}", f"Fast last-token path unsupported for {arch} ({problems[0]}); using the full forward."
            )
            return None
        keys, values = prefix_kv(cache, layer, model.cfg.n_layers, tail)
        if keys is None or values is None:
            warn_once("nocache", "The model returned no KV cache; the fast path is off, using the full forward.")
            return None
        built = cls(
            layer,
            calls[layer][0],
            FrozenPrefix(keys, values),
            {l: c for l, (_, c) in calls.items()},
            logits[:, -1].detach(),
            model,
            final_softcap(model),
            tail=tail,
        )
        if check:
            try:
                ok = built._reproduces_full_forward()
            except CHECK_FAILURES as err:
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

    def logits(self, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Float[Tensor, "batch vocab"]:
        """Last-token logits with ``fwd_hooks`` active (e.g. an intervention's ``hook_z`` adder).

        Hooks below block ``layer`` would never fire here (that computation is cached), so they
        are refused rather than silently ignored.
        """
        z_hooks = self._kernel_hooks(fwd_hooks)
        if z_hooks is None:
            return self._bridged_logits(fwd_hooks)
        weight, bias = self._unembedding()
        return soft_cap(unembed(self._kernel_hidden(z_hooks).to(weight.device), weight, bias), self.softcap)

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

    def _kernel_hooks(self, fwd_hooks: Sequence[tuple[str, Callable]]) -> dict[int, list[ZHook]] | None:
        """Validate ``fwd_hooks``; ``{layer: [fn]}`` if the kernel can run them all, else ``None``."""
        for name, _ in fwd_hooks:
            if block_index(name) < self.layer:
                raise ValueError(
                    f"Hook {name!r} acts below block {self.layer}, which the last-token cache does not "
                    "recompute; build the cache at a lower layer or use the full forward."
                )
        if self.kernel is None:
            return None
        z_hooks: dict[int, list[ZHook]] = {}
        for name, fn in fwd_hooks:
            layer = block_index(name)
            if layer == float("inf") or name != hook_name(int(layer)):
                return None
            if name not in self.hook_points:
                self.hook_points[name] = self.model.hook_dict.get(name)
            point = self.hook_points[name]
            z_hooks.setdefault(int(layer), []).append(_bound_hook(fn, point))
        return z_hooks

    def _kernel_hidden(self, z_hooks: dict[int, list[ZHook]]) -> Float[Tensor, "batch d_model"]:
        assert self.kernel is not None
        return self.kernel.hidden(self.resid, self.kernel_inputs, self.prefix.keys, self.prefix.values, z_hooks)

    def _unembedding(self) -> tuple[Tensor, Tensor | None]:
        head = unwrap(self.model.unembed)
        return head.weight, getattr(head, "bias", None)

    def _bridged_logits(self, fwd_hooks: Sequence[tuple[str, Callable]]) -> Float[Tensor, "batch vocab"]:
        with self.model.hooks(fwd_hooks=list(fwd_hooks)):
            return replay_logits(self.model, self.resid, self.calls, self.layer, self.softcap, self.prefix)[:, -1]

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
        self.kernel, self.kernel_inputs = kernel, inputs
        if not check:
            return
        try:
            with torch.no_grad():
                ok, why = self._kernel_matches_bridge(), "disagrees with the full forward on this model"
        except CHECK_FAILURES as err:  # our own errors pass through, as in the blocks' check
            ok, why = False, f"failed on this {type(hf).__name__} ({type(err).__name__}: {err})"
        if not ok:
            self.kernel, self.kernel_inputs = None, {}
            warn_once(
                f"kernel:{type(hf).__name__}",
                f"The plain-tensor last-token kernel {why}; using the bridge's blocks (same results, slower).",
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
    """The relative agreement :data:`TOLERANCE` asks of a fast path in ``dtype`` (float32's if unlisted).

    Example:
        >>> import torch
        >>> tolerance(torch.float32), tolerance(torch.bfloat16), tolerance(torch.int8)  # unlisted: float32's
        (0.0001, 0.03, 0.0001)
    """
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def _close(fast: Tensor, full: Tensor) -> bool:
    full = full.to(fast.device)
    scale = full.float().abs().max().clamp(min=1.0)
    return bool(((fast.float() - full.float()).abs().max() / scale) < tolerance(full.dtype))


def _call_hook(fn: Callable, z: Tensor, point: Any) -> Tensor:
    out = fn(z, hook=point)
    return z if out is None else out


def _bound_hook(fn: Callable, point: Any) -> ZHook:
    """``fn`` as the kernel calls a ``hook_z`` hook: on ``z`` alone, with its hook point bound."""
    return lambda z: _call_hook(fn, z, point)


def prefix_kv(
    cache: Any, layer: int, n_layers: int, tail: int = 1
) -> tuple[dict[int, Tensor] | None, dict[int, Tensor] | None]:
    """Keys/values of all positions but the last ``tail``, for layers ``layer..n_layers-1``.

    Example:
        >>> import torch
        >>> from transformers.cache_utils import DynamicCache
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> _, cache = model(torch.tensor([[1, 5, 7, 9]]), past_key_values=DynamicCache(),
        ...                  return_type="logits_and_cache", use_cache=True)
        >>> keys, values = prefix_kv(cache, 1, model.cfg.n_layers)
        >>> sorted(keys), keys[1].shape  # [batch, kv heads, all positions but the last, d_head]
        ([1, 2], torch.Size([1, 2, 3, 16]))
    """
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
        keys[l], values[l] = k[..., :-tail, :].detach(), v[..., :-tail, :].detach()
    return keys, values
