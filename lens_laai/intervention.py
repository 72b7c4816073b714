"""The intervention object: per-head additive vectors Δ on ``blocks.L.attn.hook_z``.

A :class:`HeadIntervention` is plain data (one ``[n_heads, d_head]`` tensor per intervened layer,
the positions it acts on, and metadata) that knows its own TransformerLens hooks. Fitting
produces one, baselines produce them too, and analysis only reads them.

Example:
    >>> import torch
    >>> from lens_laai import HeadIntervention
    >>> from lens_laai.testing import tiny_model
    >>> model = tiny_model()
    >>> iv = HeadIntervention.zeros(model, layers=[1])
    >>> iv.deltas[1][2] = 0.5                      # switch on head 2 of layer 1
    >>> iv.selected_heads()
    [(1, 2)]
    >>> with iv.apply(model):                       # hooks live only inside the block
    ...     logits = model(torch.tensor([[1, 5, 6]]))
    >>> doubled = 2.0 * iv + iv                     # interventions compose by addition
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Union

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from .io import load_bundle, save_bundle
from .models import model_fingerprint, model_name

HOOK_TEMPLATE = "blocks.{layer}.attn.hook_z"
TENSOR_FILE = "deltas.safetensors"
FORMAT = "lens_laai.HeadIntervention"
FORMAT_VERSION = 1
Positions = Union[str, tuple[int, ...]]


class Intervention(Protocol):
    """What evaluation needs of any intervention (heads, residual vectors, baselines)."""

    metadata: dict[str, Any]

    def fwd_hooks(self, positions: "Positions | Tensor | None" = None) -> list[tuple[str, Callable]]: ...

    def check_model(self, model: TransformerBridge) -> None: ...


class InterventionError(ValueError):
    """An intervention that does not fit the model, file or operation it was given."""


def hook_name(layer: int) -> str:
    return HOOK_TEMPLATE.format(layer=layer)


def add_at_positions(
    z: Float[Tensor, "batch pos head d_head"],
    delta: Float[Tensor, "head d_head"],
    positions: Positions | Tensor,
) -> Float[Tensor, "batch pos head d_head"]:
    """Return ``z`` with ``delta`` added at ``positions`` (a new tensor; ``z`` is untouched).

    ``positions`` is ``"last"``, ``"all"``, a tuple of (possibly negative) indices, or a
    ``[batch]`` tensor with one index per row.
    """
    delta = delta.to(dtype=z.dtype, device=z.device)
    if isinstance(positions, str) and positions == "all":
        return z + delta
    out = z.clone()
    if isinstance(positions, Tensor):
        rows = torch.arange(z.shape[0], device=z.device)
        out[rows, positions.to(z.device)] += delta
    elif isinstance(positions, str) and positions == "last":
        out[:, -1] += delta
    else:
        out[:, list(positions)] += delta
    return out


@dataclass(eq=False)
class HeadIntervention:
    """Additive per-head vectors on the attention outputs (``hook_z``) of one or more layers.

    Attributes:
        deltas: ``{layer: Δ}`` with Δ of shape ``[n_heads, d_head]``; a head is *selected*
            when its row is non-zero.
        model_name: the model the vectors were made for (informational).
        fingerprint: ``n_layers, n_heads, d_head, d_model, d_vocab`` of that model; applying
            or loading onto a model with another fingerprint is refused.
        positions: ``"last"`` (the last prompt token, default), ``"all"``, or explicit indices.
        metadata: JSON-serialisable facts (fit config, task, data hash, scores).
    """

    deltas: dict[int, Float[Tensor, "head d_head"]]
    model_name: str
    fingerprint: dict[str, int]
    positions: Positions = "last"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.deltas = {int(k): v for k, v in sorted(self.deltas.items())}
        self.positions = check_positions(self.positions)
        shape = (self.fingerprint["n_heads"], self.fingerprint["d_head"])
        for layer, delta in self.deltas.items():
            if not 0 <= layer < self.fingerprint["n_layers"]:
                raise InterventionError(
                    f"Layer {layer} is out of range: the model has layers 0..{self.fingerprint['n_layers'] - 1}."
                )
            if tuple(delta.shape) != shape:
                raise InterventionError(f"Δ for layer {layer} has shape {tuple(delta.shape)}, expected {shape}.")

    # construction ---------------------------------------------------------------------------
    @classmethod
    def zeros(cls, model: TransformerBridge, layers: list[int] | int, **kwargs: Any) -> "HeadIntervention":
        """An all-zero intervention on ``layers`` of ``model``."""
        fp = model_fingerprint(model)
        layers = [layers] if isinstance(layers, int) else list(layers)
        deltas = {l: torch.zeros(fp["n_heads"], fp["d_head"]) for l in layers}
        return cls(deltas, model_name(model), fp, **kwargs)

    @property
    def layers(self) -> list[int]:
        return list(self.deltas)

    # hooks ------------------------------------------------------------------------------------
    def fwd_hooks(self, positions: Positions | Tensor | None = None) -> list[tuple[str, Callable]]:
        """A TransformerLens ``fwd_hooks`` list, for ``model.run_with_hooks`` or ``model.hooks``."""
        where = self.positions if positions is None else positions
        return [(hook_name(layer), delta_hook(delta, where)) for layer, delta in self.deltas.items()]

    @contextmanager
    def apply(self, model: TransformerBridge, positions: Positions | Tensor | None = None) -> Iterator[TransformerBridge]:
        """Context manager: the model computes with Δ inside the block, exactly as before after it.

        Only the hooks added here are removed on exit (also on an exception); hooks the caller
        attached beforehand stay.
        """
        self.check_model(model)
        with model.hooks(fwd_hooks=self.fwd_hooks(positions)):
            yield model

    def check_model(self, model: TransformerBridge) -> None:
        """Raise :class:`InterventionError` unless ``model`` has this intervention's fingerprint."""
        check_fingerprint(self.fingerprint, self.model_name, model)

    # reading ----------------------------------------------------------------------------------
    def heads(self) -> pd.DataFrame:
        """One row per (layer, head): ``layer, head, norm, l1, selected``."""
        rows = []
        for layer, delta in self.deltas.items():
            norms = delta.detach().float().norm(dim=-1)
            l1 = delta.detach().float().abs().sum(dim=-1)
            for head in range(delta.shape[0]):
                rows.append(
                    {"layer": layer, "head": head, "norm": float(norms[head]), "l1": float(l1[head]),
                     "selected": bool(norms[head] > 0)}
                )
        return pd.DataFrame(rows, columns=["layer", "head", "norm", "l1", "selected"])

    def selected_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` pairs whose Δ is not exactly zero."""
        return [
            (layer, int(h)) for layer, delta in self.deltas.items()
            for h in torch.nonzero(delta.detach().abs().sum(-1) > 0).flatten().tolist()
        ]

    def equals(self, other: "HeadIntervention") -> bool:
        """Bit-for-bit equality of tensors and metadata."""
        return (
            self.layers == other.layers
            and all(torch.equal(self.deltas[l], other.deltas[l]) for l in self.layers)
            and (self.model_name, self.fingerprint, self.positions, self.metadata)
            == (other.model_name, other.fingerprint, other.positions, other.metadata)
        )

    def detach(self) -> "HeadIntervention":
        return self._with({l: d.detach().clone() for l, d in self.deltas.items()}, self.metadata)

    # algebra ----------------------------------------------------------------------------------
    def __add__(self, other: "HeadIntervention") -> "HeadIntervention":
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: "HeadIntervention") -> "HeadIntervention":
        return self._combine(other, -1.0, "-")

    def __mul__(self, scale: float) -> "HeadIntervention":
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        return self._with({l: d * float(scale) for l, d in self.deltas.items()}, {"scaled_by": float(scale)})

    __rmul__ = __mul__

    def __neg__(self) -> "HeadIntervention":
        return self * -1.0

    def _combine(self, other: "HeadIntervention", sign: float, op: str) -> "HeadIntervention":
        if not isinstance(other, HeadIntervention):
            return NotImplemented
        if other.fingerprint != self.fingerprint:
            raise InterventionError(
                f"Cannot combine interventions for different models ({self.model_name!r} "
                f"{self.fingerprint} vs {other.model_name!r} {other.fingerprint})."
            )
        if other.positions != self.positions:
            raise InterventionError(
                f"Cannot combine interventions acting at different positions ({self.positions!r} vs "
                f"{other.positions!r}); rebuild one with the other's positions."
            )
        deltas = {l: d.clone() for l, d in self.deltas.items()}
        for layer, delta in other.deltas.items():
            deltas[layer] = deltas[layer] + sign * delta if layer in deltas else sign * delta
        return self._with(deltas, {"composed": f"({self.metadata.get('name', 'a')}) {op} ({other.metadata.get('name', 'b')})"})

    def _with(self, deltas: dict[int, Tensor], metadata: dict[str, Any]) -> "HeadIntervention":
        return HeadIntervention(deltas, self.model_name, dict(self.fingerprint), self.positions, dict(metadata))

    # persistence ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/`` with ``deltas.safetensors`` and ``manifest.json``, atomically."""
        tensors = {f"layer.{l}": d.to(torch.float32) for l, d in self.deltas.items()}
        return save_bundle(Path(path), tensors, self._manifest(), TENSOR_FILE)

    @classmethod
    def load(cls, path: str | os.PathLike, model: TransformerBridge | None = None) -> "HeadIntervention":
        """Read what :meth:`save` wrote (no pickle); with ``model``, refuse a fingerprint mismatch."""
        try:
            tensors, manifest = load_bundle(Path(path), FORMAT, FORMAT_VERSION, TENSOR_FILE)
        except ValueError as err:
            raise InterventionError(str(err)) from None
        deltas = {int(name.split(".", 1)[1]): t for name, t in tensors.items()}
        iv = cls(deltas, manifest["model_name"], manifest["fingerprint"], positions_from_json(manifest["positions"]),
                 manifest.get("metadata", {}))
        if model is not None:
            iv.check_model(model)
        return iv

    def _manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "hook_names": {str(l): hook_name(l) for l in self.layers},
            "positions": positions_to_json(self.positions),
            "selected_heads": [list(h) for h in self.selected_heads()],
            "metadata": self.metadata,
            **versions(),
        }


def check_positions(positions: Positions) -> Positions:
    """Normalise ``positions`` (a list becomes a tuple) or raise :class:`InterventionError`."""
    if isinstance(positions, list):
        positions = tuple(int(p) for p in positions)
    if isinstance(positions, str) and positions not in ("last", "all"):
        raise InterventionError(f"positions must be 'last', 'all' or a tuple of ints, got {positions!r}.")
    return positions


def positions_to_json(positions: Positions) -> str | list[int]:
    return positions if isinstance(positions, str) else list(positions)


def positions_from_json(value: str | list[int]) -> Positions:
    return value if isinstance(value, str) else tuple(value)


def check_fingerprint(fingerprint: dict[str, int], made_for: str, model: TransformerBridge) -> None:
    """Raise :class:`InterventionError` unless ``model`` has ``fingerprint``."""
    theirs = model_fingerprint(model)
    if theirs != fingerprint:
        diff = {k: (fingerprint.get(k), v) for k, v in theirs.items() if fingerprint.get(k) != v}
        raise InterventionError(
            f"This intervention was made for {made_for!r} and does not fit this model "
            f"(mismatch, ours vs model's: {diff}). Fit it again on this model."
        )


def versions() -> dict[str, str]:
    """Library versions recorded in every manifest."""
    import transformer_lens

    from . import __version__

    return {"lens_laai_version": __version__, "transformer_lens_version": getattr(transformer_lens, "__version__", "unknown")}


def delta_hook(delta: Tensor, positions: Positions | Tensor = "last") -> Callable:
    """A ``hook_z`` hook function adding ``delta`` at ``positions`` (see :func:`add_at_positions`)."""

    def hook(z: Tensor, hook: Any) -> Tensor:
        return add_at_positions(z, delta, positions)

    return hook
