"""Head ablations as intervention objects: zero, mean and resample ablation of ``hook_z`` heads.

A :class:`HeadAblation` replaces the output of chosen attention heads with zero, with its mean
over a reference set of prompts, or with its value on a randomly drawn reference prompt. It
follows the intervention protocol (:mod:`lens_laai.interventions.protocol`): ``fwd_hooks()``, ``apply()``,
``check_model``, save/load, so :func:`lens_laai.evaluation.evaluate`, :func:`lens_laai.generate` and the CLI
accept it, and it stacks with an intervention (the one applied last acts last)::

    with iv.apply(model), abl.apply(model):
        ...

Reference values are each head's output at the *last* token of the reference prompts, the
position where task information is read out; with ``positions="all"`` that vector replaces the
head at every position. Ablations do not take part in algebra.

Example:
    >>> import torch
    >>> from lens_laai.interventions.ablation import HeadAblation
    >>> from lens_laai.testing import tiny_model
    >>> model = tiny_model()
    >>> abl = HeadAblation.zero(model, [(1, 0), (2, 3)])
    >>> abl.heads
    [(1, 0), (2, 3)]
    >>> with abl.apply(model):
    ...     logits = model(torch.tensor([[1, 5, 6]]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import InterventionError
from lens_laai.interventions.positions import (
    LastTokenTracker,
    Positions,
    check_positions,
    positions_from_json,
)
from lens_laai.interventions.protocol import FLOAT_DTYPES, Hook, InterventionBase, Where, by_layer
from lens_laai.models.bridge import hook_name, model_fingerprint, model_name
from lens_laai.tasks.prompts import Batch

Kind = Literal["zero", "mean", "resample"]
KINDS = ("zero", "mean", "resample")


@dataclass(eq=False)
class HeadAblation(InterventionBase):
    """Replace the ``hook_z`` output of ``heads`` by zero, a reference mean, or a resampled reference value.

    Attributes:
        heads: sorted distinct ``(layer, head)`` pairs.
        kind: ``"zero"``, ``"mean"`` or ``"resample"``.
        values: ``{layer: [n_reference, n_heads, d_head]}`` reference outputs (empty for zero;
            one row, the mean, for mean ablation).
        seed: the seed of the resampling draws (each forward call draws one reference per row; every
            ``fwd_hooks()`` / ``apply()`` starts the draws again from this seed, so results repeat).

    Example:
        >>> import torch
        >>> from lens_laai import HeadAblation
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> ablation = HeadAblation.zero(model, [(1, 0), (2, 3)])
        >>> ablation.kind, ablation.heads, ablation.layers
        ('zero', [(1, 0), (2, 3)], [1, 2])
        >>> with ablation.apply(model):
        ...     logits = model(torch.tensor([[1, 5, 6]]))
    """

    FORMAT: ClassVar[str] = "lens_laai.HeadAblation"
    TENSOR_STEM: ClassVar[str] = "reference"

    heads: list[tuple[int, int]]
    kind: Kind
    model_name: str
    fingerprint: dict[str, Any]
    values: dict[int, Float[Tensor, "ref head d_head"]] = field(default_factory=dict)
    positions: Positions = "last"
    seed: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions = check_positions(self.positions)
        if self.kind not in KINDS:
            raise InterventionError(f"kind must be one of {KINDS}, got {self.kind!r}.")
        n_layers, n_heads = self.fingerprint["n_layers"], self.fingerprint["n_heads"]
        heads = []
        for pair in self.heads:
            if (
                not isinstance(pair, (tuple, list))
                or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            ):
                raise InterventionError(f"Each head is a (layer, head) pair of ints, got {pair!r}.")
            if not (0 <= pair[0] < n_layers and 0 <= pair[1] < n_heads):
                raise InterventionError(
                    f"Head {tuple(pair)} is outside this model's {n_layers} layers × {n_heads} heads."
                )
            heads.append((int(pair[0]), int(pair[1])))
        if not heads:
            raise InterventionError("An ablation needs at least one (layer, head).")
        self.heads = sorted(set(heads))
        self._check_values()

    def _check_values(self) -> None:
        if self.kind == "zero":
            if self.values:
                raise InterventionError("A zero ablation takes no reference values.")
            return
        extra = sorted(set(self.values) - set(self.layers))
        if extra:
            raise InterventionError(f"Reference values for layers {extra}, which have no ablated head.")
        shape = (self.fingerprint["n_heads"], self.fingerprint["d_head"])
        for layer in self.layers:
            value = self.values.get(layer)
            if value is None or value.ndim != 3 or tuple(value.shape[1:]) != shape or value.shape[0] < 1:
                raise InterventionError(
                    f"{self.kind} ablation needs reference values [n, {shape[0]}, {shape[1]}] for layer {layer}."
                )
            if value.dtype not in FLOAT_DTYPES or not bool(torch.isfinite(value).all()):
                raise InterventionError(f"Reference values for layer {layer} must be finite floats.")
        if self.kind == "mean" and any(v.shape[0] != 1 for v in self.values.values()):
            raise InterventionError("A mean ablation holds one reference row (the mean) per layer.")

    # construction ---------------------------------------------------------------------------
    @classmethod
    def zero(
        cls, model: TransformerBridge, heads: Sequence[tuple[int, int]], positions: Positions = "last"
    ) -> HeadAblation:
        """Set the heads' outputs to zero."""
        return cls(list(heads), "zero", model_name(model), model_fingerprint(model), {}, positions)

    @classmethod
    def mean(
        cls,
        model: TransformerBridge,
        heads: Sequence[tuple[int, int]],
        reference: Sequence[Batch],
        positions: Positions = "last",
    ) -> HeadAblation:
        """Replace the heads' outputs by their mean last-token output over the ``reference`` batches."""
        bank = reference_outputs(model, reference, sorted({l for l, _ in heads}))
        return cls(
            list(heads),
            "mean",
            model_name(model),
            model_fingerprint(model),
            {l: v.mean(0, keepdim=True) for l, v in bank.items()},
            positions,
        )

    @classmethod
    def resample(
        cls,
        model: TransformerBridge,
        heads: Sequence[tuple[int, int]],
        reference: Sequence[Batch],
        positions: Positions = "last",
        seed: int = 0,
    ) -> HeadAblation:
        """Replace each row's head outputs by those of a reference prompt drawn at random (seeded)."""
        bank = reference_outputs(model, reference, sorted({l for l, _ in heads}))
        return cls(list(heads), "resample", model_name(model), model_fingerprint(model), bank, positions, seed)

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.heads})

    def equals(self, other: HeadAblation) -> bool:
        """Bit-for-bit equality of the reference values and everything else."""
        same = (self.heads, self.kind, self.model_name, self.fingerprint, self.positions, self.seed, self.metadata) == (
            other.heads,
            other.kind,
            other.model_name,
            other.fingerprint,
            other.positions,
            other.seed,
            other.metadata,
        )
        return (
            same
            and self.values.keys() == other.values.keys()
            and all(torch.equal(v, other.values[l]) for l, v in self.values.items())
        )

    def __repr__(self) -> str:
        heads = ", ".join(f"L{l}H{h}" for l, h in self.heads)
        return f"HeadAblation({self.kind}, heads=[{heads}], positions={self.positions!r})"

    # protocol ---------------------------------------------------------------------------------
    def _hooks(self, where: Where) -> list[Hook]:
        generator = torch.Generator().manual_seed(self.seed)  # each hook set replays the same draws
        return [(hook_name(layer), self._hook(layer, where, generator)) for layer in self.layers]

    def _hook(self, layer: int, where: Where, generator: torch.Generator) -> Callable[..., Tensor]:
        heads = [h for l, h in self.heads if l == layer]

        def hook(z: Tensor, hook: Any) -> Tensor:
            replacement = self._replacement(layer, heads, z, generator)
            positions = where.index(z) if isinstance(where, LastTokenTracker) else where
            out = z.clone()
            rows = torch.arange(z.shape[0], device=z.device)
            if isinstance(positions, Tensor):
                for h_i, h in enumerate(heads):
                    out[rows, positions.to(z.device), h] = replacement[:, h_i]
            elif positions == "all":
                out[:, :, heads] = replacement[:, None]
            else:
                index = [-1] if isinstance(positions, str) else list(positions)  # a string here is "last"
                outside = [p for p in index if not -z.shape[1] <= p < z.shape[1]]
                if outside:
                    raise InterventionError(f"Positions {outside} are outside this sequence of {z.shape[1]} tokens.")
                for p in index:
                    out[:, p, heads] = replacement
            return out

        return hook

    def _replacement(self, layer: int, heads: list[int], z: Tensor, generator: torch.Generator) -> Tensor:
        """``[batch, len(heads), d_head]`` values written over the heads."""
        batch = z.shape[0]
        if self.kind == "zero":
            return torch.zeros(batch, len(heads), z.shape[-1], dtype=z.dtype, device=z.device)
        bank = self.values[layer][:, heads].to(dtype=z.dtype, device=z.device)
        if self.kind == "mean":
            return bank[0].expand(batch, -1, -1)
        draw = torch.randint(bank.shape[0], (batch,), generator=generator).to(z.device)
        return bank[draw]

    def __mul__(self, scale: Any) -> Any:
        raise InterventionError("Ablations do not scale or add; combine them by applying several at once.")

    __rmul__ = __mul__

    def _combine(self, other: Any, sign: float, op: str) -> Any:
        raise InterventionError("Ablations do not scale or add; combine them by applying several at once.")

    def _tensors(self) -> dict[str, Tensor]:
        return {f"layer.{l}": v for l, v in self.values.items()}

    def _with_tensors(self, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> HeadAblation:
        values = {int(k.split(".", 1)[1]): t for k, t in tensors.items()}
        return HeadAblation(
            list(self.heads),
            self.kind,
            self.model_name,
            dict(self.fingerprint),
            values,
            self.positions,
            self.seed,
            metadata,
        )

    def _manifest_extra(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "kind": self.kind, "seed": self.seed}

    @classmethod
    def _expects_tensors(cls, manifest: dict[str, Any]) -> bool:
        return manifest.get("kind") != "zero"

    @classmethod
    def _from_saved(cls, tensors: dict[str, Tensor], manifest: dict[str, Any]) -> HeadAblation:
        heads, kind = manifest.get("heads"), manifest.get("kind")
        if not isinstance(heads, list) or not isinstance(manifest.get("seed"), int):
            raise InterventionError("a HeadAblation save needs a list 'heads' and an integer 'seed'.")
        return cls(
            [tuple(h) if isinstance(h, list) else h for h in heads],
            cast(Kind, kind),  # __post_init__ checks it
            manifest["model_name"],
            manifest["fingerprint"],
            by_layer(tensors),
            positions_from_json(manifest.get("positions")),
            manifest["seed"],
            manifest["metadata"],
        )


@torch.no_grad()
def reference_outputs(model: TransformerBridge, batches: Sequence[Batch], layers: Sequence[int]) -> dict[int, Tensor]:
    """Every head's ``hook_z`` at the last token of each reference prompt: ``{layer: [n_prompts, n_heads, d_head]}``.

    Example:
        >>> from lens_laai.interventions.ablation import reference_outputs
        >>> from lens_laai.tasks.prompts import model_batches
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> batches = model_batches(model, ["Q: hot\\nA:", "Q: up\\nA:", "Q: big\\nA:"], [" cold", " down", " small"], batch_size=2)
        >>> {layer: tuple(z.shape) for layer, z in reference_outputs(model, batches, [0, 2]).items()}  # [prompt, head, d_head]
        {0: (3, 4, 16), 2: (3, 4, 16)}
    """
    if not batches:
        raise InterventionError("Mean and resample ablations need at least one reference prompt.")
    grabbed: dict[int, list[Tensor]] = {l: [] for l in layers}

    def grab(layer: int) -> Callable[..., None]:
        return lambda z, hook: grabbed[layer].append(z[:, -1].detach().float().cpu())

    for batch in batches:
        with model.hooks(fwd_hooks=[(hook_name(l), grab(l)) for l in layers]):
            model(batch.input_ids, attention_mask=batch.attention_mask)
    return {l: torch.cat(v) for l, v in grabbed.items()}
