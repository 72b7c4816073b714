"""The intervention object: per-head additive vectors Δ on ``blocks.L.attn.hook_z``.

A :class:`HeadIntervention` is plain data (one ``[n_heads, d_head]`` tensor per intervened layer,
the positions it acts on, and metadata) that knows its own TransformerLens hooks. Fitting
produces one, baselines produce them too, and analysis only reads them. It follows the shared
protocol of :mod:`lens_laai.interventions.protocol` (hooks, ``apply``, algebra, save/load, ``to``).

Example:
    >>> import torch
    >>> from lens_laai import HeadIntervention
    >>> from lens_laai.testing import tiny_model
    >>> model = tiny_model()
    >>> iv = HeadIntervention.from_deltas(model, {1: torch.zeros(4, 16)})
    >>> iv.deltas[1][2] = 0.5                      # switch on head 2 of layer 1
    >>> iv.selected_heads()
    [(1, 2)]
    >>> iv.head_norms().shape                      # [n_layers, n_heads], like transformer_lens.patching
    torch.Size([3, 4])
    >>> with iv.apply(model):                       # hooks live only inside the block
    ...     logits = model(torch.tensor([[1, 5, 6]]))
    >>> logits = model.run_with_hooks(torch.tensor([[1, 5, 6]]), fwd_hooks=iv.fwd_hooks())
    >>> doubled = 2.0 * iv + iv                     # interventions compose by addition
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import InterventionError
from lens_laai.interventions.positions import (
    Positions,
    check_positions,
    positions_from_json,
)
from lens_laai.interventions.protocol import (
    Hook,
    InterventionBase,
    Where,
    adder_hook,
    by_layer,
    check_tensor,
)
from lens_laai.models.bridge import (
    hook_name,
    model_fingerprint,
    model_name,
)
from lens_laai.models.head_write import write_of_delta


def delta_hook(delta: Tensor, positions: Where = "last"):
    """A ``hook_z`` hook function adding ``delta`` at ``positions``.

    Example:
        >>> import torch
        >>> from lens_laai.interventions.head import delta_hook
        >>> from lens_laai.models.bridge import hook_name
        >>> from lens_laai.testing import tiny_model
        >>> hook = delta_hook(torch.ones(2, 3))  # [n_heads, d_head], added at each row's last position
        >>> hook(torch.zeros(1, 4, 2, 3), None)[0, :, 0, 0].tolist()
        [0.0, 0.0, 0.0, 1.0]
        >>> model, tokens = tiny_model(), torch.tensor([[1, 5, 6]])
        >>> delta = torch.zeros(model.cfg.n_heads, model.cfg.d_head)
        >>> delta[2] = 1.0
        >>> steered = model.run_with_hooks(tokens, fwd_hooks=[(hook_name(1), delta_hook(delta))])
        >>> bool((steered[0, -1] != model(tokens)[0, -1]).any()), torch.equal(steered[0, :-1], model(tokens)[0, :-1])
        (True, True)
    """
    return adder_hook(delta, positions)


@dataclass(eq=False)
class HeadIntervention(InterventionBase):
    """Additive per-head vectors on the attention outputs (``hook_z``) of one or more layers.

    Attributes:
        deltas: ``{layer: Δ}`` with Δ of shape ``[n_heads, d_head]``; a head is *selected*
            when its row is non-zero.
        model_name: the model the vectors were made for (informational).
        fingerprint: shapes (``n_layers, n_heads, d_head, d_model, d_vocab``) and a weight
            digest of that model; another shape is refused, other weights give a warning.
        positions: ``"last"`` (each row's last real token, default), ``"all"``, or indices;
            see :mod:`lens_laai.interventions.positions`.
        metadata: JSON-serialisable facts (fit config, the data it was fitted on, template, scores).

    Example:
        >>> import torch
        >>> from lens_laai import HeadIntervention
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> delta = torch.zeros(model.cfg.n_heads, model.cfg.d_head)
        >>> delta[2] = 1.0
        >>> iv = HeadIntervention.from_deltas(model, {1: delta})
        >>> iv.selected_heads(), tuple(iv.head_norms().shape)
        ([(1, 2)], (3, 4))
        >>> with iv.apply(model):  # Δ at each row's last token; the hooks are gone after the block
        ...     steered = model(torch.tensor([[1, 5, 6]]))
        >>> bool((steered != model(torch.tensor([[1, 5, 6]]))).any())
        True
        >>> torch.equal((iv + iv).deltas[1], (2 * iv).deltas[1])  # task calculus: interventions add and scale
        True
    """

    FORMAT: ClassVar[str] = "lens_laai.HeadIntervention"
    TENSOR_STEM: ClassVar[str] = "deltas"

    deltas: dict[int, Float[Tensor, "head d_head"]]
    model_name: str
    fingerprint: dict[str, Any]
    positions: Positions = "last"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions = check_positions(self.positions)
        n_layers = self.fingerprint["n_layers"]
        shape = (self.fingerprint["n_heads"], self.fingerprint["d_head"])
        deltas = {}
        for layer, delta in self.deltas.items():
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
                raise InterventionError(f"Layer {layer!r} is out of range: the model has layers 0..{n_layers - 1}.")
            deltas[layer] = check_tensor(f"Δ for layer {layer}", delta, shape)
        self.deltas = dict(sorted(deltas.items()))

    # construction ---------------------------------------------------------------------------
    @classmethod
    def from_deltas(
        cls,
        model: TransformerBridge,
        deltas: dict[int, Tensor],
        positions: Positions = "last",
        metadata: dict[str, Any] | None = None,
    ) -> HeadIntervention:
        """An intervention for ``model`` from your own ``{layer: Δ[n_heads, d_head]}``."""
        return cls(dict(deltas), model_name(model), model_fingerprint(model), positions, dict(metadata or {}))

    @classmethod
    def zeros(cls, model: TransformerBridge, layers: list[int] | int, **kwargs: Any) -> HeadIntervention:
        """An all-zero intervention on ``layers`` of ``model``."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        cfg = model.cfg
        return cls.from_deltas(model, {l: torch.zeros(cfg.n_heads, cfg.d_head) for l in layers}, **kwargs)

    @property
    def layers(self) -> list[int]:
        return list(self.deltas)

    # reading ----------------------------------------------------------------------------------
    def heads(self) -> pd.DataFrame:
        """One row per (layer, head): ``layer, head, norm, l1, selected``."""
        rows = []
        for layer, delta in self.deltas.items():
            norms, l1 = delta.detach().float().norm(dim=-1), delta.detach().float().abs().sum(dim=-1)
            rows += [
                {"layer": layer, "head": h, "norm": float(norms[h]), "l1": float(l1[h]), "selected": bool(norms[h] > 0)}
                for h in range(delta.shape[0])
            ]
        return pd.DataFrame(rows, columns=["layer", "head", "norm", "l1", "selected"])

    def head_norms(self) -> Float[Tensor, "n_layers n_heads"]:
        """‖Δ_h‖₂ as an ``[n_layers, n_heads]`` tensor (zero where nothing is added)."""
        out = torch.zeros(self.fingerprint["n_layers"], self.fingerprint["n_heads"])
        for layer, delta in self.deltas.items():
            out[layer] = delta.detach().float().norm(dim=-1).cpu()
        return out

    def selected_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` pairs whose Δ is not exactly zero."""
        return [
            (layer, int(h))
            for layer, delta in self.deltas.items()
            for h in torch.nonzero(delta.detach().abs().sum(-1) > 0).flatten().tolist()
        ]

    def residual_image(
        self, model: TransformerBridge, z: dict[int, Tensor] | None = None
    ) -> dict[int, Float[Tensor, "... d_model"]]:
        """What Δ adds to the residual stream at each layer, through the block's real attention-output path.

        Without ``z``: ``Σ_h Δ_h · W_O[L, h]`` (``[d_model]`` per layer), exact where the block adds
        its attention output linearly. A block that normalises its attention output before the
        residual add (Gemma 2 and 3) needs ``z = {layer: hook_z}`` (``[..., n_heads, d_head]``,
        the model's own activation at the rows to read, without Δ); then each layer's entry is
        ``[..., d_model]``, the exact change of the block's write (:mod:`lens_laai.models.head_write`).
        """
        self.check_model(model)
        z = z or {}
        out = {}
        for layer, delta in self.deltas.items():
            try:
                out[layer] = write_of_delta(model, layer, delta.detach(), z.get(layer))
            except ValueError as err:
                raise InterventionError(str(err)) from None
        return out

    def equals(self, other: HeadIntervention) -> bool:
        """Bit-for-bit equality of tensors and metadata."""
        return (
            self.layers == other.layers
            and all(torch.equal(self.deltas[l], other.deltas[l]) for l in self.layers)
            and (self.model_name, self.fingerprint, self.positions, self.metadata)
            == (other.model_name, other.fingerprint, other.positions, other.metadata)
        )

    def __repr__(self) -> str:
        heads = ", ".join(f"L{l}H{h}" for l, h in self.selected_heads()) or "none"
        return (
            f"HeadIntervention(name={self.metadata.get('name', '?')!r}, layers={self.layers}, "
            f"selected=[{heads}], positions={self.positions!r}, model={self.model_name!r})"
        )

    # protocol ---------------------------------------------------------------------------------
    def _hooks(self, where: Where) -> list[Hook]:
        return [(hook_name(layer), delta_hook(delta, where)) for layer, delta in self.deltas.items()]

    def _tensors(self) -> dict[str, Tensor]:
        return {f"layer.{l}": d for l, d in self.deltas.items()}

    def _with_tensors(self, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> HeadIntervention:
        deltas = {int(k.split(".", 1)[1]): t for k, t in tensors.items()}
        return HeadIntervention(deltas, self.model_name, dict(self.fingerprint), self.positions, metadata)

    def _combined_tensors(self, other: HeadIntervention, sign: float) -> dict[str, Tensor]:
        deltas = {l: d.clone() for l, d in self.deltas.items()}
        for layer, delta in other.deltas.items():
            deltas[layer] = deltas[layer] + sign * delta if layer in deltas else sign * delta
        return {f"layer.{l}": d for l, d in deltas.items()}

    def _manifest_extra(self) -> dict[str, Any]:
        return {
            "hook_names": {str(l): hook_name(l) for l in self.layers},
            "selected_heads": [list(h) for h in self.selected_heads()],
        }

    @classmethod
    def _from_saved(cls, tensors: dict[str, Tensor], manifest: dict[str, Any]) -> HeadIntervention:
        deltas = by_layer(tensors)
        recorded = manifest.get("hook_names")
        if isinstance(recorded, dict) and sorted(recorded) != sorted(str(l) for l in deltas):
            raise InterventionError(
                f"the tensor file holds layers {sorted(deltas)} but the manifest records layers "
                f"{sorted(recorded)[:20]}; the save is damaged or was edited."
            )
        return cls(
            deltas,
            manifest["model_name"],
            manifest["fingerprint"],
            positions_from_json(manifest.get("positions")),
            manifest["metadata"],
        )
