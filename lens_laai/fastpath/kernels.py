"""Plain-tensor kernels that make a fast-path step cheaper without changing what it computes.

* :class:`LlamaLastToken` pushes one token per row through a Llama-family decoder block
  (RMSNorm, rotary attention over cached keys/values with grouped-query heads, gated MLP) in
  plain tensor ops and calls ``hook_z`` hook functions itself. The bridge's own blocks compute
  the same numbers, but at one token per row their ~20 hook points and wrappers per block cost
  about a fifth of a step. The attention mask and the rotary tables of each block are the ones
  the full forward handed that block (see :class:`lens_laai.fastpath.blocks.BlockCall`), so sliding
  windows, padding and any rotary scaling are reproduced exactly rather than re-derived.
* :func:`last_token_cross_entropy` fuses the unembedding, the cross-entropy and its gradient
  with respect to the final hidden state into one pass over the unembedding matrix (an online
  log-sum-exp, as in flash attention). The matrix (49,152 × 576 on SmolLM2) is then read once
  per gradient evaluation instead of twice. It runs only for float32 weights on a CPU, where
  reading the matrix is what costs; elsewhere the plain computation runs.

Which models the kernel accepts is a positive list (:data:`VERIFIED_BLOCKS`): the exact Hugging
Face module classes whose forward was read against the kernel's math (Llama, Mistral, Qwen2).
Anything else (Gemma's soft-capping and ``(1 + w)`` norms, Phi-3's fused projections, Qwen3's
query/key norms, a subclass with changed code, offloaded weights) uses the bridge's own blocks.
:class:`lens_laai.fastpath.prefix.LastTokenCache` also checks the kernel against the full forward on
every batch it builds and falls back to the bridge's blocks, with a warning, if they disagree.

Example:
    >>> import torch
    >>> from lens_laai.fastpath.kernels import last_token_cross_entropy
    >>> h = torch.randn(3, 8, requires_grad=True)
    >>> w, targets = torch.randn(50, 8), torch.tensor([1, 7, 49])
    >>> loss = last_token_cross_entropy(h, w, None, targets, chunk=16)
    >>> reference = torch.nn.functional.cross_entropy(h @ w.T, targets, reduction="none")
    >>> bool(torch.allclose(loss, reference, atol=1e-5))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

# model_type -> (causal-LM class, decoder layer, attention, MLP, RMSNorm): the exact classes whose
# forward computes what LlamaLastToken computes (transformers 5.9-5.23). Biases on any projection
# are honoured (Qwen2's q/k/v), the attention scale is read off the module, and sliding windows come
# with the mask the full forward built, so none of them needs a special case.
VERIFIED_BLOCKS: dict[str, tuple[str, str, str, str, str]] = {
    "llama": ("LlamaForCausalLM", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "mistral": ("MistralForCausalLM", "MistralDecoderLayer", "MistralAttention", "MistralMLP", "MistralRMSNorm"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
}
SUPPORTED_MODEL_TYPES = tuple(VERIFIED_BLOCKS)
ZHook = Callable[[Tensor], Tensor]


def unwrap(module: Any) -> Any:
    """The Hugging Face module under any TransformerBridge wrappers.

    Example:
        >>> from lens_laai.testing import tiny_model
        >>> type(tiny_model().blocks[0].attn).__name__, type(unwrap(tiny_model().blocks[0].attn)).__name__
        ('PositionEmbeddingsAttentionBridge', 'LlamaAttention')
    """
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
    """Llama's RMSNorm (float32 statistics, like the Hugging Face module).

    Example:
        >>> import torch
        >>> x = torch.tensor([[3.0, 4.0]])
        >>> rms_norm(x, torch.ones(2), eps=0.0)  # x / sqrt(mean(x²)), sqrt(12.5) = 3.54
        tensor([[0.8485, 1.1314]])
    """
    if x.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotary_tables(
    cos: Float[Tensor, "batch tail d_head"], sin: Float[Tensor, "batch tail d_head"]
) -> tuple[Tensor, Tensor]:
    """``(cos, signed sin)`` shaped ``[batch, 1, tail, d_head]`` for :func:`_rotate`.

    Example:
        >>> import torch
        >>> cos, sin = torch.ones(2, 1, 4), torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]).expand(2, 1, 4)
        >>> cos4, signed = rotary_tables(cos, sin)
        >>> cos4.shape, signed[0, 0, 0].tolist()  # the first half of sin negated: rotate_half as roll and sign
        (torch.Size([2, 1, 1, 4]), [-1.0, -2.0, 3.0, 4.0])
    """
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
    scaling: float


@dataclass
class BlockInputs:
    """What one block's attention needs besides weights: rotary tables and the additive key mask.

    ``rotary`` is ``(cos, signed sin)`` shaped ``[batch, 1, tail, d_head]`` (:func:`rotary_tables`);
    ``mask`` is ``[batch, 1, tail, pos]`` added to the scores (0 where visible), or ``None``.

    Example:
        >>> from lens_laai.fastpath.prefix import LastTokenCache
        >>> from lens_laai.tasks.prompts import k_shot_prompts, model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> batch = model_batches(model, *k_shot_prompts(tiny_task(), 1))[0]
        >>> inputs = LastTokenCache.build(model, batch, layer=1).kernel_inputs[1]  # what block 1 was handed
        >>> inputs.rotary[0].shape, inputs.mask.shape == (len(batch), 1, 1, batch.input_ids.shape[1])  # cos; a mask row
        (torch.Size([1, 1, 1, 16]), True)
    """

    rotary: tuple[Tensor, Tensor]
    mask: Tensor | None


class KernelUnsupported(Exception):
    """Raised while building a kernel for a model it was not verified against (the reason is the message).

    Example:
        >>> from lens_laai.testing import tiny_model
        >>> kernel = LlamaLastToken.for_model(tiny_model().original_model, 1)
        >>> try:
        ...     kernel.inputs(None, None)
        ... except KernelUnsupported as err:
        ...     print(err)
        the block was not given (cos, sin) rotary tables
    """


class LlamaLastToken:
    """The last token (or last few) of each row through Llama-family blocks ``first..n-1``, keys/values of earlier positions given.

    Example:
        >>> import torch
        >>> from lens_laai.fastpath.prefix import LastTokenCache
        >>> from lens_laai.tasks.prompts import k_shot_prompts, model_batches
        >>> from lens_laai.testing import tiny_model, tiny_model_for, tiny_task
        >>> model = tiny_model()
        >>> kernel = LlamaLastToken.for_model(model.original_model, 1)
        >>> sorted(kernel.blocks), LlamaLastToken.check_model(tiny_model_for("gpt2").original_model, 1)[1][:24]
        ([1, 2], "model_type 'gpt2' is not")
        >>> batch = model_batches(model, *k_shot_prompts(tiny_task(), 1))[0]
        >>> cache = LastTokenCache.build(model, batch, layer=1)  # uses the kernel, checked against the bridge
        >>> cache.path, torch.allclose(cache.logits(), cache.full_logits, atol=1e-4)
        ('kernel', True)
    """

    def __init__(self, hf_model: nn.Module, first: int) -> None:
        cfg: Any = hf_model.config  # a Hugging Face config: its attributes depend on the architecture
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv: int = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.d_head: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        names = VERIFIED_BLOCKS[cfg.model_type]
        backbone: Any = hf_model.model
        self.blocks = {l: self._block(backbone.layers[l], names) for l in range(first, len(backbone.layers))}
        self.final_norm = _norm(backbone.norm)
        if type(unwrap(backbone.norm)).__name__ != names[4]:
            raise KernelUnsupported(f"final norm is {type(unwrap(backbone.norm)).__name__}, not {names[4]}")

    @classmethod
    def for_model(cls, hf_model: nn.Module, first: int) -> LlamaLastToken | None:
        """A kernel for ``hf_model`` from block ``first`` on, or ``None`` if it is not a verified architecture."""
        return cls.check_model(hf_model, first)[0]

    @classmethod
    def check_model(cls, hf_model: nn.Module, first: int) -> tuple[LlamaLastToken | None, str]:
        """``(kernel, "")``, or ``(None, why not)``: the positive list of :data:`VERIFIED_BLOCKS`, strictly."""
        cfg = getattr(hf_model, "config", None)
        model_type = getattr(cfg, "model_type", None)
        if model_type not in VERIFIED_BLOCKS:
            return None, f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
        if type(hf_model).__name__ != VERIFIED_BLOCKS[model_type][0]:
            return None, f"{type(hf_model).__name__} is not {VERIFIED_BLOCKS[model_type][0]}"
        try:
            return cls(hf_model, first), ""
        except (KernelUnsupported, AttributeError) as err:
            return None, str(err)

    @staticmethod
    def _block(layer: nn.Module, names: tuple[str, ...]) -> _Block:
        inner = unwrap(layer)
        attn, mlp = unwrap(inner.self_attn), unwrap(inner.mlp)
        found = (
            type(inner).__name__,
            type(attn).__name__,
            type(mlp).__name__,
            type(unwrap(inner.input_layernorm)).__name__,
            type(unwrap(inner.post_attention_layernorm)).__name__,
        )
        if found != (*names[1:4], names[4], names[4]):
            raise KernelUnsupported(f"block modules {found} are not the verified {names[1:]}")
        block = _Block(
            _norm(inner.input_layernorm),
            _linear(attn.q_proj),
            _linear(attn.k_proj),
            _linear(attn.v_proj),
            _linear(attn.o_proj),
            _norm(inner.post_attention_layernorm),
            _linear(mlp.gate_proj),
            _linear(mlp.up_proj),
            _linear(mlp.down_proj),
            unwrap(mlp.act_fn),
            float(attn.scaling),
        )
        for name in ("ln1", "q", "k", "v", "o", "ln2", "gate", "up", "down"):
            weight = getattr(block, name)[0]
            if weight.device.type == "meta" or not weight.dtype.is_floating_point:
                raise KernelUnsupported(f"{name} weights are offloaded or quantised ({weight.device}, {weight.dtype})")
        return block

    def inputs(self, position_embeddings: Any, attention_mask: Any) -> BlockInputs:
        """:class:`BlockInputs` from what the full forward gave a block at the last position.

        Raises :class:`KernelUnsupported` for shapes the kernel does not compute (partial rotary,
        a mask that is not 4-D).
        """
        if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2):
            raise KernelUnsupported("the block was not given (cos, sin) rotary tables")
        cos, sin = (t.detach() for t in position_embeddings)
        if cos.shape[-1] != self.d_head:
            raise KernelUnsupported(f"rotary tables of shape {tuple(cos.shape)} (partial rotary?)")
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        mask = attention_mask
        if mask is None and cos.shape[-2] > 1:
            raise KernelUnsupported("no attention mask for several query rows (their causal mask is needed)")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[-2] != cos.shape[-2]:
                raise KernelUnsupported(f"attention mask of shape {getattr(mask, 'shape', None)}")
            mask = mask.detach()
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=cos.dtype, device=mask.device).masked_fill_(~mask, -float("inf"))
        return BlockInputs(rotary_tables(cos, sin), mask)

    def hidden(
        self,
        h: Float[Tensor, "batch tail d_model"],
        inputs: dict[int, BlockInputs],
        keys: dict[int, Tensor],
        values: dict[int, Tensor],
        z_hooks: dict[int, list[ZHook]],
    ) -> Float[Tensor, "batch d_model"]:
        """The final-normed last-token state; ``z_hooks[l]`` edit ``blocks.l.attn.hook_z`` ([batch, tail, head, d_head])."""
        for l, blk in self.blocks.items():
            h = self._block_forward(blk, h.to(blk.q[0].device), inputs[l], keys[l], values[l], z_hooks.get(l, ()))
        return rms_norm(h.to(self.final_norm[0].device), *self.final_norm)[:, -1]

    def _block_forward(
        self, blk: _Block, h: Tensor, inp: BlockInputs, k_prev: Tensor, v_prev: Tensor, z_hooks: list[ZHook] | tuple
    ) -> Tensor:
        b, m, group = h.shape[0], h.shape[1], self.n_heads // self.n_kv
        cos, sin = inp.rotary  # [batch, 1, m, d_head]
        mask = inp.mask  # [batch, 1, m, pos]
        if m > 1:  # query rows ordered (group, position), so each row finds its position's table and mask row
            cos, sin = cos.repeat(1, 1, group, 1), sin.repeat(1, 1, group, 1)
            mask = mask.repeat(1, 1, group, 1) if mask is not None else None
        x = rms_norm(h, *blk.ln1)
        # query head h reads key/value head h // group, so queries group as [batch, kv, group · m, d_head]
        q = F.linear(x, *blk.q).view(b, m, self.n_kv, group, self.d_head).permute(0, 2, 3, 1, 4)
        q = _rotate(q.reshape(b, self.n_kv, group * m, self.d_head), cos, sin)
        k = F.linear(x, *blk.k).view(b, m, self.n_kv, self.d_head).transpose(1, 2)
        k = _rotate(k, *inp.rotary)
        v = F.linear(x, *blk.v).view(b, m, self.n_kv, self.d_head).transpose(1, 2)
        keys, vals = torch.cat([k_prev, k], dim=-2), torch.cat([v_prev, v], dim=-2)
        scores = (q @ keys.transpose(-1, -2)).mul_(blk.scaling)
        if mask is not None:
            scores = scores + mask  # broadcasts over kv heads
        weights = scores.softmax(-1) if scores.dtype == torch.float32 else scores.float().softmax(-1).to(vals.dtype)
        z = (weights @ vals).view(b, self.n_kv, group, m, self.d_head).permute(0, 3, 1, 2, 4)
        z = z.reshape(b, m, self.n_heads, self.d_head)
        for fn in z_hooks:
            z = fn(z)
        h = h + F.linear(z.reshape(b, m, -1), *blk.o)
        x = rms_norm(h, *blk.ln2)
        return h + F.linear(blk.act(F.linear(x, *blk.gate)) * F.linear(x, *blk.up), *blk.down)


def unembed(
    h: Float[Tensor, "batch d_model"], weight: Float[Tensor, "vocab d_model"], bias: Tensor | None
) -> Float[Tensor, "batch vocab"]:
    """``h @ weight.T + bias``, computed as ``(weight @ h.T).T`` (faster on CPU for few rows).

    Example:
        >>> import torch
        >>> h, w, b = torch.randn(3, 8), torch.randn(50, 8), torch.randn(50)
        >>> torch.allclose(unembed(h, w, b), h @ w.T + b, atol=1e-5), unembed(h, w, None).shape
        (True, torch.Size([3, 50]))
    """
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
    otherwise (a GPU, bf16/fp16 weights, no gradient) this is the plain computation: the logits in
    the model's dtype, the cross-entropy in float32, as the full forward's loss is computed. At a
    fast step's batch (tens of rows) the plain logits are small even for a 128k vocabulary
    (20 × 128,256 float32 = 10 MB), so no chunking is needed there.

    Example:
        >>> import torch
        >>> h = torch.randn(3, 8, requires_grad=True)
        >>> w, targets = torch.randn(50, 8), torch.tensor([1, 7, 49])
        >>> loss = last_token_cross_entropy(h, w, None, targets, chunk=16)  # fused: one pass over w, chunk by chunk
        >>> reference = torch.nn.functional.cross_entropy(h @ w.T, targets, reduction="none")
        >>> (grad,) = torch.autograd.grad(loss.sum(), h)
        >>> (ref_grad,) = torch.autograd.grad(reference.sum(), h)
        >>> torch.allclose(loss, reference, atol=1e-5), torch.allclose(grad, ref_grad, atol=1e-5)
        (True, True)
    """
    fused = torch.is_grad_enabled() and h.requires_grad and weight.dtype == torch.float32 and h.device.type == "cpu"
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if not (fused and frozen):
        return F.cross_entropy(unembed(h, weight, bias).float(), targets.to(h.device), reduction="none")
    return _FusedCrossEntropy.apply(h, weight, bias, targets, chunk)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        rows = h.shape[0]
        running_max = h.new_full((rows, 1), -float("inf"))
        total = h.new_zeros((rows, 1))
        weighted = torch.zeros_like(h)  # Σ_v exp(logit_v − max) · weight_v
        for start in range(0, weight.shape[0], chunk):
            w = weight[start : start + chunk]
            logits = h @ w.T if bias is None else h @ w.T + bias[start : start + chunk]
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
