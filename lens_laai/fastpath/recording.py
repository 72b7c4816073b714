"""Recording ``hook_z`` at the last prompt token: the activations that means and initial Δs start from.

Example:
    >>> from lens_laai.testing import tiny_model
    >>> from lens_laai.tasks.prompts import make_batch
    >>> model = tiny_model()
    >>> batch = make_batch(model.tokenizer, ["Q: hot\\nA:", "Q: big\\nA:"], [" cold", " small"])
    >>> last_token_z(model, [batch], [1, 2]).shape  # [prompt, layer, head, d_head]
    torch.Size([2, 2, 4, 16])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.models.bridge import hook_name
from lens_laai.tasks.prompts import Batch


def last_token_z(
    model: TransformerBridge, batches: list[Batch], layers: Sequence[int]
) -> Float[Tensor, "prompt layer head d_head"]:
    """``hook_z`` at the last token of every prompt, for ``layers`` (one forward per batch).

    Example:
        >>> from lens_laai.fastpath.recording import last_token_z
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> z = last_token_z(model, model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:"], [" cold", " down"]), [0, 2])
        >>> tuple(z.shape)  # [prompt, layer, head, d_head]
        (2, 2, 4, 16)
    """
    grabbed: dict[int, list[Tensor]] = {l: [] for l in layers}

    def grab(layer: int) -> Callable:
        return lambda z, hook: grabbed[layer].append(z[:, -1].detach().clone())

    for batch in batches:
        with model.hooks(fwd_hooks=[(hook_name(l), grab(l)) for l in layers]):
            model(batch.input_ids, attention_mask=batch.attention_mask)
    return torch.stack([torch.cat(grabbed[l]) for l in layers], dim=1)
