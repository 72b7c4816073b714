"""Plain-tensor kernels that make a fast-path step cheaper without changing what it computes.

* :class:`LlamaLastToken` pushes one token per row through a Llama-family decoder block
  (RMSNorm, rotary attention over cached keys/values with grouped-query heads, gated MLP) in
  plain tensor ops and calls ``hook_z`` hook functions itself. The bridge's own blocks compute
  the same numbers, but at one token per row their ~20 hook points and wrappers per block cost
  about a fifth of a step.
* :func:`last_token_cross_entropy` fuses the unembedding, the cross-entropy and its gradient
  with respect to the final hidden state into one pass over the unembedding matrix (an online
  log-sum-exp, as in flash attention). The matrix (49,152 × 576 on SmolLM2) is then read once
  per gradient evaluation instead of twice.

:class:`lens_laai.fastpath.LastTokenCache` checks the kernel against the full forward on every
batch it builds and falls back to the bridge's blocks, with a warning, if they disagree.

Example:
    >>> import torch
    >>> from lens_laai.kernels import last_token_cross_entropy
    >>> h = torch.randn(3, 8, requires_grad=True)
    >>> w, targets = torch.randn(50, 8), torch.tensor([1, 7, 49])
    >>> loss = last_token_cross_entropy(h, w, None, targets, chunk=16)
    >>> reference = torch.nn.functional.cross_entropy(h @ w.T, targets, reduction="none")
    >>> bool(torch.allclose(loss, reference, atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ZHook = Callable[[Tensor], Tensor]


def unwrap(module: Any) -> Any:
    """The Hugging Face module under any TransformerBridge wrappers."""
    for _ in range(8):
        inner = getattr(module, "original_component", None) or getattr(module, "_original_component", None)
        if inner is None or inner is module:
            return module
        module = inner
    return module


def _linear(module: Any) -> tuple[Tensor, Tensor | None]:
    inner = unwrap(module)
    return inner.weight, inner.bias


def _norm(module: Any) -> tuple[Tensor, float]:
    inner = unwrap(module)
    eps = getattr(inner, "variance_epsilon", None)
    return inner.weight, float(eps if eps is not None else inner.eps)


def rms_norm(x: Float[Tensor, "... d"], weight: Float[Tensor, " d"], eps: float) -> Float[Tensor, "... d"]:
    """Llama's RMSNorm (float32 statistics, like the Hugging Face module)."""
    if x.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotary_tables(cos: Float[Tensor, "batch 1 d_head"], sin: Float[Tensor, "batch 1 d_head"]) -> tuple[Tensor, Tensor]:
    """``(cos, signed sin)`` shaped ``[batch, 1, 1, d_head]`` for :func:`_rotate`."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, None], signed[:, None]


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary embedding: ``x·cos + rotate_half(x)·sin``, with rotate_half as a roll and a sign."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass
class _Block:
    ln1: tuple[Tensor, float]
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    o: tuple[Tensor, Tensor | None]
    ln2: tuple[Tensor, float]
    gate: tuple[Tensor, Tensor | None]
    up: tuple[Tensor, Tensor | None]
    down: tuple[Tensor, Tensor | None]
    act: Callable[[Tensor], Tensor]


class LlamaLastToken:
    """One token per row through Llama-family blocks ``first..n-1``, keys/values of earlier positions given."""

    def __init__(self, hf_model: nn.Module, first: int) -> None:
        cfg = hf_model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        backbone = hf_model.model
        self.blocks = {l: self._block(backbone.layers[l]) for l in range(first, len(backbone.layers))}
        self.final_norm = _norm(backbone.norm)

    @classmethod
    def for_model(cls, hf_model: nn.Module, first: int) -> "LlamaLastToken | None":
        """A kernel for ``hf_model`` from block ``first`` on, or ``None`` if its architecture isn't plain Llama."""
        cfg = getattr(hf_model, "config", None)
        if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return None
        if getattr(cfg, "use_sliding_window", cfg.model_type == "mistral") and getattr(cfg, "sliding_window", None):
            return None
        try:
            return cls(hf_model, first)
        except AttributeError:
            return None

    @staticmethod
    def _block(layer: nn.Module) -> _Block:
        inner = unwrap(layer)
        attn, mlp = unwrap(inner.self_attn), unwrap(inner.mlp)
        if hasattr(attn, "q_norm"):
            raise AttributeError("query/key norms are not part of the plain Llama block")
        return _Block(_norm(inner.input_layernorm), _linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj),
                      _linear(attn.o_proj), _norm(inner.post_attention_layernorm), _linear(mlp.gate_proj),
                      _linear(mlp.up_proj), _linear(mlp.down_proj), unwrap(mlp.act_fn))

    def hidden(
        self,
        h: Float[Tensor, "batch 1 d_model"],
        rotary: tuple[Tensor, Tensor],
        keys: dict[int, Tensor],
        values: dict[int, Tensor],
        key_mask: Bool[Tensor, "batch 1 1 pos"],
        z_hooks: dict[int, list[ZHook]],
    ) -> Float[Tensor, "batch d_model"]:
        """The final-normed last-token state; ``z_hooks[l]`` edit ``blocks.l.attn.hook_z`` ([batch, 1, head, d_head]).

        ``rotary`` comes from :func:`rotary_tables`.
        """
        cos, sin = rotary
        for l, blk in self.blocks.items():
            h = self._block_forward(blk, h, cos, sin, keys[l], values[l], key_mask, z_hooks.get(l, ()))
        return rms_norm(h, *self.final_norm)[:, -1]

    def _block_forward(self, blk: _Block, h: Tensor, cos: Tensor, sin: Tensor, k_prev: Tensor, v_prev: Tensor,
                       key_mask: Tensor, z_hooks: list[ZHook] | tuple) -> Tensor:
        b, group = h.shape[0], self.n_heads // self.n_kv
        x = rms_norm(h, *blk.ln1)
        # query head h reads key/value head h // group, so queries group as [batch, kv, group, d_head]
        q = _rotate(F.linear(x, *blk.q).view(b, self.n_kv, group, self.d_head), cos, sin)
        k = _rotate(F.linear(x, *blk.k).view(b, self.n_kv, 1, self.d_head), cos, sin)
        v = F.linear(x, *blk.v).view(b, self.n_kv, 1, self.d_head)
        keys, vals = torch.cat([k_prev, k], dim=-2), torch.cat([v_prev, v], dim=-2)
        scores = (q @ keys.transpose(-1, -2)).mul_(self.d_head ** -0.5).masked_fill_(~key_mask, -float("inf"))
        z = (scores.softmax(-1) @ vals).reshape(b, 1, self.n_heads, self.d_head)
        for fn in z_hooks:
            z = fn(z)
        h = h + F.linear(z.reshape(b, 1, -1), *blk.o)
        x = rms_norm(h, *blk.ln2)
        return h + F.linear(blk.act(F.linear(x, *blk.gate)) * F.linear(x, *blk.up), *blk.down)


def unembed(h: Float[Tensor, "batch d_model"], weight: Float[Tensor, "vocab d_model"], bias: Tensor | None) -> Float[Tensor, "batch vocab"]:
    """``h @ weight.T + bias``, computed as ``(weight @ h.T).T`` (faster on CPU for few rows)."""
    logits = torch.mm(weight, h.t().contiguous()).t()
    return logits if bias is None else logits + bias


def last_token_cross_entropy(
    h: Float[Tensor, "batch d_model"],
    weight: Float[Tensor, "vocab d_model"],
    bias: Tensor | None,
    targets: Int[Tensor, " batch"],
    chunk: int = 1024,
) -> Float[Tensor, " batch"]:
    """Per-row cross-entropy of ``unembed(h)`` against ``targets``, differentiable in ``h`` only.

    With a gradient wanted (float32 weights, on CPU, where reading ``weight`` twice is what costs)
    the forward pass also computes the gradient in the same sweep over ``weight``, chunk by chunk;
    otherwise this is the plain computation.
    """
    fused = torch.is_grad_enabled() and h.requires_grad and weight.dtype == torch.float32 and h.device.type == "cpu"
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if not (fused and frozen):
        return F.cross_entropy(unembed(h, weight, bias).float(), targets, reduction="none")
    return _FusedCrossEntropy.apply(h, weight, bias, targets, chunk)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        rows = h.shape[0]
        running_max = h.new_full((rows, 1), -float("inf"))
        total = h.new_zeros((rows, 1))
        weighted = torch.zeros_like(h)  # Σ_v exp(logit_v − max) · weight_v
        for start in range(0, weight.shape[0], chunk):
            w = weight[start:start + chunk]
            logits = h @ w.T if bias is None else h @ w.T + bias[start:start + chunk]
            new_max = torch.maximum(running_max, logits.amax(-1, keepdim=True))
            rescale = torch.exp(running_max - new_max)
            p = torch.exp(logits - new_max)
            total = total * rescale + p.sum(-1, keepdim=True)
            weighted = weighted * rescale + p @ w
            running_max = new_max
        target_w = weight[targets]
        target_logit = (h * target_w).sum(-1) + (0.0 if bias is None else bias[targets])
        ctx.save_for_backward(weighted / total - target_w)
        return (running_max + total.log()).squeeze(-1) - target_logit

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        (grad_h,) = ctx.saved_tensors
        return grad_loss[:, None] * grad_h, None, None, None, None
