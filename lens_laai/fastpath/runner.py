"""Last-token logits of fixed batches under a Δ at one layer: :class:`LayerRunner`, and a cache of runners.

A runner builds one :class:`~lens_laai.fastpath.prefix.LastTokenCache` per batch (or, where the
fast path steps aside, runs the full forward) and charges every step to a
:class:`~lens_laai.fastpath.cost.CostMeter`. :func:`cached_runner` lets fits over the same prompts
at the same layer (cross-validation folds, every group of one survey split) share one runner, so
each prefix cache is built once.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import LensLaaiError
from lens_laai.fastpath.cost import CostMeter
from lens_laai.fastpath.prefix import PATHS, LastTokenCache
from lens_laai.fastpath.scoring import score_logits
from lens_laai.models.bridge import last_position_hooks
from lens_laai.tasks.prompts import Batch


def block_device(model: TransformerBridge, layer: int) -> torch.device:
    """The device block ``layer``'s weights live on (where Δ for that layer is kept while fitting).

    Example:
        >>> from lens_laai.testing import tiny_model
        >>> block_device(tiny_model(), 2)
        device(type='cpu')
    """
    for param in model.blocks[layer].parameters():
        if param.device.type != "meta":  # weights offloaded by accelerate sit on "meta" until used
            return param.device
    return torch.device(model.cfg.device or "cpu")


class LayerRunner:
    """Last-token logits of fixed batches under a Δ at one layer; fast path where possible.

    ``tail``: the last positions the fast path recomputes (Δ at the last ``tail`` prompt tokens).

    Example:
        >>> import torch
        >>> from lens_laai.interventions.head import delta_hook
        >>> from lens_laai.models.bridge import hook_name
        >>> from lens_laai.tasks.prompts import k_shot_prompts, model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> runner = LayerRunner(model, model_batches(model, *k_shot_prompts(tiny_task(), 0), batch_size=8), layer=1)
        >>> runner.path, len(runner.batches), runner.logits(0, []).shape
        ('kernel', 3, torch.Size([8, 396]))
        >>> accuracy, ce = runner.scores([(hook_name(1), delta_hook(torch.zeros(4, 16)))])
        >>> fast = runner.cross_entropy(0, [])
        >>> slow = LayerRunner(model, runner.batches, 1, fast=False).cross_entropy(0, [])  # the full forward
        >>> 0 <= accuracy <= 1, ce > 0, torch.allclose(fast, slow, rtol=1e-4)
        (True, True, True)
    """

    def __init__(
        self,
        model: TransformerBridge,
        batches: list[Batch],
        layer: int,
        fast: bool = True,
        meter: CostMeter | None = None,
        tail: int = 1,
    ) -> None:
        self.model, self.batches, self.layer, self.tail = model, batches, layer, tail
        shortest = min((int(b.attention_mask.sum(1).min()) for b in batches), default=tail)
        if shortest < tail:
            raise LensLaaiError(
                f"Δ at the last {tail} prompt positions needs prompts of at least {tail} tokens; the shortest "
                f"has {shortest}. Use fewer last positions or a longer prompt template."
            )
        self.meter = meter or CostMeter()
        n = model.cfg.n_layers
        self.caches: list[LastTokenCache | None] = []
        for batch in batches:
            self.meter.register_prompts(batch, n)
            cache = LastTokenCache.build(model, batch, layer, tail=tail) if fast else None
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
            self.meter.add(len(batch) * self.tail, n - self.layer, backward)
            return cache.logits(fwd_hooks)
        self.meter.add(float(batch.attention_mask.sum()), n, backward)
        out = self.model.run_with_hooks(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            fwd_hooks=[*fwd_hooks, *last_position_hooks(self.model)],
        )
        return out[:, -1]

    def cross_entropy(self, index: int, fwd_hooks: list[tuple[str, Callable]], backward: bool = False) -> Tensor:
        """Summed cross-entropy of batch ``index``'s first target tokens (the fitting loss)."""
        batch, cache = self.batches[index], self.caches[index]
        if cache is not None:
            self.meter.add(len(batch) * self.tail, self.model.cfg.n_layers - self.layer, backward)
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


def cached_runner(
    model: TransformerBridge,
    batches: list[Batch],
    layer: int,
    fast: bool,
    meter: CostMeter,
    runners: MutableMapping[Any, LayerRunner] | None,
    tail: int = 1,
) -> LayerRunner:
    """A :class:`LayerRunner` for ``batches`` at ``layer``, reused from ``runners`` when the same prompts were seen.

    The key is ``(layer, fast, model, prompts and targets, tail)``, layer first so a caller can drop a
    layer's runners. A reused runner charges its steps to ``meter`` from now on; building its
    prefix caches was charged to the meter of the fit that built it.

    Example:
        >>> from lens_laai.fastpath.cost import CostMeter
        >>> from lens_laai.tasks.prompts import k_shot_prompts, model_batches
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, runners = tiny_model(), {}
        >>> batches = model_batches(model, *k_shot_prompts(tiny_task(), 0))
        >>> first = cached_runner(model, batches, 1, True, CostMeter(), runners)
        >>> again = cached_runner(model, list(batches), 1, True, CostMeter(), runners)  # the same prompts: reused
        >>> again is first, len(runners)
        (True, 1)
    """
    key = (layer, fast, id(model), tuple((tuple(b.prompts), tuple(b.targets)) for b in batches), tail)
    if runners is not None and key in runners:
        runners[key].meter = meter
        return runners[key]
    runner = LayerRunner(model, batches, layer, fast, meter, tail)
    if runners is not None:
        runners[key] = runner
    return runner
