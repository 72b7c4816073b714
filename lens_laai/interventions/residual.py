"""A vector added to the residual stream at one layer: the shape of a Function Vector.

Same contract as :class:`lens_laai.HeadIntervention` (``fwd_hooks()``, ``apply()``,
``check_model()``, scaling, addition, atomic save/load without pickle), so evaluation treats both
alike.

Example:
    >>> import torch
    >>> from lens_laai.baselines import ResidualIntervention
    >>> from lens_laai.models.loading import model_fingerprint
    >>> from lens_laai.testing import tiny_model
    >>> model = tiny_model()
    >>> fv = ResidualIntervention(torch.ones(64), 1, "tiny", model_fingerprint(model))
    >>> with (2.0 * fv).apply(model):
    ...     logits = model(torch.tensor([[1, 5, 6]]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from jaxtyping import Float
from torch import Tensor

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
    check_tensor,
)

RESID_HOOK = "blocks.{layer}.hook_resid_post"


@dataclass(eq=False)
class ResidualIntervention(InterventionBase):
    """A vector added to the output of block ``layer`` (``blocks.{layer}.hook_resid_post``).

    Example:
        >>> import torch
        >>> from lens_laai.interventions.residual import ResidualIntervention
        >>> from lens_laai.models.bridge import model_fingerprint, model_name
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> iv = ResidualIntervention(torch.ones(model.cfg.d_model), 1, model_name(model), model_fingerprint(model))
        >>> with iv.apply(model):
        ...     logits = model(torch.tensor([[1, 5, 6]]))
        >>> iv.layers
        [1]
    """

    FORMAT: ClassVar[str] = "lens_laai.ResidualIntervention"
    TENSOR_STEM: ClassVar[str] = "vector"

    vector: Float[Tensor, " d_model"]
    layer: int
    model_name: str
    fingerprint: dict[str, Any]
    positions: Positions = "last"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions = check_positions(self.positions)
        n_layers = self.fingerprint["n_layers"]
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or not 0 <= self.layer < n_layers:
            raise InterventionError(f"Layer {self.layer!r} is out of range: the model has layers 0..{n_layers - 1}.")
        self.vector = check_tensor("The vector", self.vector, (self.fingerprint["d_model"],))

    @property
    def hook_name(self) -> str:
        return RESID_HOOK.format(layer=self.layer)

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    def equals(self, other: ResidualIntervention) -> bool:
        """Bit-for-bit equality of the vector and everything else."""
        import torch

        return torch.equal(self.vector, other.vector) and (
            self.layer,
            self.model_name,
            self.fingerprint,
            self.positions,
            self.metadata,
        ) == (other.layer, other.model_name, other.fingerprint, other.positions, other.metadata)

    def _hooks(self, where: Where) -> list[Hook]:
        return [(self.hook_name, adder_hook(self.vector, where))]

    def _tensors(self) -> dict[str, Tensor]:
        return {"vector": self.vector}

    def _with_tensors(self, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> ResidualIntervention:
        return ResidualIntervention(
            tensors["vector"], self.layer, self.model_name, dict(self.fingerprint), self.positions, metadata
        )

    def _combined_tensors(self, other: ResidualIntervention, sign: float) -> dict[str, Tensor]:
        if other.layer != self.layer:
            raise InterventionError(
                f"Cannot add residual interventions at different layers ({self.layer} vs {other.layer})."
            )
        return {"vector": self.vector + sign * other.vector}

    def _manifest_extra(self) -> dict[str, Any]:
        return {"layer": self.layer, "hook_name": self.hook_name}

    @classmethod
    def _from_saved(cls, tensors: dict[str, Tensor], manifest: dict[str, Any]) -> ResidualIntervention:
        if set(tensors) != {"vector"} or not isinstance(manifest.get("layer"), int):
            raise InterventionError("a ResidualIntervention save needs one tensor 'vector' and an integer 'layer'.")
        return cls(
            tensors["vector"],
            manifest["layer"],
            manifest["model_name"],
            manifest["fingerprint"],
            positions_from_json(manifest.get("positions")),
            manifest["metadata"],
        )
