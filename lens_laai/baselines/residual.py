"""A vector added to the residual stream at one layer: the shape of a Function Vector.

Same contract as :class:`lens_laai.HeadIntervention` (``fwd_hooks()``, ``apply()``,
``check_model()``, scaling, addition, atomic save/load without pickle), so evaluation treats both
alike.

Example:
    >>> import torch
    >>> from lens_laai.baselines import ResidualIntervention
    >>> from lens_laai.models import model_fingerprint
    >>> from lens_laai.testing import tiny_model
    >>> model = tiny_model()
    >>> fv = ResidualIntervention(torch.ones(64), 1, "tiny", model_fingerprint(model))
    >>> with (2.0 * fv).apply(model):
    ...     logits = model(torch.tensor([[1, 5, 6]]))
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from ..intervention import (
    InterventionError, Positions, add_at_positions, check_fingerprint, check_positions, positions_from_json,
    positions_to_json, versions,
)
from ..io import load_bundle, save_bundle

RESID_HOOK = "blocks.{layer}.hook_resid_post"
FORMAT, FORMAT_VERSION, TENSOR_FILE = "lens_laai.ResidualIntervention", 1, "vector.safetensors"


@dataclass(eq=False)
class ResidualIntervention:
    """A vector added to the output of block ``layer`` (``blocks.{layer}.hook_resid_post``)."""

    vector: Float[Tensor, " d_model"]
    layer: int
    model_name: str
    fingerprint: dict[str, int]
    positions: Positions = "last"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer = int(self.layer)
        self.positions = check_positions(self.positions)
        if not 0 <= self.layer < self.fingerprint["n_layers"]:
            raise InterventionError(f"Layer {self.layer} is out of range: the model has layers 0..{self.fingerprint['n_layers'] - 1}.")
        if tuple(self.vector.shape) != (self.fingerprint["d_model"],):
            raise InterventionError(f"The vector has shape {tuple(self.vector.shape)}, expected ({self.fingerprint['d_model']},).")

    @property
    def hook_name(self) -> str:
        return RESID_HOOK.format(layer=self.layer)

    def fwd_hooks(self, positions: Positions | Tensor | None = None) -> list[tuple[str, Callable]]:
        """A TransformerLens ``fwd_hooks`` list, for ``model.run_with_hooks`` or ``model.hooks``."""
        where, vector = self.positions if positions is None else positions, self.vector
        return [(self.hook_name, lambda x, hook: add_at_positions(x, vector, where))]

    @contextmanager
    def apply(self, model: TransformerBridge, positions: Positions | Tensor | None = None) -> Iterator[TransformerBridge]:
        """The model computes with the vector inside the block; only these hooks are removed on exit."""
        self.check_model(model)
        with model.hooks(fwd_hooks=self.fwd_hooks(positions)):
            yield model

    def check_model(self, model: TransformerBridge) -> None:
        """Raise :class:`InterventionError` unless ``model`` has this intervention's fingerprint."""
        check_fingerprint(self.fingerprint, self.model_name, model)

    def equals(self, other: "ResidualIntervention") -> bool:
        """Bit-for-bit equality of the vector and everything else."""
        return torch.equal(self.vector, other.vector) and (
            self.layer, self.model_name, self.fingerprint, self.positions, self.metadata
        ) == (other.layer, other.model_name, other.fingerprint, other.positions, other.metadata)

    def __mul__(self, scale: float) -> "ResidualIntervention":
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        return self._with(self.vector * float(scale), {**self.metadata, "scaled_by": float(scale)})

    __rmul__ = __mul__

    def __neg__(self) -> "ResidualIntervention":
        return self * -1.0

    def __add__(self, other: "ResidualIntervention") -> "ResidualIntervention":
        if not isinstance(other, ResidualIntervention):
            return NotImplemented
        for what, ours, theirs in (("models", self.fingerprint, other.fingerprint), ("layers", self.layer, other.layer),
                                   ("positions", self.positions, other.positions)):
            if ours != theirs:
                raise InterventionError(f"Cannot add residual interventions for different {what} ({ours!r} vs {theirs!r}).")
        names = (self.metadata.get("name", "a"), other.metadata.get("name", "b"))
        return self._with(self.vector + other.vector, {"composed": f"({names[0]}) + ({names[1]})"})

    def __sub__(self, other: "ResidualIntervention") -> "ResidualIntervention":
        return self + (-other)

    def _with(self, vector: Tensor, metadata: dict[str, Any]) -> "ResidualIntervention":
        return ResidualIntervention(vector, self.layer, self.model_name, dict(self.fingerprint), self.positions, metadata)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/`` with ``vector.safetensors`` and ``manifest.json``, atomically."""
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model_name": self.model_name,
            "fingerprint": self.fingerprint, "layer": self.layer, "hook_name": self.hook_name,
            "positions": positions_to_json(self.positions), "metadata": self.metadata, **versions(),
        }
        return save_bundle(Path(path), {"vector": self.vector.to(torch.float32)}, manifest, TENSOR_FILE)

    @classmethod
    def load(cls, path: str | os.PathLike, model: TransformerBridge | None = None) -> "ResidualIntervention":
        """Read what :meth:`save` wrote (no pickle); with ``model``, refuse a fingerprint mismatch."""
        try:
            tensors, manifest = load_bundle(Path(path), FORMAT, FORMAT_VERSION, TENSOR_FILE)
        except ValueError as err:
            raise InterventionError(str(err)) from None
        iv = cls(tensors["vector"], manifest["layer"], manifest["model_name"], manifest["fingerprint"],
                 positions_from_json(manifest["positions"]), manifest.get("metadata", {}))
        if model is not None:
            iv.check_model(model)
        return iv
