"""The last-token fast path: per-step cost independent of prompt length.

Δ acts at one layer ``L`` and only at the last prompt token, so nothing at earlier positions,
and nothing of the last token below ``L``, can change. :class:`LastTokenCache` runs one full
forward per batch and keeps (a) every layer ≥ L's keys/values of the earlier positions and
(b) the last token's residual stream entering block ``L``. A step then pushes the last token
alone through blocks ``L..n-1`` (attending to the cached keys/values), the final norm and the
unembedding. The intervention's ordinary ``hook_z`` hook fires inside block ``L`` as usual.

The path needs a Hugging Face decoder with ``model.layers``, ``model.norm``,
``model.rotary_emb`` and ``lm_head`` (Llama, Mistral, Qwen2, SmolLM, …). On build it checks
that it reproduces the full forward's last-token logits; if not, or if the architecture lacks
those parts, :meth:`LastTokenCache.build` returns ``None`` with a one-time warning and callers
use the full forward. For Llama-family models a step runs on :mod:`lens_laai.kernels` (plain
tensor ops, fused cross-entropy) whenever every hook is a ``hook_z`` hook; that kernel is checked
against the full forward and against the bridge's blocks under a random ``hook_z`` edit, and is
dropped with a warning if either disagrees.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from .intervention import hook_name
from .kernels import LlamaLastToken, ZHook, last_token_cross_entropy, rotary_tables, unembed, unwrap
from .prompts import Batch
from .scoring import score_logits

_warned: set[str] = set()
REQUIRED_PARTS = ("layers", "norm", "rotary_emb")  # of the HF backbone, besides ``lm_head``


def warn_once(key: str, message: str) -> None:
    """Say ``message`` once per process (the fallback is silent about nothing, noisy about little)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class _FrozenPrefix:
    """A read-only stand-in for an HF cache: appends the new token's K/V without storing them."""

    def __init__(self, keys: dict[int, Tensor], values: dict[int, Tensor]) -> None:
        self.keys, self.values = keys, values

    def update(self, k: Tensor, v: Tensor, layer_idx: int, cache_kwargs: Any = None) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys[layer_idx], k], dim=-2), torch.cat([self.values[layer_idx], v], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return next(iter(self.keys.values())).shape[-2]


@dataclass
class LastTokenCache:
    """What Δ at (layer, last token) cannot change, for one batch; see the module docstring."""

    layer: int
    resid: Float[Tensor, "batch 1 d_model"]
    prefix: _FrozenPrefix
    key_mask: Bool[Tensor, "batch 1 1 pos"]
    position_ids: Tensor
    full_logits: Float[Tensor, "batch vocab"]
    model: TransformerBridge
    kernel: LlamaLastToken | None = None
    rotary: tuple[Tensor, Tensor] | None = None
    hook_points: dict[str, Any] = field(default_factory=dict)  # the model's ``hook_dict`` is rebuilt per access

    @classmethod
    def build(cls, model: TransformerBridge, batch: Batch, layer: int, check: bool = True) -> "LastTokenCache | None":
        """Run the one full forward; ``None`` (after a one-time warning) if the path can't be used."""
        hf = getattr(model, "original_model", None)
        backbone = getattr(hf, "model", None)
        if backbone is None or not all(hasattr(backbone, n) for n in REQUIRED_PARTS) or not hasattr(hf, "lm_head"):
            warn_once(f"arch:{type(hf).__name__}", f"Fast last-token path unsupported for {type(hf).__name__}; using the full forward.")
            return None
        captured: dict[str, Tensor] = {}

        def grab(x: Tensor, hook: Any) -> None:
            captured["resid"] = x[:, -1:].detach().clone()

        with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_in", grab)]):
            logits, cache = model(
                batch.input_ids, attention_mask=batch.attention_mask, return_type="logits_and_cache", use_cache=True
            )
        keys, values = _prefix_kv(cache, layer, model.cfg.n_layers)
        if keys is None or "resid" not in captured:
            warn_once("nocache", "The model returned no KV cache; the fast path is off, using the full forward.")
            return None
        mask = batch.attention_mask.bool()
        position_ids = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -1:]
        built = cls(layer, captured["resid"], _FrozenPrefix(keys, values), mask[:, None, None, :],
                    position_ids, logits[:, -1].detach(), model)
        if check and not built._reproduces_full_forward():
            warn_once(f"check:{type(hf).__name__}", "Fast last-token path disagrees with the full forward on this model; using the full forward.")
            return None
        built._attach_kernel(check)
        return built

    def logits(self, fwd_hooks: list[tuple[str, Callable]] = ()) -> Float[Tensor, "batch vocab"]:
        """Last-token logits with ``fwd_hooks`` active (e.g. an intervention's ``hook_z`` adder).

        Hooks below block ``layer`` would never fire here (that computation is cached), so they
        are refused rather than silently ignored.
        """
        z_hooks = self._kernel_hooks(fwd_hooks)
        if z_hooks is None:
            return self._bridged_logits(fwd_hooks)
        return unembed(self._kernel_hidden(z_hooks), *self._unembedding())

    def cross_entropy(self, fwd_hooks: list[tuple[str, Callable]], targets: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
        """Per-row cross-entropy of the last-token logits against ``targets`` (fused on the kernel path)."""
        z_hooks = self._kernel_hooks(fwd_hooks)
        if z_hooks is None:
            return F.cross_entropy(self._bridged_logits(fwd_hooks).float(), targets, reduction="none")
        return last_token_cross_entropy(self._kernel_hidden(z_hooks), *self._unembedding(), targets)

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
        assert self.kernel is not None and self.rotary is not None
        return self.kernel.hidden(self.resid, self.rotary, self.prefix.keys, self.prefix.values, self.key_mask, z_hooks)

    def _unembedding(self) -> tuple[Tensor, Tensor | None]:
        head = unwrap(self.model.original_model.lm_head)
        return head.weight, head.bias

    def _bridged_logits(self, fwd_hooks: list[tuple[str, Callable]]) -> Float[Tensor, "batch vocab"]:
        hf = self.model.original_model
        backbone = hf.model
        h = self.resid
        with self.model.hooks(fwd_hooks=list(fwd_hooks)):
            pos_emb = backbone.rotary_emb(h, self.position_ids)
            for layer in range(self.layer, self.model.cfg.n_layers):
                out = backbone.layers[layer](
                    h, attention_mask=self.key_mask, position_ids=self.position_ids,
                    past_key_values=self.prefix, position_embeddings=pos_emb, use_cache=False,
                )
                h = out[0] if isinstance(out, tuple) else out
            return hf.lm_head(backbone.norm(h))[:, -1]

    def _attach_kernel(self, check: bool) -> None:
        """Use the plain-tensor kernel if the architecture has one and it matches the bridge's blocks."""
        hf = self.model.original_model
        kernel = LlamaLastToken.for_model(hf, self.layer)
        if kernel is None:
            return
        with torch.no_grad():
            self.rotary = rotary_tables(*(t.detach() for t in hf.model.rotary_emb(self.resid, self.position_ids)))
            self.kernel = kernel
            if check and not self._kernel_matches_bridge():
                self.kernel = None
                warn_once(f"kernel:{type(hf).__name__}", "The plain-tensor last-token kernel disagrees with the "
                          "full forward on this model; using the bridge's blocks (same results, slower).")

    def _kernel_matches_bridge(self) -> bool:
        """Kernel vs full forward at Δ = 0, and kernel vs the bridge's blocks under a random ``hook_z`` edit."""
        if not _close(self.logits(), self.full_logits):
            return False
        cfg = self.model.cfg
        noise = torch.randn(cfg.n_heads, cfg.d_head, generator=torch.Generator().manual_seed(0)).to(self.resid)
        probe = [(hook_name(self.layer), lambda z, hook: z + noise)]
        return _close(self.logits(probe), self._bridged_logits(probe))

    def _reproduces_full_forward(self) -> bool:
        with torch.no_grad():
            return _close(self._bridged_logits([]), self.full_logits)


def _close(fast: Tensor, full: Tensor) -> bool:
    scale = full.abs().max().clamp(min=1.0)
    return bool(((fast - full).abs().max() / scale) < 1e-4)


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

    def merge(self, other: "CostMeter") -> None:
        """Charge ``other``'s compute to this meter (in this meter's unit) and zero ``other``'s count."""
        self.token_layers += other.token_layers
        other.token_layers = 0.0

    def forward_equivalents(self) -> float:
        per_prompt = self.prompt_token_layers / max(self.prompts, 1)
        return self.token_layers / per_prompt if per_prompt else 0.0


class LayerRunner:
    """Last-token logits of fixed batches under a Δ at one layer; fast path where possible."""

    def __init__(
        self, model: TransformerBridge, batches: list[Batch], layer: int, fast: bool = True, meter: CostMeter | None = None
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

    def logits(self, index: int, fwd_hooks: list[tuple[str, Callable]], backward: bool = False) -> Float[Tensor, "batch vocab"]:
        batch, cache = self.batches[index], self.caches[index]
        n = self.model.cfg.n_layers
        if cache is not None:
            self.meter.add(len(batch), n - self.layer, backward)
            return cache.logits(fwd_hooks)
        self.meter.add(float(batch.attention_mask.sum()), n, backward)
        out = self.model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=fwd_hooks)
        return out[:, -1]

    def cross_entropy(self, index: int, fwd_hooks: list[tuple[str, Callable]], backward: bool = False) -> Tensor:
        """Summed cross-entropy of batch ``index``'s first target tokens (the fitting loss)."""
        batch, cache = self.batches[index], self.caches[index]
        if cache is not None:
            self.meter.add(len(batch), self.model.cfg.n_layers - self.layer, backward)
            return cache.cross_entropy(fwd_hooks, batch.target_ids).sum()
        return F.cross_entropy(self.logits(index, fwd_hooks, backward).float(), batch.target_ids, reduction="sum")

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
