"""What lens_laai reads off a ``TransformerBridge``: freezing, identity (fingerprint, weight digest), W_O.

Interventions record the fingerprint of the model they were made for. Its shape facts must match
for an intervention to apply at all; its weight digest (a hash of a few thousand sampled weights,
cheap to compute) tells a same-shaped model with other weights apart, which is usually a mistake
(another checkpoint of the same architecture), so it is a warning by default and an error when
``strict``.

Example:
    >>> from lens_laai.models.bridge import model_fingerprint
    >>> from lens_laai.testing import tiny_model
    >>> fp = model_fingerprint(tiny_model())
    >>> fp["n_layers"], fp["n_heads"], len(fp["weights_digest"])
    (3, 4, 16)
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import InterventionError

SHAPE_KEYS = ("n_layers", "n_heads", "d_head", "d_model", "d_vocab")
DIGEST_KEY = "weights_digest"
_SAMPLES_PER_TENSOR = 2048


def freeze(model: TransformerBridge) -> TransformerBridge:
    """Put ``model`` in eval mode with every parameter's ``requires_grad`` off.

    Example:
        >>> from lens_laai.models.bridge import freeze
        >>> from lens_laai.testing import tiny_model
        >>> model = freeze(tiny_model())
        >>> model.training, any(p.requires_grad for p in model.parameters())
        (False, False)
    """
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def model_fingerprint(model: TransformerBridge) -> dict[str, Any]:
    """Shape facts an intervention depends on, plus a digest of the weights.

    Example:
        >>> from lens_laai.models.bridge import model_fingerprint
        >>> from lens_laai.testing import tiny_model
        >>> fingerprint = model_fingerprint(tiny_model())
        >>> fingerprint["n_layers"], fingerprint["n_heads"], fingerprint == model_fingerprint(tiny_model(seed=1))
        (3, 4, False)
    """
    cfg = model.cfg
    shapes = {key: int(getattr(cfg, key)) for key in SHAPE_KEYS}
    return {**shapes, DIGEST_KEY: weights_digest(model)}


def weights_digest(model: torch.nn.Module) -> str:
    """A 16-hex-digit hash of evenly spaced samples of the first, middle and last weight tensors.

    Example:
        >>> from lens_laai.models.bridge import weights_digest
        >>> from lens_laai.testing import tiny_model
        >>> weights_digest(tiny_model()) == weights_digest(tiny_model()), weights_digest(tiny_model()) == weights_digest(tiny_model(seed=1))
        (True, False)
    """
    params = [p for _, p in model.named_parameters()]
    if not params:
        return "none"
    digest = hashlib.sha256()
    for param in {id(p): p for p in (params[0], params[len(params) // 2], params[-1])}.values():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        digest.update(str(tuple(param.shape)).encode())
        digest.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_name(model: TransformerBridge) -> str:
    """A readable model name for manifests and tables.

    Example:
        >>> from lens_laai.models.bridge import model_name
        >>> from lens_laai.testing import tiny_model
        >>> model_name(tiny_model())
        'lens-laai-tiny'
    """
    return str(getattr(model.cfg, "model_name", None) or getattr(model.tokenizer, "name_or_path", "unknown"))


def check_fingerprint(
    fingerprint: dict[str, Any], made_for: str, model: TransformerBridge, strict: bool = False
) -> None:
    """Refuse ``model`` unless its shapes match ``fingerprint``; warn (or refuse if ``strict``) on other weights.

    Example:
        >>> from lens_laai import InterventionError
        >>> from lens_laai.models.bridge import check_fingerprint, model_fingerprint
        >>> from lens_laai.testing import tiny_model
        >>> fingerprint = model_fingerprint(tiny_model())
        >>> check_fingerprint(fingerprint, "tiny", tiny_model())  # same shapes and weights: nothing to say
        >>> try:
        ...     check_fingerprint(fingerprint, "tiny", tiny_model(n_layers=2))
        ... except InterventionError:
        ...     print("refused: other shapes")
        refused: other shapes
    """
    theirs = model_fingerprint(model)
    keys = sorted((set(fingerprint) | set(SHAPE_KEYS)) - {DIGEST_KEY})
    diff = {
        k: (fingerprint.get(k, "missing"), theirs.get(k, "missing"))
        for k in keys
        if fingerprint.get(k) != theirs.get(k)
    }
    if diff:
        raise InterventionError(
            f"This intervention was made for {made_for!r} and does not fit this model "
            f"(ours vs the model's: {diff}). Fit it again on this model."
        )
    ours = fingerprint.get(DIGEST_KEY)
    if ours is not None and ours != theirs[DIGEST_KEY]:
        message = (
            f"This intervention was made for {made_for!r}, a model of the same shape with other weights "
            f"(weight digest {ours} vs {theirs[DIGEST_KEY]}): another checkpoint or dtype."
        )
        if strict:
            raise InterventionError(message + " Refused because strict=True (--strict).")
        warnings.warn(message + " Pass strict=True (--strict) to refuse such models.", UserWarning, stacklevel=3)


def head_output_weights(model: TransformerBridge, layer: int) -> Float[Tensor, "head d_head d_model"]:
    """``W_O`` of ``layer`` per head: what a unit of ``hook_z`` adds to the residual stream.

    Example:
        >>> from lens_laai.models.bridge import head_output_weights
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> tuple(head_output_weights(model, 1).shape) == (model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model)
        True
    """
    return model.blocks[layer].attn.W_O.detach()


def last_position_hooks(model: TransformerBridge) -> list[tuple[str, Any]]:
    """``fwd_hooks`` that unembed only the last position (logits ``[batch, 1, vocab]``).

    Scoring reads the last position alone; unembedding every position costs a fifth of a
    135M model's forward on k-shot prompts, and the logits of all positions take batch × pos ×
    vocab floats. Slicing the final-norm output before the unembedding is exact (both act per
    position). Models whose bridge has no ``unembed.hook_in`` get no hook (full logits).

    Example:
        >>> import torch
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> ids = torch.tensor([[1, 20, 21, 22]])
        >>> last = model.run_with_hooks(ids, fwd_hooks=last_position_hooks(model))
        >>> last.shape, torch.allclose(last[:, -1], model(ids)[:, -1], atol=1e-5)
        (torch.Size([1, 1, 396]), True)
    """
    if "unembed.hook_in" not in model.hook_dict:
        return []
    return [("unembed.hook_in", _keep_last_position)]


def _keep_last_position(x: Tensor, hook: Any) -> Tensor:
    return x[:, -1:]


HOOK_TEMPLATE = "blocks.{layer}.attn.hook_z"


def hook_name(layer: int) -> str:
    """The per-head attention output hook of block ``layer`` (``blocks.L.attn.hook_z``).

    Example:
        >>> from lens_laai.models.bridge import hook_name
        >>> hook_name(16)
        'blocks.16.attn.hook_z'
    """
    return HOOK_TEMPLATE.format(layer=layer)
