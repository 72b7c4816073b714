"""What a head writes to the residual stream: the block's own attention-output path, run for real.

A block adds its attention output to the residual stream through its output projection
(``attn.o``) and, on some architectures, more: Gemma 2 and 3 normalise the attention output
(``post_attention_layernorm``, the bridge's ``ln1_post``) before the residual add. ``Δ_h · W_O``
is a head's write only when that path is linear. Here the write is what the real modules
compute, so it is right on every architecture; where the path is not linear (an RMSNorm of the
whole attention output) a head's write depends on the other heads' outputs at the same position,
and is defined as the exact difference of the block's write with and without that head's share.

Example:
    >>> import torch
    >>> from lens_laai.models.head_write import attention_write, head_writes
    >>> from lens_laai.testing import tiny_model
    >>> model = tiny_model()
    >>> z = torch.randn(2, 4, 16)                      # [batch, n_heads, d_head] at one position
    >>> attention_write(model, 1, z).shape               # what block 1's attention adds
    torch.Size([2, 64])
    >>> head_writes(model, 1, z).shape                   # each head's share of it
    torch.Size([2, 4, 64])
    >>> torch.allclose(head_writes(model, 1, z)[:, 2], z[:, 2] @ model.blocks[1].attn.W_O[2], atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge


def _real(module: Any) -> Any:
    """The wrapped Hugging Face module (calling it fires no bridge hooks)."""
    return getattr(module, "original_component", module)


def post_attention_norm(model: TransformerBridge, layer: int) -> Any | None:
    """The norm a block applies to its attention output before the residual add (Gemma 2/3), or ``None``.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_model_for
        >>> post_attention_norm(tiny_model(), 1) is None, type(post_attention_norm(tiny_model_for("gemma2"), 1)).__name__
        (True, 'Gemma2RMSNorm')
    """
    post = getattr(model.blocks[layer], "ln1_post", None)
    return None if post is None else _real(post)


def is_linear_write(model: TransformerBridge, layer: int) -> bool:
    """Whether block ``layer`` adds ``z @ W_O`` (+ bias) to the residual stream, so ``Δ_h · W_O`` is exact.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_model_for
        >>> is_linear_write(tiny_model(), 1), is_linear_write(tiny_model_for("gemma2"), 1)
        (True, False)
    """
    return post_attention_norm(model, layer) is None


def attention_write(
    model: TransformerBridge, layer: int, z: Float[Tensor, "... n_heads d_head"]
) -> Float[Tensor, "... d_model"]:
    """What block ``layer`` adds to the residual stream when its per-head attention outputs are ``z``.

    Runs the block's own output projection (bias included) and post-attention norm, if any, on
    ``z`` (any leading shape); float32 in, the model's dtype inside, float32 out.

    Example:
        >>> import torch
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> z = torch.randn(2, 4, 16)
        >>> by_hand = torch.einsum("bhd,hdm->bm", z, model.blocks[1].attn.W_O)  # Llama: no bias, no norm after
        >>> attention_write(model, 1, z).shape, torch.allclose(attention_write(model, 1, z), by_hand, atol=1e-5)
        (torch.Size([2, 64]), True)
    """
    out_proj = _real(model.blocks[layer].attn.o)
    weight = next(out_proj.parameters())
    with torch.no_grad():
        out = out_proj(z.reshape(*z.shape[:-2], -1).to(weight.dtype).to(weight.device))
        post = post_attention_norm(model, layer)
        if post is not None:
            out = post(out)
    return out.float()


def head_writes(
    model: TransformerBridge,
    layer: int,
    z: Float[Tensor, "... n_heads d_head"],
    share: Float[Tensor, "... n_heads d_head"] | None = None,
) -> Float[Tensor, "... n_heads d_model"]:
    """Per head h: ``attention_write(z) − attention_write(z − share_h)``, what head h's ``share`` of ``z`` adds.

    ``share`` defaults to ``z`` itself (each head's whole output, as Function Vectors reads it);
    pass ``Δ`` with ``z`` the intervened activation for what each Δ_h adds on top of the rest.
    On a linear path this is exactly ``share_h @ W_O[layer, h]``. A head whose share is zero writes
    exactly zero (not the round-off of two passes, which multi-threaded kernels make nonzero).

    Example:
        >>> import torch
        >>> from lens_laai.testing import tiny_model_for
        >>> model = tiny_model_for("gemma2")  # a post-attention norm: the heads' writes do not simply add up
        >>> z = torch.randn(3, 4, 16)
        >>> writes = head_writes(model, 1, z)
        >>> writes.shape, torch.allclose(writes.sum(-2), attention_write(model, 1, z), atol=1e-4)
        (torch.Size([3, 4, 64]), False)
    """
    share = z if share is None else share.to(z)
    n_heads = z.shape[-2]
    eye = torch.eye(n_heads, dtype=z.dtype, device=z.device)[:, :, None]  # [h, head, 1]
    without = z.unsqueeze(-3) - eye * share.unsqueeze(-3)  # [..., h, head, d_head]
    full = attention_write(model, layer, z).unsqueeze(-2)
    writes = full - attention_write(model, layer, without).to(full.device)
    nothing = (share == 0).all(-1, keepdim=True).to(writes.device)  # taking out zero changes nothing, exactly
    return writes.masked_fill(nothing, 0.0)


def write_of_delta(
    model: TransformerBridge,
    layer: int,
    delta: Float[Tensor, "n_heads d_head"],
    z: Float[Tensor, "... n_heads d_head"] | None = None,
) -> Float[Tensor, "... d_model"]:
    """What adding ``delta`` to ``hook_z`` adds to the residual stream: ``write(z + Δ) − write(z)``.

    On a linear path ``z`` is not needed (the answer is ``Σ_h Δ_h · W_O[layer, h]``); with a
    post-attention norm it is (the model's own ``hook_z`` at the rows to read, without Δ).

    Example:
        >>> import torch
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> delta = torch.zeros(4, 16)
        >>> delta[2] = 1.0  # head 2 only
        >>> torch.allclose(write_of_delta(model, 1, delta), delta[2] @ model.blocks[1].attn.W_O[2], atol=1e-5)
        True
    """
    if z is None:
        if not is_linear_write(model, layer):
            raise ValueError(
                f"Block {layer} normalises its attention output before the residual add, so what Δ writes "
                "depends on the activation it is added to; pass z (hook_z at the positions to read, without Δ)."
            )
        z = torch.zeros_like(delta)
    delta = delta.to(z)
    return attention_write(model, layer, z + delta) - attention_write(model, layer, z)
